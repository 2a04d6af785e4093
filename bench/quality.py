"""Accuracy versus compression: what a Bloom table costs a recommender.

Users and items are embedded by a full ``nn.Embedding`` (Spotlight's
``ScaledEmbedding``, the same ``normal(0, 1/dim)`` init as the Bloom table)
or by ``BloomEmbedding`` at several ``compression_ratio`` and ``k``, inside
two standard models trained with the same hyperparameters for every table:

- implicit feedback: BPR matrix factorisation, ``score = <p_u, q_i> + b_i``,
  one uniformly sampled negative item per positive, leave-last-out split by
  timestamp; reports MRR, AUC and HR@10 by ranking the held-out item against
  every item the user has not interacted with (full ranking, no sampled
  candidates);
- explicit ratings: ``r = mu + b_u + b_i + <p_u, q_i>`` with squared loss on a
  random 80/10/10 split; reports RMSE (predictions clipped to the rating
  range).

Biases are full-size tables in every model (one float per id) and are counted
in ``total_params``; ``embedding_params`` counts the user and item tables the
compression applies to.  A biases-only model (no tables) shows what the
embeddings add at all.  Each model trains with Adam and stops early on the
validation metric (AUC, resp. RMSE); test numbers are those of the best
validation epoch.  Repeats differ in the seed of initialisation, batch order
and negative samples; the split is fixed, and every table sees the same seeds.

    python bench/quality.py --quick --out bench/results/quality_cpu.json
    python bench/quality.py --dataset ml-100k --dataset synthetic --out results.json
    python bench/quality.py --dataset /path/to/u.data --ratios 0.2 0.1 --ks 4 --out r.json

Writes the JSON, and a markdown summary and a PNG plot beside it.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import data as datasets  # noqa: E402
from bench.common import environment, write_json  # noqa: E402
from triton_bloom import BloomEmbedding, ScaledEmbedding, ZeroEmbedding  # noqa: E402
from triton_bloom.ranking import items_above, ranking_metrics  # noqa: E402

# Bloom-layer variants, added as the module grows options: name -> extra
# BloomEmbedding constructor kwargs.  Each runs on the same (ratio, k) grid as
# plain Bloom (a variant that fixes num_hash_functions runs at that k only);
# the headline reports the best variant at ratio 0.2, chosen on validation.
VARIANTS: dict[str, dict] = {
    "signed": {"signed": True},
    "importance": {"importance": True},
    # One row of k importance weights per id (as in hash embeddings): k
    # parameters an id instead of embedding_dim, counted in the sizes.
    "importance per id": {"importance": True, "importance_ratio": 1.0},
    "signed+importance": {"signed": True, "importance": True},
}

FULL_RATIOS = (1.0, 0.5, 0.2, 0.1, 0.05)
FULL_KS = (1, 2, 4, 8)
QUICK_PAIRS = ((1.0, 4), (0.5, 4), (0.2, 2), (0.2, 4), (0.1, 4))
HEADLINE_RATIO = 0.2
HEADLINE_K = 4  # Spotlight's default


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """How users and items are embedded: ``kind`` is ``full``, ``none``
    (biases only), ``bloom`` or a variant's name."""

    kind: str
    ratio: Optional[float] = None
    k: Optional[int] = None
    kwargs: tuple = ()  # the variant's BloomEmbedding kwargs, as sorted items

    @property
    def label(self) -> str:
        if self.kind in ("full", "none"):
            return {"full": "full table", "none": "biases only"}[self.kind]
        return f"{self.kind} r={self.ratio:g} k={self.k}"


@dataclasses.dataclass
class Hyper:
    dim: int = 32
    batch_size: int = 1024
    lr: float = 2e-3
    l2: float = 1e-3  # on the looked-up vectors and biases of each batch
    max_epochs: int = 60
    patience: int = 5


# One setting per task for every table, picked by the full table's validation
# metric (seed 0, ml-100k) in a small sweep: lr in {2e-3, 5e-3, 1e-2}, l2 in
# {0, 1e-5, 1e-4, 1e-3, 1e-2} (implicit) and {1e-3, 1e-2, 5e-2, 2e-1}
# (ratings).  Tuning on the full table favours it, if anything.
HYPER = {
    "implicit": Hyper(lr=2e-3, l2=1e-3),
    "ratings": Hyper(lr=5e-3, l2=5e-2),
}


# ----------------------------------------------------------------- grid


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


def make_table(spec: TableSpec, num: int, dim: int) -> Optional[nn.Module]:
    if spec.kind == "none":
        return None
    if spec.kind == "full":
        return ScaledEmbedding(num, dim)
    # No padding id: every user and item is real, none may be the zero vector.
    kwargs = dict(spec.kwargs)
    if "importance_ratio" in kwargs:
        kwargs["importance_rows"] = max(1, int(kwargs.pop("importance_ratio") * num))
    return BloomEmbedding(num, dim, spec.ratio, spec.k, padding_idx=None, **kwargs)


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
    ):
        super().__init__()
        self.num_items = num_items
        full = spec if spec.kind == "none" else TableSpec("full")
        self.users = make_table(spec if "users" in compress else full, num_users, dim)
        self.items = make_table(spec if "items" in compress else full, num_items, dim)
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

    @torch.no_grad()
    def user_scores(self, users: torch.Tensor) -> torch.Tensor:
        """``(len(users), num_items)`` scores against every item."""
        scores = self.item_bias.weight[:, 0].expand(len(users), -1) + self.mean
        if self.user_bias is not None:
            scores = scores + self.user_bias(users)
        if self.users is not None:
            scores = scores + self.users(users) @ self.items(torch.arange(self.num_items)).T
        return scores.contiguous()


def table_params(module: Optional[nn.Module]) -> tuple[int, int]:
    """Parameters and bytes of a table, buffers (a hash cache) included."""
    if module is None:
        return 0, 0
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in module.parameters()), sum(t.numel() * t.element_size() for t in tensors)


def model_size(model: Factorization) -> dict:
    emb = [table_params(model.users), table_params(model.items)]
    total = sum(p.numel() for p in model.parameters())
    total_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    return {
        "embedding_params": sum(p for p, _ in emb),
        "embedding_bytes": sum(b for _, b in emb),
        "total_params": total,
        "total_bytes": total_bytes,
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
        u = users[idx]
        pos, sq_pos = model.parts(u, items[idx])
        neg, sq_neg = model.parts(u, negatives[idx])
        loss = -F.logsigmoid(pos - neg).mean() + hp.l2 * (sq_pos + sq_neg).mean()
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


def rank_metrics(model, targets: datasets.Interactions, seen: list, chunk: int = 1024) -> dict:
    """MRR, AUC and HR@10 of each target item ranked against every item its
    user has not seen (``seen``: interactions masked out of the ranking).
    Ties count half, so identical vectors (hash collisions at ``k=1``) get
    no credit for ordering (``triton_bloom.ranking``, shared with the demo)."""
    seen_u = np.concatenate([s.user for s in seen])
    seen_i = np.concatenate([s.item for s in seen])
    row_of = np.full(targets.num_users, -1, dtype=np.int64)
    per_user = {"mrr": [], "auc": [], "hr@10": []}
    for start in range(0, len(targets), chunk):
        users = targets.user[start : start + chunk]
        items = torch.from_numpy(targets.item[start : start + chunk])
        rows = torch.arange(len(users))
        scores = model.user_scores(torch.from_numpy(users))
        target = scores[rows, items].clone()
        row_of[users] = np.arange(len(users))
        sel = row_of[seen_u] >= 0
        scores[torch.from_numpy(row_of[seen_u[sel]]), torch.from_numpy(seen_i[sel])] = -float("inf")
        row_of[users] = -1
        scores[rows, items] = target  # a target seen before (repeat event) still competes
        negatives = torch.isfinite(scores).sum(1).double() - 1  # the unmasked items but the target
        for name, values in ranking_metrics(items_above(scores, items), negatives, k=10).items():
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

    def model(self, spec: TableSpec) -> Factorization:
        hp = self.hyper
        train = self.split.train
        ratings = self.name == "ratings"
        mean = float(train.rating.mean()) if ratings else 0.0
        return Factorization(
            spec, train.num_users, train.num_items, hp.dim, user_bias=ratings, mean=mean, compress=self.compress
        )

    def epoch(self, model, opt, rng) -> float:
        fn = rating_epoch if self.name == "ratings" else bpr_epoch
        return fn(model, opt, self.split.train, self.hyper, rng)

    def evaluate(self, model, part: str) -> dict:
        s = self.split
        if self.name == "ratings":
            return rmse(model, getattr(s, part), float(s.train.rating.min()), float(s.train.rating.max()))
        seen = [s.train] if part == "valid" else [s.train, s.valid]
        return rank_metrics(model, getattr(s, part), seen)

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


def fit(task: Task, spec: TableSpec, seed: int) -> dict:
    """Train with early stopping on validation; test the best epoch's weights."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = task.model(spec)
    hp = task.hyper
    opt = torch.optim.Adam(model.parameters(), lr=hp.lr)
    start = time.perf_counter()
    best, best_state, best_epoch, epoch = None, None, 0, 0
    for epoch in range(1, hp.max_epochs + 1):
        model.train()
        task.epoch(model, opt, rng)
        model.eval()
        valid = task.evaluate(model, "valid")
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
        "seconds": time.perf_counter() - start,
        **model_size(model),
    }


# ------------------------------------------------------------ summaries


def _stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarize(runs: list) -> list:
    """One row per (dataset, task, table): mean and sample std over repeats,
    and the share of the full table's mean metric kept."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["task"], r["label"]), []).append(r)
    rows = []
    for (dataset, task, label), group in groups.items():
        first = group[0]
        row = {k: first[k] for k in ("dataset", "task", "label", "kind", "ratio", "k", "variant_kwargs")}
        row.update({k: first[k] for k in ("embedding_params", "embedding_bytes", "total_params", "total_bytes")})
        for part in ("test", "valid"):
            row[part] = {m: _stats([g[part][m] for g in group]) for m in first[part]}
        row["best_epoch"] = _stats([g["best_epoch"] for g in group])
        row["seconds"] = _stats([g["seconds"] for g in group])
        rows.append(row)
    for row in rows:
        full = next(r for r in rows if (r["dataset"], r["task"], r["kind"]) == (row["dataset"], row["task"], "full"))
        row["kept_vs_full"] = {m: row["test"][m]["mean"] / full["test"][m]["mean"] for m in row["test"]}
        row["embedding_params_vs_full"] = row["embedding_params"] / full["embedding_params"]
    return rows


def _best(rows, kinds, select, higher) -> Optional[dict]:
    """The row of ``kinds`` at the headline ratio with the best validation
    ``select``: choosing k or a variant on test would flatter it."""
    pool = [r for r in rows if r["kind"] in kinds and r["ratio"] == HEADLINE_RATIO]
    if not pool:
        return None
    key = (lambda r: r["valid"][select]["mean"]) if higher else (lambda r: -r["valid"][select]["mean"])
    return max(pool, key=key)


def headline(rows: list, tasks: dict) -> dict:
    """Per dataset and task: the full table against plain Bloom at ratio 0.2
    (k=4, and the k validation prefers) and the best variant there, with the
    biases-only model as the floor any table should beat."""
    out = {}
    for (dataset, task) in dict.fromkeys((r["dataset"], r["task"]) for r in rows):
        sub = [r for r in rows if (r["dataset"], r["task"]) == (dataset, task)]
        select, higher = tasks[task]
        picks = {
            "biases_only": next((r for r in sub if r["kind"] == "none"), None),  # what no table at all keeps
            "full": next(r for r in sub if r["kind"] == "full"),
            f"bloom_r{HEADLINE_RATIO:g}_k{HEADLINE_K}": next(
                (r for r in sub if r["kind"] == "bloom" and r["ratio"] == HEADLINE_RATIO and r["k"] == HEADLINE_K), None
            ),
            f"bloom_r{HEADLINE_RATIO:g}_best_k": _best(sub, {"bloom"}, select, higher),
            f"variant_r{HEADLINE_RATIO:g}_best": _best(sub, set(VARIANTS), select, higher),
        }
        out.setdefault(dataset, {})[task] = {
            name: {"label": r["label"], "test": r["test"], "kept_vs_full": r["kept_vs_full"],
                   "embedding_params": r["embedding_params"]}
            for name, r in picks.items() if r is not None
        }  # fmt: skip
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
    p.add_argument("--quick", action="store_true", help=f"ml-100k only, tables {QUICK_PAIRS} (ratio, k), 3 repeats")
    p.add_argument("--dataset", action="append", help="ml-100k, synthetic or a u.data/.inter path (repeatable); "
                   "default ml-100k and synthetic, ml-100k with --quick")  # fmt: skip
    p.add_argument("--tasks", nargs="+", default=["implicit", "ratings"], choices=["implicit", "ratings"])
    p.add_argument("--compress", nargs="+", default=["users", "items"], choices=["users", "items"],
                   help="which tables the compressed specs replace; the others stay full (default both)")  # fmt: skip
    p.add_argument("--ratios", nargs="+", type=float, help=f"default {FULL_RATIOS}")
    p.add_argument("--ks", nargs="+", type=int, help=f"default {FULL_KS}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="repeat r uses seed + r")
    p.add_argument("--dim", type=int, help=f"embedding size (default {Hyper.dim})")
    p.add_argument("--epochs", type=int, help=f"most epochs, early stopping on validation (default {Hyper.max_epochs})")
    p.add_argument("--patience", type=int, help=f"epochs without validation gain to stop (default {Hyper.patience})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible, shares the machine)")
    p.add_argument("--cache-dir", help=f"where ml-100k is kept (default {datasets.default_cache_dir()})")
    p.add_argument("--out", required=True, help="JSON path; the .md and .png are written beside it")
    return p.parse_args(argv)


def grid_pairs(args) -> list:
    if args.ratios is None and args.ks is None and args.quick:
        return list(QUICK_PAIRS)
    return list(itertools.product(args.ratios or FULL_RATIOS, args.ks or FULL_KS))


def run_all(args, hyper: dict) -> tuple[list, dict]:
    names = args.dataset or (["ml-100k"] if args.quick else ["ml-100k", "synthetic"])
    pairs = grid_pairs(args)
    # --quick runs the variants at the headline (ratio, k) only, to stay within minutes.
    variant_pairs = [(HEADLINE_RATIO, HEADLINE_K)] if args.quick else None
    specs = table_grid(pairs, VARIANTS, variant_pairs)
    runs, described = [], {}
    for name in names:
        data = load_dataset(name, args.cache_dir)
        described[data.name] = {**data.describe(), "splits": {}}
        for task in make_tasks(data, args.tasks, hyper, tuple(args.compress)):
            described[data.name]["splits"][task.name] = task.split.sizes()
            for spec, repeat in itertools.product(specs, range(args.repeats)):
                seed = args.seed + repeat
                result = fit(task, spec, seed)
                runs.append({"dataset": data.name, "task": task.name, "label": spec.label, "kind": spec.kind,
                             "ratio": spec.ratio, "k": spec.k, "variant_kwargs": dict(spec.kwargs),
                             "repeat": repeat, "seed": seed, **result})  # fmt: skip
                shown = ", ".join(f"{m}={v:.4f}" for m, v in result["test"].items())
                note = f"(epoch {result['best_epoch']}, {result['seconds']:.1f}s)"
                print(f"{data.name} {task.name} {spec.label} #{repeat}: {shown} {note}", file=sys.stderr, flush=True)
    return runs, described


def main(argv=None):
    args = parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:  # fail before training, not after
        raise SystemExit("bench/quality.py plots with matplotlib: pip install matplotlib")
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in dict(dim=args.dim, max_epochs=args.epochs, patience=args.patience).items() if v}
    hyper = {task: dataclasses.replace(hp, **overrides) for task, hp in HYPER.items()}
    start = time.perf_counter()
    runs, described = run_all(args, hyper)
    rows = summarize(runs)
    payload = {
        "benchmark": "quality",
        "environment": environment(),
        "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_seconds": time.perf_counter() - start,
        "protocol": {
            "implicit": "BPR-MF (score <p_u,q_i> + b_i), 1 uniform negative per positive; leave-last-out by "
                        "timestamp (ties: file order), second-last is validation; metrics rank the held-out item "
                        "against all items the user has not interacted with (full ranking), ties count half",
            "ratings": "MF with global mean and user/item biases, MSE loss; random 80/10/10 split (seed 0); "
                       "RMSE of predictions clipped to the training rating range",
            "selection": "early stopping on validation (implicit: AUC, ratings: RMSE); test metrics at the "
                         "best validation epoch; best k / variant chosen on validation means",
            "tuning": "one setting per task for all tables, picked on the full table's validation metric "
                      "(seed 0, ml-100k) from lr {2e-3, 5e-3, 1e-2} x l2 {0..1e-2} (implicit), {1e-3..2e-1} (ratings)",
            "tables": "full = ScaledEmbedding (nn.Embedding, normal(0, 1/dim) init); bloom = BloomEmbedding("
                      "padding_idx=None, backend='auto'); "
                      f"compressed: {' and '.join(args.compress)} (the other table, if any, stays full); "
                      "biases full-size",
            "spread": "mean and sample std (ddof=1) over repeats with seeds seed..seed+repeats-1",
        },  # fmt: skip
        "hyperparameters": {task: dataclasses.asdict(hp) for task, hp in hyper.items()},
        "repeats": args.repeats,
        "headline_ratio": HEADLINE_RATIO,
        "variants": VARIANTS,
        "datasets": described,
        "headline": headline(rows, {"implicit": ("auc", True), "ratings": ("rmse", False)}),
        "summary": rows,
        "runs": runs,
    }
    write_json(args.out, payload)
    from bench.quality_report import write_markdown, write_plot

    stem = os.path.splitext(args.out)[0]
    write_markdown(stem + ".md", payload)
    write_plot(stem + ".png", payload)
    print(f"wrote {args.out}, {stem}.md, {stem}.png in {payload['wall_seconds']:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
