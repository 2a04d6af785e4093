"""Accuracy versus compression at equal bytes: what a Bloom table costs a
recommender, against the baselines a sceptical user tries first.

Users and items are embedded inside two standard models:

- implicit feedback: BPR matrix factorisation, ``score = <p_u, q_i> + b_i``,
  one uniformly sampled negative item per positive, leave-last-out split by
  timestamp; reports MRR, AUC and HR@10 by ranking the held-out item against
  every item the user has not interacted with (full ranking, no sampled
  candidates);
- explicit ratings: ``r = mu + b_u + b_i + <p_u, q_i>`` with squared loss on a
  random 80/10/10 split; reports RMSE (predictions clipped to the rating
  range).

The fair protocol (issue 11):

- Every layout is compared at a byte budget, a share of the full tables'
  embedding bytes (users + items, float32), everything a layout stores
  counted (hashed rows, hot rows and their index, private codes and their
  projection, importance weights).  The equal-bytes baselines: the full
  table at the largest ``embedding_dim`` that fits (``small``), the hashing
  trick (Bloom with ``k = 1``) and the biases-only model (no tables).
- Every embedding parameter starts at the same per-element scale,
  ``normal(0, 1/dim)`` of the full model's ``dim`` (Spotlight's init gives a
  dim-6 table std 1/6, five times the full table's, which alone costs it
  accuracy); ``--spotlight-init`` restores ``1/table_dim``.
- Every table (each spec) gets its own learning rate and L2, picked on the
  validation metric of seed 0 from the same small grid (``GRID``), with the
  same epoch budget and early stopping; test numbers are those of the best
  validation epoch, and repeats rerun the chosen setting with other seeds.
- Every metric is reported against the full table (``/ full``) and against
  the biases-only model (``gain kept``: ``(x - biases) / (full - biases)``,
  the share of what the full table adds over no table at all).

    python bench/studies/quality.py --quick --out /tmp/quality_quick.json      # ml-100k, ~3 min
    python bench/studies/quality.py --out bench/results/quality_cpu.json      # ml-100k + synthetic, both tasks
    python bench/studies/quality.py --dataset /path/to/u.data --budgets 0.2 0.1 --out r.json

Writes the JSON, and a markdown summary and a PNG plot beside it.  The
helpers the budget sweep reuses: ``equal_bytes_specs``, ``make_table``,
``tune``, ``embedding_bytes``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import itertools
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.common import environment, write_json  # noqa: E402
from bench.studies import data as datasets  # noqa: E402
from bench.studies import layouts  # noqa: E402
from triton_bloom import BloomEmbedding, ScaledEmbedding, ZeroEmbedding, plan_embedding  # noqa: E402
from triton_bloom.output import bloom_rank  # noqa: E402
from triton_bloom.ranking import ranking_metrics  # noqa: E402

# Bloom-layer variants: name -> extra BloomEmbedding constructor kwargs.  At
# a byte budget their extra parameters (importance weights) come out of the
# table's rows, so every variant stores no more than plain Bloom.
VARIANTS: dict[str, dict] = {
    "signed": {"signed": True},
    "importance": {"importance": True},
    # One row of k importance weights per id (as in hash embeddings): k
    # parameters an id instead of embedding_dim.
    "importance per id": {"importance": True, "importance_ratio": 1.0},
    "signed+importance": {"signed": True, "importance": True},
}

# Layouts that mix private and hashed parameters (bench/studies/layouts.py until the
# library builds them): (share of ids that get a private full row, private
# code dimension, k of the Bloom rows the rest of the budget buys (0: none),
# optionally the hot rows' width).
LAYOUTS = (
    (0.0, 5, 4),
    (0.02, 5, 4),
    (0.05, 4, 4),
    (0.03, 5, 1),
    (0.1, 3, 4),
)
QUICK_LAYOUTS = ()
# The same through the library's BloomEmbedding(hot_ids=, private_dim=).
LIB_LAYOUTS = ((0.02, 5, 4),)

FULL_BUDGETS = (0.5, 0.2, 0.1)
FULL_KS = (2, 4)
HEADLINE_BUDGET = 0.2
HEADLINE_RATIO = HEADLINE_BUDGET  # a Bloom table's ratio is its share of the full table's bytes
HEADLINE_K = 4  # Spotlight's default
LAYOUT_KINDS = ("mixed", "hot", "planner")
FLOAT_BYTES = 4
# Old-style (ratio, k) grid of plain Bloom, kept for `--ratios/--ks` sweeps.
QUICK_PAIRS = ((0.2, 4),)


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """How users and items are embedded.  ``kind``: ``none`` (biases only),
    ``full`` (``dim`` None: the model's dim; else a reduced-dimension full
    table, label ``small``), ``hash`` (Bloom with k=1), ``bloom``, a
    variant's name, ``mixed`` (bench/studies/layouts.py) or ``planner``.  ``budget``:
    the share of the full table's bytes the spec was sized for."""

    kind: str
    ratio: Optional[float] = None
    k: Optional[int] = None
    kwargs: tuple = ()  # the variant's / layout's kwargs, as sorted items
    dim: Optional[int] = None
    budget: Optional[float] = None

    @property
    def family(self) -> str:
        """What the reports group by: ``small`` for a reduced-dim full table."""
        return "small" if self.kind == "full" and self.dim is not None else self.kind

    @property
    def label(self) -> str:
        kw = dict(self.kwargs)
        if self.kind == "none":
            return "biases only"
        if self.kind == "full":
            return "full table" if self.dim is None else f"full table dim {self.dim}"
        if self.kind == "hash":
            return f"hashing trick r={self.ratio:g}"
        if self.kind == "mixed":
            hot = f"hot {kw['hot_share']:g}" + (f" x dim {kw['hot_dim']}" if kw.get("hot_dim") else "")
            tail = f" + bloom k={self.k}" if self.k else ""
            return f"{hot} + private {kw['private_dim']}{tail} ≤{self.budget:g}"
        if self.kind == "hot":
            return f"hot {kw['hot_share']:g} + private {kw['private_dim']} + bloom k={self.k} ≤{self.budget:g} (lib)"
        if self.kind == "planner":
            return f"planner's choice ≤{self.budget:g}"
        size = f"r={self.ratio:g}" if self.budget is None else f"≤{self.budget:g}"
        return f"{self.kind} {size} k={self.k}"


@dataclasses.dataclass
class Hyper:
    dim: int = 32
    batch_size: int = 1024
    lr: float = 2e-3
    l2: float = 1e-3  # on the looked-up vectors and biases of each batch
    max_epochs: int = 60
    patience: int = 5
    # Every embedding parameter starts at normal(0, init_std); None: 1/dim of
    # the full model, the same for every layout.  "spotlight": 1/table_dim.
    init_std: Optional[object] = None


# Defaults before tuning (and with --no-tune): the full table's best in a
# small sweep on ml-100k.
HYPER = {
    "implicit": Hyper(lr=2e-3, l2=1e-3),
    "ratings": Hyper(lr=5e-3, l2=5e-2),
}

# The same small grid for every table family, picked on validation (seed 0).
GRID = {
    "implicit": {"lr": (2e-3, 5e-3, 1e-2), "l2": (1e-4, 1e-3, 1e-2)},
    "ratings": {"lr": (5e-3, 1e-2), "l2": (1e-2, 5e-2, 2e-1)},
}
QUICK_GRID = {
    "implicit": {"lr": (5e-3, 1e-2), "l2": (1e-4, 1e-3)},
    "ratings": {"lr": (1e-2,), "l2": (1e-2, 5e-2)},
}


# ------------------------------------------------------------ tables and bytes


def full_bytes(num: int, dim: int) -> int:
    """Bytes of a full float32 ``(num, dim)`` table: what budgets are shares of."""
    return num * dim * FLOAT_BYTES


def embedding_bytes(module: Optional[nn.Module]) -> int:
    """Bytes of everything a table stores: parameters and persistent buffers
    (a prototype layout counts the index the library would keep)."""
    if module is None:
        return 0
    if isinstance(module, layouts.MixedTable):
        return module.nbytes()
    persistent = [b for name, b in module.named_buffers() if _persistent(module, name)]
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), persistent))


def _persistent(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    return leaf not in sub._non_persistent_buffers_set


def table_grid(pairs, variants: dict, variant_pairs=None) -> list[TableSpec]:
    """Biases only, the full table, plain Bloom at each ``(ratio, k)`` and
    every variant at ``variant_pairs`` (default: the same pairs)."""
    specs = [TableSpec("none"), TableSpec("full")]
    specs += [TableSpec("bloom", r, k) for r, k in pairs]
    for name, kwargs in variants.items():
        fixed_k = kwargs.get("num_hash_functions")
        rest = tuple(sorted((key, v) for key, v in kwargs.items() if key != "num_hash_functions"))
        seen = set()
        for r, k in pairs if variant_pairs is None else variant_pairs:
            key = (r, fixed_k or k)
            if key not in seen:
                seen.add(key)
                specs.append(TableSpec(name, r, fixed_k or k, rest))
    return specs


def equal_bytes_specs(
    budget: float,
    dim: int,
    ks=(HEADLINE_K,),
    variants: Optional[dict] = None,
    layout_grid=(),
    planner: bool = False,
    library_layouts=(),
) -> list[TableSpec]:
    """The tables that store at most ``budget`` of the full table's bytes:
    the full table at the largest dim that fits, the hashing trick, plain
    Bloom at each ``k``, the variants (their extras paid from the rows), the
    layouts ``(hot_share, private_dim, k)`` and the planner's choice."""
    specs = []
    small = int(budget * dim + 1e-9)
    if small >= 1:
        specs.append(TableSpec("full", dim=small, budget=budget))
    specs.append(TableSpec("hash", budget, 1, budget=budget))
    specs += [TableSpec("bloom", budget, k, budget=budget) for k in ks]
    for name, kwargs in (variants or {}).items():
        if kwargs.get("importance_ratio", 0) * HEADLINE_K >= budget * dim:  # its weights alone fill the budget
            continue
        rest = tuple(sorted(kwargs.items()))
        specs.append(TableSpec(name, budget, HEADLINE_K, rest, budget=budget))
    for hot_share, private_dim, k, *hot_dim in layout_grid:
        if private_dim >= budget * dim:  # the private codes alone would fill the budget
            continue
        kw = (("hot_share", hot_share), ("private_dim", private_dim)) + tuple(("hot_dim", d) for d in hot_dim)
        specs.append(TableSpec("mixed", None, k, tuple(sorted(kw)), budget=budget))
    for hot_share, private_dim, k in library_layouts:
        if private_dim < budget * dim:
            kw = (("hot_share", hot_share), ("private_dim", private_dim))
            specs.append(TableSpec("hot", None, k, kw, budget=budget))
    if planner:
        specs.append(TableSpec("planner", budget=budget))
    return specs


def init_std_for(hp: "Hyper", table_dim: int) -> float:
    if hp.init_std == "spotlight":
        return 1.0 / table_dim
    return float(hp.init_std) if hp.init_std is not None else 1.0 / hp.dim


def make_table(
    spec: TableSpec, num: int, dim: int, counts: Optional[torch.Tensor] = None, init_std: Optional[float] = None
) -> Optional[nn.Module]:
    """The table ``spec`` describes for ``num`` ids of ``dim`` (``counts``:
    each id's training frequency, for layouts that favour frequent ids), its
    embedding weights drawn from ``normal(0, init_std)`` when given."""
    if spec.kind == "none":
        return None
    if spec.kind == "full":
        table = ScaledEmbedding(num, spec.dim or dim)
    elif spec.kind == "mixed":
        kw = dict(spec.kwargs)
        max_bytes = int(spec.budget * full_bytes(num, dim))
        hot = int(round(kw["hot_share"] * num))
        hot_dim = kw.get("hot_dim")
        # On a small table the projections take a larger share: fewer hot ids.
        while hot and layouts.layout_bytes(num, dim, hot, kw["private_dim"], 0, hot_dim) > max_bytes:
            hot -= 1
        rows = layouts.rows_for_budget(num, dim, hot, kw["private_dim"], max_bytes, hot_dim) if spec.k else 0
        if counts is None:
            raise ValueError("a mixed layout needs the ids' counts")
        table = layouts.MixedTable(
            num, dim, layouts.top_ids(counts, hot), kw["private_dim"], rows, spec.k or 1, init_std, hot_dim
        )
        if table.nbytes() > max_bytes:
            raise ValueError(f"{spec.label}: {table.nbytes()} bytes exceed the budget {max_bytes}")
        return table
    elif spec.kind == "hot":
        # The library's layout: hot rows (sorted int64 index, counted by
        # embedding_bytes) and a private code, Bloom rows with the rest.
        kw = dict(spec.kwargs)
        max_bytes = int(spec.budget * full_bytes(num, dim))
        r = kw["private_dim"]
        fixed = lambda hot: (hot * dim + num * r + r * dim) * FLOAT_BYTES + hot * 8  # noqa: E731
        hot = int(round(kw["hot_share"] * num))
        while hot and fixed(hot) + dim * FLOAT_BYTES > max_bytes:
            hot -= 1
        rows = (max_bytes - fixed(hot)) // (dim * FLOAT_BYTES)
        if rows < 1:
            raise ValueError(f"{spec.label}: the private part alone exceeds the budget {max_bytes}")
        if counts is None:
            raise ValueError("a hot-row layout needs the ids' counts")
        table = BloomEmbedding(
            num,
            dim,
            num_rows=int(rows),
            num_hash_functions=spec.k,
            padding_idx=None,
            hot_ids=layouts.top_ids(counts, hot) if hot else None,
            private_dim=r,
        )
    elif spec.kind == "planner":
        # Needs the library's planner (issue 11, part 4).
        table = plan_embedding(counts, dim, int(spec.budget * full_bytes(num, dim))).build(padding_idx=None)
    else:
        # No padding id: every user and item is real, none may be the zero vector.
        kwargs = dict(spec.kwargs)
        if "importance_ratio" in kwargs:
            kwargs["importance_rows"] = max(1, int(kwargs.pop("importance_ratio") * num))
        if spec.budget is not None:
            # Importance weights are paid from the table's rows.
            extra = kwargs.get("importance_rows", 0) * spec.k * FLOAT_BYTES if kwargs.get("importance") else 0
            if kwargs.get("importance") and "importance_rows" not in kwargs:
                # importance_rows defaults to num_rows: rows * (dim + k) floats.
                rows = int(spec.budget * full_bytes(num, dim)) // ((dim + spec.k) * FLOAT_BYTES)
                kwargs["importance_rows"] = max(1, rows)
                extra = kwargs["importance_rows"] * spec.k * FLOAT_BYTES
            else:
                rows = (int(spec.budget * full_bytes(num, dim)) - extra) // (dim * FLOAT_BYTES)
            kwargs["num_rows"] = max(1, rows)
        table = BloomEmbedding(num, dim, spec.ratio, spec.k, padding_idx=None, **kwargs)
    if init_std is not None:
        with torch.no_grad():
            for name, param in table.named_parameters():
                # Projections keep their own init: they map a code, they are no table.
                if name.endswith("weight") and "importance" not in name and "projection" not in name:
                    param.normal_(0.0, init_std)
    return table


# ---------------------------------------------------------------- model


class Factorization(nn.Module):
    """``mu + b_u + b_i + <p_u, q_i>``; the BPR model leaves out ``mu`` and
    ``b_u``, which cancel in a pairwise difference."""

    def __init__(
        self,
        spec: TableSpec,
        num_users: int,
        num_items: int,
        dim: int,
        user_bias: bool,
        mean: float = 0.0,
        compress=("users", "items"),
        counts=(None, None),
        init_std=None,
    ):
        super().__init__()
        self.num_items = num_items
        full = spec if spec.kind == "none" else TableSpec("full")

        def table(side, num, count):
            chosen = spec if side in compress else full
            std = init_std(chosen.dim or dim) if callable(init_std) else init_std
            return make_table(chosen, num, dim, count, std)

        self.users = table("users", num_users, counts[0])
        self.items = table("items", num_items, counts[1])
        self.item_bias = ZeroEmbedding(num_items, 1)
        self.user_bias = ZeroEmbedding(num_users, 1) if user_bias else None
        self.register_buffer("mean", torch.tensor(float(mean)))

    def parts(self, users: torch.Tensor, items: torch.Tensor):
        """Score of each pair and the squared norms of what it looked up."""
        bias = self.item_bias(items).squeeze(-1)
        score = bias + self.mean
        sq = bias.pow(2)
        if self.user_bias is not None:
            b = self.user_bias(users).squeeze(-1)
            score = score + b
            sq = sq + b.pow(2)
        if self.users is not None:
            p, q = self.users(users), self.items(items)
            score = score + (p * q).sum(-1)
            sq = sq + p.pow(2).sum(-1) + q.pow(2).sum(-1)
        return score, sq

    def bpr(self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor):
        """``parts(u, pos) - parts(u, neg)`` and the sum of their squared
        norms, looking each user up once and the items in one call."""
        items = torch.cat([positives, negatives])
        b_pos, b_neg = self.item_bias(items).squeeze(-1).chunk(2)
        margin = b_pos - b_neg
        sq = b_pos.pow(2) + b_neg.pow(2)
        if self.users is not None:
            p = self.users(users)
            q_pos, q_neg = self.items(items).chunk(2)
            margin = margin + (p * (q_pos - q_neg)).sum(-1)
            sq = sq + 2 * p.pow(2).sum(-1) + q_pos.pow(2).sum(-1) + q_neg.pow(2).sum(-1)
        return margin, sq

    @torch.no_grad()
    def ranker(self, users: torch.Tensor):
        """What :func:`~triton_bloom.output.bloom_rank` ranks every item by for
        ``users``: ``score(u, i) = queries[u] . table(i) + bias[i]``.

        The global mean and the user bias add the same to every item of a
        user and so cannot move the target's rank: they are left out.

        Args:
            users (Tensor): ``(Q,)`` user ids.

        Returns:
            tuple: ``(queries, table, bias)``: ``(Q, d)`` queries, the item
            table and the ``(num_items,)`` item bias.  Without tables (biases
            only) the bias is the table, of width 1, and every query is 1,
            so that both models are ranked by one code path.
        """
        if self.users is None:
            return self.item_bias.weight.new_ones(len(users), 1), self.item_bias, None
        return self.users(users), self.items, self.item_bias.weight[:, 0]


def table_params(module: Optional[nn.Module]) -> tuple[int, int]:
    """Parameters and bytes of a table (``embedding_bytes``)."""
    if module is None:
        return 0, 0
    return sum(p.numel() for p in module.parameters()), embedding_bytes(module)


def model_size(model: Factorization) -> dict:
    emb = [table_params(model.users), table_params(model.items)]
    total = sum(p.numel() for p in model.parameters())
    biases = sum(t.numel() * t.element_size() for t in model.parameters()) - sum(
        p.numel() * p.element_size() for t in (model.users, model.items) if t is not None for p in t.parameters()
    )
    return {
        "embedding_params": sum(p for p, _ in emb),
        "embedding_bytes": sum(b for _, b in emb),
        "total_params": total,
        "total_bytes": sum(b for _, b in emb) + biases,
    }


# ------------------------------------------------------------- training


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    perm = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]


def bpr_epoch(model, opt, train: datasets.Interactions, hp: Hyper, rng) -> float:
    """One pass over the positives, each against one uniform negative (a
    negative may occasionally be a positive: the usual cheap approximation)."""
    users = torch.from_numpy(train.user)
    items = torch.from_numpy(train.item)
    negatives = torch.from_numpy(rng.integers(0, train.num_items, len(train)))
    total = 0.0
    for idx in _batches(len(train), hp.batch_size, rng):
        idx = torch.from_numpy(idx)
        margin, sq = model.bpr(users[idx], items[idx], negatives[idx])
        loss = -F.logsigmoid(margin).mean() + hp.l2 * sq.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(train)


def rating_epoch(model, opt, train: datasets.Interactions, hp: Hyper, rng) -> float:
    users = torch.from_numpy(train.user)
    items = torch.from_numpy(train.item)
    ratings = torch.from_numpy(train.rating)
    total = 0.0
    for idx in _batches(len(train), hp.batch_size, rng):
        idx = torch.from_numpy(idx)
        pred, sq = model.parts(users[idx], items[idx])
        loss = F.mse_loss(pred, ratings[idx]) + hp.l2 * sq.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(train)


# ----------------------------------------------------------- evaluation


def padded_items(events: list, users: np.ndarray) -> torch.Tensor:
    """Each user's items among some interactions, as ``bloom_rank``'s ``exclude``.

    Args:
        events (list): :class:`bench.studies.data.Interactions` to gather from.
        users (ndarray): ``(Q,)`` the users wanted (repeats allowed).

    Returns:
        Tensor: ``(Q, m)`` int64, row ``q`` holding the items of ``users[q]``
        in event order (a repeated event repeated) and -1 after them.
    """
    event_users = np.concatenate([e.user for e in events])
    order = np.argsort(event_users, kind="stable")
    event_users, event_items = event_users[order], np.concatenate([e.item for e in events])[order]
    first = np.searchsorted(event_users, users, side="left")
    count = np.searchsorted(event_users, users, side="right") - first
    width = int(count.max(initial=0))
    if width == 0:
        return torch.empty((len(users), 0), dtype=torch.int64)
    column = np.arange(width)
    inside = column < count[:, None]
    padded = np.where(inside, event_items[np.where(inside, first[:, None] + column, 0)], -1)
    return torch.from_numpy(padded.astype(np.int64))


@torch.no_grad()
def rank_metrics(
    model, targets: datasets.Interactions, seen: list, chunk: int = 1024, *, exclude: Optional[torch.Tensor] = None
) -> dict:
    """MRR, AUC and HR@10 of each target item ranked against every item its
    user has not seen.  Ties count half, so identical vectors (hash
    collisions at ``k=1``) get no credit for ordering
    (``triton_bloom.ranking``, shared with the demo).

    Ranked by :func:`~triton_bloom.output.bloom_rank` on ``model.ranker``'s
    queries, table and bias: the catalogue is walked in chunks, never
    holding every item's vector or a ``(users, items)`` score matrix.

    Args:
        model: a :class:`Factorization` (anything with ``ranker``).
        targets (Interactions): one held-out (user, item) per row.
        seen (list): :class:`~bench.studies.data.Interactions` left out of the
            ranking; a target seen before (a repeat event) still competes.
        chunk (int): targets ranked at a time.
        exclude (Tensor, optional): ``padded_items(seen, targets.user)``,
            when already at hand.

    Returns:
        dict: ``{"mrr", "auc", "hr@10"}``, each the mean over the targets.
    """
    if exclude is None:
        exclude = padded_items(seen, targets.user)
    per_user = {"mrr": [], "auc": [], "hr@10": []}
    for start in range(0, len(targets), chunk):
        users = torch.from_numpy(targets.user[start : start + chunk])
        items = torch.from_numpy(targets.item[start : start + chunk])
        queries, table, bias = model.ranker(users)
        # bloom_rank never excludes a query's own target: a repeat event competes.
        ranks = bloom_rank(queries, items, table, exclude=exclude[start : start + chunk], bias=bias)
        for name, values in ranking_metrics(ranks.above, ranks.others.double(), k=10).items():
            per_user[name].append(values)
    return {name: torch.cat(values).mean().item() for name, values in per_user.items()}


@torch.no_grad()
def rmse(model, part: datasets.Interactions, low: float, high: float) -> dict:
    pred, _ = model.parts(torch.from_numpy(part.user), torch.from_numpy(part.item))
    err = pred.clamp(low, high) - torch.from_numpy(part.rating)
    return {"rmse": err.pow(2).mean().sqrt().item()}


@dataclasses.dataclass
class Task:
    """A model family and its protocol: how to train one epoch, how to score
    validation and test, and which validation metric picks the epoch."""

    name: str
    split: datasets.Split
    hyper: Hyper
    select: str
    higher_is_better: bool
    compress: tuple = ("users", "items")  # which tables a compressed spec applies to
    # Each part's seen items, padded: the same every epoch, so built once.
    _exclude: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def counts(self) -> tuple:
        """Training events per user and per item: what layouts that favour
        frequent ids (and the planner) are built from."""
        train = self.split.train
        return (
            torch.bincount(torch.from_numpy(train.user), minlength=train.num_users),
            torch.bincount(torch.from_numpy(train.item), minlength=train.num_items),
        )

    def model(self, spec: TableSpec, hyper: Optional[Hyper] = None) -> Factorization:
        hp = hyper or self.hyper
        train = self.split.train
        ratings = self.name == "ratings"
        mean = float(train.rating.mean()) if ratings else 0.0
        return Factorization(
            spec,
            train.num_users,
            train.num_items,
            hp.dim,
            user_bias=ratings,
            mean=mean,
            compress=self.compress,
            counts=self.counts,
            init_std=lambda table_dim: init_std_for(hp, table_dim),
        )

    def epoch(self, model, opt, rng, hyper: Optional[Hyper] = None) -> float:
        fn = rating_epoch if self.name == "ratings" else bpr_epoch
        return fn(model, opt, self.split.train, hyper or self.hyper, rng)

    def evaluate(self, model, part: str) -> dict:
        s = self.split
        if self.name == "ratings":
            return rmse(model, getattr(s, part), float(s.train.rating.min()), float(s.train.rating.max()))
        seen = [s.train] if part == "valid" else [s.train, s.valid]
        targets = getattr(s, part)
        if part not in self._exclude:
            self._exclude[part] = padded_items(seen, targets.user)
        return rank_metrics(model, targets, seen, exclude=self._exclude[part])

    def better(self, new: float, old: Optional[float]) -> bool:
        return old is None or (new > old if self.higher_is_better else new < old)


def make_tasks(data: datasets.Interactions, names, hyper: dict, compress=("users", "items")) -> list[Task]:
    tasks = []
    if "implicit" in names:
        tasks.append(Task("implicit", datasets.leave_last_out(data), hyper["implicit"], "auc", True, compress))
    if "ratings" in names:
        split = datasets.random_split(data, (0.8, 0.1, 0.1), seed=0)
        tasks.append(Task("ratings", split, hyper["ratings"], "rmse", False, compress))
    return tasks


def fit(task: Task, spec: TableSpec, seed: int, hyper: Optional[Hyper] = None) -> dict:
    """Train with early stopping on validation; test the best epoch's weights."""
    hp = hyper or task.hyper
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = task.model(spec, hp)
    opt = torch.optim.Adam(model.parameters(), lr=hp.lr)
    start, cpu_start = time.perf_counter(), time.process_time()
    best, best_state, best_epoch, epoch = None, None, 0, 0
    curve = []
    for epoch in range(1, hp.max_epochs + 1):
        model.train()
        task.epoch(model, opt, rng, hp)
        model.eval()
        valid = task.evaluate(model, "valid")
        curve.append(round(valid[task.select], 5))
        if task.better(valid[task.select], None if best is None else best[task.select]):
            best, best_state, best_epoch = valid, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= hp.patience:
            break
    model.load_state_dict(best_state)
    return {
        "valid": best,
        "test": task.evaluate(model, "test"),
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "valid_curve": curve,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "lr": hp.lr,
        "l2": hp.l2,
        **model_size(model),
    }


def grid_points(grid: dict) -> list[dict]:
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def tune(task: Task, spec: TableSpec, grid: dict, seed: int = 0, hyper: Optional[Hyper] = None, log=None):
    """Fit ``spec`` at every point of ``grid`` (``{"lr": (...), "l2": (...)}``)
    with ``seed`` and keep the best validation metric: returns the chosen
    ``Hyper``, that fit's result and every point's validation metric."""
    base = hyper or task.hyper
    best_hp, best_result, trials = None, None, []
    for point in grid_points(grid):
        hp = dataclasses.replace(base, **point)
        result = fit(task, spec, seed, hp)
        trials.append(
            {
                **point,
                "valid": result["valid"][task.select],
                "best_epoch": result["best_epoch"],
                "seconds": result["seconds"],
            }
        )
        if log:
            log(
                f"  tune {spec.label} {point}: valid {task.select}={result['valid'][task.select]:.4f} "
                f"(epoch {result['best_epoch']}, {result['seconds']:.1f}s)"
            )
        if best_result is None or task.better(result["valid"][task.select], best_result["valid"][task.select]):
            best_hp, best_result = hp, result
    return best_hp, best_result, trials


# ------------------------------------------------------------ summaries


def _stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


SUMMARY_KEYS = ("dataset", "task", "label", "kind", "family", "ratio", "k", "dim", "budget", "variant_kwargs")
SIZE_KEYS = ("embedding_params", "embedding_bytes", "total_params", "total_bytes")


def summarize(runs: list) -> list:
    """One row per (dataset, task, table): mean and sample std over repeats,
    the share of the full table's mean metric kept (``kept_vs_full``) and
    the share of its gain over biases only kept (``gain_kept``)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["task"], r["label"]), []).append(r)
    rows = []
    for (dataset, task, label), group in groups.items():
        first = group[0]
        row = {k: first.get(k) for k in SUMMARY_KEYS}
        row.update({k: first[k] for k in SIZE_KEYS})
        row["hyper"] = {"lr": first.get("lr"), "l2": first.get("l2")}
        if first.get("trials") is not None:
            row["trials"] = first["trials"]
        for part in ("test", "valid"):
            row[part] = {m: _stats([g[part][m] for g in group]) for m in first[part]}
        row["best_epoch"] = _stats([g["best_epoch"] for g in group])
        row["seconds"] = _stats([g["seconds"] for g in group])
        rows.append(row)
    for row in rows:
        same = [r for r in rows if (r["dataset"], r["task"]) == (row["dataset"], row["task"])]
        full = next(r for r in same if r["kind"] == "full" and r["dim"] is None)
        none = next((r for r in same if r["kind"] == "none"), None)
        row["kept_vs_full"] = {m: row["test"][m]["mean"] / full["test"][m]["mean"] for m in row["test"]}
        row["embedding_params_vs_full"] = row["embedding_params"] / full["embedding_params"]
        row["embedding_bytes_vs_full"] = row["embedding_bytes"] / full["embedding_bytes"]
        if none is not None:
            row["gain_kept"] = {
                m: (row["test"][m]["mean"] - none["test"][m]["mean"])
                / (full["test"][m]["mean"] - none["test"][m]["mean"])
                for m in row["test"]
                if full["test"][m]["mean"] != none["test"][m]["mean"]
            }
    return rows


def _at_budget(row: dict) -> Optional[float]:
    """The budget a row was sized for (an old-style Bloom spec: its ratio)."""
    return row["budget"] if row.get("budget") is not None else row.get("ratio")


def _best(rows, kinds, select, higher, budget=HEADLINE_BUDGET) -> Optional[dict]:
    """The row of ``kinds`` at ``budget`` with the best validation
    ``select``: choosing k, a variant or a layout on test would flatter it."""
    pool = [r for r in rows if r["family"] in kinds and _at_budget(r) == budget]
    if not pool:
        return None
    key = (lambda r: r["valid"][select]["mean"]) if higher else (lambda r: -r["valid"][select]["mean"])
    return max(pool, key=key)


BASELINES = ("biases_only", "small", "hash", f"bloom_k{HEADLINE_K}", "bloom_best_k")


def headline(rows: list, tasks: dict, budget: float = HEADLINE_BUDGET) -> dict:
    """Per dataset and task, at ``budget`` of the full table's bytes: the
    full table, the equal-bytes baselines (biases only, the full table at a
    reduced dim, the hashing trick, plain Bloom at k=4 and at the k
    validation prefers), the best Bloom variant and the best layout, each
    chosen on validation; and whether the best layout beats every baseline
    on the test metric."""
    out = {}
    for dataset, task in dict.fromkeys((r["dataset"], r["task"]) for r in rows):
        sub = [r for r in rows if (r["dataset"], r["task"]) == (dataset, task)]
        select, higher = tasks[task]
        picks = {
            "full": next(r for r in sub if r["kind"] == "full" and r["dim"] is None),
            "biases_only": next((r for r in sub if r["kind"] == "none"), None),
            "small": _best(sub, {"small"}, select, higher, budget),
            "hash": _best(sub, {"hash"}, select, higher, budget),
            f"bloom_k{HEADLINE_K}": next(
                (r for r in sub if r["kind"] == "bloom" and _at_budget(r) == budget and r["k"] == HEADLINE_K), None
            ),
            "bloom_best_k": _best(sub, {"bloom"}, select, higher, budget),
            "variant_best": _best(sub, set(VARIANTS), select, higher, budget),
            "layout_best": _best(sub, set(LAYOUT_KINDS), select, higher, budget),
        }
        entry = {
            name: {
                "label": r["label"],
                "test": r["test"],
                "valid": r["valid"],
                "kept_vs_full": r["kept_vs_full"],
                "gain_kept": r.get("gain_kept", {}),
                "embedding_bytes": r["embedding_bytes"],
                "embedding_bytes_vs_full": r["embedding_bytes_vs_full"],
                "hyper": r["hyper"],
            }
            for name, r in picks.items()
            if r is not None
        }
        best = picks["layout_best"] or picks["variant_best"] or picks["bloom_best_k"]
        if best is not None:
            sign = 1 if higher else -1
            margins = {
                name: sign * (best["test"][select]["mean"] - picks[name]["test"][select]["mean"])
                for name in BASELINES
                if picks.get(name) is not None and picks[name] is not best
            }
            entry["verdict"] = {
                "best": best["label"],
                "metric": select,
                "kept_vs_full": best["kept_vs_full"][select],
                "beats_every_baseline": all(m > 0 for m in margins.values()),
                "margin_over": margins,
            }
        out.setdefault(dataset, {})[task] = entry
    return out


# ------------------------------------------------------------------ CLI


def load_dataset(name: str, cache_dir: Optional[str]) -> datasets.Interactions:
    if name == "ml-100k":
        try:
            return datasets.load_ml100k(cache_dir)
        except datasets.DatasetUnavailable as e:
            raise SystemExit(str(e)) from None
    if name == "synthetic":
        return datasets.synthetic(seed=0)
    if os.path.exists(name):
        return datasets.read_interactions(name)
    raise SystemExit(f"--dataset {name!r}: not 'ml-100k', 'synthetic' or an existing file")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"ml-100k, implicit, budget {HEADLINE_BUDGET}: the baselines, plain Bloom k={HEADLINE_K}, "
        f"the library layouts {LIB_LAYOUTS} and the planner's, grid {QUICK_GRID['implicit']}, "
        "1 repeat",
    )
    p.add_argument(
        "--dataset",
        action="append",
        help="ml-100k, synthetic or a u.data/.inter path (repeatable); "
        "default ml-100k and synthetic, ml-100k with --quick",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=["implicit", "ratings"],
        help="default implicit and ratings; implicit with --quick",
    )
    p.add_argument(
        "--compress",
        nargs="+",
        default=["users", "items"],
        choices=["users", "items"],
        help="which tables the compressed specs replace; the others stay full (default both)",
    )
    p.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        help=f"shares of the full table's bytes (default {FULL_BUDGETS}; {HEADLINE_BUDGET} with --quick); "
        f"variants and layouts run at {HEADLINE_BUDGET} only",
    )
    p.add_argument("--ks", nargs="+", type=int, help=f"k of plain Bloom at each budget (default {FULL_KS})")
    p.add_argument("--ratios", nargs="+", type=float, help="also plain Bloom at these compression ratios (at --ks)")
    p.add_argument("--no-variants", action="store_true", help="leave out the Bloom variants (signed, importance)")
    p.add_argument("--no-layouts", action="store_true", help="leave out the mixed layouts")
    p.add_argument(
        "--layout",
        action="append",
        metavar="H,R,K[,HD]",
        help="a bench/studies/layouts.py layout to run instead of the defaults: hot share, private dim, k (0: no "
        "Bloom rows), hot rows' dim (repeatable)",
    )
    p.add_argument(
        "--lib-layout",
        action="append",
        metavar="H,R,K",
        help="the library's hot_ids + private_dim layout: hot share, private dim, k (repeatable; "
        f"default {LIB_LAYOUTS})",
    )
    p.add_argument(
        "--no-planner",
        dest="planner",
        action="store_false",
        help="leave out the planner's choice (plan_embedding) at each budget",
    )
    p.add_argument("--repeats", type=int, help="seeds per table (default 3; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="repeat r uses seed + r; tuning uses seed")
    p.add_argument("--dim", type=int, help=f"embedding size of the full table (default {Hyper.dim})")
    p.add_argument("--epochs", type=int, help=f"most epochs, early stopping on validation (default {Hyper.max_epochs})")
    p.add_argument("--patience", type=int, help=f"epochs without validation gain to stop (default {Hyper.patience})")
    p.add_argument("--no-tune", action="store_true", help="train every table with HYPER instead of tuning lr and L2")
    p.add_argument(
        "--spotlight-init",
        action="store_true",
        help="init each table at normal(0, 1/its dim) (Spotlight) instead of 1/the full dim",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible, shares the machine)")
    p.add_argument("--cache-dir", help=f"where ml-100k is kept (default {datasets.default_cache_dir()})")
    p.add_argument("--out", required=True, help="JSON path; the .md and .png are written beside it")
    return p.parse_args(argv)


def study_specs(args, dim: int) -> list[TableSpec]:
    """Biases only, the full table, then at each budget the equal-bytes
    tables; the variants and layouts at the headline budget only."""
    budgets = args.budgets or ([HEADLINE_BUDGET] if args.quick else list(FULL_BUDGETS))
    ks = args.ks or ([HEADLINE_K] if args.quick else list(FULL_KS))
    variants = {} if args.no_variants or args.quick else VARIANTS
    layout_grid = () if args.no_layouts else (QUICK_LAYOUTS if args.quick else LAYOUTS)
    if args.layout:
        layout_grid = [tuple(_number(v) for v in text.split(",")) for text in args.layout]
    lib_layouts = () if args.no_layouts else LIB_LAYOUTS
    if args.lib_layout:
        lib_layouts = [tuple(_number(v) for v in text.split(",")) for text in args.lib_layout]
    specs = [TableSpec("none"), TableSpec("full")]
    for budget in budgets:
        headline = budget == HEADLINE_BUDGET
        specs += equal_bytes_specs(
            budget,
            dim,
            ks,
            variants if headline else None,
            layout_grid if headline else (),
            args.planner,
            lib_layouts if headline else (),
        )
    specs += [TableSpec("bloom", r, k) for r in args.ratios or () for k in ks]
    return list(dict.fromkeys(specs))


def _number(text: str):
    return float(text) if "." in text else int(text)


def run_all(args, hyper: dict, grids: dict, log=None) -> tuple[list, dict]:
    names = args.dataset or (["ml-100k"] if args.quick else ["ml-100k", "synthetic"])
    task_names = args.tasks or (["implicit"] if args.quick else ["implicit", "ratings"])
    repeats = args.repeats or (1 if args.quick else 3)
    specs = study_specs(args, hyper["implicit"].dim)
    runs, described = [], {}
    for name in names:
        data = load_dataset(name, args.cache_dir)
        described[data.name] = {**data.describe(), "splits": {}}
        for task in make_tasks(data, task_names, hyper, tuple(args.compress)):
            described[data.name]["splits"][task.name] = task.split.sizes()
            for spec in specs:
                if args.no_tune:
                    hp, first, trials = task.hyper, fit(task, spec, args.seed), None
                else:
                    hp, first, trials = tune(task, spec, grids[task.name], args.seed, log=log)
                for repeat in range(repeats):
                    seed = args.seed + repeat
                    # The tuning fit of the chosen setting is repeat 0.
                    result = first if repeat == 0 else fit(task, spec, seed, hp)
                    runs.append(
                        {
                            "dataset": data.name,
                            "task": task.name,
                            "label": spec.label,
                            "kind": spec.kind,
                            "family": spec.family,
                            "ratio": spec.ratio,
                            "k": spec.k,
                            "dim": spec.dim,
                            "budget": spec.budget,
                            "variant_kwargs": dict(spec.kwargs),
                            "repeat": repeat,
                            "seed": seed,
                            "trials": trials if repeat == 0 else None,
                            **result,
                        }
                    )
                    shown = ", ".join(f"{m}={v:.4f}" for m, v in result["test"].items())
                    note = f"(lr {hp.lr:g}, l2 {hp.l2:g}, epoch {result['best_epoch']}, {result['seconds']:.1f}s)"
                    if log:
                        log(f"{data.name} {task.name} {spec.label} #{repeat}: {shown} {note}")
    return runs, described


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:  # fail before training, not after
        raise SystemExit("bench/studies/quality.py plots with matplotlib: pip install matplotlib")
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in dict(dim=args.dim, max_epochs=args.epochs, patience=args.patience).items() if v}
    if args.spotlight_init:
        overrides["init_std"] = "spotlight"
    hyper = {task: dataclasses.replace(hp, **overrides) for task, hp in HYPER.items()}
    grids = QUICK_GRID if args.quick else GRID
    start, cpu_start = time.perf_counter(), time.process_time()
    runs, described = run_all(args, hyper, grids, log=_log)
    rows = summarize(runs)
    init = (
        "normal(0, 1/table dim) (Spotlight)"
        if args.spotlight_init
        else f"normal(0, 1/{hyper['implicit'].dim}) for every embedding parameter of every layout"
    )
    payload = {
        "benchmark": "quality",
        "environment": environment(),
        "command": "python bench/studies/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "protocol": {
            "implicit": "BPR-MF (score <p_u,q_i> + b_i), 1 uniform negative per positive; leave-last-out by "
            "timestamp (ties: file order), second-last is validation; metrics rank the held-out item "
            "against all items the user has not interacted with (full ranking), ties count half",
            "ratings": "MF with global mean and user/item biases, MSE loss; random 80/10/10 split (seed 0); "
            "RMSE of predictions clipped to the training rating range",
            "budget": "each compressed table stores at most budget x the full table's embedding bytes "
            "(users and items each; float32), everything counted: hashed rows, hot rows and their "
            f"index ({layouts.HOT_INDEX_BYTES} B per hot id), private codes and projections, "
            "importance weights (paid from the rows); biases are full-size in every model",
            "baselines": "full table at the largest embedding_dim within the budget; hashing trick (Bloom k=1); "
            "biases only (no tables)",
            "init": init,
            "tuning": "no tuning: HYPER for every table"
            if args.no_tune
            else f"every table its own lr and L2 from the grid {grids}, picked on the validation metric of "
            f"seed {args.seed}; the same grid, epochs and patience for every table",
            "selection": "early stopping on validation (implicit: AUC, ratings: RMSE); test metrics at the "
            "best validation epoch; best k / variant / layout chosen on validation means",
            "tables": "full = ScaledEmbedding (nn.Embedding); bloom/hash/variants = BloomEmbedding("
            "padding_idx=None, backend='auto'); mixed = bench/studies/layouts.py MixedTable (hot ids by "
            f"training count, then a private code + projection, Bloom rows with the rest); compressed: "
            f"{' and '.join(args.compress)} (the other table, if any, stays full)",
            "relative": "/ full: test metric over the full table's; gain kept: (x - biases only) / "
            "(full - biases only), the share of what the full table adds over no table",
            "spread": "mean and sample std (ddof=1) over repeats with seeds seed..seed+repeats-1",
        },
        "hyperparameters": {task: dataclasses.asdict(hp) for task, hp in hyper.items()},
        "grid": grids,
        "repeats": args.repeats or (1 if args.quick else 3),
        "headline_budget": HEADLINE_BUDGET,
        "variants": VARIANTS,
        "datasets": described,
        "headline": headline(rows, {"implicit": ("auc", True), "ratings": ("rmse", False)}),
        "summary": rows,
        "runs": runs,
    }
    write_json(args.out, payload)
    from bench.studies.quality_report import write_markdown, write_plot

    stem = os.path.splitext(args.out)[0]
    write_markdown(stem + ".md", payload)
    write_plot(stem + ".png", payload)
    _log(
        f"wrote {args.out}, {stem}.md, {stem}.png in {payload['wall_seconds']:.0f}s wall, "
        f"{payload['cpu_seconds']:.0f}s CPU"
    )


if __name__ == "__main__":
    main()
