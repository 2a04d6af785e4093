"""Where each layout wins: quality against bytes, from 0.5 down to 0.01 of the
full table, on a catalogue of a million items.

Two studies, one run, one machine:

(a) **Budget sweep, matrix factorisation.**  A synthetic catalogue of
    ``num_items`` items (1,000,000 in the full run) with Zipf popularity and a
    rank-32 planted affinity, a few thousand users.  ``score = <p_u, q_i> + b_i``;
    the item table is the one compressed, to each budget (bytes of the item
    table against the full ``num_items x 64`` float32 table).  Layouts at each
    budget: the full table at a reduced dimension (the user table shrinks with
    it), the hashing trick (``k = 1``), plain Bloom (``k = 2, 4``), hot rows +
    Bloom tail, a private low-dimensional part + Bloom, and the library
    planner's choice.  The reduced dimension runs out: at 0.01 of a 64-wide
    table there is under one float per id.

(b) **Width fixed by the network: a next-item pooling model** (Spotlight's
    ``PoolNet``: the user is the mean of the last ``seq_len`` item vectors of
    their history, scored by dot product against the same item table, plus an
    item bias), width 64, on ml-100k in time order (``seq_dataset`` can
    name the synthetic catalogue instead).  The dimension is not free here,
    so the equal-bytes baselines are a factorised table (a private ``r``-dim code per id times a
    shared ``r x 64`` projection, ``nn.Embedding`` + ``nn.Linear``) and the
    hashing trick; against them plain Bloom and the new layouts.

Protocol, the same for every layout: every table element starts from
``normal(0, INIT_STD)`` (the full 64-wide table's scale, also for a reduced
dimension; a projection is scaled so that the vector it adds has that
per-element scale too); SparseAdam on sparse tables and Adam on the rest; a
fixed L2 on the looked-up vectors and biases; a sampled softmax over the
batch's positives and as many uniform items, logQ-corrected; the same
learning-rate grid and the same most-epochs for every layout; validation
after each epoch with early stopping; the test metrics of the best
validation epoch under the learning rate validation chose.  Metrics
rank each held-out item against every catalogue item the user has not
interacted with (full ranking, no sampled candidates) on a fixed random
sample of users, ties counting half; HR@100 picks the epoch and rate.
Every model, biases-only included, has a full-size item bias (one float per item, outside the budget, the same for
every layout); the user table of (a) is outside the budget too.

    python bench/studies/budget_sweep.py --quick --out /tmp/budget_sweep_quick.json   # minutes
    python bench/studies/budget_sweep.py --out bench/results/budget_sweep_cpu.json    # the full run, both studies

The recorded full run ran the two studies side by side, one process a core,
and merged them (49 min on 2 shared cores; the sweep alone took 37):

    python bench/studies/budget_sweep.py --studies sweep --no-plot --out /tmp/sweep.json &
    python bench/studies/budget_sweep.py --studies width --no-plot --out /tmp/width.json; wait
    python bench/studies/budget_sweep.py --merge /tmp/sweep.json /tmp/width.json --out bench/results/budget_sweep_cpu.json

Writes the JSON, a markdown summary and a PNG (quality against bytes on a log
axis, one line per layout, one chart per study) beside it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton_bloom  # noqa: E402
from bench.common import environment, markdown_table, write_json  # noqa: E402
from bench.studies import data as datasets  # noqa: E402
from triton_bloom import BloomEmbedding  # noqa: E402
from triton_bloom.ranking import items_above, ranking_metrics  # noqa: E402

DIM = 64
FLOAT_BYTES = 4
INDEX_BYTES = 8  # one int64 id of the bench's own hot set
INIT_STD = 1.0 / DIM
# The validation metric that picks the epoch and the learning rate.  Not AUC:
# over a million items AUC mostly measures whether the held-out item beats
# the never-seen tail, which the item bias alone does (every layout, biases
# only included, was within 0.01 AUC of the others in trial runs).
SELECT = "hr@100"
METRICS = ("auc", "mrr", "hr@10", "hr@100")
# Share of a budget the hot rows, resp. the private codes, may take; the rest
# goes to the Bloom tail.  Fixed beforehand, not tuned on these data.
HOT_SHARE = 0.5
PRIVATE_SHARE = 0.5
TAIL_K = 2


@dataclasses.dataclass
class Config:
    """The documented full run.  The data are sized so that embeddings earn
    their keep over the item biases (a few thousand users of ~120 events
    each, affinity strong enough to matter), and the sweep stays within about
    an hour on 2 busy CPU cores: 1 learning rate, at most 2 epochs (the full
    table peaked at epoch 2 of 3, Bloom at 1 to 2, in trial runs), 200
    validation and 500 test users.  Study (b) runs on ml-100k, where a
    grid of learning rates and more epochs cost minutes."""

    num_items: int = 1_000_000
    num_users: int = 2000
    mean_per_user: int = 120
    min_per_user: int = 5
    rank: int = 32
    zipf_exponent: float = 1.1
    affinity_scale: float = 4.0
    candidates_per_event: int = 8
    budgets: tuple = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
    lrs: tuple = (1e-2,)
    l2: float = 1e-4
    batch_size: int = 1024
    max_epochs: int = 2
    patience: int = 1
    valid_users: int = 200
    test_users: int = 500
    seq_len: int = 10
    seq_dataset: str = "ml-100k"  # or "synthetic": the sweep's catalogue
    seq_budgets: tuple = (0.5, 0.2, 0.05, 0.02, 0.01)
    seq_lrs: tuple = (3e-3, 1e-2)
    seq_max_epochs: int = 10
    seq_patience: int = 2
    seed: int = 0


QUICK = Config(
    num_items=200_000,
    num_users=1000,
    budgets=(0.2, 0.01),
    seq_budgets=(0.2, 0.02),
    max_epochs=2,
    valid_users=150,
    test_users=300,
    seq_lrs=(1e-2,),
    seq_max_epochs=4,
)
TINY = Config(
    num_items=3000,
    num_users=150,
    mean_per_user=20,
    budgets=(0.2, 0.01),
    seq_budgets=(0.2,),
    max_epochs=2,
    valid_users=50,
    test_users=80,
    seq_len=5,
    batch_size=256,
    seq_dataset="synthetic",
    seq_lrs=(1e-2,),
    seq_max_epochs=2,
)


# ------------------------------------------------------------------ data


def catalogue(cfg: Config) -> datasets.Interactions:
    """Implicit events over a large catalogue, drawn as ``bench.studies.data.synthetic``
    draws them (probability ``pop_i * exp(affinity_scale * a_ui)``, Zipf
    ``pop`` in a random order of the items, unit-variance rank-``rank``
    affinity ``a``, each user's items in random order) but without its dense
    ``users x items`` matrix, which at a million items does not fit: each
    user's ``n_u`` distinct items are resampled, Gumbel top-``n_u`` on
    ``affinity_scale * a``, from ``candidates_per_event * n_u`` draws of the
    popularity (sampling-importance-resampling of the same law)."""
    rng = np.random.default_rng(cfg.seed)
    n, r = cfg.num_items, cfg.rank
    p = rng.standard_normal((cfg.num_users, r)).astype(np.float32)
    q = rng.standard_normal((n, r)).astype(np.float32)
    item_of_rank = rng.permutation(n)
    weights = 1.0 / np.power(np.arange(1, n + 1, dtype=np.float64), cfg.zipf_exponent)
    cdf = np.cumsum(weights) / weights.sum()
    extra = max(cfg.mean_per_user - cfg.min_per_user, 1)
    counts = np.minimum(cfg.min_per_user + rng.geometric(1.0 / extra, cfg.num_users) - 1, n // 4)
    users, items, stamps = [], [], []
    for user, count in enumerate(counts):
        draws = np.minimum(np.searchsorted(cdf, rng.random(int(count) * cfg.candidates_per_event)), n - 1)
        cand = np.unique(item_of_rank[draws])
        keys = cfg.affinity_scale * (q[cand] @ p[user]) / math.sqrt(r) + rng.gumbel(size=len(cand))
        take = cand[np.argsort(-keys, kind="stable")[:count]]
        users.append(np.full(len(take), user, dtype=np.int64))
        items.append(take.astype(np.int64))
        stamps.append(rng.permutation(len(take)).astype(np.int64) + 1_000_000_000)
    users, items = np.concatenate(users), np.concatenate(items)
    return datasets.Interactions(
        user=users,
        item=items,
        rating=np.ones(len(users), dtype=np.float32),
        timestamp=np.concatenate(stamps),
        num_users=cfg.num_users,
        num_items=n,
        name=f"synthetic, {n:,} items",
    )


@dataclasses.dataclass
class Prepared:
    """A split plus what training and ranking need, built once per run."""

    split: datasets.Split
    train_counts: torch.Tensor  # (num_items,) events per item in training: the planner's and hot set's input
    valid_users: np.ndarray
    test_users: np.ndarray
    seen_valid: dict  # user -> items masked out of the validation ranking
    seen_test: dict
    sequences: dict  # user -> training items in time order (the pooling model's histories)


def prepare(data: datasets.Interactions, cfg: Config) -> Prepared:
    split = datasets.leave_last_out(data)
    tr = split.train
    order = np.lexsort((tr.timestamp, tr.user))
    users, items = tr.user[order], tr.item[order]
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    sequences = {int(users[a]): items[a:b] for a, b in zip(bounds[:-1], bounds[1:])}
    valid_item = dict(zip(split.valid.user.tolist(), split.valid.item.tolist()))
    eligible = np.array(sorted(set(split.test.user.tolist())))
    rng = np.random.default_rng(cfg.seed + 1)
    pick = lambda m: np.sort(rng.choice(eligible, size=min(m, len(eligible)), replace=False))  # noqa: E731
    valid_users, test_users = pick(cfg.valid_users), pick(cfg.test_users)
    return Prepared(
        split=split,
        train_counts=torch.from_numpy(np.bincount(tr.item, minlength=data.num_items)),
        valid_users=valid_users,
        test_users=test_users,
        seen_valid={u: sequences.get(u, items[:0]) for u in valid_users.tolist()},
        seen_test={u: np.r_[sequences.get(u, items[:0]), valid_item[u]] for u in test_users.tolist()},
        sequences=sequences,
    )


# --------------------------------------------------------------- layouts


class Unavailable(Exception):
    """The layout cannot be built within the budget (the reason says why)."""


def library_features() -> dict:
    """What the installed triton_bloom offers beyond plain Bloom; the new
    layouts run through the library once it has them."""
    params = inspect.signature(BloomEmbedding.__init__).parameters
    return {
        "hot_ids": "hot_ids" in params,
        "private_dim": "private_dim" in params,
        "embedding_bytes": hasattr(triton_bloom, "embedding_bytes"),
        "planner": hasattr(triton_bloom, "plan_embedding"),
    }


def module_bytes(module: Optional[nn.Module]) -> int:
    """Parameters and persistent buffers: what a checkpoint of the table holds."""
    if module is None:
        return 0
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    persistent = module.state_dict(keep_vars=True)
    for name, buf in module.named_buffers():
        if name in persistent:
            total += buf.numel() * buf.element_size()
    return total


def _bloom(num_items: int, rows: int, k: int) -> BloomEmbedding:
    return BloomEmbedding(num_items, DIM, num_rows=rows, num_hash_functions=k, padding_idx=None, sparse=True)


class HotBloom(nn.Module):
    """Bench-side hot rows: the ``H`` most frequent ids each own a row of
    ``hot``, every other id reads a Bloom tail.  The hot set is a sorted id
    array (``H`` int64, counted in the bytes) searched per lookup."""

    def __init__(self, num_items: int, hot_ids: torch.Tensor, tail_rows: int, k: int):
        super().__init__()
        self.register_buffer("hot_ids", torch.sort(hot_ids.long()).values)
        self.hot = nn.Embedding(len(hot_ids), DIM, sparse=True)
        self.tail = _bloom(num_items, tail_rows, k)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        slot = torch.searchsorted(self.hot_ids, flat).clamp(max=len(self.hot_ids) - 1)
        is_hot = self.hot_ids[slot] == flat
        hot_at, cold_at = is_hot.nonzero().squeeze(1), (~is_hot).nonzero().squeeze(1)
        # Each id reads one table only: a masked sum would still hand the tail
        # rows of hot ids zero gradients, which SparseAdam turns into momentum steps.
        parts = torch.cat([self.hot(slot[hot_at]), self.tail(flat[cold_at])])
        out = torch.zeros_like(parts).index_copy(0, torch.cat([hot_at, cold_at]), parts)
        return out.view(*ids.shape, DIM)


class PrivateBloom(nn.Module):
    """Bench-side private part: each id's ``r``-dim code times a shared
    ``r x 64`` projection, plus its Bloom rows; with no tail rows it is the
    factorised table of study (b)."""

    def __init__(self, num_items: int, r: int, tail_rows: int, k: int):
        super().__init__()
        self.code = nn.Embedding(num_items, r, sparse=True)
        self.proj = nn.Linear(r, DIM, bias=False)
        self.tail = _bloom(num_items, tail_rows, k) if tail_rows > 0 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.proj(self.code(ids))
        return out if self.tail is None else out + self.tail(ids)


def reinit(module: nn.Module) -> None:
    """Every table element from normal(0, INIT_STD); a projection from
    normal(0, 1/sqrt(r)), so that code x projection has INIT_STD per element;
    importance weights keep their ones."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "importance" in name:
                continue
            if "proj" in name:
                p.normal_(0, 1 / math.sqrt(min(p.shape)))
            else:
                p.normal_(0, INIT_STD)


def _accepted(fn, **kwargs) -> dict:
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    family: str  # full | reduced | bloom | hot | private | factorised | planner
    k: int = 0
    width: str = "fixed"  # the planner's: "free" where the model lets the width shrink


LAYOUTS_A = (
    Layout("reduced dim", "reduced"),
    Layout("hashing trick (k=1)", "bloom", 1),
    Layout("Bloom k=2", "bloom", 2),
    Layout("Bloom k=4", "bloom", 4),
    Layout("hot rows + Bloom", "hot", TAIL_K),
    Layout("private + Bloom", "private", TAIL_K),
    Layout("planner", "planner", width="free"),
)
LAYOUTS_B = (
    Layout("factorised", "factorised"),
    Layout("hashing trick (k=1)", "bloom", 1),
    Layout("Bloom k=2", "bloom", 2),
    Layout("Bloom k=4", "bloom", 4),
    Layout("hot rows + Bloom", "hot", TAIL_K),
    Layout("private + Bloom", "private", TAIL_K),
    Layout("planner", "planner"),
)


def _fit_rows(make: Callable[[int], nn.Module], rows: int, budget: int, row_bytes: int) -> nn.Module:
    """The module with the most tail rows (from ``rows`` down) within budget,
    measured on the built module: whatever else the layout holds (a hot set,
    codes) is counted as built, not as planned."""
    for _ in range(4):
        if rows < 1:
            raise Unavailable("no room left for a Bloom tail")
        module = make(rows)
        over = module_bytes(module) - budget
        if over <= 0:
            return module
        rows -= -(-over // row_bytes)
    raise Unavailable("could not fit the budget")


def build_items(layout: Layout, budget: int, num_items: int, counts: torch.Tensor) -> tuple[nn.Module, int, dict]:
    """``(module, width, details)`` of an item table of at most ``budget``
    bytes, or :class:`Unavailable`."""
    feats = library_features()
    row = DIM * FLOAT_BYTES
    if layout.family == "full":
        return nn.Embedding(num_items, DIM, sparse=True), DIM, {"dim": DIM}
    if layout.family == "reduced":
        dim = budget // (num_items * FLOAT_BYTES)
        if dim < 1:
            raise Unavailable(f"{budget / (num_items * FLOAT_BYTES):.2f} floats per id: under one dimension")
        return nn.Embedding(num_items, dim, sparse=True), dim, {"dim": dim}
    if layout.family == "bloom":
        rows = budget // row
        return _bloom(num_items, rows, layout.k), DIM, {"rows": rows, "k": layout.k}
    if layout.family == "hot":
        seen = int((counts > 0).sum())
        # Hot rows past the ids training ever shows would be rows nobody trains.
        h = min(int(HOT_SHARE * budget) // (row + INDEX_BYTES), seen)
        hot = torch.argsort(counts, descending=True, stable=True)[:h]
        if feats["hot_ids"]:

            def make(rows):
                return BloomEmbedding(
                    num_items,
                    DIM,
                    num_rows=rows,
                    num_hash_functions=layout.k,
                    padding_idx=None,
                    hot_ids=hot,
                    **_accepted(BloomEmbedding.__init__, sparse=True),
                )

            source = "library"
        else:
            make = lambda rows: HotBloom(num_items, hot, rows, layout.k)  # noqa: E731
            source = "bench"
        module = _fit_rows(make, (budget - h * (row + INDEX_BYTES)) // row, budget, row)
        return module, DIM, {"hot_rows": h, "tail_rows": _tail_rows(module), "k": layout.k, "source": source}
    if layout.family in ("private", "factorised"):
        per_dim = num_items * FLOAT_BYTES + row  # one more code dimension and projection row
        share = 1.0 if layout.family == "factorised" else PRIVATE_SHARE
        r = int(share * budget) // per_dim
        if layout.family == "private":
            r = max(r, 1)  # below half the budget for one code dimension, try the code and a smaller tail
        if r < 1 or r * per_dim >= budget + (row if layout.family == "factorised" else 0):
            raise Unavailable(
                f"{budget / (num_items * FLOAT_BYTES):.2f} floats per id: no room for a 1-dim code"
                + ("" if layout.family == "factorised" else " and a tail")
            )
        if layout.family == "factorised":
            return PrivateBloom(num_items, r, 0, 1), DIM, {"private_dim": r, "source": "bench"}
        if feats["private_dim"]:

            def make(rows):
                return BloomEmbedding(
                    num_items,
                    DIM,
                    num_rows=rows,
                    num_hash_functions=layout.k,
                    padding_idx=None,
                    private_dim=r,
                    **_accepted(BloomEmbedding.__init__, sparse=True),
                )

            source = "library"
        else:
            make = lambda rows: PrivateBloom(num_items, r, rows, layout.k)  # noqa: E731
            source = "bench"
        module = _fit_rows(make, (budget - r * per_dim) // row, budget, row)
        return module, DIM, {"private_dim": r, "tail_rows": _tail_rows(module), "k": layout.k, "source": source}
    if layout.family == "planner":
        from triton_bloom.planner import plan_embedding

        # The sweep lets the planner shrink the width too, as a user of an MF model could.
        plan = plan_embedding(counts, DIM, budget, width=layout.width)
        module = plan.build(padding_idx=None, sparse=True) if plan.kind == "bloom" else plan.build()
        if isinstance(module, nn.Embedding) and not isinstance(module, BloomEmbedding):
            module.sparse = True  # a plain table from the planner trains like the bench's own plain tables
        return module, module.embedding_dim, {"plan": _describe(module, plan), "source": "library"}
    raise ValueError(f"unknown layout family {layout.family!r}")


def _tail_rows(module: nn.Module) -> int:
    tail = getattr(module, "tail", module)
    return int(getattr(tail, "num_rows", 0) or 0) if tail is not None else 0


def _describe(module: nn.Module, plan=None) -> str:
    if isinstance(module, nn.Embedding) and not isinstance(module, BloomEmbedding):
        return f"plain table, dim {module.embedding_dim}"
    parts = [f"rows={module.num_rows}", f"k={module.num_hash_functions}"]
    hot = getattr(module, "hot_ids", None)
    parts.append(f"hot_rows={0 if hot is None else hot.numel()}")
    private = getattr(module, "private", None)
    parts.append(f"private_dim={0 if private is None else private.embedding_dim}")
    return ", ".join(parts)


# ---------------------------------------------------------------- models


class MF(nn.Module):
    """Matrix factorisation, ``<p_u, q_i> + b_i``; ``items=None`` is the
    biases-only model."""

    def __init__(self, items: Optional[nn.Module], width: int, num_users: int, num_items: int):
        super().__init__()
        self.items = items
        self.users = nn.Embedding(num_users, width, sparse=True) if items is not None else None
        self.item_bias = nn.Embedding(num_items, 1, sparse=True)

    def reset(self):
        if self.items is not None:
            reinit(self.items)
            reinit(self.users)
        nn.init.zeros_(self.item_bias.weight)

    def user_vectors(self, users: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.users is None else self.users(users)


class Pool(nn.Module):
    """Spotlight's pooling sequence model: the user is the mean of the item
    vectors of their last ``seq_len`` items (the same item table as the
    targets), ``score = <user, q_i> + b_i``."""

    def __init__(self, items: Optional[nn.Module], num_items: int):
        super().__init__()
        self.items = items
        self.item_bias = nn.Embedding(num_items, 1, sparse=True)

    def reset(self):
        if self.items is not None:
            reinit(self.items)
        nn.init.zeros_(self.item_bias.weight)

    def pooled(self, history: torch.Tensor) -> Optional[torch.Tensor]:
        """``(B, L)`` ids, ``-1`` padding, to ``(B, width)`` mean vectors."""
        if self.items is None:
            return None
        mask = (history >= 0).unsqueeze(-1).float()
        vectors = self.items(history.clamp(min=0)) * mask
        return vectors.sum(1) / mask.sum(1).clamp(min=1)


# -------------------------------------------------------------- training


@dataclasses.dataclass
class Study:
    """One model family: its training examples and how a batch is scored."""

    name: str
    model: Callable[[Optional[nn.Module], int], nn.Module]  # (items, width) -> model
    examples: int
    user_vectors: Callable  # (model, example index tensor) -> (B, width) or None
    positives: torch.Tensor  # (examples,) target item of each example
    eval_vectors: Callable  # (model, users ndarray, part) -> (U, width) or None
    log_expected: torch.Tensor = None  # (num_items,) log expected count of each item among a batch's candidates


def mf_study(prep: Prepared, num_users: int, num_items: int) -> Study:
    tr = prep.split.train
    users = torch.from_numpy(tr.user)
    return Study(
        name="budget sweep (MF)",
        model=lambda items, width: MF(items, width, num_users, num_items),
        examples=len(tr),
        user_vectors=lambda m, idx: m.user_vectors(users[idx]),
        positives=torch.from_numpy(tr.item),
        eval_vectors=lambda m, u, part: m.user_vectors(torch.from_numpy(u)),
    )


def _histories(seqs: list, length: int) -> torch.Tensor:
    out = np.full((len(seqs), length), -1, dtype=np.int64)
    for row, s in enumerate(seqs):
        s = s[-length:]
        out[row, : len(s)] = s
    return torch.from_numpy(out)


def pool_study(prep: Prepared, num_items: int, seq_len: int) -> Study:
    """Every training item after a user's first is a target, its history the
    ``seq_len`` items before it; evaluation pools the last ``seq_len``
    training items (and the validation item, for the test)."""
    hist, targets = [], []
    for seq in prep.sequences.values():
        for t in range(1, len(seq)):
            hist.append(seq[max(0, t - seq_len) : t])
            targets.append(seq[t])
    histories = _histories(hist, seq_len)
    valid_item = dict(zip(prep.split.valid.user.tolist(), prep.split.valid.item.tolist()))

    def eval_vectors(model, users, part):
        seqs = [prep.sequences[u] if part == "valid" else np.r_[prep.sequences[u], valid_item[u]] for u in users]
        return model.pooled(_histories(seqs, seq_len))

    return Study(
        name=f"width fixed at {DIM} (pooling sequence model)",
        model=lambda items, width: Pool(items, num_items),
        examples=len(targets),
        user_vectors=lambda m, idx: m.pooled(histories[idx]),
        positives=torch.tensor(targets, dtype=torch.int64),
        eval_vectors=eval_vectors,
    )


def log_expected(positives: torch.Tensor, num_items: int, batch_size: int) -> torch.Tensor:
    """Log of each item's expected count among a batch's candidates: ``B``
    positives drawn as the training examples' targets, ``B`` uniform items."""
    freq = torch.bincount(positives, minlength=num_items).double() / len(positives)
    return torch.log(batch_size * freq + batch_size / num_items).float()


def _optimizers(model: nn.Module, lr: float, probe: Callable[[], torch.Tensor]) -> list:
    """SparseAdam for parameters whose gradient comes sparse (found by one
    probing backward, so a library table's choice is respected), Adam for the rest."""
    model.zero_grad(set_to_none=True)
    probe().backward()
    sparse = [p for p in model.parameters() if p.grad is not None and p.grad.is_sparse]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    model.zero_grad(set_to_none=True)
    opts = [torch.optim.SparseAdam(sparse, lr=lr)] if sparse else []
    return opts + ([torch.optim.Adam(dense, lr=lr)] if dense else [])


def train_epoch(model, opts, study: Study, cfg: Config, num_items: int, gen: torch.Generator) -> float:
    total = 0.0
    order = torch.randperm(study.examples, generator=gen)
    for start in range(0, study.examples, cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        loss = _batch_loss(model, study, idx, cfg, num_items, gen)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        total += loss.item() * len(idx)
    return total / study.examples


def _batch_loss(model, study, idx, cfg, num_items, gen):
    """Sampled softmax over the batch's own positives (in-batch negatives,
    drawn as training draws them) and as many uniform items, with the logQ
    correction (each logit less the log of its expected count under that
    mixed proposal), so that the softmax it estimates is the full one.  One
    uniform negative per positive (BPR) hardly ever meets a popular item in
    a million-item catalogue and, measured here, left every layout at the
    biases-only model's quality."""
    pos = study.positives[idx]
    cands = torch.cat([pos, torch.randint(0, num_items, (len(idx),), generator=gen)])
    bias = model.item_bias(cands).squeeze(-1)
    logits = (bias - study.log_expected[cands]).expand(len(idx), -1)
    u = study.user_vectors(model, idx)
    reg = bias.pow(2).mean()
    if u is not None:
        q = model.items(cands)
        logits = logits + u @ q.T
        reg = reg + u.pow(2).sum(-1).mean() + q.pow(2).sum(-1).mean()
    rows = torch.arange(len(idx))
    # A candidate that is the row's own positive elsewhere in the batch is no negative.
    clash = cands[None, :] == pos[:, None]
    clash[rows, rows] = False
    logits = logits.masked_fill(clash, -float("inf"))
    return F.cross_entropy(logits, rows) + cfg.l2 * reg


# ------------------------------------------------------------ evaluation


@torch.no_grad()
def all_item_vectors(items: nn.Module, num_items: int, chunk: int = 1 << 17) -> torch.Tensor:
    return torch.cat([items(torch.arange(s, min(s + chunk, num_items))) for s in range(0, num_items, chunk)])


@torch.no_grad()
def rank_eval(model, study: Study, prep: Prepared, part: str, num_items: int, chunk: int = 64) -> dict:
    """Full-catalogue ranking of each sampled user's held-out item."""
    model.eval()
    users = prep.valid_users if part == "valid" else prep.test_users
    held = getattr(prep.split, part)
    target_of = dict(zip(held.user.tolist(), held.item.tolist()))
    seen = prep.seen_valid if part == "valid" else prep.seen_test
    bias = model.item_bias.weight[:, 0]
    vectors = None if model.items is None else all_item_vectors(model.items, num_items)
    out = {m: [] for m in METRICS}
    for s in range(0, len(users), chunk):
        batch = users[s : s + chunk]
        targets = torch.tensor([target_of[u] for u in batch])
        scores = bias.expand(len(batch), -1).clone()
        if vectors is not None:
            scores += study.eval_vectors(model, batch, part) @ vectors.T
        rows = torch.arange(len(batch))
        target_scores = scores[rows, targets].clone()
        masked = [seen[u] for u in batch]
        scores[
            torch.repeat_interleave(rows, torch.tensor([len(m) for m in masked])),
            torch.from_numpy(np.concatenate(masked)),
        ] = -float("inf")
        scores[rows, targets] = target_scores
        negatives = torch.tensor(
            [num_items - 1 - len(np.setdiff1d(m, [t])) for m, t in zip(masked, targets.tolist())], dtype=torch.float64
        )
        above = items_above(scores, targets)
        for name, v in ranking_metrics(above, negatives, k=10).items():
            out[name].append(v)
        out["hr@100"].append((above < 100).double())
    model.train()
    return {m: torch.cat(v).mean().item() for m, v in out.items()}


# ------------------------------------------------------------------- fit


def fit(
    study: Study, layout: Optional[Layout], budget: Optional[int], prep: Prepared, cfg: Config, num_items: int
) -> dict:
    """Train one layout at one budget under each learning rate of the grid;
    report the test metrics of the learning rate and epoch validation chose."""
    if layout is None:
        items_spec = lambda: (None, DIM, {})  # noqa: E731
    else:
        items_spec = lambda: build_items(layout, budget, num_items, prep.train_counts)  # noqa: E731
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    items, width, details = items_spec()  # Unavailable escapes here, before any training
    size = module_bytes(items)
    library_size = None
    if items is not None and library_features()["embedding_bytes"]:
        try:
            library_size = int(triton_bloom.embedding_bytes(items))
        except (TypeError, ValueError, AttributeError) as e:  # a bench-side module the library does not know
            library_size = f"n/a ({type(e).__name__})"
    best = None
    by_lr = {}
    for lr in cfg.lrs:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        if lr != cfg.lrs[0]:  # a fresh table: the first rate's training changed the one built above
            items, width, _ = items_spec()
        model = study.model(items, width)
        model.reset()
        probe_idx = torch.arange(min(8, study.examples))
        opts = _optimizers(
            model,
            lr,
            lambda m=model, i=probe_idx: _batch_loss(m, study, i, cfg, num_items, torch.Generator().manual_seed(0)),
        )
        run_best, run_state, run_epoch, epoch = None, None, 0, 0
        for epoch in range(1, cfg.max_epochs + 1):
            train_epoch(model, opts, study, cfg, num_items, gen)
            valid = rank_eval(model, study, prep, "valid", num_items)
            if run_best is None or valid[SELECT] > run_best[SELECT]:
                run_best, run_epoch, run_state = valid, epoch, copy.deepcopy(model.state_dict())
            elif epoch - run_epoch >= cfg.patience:
                break
        by_lr[lr] = {"valid": run_best, "best_epoch": run_epoch, "epochs_run": epoch}
        if best is None or run_best[SELECT] > best["valid"][SELECT]:
            best = {
                "lr": lr,
                "valid": run_best,
                "best_epoch": run_epoch,
                "epochs_run": epoch,
                "model": model,
                "state": run_state,
            }
        else:
            del model, run_state
    model = best.pop("model")
    model.load_state_dict(best.pop("state"))
    test = rank_eval(model, study, prep, "test", num_items)
    return {
        "bytes": size,
        "library_bytes": library_size,
        "width": width,
        "details": details,
        **best,
        "test": test,
        "valid_by_lr": {str(k): v for k, v in by_lr.items()},
        "seconds": time.perf_counter() - start,
    }


def run_study(study: Study, layouts, budgets, prep: Prepared, cfg: Config, num_items: int, log) -> list:
    full_bytes = num_items * DIM * FLOAT_BYTES
    rows = []

    def record(label, family, fraction, result):
        row = {
            "study": study.name,
            "layout": label,
            "family": family,
            "budget": fraction,
            "budget_bytes": None if fraction is None else int(fraction * full_bytes),
            **result,
        }
        if "bytes" in row:
            row["bytes_vs_full"] = row["bytes"] / full_bytes
            row["within_budget"] = row["budget_bytes"] is None or row["bytes"] <= row["budget_bytes"]
        rows.append(row)
        if result.get("available", True):
            shown = " ".join(f"{m}={result['test'][m]:.4f}" for m in METRICS)
            log(
                f"[{study.name}] {label} @ {fraction}: {shown} lr={result['lr']:g} epoch={result['best_epoch']} "
                f"bytes={result['bytes']:,} ({result['seconds']:.0f}s)"
            )
        else:
            log(f"[{study.name}] {label} @ {fraction}: unavailable ({result['reason']})")

    record(
        "full table",
        "full",
        1.0,
        {"available": True, **fit(study, Layout("full table", "full"), full_bytes, prep, cfg, num_items)},
    )
    record("biases only", "none", 0.0, {"available": True, **fit(study, None, None, prep, cfg, num_items)})
    for fraction in budgets:
        for layout in layouts:
            try:
                result = {"available": True, **fit(study, layout, int(fraction * full_bytes), prep, cfg, num_items)}
            except Unavailable as e:
                result = {"available": False, "reason": str(e)}
            record(layout.name, layout.family, fraction, result)
    full = rows[0]["test"]
    floor = rows[1]["test"]
    for row in rows:
        if row.get("available", True):
            row["kept_vs_full"] = {m: row["test"][m] / full[m] for m in METRICS}
            # The share of what the full table adds over biases only that this layout keeps.
            row["gain_kept"] = {
                m: (row["test"][m] - floor[m]) / (full[m] - floor[m]) if full[m] != floor[m] else None for m in METRICS
            }
    return rows


# --------------------------------------------------------------- reports


def _cell(row: dict, metric: str) -> str:
    if not row.get("available", True):
        return "n/a"
    flag = "" if row.get("within_budget", True) else " (over budget)"
    return f"{row['test'][metric]:.4f} ({row['kept_vs_full'][metric]:.3f}){flag}"


def study_table(rows: list, metric: str) -> str:
    budgets = sorted({r["budget"] for r in rows if r["family"] not in ("full", "none")}, reverse=True)
    layouts = list(dict.fromkeys(r["layout"] for r in rows if r["family"] not in ("full", "none")))
    body = []
    for name in layouts:
        line = [name]
        for b in budgets:
            row = next((r for r in rows if r["layout"] == name and r["budget"] == b), None)
            line.append("" if row is None else _cell(row, metric))
        body.append(line)
    best = ["best (validation)"]
    for b in budgets:
        pool = [
            r
            for r in rows
            if r["budget"] == b
            and r.get("available", True)
            and r.get("within_budget", True)
            and r["family"] not in ("full", "none")
        ]
        best.append(max(pool, key=lambda r: r["valid"][SELECT])["layout"] if pool else "")
    body.append(best)
    return markdown_table([f"{metric.upper()} (kept vs full) at budget"] + [f"{b:g}" for b in budgets], body)


def write_markdown(path: str, payload: dict) -> None:
    env = payload["environment"]
    lines = [
        "# Where each layout wins: quality against bytes",
        "",
        f"`{payload['command']}` — {env['date']}, {env['cpu']} ({env['cpu_count']} cores, "
        f"{env['torch_threads']} torch thread per process), torch {env['torch']}, Python {env['python']}; "
        f"{payload['wall_seconds'] / 60:.1f} min wall time.",
        f"Library layouts available in this run: {payload['library_features']}.",
        "",
        "Budget = bytes of the item table against the full 64-wide float32 table. Cells: test metric, full "
        "ranking over the catalogue, and in brackets the fraction of the full table's metric kept. "
        "n/a: the layout does not exist within the budget. 'best (validation)' is the layout with the best "
        f"validation {SELECT.upper()} at that budget (chosen on validation, not test).",
    ]
    for study in payload["studies"]:
        rows, data, cfg = study["rows"], study["data"], study["config"]
        full, floor = rows[0]["test"], rows[1]["test"]
        lines += [
            "",
            f"## {study['name']}",
            "",
            f"Data: {data['name']}: {data['num_users']:,} users, {data['num_items']:,} items "
            f"({data['items_in_training']:,} seen in training), {data['num_interactions']:,} events, "
            f"{data['top5pct_share']:.0%} of training events on the top 5% of items"
            + (
                f"; rank-{cfg['rank']} affinity, Zipf {cfg['zipf_exponent']:g}."
                if data["name"].startswith("synth")
                else "."
            ),
            "",
        ]
        lines += [f"- {k}: {v}" for k, v in study["protocol"].items()]
        lines += [
            "",
            "Full table: "
            + ", ".join(f"{m} {full[m]:.4f}" for m in METRICS)
            + "; biases only: "
            + ", ".join(f"{m} {floor[m]:.4f}" for m in METRICS)
            + ".",
            "",
        ]
        n = min(cfg["test_users"], data["num_users"])
        p = full["hr@100"]
        lines += [
            f"Sampling error: a test HR@100 near {p:.2f} on {n} users has a standard error of "
            f"{math.sqrt(p * (1 - p) / n):.3f} (binomial); a difference under about twice that is not "
            "resolved by this run (one seed, one split).",
            "",
        ]
        for metric in ("hr@100", "mrr", "auc"):
            lines += [study_table(rows, metric), ""]
        lines += ["### Every run", ""]
        body = []
        for r in rows:
            if not r.get("available", True):
                body.append([r["layout"], f"{r['budget']:g}", "n/a", "", "", "", "", r["reason"]])
                continue
            det = ", ".join(f"{k}={v}" for k, v in r["details"].items())
            body.append(
                [
                    r["layout"],
                    f"{r['budget']:g}",
                    f"{r['bytes']:,}",
                    f"{r['bytes_vs_full']:.4f}",
                    f"{r['lr']:g}",
                    r["best_epoch"],
                    f"{r['seconds']:.0f}",
                    det,
                ]
            )
        lines.append(
            markdown_table(["layout", "budget", "bytes", "bytes vs full", "lr", "best epoch", "s", "details"], body)
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(path: str, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = payload["studies"]
    metrics = ("hr@100", "mrr")
    fig, axes = plt.subplots(
        len(metrics), len(studies), figsize=(6.5 * len(studies), 4.2 * len(metrics)), squeeze=False
    )
    # One colour per layout across both studies, so that a line keeps its meaning from chart to chart.
    names = list(
        dict.fromkeys(r["layout"] for st in studies for r in st["rows"] if r["family"] not in ("full", "none"))
    )
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for col, study in enumerate(studies):
        rows = study["rows"]
        for line, metric in enumerate(metrics):
            ax = axes[line][col]
            for name in dict.fromkeys(r["layout"] for r in rows if r["family"] not in ("full", "none")):
                pts = sorted(
                    (r["bytes_vs_full"], r["test"][metric])
                    for r in rows
                    if r["layout"] == name and r.get("available", True)
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name, color=colour[name])
            ax.axhline(rows[0]["test"][metric], color="black", ls="--", lw=1, label="full table (1.0)")
            ax.axhline(rows[1]["test"][metric], color="grey", ls=":", lw=1, label="biases only")
            ax.set_xscale("log")
            ax.set_xlabel("item-table bytes / full 64-wide table")
            ax.set_ylabel(f"test {metric.upper()}")
            ax.set_title(study["name"], fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if line == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(path: str, payload: dict, plot: bool = True) -> None:
    write_json(path, payload)
    stem = os.path.splitext(path)[0]
    write_markdown(stem + ".md", payload)
    if plot:
        write_plot(stem + ".png", payload)


def merge(paths: list, out: str, no_plot: bool) -> dict:
    """One result from runs of one study each, made side by side (one
    process a core)."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    for part in parts:
        for study in part["studies"]:
            # Files written before studies carried their own description kept it at the top.
            for key in ("data", "config", "protocol", "full_bytes"):
                study.setdefault(key, part.get(key))
    payload = {k: v for k, v in parts[0].items() if k not in ("data", "protocol", "full_bytes")}
    payload["studies"] = [study for part in parts for study in part["studies"]]
    payload["command"] = " & ".join(p["command"] for p in parts)
    payload["wall_seconds"] = max(p["wall_seconds"] for p in parts)
    payload["processes"] = [
        {"command": p["command"], "wall_seconds": p["wall_seconds"], "environment": p["environment"]} for p in parts
    ]
    write_all(out, payload, not no_plot)
    return payload


# ------------------------------------------------------------------- CLI


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK.num_items:,} items, budgets {QUICK.budgets}, one learning rate (minutes)",
    )
    p.add_argument("--tiny", action="store_true", help="a few thousand ids, for the smoke test (seconds)")
    p.add_argument("--studies", nargs="+", default=["sweep", "width"], choices=["sweep", "width"])
    p.add_argument("--num-items", type=int)
    p.add_argument("--num-users", type=int)
    p.add_argument("--epochs", type=int, help="most epochs per run")
    p.add_argument("--lrs", nargs="+", type=float, help="learning-rate grid, the same for every layout")
    p.add_argument("--merge", nargs="+", help="JSON files of runs of one study each (--studies) to write as one")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", required=True, help="JSON path; the .md and .png are written beside it")
    return p.parse_args(argv)


def _describe_data(data: datasets.Interactions, prep: Prepared) -> dict:
    counts = prep.train_counts
    top = torch.sort(counts, descending=True).values
    return {
        **data.describe(),
        "items_in_training": int((counts > 0).sum()),
        "top5pct_share": float(top[: max(1, data.num_items // 20)].sum() / top.sum()),
    }


def _protocol(cfg: Config, data: datasets.Interactions, order: str) -> dict:
    return {
        "init": f"every table element normal(0, {INIT_STD:g}); projections normal(0, 1/sqrt(r)); biases 0",
        "training": f"sampled softmax over the batch's positives + as many uniform items, logQ-corrected; "
        f"L2 {cfg.l2:g} on looked-up vectors and biases; SparseAdam (tables) / Adam (the rest); "
        f"batch {cfg.batch_size}; lr grid {list(cfg.lrs)}; at most {cfg.max_epochs} epochs, "
        f"patience {cfg.patience}; epoch and lr chosen on validation {SELECT}",
        "evaluation": f"leave-last-out ({order}); full ranking of the held-out item over all {data.num_items:,} "
        f"items minus the user's seen ones; {min(cfg.valid_users, data.num_users)} validation and "
        f"{min(cfg.test_users, data.num_users)} test users (sampled once where fewer than all); "
        "ties count half",
        "budget": "bytes of parameters and persistent buffers of the item table (codes, projections, hot sets "
        "included); item biases (every model) and the MF study's user table are outside it",
        "layouts": f"hot rows: the most frequent training ids, up to {HOT_SHARE:g} of the budget (no more than the "
        f"ids seen in training), tail Bloom k={TAIL_K}; private: r from {PRIVATE_SHARE:g} of the budget "
        f"(at least 1), tail Bloom k={TAIL_K}; factorised: the largest r within budget; planner: "
        "triton_bloom.planner.plan_embedding(train counts, 64, budget, width='free' in (a), 'fixed' in (b))",
    }


def sequence_data(cfg: Config, log) -> tuple:
    """Study (b)'s data and the configuration it trains under: ml-100k in
    time order (all users, a learning-rate grid, more epochs: it is small),
    or the sweep's synthetic catalogue."""
    if cfg.seq_dataset == "ml-100k":
        try:
            data = datasets.load_ml100k()
        except datasets.DatasetUnavailable as e:
            log(f"ml-100k unavailable, study (b) runs on the synthetic catalogue: {e}")
        else:
            seq_cfg = dataclasses.replace(
                cfg,
                lrs=cfg.seq_lrs,
                max_epochs=cfg.seq_max_epochs,
                patience=cfg.seq_patience,
                valid_users=data.num_users,
                test_users=data.num_users,
            )
            return data, prepare(data, seq_cfg), seq_cfg, "by timestamp"
    data = catalogue(cfg)
    return data, prepare(data, cfg), cfg, "random order per user"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        return merge(args.merge, args.out, args.no_plot)
    cfg = TINY if args.tiny else QUICK if args.quick else Config()
    cfg = dataclasses.replace(
        cfg,
        **{
            k: v
            for k, v in dict(
                num_items=args.num_items,
                num_users=args.num_users,
                max_epochs=args.epochs,
                lrs=tuple(args.lrs or ()) or None,
            ).items()
            if v
        },
    )
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    studies = []
    if "sweep" in args.studies:
        data = catalogue(cfg)
        prep = prepare(data, cfg)
        log(
            f"data: {len(data):,} events, {int((prep.train_counts > 0).sum()):,} items seen "
            f"({time.perf_counter() - start:.0f}s)"
        )
        study = mf_study(prep, data.num_users, data.num_items)
        study.log_expected = log_expected(study.positives, data.num_items, cfg.batch_size)
        studies.append(
            {
                "name": study.name,
                "data": _describe_data(data, prep),
                "config": dataclasses.asdict(cfg),
                "protocol": _protocol(cfg, data, "random order per user"),
                "full_bytes": data.num_items * DIM * FLOAT_BYTES,
                "rows": run_study(study, LAYOUTS_A, cfg.budgets, prep, cfg, data.num_items, log),
            }
        )
    if "width" in args.studies:
        data, prep, seq_cfg, order = sequence_data(cfg, log)
        study = pool_study(prep, data.num_items, seq_cfg.seq_len)
        study.log_expected = log_expected(study.positives, data.num_items, seq_cfg.batch_size)
        studies.append(
            {
                "name": f"{study.name}, {data.name}",
                "data": _describe_data(data, prep),
                "config": dataclasses.asdict(seq_cfg),
                "protocol": _protocol(seq_cfg, data, order),
                "full_bytes": data.num_items * DIM * FLOAT_BYTES,
                "rows": run_study(study, LAYOUTS_B, seq_cfg.seq_budgets, prep, seq_cfg, data.num_items, log),
            }
        )
    payload = {
        "benchmark": "budget_sweep",
        "environment": environment(),
        "command": "python bench/studies/budget_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_seconds": time.perf_counter() - start,
        "config": dataclasses.asdict(cfg),
        "library_features": library_features(),
        "studies": studies,
    }
    write_all(args.out, payload, not args.no_plot)
    log(f"wrote {args.out} in {payload['wall_seconds']:.0f}s")
    return payload


if __name__ == "__main__":
    main()
