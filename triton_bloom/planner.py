"""The budget planner: from id frequencies and a byte budget, the layout of
an embedding table, and a sentence saying what to build.

Two regimes (``/work/shared/DESIGN.md``, "Accuracy at equal bytes"):

- **closed ids** (``0..n-1``, ``counts`` indexed by id): every id can have
  a private code, and when the model's width is free a plain table of a
  smaller ``embedding_dim`` is an option.  The quality study
  (``bench/results/quality_cpu.md``: ml-100k and 10k-item synthetic data)
  found that plain smaller table ahead of every Bloom layout on AUC at
  equal bytes, so with ``width="free"`` it is the plan whenever it has at
  least one dimension: ``nn.Embedding(n, d')``.  (The quick closed demo,
  ``bench/results/demo_closed_cpu.md``, found it level on AUC and behind
  plain Bloom on HR@10: the rule rests on AUC.)
- **open ids** (``ids=`` the raw ids the counts belong to, any id below
  ``2**63`` at lookup, ``num_embeddings=None``): no per-id code fits, only
  hot rows for the frequent ids (8 B per raw id in the hot set) and shared
  rows for every other id, seen or not.  The plan gives ``OPEN_HOT_SHARE``
  (half) of the budget to hot rows of the most frequent ids counted at
  least twice and the rest to shared rows with ``k`` hashes: the split the
  open-id demo measured ahead of the hashing trick, a vocabulary table of
  the same bytes and plain Bloom, a little ahead of quotient-remainder
  overall, level with it on the head's HR@10 and behind on the head's
  AUC (six held-out seeds,
  ``bench/results/demo_open_cpu.md``; no other layout the library offers
  beat quotient-remainder on the calibration data), where the scoring
  model below would spend nearly all of it on hot rows.  With ``bits=4``
  (the table served in int4 after float32 training, about 6.5 times the
  rows) the same rule had the best mean HR@10 of every layout in the demo
  (``bench/results/demo_open_int4_cpu.md``).

Closed ids are planned by a model of what each id keeps of a
private, full-width row, weighted by how often the id is looked up:

- a **hot** id (a private row of its own) keeps all of it;
- every other id keeps ``v(r) = 1 - exp(-3 r / rank)`` through a private
  ``r``-dimensional code (``private_dim``, closed ids only): most of what a
  row holds lies in its first few dimensions when the interactions have an
  effective rank of ``rank`` (``v(rank) = 0.95``);
- and, of the rest, the share of its ``k`` shared Bloom rows' training
  signal that is its own: ``p / (p + k * T / R)``, where ``p`` is its
  frequency, ``T`` the total frequency of the ids that hash and ``R`` the
  shared rows (each row receives ``k * T / R`` of the others' lookups in
  expectation).

A part that buys nothing is dropped: among the layouts whose score is
within ``SIMPLER_WITHIN`` of the best, the one with the fewest reads per
lookup wins, so shared rows that add less than that give way to a pure
hot (and private) table with a single fallback row (``num_rows=1``,
``k=1``: the out-of-vocabulary row).  The model does not know the data's
true rank, so it cannot promise accuracy: the demo (``python -m
triton_bloom demo``, ``demo --closed``) and the quality studies measure
what a choice is worth.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .modules import BloomEmbedding
from .plain import ScaledEmbedding
from .quantized_ops import check_bits, table_bytes

__all__ = ["Plan", "plan_embedding"]

# Fractions of the budget left after the private part that the hot rows may
# take; the shared Bloom rows get the rest.  A share of 1 is the pure hot
# table: one shared fallback row, k = 1.
HOT_SHARES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.97, 1.0)
# A layout with fewer reads per lookup is taken when its score is within
# this share of the best: the model's differences below it are not resolved
# by any study we ran, and every extra read costs time on every lookup.
SIMPLER_WITHIN = 0.01
CLOSED_EVIDENCE = "bench/results/quality_cpu.md"
# Open ids: the share of the budget the hot rows take.  In the open-id demo
# and the probe of issue 20 (two generators), hot rows at 50% to 75% of the
# budget with a Bloom tail were within noise of each other and ahead of
# plain Bloom and, on the demo's data, of a pure vocabulary table; the
# scoring model (which values a shared row only by an id's own share of its
# signal) would spend nearly everything on hot rows instead.
OPEN_HOT_SHARE = 0.5
OPEN_EVIDENCE = "bench/results/demo_open_cpu.md"
OPEN_QUANTIZED_EVIDENCE = "bench/results/demo_open_int4_cpu.md"


@dataclasses.dataclass
class Plan:
    """A chosen layout, its bytes and its expected collision figures.

    ``kind`` is ``"full"`` (the plain table fits the budget), ``"reduced"``
    (a plain table of ``embedding_dim=reduced_dim``: best for the budget
    when the model lets the width shrink) or ``"bloom"`` (a
    :class:`~triton_bloom.BloomEmbedding`, possibly with hot rows and a
    private code; ``pure_hot`` when its shared part is a single fallback
    row).  ``num_embeddings`` is ``None`` for open ids.  :meth:`build`
    makes the module; ``str(plan)`` is the report, a sentence to act on.
    """

    kind: str
    num_embeddings: Optional[int]
    embedding_dim: int
    bytes: int
    max_bytes: int
    score: float
    num_ids: int = 0
    num_rows: int = 0
    num_hash_functions: int = 0
    private_dim: int = 0
    reduced_dim: int = 0
    hot_ids: Optional[torch.Tensor] = None
    hot_share: float = 0.0
    ids_per_row: float = 0.0
    # k * (share of lookups of the ids that hash) / rows: the row reads per
    # lookup that land on one shared row (above 1 with fewer rows than k).
    tail_share_per_row: float = 0.0
    dtype: torch.dtype = torch.float32
    # Served quantized: the bytes are those of ``quantize(module, bits)``.
    bits: Optional[int] = None
    reason: str = ""
    alternatives: list = dataclasses.field(default_factory=list)

    @property
    def open_ids(self) -> bool:
        return self.num_embeddings is None

    @property
    def num_hot(self) -> int:
        return self.hot_ids.numel() if self.hot_ids is not None else 0

    @property
    def pure_hot(self) -> bool:
        """A Bloom layout whose shared part is one fallback row (no hashing that matters)."""
        return self.kind == "bloom" and self.num_rows == 1 and self.num_hash_functions == 1

    def reads(self) -> int:
        """Table reads per lookup: what a layout costs in time on every id."""
        if self.kind != "bloom":
            return 1
        return (1 if self.pure_hot else self.num_hash_functions) + (1 if self.private_dim else 0)

    def label(self) -> str:
        """A short name for tables: ``"hot 2,807 + 1 row"``, ``"nn.Embedding dim 6"``..."""
        if self.kind == "full":
            return "full table"
        if self.kind == "reduced":
            return f"nn.Embedding dim {self.reduced_dim}"
        parts = [f"hot {self.num_hot:,}"] if self.num_hot else []
        if self.private_dim:
            parts.append(f"private {self.private_dim}")
        if self.pure_hot:
            parts.append("1 row")
        else:
            parts.append(f"Bloom {self.num_rows:,}x{self.num_hash_functions}")
        return " + ".join(parts) + (f" int{self.bits}" if self.bits else "")

    def build(self, **kwargs):
        """The planned module: a :class:`~triton_bloom.BloomEmbedding` (extra
        ``kwargs`` go to it: ``padding_idx``, ``backend``, ``sparse``...), or
        for ``"full"``/``"reduced"`` a :class:`~triton_bloom.ScaledEmbedding`
        (``sparse`` is passed on, other Bloom options are dropped).  With
        ``bits``, the float module to train: ``triton_bloom.quantize(module,
        bits=plan.bits)`` then serves it in ``plan.bytes``."""
        device = kwargs.pop("device", None)
        if self.kind in ("full", "reduced"):
            width = self.embedding_dim if self.kind == "full" else self.reduced_dim
            sparse = bool(kwargs.get("sparse", False))
            return ScaledEmbedding(self.num_embeddings, width, sparse=sparse, device=device, dtype=self.dtype)
        kwargs.setdefault("padding_idx", None)
        module = BloomEmbedding(
            self.num_embeddings,
            self.embedding_dim,
            num_rows=self.num_rows,
            num_hash_functions=self.num_hash_functions,
            hot_ids=self.hot_ids,
            private_dim=self.private_dim,
            device=device,
            dtype=self.dtype,
            **kwargs,
        )
        module.plan = self
        return module

    def code(self) -> str:
        """The constructor call that builds this plan (``plan.build()`` does it for you)."""
        if self.kind == "full":
            return f"nn.Embedding({self.num_embeddings}, {self.embedding_dim})"
        if self.kind == "reduced":
            return f"nn.Embedding({self.num_embeddings}, {self.reduced_dim})"
        args = [
            "None" if self.open_ids else str(self.num_embeddings),
            str(self.embedding_dim),
            f"num_rows={self.num_rows}",
            f"num_hash_functions={self.num_hash_functions}",
        ]
        if self.num_hot:
            args.append("hot_ids=plan.hot_ids")
        if self.private_dim:
            args.append(f"private_dim={self.private_dim}")
        code = f"BloomEmbedding({', '.join(args)}, padding_idx=None)"
        return f"quantize({code}, bits={self.bits})" if self.bits else code

    def __str__(self) -> str:
        e = _element_size(self.dtype)
        what = "open ids (any id below 2**63)" if self.open_ids else f"{self.num_embeddings:,} ids"
        counted = f", {self.num_ids:,} of them counted" if self.open_ids else ""
        head = f"Plan for {what}{counted} x {self.embedding_dim} dims within {self.max_bytes:,} B"
        if not self.open_ids:
            full = self.num_embeddings * self.embedding_dim * e
            head += f" ({self.max_bytes / full:.3f} of the full table's {full:,} B)"
        lines = [head + ":"]
        if self.kind == "full":
            lines.append(f"  use {self.code()}: the full table fits the budget (no hashing, no collisions).")
        elif self.kind == "reduced":
            lines.append(
                f"  use {self.code()} ({self.bytes:,} B): a plain table of {self.reduced_dim} dims instead of "
                f"{self.embedding_dim}.  {self.reason}"
            )
        else:
            parts = []
            if self.num_hot:
                parts.append(
                    f"a private row for each of the {self.num_hot:,} most frequent ids "
                    f"({self.hot_share:.1%} of the lookups)"
                )
            if self.private_dim:
                parts.append(f"a private {self.private_dim}-dim code for every id")
            if self.pure_hot:
                parts.append("one shared row for every other id" + (", unseen ones included" if self.open_ids else ""))
            else:
                parts.append(
                    f"{self.num_rows:,} shared rows that every other id hashes to with k={self.num_hash_functions} "
                    f"({self.ids_per_row:,.1f} counted ids per row)"
                )
            lines.append(f"  use {self.code()} ({self.bytes:,} B): " + ", ".join(parts) + ".")
            if self.bits:
                trained = _element_size(self.dtype) * self.embedding_dim * (self.num_rows + self.num_hot)
                lines.append(
                    f"  int{self.bits} rows, quantized after training: the float table trains at "
                    f"{trained + self.num_hot * 8:,} B (optimizer state apart) and is served in {self.bytes:,} B."
                )
            if self.reason:
                lines.append(f"  {self.reason}")
            lines.append(
                "  plan.build() makes it"
                + (f"; triton_bloom.quantize(module, bits={self.bits}) serves it." if self.bits else ".")
            )
        lines.append(f"  (model score {self.score:.3f}; 1 = every id as good as a private full row)")
        return "\n".join(lines)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _value(dims: int, embedding_dim: int, rank: float) -> float:
    """What ``dims`` private dimensions keep of a full row: saturating at the data's ``rank``."""
    if dims >= embedding_dim:
        return 1.0
    return 1.0 - math.exp(-3.0 * dims / rank)


def _check_ids(ids, counts) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() != counts.numel():
        raise ValueError(
            f"ids must be a 1-D tensor with one raw id per count ({counts.numel()}), got {getattr(ids, 'shape', ids)}"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be integer raw ids, got dtype {ids.dtype}")
    ids = ids.to(torch.int64).cpu()
    if bool((ids < 0).any()):
        raise ValueError(f"ids must be non-negative (below 2**63), got {int(ids.min())}")
    unique = torch.unique(ids)
    if unique.numel() != ids.numel():
        raise ValueError("ids must be distinct: sum the counts of a repeated id first")
    return ids


def plan_embedding(
    counts: torch.Tensor,
    embedding_dim: int,
    max_bytes: int,
    *,
    ids: Optional[torch.Tensor] = None,
    num_hash_functions: int = 2,
    width: str = "fixed",
    rank: float = 8.0,
    dtype: torch.dtype = torch.float32,
    bits: Optional[int] = None,
) -> Plan:
    r"""Plan an embedding table within ``max_bytes``.

    Args:
        counts (Tensor): ``(n,)`` lookups (or training events) per id: for
            closed ids, indexed by id, e.g. ``torch.bincount(train_ids,
            minlength=n)``; with ``ids``, the count of ``ids[i]``, e.g.
            ``ids, counts = torch.unique(train_ids, return_counts=True)`` (in a
            stream, the counts of a recent window or a heavy-hitters sketch).
        embedding_dim (int): the width the model needs.
        max_bytes (int): the budget for everything the layer stores
            (:func:`~triton_bloom.embedding_bytes` of the built module).
        ids (Tensor, optional): distinct raw ids below ``2**63`` for open ids
            (``num_embeddings=None``): any id may be looked up, counted or
            not.  Default: ``None``, closed ids ``0..n-1``.
        num_hash_functions (int): ``k`` of the shared rows. Default: 2.
        width (str): ``"fixed"`` (the model needs ``embedding_dim``, as a
            transformer's width or a tied output layer) or ``"free"`` (a
            smaller ``embedding_dim`` is an option too; closed ids only).
        rank (float): the interactions' effective rank, for the scoring
            model: how many private dimensions keep 95% of a full row.
            Default: 8.
        dtype (torch.dtype): of the table.
        bits (int, optional): plan for serving the table quantized to
            int8 or int4 rows (:func:`~triton_bloom.quantize`, after
            training in ``dtype``): ``max_bytes`` holds the quantized table
            (a row's codes and scale byte, the table's scale grid and
            column offsets, the hot-id index), so it buys about
            ``32 / bits`` times the rows; the float table trained before
            quantization is that much larger.  Bloom layouts only, without
            a private code.  Default: ``None``, served as trained.

    Returns:
        :class:`Plan`; ``plan.build()`` gives the module, ``print(plan)``
        the report.

    Examples::

        >>> counts = torch.randint(0, 100, (10_000,)) ** 2
        >>> plan = plan_embedding(counts, 32, max_bytes=10_000 * 32 * 4 // 5)
        >>> module = plan.build()
        >>> embedding_bytes(module) <= plan.max_bytes
        True
        >>> raw, counts = torch.unique(torch.randint(0, 2**62, (1000,)) % 997 * 2**40, return_counts=True)
        >>> plan_embedding(counts, 16, max_bytes=20_000, ids=raw).num_embeddings is None
        True
    """
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.numel() < 2:
        raise ValueError(f"counts must be a 1-D tensor of per-id frequencies, got {getattr(counts, 'shape', counts)}")
    if counts.is_complex() or bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    if width not in ("fixed", "free"):
        raise ValueError(f"width must be 'fixed' or 'free', got {width!r}")
    if not rank > 0:
        raise ValueError(f"rank must be positive, got {rank!r}")
    open_ids = ids is not None
    if open_ids:
        ids = _check_ids(ids, counts)
    n, d, e = counts.numel(), int(embedding_dim), _element_size(dtype)
    if bits is not None:
        check_bits(bits)
        if width != "fixed":
            raise ValueError(
                f"bits={bits} plans a Bloom table for triton_bloom.quantize, which takes no plain table: "
                f"use width='fixed', got width={width!r}"
            )
    # A row's bytes, and the bytes a table costs whatever its rows (a
    # quantized table's scale grid and column offsets).
    row = e * d if bits is None else table_bytes(1, d, bits) - table_bytes(0, d, bits)
    fixed = 0 if bits is None else table_bytes(0, d, bits)
    max_bytes = int(max_bytes)
    full_bytes = n * d * e
    common = dict(
        num_embeddings=None if open_ids else n, embedding_dim=d, max_bytes=max_bytes, dtype=dtype, num_ids=n, bits=bits
    )
    # A plain table cannot be quantized by the library: with bits, every id
    # in a private row is the pure hot layout below.
    if not open_ids and bits is None and max_bytes >= full_bytes:
        return Plan(kind="full", bytes=full_bytes, score=1.0, **common)
    freq = counts.double().cpu()
    total = float(freq.sum())
    p = freq / total if total > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
    order = torch.argsort(p, descending=True, stable=True)
    p_sorted = p[order]
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(p_sorted, 0)])
    # The hot set is a sorted int32 buffer for closed ids that fit, else int64 raw ids.
    index_bytes = 8 if open_ids or n > 2**31 else 4

    if not open_ids and width == "free":
        reduced = max_bytes // (n * e)
        if reduced >= 1:
            return Plan(
                kind="reduced",
                bytes=n * int(reduced) * e,
                reduced_dim=int(reduced),
                score=_value(int(reduced), d, rank),
                reason="With closed ids and a free width, a smaller plain table beat every Bloom layout on AUC at "
                f"equal bytes in the quality study ({CLOSED_EVIDENCE}; ml-100k and 10k-item synthetic data): no "
                "hashing, one read per lookup.",
                **common,
            )

    def candidate(hot, rows, k, r):
        v = _value(r, d, rank)
        tail = p_sorted[hot:]
        tail_mass = float(cumulative[-1] - cumulative[hot])
        load = k * tail_mass / rows
        own = tail / (tail + load) if load > 0 else torch.ones_like(tail)
        hot_index = order[:hot]
        return Plan(
            kind="bloom",
            bytes=(rows + hot) * row + fixed + e * (n * r + r * d) + hot * index_bytes,
            score=float(cumulative[hot]) + float((tail * (v + (1 - v) * own)).sum()),
            num_rows=int(rows),
            num_hash_functions=k,
            private_dim=r,
            hot_ids=(ids[hot_index] if open_ids else hot_index).sort().values if hot else None,
            hot_share=float(cumulative[hot]),
            ids_per_row=k * (n - hot) / rows,
            tail_share_per_row=load,
            **common,
        )

    candidates = []
    private_options = (
        [0] if open_ids or bits is not None else [r for r in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if r < d]
    )
    for r in private_options:
        left = max_bytes - fixed - e * (n * r + r * d)
        if left < row:  # not even one shared row
            continue
        for share in HOT_SHARES:
            if share == 1.0:
                k, hot, rows = 1, min((left - row) // (row + index_bytes), n), 1
            else:
                k = num_hash_functions
                hot = min(int(share * left) // (row + index_bytes), n - 1)
                rows = (left - hot * (row + index_bytes)) // row
            if rows < 1 or (share == 1.0 and hot == 0):
                continue
            candidates.append(candidate(hot, rows, k, r))
    if open_ids and candidates:
        # The measured rule of the open regime (module docstring): half the
        # budget for the most frequent ids, never for ids counted once.
        repeated = int((counts >= 2).sum())
        left = max_bytes - fixed
        hot = min(int(OPEN_HOT_SHARE * left) // (row + index_bytes), repeated)
        rows = (left - hot * (row + index_bytes)) // row
        # A shared part that cannot tell the other counted ids apart (fewer
        # k-row combinations than ids) buys nothing: then a pure hot table.
        if rows > num_hash_functions and math.comb(rows, num_hash_functions) >= n - hot:
            chosen = candidate(hot, rows, num_hash_functions, 0)
            chosen.reason = (
                f"Open ids: {OPEN_HOT_SHARE:.0%} of the budget for private rows of the most frequent ids (ids "
                "counted once get none), the rest for shared rows, so that every other id, new ones included, "
                f"gets a vector of its own {num_hash_functions} rows; in the open-id demo (six held-out seeds), "
                "ahead of the hashing trick, a vocabulary table of the same bytes and plain Bloom on HR@10, a little "
                "ahead of quotient-remainder overall, level with it on the head's HR@10 and behind on the head's AUC "
                f"({OPEN_EVIDENCE})."
            )
            if bits == 4:  # measured at int4 only
                chosen.reason += (
                    f"  Served in int4 after float32 training, the same rule had the best mean HR@10 of every layout "
                    f"at the main job's budget, ahead of quotient-remainder and a vocabulary table served in int4, "
                    f"but behind that vocabulary on the head and in AUC (four seeds, {OPEN_QUANTIZED_EVIDENCE})."
                )
        else:
            hot = min((left - row) // (row + index_bytes), n)
            chosen = candidate(hot, 1, 1, 0) if hot else candidate(0, rows, num_hash_functions, 0)
            if hot:
                chosen.reason = (
                    f"Shared Bloom rows buy nothing at this budget: {rows:,} rows give fewer {num_hash_functions}-row "
                    f"combinations than the {n - hot:,} other counted ids, so every byte goes to hot rows."
                )
        chosen.alternatives = [(c.label(), c.bytes, round(c.score, 4)) for c in candidates][:5]
        return chosen
    if not candidates:
        raise ValueError(
            f"max_bytes={max_bytes} cannot hold even one shared row of {d} dims ({row + fixed} B"
            + (f" at int{bits}, the table's scale grid and column offsets counted)" if bits else ")")
        )
    candidates.sort(key=lambda plan: plan.score, reverse=True)
    top = candidates[0]
    near = [c for c in candidates if c.score >= top.score * (1 - SIMPLER_WITHIN)]
    best = min(near, key=lambda c: (c.reads(), -c.score))
    if best is not top:
        dropped = []
        if top.num_rows > 1 and best.pure_hot:
            dropped.append(f"{top.num_rows:,} shared Bloom rows")
        if top.private_dim and not best.private_dim:
            dropped.append(f"a {top.private_dim}-dim private code")
        if dropped:
            best.reason = (
                f"Left out: {' and '.join(dropped)}, which would add {top.score - best.score:.3f} to the model "
                f"score (under {SIMPLER_WITHIN:.0%}) for {top.reads() - best.reads()} more read(s) per lookup."
            )
    elif best.pure_hot:
        with_rows = next((c for c in candidates if c.kind == "bloom" and not c.pure_hot), None)
        if with_rows is not None:
            best.reason = (
                f"Shared Bloom rows buy less than hot rows at this budget: the best layout with them "
                f"({with_rows.label()}) scores {with_rows.score:.3f}."
            )
    elif best.kind == "bloom" and not best.pure_hot:
        best.reason = (
            f"The shared rows give every other id{', new ones included,' if open_ids else ''} "
            f"a vector of {best.num_hash_functions} rows rather than one fallback row."
        )
    best.alternatives = [(c.label(), c.bytes, round(c.score, 4)) for c in candidates if c is not best][:5]
    return best
