"""Next-item recommendation at equal bytes: a full model against a narrower
one, a tied Bloom embedding and the paper's Bloom output layer.

Spotlight's sequence setting on ml-100k in time order: predict each user's
next item from the items before it.  The user is the mean of the vectors of
their last ``seq_len`` items (Spotlight's pooling model).  Pooling, not a
GRU: it has no weights of its own, so every byte of a model is an item
table and the comparison is purely one of tables; it is also the cheapest
network to train on one CPU core, which lets every model get the same
learning-rate grid and enough epochs.

Models (hidden width ``dim`` = 64 unless ``--dim``):

1. **full**: input ``nn.Embedding(N, dim)`` + output ``nn.Linear(dim, N)``,
   untied; the reference, budget 1.0.
2. **reduced width**: the plain model at the largest width ``d'`` whose
   tables fit the budget, both tied (one ``N x d'`` table at both ends, that
   is Spotlight's own pooling model) and untied (``d'`` half as large).  The
   hidden width shrinks with the tables: the baseline a user would try.
3. **tied Bloom**: one ``BloomEmbedding(N, dim)`` at both ends (history
   lookups in, ``bloom_cross_entropy`` out, a full softmax over the
   catalogue), its rows the most that fit the budget: one table serves both
   ends, so it has twice the rows of each table of an untied pair.
4. **Bloom output layer** (Serra & Karatzoglou 2017): a ``BloomEmbedding``
   input and ``BloomOutputLayer(dim, N)``, trained with ``layer.loss`` on the
   target's ``k`` hashed units and decoded by the sum of the
   log-probabilities at an id's units; half the budget for each end (fixed
   beforehand, not tuned).

Each Bloom model is run at ``k = 2`` and ``k = 4`` (``--k``) and reported at
both; the comparison at the end of the summary picks each Bloom model's
``k``, and the stronger of the two narrow baselines, on validation MRR.

Budget: ``--budget`` (0.2) of the full model's input-table + output-weight
bytes, measured on the built modules (``triton_bloom.embedding_bytes`` for
Bloom tables, ``numel * element_size`` for plain tensors; the Bloom output
layer's projection bias, one float per unit, is counted in).  Per-item
output biases are outside the budget and every model that has a place for
one has it: all but the Bloom output layer, whose loss lives on its units,
not on ids (its per-unit bias is its stand-in, and it pays for it).  Every
model is asserted to fit the budget.

Protocol, the same for every model: every table and output-weight element
starts from ``normal(0, 1/dim)`` (Spotlight's ``ScaledEmbedding`` scale;
the full width's scale for a narrower model too), biases from 0; Adam;
full softmax cross-entropy over the catalogue (the Bloom output layer: over
its units); one example per training event after a user's first, its
history the ``seq_len`` events before it; the same learning-rate grid, most
epochs and patience for every model; after each epoch the validation MRR
(each user's last-but-one item), early stopping on it, and the learning
rate and epoch with the best validation MRR give the test metrics (each
user's last item).

Ranking: the held-out item against the **whole catalogue** minus the items
the user already has (training items, and for the test the validation item
too): ml-100k holds one rating per (user, movie), so a seen item is never
the next one, and leaving them in would mostly measure which model learns
to push the history down.  Spotlight's ``sequence_mrr_score`` keeps them by
default; excluding is the common protocol and the one of
``bench/studies/budget_sweep.py``.  Ties count half.  The Bloom models are ranked
through the library's output side without materialising any item vector:
``triton_bloom.output.bloom_rank`` (tied, with the item bias) and
``BloomOutputLayer.rank``; the plain models materialise their logits and
count with ``triton_bloom.ranking.items_above``.  Both feed
``ranking_metrics``.  HR@10 is also computed from each model's top-10
(``emb.topk`` / ``layer.topk`` with the same exclusions, ``topk`` of the
plain models' logits), a cross-check that differs from ``rank <= 10`` only
through ties at the cut.

**GRU user model** (``--model gru``): pooling lets a narrow table cost the
network nothing; a sequence model whose width is fixed does not.  The user
is then the last hidden state of a one-layer ``nn.GRU(width, width)`` over
the same history (``GRUUser``: right-padded, read at the last real step, so
padding cannot reach it), and the models are: the full model (width 64,
GRU 64); the tied table at reduced width ``d'`` with a GRU of width ``d'``
(what shrinking the embedding does to such a network); a **factorised**
tied table, an ``r``-dim code per item times a shared ``(r, 64)``
projection feeding the width-64 GRU, ``r`` the largest that fits (the
plain way to keep the width); tied Bloom at width 64; and, with
``--families``, the Bloom output layer.  The GRU's weights are outside the
table budget and reported per model.  ``GRU`` holds its grid and epochs.

    python bench/studies/sequence.py --quick --out /tmp/sequence_quick.json            # about a minute
    python bench/studies/sequence.py --seeds 3 --out bench/results/sequence_cpu.json   # the recorded run, ~20 min
    python bench/studies/sequence.py --model gru --seeds 3 --families full reduced factorised tied_bloom
        --out bench/results/sequence_gru_cpu.json                              # the GRU run, one line

Writes the JSON and a markdown summary beside it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.common import environment, markdown_table, write_json  # noqa: E402
from bench.studies import data as datasets  # noqa: E402
from triton_bloom import BloomEmbedding, BloomOutputLayer, bloom_cross_entropy, embedding_bytes  # noqa: E402
from triton_bloom.output import bloom_rank  # noqa: E402
from triton_bloom.ranking import items_above, ranking_metrics  # noqa: E402

TOP = 10  # HR@TOP


@dataclasses.dataclass
class Config:
    """The recorded run: 3 learning rates, up to 25 epochs each with
    patience 3, for 7 models (Bloom ones at k = 2 and 4): about 5 minutes a
    seed on one core."""

    dim: int = 64
    budget: float = 0.2
    seq_len: int = 10
    ks: tuple = (2, 4)  # hash functions: each Bloom model is run with each
    input_share: float = 0.5  # of the budget, the Bloom output layer model's input table
    lrs: tuple = (1e-3, 3e-3, 1e-2)
    max_epochs: int = 25
    patience: int = 3
    batch_size: int = 256
    seeds: tuple = (0,)
    model: str = "pool"  # the user model: pool | gru


# The GRU study (``--model gru``): a GRU epoch costs 2-4x a pooled one on one
# core, so to fit 3 seeds in about 45 minutes the grid drops the pooled
# study's largest learning rate (picked there in 1 of the 12 runs of the
# models kept here: full, tied narrow, tied Bloom) and the epochs are capped.
GRU = dataclasses.replace(Config(), model="gru", lrs=(1e-3, 3e-3), max_epochs=15, patience=3)


QUICK = dataclasses.replace(Config(), lrs=(1e-2,), max_epochs=4, patience=2)


# ------------------------------------------------------------------ data


@dataclasses.dataclass
class Part:
    """One evaluation: a history, a target and the ids left out, per user."""

    history: torch.Tensor  # (U, seq_len) ids, -1 padding on the right
    targets: torch.Tensor  # (U,) int64
    exclude: torch.Tensor  # (U, m) ids padded with -1


@dataclasses.dataclass
class Prepared:
    num_items: int
    history: torch.Tensor  # (E, seq_len) training examples' histories
    targets: torch.Tensor  # (E,)
    valid: Part
    test: Part
    describe: dict


def _pad(rows: list, width: int) -> torch.Tensor:
    out = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def prepare(data: datasets.Interactions, seq_len: int) -> Prepared:
    """Leave-last-out by timestamp; training examples are every training event
    after a user's first, with the ``seq_len`` events before it as history."""
    split = datasets.leave_last_out(data)
    tr = split.train
    order = np.lexsort((np.arange(len(tr)), tr.timestamp, tr.user))  # the split's own order, ties by file
    users, items = tr.user[order], tr.item[order]
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    sequences = {int(users[a]): items[a:b] for a, b in zip(bounds[:-1], bounds[1:])}
    hist, targets = [], []
    for seq in sequences.values():
        for t in range(1, len(seq)):
            hist.append(seq[max(0, t - seq_len) : t])
            targets.append(seq[t])
    valid_of = dict(zip(split.valid.user.tolist(), split.valid.item.tolist()))
    test_of = dict(zip(split.test.user.tolist(), split.test.item.tolist()))
    eval_users = sorted(test_of)

    def part(name: str) -> Part:
        seqs = [sequences[u] if name == "valid" else np.r_[sequences[u], valid_of[u]] for u in eval_users]
        target = valid_of if name == "valid" else test_of
        return Part(
            history=_pad([s[-seq_len:] for s in seqs], seq_len),
            targets=torch.tensor([target[u] for u in eval_users], dtype=torch.int64),
            exclude=_pad(seqs, max(len(s) for s in seqs)),
        )

    describe = {
        **data.describe(),
        "train_events": len(tr),
        "train_examples": len(targets),
        "eval_users": len(eval_users),
        "items_in_training": int(len(np.unique(tr.item))),
    }
    return Prepared(
        num_items=data.num_items,
        history=_pad(hist, seq_len),
        targets=torch.tensor(targets, dtype=torch.int64),
        valid=part("valid"),
        test=part("test"),
        describe=describe,
    )


# ---------------------------------------------------------------- models


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pooled(table: nn.Module, history: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` ids, ``-1`` padding, to the ``(B, width)`` mean of their vectors."""
    mask = (history >= 0).unsqueeze(-1)
    vectors = table(history.clamp(min=0)) * mask
    return vectors.sum(1) / mask.sum(1).clamp(min=1)


class Pool(nn.Module):
    """The pooled user (no weights): kept a module so that every model reads
    its user the same way, ``self.user(self.items, history)``."""

    def forward(self, table, history):
        return pooled(table, history)


class GRUUser(nn.Module):
    """The user is the last hidden state of a one-layer GRU over the history.

    Histories stay right-padded (``-1`` after the real ids) and the state is
    read at each row's last real step: the GRU is causal, so the padding
    that follows cannot reach that state, and the result is exactly the GRU
    over the unpadded sequence.  Left padding with a zero vector would not
    be: a zero input still moves a GRU's state through its biases.  Packing
    would be exact too but costs a sort per batch; with ``seq_len`` 10 and
    nearly every training history full, the padded steps computed and
    thrown away are few.  An empty history gets the initial state, zeros."""

    def __init__(self, width: int):
        super().__init__()
        self.gru = nn.GRU(width, width, batch_first=True)

    def forward(self, table, history):
        lengths = (history >= 0).sum(1)
        states, _ = self.gru(table(history.clamp(min=0)))
        last = states[torch.arange(len(history)), (lengths - 1).clamp(min=0)]
        return last * (lengths > 0).unsqueeze(1).to(last.dtype)


def user_model(kind: str, width: int) -> nn.Module:
    if kind == "pool":
        return Pool()
    if kind == "gru":
        return GRUUser(width)
    raise ValueError(f"unknown user model {kind!r}")


class Plain(nn.Module):
    """``nn.Embedding`` input, output ``nn.Linear(width, N, bias=False)``
    (or the input table itself when ``tied``), plus an item bias."""

    def __init__(self, num_items: int, width: int, tied: bool, user: str = "pool"):
        super().__init__()
        self.items = nn.Embedding(num_items, width)
        self.out = None if tied else nn.Linear(width, num_items, bias=False)
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self.user = user_model(user, width)

    def budget_bytes(self) -> int:
        return tensor_bytes(self.items.weight, *([] if self.out is None else [self.out.weight]))

    def hidden(self, history):
        return self.user(self.items, history)

    def item_vectors(self):
        return self.items.weight if self.out is None else self.out.weight

    def logits(self, hidden):
        return hidden @ self.item_vectors().T + self.item_bias

    def loss(self, hidden, targets):
        return F.cross_entropy(self.logits(hidden), targets)

    @torch.no_grad()
    def rank(self, hidden, targets, exclude):
        """Materialised logits, excluded ids at ``-inf``: ``(above, others)``."""
        scores, left_out = self._masked(hidden, targets, exclude)
        return items_above(scores, targets), scores.shape[1] - 1 - left_out.sum(1)

    @torch.no_grad()
    def topk(self, hidden, k, exclude):
        scores, _ = self._masked(hidden, None, exclude)
        return scores.topk(k, dim=1).indices

    def _masked(self, hidden, targets, exclude):
        """The logits with the excluded ids (never a row's target) at ``-inf``."""
        scores = self.logits(hidden)
        left_out = torch.zeros(scores.shape, dtype=torch.bool)
        rows = torch.arange(len(exclude)).unsqueeze(1).expand_as(exclude)
        present = exclude >= 0
        left_out[rows[present], exclude[present]] = True
        if targets is not None:
            left_out[torch.arange(len(targets)), targets] = False
        return scores.masked_fill(left_out, float("-inf")), left_out


class FactorisedTable(nn.Module):
    """A private ``r``-dim code per item times a shared ``(r, width)``
    projection: a width-``width`` table whose bytes are mostly ``N * r``."""

    def __init__(self, num_items: int, rank: int, width: int):
        super().__init__()
        self.code = nn.Embedding(num_items, rank)
        self.proj = nn.Linear(rank, width, bias=False)

    def forward(self, ids):
        return self.proj(self.code(ids))

    def full(self):
        return self.proj(self.code.weight)


class Factorised(Plain):
    """The plain way to keep the width while paying for fewer floats per
    item: a ``FactorisedTable`` at both ends, its item vectors materialised
    for the logits (``hidden @ (code @ proj)^T + bias``)."""

    def __init__(self, num_items: int, rank: int, width: int, user: str = "pool"):
        nn.Module.__init__(self)
        self.items = FactorisedTable(num_items, rank, width)
        self.out = None
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self.user = user_model(user, width)

    def budget_bytes(self) -> int:
        return tensor_bytes(self.items.code.weight, self.items.proj.weight)

    def item_vectors(self):
        return self.items.full()


class TiedBloom(nn.Module):
    """One ``BloomEmbedding`` at both ends, plus an item bias."""

    def __init__(self, num_items: int, dim: int, rows: int, k: int, user: str = "pool"):
        super().__init__()
        self.items = BloomEmbedding(num_items, dim, num_rows=rows, num_hash_functions=k, padding_idx=None)
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self.user = user_model(user, dim)

    def budget_bytes(self) -> int:
        return embedding_bytes(self.items)

    def hidden(self, history):
        return self.user(self.items, history)

    def loss(self, hidden, targets):
        return bloom_cross_entropy(hidden, targets, self.items, bias=self.item_bias)

    @torch.no_grad()
    def rank(self, hidden, targets, exclude):
        return tuple(bloom_rank(hidden, targets, self.items, exclude=exclude, bias=self.item_bias))

    @torch.no_grad()
    def topk(self, hidden, k, exclude):
        return self.items.topk(hidden, k, exclude=exclude, bias=self.item_bias).ids


class BloomOut(nn.Module):
    """A ``BloomEmbedding`` input and the paper's ``BloomOutputLayer``."""

    def __init__(self, num_items: int, dim: int, input_rows: int, output_rows: int, k: int, user: str = "pool"):
        super().__init__()
        self.items = BloomEmbedding(num_items, dim, num_rows=input_rows, num_hash_functions=k, padding_idx=None)
        self.out = BloomOutputLayer(dim, num_items, num_hash_functions=k, num_rows=output_rows)
        self.user = user_model(user, dim)

    def budget_bytes(self) -> int:
        return embedding_bytes(self.items) + tensor_bytes(*self.out.parameters())

    def hidden(self, history):
        return self.user(self.items, history)

    def loss(self, hidden, targets):
        return self.out.loss(hidden, targets)

    @torch.no_grad()
    def rank(self, hidden, targets, exclude):
        return tuple(self.out.rank(hidden, targets, exclude=exclude))

    @torch.no_grad()
    def topk(self, hidden, k, exclude):
        return self.out.topk(hidden, k, exclude=exclude).ids


def network_bytes(model: nn.Module) -> int:
    """The user model's own weights (the GRU's), outside the table budget."""
    return tensor_bytes(*model.user.parameters())


def reinit(model: nn.Module, std: float) -> None:
    """Every table and output weight element from normal(0, std), every bias
    from 0: the same scale for every model, whatever torch's per-module
    defaults.  The GRU keeps torch's own init (uniform(+-1/sqrt(width)) at
    its width, drawn when built from the seed): that is what a user of
    ``nn.GRU`` gets, and normal(0, 1/64) recurrent weights would start it
    with a state stuck near zero.  A factorised table's projection starts
    at normal(0, 1/sqrt(r)), so that its item vectors (code @ proj) have
    elements of scale ``std`` like every other model's."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("user."):
                continue
            if name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0, std)
        if isinstance(model.items, FactorisedTable):
            model.items.proj.weight.normal_(0, model.items.proj.in_features**-0.5)


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    family: str  # full | reduced | factorised | tied_bloom | bloom_output
    tied: bool = False
    k: int = 0


def specs(ks=Config.ks, model: str = "pool") -> list:
    """The full model first (the reference), then the baselines and the
    Bloom models, each Bloom model once per ``k``.  With the GRU, the
    untied narrow model (the weaker narrow baseline of the pooled study, at
    width 12) gives way to the factorised table, the baseline that keeps
    the width."""
    narrow = (
        [Spec("reduced width, tied", "reduced", tied=True), Spec("reduced width, untied", "reduced")]
        if model == "pool"
        else [Spec("reduced width, tied", "reduced", tied=True), Spec("factorised, tied", "factorised", tied=True)]
    )
    return [
        Spec("full (untied)", "full"),
        *narrow,
        *(Spec(f"tied Bloom k={k}", "tied_bloom", tied=True, k=k) for k in ks),
        *(Spec(f"Bloom output layer k={k}", "bloom_output", k=k) for k in ks),
    ]


def full_bytes(num_items: int, dim: int) -> int:
    """Input table + output weight of the full model, measured on it."""
    return Plain(num_items, dim, tied=False).budget_bytes()


def build(spec: Spec, num_items: int, cfg: Config, budget: Optional[int]) -> tuple[nn.Module, dict]:
    """The model of ``spec`` sized to ``budget`` bytes; ``(model, details)``."""
    row = cfg.dim * 4  # one float32 row of a dim-wide table
    user = cfg.model
    if spec.family == "full":
        return Plain(num_items, cfg.dim, tied=False, user=user), {"width": cfg.dim}
    if spec.family == "reduced":
        tables = 1 if spec.tied else 2
        width = budget // (tables * num_items * 4)
        if width < 1:
            raise ValueError(f"budget {budget} leaves no room for a 1-wide {'tied' if spec.tied else 'untied'} table")
        return Plain(num_items, width, tied=spec.tied, user=user), {"width": width}
    if spec.family == "factorised":
        rank = budget // ((num_items + cfg.dim) * 4)  # N codes and r rows of the projection
        if rank < 1:
            raise ValueError(f"budget {budget} leaves no room for a rank-1 factorised table")
        return Factorised(num_items, rank, cfg.dim, user=user), {"width": cfg.dim, "rank": rank}
    if spec.family == "tied_bloom":
        rows = budget // row
        return TiedBloom(num_items, cfg.dim, rows, spec.k, user=user), {"width": cfg.dim, "rows": rows, "k": spec.k}
    if spec.family == "bloom_output":
        input_rows = int(cfg.input_share * budget) // row
        # A unit costs its projection row and its bias.
        output_rows = (budget - input_rows * row) // ((cfg.dim + 1) * 4)
        model = BloomOut(num_items, cfg.dim, input_rows, output_rows, spec.k, user=user)
        return model, {"width": cfg.dim, "input_rows": input_rows, "output_units": output_rows, "k": spec.k}
    raise ValueError(f"unknown family {spec.family!r}")


# -------------------------------------------------------------- training


@torch.no_grad()
def evaluate(model, part: Part) -> dict:
    model.eval()
    hidden = model.hidden(part.history)
    above, others = model.rank(hidden, part.targets, part.exclude)
    metrics = {name: float(v.mean()) for name, v in ranking_metrics(above.double(), others, k=TOP).items()}
    top = model.topk(hidden, TOP, part.exclude)
    metrics[f"hr@{TOP}_topk"] = float((top == part.targets[:, None]).any(1).double().mean())
    model.train()
    return metrics


def train_epoch(model, opt, prep: Prepared, batch_size: int, gen: torch.Generator) -> float:
    order = torch.randperm(len(prep.targets), generator=gen)
    total = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        loss = model.loss(model.hidden(prep.history[idx]), prep.targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(order)


def fit(spec: Spec, prep: Prepared, cfg: Config, budget: Optional[int], seed: int, log) -> dict:
    """Every learning rate of the grid from the same initial model, early
    stopping on validation MRR; test metrics of the best (lr, epoch)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model, details = build(spec, prep.num_items, cfg, budget)
    size = model.budget_bytes()
    if budget is not None and size > budget:
        raise AssertionError(f"{spec.name}: {size} bytes, over the budget of {budget}")
    reinit(model, 1.0 / cfg.dim)
    initial = copy.deepcopy(model.state_dict())
    best, by_lr = None, {}
    for lr in cfg.lrs:
        model.load_state_dict(initial)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        run_best, run_epoch, run_state, epoch, curve = None, 0, None, 0, []
        for epoch in range(1, cfg.max_epochs + 1):
            loss = train_epoch(model, opt, prep, cfg.batch_size, gen)
            valid = evaluate(model, prep.valid)
            curve.append({"epoch": epoch, "loss": loss, "valid_mrr": valid["mrr"]})
            if run_best is None or valid["mrr"] > run_best["mrr"]:
                run_best, run_epoch, run_state = valid, epoch, copy.deepcopy(model.state_dict())
            elif epoch - run_epoch >= cfg.patience:
                break
        by_lr[str(lr)] = {"valid": run_best, "best_epoch": run_epoch, "epochs_run": epoch, "curve": curve}
        log(
            f"  {spec.name} lr={lr:g}: valid mrr {run_best['mrr']:.4f} at epoch {run_epoch}/{epoch} "
            f"({time.perf_counter() - start:.0f}s)"
        )
        if best is None or run_best["mrr"] > best["valid"]["mrr"]:
            best = {"lr": lr, "valid": run_best, "best_epoch": run_epoch, "epochs_run": epoch, "state": run_state}
    model.load_state_dict(best.pop("state"))
    test = evaluate(model, prep.test)
    return {
        "model": spec.name,
        "family": spec.family,
        "seed": seed,
        "bytes": size,
        "network_bytes": network_bytes(model),
        "details": details,
        **best,
        "test": test,
        "by_lr": by_lr,
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------- run

METRICS = ("mrr", f"hr@{TOP}", f"hr@{TOP}_topk", "auc")


def _mean_std(values: list) -> tuple:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list, reference: float) -> list:
    """One row per model: mean and sample std over seeds, ratios to the full model's mean."""
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == name]
        row = {
            "model": name,
            "family": mine[0]["family"],
            "bytes": mine[0]["bytes"],
            "network_bytes": mine[0].get("network_bytes", 0),
            "bytes_vs_full": mine[0]["bytes"] / reference,
            "details": mine[0]["details"],
            "seeds": len(mine),
            "lr": [r["lr"] for r in mine],
            "best_epoch": [r["best_epoch"] for r in mine],
            "valid_mrr": statistics.mean(r["valid"]["mrr"] for r in mine),
            "seconds": statistics.mean(r["seconds"] for r in mine),
        }
        for m in METRICS:
            row[m], row[m + "_std"] = _mean_std([r["test"][m] for r in mine])
        rows.append(row)
    full = rows[0]
    for row in rows:
        row["vs_full"] = {m: row[m] / full[m] if full[m] else None for m in METRICS}
    return rows


def verdict(runs: list, rows: list) -> list:
    """The strongest plain baseline within the budget and the best variant of
    each Bloom model, each picked on mean validation MRR (never on test), and
    each Bloom pick's test difference to that baseline, paired by seed."""

    def pick(*families):
        pool = [r for r in rows if r["family"] in families]
        return max(pool, key=lambda r: r["valid_mrr"]) if pool else None

    base = pick(*PLAIN_BASELINES)
    out = []
    for family in ("tied_bloom", "bloom_output"):
        bloom = pick(family)
        if base is None or bloom is None:
            continue
        out.append(paired(runs, bloom["model"], base["model"]))
    return out


PLAIN_BASELINES = ("reduced", "factorised")  # the plain models within the budget


def paired(runs: list, bloom: str, base: str) -> dict:
    """Test differences ``bloom - base``, paired by seed."""
    entry = {"baseline": base, "bloom": bloom}
    for m in ("mrr", f"hr@{TOP}"):
        by_seed = {r["seed"]: r["test"][m] for r in runs if r["model"] == base}
        diffs = [r["test"][m] - by_seed[r["seed"]] for r in runs if r["model"] == bloom]
        entry[m + "_diff"], entry[m + "_diff_std"] = _mean_std(diffs)
        entry[m + "_bloom_wins"] = sum(d > 0 for d in diffs)
    entry["seeds"] = len(diffs)
    return entry


def all_pairs(runs: list, rows: list) -> list:
    """Every Bloom model against every plain baseline within the budget: the
    verdict's picks on validation can hide a close second."""
    names = lambda fams: [r["model"] for r in rows if r["family"] in fams]  # noqa: E731
    return [paired(runs, b, p) for b in names(("tied_bloom", "bloom_output")) for p in names(PLAIN_BASELINES)]


def run(data: datasets.Interactions, cfg: Config, log=lambda msg: None, families=None) -> dict:
    start = time.perf_counter()
    prep = prepare(data, cfg.seq_len)
    reference = full_bytes(prep.num_items, cfg.dim)
    budget = int(cfg.budget * reference)
    log(
        f"{data.name}: {prep.describe['train_examples']:,} training examples, {prep.describe['eval_users']} users; "
        f"full model {reference:,} bytes, budget {cfg.budget:g} = {budget:,} bytes"
    )
    runs = []
    for seed in cfg.seeds:
        for spec in specs(cfg.ks, cfg.model):
            if families is not None and spec.family not in families:
                continue
            result = fit(spec, prep, cfg, None if spec.family == "full" else budget, seed, log)
            runs.append(result)
            t = result["test"]
            log(
                f"[seed {seed}] {spec.name}: {result['bytes']:,} bytes ({result['bytes'] / reference:.3f}) "
                f"+ {result['network_bytes']:,} of network, "
                f"test mrr {t['mrr']:.4f} hr@{TOP} {t[f'hr@{TOP}']:.4f} (top-k {t[f'hr@{TOP}_topk']:.4f}), "
                f"lr {result['lr']:g}, epoch {result['best_epoch']}, {result['seconds']:.0f}s"
            )
    rows = summarise(runs, reference)
    extra = {"pairs": all_pairs(runs, rows)} if cfg.model != "pool" else {}
    return {
        "config": dataclasses.asdict(cfg),
        "data": prep.describe,
        "full_bytes": reference,
        "budget_bytes": budget,
        "runs": runs,
        "rows": rows,
        "verdict": verdict(runs, rows),
        **extra,
        "protocol": protocol(cfg, prep),
        "wall_seconds": time.perf_counter() - start,
    }


def protocol(cfg: Config, prep: Prepared) -> dict:
    out = _pool_protocol(cfg, prep)
    if cfg.model == "gru":
        out["model"] = (
            f"GRU: the user is the last hidden state of a one-layer nn.GRU(width, width) over their last "
            f"{cfg.seq_len} items (right-padded, the state read at the last real step: padding never "
            f"reaches it); width {cfg.dim} for every model but the reduced-width tied table, whose GRU "
            f"has its own width; the factorised table: an r-dim code per item times a shared (r, "
            f"{cfg.dim}) projection, tied at the output through its materialised item vectors"
        )
        out["budget"] += "; the GRU's weights outside it too, listed per model (network bytes)"
        out["training"] = out["training"].replace(
            f"every weight normal(0, 1/{cfg.dim})",
            f"every table / output weight normal(0, 1/{cfg.dim}) (factorised: code normal(0, 1/{cfg.dim}), "
            "projection normal(0, 1/sqrt(r))), the GRU torch's default init",
        )
    return out


def _pool_protocol(cfg: Config, prep: Prepared) -> dict:
    return {
        "model": f"pooling: the user is the mean of the vectors of their last {cfg.seq_len} items; hidden width "
        f"{cfg.dim} (the reduced-width models: their own width)",
        "budget": f"{cfg.budget:g} of the full model's input table + output weight (float32); per-item output biases "
        "outside it, given to every model but the Bloom output layer (no place for one: its per-unit "
        "projection bias is counted in its bytes)",
        "training": f"full softmax cross-entropy (Bloom output layer: its loss over the k hashed units); Adam; "
        f"batch {cfg.batch_size}; lr grid {list(cfg.lrs)}; at most {cfg.max_epochs} epochs, patience "
        f"{cfg.patience} on validation MRR; every weight normal(0, 1/{cfg.dim}), biases 0",
        "evaluation": f"leave-last-out by timestamp (validation: last-but-one item, test: last); full ranking over "
        f"all {prep.num_items:,} items minus the user's earlier items; ties count half; Bloom models "
        f"through bloom_rank / BloomOutputLayer.rank, plain ones through materialised logits and "
        f"items_above; HR@{TOP} also from top-{TOP} (emb.topk / layer.topk / logits.topk)",
        "bloom": f"each Bloom model with k in {list(cfg.ks)} (the same k for both tables of the output-layer model); "
        f"Bloom output layer model: {cfg.input_share:g} of the budget for the input table, the rest for "
        "the output units (fixed beforehand, not tuned)",
        "seeds": f"{list(cfg.seeds)}: each seed its own init and batch order (same data split)",
    }


# --------------------------------------------------------------- reports


def _cell(row, metric) -> str:
    text = f"{row[metric]:.4f}"
    return text + (f" ± {row[metric + '_std']:.4f}" if row["seeds"] > 1 else "")


def write_markdown(path: str, payload: dict) -> None:
    env, cfg, data = payload["environment"], payload["config"], payload["data"]
    gru = cfg.get("model", "pool") == "gru"
    lines = [
        "# Next-item recommendation at equal bytes"
        + (" with a GRU user model of fixed width" if gru else ": tied Bloom and the Bloom output layer"),
        "",
        f"`{payload['command']}` — {env['date']}, {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} "
        f"torch thread), torch {env['torch']}, triton {env['triton']}, Python {env['python']}; "
        f"{payload['wall_seconds'] / 60:.1f} min wall time.",
        "",
        f"Data: {data['name']}: {data['num_users']:,} users, {data['num_items']:,} items "
        f"({data['items_in_training']:,} seen in training), {data['num_interactions']:,} events; "
        f"{data['train_examples']:,} training examples, {data['eval_users']} validation and test users.",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in payload["protocol"].items()]
    lines += [
        "",
        f"Full model: {payload['full_bytes']:,} bytes of tables; budget {cfg['budget']:g} = "
        f"{payload['budget_bytes']:,} bytes. Valid MRR: the selection metric (mean over seeds); the other "
        "metrics are on the test users"
        + (f", mean ± sample std over {len(cfg['seeds'])} seeds" if len(cfg["seeds"]) > 1 else ", one seed")
        + "; '/ full': over the full model's.",
        "",
    ]
    body = []
    for r in payload["rows"]:
        det = ", ".join(f"{k}={v}" for k, v in r["details"].items())
        net = [f"{r['network_bytes']:,}"] if gru else []
        body.append(
            [
                r["model"],
                det,
                f"{r['bytes']:,}",
                f"{r['bytes_vs_full']:.3f}",
                *net,
                f"{r['valid_mrr']:.4f}",
                _cell(r, "mrr"),
                _cell(r, f"hr@{TOP}"),
                f"{r['vs_full']['mrr']:.3f}",
                f"{r['vs_full'][f'hr@{TOP}']:.3f}",
                _cell(r, f"hr@{TOP}_topk"),
                _cell(r, "auc"),
                "/".join(str(e) for e in r["best_epoch"]),
                "/".join(f"{lr:g}" for lr in r["lr"]),
                f"{r['seconds']:.0f}",
            ]
        )
    lines.append(
        markdown_table(
            [
                "model",
                "shape",
                "bytes",
                "bytes / full",
                *(["GRU bytes"] if gru else []),
                "valid MRR",
                "MRR",
                f"HR@{TOP}",
                "MRR / full",
                f"HR@{TOP} / full",
                f"HR@{TOP} (top-k)",
                "AUC",
                "best epoch",
                "lr",
                "s",
            ],
            body,
        )
    )
    n = data["eval_users"]
    p = payload["rows"][0][f"hr@{TOP}"]
    lines += [
        "",
        f"Sampling error: a test HR@{TOP} near {p:.2f} on {n} users has a binomial standard error of "
        f"{math.sqrt(p * (1 - p) / n):.3f}; one split of the data. Wall time per model: every learning rate "
        "of the grid, validation included (seconds, mean over seeds).",
    ]
    if payload["verdict"]:
        lines += ["", "Picked on validation MRR (mean over seeds), compared on test, paired by seed:", ""]
        for v in payload["verdict"]:
            spread = lambda m, v=v: f" ± {v[m + '_diff_std']:.4f}" if v["seeds"] > 1 else ""  # noqa: E731
            lines.append(
                f"- {v['bloom']} against {v['baseline']}: test MRR {v['mrr_diff']:+.4f}{spread('mrr')}, "
                f"HR@{TOP} {v[f'hr@{TOP}_diff']:+.4f}{spread(f'hr@{TOP}')} (Bloom ahead in "
                f"{v['mrr_bloom_wins']} of {v['seeds']} seeds on MRR)."
            )
    if payload.get("pairs"):
        lines += [
            "",
            "Every Bloom model against every plain baseline within the budget, test, paired by seed "
            "(Bloom minus baseline):",
            "",
        ]
        body = [
            [
                v["bloom"],
                v["baseline"],
                f"{v['mrr_diff']:+.4f} ± {v['mrr_diff_std']:.4f}",
                f"{v[f'hr@{TOP}_diff']:+.4f} ± {v[f'hr@{TOP}_diff_std']:.4f}",
                f"{v['mrr_bloom_wins']} of {v['seeds']}",
            ]
            for v in payload["pairs"]
        ]
        lines.append(markdown_table(["Bloom", "baseline", "MRR diff", f"HR@{TOP} diff", "Bloom ahead (MRR)"], body))
    if payload.get("notes"):  # written by hand after a run, kept in its JSON
        lines += ["", "## Notes", ""] + [f"- {note}" for note in payload["notes"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"one lr, {QUICK.max_epochs} epochs (about a minute)")
    p.add_argument(
        "--model",
        choices=("pool", "gru"),
        default="pool",
        help="user model: mean of the history (the recorded study) or a GRU of fixed width; "
        "gru brings its own default lr grid and epochs (GRU)",
    )
    p.add_argument(
        "--families",
        nargs="+",
        help="run only these model families (full, reduced, factorised, "
        "tied_bloom, bloom_output); without full, the '/ full' ratios are over the first model run",
    )
    p.add_argument("--patience", type=int, help="epochs without a better validation MRR before stopping")
    p.add_argument("--budget", type=float, default=Config.budget)
    p.add_argument("--dim", type=int, default=Config.dim)
    p.add_argument(
        "--k",
        nargs="+",
        type=int,
        default=list(Config.ks),
        help="hash functions of the Bloom models, one run of each per value",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="run seeds seed..seed+N-1 and report mean and spread")
    p.add_argument("--epochs", type=int, help="most epochs per learning rate")
    p.add_argument("--lrs", nargs="+", type=float, help="learning-rate grid, the same for every model")
    p.add_argument("--dataset", default="ml-100k", help="'ml-100k', 'synthetic' or a u.data / .inter file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--out", required=True, help="JSON path; the .md is written beside it")
    return p.parse_args(argv)


def load(name: str) -> datasets.Interactions:
    if name == "ml-100k":
        return datasets.load_ml100k()  # DatasetUnavailable says how to get it by hand
    if name == "synthetic":
        return datasets.synthetic()
    return datasets.read_interactions(name)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else GRU if args.model == "gru" else Config()
    cfg = dataclasses.replace(
        cfg,
        budget=args.budget,
        dim=args.dim,
        ks=tuple(args.k),
        model=args.model,
        seeds=tuple(range(args.seed, args.seed + args.seeds)),
        max_epochs=args.epochs or cfg.max_epochs,
        lrs=tuple(args.lrs or cfg.lrs),
        patience=args.patience or cfg.patience,
    )
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    payload = {
        "benchmark": "sequence",
        "environment": environment(),
        "command": "python bench/studies/sequence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **run(load(args.dataset), cfg, log, families=args.families),
    }
    write_json(args.out, payload)
    write_markdown(os.path.splitext(args.out)[0] + ".md", payload)
    log(f"wrote {args.out} in {payload['wall_seconds']:.0f}s")
    return payload


if __name__ == "__main__":
    main()
