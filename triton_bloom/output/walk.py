"""The catalogue walk: the top-k and rank drivers over chunks of ids, for
any chunk scorer (a Bloom table's, the Bloom output layer's decoder's, a
caller's own)."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .table import _check_chunk_size, _check_ids, _check_k, _chunks, _id_dtype, _id_range


class TopK(NamedTuple):
    """What the top-k functions return.

    Attributes:
        scores (Tensor): ``(Q, k)``, best first; ``-inf`` past the last id
            left (when fewer than ``k`` ids are not excluded).
        ids (Tensor): ``(Q, k)`` int64, ``-1`` past the last id left.
    """

    scores: torch.Tensor
    ids: torch.Tensor


def _chunk_top(scores: torch.Tensor, k: int):
    """The best ``min(k, C)`` entries of each row of a ``(Q, C)`` chunk whose
    columns are in increasing id order, ties at the cut going to the smaller
    column; ``(values, columns)``."""
    kk = min(k, scores.shape[1])
    if kk == scores.shape[1]:
        return scores.topk(kk, dim=1)
    # topk picks arbitrarily among entries tied with the k-th. One entry more
    # tells, for free, whether an entry left out ties with it; only those
    # rows (rare: exact ties come from duplicate vectors) are redone with a
    # stable sort, which keeps the smaller column first.
    values, columns = scores.topk(kk + 1, dim=1)
    ambiguous = (values[:, kk] == values[:, kk - 1]) & (values[:, kk - 1] > float("-inf"))
    values, columns = values[:, :kk], columns[:, :kk]
    rows = ambiguous.nonzero().squeeze(1)
    if rows.numel():
        v, c = scores.index_select(0, rows).sort(dim=1, descending=True, stable=True)
        values[rows], columns[rows] = v[:, :kk], c[:, :kk]
    return values, columns


def _merge(best, new, k):
    """The best ``k`` of two ``(values, ids)`` sets by (score desc, id asc)."""
    values, ids = torch.cat([best[0], new[0]], 1), torch.cat([best[1], new[1]], 1)
    order = ids.argsort(dim=1, stable=True)
    values, ids = values.gather(1, order), ids.gather(1, order)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), ids.gather(1, order)


def _finish(best, k, num_queries, device, dtype):
    values, ids = best
    if values.shape[1] < k:  # fewer ids than k in all
        pad = k - values.shape[1]
        values = torch.cat([values, values.new_full((num_queries, pad), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((num_queries, pad), -1)], 1)
    ids = ids.masked_fill(values == float("-inf"), -1)
    return TopK(values, ids)


def _exclusion_pairs(exclude, num_queries, positions_of, num_embeddings, targets=None):
    """``(columns, queries)`` of the excluded (query, id) pairs, sorted by
    column, from a ``(Q, m)`` tensor padded with -1; with ``targets``, a
    query's own target is never excluded."""
    if exclude.dim() != 2 or exclude.shape[0] != num_queries:
        raise ValueError(
            f"exclude must be a (num_queries={num_queries}, m) Tensor padded with -1, got shape {tuple(exclude.shape)}"
        )
    _check_ids(exclude, "exclude", num_embeddings, allow_missing=True)
    query, slot = (exclude >= 0).nonzero(as_tuple=True)
    ids = exclude[query, slot].to(torch.int64)
    if targets is not None:
        other = ids != targets[query]
        ids, query = ids[other], query[other]
    columns, found = positions_of(ids)
    columns, query = columns[found], query[found]
    order = columns.argsort()
    return columns[order], query[order]


class _Walk(NamedTuple):
    """One chunk of the catalogue walk: ``scores`` ``(Q, C)`` of the ``ids``
    (columns ``start..start+C`` of the walk), and the ``(queries, columns)``
    within the chunk that must not count (excluded pairs, the padding id)."""

    start: int
    ids: torch.Tensor
    scores: torch.Tensor
    dropped: tuple


def _walk(score_chunk, num_queries, *, num_embeddings, device, candidates, exclude, skip_id, chunk, targets=None):
    """The chunked walk over ``[0, num_embeddings)`` or the sorted distinct
    ``candidates`` that top-k and rank share: yields a :class:`_Walk` per
    chunk, columns in increasing id order (so that ties can go to the
    smaller id), never holding more than one chunk of scores."""
    if candidates is None:
        if num_embeddings is None:
            raise ValueError("walking the whole catalogue needs num_embeddings (or pass candidates=)")
        total, column_ids = num_embeddings, None

        def positions_of(ids):
            return ids, torch.ones_like(ids, dtype=torch.bool)
    else:
        if candidates.dim() != 1:
            raise ValueError(f"candidates must be 1-D (shared) or 2-D (per query), got shape {tuple(candidates.shape)}")
        _check_ids(candidates, "candidates", num_embeddings, allow_missing=False)
        # Sorted and distinct: columns in id order make ties go to the smaller id.
        column_ids = torch.unique(candidates.to(torch.int64))
        total = column_ids.numel()

        def positions_of(ids):
            pos = torch.searchsorted(column_ids, ids)
            if total == 0:
                return pos, torch.zeros_like(ids, dtype=torch.bool)
            return pos, (pos < total) & (column_ids[pos.clamp(max=total - 1)] == ids)

    pairs = None
    if exclude is not None:
        if exclude.device != device:
            raise RuntimeError(f"exclude is on {exclude.device} but the queries are on {device}")
        pairs = _exclusion_pairs(exclude, num_queries, positions_of, num_embeddings, targets)
    skip_column = None
    if skip_id is not None:
        pos, found = positions_of(torch.tensor([skip_id], device=device))
        skip_column = int(pos) if bool(found) else None
    no_pairs = (torch.empty(0, dtype=torch.int64, device=device),) * 2
    for s, e in _chunks(total, chunk):
        ids = _id_range(s, e, total, device) if column_ids is None else column_ids[s:e]
        queries, columns = no_pairs
        if pairs is not None:
            lo, hi = torch.searchsorted(pairs[0], torch.tensor([s, e], device=device)).tolist()
            queries, columns = pairs[1][lo:hi], pairs[0][lo:hi] - s
        if skip_column is not None and s <= skip_column < e:
            queries = torch.cat([queries, torch.arange(num_queries, device=device)])
            columns = torch.cat([columns, columns.new_full((num_queries,), skip_column - s)])
        yield _Walk(s, ids, score_chunk(ids), (queries, columns))


def topk_over_ids(
    score_chunk: Callable,
    num_queries: int,
    k: int,
    *,
    num_embeddings: Optional[int],
    device,
    dtype=torch.float32,
    candidates=None,
    exclude=None,
    skip_id=None,
    chunk_size=None,
    score_rows: Optional[Callable] = None,
) -> TopK:
    """The top-k driver every top-k here runs: walks the ids in chunks,
    scores each chunk, drops excluded ids and merges into a running top-k.

    Args:
        score_chunk (callable): ``(C,)`` int ids -> ``(Q, C)`` scores.
        num_queries (int), k (int): ``Q`` and ``k``.
        num_embeddings (int, optional): the catalogue ``[0, num_embeddings)``
            (needed without ``candidates``).
        candidates (Tensor, optional): ``(M,)`` ids shared by all queries, or
            ``(Q, M)`` per query padded with -1 (scored by ``score_rows``).
        exclude (Tensor, optional): ``(Q, m)`` ids to leave out, padded with -1.
        skip_id (int, optional): an id never returned (the padding id).
        chunk_size (int, optional): ids per chunk.
        score_rows (callable, optional): ``(Q, C)`` ids -> ``(Q, C)`` scores,
            for per-query candidates.
    """
    _check_k(k)
    chunk = _check_chunk_size(chunk_size, num_queries, device)
    best = (
        torch.empty((num_queries, 0), dtype=dtype, device=device),
        torch.empty((num_queries, 0), dtype=torch.int64, device=device),
    )
    if candidates is not None and candidates.dim() == 2:
        return _topk_per_query(score_rows, num_queries, k, candidates, exclude, skip_id, num_embeddings, chunk, best)
    for part in _walk(
        score_chunk,
        num_queries,
        num_embeddings=num_embeddings,
        device=device,
        candidates=candidates,
        exclude=exclude,
        skip_id=skip_id,
        chunk=chunk,
    ):
        scores = part.scores
        scores[part.dropped] = float("-inf")
        values, columns = _chunk_top(scores, k)
        best = _merge(best, (values.to(dtype), part.ids[columns].long()), k)
    return _finish(best, k, num_queries, device, dtype)


class Ranks(NamedTuple):
    """What the rank functions return, the two arguments of
    :func:`triton_bloom.ranking.ranking_metrics`.

    Attributes:
        above (Tensor): ``(Q,)`` float64: the ids scoring above each query's
            target, plus half of those scoring the same (``1 + above`` is
            the target's rank).
        others (Tensor): ``(Q,)`` int64: the ids ranked against the target
            (every id but the target, the excluded ones and the padding id).
    """

    above: torch.Tensor
    others: torch.Tensor


def rank_over_ids(
    score_chunk: Callable,
    targets: torch.Tensor,
    *,
    num_embeddings: int,
    device,
    exclude=None,
    skip_id=None,
    chunk_size=None,
) -> Ranks:
    """The rank driver: where each query's target falls among the scores of
    every id, walking the catalogue in chunks as :func:`topk_over_ids` does.

    The target's own score comes from ``score_chunk`` too (on the distinct
    targets, one more chunk), so an id with the same vector as the target
    ties with it wherever ``score_chunk``'s score of a pair does not depend
    on the chunk around it (``_Table.scores`` with ``exact=True``).

    Args:
        score_chunk (callable): ``(C,)`` int ids -> ``(Q, C)`` scores.
        targets (Tensor): ``(Q,)`` int64 ids, one per query, never excluded.
        num_embeddings (int): the catalogue ``[0, num_embeddings)``.
        exclude (Tensor, optional): ``(Q, m)`` ids left out, padded with -1.
        skip_id (int, optional): an id never ranked (the padding id).
        chunk_size (int, optional): ids per chunk.
    """
    num_queries = targets.shape[0]
    chunk = _check_chunk_size(chunk_size, num_queries, device)
    rows = torch.arange(num_queries, device=device)
    distinct, slot = torch.unique(targets, return_inverse=True)
    target_scores = score_chunk(distinct.to(_id_dtype(num_embeddings)))[rows, slot]
    greater = torch.zeros(num_queries, dtype=torch.int64, device=device)
    ties = torch.zeros_like(greater)
    others = torch.zeros_like(greater)
    for part in _walk(
        score_chunk,
        num_queries,
        num_embeddings=num_embeddings,
        device=device,
        candidates=None,
        exclude=exclude,
        skip_id=skip_id,
        chunk=chunk,
        targets=targets,
    ):
        keep = torch.ones(part.scores.shape, dtype=torch.bool, device=device)
        keep[part.dropped] = False
        # The target is not ranked against itself.
        own = (targets >= part.start) & (targets < part.start + part.ids.numel())
        keep[rows[own], targets[own] - part.start] = False
        scores = part.scores
        greater += ((scores > target_scores[:, None]) & keep).sum(1)
        ties += ((scores == target_scores[:, None]) & keep).sum(1)
        others += keep.sum(1)
    return Ranks(greater.double() + ties.double() / 2, others)


def _topk_per_query(score_rows, num_queries, k, candidates, exclude, skip_id, num_embeddings, chunk, best):
    if score_rows is None:
        raise ValueError("per-query (2-D) candidates are not supported here")
    if candidates.shape[0] != num_queries:
        raise ValueError(
            f"2-D candidates must have num_queries={num_queries} rows, got shape {tuple(candidates.shape)}"
        )
    _check_ids(candidates, "candidates", num_embeddings, allow_missing=True)
    # Each row sorted, missing entries (-1) last, so columns run in id order.
    missing = torch.iinfo(torch.int64).max
    cands = candidates.to(torch.int64)
    cands = cands.masked_fill(cands < 0, missing).sort(dim=1).values
    valid = cands != missing
    valid[:, 1:] &= cands[:, 1:] != cands[:, :-1]  # a repeated candidate counts once
    if skip_id is not None:
        valid &= cands != skip_id
    if exclude is not None:
        if exclude.dim() != 2 or exclude.shape[0] != num_queries:
            raise ValueError(
                f"exclude must be a (num_queries={num_queries}, m) Tensor padded with -1, "
                f"got shape {tuple(exclude.shape)}"
            )
        _check_ids(exclude, "exclude", num_embeddings, allow_missing=True)
        ex = exclude.to(torch.int64).contiguous()
        if cands.shape[1]:
            pos = torch.searchsorted(cands.contiguous(), ex).clamp(max=cands.shape[1] - 1)
            hit = (cands.gather(1, pos) == ex) & (ex >= 0)
            # Counted, not scattered: several entries may land on one position.
            hits = torch.zeros(valid.shape, dtype=torch.int32, device=valid.device).scatter_add_(1, pos, hit.int())
            valid &= hits == 0
    # Missing entries hash as id 0 (any valid id) and are masked out.
    cands = cands.masked_fill(~valid, 0)
    for s, e in _chunks(cands.shape[1], chunk):
        ids = cands[:, s:e]
        scores = score_rows(ids).masked_fill(~valid[:, s:e], float("-inf"))
        values, columns = _chunk_top(scores, k)
        best = _merge(best, (values.to(best[0].dtype), ids.gather(1, columns)), k)
    return _finish(best, k, num_queries, cands.device, best[0].dtype)
