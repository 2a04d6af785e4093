"""Bloom embeddings at the output: scoring every id of the catalogue.

A query ``q`` scores id ``i`` as ``q . v_i``, ``v_i`` the id's Bloom vector
(``sum_j f_j(i) W[h_j(i)]``, ``f_j`` its sign and importance factor), so the
score is ``sum_j f_j(i) (q . W[h_j(i)])``.  Everything here walks the
catalogue (or a candidate set) in chunks of ids and never holds more than a
chunk of vectors or of scores:

- :func:`bloom_topk` (``BloomEmbedding.topk``): the best ``k`` ids per
  query, ties broken by the smaller id, with per-query excluded ids;
- :func:`bloom_logits` (``BloomEmbedding.logits``): the tied output layer's
  logits, with gradients to the queries and to the table;
- :func:`bloom_cross_entropy`: the full-catalogue softmax loss without the
  ``batch x num_embeddings`` logits (an online log-sum-exp over chunks, the
  backward recomputing each chunk's logits), or a sampled softmax;
- :class:`BloomOutputLayer`: the paper's Bloom output layer (Serra &
  Karatzoglou 2017), a softmax over the ``num_rows`` units trained on the
  ``k`` hashed positions of the target, and its decoder.

On the Triton backend one kernel (``kernels/scores.py``) hashes, gathers and
takes the dot products of a chunk of ids with all queries; the PyTorch path
looks the chunk's vectors up with the embedding's own lookup and multiplies.
The table's gradient always goes through the lookup's own backward.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import dispatch
from .hashing import WIDE_ID_START, check_num_hash_functions, hash_rows, seed_tensor
from .reference import bloom_forward_reference, row_factors

__all__ = [
    "TopK",
    "Ranks",
    "bloom_topk",
    "bloom_rank",
    "bloom_logits",
    "bloom_cross_entropy",
    "BloomOutputLayer",
    "TiedBloomLinear",
]


class TopK(NamedTuple):
    """What the top-k functions return.

    Attributes:
        scores (Tensor): ``(Q, k)``, best first; ``-inf`` past the last id
            left (when fewer than ``k`` ids are not excluded).
        ids (Tensor): ``(Q, k)`` int64, ``-1`` past the last id left.
    """

    scores: torch.Tensor
    ids: torch.Tensor


# Elements of one chunk of scores (queries x ids): 16 MiB of float32, and at
# most 16384 ids (a chunk's vectors and hashing cost about 1 KiB an id on the
# PyTorch path).  A chunk small enough to stay in the CPU's caches between
# the matmul that writes it and the top-k or softmax that reads it: on this
# project's 2-core machine, one thread, the 1024-query top-k took 0.73x the
# materialised baseline's time at 4096 ids a chunk against 0.91x at 16384,
# the fused loss (4096 rows) 0.54x at 1024 ids against 0.75x at 4096; with
# 16 queries 16384 ids (the cap) beat 4096 (bench/output.py measures it).
SCORE_BUDGET = 2**22
MIN_CHUNK, MAX_CHUNK = 1024, 16384
# On a GPU each chunk costs a few kernel launches and the Python around them,
# and the scores kernel writes no vectors: far larger chunks (256 MiB of
# scores, at most 2**18 ids, a quarter of a 1M catalogue).  Not measured yet
# (no GPU has run bench/output.py --device cuda).
CUDA_SCORE_BUDGET, CUDA_MAX_CHUNK = 2**26, 2**18


def default_chunk_size(num_queries: int, device=None) -> int:
    """Ids per chunk for ``num_queries`` queries: ``SCORE_BUDGET`` scores
    within 1024..16384 ids, or on CUDA ``CUDA_SCORE_BUDGET`` within 1024..2**18."""
    cuda = device is not None and torch.device(device).type == "cuda"
    budget, most = (CUDA_SCORE_BUDGET, CUDA_MAX_CHUNK) if cuda else (SCORE_BUDGET, MAX_CHUNK)
    return max(MIN_CHUNK, min(most, budget // max(num_queries, 1)))


def _check_chunk_size(chunk_size, num_queries, device=None):
    if chunk_size is None:
        return default_chunk_size(num_queries, device)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _chunks(n: int, size: int):
    return ((s, min(s + size, n)) for s in range(0, n, size))


def _id_dtype(num_embeddings: int) -> torch.dtype:
    """int32 where every id fits: the hash of an int32 id skips the 8-byte
    case (and the kernels its code)."""
    return torch.int32 if num_embeddings <= 2**31 else torch.int64


def _id_range(start: int, end: int, num_embeddings: int, device) -> torch.Tensor:
    return torch.arange(start, end, device=device, dtype=_id_dtype(num_embeddings))


def _acc_dtype(*dtypes) -> torch.dtype:
    """float64 when any of ``dtypes`` is, else float32: the scores' dtype."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# The lookup options the scores kernel implements; a module with others (a
# newer variant) scores through its own forward and a matmul instead.
_KERNEL_OPTIONS = {
    "num_hash_functions",
    "padding_idx",
    "num_embeddings",
    "backend",
    "sparse",
    "fused_optimizer",
    "signed",
    "importance",
    "hot",
}


class _Table:
    """A :class:`BloomEmbedding` (or any embedding-like module) as the output
    side reads it.  An id's vector is always what the module's own forward
    returns (every variant, the module's backend), so scores and gradients
    can never drift from the lookup; the Triton path scores a Bloom table
    with the fused kernel where it implements the module's options.

    Any other module that maps ``(C,)`` ids to ``(C, embedding_dim)``
    vectors and says its size in integer ``num_embeddings`` and
    ``embedding_dim`` attributes (``nn.Embedding`` and the like) is scored
    through its forward, so one evaluation serves a Bloom model and its
    full-table baseline alike."""

    def __init__(self, emb, *, need_catalogue: bool = True, need_grad: bool = False):
        from .modules import BloomEmbedding

        bloom = isinstance(emb, BloomEmbedding)
        dim, num = getattr(emb, "embedding_dim", None), getattr(emb, "num_embeddings", None)
        params = list(emb.parameters()) if isinstance(emb, nn.Module) else []
        if not bloom and (not params or not isinstance(dim, int) or not isinstance(num, int)):
            raise TypeError(
                f"emb must be a BloomEmbedding or an embedding-like nn.Module with parameters and "
                f"integer num_embeddings and embedding_dim attributes, got {type(emb).__name__}"
            )
        if need_catalogue and num is None:
            raise ValueError(
                "scoring the whole catalogue needs num_embeddings; this module has num_embeddings=None "
                "(pass candidates= to score a set of ids)"
            )
        if need_grad and getattr(emb, "fused_optimizer", None) is not None:
            raise ValueError(
                f"a tied output cannot train a table with fused_optimizer={emb.fused_optimizer!r}: the "
                "fused step would run once per chunk of ids; use a torch.optim optimizer"
            )
        self.emb = emb
        self.weight = emb.embeddings.weight if bloom else getattr(emb, "weight", params[0])
        self.options = emb._options() if bloom else {}
        self.num_embeddings = num
        self.embedding_dim = dim
        self.padding_idx = getattr(emb, "padding_idx", None)
        use_triton = bloom and dispatch.use_triton(emb.backend, self.weight.device)
        plain = (
            bloom
            and set(self.options) <= _KERNEL_OPTIONS
            and getattr(emb, "hash_cache", None) is None
            and getattr(emb, "private", None) is None
        )
        self.kernel = use_triton and plain
        # Scoring without gradients skips the custom op (and its per-call
        # checks: these ids are generated or checked here) where the
        # reference computes the vector from the hash alone.
        self.reference = not use_triton and plain and self.options.get("hot") is None

    @property
    def device(self):
        return self.weight.device

    def parameters(self):
        """The module's parameters that take gradients."""
        return [p for p in self.emb.parameters() if p.requires_grad]

    def vectors(self, ids):
        """The ids' vectors: the module's forward (differentiable)."""
        return self.emb(ids)

    def scores(self, queries, ids, *, exact=False):
        """``(Q, C)`` scores of the ``(C,)`` ids (no gradient), float32 or float64.

        With ``exact``, a float32 score is the float64 dot product rounded
        once, on both backends, so that it depends on the query and the
        vector alone: a float32 product (BLAS, or the kernel's ``tl.dot``,
        which is numpy's BLAS under the interpreter) sums in an order that can
        change with the matrix's width, the pair's place in a block and the
        CPU, and two ids with the same vector would then not tie."""
        acc = _acc_dtype(queries.dtype, self.weight.dtype)
        with torch.no_grad():
            if self.kernel:
                wide = ids.dtype == torch.int64 and (self.num_embeddings is None or self.num_embeddings > WIDE_ID_START)
                return dispatch.kernels().bloom_scores(
                    queries,
                    ids,
                    self.weight.detach(),
                    seed_tensor(self.device),
                    num_hash_functions=self.options["num_hash_functions"],
                    padding_idx=self.options["padding_idx"],
                    wide_ids=wide,
                    signed=self.options["signed"],
                    importance=self.options.get("importance"),
                    hot=self.options.get("hot"),
                    exact=exact,
                )
            if self.reference:
                k = self.options["num_hash_functions"]
                factors, _, _ = row_factors(
                    ids, k, signed=self.options["signed"], importance=self.options.get("importance")
                )
                vectors = bloom_forward_reference(
                    ids,
                    self.weight,
                    hash_rows(ids, k, self.weight.shape[0]),
                    self.options["padding_idx"],
                    factors=factors,
                )
            else:
                vectors = self.vectors(ids)
            if exact:
                return (queries.double() @ vectors.double().T).to(acc)
            return queries.to(acc) @ vectors.to(acc).T


# Top-k. -------------------------------------------------------------------------


def _check_queries(queries, dim, name="queries"):
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (num_queries, {dim}) Tensor, got {getattr(queries, 'shape', queries)}")
    if not queries.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {queries.dtype}")
    if queries.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns (embedding_dim), got shape {tuple(queries.shape)}")


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def _check_bias(bias, table):
    """The per-id bias, checked: ``(num_embeddings,)`` floating point on the
    table's device (or None)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a floating point Tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
    if table.num_embeddings is None or bias.shape != (table.num_embeddings,):
        raise ValueError(f"bias must have shape (num_embeddings,) = ({table.num_embeddings},), got {tuple(bias.shape)}")
    if bias.device != table.device:
        raise RuntimeError(f"bias is on {bias.device} but the table is on {table.device}")
    return bias


def _check_ids(ids, name, num_embeddings, *, allow_missing):
    """``IndexError`` naming the value unless every id is in
    ``[0, num_embeddings)``; ``-1`` marks a missing entry where ``allow_missing``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must hold int32 or int64 ids, got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < (-1 if allow_missing else 0):
        raise IndexError(
            f"{name} holds id {low}: ids must be non-negative" + (" (-1 marks padding)" if allow_missing else "")
        )
    if num_embeddings is not None and high >= num_embeddings:
        raise IndexError(f"{name} holds id {high}, out of range for num_embeddings={num_embeddings}")


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


def bloom_topk(
    queries: torch.Tensor,
    emb,
    k: int,
    *,
    candidates: Optional[torch.Tensor] = None,
    exclude: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> TopK:
    r"""The ``k`` best-scoring ids of a Bloom embedding for each query, without
    materialising the catalogue's vectors: ``score(q, i) = q . emb(i)``.

    Ids are scored a chunk at a time (hash, gather, dot; one Triton kernel on
    the GPU) and merged into a running top-k, so memory stays at one chunk of
    vectors and of scores whatever ``num_embeddings``.  Ties go to the
    smaller id.  The padding id is not an item and is never returned.

    Args:
        queries (Tensor): ``(Q, embedding_dim)`` floating point.
        emb (BloomEmbedding): the table (its hashing, variants and backend).
        k (int): ids per query.
        candidates (Tensor, optional): score only these ids: ``(M,)`` shared
            by every query (repeats count once), or ``(Q, M)`` per query,
            padded with -1.  Default: every id in ``[0, num_embeddings)``.
        exclude (Tensor, optional): ``(Q, m)`` int ids never returned for
            that query (already-seen items), padded with -1.
        bias (Tensor, optional): ``(num_embeddings,)`` added to every id's
            score (an item bias, a tied output layer's bias).
        chunk_size (int, optional): ids scored at a time. Default:
            :func:`default_chunk_size`.

    Returns:
        TopK: ``scores`` ``(Q, k)`` best first (float32, float64 for float64
        queries or tables) and ``ids`` ``(Q, k)`` int64; where fewer than
        ``k`` ids are left, the rest is ``-inf`` and ``-1``.

    Shape:
        - queries: :math:`(Q, H)`; output: :math:`(Q, k)` twice.

    Examples::

        >>> emb = BloomEmbedding(1_000_000, 64, padding_idx=None)
        >>> seen = torch.tensor([[3, 17, -1], [5, -1, -1]])
        >>> top = bloom_topk(torch.randn(2, 64), emb, 10, exclude=seen)
        >>> top.ids.shape, top.scores.shape
        (torch.Size([2, 10]), torch.Size([2, 10]))
    """
    table = _Table(emb, need_catalogue=candidates is None)
    queries, score_chunk, acc, bias = _scorer(table, queries, bias)
    if candidates is not None and candidates.device != table.device:
        raise RuntimeError(f"candidates are on {candidates.device} but the table is on {table.device}")

    def score_rows(ids):
        with torch.no_grad():
            vectors = table.vectors(ids.reshape(-1)).view(*ids.shape, -1).to(acc)
            scores = torch.bmm(vectors, queries.to(acc).unsqueeze(2)).squeeze(2)
            return scores if bias is None else scores + bias[ids]

    return topk_over_ids(
        score_chunk,
        queries.shape[0],
        k,
        num_embeddings=table.num_embeddings,
        device=queries.device,
        dtype=acc,
        candidates=candidates,
        exclude=exclude,
        skip_id=table.padding_idx,
        chunk_size=chunk_size,
        score_rows=score_rows,
    )


def _scorer(table, queries, bias, *, exact=False):
    """Checks the queries and the bias; returns the detached queries, the
    ``(C,)`` ids -> ``(Q, C)`` scores function (``exact``: see
    ``_Table.scores``), the scores' dtype and the bias, detached, in it."""
    _check_queries(queries, table.embedding_dim)
    if queries.device != table.device:
        raise RuntimeError(f"queries are on {queries.device} but the table is on {table.device}")
    queries = queries.detach()
    acc = _acc_dtype(queries.dtype, table.weight.dtype)
    bias = _check_bias(bias, table)
    bias = None if bias is None else bias.detach().to(acc)

    def score_chunk(ids):
        scores = table.scores(queries, ids, exact=exact)
        return scores if bias is None else scores.add_(bias[ids])

    return queries, score_chunk, acc, bias


def bloom_rank(
    queries: torch.Tensor,
    targets: torch.Tensor,
    emb,
    *,
    exclude: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Ranks:
    r"""Where each query's target ranks among every id of the catalogue, by
    ``score(q, i) = q . emb(i) (+ bias[i])``, without materialising the
    catalogue's vectors or its scores: full-ranking evaluation (MRR, AUC,
    HR@k through :func:`triton_bloom.ranking.ranking_metrics`).

    Ids scoring exactly the target's score count half (hash collisions make
    exact ties: a strict ``>`` would give them the better half).  The
    padding id is not an item and is never ranked.

    Args:
        queries (Tensor): ``(Q, embedding_dim)`` floating point.
        targets (Tensor): ``(Q,)`` int ids, each query's held-out item; it
            competes even when ``exclude`` lists it (a repeated interaction).
        emb (BloomEmbedding): the table; or any embedding-like module with
            integer ``num_embeddings`` and ``embedding_dim`` (scored through
            its forward), so a baseline is ranked by the same code.
        exclude (Tensor, optional): ``(Q, m)`` ids left out of that query's
            ranking (already-seen items), padded with -1.
        bias (Tensor, optional): ``(num_embeddings,)`` added to every id's score.
        chunk_size (int, optional): ids scored at a time.

    Returns:
        Ranks: ``above`` ``(Q,)`` float64 and ``others`` ``(Q,)`` int64, the
        number of ids ranked against the target.

    Examples::

        >>> emb = BloomEmbedding(10_000, 32, padding_idx=None)
        >>> seen = torch.tensor([[3, 17, -1], [5, -1, -1]])
        >>> ranks = bloom_rank(torch.randn(2, 32), torch.tensor([8, 9]), emb, exclude=seen)
        >>> ranking_metrics(ranks.above, ranks.others, k=10)["hr@10"].shape
        torch.Size([2])
    """
    table = _Table(emb)
    # Exact scores: the target's own score comes from another chunk than
    # the ids that tie with it.
    queries, score_chunk, _, _ = _scorer(table, queries, bias, exact=True)
    targets = _check_targets(targets, queries.shape[0], table.num_embeddings, table.padding_idx, queries.device)
    return rank_over_ids(
        score_chunk,
        targets,
        num_embeddings=table.num_embeddings,
        device=queries.device,
        exclude=exclude,
        skip_id=table.padding_idx,
        chunk_size=chunk_size,
    )


def _check_targets(targets, num_queries, num_embeddings, padding_idx, device):
    """One int64 target per query, in range, not the padding id."""
    if not isinstance(targets, torch.Tensor) or targets.shape != (num_queries,):
        raise ValueError(
            f"targets must be a ({num_queries},) Tensor, one id per query, got {getattr(targets, 'shape', targets)}"
        )
    if targets.device != device:
        raise RuntimeError(f"targets are on {targets.device} but the queries are on {device}")
    _check_ids(targets, "targets", num_embeddings, allow_missing=False)
    if padding_idx is not None and bool((targets == padding_idx).any()):
        raise ValueError(f"targets hold the padding id {padding_idx}, which is not an item")
    return targets.to(torch.int64)


# Tied logits and the fused loss. ----------------------------------------------------


def _catalogue_backward(table, hidden, bias, chunk, needs, grad_of_chunk):
    """Gradients of ``sum(G * (hidden @ V^T + bias))`` over the catalogue,
    chunk by chunk, where ``G[:, s:e] = grad_of_chunk(s, e, logits)``
    (``logits`` the chunk's, recomputed): ``grad_hidden``, ``grad_bias`` and
    one per ``table.parameters()``.  The table's part goes through the
    lookup's own backward."""
    params = table.parameters()
    acc = _acc_dtype(hidden.dtype, table.weight.dtype)
    hid = hidden.to(acc)
    need_h, need_b, need_p = needs[0], needs[1], needs[2:]
    wanted = [p for p, need in zip(params, need_p) if need]
    grad_h = torch.zeros_like(hid) if need_h else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
    totals = [torch.zeros(p.shape, dtype=_acc_dtype(p.dtype), device=p.device) for p in wanted]
    for s, e in _chunks(table.num_embeddings, chunk):
        with torch.enable_grad():
            vectors = table.vectors(_id_range(s, e, table.num_embeddings, hidden.device))
        v = vectors.detach().to(acc)
        logits = hid @ v.T
        if bias is not None:
            logits += bias[s:e].to(acc)
        grad = grad_of_chunk(s, e, logits)
        if need_h:
            grad_h.addmm_(grad, v)
        if need_b:
            grad_b[s:e] = grad.sum(0)
        if wanted:
            grads = torch.autograd.grad(vectors, wanted, (grad.T @ hid).to(vectors.dtype), allow_unused=True)
            for total, g in zip(totals, grads):
                if g is not None:
                    total += g.to(total.dtype)
    grads = iter(total.to(p.dtype) for total, p in zip(totals, wanted))
    return (
        grad_h.to(hidden.dtype) if need_h else None,
        grad_b.to(bias.dtype) if need_b else None,
        *(next(grads) if need else None for need in need_p),
    )


class _Logits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, table, chunk, *params):
        out = torch.empty(
            (hidden.shape[0], table.num_embeddings),
            device=hidden.device,
            dtype=torch.promote_types(hidden.dtype, table.weight.dtype),
        )
        for s, e in _chunks(table.num_embeddings, chunk):
            out[:, s:e] = table.scores(hidden, _id_range(s, e, table.num_embeddings, hidden.device))
        ctx.save_for_backward(hidden)
        ctx.table, ctx.chunk = table, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (hidden,) = ctx.saved_tensors
        acc = _acc_dtype(hidden.dtype, ctx.table.weight.dtype)
        needs = (ctx.needs_input_grad[0], False, *ctx.needs_input_grad[3:])
        grads = _catalogue_backward(
            ctx.table, hidden, None, ctx.chunk, needs, lambda s, e, logits: grad_out[:, s:e].to(acc)
        )
        return grads[0], None, None, *grads[2:]


class _LogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, bias, table, chunk, *params):
        acc = _acc_dtype(hidden.dtype, table.weight.dtype)
        lse = torch.full((hidden.shape[0],), float("-inf"), dtype=acc, device=hidden.device)
        for s, e in _chunks(table.num_embeddings, chunk):
            logits = table.scores(hidden, _id_range(s, e, table.num_embeddings, hidden.device))
            if bias is not None:
                logits += bias[s:e].to(acc)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, 1))
        ctx.save_for_backward(hidden, bias, lse)
        ctx.table, ctx.chunk = table, chunk
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse):
        hidden, bias, lse = ctx.saved_tensors
        g, lse = grad_lse.to(lse.dtype).unsqueeze(1), lse.unsqueeze(1)

        def softmax_grad(s, e, logits):
            return logits.sub_(lse).exp_().mul_(g)

        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[4:])
        grads = _catalogue_backward(ctx.table, hidden, bias, ctx.chunk, needs, softmax_grad)
        return grads[0], grads[1], None, None, *grads[2:]


def _check_hidden(hidden, dim):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden must be a (*, {dim}) Tensor (embedding_dim={dim}), got {getattr(hidden, 'shape', hidden)}"
        )
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be floating point, got dtype {hidden.dtype}")


def bloom_logits(hidden: torch.Tensor, emb, *, chunk_size: Optional[int] = None) -> torch.Tensor:
    r"""The tied output layer's logits, ``hidden @ V^T`` over every id, with
    ``V`` the ``(num_embeddings, embedding_dim)`` Bloom vectors, which are
    never materialised: the logits are computed a chunk of ids at a time, and
    the backward recomputes each chunk's vectors.  Gradients flow to
    ``hidden`` and (dense, through the lookup's own backward) to the table
    and the importance weights.

    Args:
        hidden (Tensor): ``(*, embedding_dim)`` floating point.
        emb (BloomEmbedding): the table, shared with the input side.
        chunk_size (int, optional): ids per chunk.

    Shape:
        - Output: :math:`(*, N)`, ``N = num_embeddings``, in the promoted
          dtype of ``hidden`` and the table (the sums run in float32 or float64).

    Examples::

        >>> emb = BloomEmbedding(50_000, 32, padding_idx=None)
        >>> bloom_logits(torch.randn(4, 32), emb).shape
        torch.Size([4, 50000])
    """
    table = _Table(emb, need_grad=True)
    _check_hidden(hidden, table.embedding_dim)
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = _check_chunk_size(chunk_size, flat.shape[0], flat.device)
    out = _Logits.apply(flat, table, chunk, *table.parameters())
    return out.view(*hidden.shape[:-1], table.num_embeddings)


def bloom_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    emb,
    *,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    r"""``F.cross_entropy(bloom_logits(hidden, emb), targets)`` without the
    ``batch x num_embeddings`` logits: the log-sum-exp runs online over chunks
    of ids, and the backward recomputes each chunk's logits and sends the
    table's gradient through the lookup's own backward.  Memory is one chunk
    of logits and of vectors, plus the table's gradient.

    With ``num_samples`` it is a sampled softmax instead: each row's target
    against ``num_samples`` ids drawn uniformly (shared by the batch, drawn
    with ``generator``); a sample equal to the row's target is dropped.
    Uniform sampling makes the log-Q correction a constant, which cancels.

    Args:
        hidden (Tensor): ``(*, embedding_dim)`` floating point.
        targets (Tensor): ``(*)`` int64 target ids.
        emb (BloomEmbedding): the tied table.
        bias (Tensor, optional): ``(num_embeddings,)`` output bias added to
            every id's logit (``TiedBloomLinear.bias``); it gets a gradient.
        reduction (str): ``"mean"`` (over non-ignored targets), ``"sum"`` or ``"none"``.
        ignore_index (int): targets equal to it add no loss and no gradient.
        num_samples (int, optional): sampled softmax with this many negatives.
        generator (torch.Generator, optional): for the samples.
        chunk_size (int, optional): ids per chunk.

    Examples::

        >>> emb = BloomEmbedding(100_000, 64, padding_idx=None)
        >>> hidden = torch.randn(8, 64, requires_grad=True)
        >>> loss = bloom_cross_entropy(hidden, torch.randint(0, 100_000, (8,)), emb)
        >>> loss.backward()
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    table = _Table(emb, need_grad=True)
    _check_hidden(hidden, table.embedding_dim)
    if not isinstance(targets, torch.Tensor) or targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's without its last "
            f"dimension), got {getattr(targets, 'shape', targets)}"
        )
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must hold int32 or int64 ids, got dtype {targets.dtype}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(torch.int64)
    keep = targets != ignore_index
    safe = targets.masked_fill(~keep, 0)
    _check_ids(safe, "targets", table.num_embeddings, allow_missing=False)
    bias = _check_bias(bias, table)
    acc = _acc_dtype(hidden.dtype, table.weight.dtype)
    target_logits = (flat.to(acc) * table.vectors(safe).to(acc)).sum(-1)
    if bias is not None:
        target_logits = target_logits + bias[safe].to(acc)
    if num_samples is None:
        lse = _LogSumExp.apply(
            flat, bias, table, _check_chunk_size(chunk_size, flat.shape[0], flat.device), *table.parameters()
        )
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        samples = torch.randint(0, table.num_embeddings, (num_samples,), generator=generator, device=table.device)
        sampled = flat.to(acc) @ table.vectors(samples).to(acc).T
        if bias is not None:
            sampled = sampled + bias[samples].to(acc)
        sampled = sampled.masked_fill(samples.unsqueeze(0) == safe.unsqueeze(1), float("-inf"))
        lse = torch.logsumexp(torch.cat([target_logits.unsqueeze(1), sampled], 1), 1)
    losses = (lse - target_logits).masked_fill(~keep, 0.0)
    if reduction == "none":
        return losses.view(hidden.shape[:-1])
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / keep.sum()


class TiedBloomLinear(nn.Module):
    r"""An output layer tied to a Bloom embedding: ``hidden @ V^T + bias``
    over every id, where ``V`` are the embedding's vectors (what
    :func:`~triton_bloom.bloomify` puts in place of an ``nn.Linear`` whose
    weight was tied to a converted embedding).  The table is shared, not
    copied: training either end trains both.

    Args:
        embedding (BloomEmbedding): the shared table.
        bias (Tensor, optional): ``(num_embeddings,)`` bias, kept as a parameter.

    Shape:
        - Input: :math:`(*, H)`; output: :math:`(*, N)`.
    """

    def __init__(self, embedding, bias: Optional[torch.Tensor] = None):
        super().__init__()
        # Kept out of the module tree: the embedding is registered where it
        # lives, and a second registration would save its table twice.
        object.__setattr__(self, "embedding", embedding)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.embedding.logits(hidden)
        return logits if self.bias is None else logits + self.bias

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
        """``F.cross_entropy(self(hidden), targets)`` without the logits:
        :func:`bloom_cross_entropy` with this layer's bias (same keyword arguments)."""
        return bloom_cross_entropy(hidden, targets, self.embedding, bias=self.bias, **kwargs)

    def topk(self, hidden: torch.Tensor, k: int, **kwargs) -> TopK:
        """The ``k`` ids with the highest logits per row of ``hidden`` ``(Q, H)``:
        :func:`bloom_topk` with this layer's bias (same keyword arguments)."""
        return bloom_topk(hidden, self.embedding, k, bias=self.bias, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# The paper's Bloom output layer. ------------------------------------------------


class BloomOutputLayer(nn.Module):
    r"""The Bloom output layer of Serra & Karatzoglou (RecSys 2017): a softmax
    over ``num_rows`` output units instead of ``num_embeddings``, trained
    with the ``k`` hashed positions of the target as the label, and decoded
    by scoring each id with the sum of the log-probabilities at its ``k``
    positions.

    Args:
        in_features (int): size of the hidden state.
        num_embeddings (int): the id space ``[0, num_embeddings)``.
        compression_ratio (float): ``int(compression_ratio * num_embeddings)``
            output units. Default: 0.2.
        num_hash_functions (int): ``k``, 1 to 24. Default: 4.
        num_rows (int, optional): the output units, overriding ``compression_ratio``.
        bias (bool): of the projection. Default: ``True``.
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"``, for the decoder.
        device, dtype: of the projection.

    Shape:
        - Input: :math:`(*, H_{in})`; ``forward`` gives :math:`(*, R)`
          log-probabilities over the ``R = num_rows`` units.

    Examples::

        >>> layer = BloomOutputLayer(64, 1_000_000, compression_ratio=0.2)
        >>> hidden = torch.randn(8, 64)
        >>> layer.loss(hidden, torch.randint(0, 1_000_000, (8,))).backward()
        >>> layer.topk(hidden, 10).ids.shape
        torch.Size([8, 10])
    """

    def __init__(
        self,
        in_features: int,
        num_embeddings: int,
        compression_ratio: float = 0.2,
        num_hash_functions: int = 4,
        *,
        num_rows: Optional[int] = None,
        bias: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        from .modules import compressed_rows

        check_num_hash_functions(num_hash_functions)
        if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings < 1:
            raise ValueError(f"num_embeddings must be a positive int, got {num_embeddings!r}")
        self.num_embeddings = num_embeddings
        self.num_hash_functions = num_hash_functions
        self.num_rows = compressed_rows(num_embeddings, compression_ratio, num_rows)
        self.backend = dispatch.check_backend(backend)
        self.projection = nn.Linear(in_features, self.num_rows, bias=bias, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.projection(hidden), dim=-1)

    def target_rows(self, targets: torch.Tensor) -> torch.Tensor:
        """``(*, k)`` int64 output units of each target id."""
        _check_ids(targets, "targets", self.num_embeddings, allow_missing=False)
        return hash_rows(targets, self.num_hash_functions, self.num_rows).to(torch.int64)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy against the target's Bloom code: ``-mean_j log p[h_j(target)]``
        (the label puts ``1/k`` on each of the ``k`` units; a unit hit twice
        counts twice)."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        losses = -self(hidden).gather(-1, self.target_rows(targets)).mean(-1)
        return losses if reduction == "none" else losses.sum() if reduction == "sum" else losses.mean()

    def scores(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(Q, C)``: each id's score for each row of ``hidden`` ``(Q, H)``:
        the sum of the log-probabilities at its ``k`` units (no gradient is
        needed for ranking, but this one is differentiable)."""
        rows = self.target_rows(ids.reshape(-1))
        return self(hidden)[:, rows].sum(-1)

    def topk(
        self,
        hidden: torch.Tensor,
        k: int,
        *,
        candidates: Optional[torch.Tensor] = None,
        exclude: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
    ) -> TopK:
        """The decoder: the ``k`` ids with the highest sum of log-probabilities
        at their ``k`` units, for each row of ``hidden`` ``(Q, H)``; the same
        arguments and result as :func:`bloom_topk`.  On the Triton backend
        the hashing, gathering and summing are one kernel per chunk."""
        log_probs, score_chunk, acc = self._decoder(hidden)
        k_hash, rows_total = self.num_hash_functions, self.num_rows

        def score_rows(ids):
            rows = hash_rows(ids, k_hash, rows_total).to(torch.int64)  # (Q, C, k)
            return log_probs.gather(1, rows.reshape(ids.shape[0], -1)).view(rows.shape).to(acc).sum(-1)

        return topk_over_ids(
            score_chunk,
            hidden.shape[0],
            k,
            num_embeddings=self.num_embeddings,
            device=hidden.device,
            dtype=acc,
            candidates=candidates,
            exclude=exclude,
            chunk_size=chunk_size,
            score_rows=score_rows,
        )

    def rank(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        *,
        exclude: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
    ) -> Ranks:
        """Where each row's target ranks by the decoder's score (the sum of
        the log-probabilities at an id's ``k`` units) among every id: the
        same arguments and result as :func:`bloom_rank`."""
        log_probs, score_chunk, _ = self._decoder(hidden)
        targets = _check_targets(targets, hidden.shape[0], self.num_embeddings, None, hidden.device)
        return rank_over_ids(
            score_chunk,
            targets,
            num_embeddings=self.num_embeddings,
            device=hidden.device,
            exclude=exclude,
            chunk_size=chunk_size,
        )

    def _decoder(self, hidden):
        """The ``(Q, num_rows)`` log-probabilities (the layer's dtype: a half
        precision copy is half the bytes), the ``(C,)`` ids -> ``(Q, C)``
        decoder scores function (one kernel per chunk on the Triton backend)
        and the dtype its sums run in (float32, or float64)."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
            raise ValueError(
                f"hidden must be a 2-D (num_queries, in_features) Tensor, got {getattr(hidden, 'shape', hidden)}"
            )
        with torch.no_grad():
            log_probs = self(hidden)
        acc = _acc_dtype(log_probs.dtype)
        use_triton = dispatch.use_triton(self.backend, log_probs.device)

        def score_chunk(ids):
            if use_triton:
                return dispatch.kernels().bloom_row_score_sums(
                    log_probs,
                    ids,
                    seed_tensor(ids.device),
                    num_hash_functions=self.num_hash_functions,
                    wide_ids=self.num_embeddings > WIDE_ID_START,
                )
            rows = hash_rows(ids, self.num_hash_functions, self.num_rows).to(torch.int64)
            return log_probs[:, rows].to(acc).sum(-1)

        return log_probs, score_chunk, acc

    def extra_repr(self) -> str:
        return (
            f"{self.projection.in_features}, {self.num_embeddings}, num_rows={self.num_rows}, "
            f"num_hash_functions={self.num_hash_functions}"
        )
