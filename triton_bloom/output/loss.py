"""The tied output layer's logits and the fused cross-entropy:
:func:`bloom_logits` and :func:`bloom_cross_entropy`, never holding more
than a chunk of the ``batch x num_embeddings`` logits."""

from __future__ import annotations

from typing import Optional

import torch

from .autograd import _Logits, _LogSumExp, _op_options, catalogue_logits, catalogue_logsumexp, plain_tensors
from .table import _acc_dtype, _check_bias, _check_chunk_size, _check_hidden, _check_ids, _Table


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
    if table.plain:
        out = catalogue_logits(flat, *plain_tensors(table), **_op_options(table), chunk=chunk)
    else:
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
        chunk = _check_chunk_size(chunk_size, flat.shape[0], flat.device)
        if table.plain:
            lse = catalogue_logsumexp(flat, bias, *plain_tensors(table), **_op_options(table), chunk=chunk)
        else:
            lse = _LogSumExp.apply(flat, bias, table, chunk, *table.parameters())
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
