"""Two demos of Bloom embeddings at equal bytes, one per regime.

``triton-bloom demo`` (the default): open ids below one float per distinct
id, the regime Bloom embeddings were made for.  A synthetic event log with
raw 64-bit item ids, a catalogue of millions of items with Zipf popularity,
new items born over time; a two-tower recommender trained in one pass over
the first 70% of the log and tested on the last 20%.  Every layer at one
budget of 2 B per distinct training id, everything counted: a vocabulary
table of the most frequent ids + an out-of-vocabulary row (its id map
counted), the hashing trick, quotient-remainder embeddings, plain Bloom
(k=2, 4), Bloom with hot rows at several shares of the budget, the
planner's choice, and the full table (over budget).  See
triton_bloom/demo_open.py.  Measured times (CPU seconds, and wall
seconds with the load they ran under): bench/results/demo_open_cpu.md.

``triton-bloom demo --closed``: a closed vocabulary (ids 0..n-1) with a
float per id to spare, as in MovieLens: one model trained with full
``nn.Embedding`` / ``nn.EmbeddingBag`` tables, and at each budget (a share
of the full tables' bytes) with a smaller plain table, plain Bloom and the
layout the planner picks (``width="free"``: it says "use nn.Embedding(n,
d')" there), side by side: bytes, memory, time per epoch, accuracy.

Closed demo details.  At each budget: the full table at the largest
``embedding_dim`` that fits (every parameter starting at the full table's
scale, ``normal(0, 1/32)``), plain ``BloomEmbedding`` /
``BloomEmbeddingBag`` at that ``compression_ratio``, and the planner's
layout from the items' training counts; its plan is printed.  Every model
trains with the same settings.

Data: planted, so there is something to find.  Users and items have hidden
rank-16 taste vectors, items have Zipf popularity, user activity is
Pareto-distributed (most users have a handful of interactions, a few have
hundreds), and each user's items are drawn without replacement from
softmax(3 <user, item> / 4 + log popularity).  One interaction per user is
held out for testing.

Model: a two-tower recommender in the style of Spotlight's pooling model
(Bloom embeddings' original setting: sparse item ids in, item ids out).  The
user tower is the mean of the item-embedding-bag vectors of the user's
history; the item tower is an item embedding plus a per-item bias (a full
table, as Spotlight's biases are; 1/dim of an embedding table).  Trained with
BPR, one uniformly sampled negative per interaction, the history being a
sample of the user's other training items.  There is no per-user table, so
the users' number costs no memory.

Metrics: the held-out item is ranked against every item the user has no
training interaction with, an item that scores the same counting as half
above it (hash collisions make exact ties); AUC is the fraction ranked below
it, HR@10 whether it makes the top ten.  The popularity ranking is the
baseline to beat.  For two users, the first Bloom model's top ten items
are printed, as ``BloomEmbedding.topk`` serves them.

Deterministic with --seed on CPU; on CUDA the atomic adds of the backward
reorder float sums, so the last digits may move between runs.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import BloomEmbedding, BloomEmbeddingBag, ZeroEmbedding, embedding_bytes
from .output import bloom_rank
from .planner import plan_embedding
from .ranking import ranking_metrics
from .terminal import console, cpu_model, progress

FULL_SIZE = dict(users=20_000, items=10_000, epochs=15)
QUICK_SIZE = dict(users=5_000, items=2_500, epochs=8)


@dataclass
class Dataset:
    """Training interactions grouped by user (user 0's first, then user 1's,
    ...), and each user's held-out item."""

    num_users: int
    num_items: int
    train_users: torch.Tensor  # (m,) int64, non-decreasing
    train_items: torch.Tensor  # (m,) int64
    test_items: torch.Tensor  # (num_users,)
    train_counts: torch.Tensor  # (num_users,) training interactions of each user, >= 2

    @property
    def num_interactions(self) -> int:
        return self.train_users.numel() + self.test_items.numel()

    @functools.cached_property
    def starts(self) -> torch.Tensor:
        """Where each user's interactions begin in ``train_*``: the offsets of
        the users' history bags."""
        return torch.cumsum(self.train_counts, 0) - self.train_counts

    def to(self, device) -> "Dataset":
        moved = {
            name: getattr(self, name).to(device)
            for name in ("train_users", "train_items", "test_items", "train_counts")
        }
        return Dataset(self.num_users, self.num_items, **moved)


def make_dataset(
    num_users, num_items, mean_interactions=15, rank=16, zipf=1.0, beta=3.0, activity_alpha=1.5, seed=0, chunk=1024
) -> Dataset:
    """Planted-preference interactions, generated on CPU so that one seed
    gives one dataset on every device.

    Sampling without replacement from a softmax is the top-``n`` of the
    logits plus Gumbel noise, so one ``topk`` per chunk of users draws all
    their interactions at once.
    """
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(num_users, rank, generator=g)
    items = torch.randn(num_items, rank, generator=g)
    # Popularity follows a random permutation, so an item's id says nothing
    # about its popularity (ids are not sorted by it in real logs either).
    popularity_rank = torch.randperm(num_items, generator=g).double() + 1
    log_popularity = (-zipf * popularity_rank.log()).float()
    # Pareto activity with the requested mean; at least 3 interactions, so
    # every user keeps 2 for training (one to predict, one as history).
    scale = mean_interactions * (activity_alpha - 1) / activity_alpha
    counts = (scale * torch.rand(num_users, generator=g).pow(-1 / activity_alpha)).long()
    counts = counts.clamp(min=3, max=max(3, num_items // 4))
    # Hold out a uniformly chosen one of each user's items, not the first
    # pick, which would be the easiest to rank.
    held_out = (torch.rand(num_users, generator=g) * counts).long()

    train_users, train_items, test_items = [], [], []
    for start in range(0, num_users, chunk):
        stop = min(start + chunk, num_users)
        logits = beta * users[start:stop] @ items.T / math.sqrt(rank) + log_popularity
        uniform = torch.rand(logits.shape, generator=g).clamp_(min=1e-20)
        most = int(counts[start:stop].max())
        # (users, most) items in order of decreasing perturbed logit
        picks = (logits - torch.log(-torch.log(uniform))).topk(most, dim=1).indices
        position = torch.arange(most).expand(stop - start, most)
        keep = (position < counts[start:stop, None]) & (position != held_out[start:stop, None])
        train_users.append(torch.arange(start, stop)[:, None].expand(stop - start, most)[keep])
        train_items.append(picks[keep])
        test_items.append(picks.gather(1, held_out[start:stop, None]).squeeze(1))
    train_users, train_items, test_items = torch.cat(train_users), torch.cat(train_items), torch.cat(test_items)
    return Dataset(num_users, num_items, train_users, train_items, test_items, counts - 1)


class TwoTower(nn.Module):
    """``score(u, i) = <mean of history(u's items), items(i)> + bias(i)``.

    ``history`` is any ``nn.EmbeddingBag``-like module in mean mode and
    ``items`` any ``nn.Embedding``-like one: swapping them is all it takes to
    go from full tables to Bloom tables.
    """

    def __init__(self, history: nn.Module, items: nn.Module, num_items: int):
        super().__init__()
        self.history = history
        self.items = items
        self.item_bias = ZeroEmbedding(num_items, 1)

    def item_scores(self, user_vectors, item_ids):
        return (user_vectors * self.items(item_ids)).sum(-1) + self.item_bias(item_ids).squeeze(-1)

    def embedding_tables(self):
        return [self.history, self.items]


class MeanPooled(nn.Module):
    """An ``nn.EmbeddingBag(mode="mean")`` made of any ``nn.Embedding``-like
    table (the planner builds embeddings, the history tower pools them)."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    def forward(self, input, offsets=None):
        if offsets is None:
            return self.table(input).mean(-2)
        vectors = self.table(input)
        lengths = torch.diff(offsets, append=offsets.new_tensor([input.numel()]))
        bag = torch.repeat_interleave(torch.arange(offsets.numel(), device=input.device), lengths)
        sums = vectors.new_zeros((offsets.numel(), vectors.shape[-1])).index_add_(0, bag, vectors)
        return sums / lengths.clamp(min=1).to(sums.dtype)[:, None]


def build_model(ratio, num_items, dim, num_hash_functions, device, *, small_dim=None, counts=None) -> TwoTower:
    """Full tables for ``ratio=None`` (of ``small_dim`` when given), else
    Bloom tables ``ratio`` times smaller, planned from ``counts`` when given."""
    if ratio is None:
        width = small_dim or dim
        history, items = nn.EmbeddingBag(num_items, width, mode="mean"), nn.Embedding(num_items, width)
        # Bloom tables start from normal(0, 1/dim), Spotlight's init: so do
        # these, a smaller table included (1/width would start it wider), so
        # that the models differ in layout only.
        for table in (history, items):
            nn.init.normal_(table.weight, 0.0, 1.0 / dim)
    elif counts is not None:
        # The two-tower model lets the width shrink: the planner may answer
        # with a plain smaller table (built at the Bloom tables' init scale).
        budget = int(ratio * num_items * dim * 4)
        plan = plan_embedding(counts, dim, budget, width="free")
        history, items = MeanPooled(plan.build()), plan.build()
        for table in (history.table, items):
            if plan.kind != "bloom":
                nn.init.normal_(table.weight, 0.0, 1.0 / dim)
            table.plan = plan
    else:
        # Ids are 0-based and all real: no padding id.
        common = dict(compression_ratio=ratio, num_hash_functions=num_hash_functions, padding_idx=None)
        history = BloomEmbeddingBag(num_items, dim, mode="mean", **common)
        items = BloomEmbedding(num_items, dim, **common)
    return TwoTower(history, items, num_items).to(device)


def sample_histories(data: Dataset, users, positions, length, generator):
    """``length`` items drawn with replacement from each user's training
    items other than the one at ``positions``, the one being predicted
    (a history that contained its own answer would teach nothing)."""
    others = data.train_counts[users] - 1
    draw = (torch.rand(users.numel(), length, generator=generator, device=users.device) * others[:, None]).long()
    draw += (draw >= positions[:, None]).long()  # skip the target's slot
    return data.train_items[data.starts[users][:, None] + draw]


def train_epoch(model, optimizer, data: Dataset, batch_size, history_length, l2, generator):
    """One pass of BPR over the training interactions; returns the mean loss."""
    device = data.train_users.device
    m = data.train_users.numel()
    position_in_user = torch.arange(m, device=device) - data.starts[data.train_users]
    order = torch.randperm(m, generator=generator, device=device)
    total = torch.zeros((), device=device)
    for start in range(0, m, batch_size):
        batch = order[start : start + batch_size]
        users, positives = data.train_users[batch], data.train_items[batch]
        history = sample_histories(data, users, position_in_user[batch], history_length, generator)
        negatives = torch.randint(0, data.num_items, positives.shape, generator=generator, device=device)
        user_vectors = model.history(history)
        margin = model.item_scores(user_vectors, positives) - model.item_scores(user_vectors, negatives)
        loss = -F.logsigmoid(margin).mean() + l2 * user_vectors.square().sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * batch.numel()
    return float(total) / m


@torch.no_grad()
def user_vectors(model, data: Dataset) -> torch.Tensor:
    """``(num_users, dim)``: each user's vector from the whole training history."""
    return model.history(data.train_items, data.starts)


def seen_items(data: Dataset, first: int, last: int) -> torch.Tensor:
    """``(last - first, m)`` int64: the training items of users
    ``first..last-1``, padded with -1 (``exclude`` of ``bloom_rank`` and
    ``bloom_topk``)."""
    counts = data.train_counts[first:last]
    width = int(counts.max()) if counts.numel() else 0
    column = torch.arange(width, device=counts.device)
    inside = column < counts[:, None]
    where = torch.where(inside, data.starts[first:last, None] + column, 0)
    return torch.where(inside, data.train_items[where], -1)


@torch.no_grad()
def item_ranks(vectors, items: nn.Module, data: Dataset, *, bias=None, chunk=1024) -> torch.Tensor:
    """For each user, how many items score above the held-out one among the
    items the user has no training interaction with, an item scoring the
    same counting half: :func:`~triton_bloom.output.bloom_rank`, which walks
    the catalogue in chunks instead of holding every item's vector.

    Args:
        vectors (Tensor): ``(num_users, dim)``, the users' vectors.
        items (nn.Module): the item table (any embedding-like module).
        data (Dataset): the training items to leave out and the held-out ones.
        bias (Tensor, optional): ``(num_items,)`` added to every item's score.
        chunk (int): users ranked at a time.

    Returns:
        Tensor: ``(num_users,)`` float64, what ``metrics`` takes.
    """
    ranks = []
    for first in range(0, data.num_users, chunk):
        last = min(first + chunk, data.num_users)
        ranked = bloom_rank(
            vectors[first:last], data.test_items[first:last], items, exclude=seen_items(data, first, last), bias=bias
        )
        ranks.append(ranked.above)
    return torch.cat(ranks)


def model_ranks(model, data: Dataset, vectors=None) -> torch.Tensor:
    """``item_ranks`` of a trained :class:`TwoTower` (``vectors``: its
    ``user_vectors``, when already at hand)."""
    vectors = user_vectors(model, data) if vectors is None else vectors
    return item_ranks(vectors, model.items, data, bias=model.item_bias.weight[:, 0])


def top_items_line(model, vectors, data: Dataset, user: int, label: str, k: int = 10) -> str:
    """One line: the ``k`` items ``model`` recommends to ``user`` among those
    the user has not trained on (``model.items.topk``: the catalogue walked
    in chunks, as a serving system would), and where the held-out item is."""
    top = (
        model.items.topk(
            vectors[user : user + 1], k, exclude=seen_items(data, user, user + 1), bias=model.item_bias.weight[:, 0]
        )
        .ids[0]
        .tolist()
    )
    held_out = int(data.test_items[user])
    where = f"at {top.index(held_out) + 1}" if held_out in top else "not among them"
    return (
        f"[bold]{label}[/bold], top {k} for user {user} (its training items left out): "
        + " ".join(map(str, top))
        + f"; held-out item {held_out} {where}."
    )


def metrics(ranks, data: Dataset, k=10):
    """Mean AUC and hit rate at ``k`` of the held-out items, from ``item_ranks``."""
    negatives = data.num_items - 1 - data.train_counts.to(ranks.device)
    per_user = ranking_metrics(ranks, negatives, k)
    return per_user["auc"].mean().item(), per_user[f"hr@{k}"].mean().item()


def popularity_ranks(data: Dataset, seed):
    """Items ranked by training count, ties broken at random: the same list
    for every user, and the baseline a personal model has to beat.  Ranked
    by the models' own code, the score a one-wide item table and every user
    vector 1, so that the baseline is counted exactly as the models are."""
    counts = torch.bincount(data.train_items.cpu(), minlength=data.num_items).double()
    jitter = torch.rand(data.num_items, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    score = (counts + 0.5 * jitter).to(data.train_items.device)
    table = nn.Embedding.from_pretrained(score[:, None])
    return item_ranks(score.new_ones(data.num_users, 1), table, data)


def training_bytes(model, optimizer):
    """Parameter bytes plus the optimizer's state for them: what training
    keeps resident (Adam adds two tensors the size of each parameter)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return params + state


CLOSED_ONLY = ("epochs", "ratios", "users", "items", "interactions_per_user", "dim", "hashes", "history")
CLOSED_ONLY += ("batch_size", "lr", "l2", "device")
CLOSED_DEFAULTS = dict(ratios=[0.2], interactions_per_user=15, dim=32, hashes=4, history=16, batch_size=2048)
CLOSED_DEFAULTS |= dict(lr=0.01, l2=1e-4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--closed",
        action="store_true",
        help="the closed-vocabulary demo (ids 0..n-1, a float per id to spare) instead of the open-id one",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller data (and, open demo, one learning rate): under a minute on 2 CPU cores",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the data, the initialisation and the sampling (default 0)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="S",
        help="open demo: run every data seed and add mean ± std and paired differences over them",
    )
    parser.add_argument("--out", metavar="FILE.json", help="open demo: write every row's numbers and the verdict")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    closed = parser.add_argument_group("closed demo only (--closed)")
    closed.add_argument(
        "--epochs",
        type=int,
        help=f"training epochs per model (default {FULL_SIZE['epochs']}, {QUICK_SIZE['epochs']} with --quick)",
    )
    closed.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        metavar="R",
        help="budgets, as shares of the full tables' bytes, each in (0, 1]; at each, a smaller "
        "full table, Bloom at that compression ratio and the planner's layout (default 0.2)",
    )
    closed.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    closed.add_argument(
        "--users",
        type=int,
        help=f"number of users (default {FULL_SIZE['users']:,}, {QUICK_SIZE['users']:,} with --quick)",
    )
    closed.add_argument(
        "--items",
        type=int,
        help=f"number of items (default {FULL_SIZE['items']:,}, {QUICK_SIZE['items']:,} with --quick)",
    )
    closed.add_argument(
        "--interactions-per-user",
        type=float,
        metavar="N",
        help="mean interactions per user, at least 3 each (default 15)",
    )
    closed.add_argument("--dim", type=int, help="embedding dimension (default 32)")
    closed.add_argument("--hashes", type=int, metavar="K", help="hash functions per id of plain Bloom (default 4)")
    closed.add_argument(
        "--history", type=int, metavar="L", help="history items sampled per training interaction (default 16)"
    )
    closed.add_argument("--batch-size", type=int, help="interactions per step (default 2048)")
    closed.add_argument("--lr", type=float, help="Adam learning rate (default 0.01)")
    closed.add_argument("--l2", type=float, help="L2 weight on the user vectors (default 1e-4)")


def run(args) -> int:
    """``triton-bloom demo``: the open-id demo, or with ``--closed`` the closed one."""
    if args.closed:
        for name, value in CLOSED_DEFAULTS.items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)
        return run_closed(args)
    given = [name for name in CLOSED_ONLY if getattr(args, name, None) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise SystemExit(f"triton-bloom demo: {flags} apply to the closed demo only: add --closed")
    from .demo_open import run_open

    return run_open(args)


def run_closed(args) -> int:
    preset = QUICK_SIZE if args.quick else FULL_SIZE
    num_users = args.users or preset["users"]
    num_items = args.items or preset["items"]
    epochs = args.epochs or preset["epochs"]
    ratios = list(dict.fromkeys(args.ratios))
    if not all(0 < r <= 1 for r in ratios):
        raise SystemExit(f"triton-bloom demo: every ratio must lie in (0, 1], got {ratios}")
    if args.interactions_per_user < 3:
        raise SystemExit("triton-bloom demo: --interactions-per-user must be at least 3")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = console()

    started = time.perf_counter()
    data = make_dataset(num_users, num_items, args.interactions_per_user, seed=args.seed).to(device)
    out.print(
        f"[bold]Data[/bold]: {num_users:,} users x {num_items:,} items, {data.num_interactions:,} "
        "interactions (planted rank-16 tastes, Zipf item popularity, Pareto user activity), one per "
        f"user held out; seed {args.seed}."
    )
    out.print(
        f"[bold]Model[/bold]: two-tower, user = mean of {args.history} history item vectors, item = "
        f"vector + bias; dim {args.dim}, BPR, Adam lr {args.lr}, batch {args.batch_size}, {epochs} epochs, "
        f"on {device_label(device)}."
    )

    counts = torch.bincount(data.train_items.cpu(), minlength=num_items)
    # (label, ratio, smaller dim, planned): the full table, then per budget
    # the smaller full table, plain Bloom and the planner's layout.
    variants = [("nn.Embedding", None, None, False)]
    for r in ratios:
        small = int(r * args.dim)
        if small >= 1:
            variants.append((f"nn.Embedding dim {small}", None, small, False))
        variants += [(f"Bloom {r:g}", r, None, False), (f"planned ≤{r:g}", r, None, True)]
    results, plans, top_lines = [], [], []
    bar = progress(total=len(variants) * epochs, desc="training", unit="epoch")
    try:
        for index, (name, ratio, small, planned) in enumerate(variants):
            if planned:
                plan = plan_embedding(counts, args.dim, int(ratio * num_items * args.dim * 4), width="free")
                plans.append((name, plan))
                twin = next((r for r in results if plan.kind == "reduced" and r["label"] == plan.label()), None)
                if twin is not None:  # the planner chose a row already trained: same layout, same numbers
                    results.append(dict(twin, label=f"{name} = {twin['label']}", ratio=ratio))
                    bar.update(epochs)
                    continue
            torch.manual_seed(args.seed + index)
            model = build_model(
                ratio, num_items, args.dim, args.hashes, device, small_dim=small, counts=counts if planned else None
            )
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            generator = torch.Generator(device=device).manual_seed(args.seed)
            seconds = []
            for epoch in range(epochs):
                bar.set_postfix_str(f"{name}, epoch {epoch + 1}/{epochs}")
                _sync(device)
                tick = time.perf_counter()
                loss = train_epoch(model, optimizer, data, args.batch_size, args.history, args.l2, generator)
                _sync(device)
                seconds.append(time.perf_counter() - tick)
                bar.set_postfix_str(f"{name}, epoch {epoch + 1}/{epochs}, loss {loss:.3f}")
                bar.update(1)
            bar.set_postfix_str(f"{name}: ranking every item")
            vectors = user_vectors(model, data)
            auc, hits = metrics(model_ranks(model, data, vectors), data)
            if not top_lines and ratio is not None and not planned:  # the first plain Bloom model
                top_lines = [top_items_line(model, vectors, data, u, name) for u in range(min(2, num_users))]
            results.append(
                dict(
                    label=name,
                    ratio=ratio if small is None else small / args.dim,
                    bytes=sum(embedding_bytes(t) for t in model.embedding_tables()),
                    mib=training_bytes(model, optimizer) / 2**20,
                    epoch_s=statistics.median(seconds),
                    auc=auc,
                    hits=hits,
                )
            )
            del model, optimizer
    finally:
        bar.close()

    from .demo_report import _table

    full = results[0]
    auc, hits = metrics(popularity_ranks(data, args.seed), data)
    rows = [
        [
            r["label"],
            f"{r['bytes'] / 1024:,.1f}",
            f"{r['bytes'] / full['bytes']:.3f}",
            f"{r['mib']:.2f}",
            f"{r['epoch_s']:.2f}",
            f"{r['auc']:.4f}",
            f"{r['auc'] / full['auc']:.3f}",
            f"{r['hits']:.4f}",
        ]
        for r in results
    ]
    rows.append(["popularity", "-", "-", "-", "-", f"{auc:.4f}", f"{auc / full['auc']:.3f}", f"{hits:.4f}"])
    out.print(
        f"\n{num_users:,} users x {num_items:,} items, dim {args.dim}, k={args.hashes}, {device.type}:",
        markup=False,
    )
    headers = [
        ("", "KiB", "of", "", "s/", "", "AUC /", ""),
        ("model", "(emb.)", "full", "MiB", "epoch", "AUC", "full", "HR@10"),
    ]
    out.print(_table(headers, rows, 26), markup=False)
    out.print(
        "KiB: the two item tables, everything they store (hot-id index, private part included; the item "
        f"bias adds {num_items * 4 / 1024:,.1f} KiB to every model).  MiB: all parameters + Adam state.  "
        "s/epoch: median.  AUC, HR@10: held-out item vs every unseen item; higher is better."
    )
    for name, plan in plans:
        out.print(f"\n{name} (each of the two item tables):\n{plan}", markup=False)
    for line in top_lines:
        out.print(line)
    for ratio in ratios:
        out.print("\n" + closed_verdict(results, ratio), markup=False)
    out.print(f"Done in {time.perf_counter() - started:.0f} s.")
    return 0


def closed_verdict(results, ratio) -> str:
    """The best model within ``ratio`` of the full tables' bytes by AUC and
    by HR@10, its lead over the runner-up, and where plain Bloom stands."""
    full = results[0]
    inside = [r for r in results[1:] if r["bytes"] <= ratio * full["bytes"] * 1.0001 and " = " not in r["label"]]
    if not inside:
        return f"At {ratio:g} of the bytes: no model fits."
    parts = []
    for key, name in (("auc", "AUC"), ("hits", "HR@10")):
        ranked = sorted(inside, key=lambda r: r[key], reverse=True)
        text = f"by {name} {ranked[0]['label']} ({ranked[0][key]:.4f}"
        if len(ranked) > 1:
            text += f", {ranked[0][key] - ranked[1][key]:+.4f} over {ranked[1]['label']}"
        parts.append(text + ")")
    text = f"Verdict at {ratio:g} of the bytes: best " + "; ".join(parts) + "."
    bloom = next((r for r in inside if r["label"] == f"Bloom {ratio:g}"), None)
    small = next((r for r in inside if r["label"].startswith("nn.Embedding dim")), None)
    if bloom is not None and small is not None:
        text += (
            f"  Plain Bloom against the smaller plain table: {bloom['auc'] - small['auc']:+.4f} AUC, "
            f"{bloom['hits'] - small['hits']:+.4f} HR@10, {bloom['epoch_s'] / small['epoch_s']:.1f}x the time per epoch."
        )
    return text


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_label(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
