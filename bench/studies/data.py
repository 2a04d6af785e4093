"""Interaction data for the quality benchmark: MovieLens-100K, user files, a
synthetic generator, and the train/validation/test splits.

MovieLens-100K is read from the recbole 1.2.1 wheel on PyPI, which carries it
as ``recbole/dataset_example/ml-100k/ml-100k.inter``: PyPI is the one source
reachable from every machine this project runs on, and the wheel is immutable,
so the bytes are pinned by checksum.  The data is cached under
``~/.cache/triton_bloom/`` and never committed (GroupLens' licence forbids
redistribution).  A ``u.data`` file (tab-separated user, item, rating,
timestamp, no header) or a recbole ``.inter`` file can be named instead.

The synthetic generator needs nothing: users pick items with probability
proportional to a Zipf popularity times the exponential of a planted low-rank
affinity, so it has the two properties that make hashing hurt or not (a long
popularity tail, and structure an embedding can learn).

Every loader returns 0-based contiguous user and item ids, so the ids index an
embedding table directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import zipfile
from typing import Callable, Optional

import numpy as np

ML100K_WHEEL = "recbole-1.2.1-py3-none-any.whl"
ML100K_REQUIREMENT = "recbole==1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ML100K_FILE = "ml-100k.inter"
# sha256 of ML100K_MEMBER's bytes in the PyPI wheel: a damaged or different
# file would silently change every recorded number.
ML100K_SHA256 = "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"


class DatasetUnavailable(RuntimeError):
    """The dataset could not be obtained; the message says how to get it by hand."""


@dataclasses.dataclass
class Interactions:
    """One row per (user, item) event; ids are 0-based and below
    ``num_users`` / ``num_items``, which may exceed the ids present (a split
    keeps the full id space so one model serves all three parts)."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    rating: np.ndarray  # float32
    timestamp: np.ndarray  # int64
    num_users: int
    num_items: int
    name: str = "interactions"

    def __post_init__(self):
        n = len(self.user)
        if not (len(self.item) == len(self.rating) == len(self.timestamp) == n):
            raise ValueError("user, item, rating and timestamp must have the same length")

    def __len__(self):
        return len(self.user)

    def take(self, index: np.ndarray) -> "Interactions":
        """The rows ``index`` selects, in the same id space."""
        return dataclasses.replace(
            self,
            user=self.user[index],
            item=self.item[index],
            rating=self.rating[index],
            timestamp=self.timestamp[index],
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_interactions": len(self),
            "density": len(self) / (self.num_users * self.num_items),
        }


@dataclasses.dataclass
class Split:
    train: Interactions
    valid: Interactions
    test: Interactions

    def sizes(self) -> dict:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


# --------------------------------------------------------------------- files


def _contiguous(tokens: list) -> tuple[np.ndarray, int]:
    """0-based ids for raw id tokens; numeric tokens keep their numeric order,
    so ``u.data``'s 1..943 become 0..942 and the mapping is easy to read."""
    try:
        keys = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        keys = np.array(tokens, dtype=object).astype(str)
    uniques, ids = np.unique(keys, return_inverse=True)
    return ids.astype(np.int64), len(uniques)


def _build(users, items, ratings, timestamps, name) -> Interactions:
    user, num_users = _contiguous(users)
    item, num_items = _contiguous(items)
    return Interactions(
        user=user,
        item=item,
        rating=np.asarray(ratings, dtype=np.float32),
        timestamp=np.asarray(timestamps, dtype=np.int64),
        num_users=num_users,
        num_items=num_items,
        name=name,
    )


def _number(text: str, path: str, line_no: int, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}:{line_no}: {what} {text!r} is not a number") from None


def _parse_rows(lines, columns: dict, path: str, first_line_no: int, name: str) -> Interactions:
    """Rows of tab-separated fields; ``columns`` maps user/item/rating/timestamp
    to field positions (rating and timestamp may be missing: 1.0 and 0)."""
    users, items, ratings, timestamps = [], [], [], []
    width = max(columns.values()) + 1
    for line_no, line in enumerate(lines, start=first_line_no):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < width:
            raise ValueError(f"{path}:{line_no}: expected {width} tab-separated fields, got {len(fields)}: {line!r}")
        users.append(fields[columns["user"]].strip())
        items.append(fields[columns["item"]].strip())
        r = columns.get("rating")
        ratings.append(1.0 if r is None else _number(fields[r], path, line_no, "rating"))
        t = columns.get("timestamp")
        timestamps.append(0 if t is None else int(_number(fields[t], path, line_no, "timestamp")))
    if not users:
        raise ValueError(f"{path}: no interactions")
    return _build(users, items, ratings, timestamps, name)


def _inter_columns(header: str, path: str) -> dict:
    """Positions of recbole's ``user_id:token  item_id:token  rating:float
    timestamp:float`` columns, found by name so their order may differ."""
    names = [field.split(":", 1)[0].strip() for field in header.rstrip("\r\n").split("\t")]
    wanted = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}
    columns = {key: names.index(col) for key, col in wanted.items() if col in names}
    if "user" not in columns or "item" not in columns:
        raise ValueError(f"{path}: .inter header needs user_id and item_id columns, got {names}")
    return columns


def _looks_like_inter_header(line: str) -> bool:
    return any(":" in field for field in line.split("\t"))


def read_interactions(path: str, name: Optional[str] = None) -> Interactions:
    """Read a ``u.data`` file (user, item, rating, timestamp, tab-separated,
    no header) or a recbole ``.inter`` file (a ``name:type`` header line),
    telling them apart by the header."""
    name = name or os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if not lines:
        raise ValueError(f"{path}: empty file")
    if _looks_like_inter_header(lines[0]):
        return _parse_rows(lines[1:], _inter_columns(lines[0], path), path, 2, name)
    columns = {"user": 0, "item": 1, "rating": 2, "timestamp": 3}
    return _parse_rows(lines, columns, path, 1, name)


# ------------------------------------------------------------------ ml-100k


def default_cache_dir() -> str:
    """``$TRITON_BLOOM_CACHE``, else ``$XDG_CACHE_HOME/triton_bloom``, else
    ``~/.cache/triton_bloom``."""
    if os.environ.get("TRITON_BLOOM_CACHE"):
        return os.environ["TRITON_BLOOM_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "triton_bloom")


def pip_download(requirement: str, dest: str) -> None:
    """Fetch one wheel with pip (no dependencies, no install): the ordinary
    client, so proxies and indexes configured for pip apply."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", dest]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-5:]  # pip's retry noise left out
        raise DatasetUnavailable(f"`{' '.join(cmd)}` failed:\n" + "\n".join(errors))


def _unavailable(reason: str, cache_dir: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"MovieLens-100K is not available: {reason}\n"
        f"It is read from the recbole 1.2.1 wheel on PyPI. To provide it by hand, either\n"
        f"  pip download --no-deps {ML100K_REQUIREMENT} -d {cache_dir}\n"
        f"or pass the path of a MovieLens u.data file (e.g. --dataset /path/to/ml-100k/u.data),\n"
        f"or use --dataset synthetic, which needs nothing."
    )


def _extract_member(wheel: str, target: str, expected_sha256: Optional[str]) -> None:
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(ML100K_MEMBER)
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DatasetUnavailable(f"{ML100K_MEMBER} in {wheel} does not match the pinned sha256 {expected_sha256}")
    tmp = target + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, target)  # never leave a half-written file that looks complete


def fetch_ml100k(
    cache_dir: Optional[str] = None,
    download: Callable[[str, str], None] = pip_download,
    expected_sha256: Optional[str] = ML100K_SHA256,
) -> str:
    """Path of ``ml-100k.inter`` in the cache, downloading the recbole wheel
    with ``download(requirement, dest)`` and extracting it when needed;
    :class:`DatasetUnavailable` with instructions when it cannot be had."""
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, ML100K_FILE)
    if os.path.exists(target):
        return target
    wheel = os.path.join(cache_dir, ML100K_WHEEL)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        if not os.path.exists(wheel):
            download(ML100K_REQUIREMENT, cache_dir)
        if not os.path.exists(wheel):
            raise DatasetUnavailable(f"the download left no {ML100K_WHEEL} in {cache_dir}")
        _extract_member(wheel, target, expected_sha256)
    except DatasetUnavailable as e:
        raise _unavailable(str(e), cache_dir) from e
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise _unavailable(f"{type(e).__name__}: {e}", cache_dir) from e
    return target


def load_ml100k(cache_dir: Optional[str] = None) -> Interactions:
    return read_interactions(fetch_ml100k(cache_dir), name="ml-100k")


# ---------------------------------------------------------------- synthetic


def synthetic(
    num_users: int = 1000,
    num_items: int = 2000,
    rank: int = 8,
    mean_per_user: int = 40,
    min_per_user: int = 5,
    zipf_exponent: float = 1.0,
    affinity_scale: float = 2.0,
    rating_noise: float = 0.5,
    seed: int = 0,
    return_truth: bool = False,
):
    """Implicit events and ratings with planted structure.

    Each user draws ``n_u`` distinct items (``min_per_user`` plus a geometric
    count, mean ``mean_per_user``) with probability proportional to
    ``pop_i * exp(affinity_scale * a_ui)``, where ``pop_i`` is Zipf in a random
    popularity order of the items and ``a_ui = <p_u, q_i> / sqrt(rank)`` a
    rank-``rank`` affinity of unit variance.  Ratings are ``a_ui + noise``,
    centred on 3.5 over the drawn pairs (drawn affinities are high by
    construction) and rounded into 1..5.  Timestamps are a random order per
    user, so a leave-last-out test item is a random draw from the user's set,
    not their weakest preference.  Item ids span ``num_items`` even if a tail
    item is never drawn.  With ``return_truth`` also returns the planted
    factors.
    """
    if not 1 <= min_per_user <= num_items:
        raise ValueError("need 1 <= min_per_user <= num_items")
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((num_users, rank))
    q = rng.standard_normal((num_items, rank))
    affinity = (p @ q.T) / np.sqrt(rank)
    popularity_rank = rng.permutation(num_items)  # item i is the popularity_rank[i]-th most popular
    log_pop = -zipf_exponent * np.log1p(popularity_rank)
    extra = max(mean_per_user - min_per_user, 1)
    counts = np.minimum(min_per_user + rng.geometric(1.0 / extra, num_users) - 1, num_items)

    # Gumbel top-n of the logits draws n items without replacement with
    # probability proportional to exp(logit): one vectorised draw per user.
    keys = log_pop[None, :] + affinity_scale * affinity + rng.gumbel(size=affinity.shape)
    order = np.argsort(-keys, axis=1, kind="stable")
    users = np.repeat(np.arange(num_users), counts)
    items = np.concatenate([order[u, : counts[u]] for u in range(num_users)])
    timestamps = np.concatenate([rng.permutation(c) for c in counts]) + 1_000_000_000
    a = affinity[users, items]
    ratings = np.clip(np.rint(3.5 + (a - a.mean()) + rating_noise * rng.standard_normal(len(a))), 1, 5)
    data = Interactions(
        user=users.astype(np.int64),
        item=items.astype(np.int64),
        rating=ratings.astype(np.float32),
        timestamp=timestamps.astype(np.int64),
        num_users=num_users,
        num_items=num_items,
        name="synthetic",
    )
    if return_truth:
        return data, {"user_factors": p, "item_factors": q, "affinity": affinity, "popularity_rank": popularity_rank}
    return data


# ------------------------------------------------------------------- splits


def leave_last_out(data: Interactions) -> Split:
    """Per user, the latest event is the test, the one before it validation,
    the rest training; users with fewer than three events stay in training.
    Timestamp ties (common: ml-100k rates many films in one second) keep file
    order, so the split is deterministic."""
    n = len(data)
    order = np.lexsort((np.arange(n), data.timestamp, data.user))  # by user, then time, then file order
    users = data.user[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], n]
    eligible = (ends - starts) >= 3
    test = order[ends[eligible] - 1]
    valid = order[ends[eligible] - 2]
    held = np.zeros(n, dtype=bool)
    held[test] = held[valid] = True
    train = np.flatnonzero(~held)
    return Split(data.take(train), data.take(np.sort(valid)), data.take(np.sort(test)))


def random_split(data: Interactions, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """A random train/validation/test partition of the events, the usual
    protocol for rating prediction; the same ``seed`` gives the same split."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    n = len(data)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    parts = perm[:n_train], perm[n_train : n_train + n_valid], perm[n_train + n_valid :]
    return Split(*(data.take(np.sort(p)) for p in parts))
