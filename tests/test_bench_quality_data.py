"""The quality benchmark's data: file readers, the ml-100k cache, the
synthetic generator and the splits.  No network: the ml-100k fetch is fed a
wheel built here."""

import hashlib
import os
import zipfile

import numpy as np
import pytest

from bench.studies import data as D

# (raw user, raw item, rating, timestamp); raw ids deliberately sparse and unsorted.
ROWS = [
    (10, 500, 4, 300),
    (3, 7, 5, 100),
    (10, 7, 3, 100),
    (7, 500, 1, 200),
    (3, 42, 2, 150),
    (10, 42, 5, 300),  # same second as the first row: file order breaks the tie
    (3, 500, 4, 120),
    (10, 9, 2, 50),
]


def write_u_data(path, rows=ROWS):
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    return str(path)


def write_inter(path, rows=ROWS):
    header = "item_id:token\tuser_id:token\ttimestamp:float\trating:float\n"  # not u.data's order
    path.write_text(header + "".join(f"{i}\t{u}\t{float(t)}\t{float(r)}\n" for u, i, r, t in rows))
    return str(path)


def rows_of(data):
    return sorted(zip(data.user.tolist(), data.item.tolist(), data.rating.tolist(), data.timestamp.tolist()))


# ------------------------------------------------------------------ readers


def test_u_data_ids_are_contiguous_in_numeric_order(tmp_path):
    data = D.read_interactions(write_u_data(tmp_path / "u.data"))
    assert (data.num_users, data.num_items, len(data)) == (3, 4, len(ROWS))
    users = {3: 0, 7: 1, 10: 2}
    items = {7: 0, 9: 1, 42: 2, 500: 3}
    assert data.user.tolist() == [users[u] for u, *_ in ROWS]
    assert data.item.tolist() == [items[i] for _, i, *_ in ROWS]
    assert data.rating.tolist() == [r for *_, r, _ in ROWS]
    assert data.timestamp.tolist() == [t for *_, t in ROWS]
    assert data.user.dtype == data.item.dtype == np.int64
    assert data.rating.dtype == np.float32


def test_inter_header_finds_columns_by_name(tmp_path):
    inter = D.read_interactions(write_inter(tmp_path / "x.inter"))
    u_data = D.read_interactions(write_u_data(tmp_path / "u.data"))
    assert rows_of(inter) == rows_of(u_data)
    assert (inter.num_users, inter.num_items) == (u_data.num_users, u_data.num_items)


def test_inter_without_rating_or_timestamp(tmp_path):
    path = tmp_path / "bare.inter"
    path.write_text("user_id:token\titem_id:token\nalice\tbook\nbob\tbook\nalice\tfilm\n")
    data = D.read_interactions(str(path))
    assert data.user.tolist() == [0, 1, 0]  # string tokens sort: alice < bob
    assert data.item.tolist() == [0, 0, 1]
    assert data.rating.tolist() == [1.0, 1.0, 1.0]
    assert data.timestamp.tolist() == [0, 0, 0]


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\n\n5\t6\t7\t8\r\n")
    assert len(D.read_interactions(str(path))) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("1\t2\t3\t4\n1\t2\t3\n", ":2: expected 4"),
        ("1\t2\tfive\t4\n", "rating 'five'"),
        ("", "empty file"),
        ("user_id:token\trating:float\n1\t2\n", "needs user_id and item_id"),
        ("user_id:token\titem_id:token\n", "no interactions"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.data"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        D.read_interactions(str(path))


# ------------------------------------------------------------------- ml-100k


def make_wheel(cache_dir, content: bytes):
    os.makedirs(cache_dir, exist_ok=True)
    with zipfile.ZipFile(os.path.join(cache_dir, D.ML100K_WHEEL), "w") as zf:
        zf.writestr(D.ML100K_MEMBER, content)
        zf.writestr("recbole/__init__.py", "")


INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n186\t302\t3\t891717742\n"


def no_download(requirement, dest):
    raise AssertionError("must not download when the wheel is cached")


def test_fetch_extracts_from_a_cached_wheel(tmp_path):
    cache = str(tmp_path / "cache")
    make_wheel(cache, INTER.encode())
    sha = hashlib.sha256(INTER.encode()).hexdigest()
    path = D.fetch_ml100k(cache, download=no_download, expected_sha256=sha)
    assert path == os.path.join(cache, D.ML100K_FILE)
    data = D.read_interactions(path)
    assert (len(data), data.num_users, data.num_items) == (2, 2, 2)
    os.remove(os.path.join(cache, D.ML100K_WHEEL))  # the extracted file alone suffices now
    assert D.fetch_ml100k(cache, download=no_download) == path


def test_fetch_downloads_the_pinned_wheel(tmp_path):
    cache = str(tmp_path / "cache")
    calls = []

    def fake_pip(requirement, dest):
        calls.append((requirement, dest))
        make_wheel(dest, INTER.encode())

    D.fetch_ml100k(cache, download=fake_pip, expected_sha256=None)
    assert calls == [("recbole==1.2.1", cache)]


def test_fetch_rejects_a_wheel_with_other_data(tmp_path):
    cache = str(tmp_path / "cache")
    make_wheel(cache, INTER.encode())
    with pytest.raises(D.DatasetUnavailable, match="sha256"):
        D.fetch_ml100k(cache, download=no_download)  # the real ml-100k checksum
    assert not os.path.exists(os.path.join(cache, D.ML100K_FILE))


@pytest.mark.parametrize("outcome", ["fails", "leaves nothing"])
def test_fetch_failure_says_how_to_get_the_data(tmp_path, outcome):
    def offline(requirement, dest):
        if outcome == "fails":
            raise D.DatasetUnavailable("pip: no network")

    with pytest.raises(D.DatasetUnavailable) as info:
        D.fetch_ml100k(str(tmp_path / "cache"), download=offline)
    message = str(info.value)
    assert "pip download --no-deps recbole==1.2.1" in message
    assert "u.data" in message and "--dataset synthetic" in message


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_BLOOM_CACHE", str(tmp_path))
    assert D.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("TRITON_BLOOM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.default_cache_dir() == str(tmp_path / "xdg" / "triton_bloom")


# ------------------------------------------------------------------- splits


def test_leave_last_out_holds_out_the_latest_events(tmp_path):
    data = D.read_interactions(write_u_data(tmp_path / "u.data"))
    split = D.leave_last_out(data)
    # user 10 (id 2): times 300, 100, 300, 50 -> test is the later-listed 300 (item 42), valid the first 300 (item 500)
    # user 3 (id 0): times 100, 150, 120 -> test 150 (item 42), valid 120 (item 500)
    # user 7 (id 1): one event, kept for training
    assert sorted(zip(split.test.user.tolist(), split.test.item.tolist())) == [(0, 2), (2, 2)]
    assert sorted(zip(split.valid.user.tolist(), split.valid.item.tolist())) == [(0, 3), (2, 3)]
    assert 1 in split.train.user.tolist() and 1 not in split.test.user.tolist()
    assert sorted(rows_of(split.train) + rows_of(split.valid) + rows_of(split.test)) == rows_of(data)
    for part in (split.train, split.valid, split.test):
        assert (part.num_users, part.num_items) == (data.num_users, data.num_items)


def test_leave_last_out_on_generated_data():
    data = D.synthetic(num_users=60, num_items=90, mean_per_user=8, min_per_user=3, seed=1)
    split = D.leave_last_out(data)
    assert len(split.test) == len(split.valid) == data.num_users  # every user has >= 3 events
    assert len(np.unique(split.test.user)) == data.num_users
    assert split.sizes()["train"] == len(data) - 2 * data.num_users
    latest_train = np.full(data.num_users, -1)
    np.maximum.at(latest_train, split.train.user, split.train.timestamp)
    assert (split.valid.timestamp[np.argsort(split.valid.user)] >= latest_train).all()
    valid_time = split.valid.timestamp[np.argsort(split.valid.user)]
    assert (split.test.timestamp[np.argsort(split.test.user)] >= valid_time).all()


def test_random_split_partitions_deterministically():
    data = D.synthetic(num_users=50, num_items=80, mean_per_user=10, seed=2)
    a = D.random_split(data, (0.8, 0.1, 0.1), seed=0)
    b = D.random_split(data, (0.8, 0.1, 0.1), seed=0)
    c = D.random_split(data, (0.8, 0.1, 0.1), seed=1)
    assert all(rows_of(x) == rows_of(y) for x, y in zip((a.train, a.valid, a.test), (b.train, b.valid, b.test)))
    assert rows_of(a.test) != rows_of(c.test)
    assert sorted(rows_of(a.train) + rows_of(a.valid) + rows_of(a.test)) == rows_of(data)
    assert abs(len(a.train) - 0.8 * len(data)) <= 1 and abs(len(a.valid) - 0.1 * len(data)) <= 1


@pytest.mark.parametrize("fractions", [(0.8, 0.2), (0.5, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_random_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError):
        D.random_split(D.synthetic(num_users=5, num_items=10, mean_per_user=5, seed=0), fractions)


# ---------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def generated():
    return D.synthetic(num_users=400, num_items=600, rank=4, mean_per_user=30, seed=3, return_truth=True)


def test_synthetic_is_reproducible_and_seeded():
    a = D.synthetic(num_users=30, num_items=40, mean_per_user=6, seed=5)
    b = D.synthetic(num_users=30, num_items=40, mean_per_user=6, seed=5)
    c = D.synthetic(num_users=30, num_items=40, mean_per_user=6, seed=6)
    assert rows_of(a) == rows_of(b)
    assert rows_of(a) != rows_of(c)


def test_synthetic_ids_and_events_are_well_formed(generated):
    data, _ = generated
    assert (data.num_users, data.num_items) == (400, 600)
    assert data.user.min() == 0 and data.user.max() == 399 and data.item.min() >= 0 and data.item.max() < 600
    assert len(set(zip(data.user.tolist(), data.item.tolist()))) == len(data)  # no repeated pairs
    assert np.bincount(data.user, minlength=400).min() >= 5
    assert set(np.unique(data.rating).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_synthetic_popularity_has_a_long_tail(generated):
    data, truth = generated
    counts = np.bincount(data.item, minlength=data.num_items)
    head = np.sort(counts)[::-1][: data.num_items // 10]
    assert head.sum() > 0.3 * len(data)  # top 10% of items take far more than 10% of events
    by_planted = counts[np.argsort(truth["popularity_rank"])]  # most popular planted item first
    tenth = data.num_items // 10
    assert by_planted[:tenth].mean() > 3 * by_planted[-tenth:].mean()


def test_synthetic_choices_and_ratings_follow_the_planted_affinity(generated):
    data, truth = generated
    affinity = truth["affinity"]
    assert affinity[data.user, data.item].mean() > affinity.mean() + 0.5
    assert np.corrcoef(affinity[data.user, data.item], data.rating)[0, 1] > 0.5
