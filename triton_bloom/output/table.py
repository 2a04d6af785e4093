"""What the output side reads from an embedding and checks of its callers:
ids per chunk, the table as the scorer sees it (:class:`_Table`) and the
argument checks every entry point shares."""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from .. import dispatch
from ..hashing import WIDE_ID_START, hash_rows, seed_tensor
from ..reference import bloom_forward_reference, row_factors

# Elements of one chunk of scores (queries x ids): 16 MiB of float32, and at
# most 16384 ids (a chunk's vectors and hashing cost about 1 KiB an id on the
# PyTorch path).  A chunk small enough to stay in the CPU's caches between
# the matmul that writes it and the top-k or softmax that reads it: on this
# project's 2-core machine, one thread, the 1024-query top-k took 0.73x the
# materialised baseline's time at 4096 ids a chunk against 0.91x at 16384,
# the fused loss (4096 rows) 0.54x at 1024 ids against 0.75x at 4096; with
# 16 queries 16384 ids (the cap) beat 4096 (bench/perf/output.py measures it).
SCORE_BUDGET = 2**22
MIN_CHUNK, MAX_CHUNK = 1024, 16384
# On a GPU each chunk costs a few kernel launches and the Python around them,
# and the scores kernel writes no vectors: far larger chunks (256 MiB of
# scores, at most 2**18 ids, a quarter of a 1M catalogue).  Not measured yet
# (no GPU has run bench/perf/output.py --device cuda).
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


def _is_bloom_lookup(emb) -> bool:
    """Whether ``emb`` is a :class:`~triton_bloom.BloomEmbedding` (or a
    subclass), told by what this package reads from one: the lookup's options
    (``_options()``) and the compressed table ``embeddings``, over ids alone
    (a bag, with its pooling ``mode``, is no lookup of single ids).  Checked
    by attribute, not by class: the modules import this package, so it does
    not import them."""
    return (
        isinstance(emb, nn.Module)
        and callable(getattr(emb, "_options", None))
        and isinstance(getattr(emb, "embeddings", None), nn.Embedding)
        and not hasattr(emb, "mode")
    )


def _is_quantized_lookup(emb) -> bool:
    """Whether ``emb`` is a ``QuantizedBloomEmbedding`` (told by attribute, as
    above): scored on Triton by the fused quantized scores kernel, on the
    PyTorch path through its own lookup, which dequantises the rows it
    gathers, then a dense product; it has no parameters to train."""
    return (
        isinstance(emb, nn.Module)
        and callable(getattr(emb, "dequantized_weight", None))
        and isinstance(getattr(emb, "codes", None), torch.Tensor)
        and not hasattr(emb, "mode")
    )


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
        bloom = _is_bloom_lookup(emb)
        quantized = _is_quantized_lookup(emb)
        dim, num = getattr(emb, "embedding_dim", None), getattr(emb, "num_embeddings", None)
        params = list(emb.parameters()) if isinstance(emb, nn.Module) else []
        if quantized and need_grad:
            # Its rows are buffers: no gradient could reach them.
            raise RuntimeError(emb.training_error())
        if not bloom and not quantized and (not params or not isinstance(dim, int) or not isinstance(num, int)):
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
        # (A quantized table's float32 column offsets: its device, and the
        # dtype its lookups return.)
        self.weight = (
            emb.embeddings.weight if bloom else emb.column_offset if quantized else getattr(emb, "weight", params[0])
        )
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
        # A table the output side's custom ops take (autograd.py): for it the
        # lookup's ops compute the same vectors as the module's forward.
        self.plain = plain
        self.kernel = use_triton and plain
        # A quantized table's scores on Triton: the fused kernel dequantises
        # the rows it gathers, as the table's own lookup does.
        self.quantized_kernel = quantized and dispatch.use_triton(emb.backend, self.weight.device)
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

    def vectors_for_grad(self, ids, wanted):
        """The ids' vectors and ``pull``: their gradient -> the gradients of
        the ``wanted`` parameters (``None`` for one the vectors do not use),
        here through the module's forward and autograd."""
        with torch.enable_grad():
            vectors = self.vectors(ids)

        def pull(grad):
            return torch.autograd.grad(vectors, wanted, grad, allow_unused=True)

        return vectors, pull

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
            if self.quantized_kernel:
                return self._quantized_scores(queries, ids, exact)
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

    def _quantized_scores(self, queries, ids, exact):
        emb = self.emb
        wide = ids.dtype == torch.int64 and (self.num_embeddings is None or self.num_embeddings > WIDE_ID_START)
        scores = importlib.import_module(".scores", dispatch.kernels().__name__)
        return scores.quantized_scores(
            queries,
            ids,
            *emb._table(),
            seed_tensor(self.device),
            bits=emb.bits,
            dim=emb.embedding_dim,
            num_hash_functions=emb.num_hash_functions,
            padding_idx=emb.padding_idx,
            wide_ids=wide,
            signed=emb.signed,
            importance=emb.importance_weight,
            hot=emb.hot_ids,
            exact=exact,
        )


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
    if torch.compiler.is_compiling():
        # Reading the values would break the graph: a device-side assert,
        # as nn.Embedding's on CUDA (RuntimeError, not IndexError).
        ok = ids >= (-1 if allow_missing else 0)
        if num_embeddings is not None:
            ok &= ids < num_embeddings
        torch._assert_async(ok.all(), f"triton_bloom: {name} out of range [0, {num_embeddings})")
        return
    if ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < (-1 if allow_missing else 0):
        raise IndexError(
            f"{name} holds id {low}: ids must be non-negative" + (" (-1 marks padding)" if allow_missing else "")
        )
    if num_embeddings is not None and high >= num_embeddings:
        raise IndexError(f"{name} holds id {high}, out of range for num_embeddings={num_embeddings}")


def _check_hidden(hidden, dim):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden must be a (*, {dim}) Tensor (embedding_dim={dim}), got {getattr(hidden, 'shape', hidden)}"
        )
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be floating point, got dtype {hidden.dtype}")


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
