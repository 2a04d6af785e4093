"""Top-k and full ranking over a Bloom embedding's catalogue:
:func:`bloom_topk` and :func:`bloom_rank` (``BloomEmbedding.topk`` and ``.rank``)."""

from __future__ import annotations

from typing import Optional

import torch

from .table import _acc_dtype, _check_bias, _check_queries, _check_targets, _Table
from .walk import Ranks, TopK, rank_over_ids, topk_over_ids


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
