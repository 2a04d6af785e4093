"""Gradients per touched row, described as *entries*.

Three features need each touched row's whole gradient rather than atomic adds
into a dense buffer: sparse gradients (``sparse=True``: a COO ``weight.grad``
over the touched rows), the fused optimizers (``optim.py``: the touched rows
are updated inside the backward and no gradient is returned), and the
deterministic Triton backward (``torch.use_deterministic_algorithms``: rows
summed in a fixed order, then scattered into the dense gradient).  The
importance weights' gradient is summed the same way.  All of them reduce to
one operation, the touched rows and their summed gradients, which
``ops.py`` computes with the kernels (a sort and segment sum) or the
reference (``unique`` + ``index_add_``).

*Entries* say what each id adds: id ``i`` adds ``grad[sources[i]]``, scaled by
``scales[i]`` (per-sample weight, 1/count, the variants' factors of its ``k``
rows), to its ``k`` rows; ``keep`` drops padding.  This module builds them and
does the arithmetic around them, the same for both backends; it never
chooses a backend.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .constants import MODE_MAX, MODE_MEAN, accumulation_dtype
from .reference import bag_sizes


class Entries(NamedTuple):
    """What the ids add to their rows (see the module's docstring)."""

    sources: torch.Tensor  # (n,) int64 row of ``grad`` that entry i adds
    grad: torch.Tensor  # (s, dim) gradients
    scales: Optional[torch.Tensor]  # (n,) factors of the entries, or (n, k) of each of their rows
    keep: Optional[torch.Tensor]  # (n,) bool, False for padding


def densify(rows: torch.Tensor, values: torch.Tensor, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense gradient holding ``values`` at ``rows`` and zeros elsewhere."""
    dense = values.new_zeros((num_rows, values.shape[1]))
    dense.index_copy_(0, rows, values)
    return dense.to(dtype)


def _live(ids: torch.Tensor, padding_idx: Optional[int]) -> Optional[torch.Tensor]:
    return None if padding_idx is None else ids.reshape(-1) != padding_idx


def bag_of_ids(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """The bag of every id position, from ``B + 1`` offsets."""
    lengths = bag_sizes(offsets)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=n)


def embedding_entries(ids: torch.Tensor, grad_out: torch.Tensor, padding_idx: Optional[int]) -> Entries:
    """Entries of a plain lookup: id ``i`` adds ``grad_out[i]``."""
    n = ids.numel()
    # The width is spelled out: -1 cannot be inferred when there are no ids.
    return Entries(
        torch.arange(n, device=ids.device), grad_out.reshape(n, grad_out.shape[-1]), None, _live(ids, padding_idx)
    )


def bag_entries(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    mode: int,
    per_sample_weights: Optional[torch.Tensor],
    padding_idx: Optional[int],
    argmax: torch.Tensor,
) -> Entries:
    """Entries of a pooled lookup: each id adds its bag's gradient, scaled by
    its per-sample weight or by 1/count (mean); in max mode each column's
    gradient goes to the id that held the maximum."""
    n = ids.numel()
    live = _live(ids, padding_idx)
    if mode == MODE_MAX:
        # Spread the bag gradients over the ids they belong to (positions
        # are unique per column, so this is a plain, deterministic write).
        per_id = grad_out.new_zeros((n, grad_out.shape[1]))
        found = argmax >= 0
        columns = torch.arange(grad_out.shape[1], device=grad_out.device).expand_as(argmax)
        per_id[argmax[found], columns[found]] = grad_out[found]
        return Entries(torch.arange(n, device=ids.device), per_id, None, live)
    sources = bag_of_ids(offsets, n)
    scales = per_sample_weights
    if mode == MODE_MEAN:
        counts = bag_sizes(offsets, live if live is not None else torch.ones(n, dtype=torch.bool, device=ids.device))
        scales = counts.clamp_min(1).to(grad_out.dtype).reciprocal()[sources]
    return Entries(sources, grad_out, scales, live)


def per_id_gradient(entries: Entries) -> torch.Tensor:
    """The ``(n, dim)`` gradient each id receives (before the variants'
    factors; padding is left to the caller)."""
    per_id = entries.grad.index_select(0, entries.sources)
    return per_id if entries.scales is None else per_id * entries.scales.to(per_id.dtype).unsqueeze(1)


def with_factors(entries: Entries, factors: Optional[torch.Tensor]) -> Entries:
    """``entries`` with the variants' ``(n, k)`` row factors folded into their scales."""
    if factors is None:
        return entries
    scales = entries.scales
    if scales is not None:
        dtype = torch.promote_types(scales.dtype, factors.dtype)
        factors = scales.to(dtype).unsqueeze(1) * factors.to(dtype)
    return entries._replace(scales=factors)


def importance_entries(
    rows: torch.Tensor,
    entries: Entries,
    weight: torch.Tensor,
    signs: torch.Tensor,
    imp_rows: torch.Tensor,
    importance_dtype: torch.dtype,
):
    """``(rows, entries)`` of the importance weights' gradient: entry ``i``
    adds ``scales[i] * signs[i, j] * <grad[sources[i]], weight[rows[i, j]]>``
    to ``importance[imp_rows[i], j]``, so the ``(u, k)`` sums per touched
    importance row are its gradient."""
    acc = accumulation_dtype(importance_dtype)
    source_grads = entries.grad.to(acc).index_select(0, entries.sources)
    if entries.scales is not None:
        source_grads = source_grads * entries.scales.to(acc).unsqueeze(1)
    dots = torch.stack(
        [(source_grads * weight.index_select(0, rows[:, j]).to(acc)).sum(1) for j in range(rows.shape[1])], dim=1
    )
    n = imp_rows.numel()
    return imp_rows.unsqueeze(1), Entries(torch.arange(n, device=dots.device), dots * signs.to(acc), None, entries.keep)


def per_sample_weights_gradient(vectors: torch.Tensor, offsets: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``d out[bag] / d psw[i] = <grad_out[bag], vector(id i)>`` from the ids'
    ``(n, dim)`` Bloom vectors (zero for padding)."""
    grad_bags = grad_out[bag_of_ids(offsets, vectors.shape[0])]
    return (vectors.to(grad_bags.dtype) * grad_bags).sum(dim=1)
