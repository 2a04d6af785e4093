"""The budget planner: from id frequencies and a byte budget, the layout of
an embedding table.

Candidates are scored by a model of what each id keeps of a private,
full-width row, weighted by how often the id is looked up:

- a **hot** id (a private row of its own) keeps all of it;
- every other id keeps ``v(r) = 1 - exp(-3 r / rank)`` through a private
  ``r``-dimensional code (``private_dim``): most of what a row holds lies in
  its first few dimensions when the interactions have an effective rank of
  ``rank`` (``v(rank) = 0.95``).  The default, 8, fits the quality study:
  on ml-100k a plain table of 6 dimensions keeps 0.93 of the full table's
  gain over biases only, on the study's synthetic data 0.73;
- and, of the rest, the share of its ``k`` shared Bloom rows' training
  signal that is its own: ``p / (p + k * T / R)``, where ``p`` is its
  frequency, ``T`` the total frequency of the ids that hash and ``R`` the
  shared rows (each row receives ``k * T / R`` of the others' lookups in
  expectation).

A reduced-dimension plain table (when the width is free) keeps ``v(d')``
for every id.  The model ranks layouts by where their bytes go (frequent ids
first, a little private capacity for every id, the shared rows last); it
does not know the data's true rank, so it cannot promise accuracy: the
quality study (``bench/studies/quality.py``) measures what the choice is worth.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

__all__ = ["Plan", "plan_embedding"]

# Fractions of the budget left after the private part that the hot rows may
# take; the shared Bloom rows get the rest.
HOT_SHARES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.97)


@dataclasses.dataclass
class Plan:
    """A chosen layout, its bytes and its expected collision figures.

    ``kind`` is ``"full"`` (the plain table fits the budget), ``"reduced"``
    (a plain table of ``embedding_dim=reduced_dim``: best for the budget
    when the model lets the width shrink) or ``"bloom"``.  :meth:`build`
    makes the module; ``str(plan)`` is the report.
    """

    kind: str
    num_embeddings: int
    embedding_dim: int
    bytes: int
    max_bytes: int
    score: float
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
    alternatives: list = dataclasses.field(default_factory=list)

    def build(self, **kwargs):
        """The planned module: a :class:`~triton_bloom.BloomEmbedding` (extra
        ``kwargs`` go to it: ``padding_idx``, ``backend``, ``sparse``...), or
        for ``"full"``/``"reduced"`` a :class:`~triton_bloom.ScaledEmbedding`."""
        from .modules import BloomEmbedding, ScaledEmbedding

        device = kwargs.pop("device", None)
        if self.kind == "full":
            return ScaledEmbedding(self.num_embeddings, self.embedding_dim, device=device, dtype=self.dtype)
        if self.kind == "reduced":
            return ScaledEmbedding(self.num_embeddings, self.reduced_dim, device=device, dtype=self.dtype)
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

    def __str__(self) -> str:
        full = self.num_embeddings * self.embedding_dim * _element_size(self.dtype)
        lines = [
            f"embedding plan for {self.num_embeddings:,} ids x {self.embedding_dim} dims, "
            f"budget {self.max_bytes:,} B ({self.max_bytes / full:.3f} of the full table's {full:,} B)"
        ]
        if self.kind == "full":
            lines.append("  the full table fits the budget: use it (no hashing, no collisions)")
        elif self.kind == "reduced":
            lines.append(
                f"  a plain table at embedding_dim={self.reduced_dim} is the best use of the budget "
                f"({self.bytes:,} B): smaller vectors beat shared rows here"
            )
        else:
            hot = self.hot_ids.numel() if self.hot_ids is not None else 0
            lines += [
                f"  {hot:,} hot ids with private rows, covering {self.hot_share:.1%} of the lookups",
                f"  private code of {self.private_dim} dims per id" if self.private_dim else "  no private code",
                f"  {self.num_rows:,} shared rows, k={self.num_hash_functions}: {self.ids_per_row:.1f} ids "
                f"share each row on average ({self.tail_share_per_row:.3f} of a lookup's "
                f"{self.num_hash_functions} row reads land on each)",
                f"  {self.bytes:,} B in all ({self.bytes / full:.3f} of the full table)",
            ]
        lines.append(f"  model score {self.score:.3f} (1 = every id as good as a private full row)")
        return "\n".join(lines)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _value(dims: int, embedding_dim: int, rank: float) -> float:
    """What ``dims`` private dimensions keep of a full row: saturating at the data's ``rank``."""
    if dims >= embedding_dim:
        return 1.0
    return 1.0 - math.exp(-3.0 * dims / rank)


def _bloom_bytes(n, d, e, rows, hot, r, index_bytes):
    return e * ((rows + hot) * d + n * r + r * d) + hot * index_bytes


def plan_embedding(
    counts: torch.Tensor,
    embedding_dim: int,
    max_bytes: int,
    *,
    num_hash_functions: int = 2,
    width: str = "fixed",
    rank: float = 8.0,
    dtype: torch.dtype = torch.float32,
) -> Plan:
    r"""Plan an embedding table of ``len(counts)`` ids within ``max_bytes``.

    Args:
        counts (Tensor): ``(num_embeddings,)`` lookups (or training events)
            per id, e.g. ``torch.bincount(train_ids, minlength=N)``.
        embedding_dim (int): the width the model needs.
        max_bytes (int): the budget for everything the layer stores
            (:func:`~triton_bloom.embedding_bytes` of the built module).
        num_hash_functions (int): ``k`` of the shared rows. Default: 2.
        width (str): ``"fixed"`` (the model needs ``embedding_dim``, as a
            transformer's width or a tied output layer) or ``"free"`` (a
            smaller ``embedding_dim`` is an option too).
        rank (float): the interactions' effective rank, for the scoring
            model: how many private dimensions keep 95% of a full row.
            Default: 8.
        dtype (torch.dtype): of the table.

    Returns:
        :class:`Plan`; ``plan.build()`` gives the module, ``print(plan)``
        the report.

    Examples::

        >>> counts = torch.randint(0, 100, (10_000,)) ** 2
        >>> plan = plan_embedding(counts, 32, max_bytes=10_000 * 32 * 4 // 5)
        >>> module = plan.build()
        >>> embedding_bytes(module) <= plan.max_bytes
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
    n, d, e = counts.numel(), int(embedding_dim), _element_size(dtype)
    max_bytes = int(max_bytes)
    full_bytes = n * d * e
    common = dict(num_embeddings=n, embedding_dim=d, max_bytes=max_bytes, dtype=dtype)
    if max_bytes >= full_bytes:
        return Plan(kind="full", bytes=full_bytes, score=1.0, **common)
    freq = counts.double().cpu()
    total = float(freq.sum())
    p = freq / total if total > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
    order = torch.argsort(p, descending=True, stable=True)
    p_sorted = p[order]
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(p_sorted, 0)])
    index_bytes = 4 if n <= 2**31 else 8
    k = num_hash_functions

    candidates = []
    if width == "free":
        reduced = max_bytes // (n * e)
        if reduced >= 1:
            candidates.append(
                Plan(
                    kind="reduced",
                    bytes=n * reduced * e,
                    reduced_dim=int(reduced),
                    score=_value(int(reduced), d, rank),
                    **common,
                )
            )
    private_options = [r for r in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if r < d]
    for r in private_options:
        left = max_bytes - e * (n * r + r * d)
        if left < e * d:  # not even one shared row
            continue
        for share in HOT_SHARES:
            hot = min(int(share * left) // (e * d + index_bytes), n - 1)
            rows = (left - hot * (e * d + index_bytes)) // (e * d)
            if rows < 1:
                continue
            tail = p_sorted[hot:]
            tail_mass = float(cumulative[-1] - cumulative[hot])
            load = k * tail_mass / rows
            own = tail / (tail + load) if load > 0 else torch.ones_like(tail)
            v = _value(r, d, rank)
            score = float(cumulative[hot]) + float((tail * (v + (1 - v) * own)).sum())
            candidates.append(
                Plan(
                    kind="bloom",
                    bytes=_bloom_bytes(n, d, e, rows, hot, r, index_bytes),
                    score=score,
                    num_rows=int(rows),
                    num_hash_functions=k,
                    private_dim=r,
                    hot_ids=order[:hot].sort().values if hot else None,
                    hot_share=float(cumulative[hot]),
                    ids_per_row=k * (n - hot) / rows,
                    tail_share_per_row=load,
                    **common,
                )
            )
    if not candidates:
        raise ValueError(f"max_bytes={max_bytes} cannot hold even one shared row of {d} dims ({e * d} B)")
    candidates.sort(key=lambda plan: plan.score, reverse=True)
    best = candidates[0]
    best.alternatives = [
        (c.kind, c.private_dim, c.hot_ids.numel() if c.hot_ids is not None else 0, c.num_rows, round(c.score, 4))
        for c in candidates[1:6]
    ]
    return best
