"""Modules: ``BloomEmbedding``, ``BloomEmbeddingBag``, and the seed's
``ScaledEmbedding``, ``ZeroEmbedding`` and ``ScaledEmbeddingBag``."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch
from .checks import WEIGHT_DTYPES, check_training_options, normalize_padding_idx
from .constants import MODES
from .functional import bag_lookup, lookup
from .hashing import IMPORTANCE_SEED, SEEDS, SIGN_SEEDS, bloom_hash, check_num_hash_functions
from .layout import WholeCheckpointLoad, check_checkpoint_hot_ids, compressed_rows, embedding_bytes
from .layout import positive_int as _positive_int
from .layout import sorted_hot_ids as _sorted_hot_ids
from .plain import ScaledEmbedding, ScaledEmbeddingBag, ZeroEmbedding

__all__ = [
    "BloomEmbedding",
    "BloomEmbeddingBag",
    "ScaledEmbedding",
    "ZeroEmbedding",
    "ScaledEmbeddingBag",
    "embedding_bytes",
]


class _BloomTable(WholeCheckpointLoad, nn.Module):
    """What both Bloom modules share: the checked sizes, the hashing
    parameters, and the compressed table as the submodule ``embeddings``."""

    def __init__(
        self,
        *,
        num_embeddings,
        embedding_dim,
        compression_ratio,
        num_hash_functions,
        padding_idx,
        num_rows,
        backend,
        sparse,
        fused_optimizer,
        signed,
        importance,
        importance_rows,
        hot_ids,
        private_dim,
        device,
        dtype,
    ):
        super().__init__()
        if dtype is not None and dtype not in WEIGHT_DTYPES:
            raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
        check_training_options(sparse, fused_optimizer)
        if num_embeddings is not None:
            _positive_int("num_embeddings", num_embeddings)
        _positive_int("embedding_dim", embedding_dim)
        check_num_hash_functions(num_hash_functions)
        dispatch.check_backend(backend)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.compression_ratio = compression_ratio
        self.num_hash_functions = num_hash_functions
        self.padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
        self.num_rows = compressed_rows(num_embeddings, compression_ratio, num_rows)
        self.backend = backend
        self.sparse = sparse
        self.fused_optimizer = fused_optimizer
        self.hot_ids: Optional[torch.Tensor]
        if hot_ids is not None:
            hot = _sorted_hot_ids(hot_ids, num_embeddings, self.padding_idx, device)
            # Saved with the table: the private rows follow the hot ids' order.
            self.register_buffer("hot_ids", hot)
        else:
            self.hot_ids = None
        hot_rows = self.hot_ids.numel() if self.hot_ids is not None else 0
        # The table knows it is sparse: DDP reads that flag off nn.Embedding
        # modules to expect sparse gradients.  Its last hot_rows rows are the
        # hot ids' private rows.
        self.embeddings = ScaledEmbedding(
            self.num_rows + hot_rows, embedding_dim, sparse=sparse, device=device, dtype=dtype
        )
        self.private: Optional[ScaledEmbedding] = None
        self.private_projection: Optional[nn.Parameter] = None
        if private_dim:
            if num_embeddings is None:
                raise ValueError("private_dim needs num_embeddings: the private part has a row per id")
            _positive_int("private_dim", private_dim)
            self.private = ScaledEmbedding(
                num_embeddings, private_dim, padding_idx=self.padding_idx, sparse=sparse, device=device, dtype=dtype
            )
            self.private_projection = nn.Parameter(torch.empty(private_dim, embedding_dim, device=device, dtype=dtype))
            self._reset_private()
        self.signed = bool(signed)
        self.importance_weight: Optional[nn.Parameter] = None
        if importance:
            rows = _positive_int("importance_rows", importance_rows if importance_rows is not None else self.num_rows)
            # Ones: the layer starts as plain (signed) Bloom and learns from there.
            self.importance_weight = nn.Parameter(
                torch.ones(rows, num_hash_functions, device=device, dtype=torch.float32)
            )
        elif importance_rows is not None:
            raise ValueError("importance_rows is given but importance=False")
        self._place_optimizer_state()

    def _place_optimizer_state(self) -> None:
        # The fused optimizer's state lives beside the table from the start:
        # a compiled step can update it, but not create or move it.
        if self.fused_optimizer is not None:
            self.fused_optimizer.state(self.embeddings.weight)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._place_optimizer_state()
        return module

    # Attributes that are the lookup's options under the same names.
    _LOOKUP_OPTIONS = (
        "num_hash_functions",
        "padding_idx",
        "num_embeddings",
        "backend",
        "sparse",
        "fused_optimizer",
        "signed",
    )

    def _options(self) -> dict:
        """The lookup's options, checked in ``__init__``."""
        options = {name: getattr(self, name) for name in self._LOOKUP_OPTIONS}
        return options | {"importance": self.importance_weight, "hot": self.hot_ids}

    def _reset_private(self) -> None:
        # Every part starts at the table's per-element scale, std
        # 1/embedding_dim: the codes themselves, and their projection (a sum
        # of r code elements times weights of std 1/sqrt(r)).  The codes'
        # own ScaledEmbedding rule, 1/r, would make a narrow code dominate.
        r = self.private_projection.shape[0]
        with torch.no_grad():
            self.private.weight.normal_(0, 1.0 / self.embedding_dim)
            if self.padding_idx is not None:
                self.private.weight[self.padding_idx].fill_(0)
            self.private_projection.normal_(0, 1.0 / math.sqrt(r))

    @property
    def num_hot(self) -> int:
        """Ids with a private row (0 without ``hot_ids``)."""
        return self.hot_ids.numel() if self.hot_ids is not None else 0

    @property
    def weight(self) -> torch.Tensor:
        """The compressed table, ``embeddings.weight``."""
        return self.embeddings.weight

    def reset_parameters(self) -> None:
        self.embeddings.reset_parameters()
        if self.private is not None:
            self._reset_private()
        if self.importance_weight is not None:
            with torch.no_grad():
                self.importance_weight.fill_(1.0)

    def hash_spec(self) -> dict:
        """Everything that decides which rows an id reads: saved in the state
        dict (as ``_extra_state``) and checked on load, so a checkpoint is
        never read with other hashing than it was trained with."""
        spec = {
            "algorithm": "murmurhash3_x86_32",
            "seeds": list(SEEDS[: self.num_hash_functions]),
            "num_hash_functions": self.num_hash_functions,
            "num_rows": self.num_rows,
            "id_bytes": "4 (int32) below 2**31, 8 (int64 little-endian) from 2**31",
            "reduction": "signed hash, floor modulo num_rows",
        }
        # The variants only add keys, so a plain layer's spec never changes.
        if self.signed:
            spec["sign_seeds"] = list(SIGN_SEEDS[: self.num_hash_functions])
        if self.importance_weight is not None:
            spec["importance_seed"] = IMPORTANCE_SEED
            spec["importance_rows"] = self.importance_weight.shape[0]
        if self.hot_ids is not None:
            # The ids themselves are the buffer hot_ids, saved beside the table.
            spec["hot_rows"] = self.num_hot
        return spec

    def get_extra_state(self) -> dict:
        return {"hash_spec": self.hash_spec()}

    def set_extra_state(self, state) -> None:
        saved = state.get("hash_spec") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise ValueError(f"this checkpoint's extra state holds no hash specification: {state!r}")
        mine = self.hash_spec()
        differ = sorted(key for key in saved.keys() | mine.keys() if saved.get(key) != mine.get(key))
        if differ:
            details = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, module {mine.get(key)!r}" for key in differ)
            raise ValueError(
                f"checkpoint was saved with other hashing than this {type(self).__name__} uses ({details}); "
                "loading it would read other rows for the same ids"
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._check_checkpoint(state_dict, prefix, strict=False)
        check_checkpoint_hot_ids(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A Spotlight checkpoint has the table and no specification: its
        # hashing is Spotlight's, which is ours (the table's shape, which
        # fixes num_rows, is checked with the weight).
        if prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, num_rows={self.num_rows}"
        s += f", num_hash_functions={self.num_hash_functions}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.sparse:
            s += ", sparse=True"
        if self.fused_optimizer is not None:
            s += f", fused_optimizer={self.fused_optimizer!r}"
        if self.signed:
            s += ", signed=True"
        if self.importance_weight is not None:
            s += f", importance_rows={self.importance_weight.shape[0]}"
        if self.hot_ids is not None:
            s += f", hot_rows={self.num_hot}"
        if self.private is not None:
            s += f", private_dim={self.private.embedding_dim}"
        return s


class BloomEmbedding(_BloomTable):
    r"""A drop-in :class:`torch.nn.Embedding` whose table is
    ``compression_ratio`` times smaller.

    Each id is hashed by ``num_hash_functions`` murmurhash3 functions into a
    table of ``num_rows`` rows, and its vector is the sum of those rows
    (Serra & Karatzoglou, "Getting deep recommenders fit", RecSys 2017).
    Hashing is Spotlight's ``BloomEmbedding``'s, bit for bit, and the table
    is the submodule ``embeddings``, so a Spotlight checkpoint loads
    unchanged.  Rows are hashed on the fly: no per-id table is kept unless
    ``hash_cache=True``.

    Args:
        num_embeddings (int or None): size of the id space; ids must lie in
            ``[0, num_embeddings)``.  ``None`` admits any id below ``2**63``
            and needs ``num_rows``.
        embedding_dim (int): size of each embedding vector.
        compression_ratio (float): the table has
            ``int(compression_ratio * num_embeddings)`` rows. Default: 0.2.
        num_hash_functions (int): ``k``, rows summed per id, 1 to 24. Default: 4.
        bag (bool): accepted for Spotlight compatibility; the ``k``-sum is
            always fused. Default: ``False``.
        padding_idx (int, optional): this id gives a zero vector and no
            gradient; other ids hash normally. ``None`` for no padding.
            Default: 0, as in Spotlight.
        num_rows (int, optional): the table's rows, overriding ``compression_ratio``.
        hash_cache (bool): precompute the ``(num_embeddings, k)`` row table
            (Spotlight's cache, stored as int32 when the table fits) instead
            of hashing in every call. Default: ``False``.
        backend (str): ``"auto"`` (Triton kernels for CUDA tensors when
            Triton imports, else PyTorch), ``"triton"`` or ``"torch"``.
        sparse (bool): ``weight.grad`` is a coalesced sparse COO tensor over the
            touched rows, as with ``nn.Embedding(sparse=True)`` (for
            ``torch.optim.SparseAdam``, ``SGD``, ``Adagrad``). Default: ``False``.
        fused_optimizer (FusedSGD or FusedRowWiseAdagrad, optional): train the
            table inside the backward pass, touched rows only, with no
            gradient tensor (see :mod:`triton_bloom.optim`). Default: ``None``.
        signed (bool): each row enters with the +-1 of a sign hash, so that
            collisions cancel in expectation (Weinberger et al. 2009).
            Default: ``False``.
        importance (bool): learn per-id importance weights of the ``k`` rows,
            read from a second hashed table ``importance_weight`` of shape
            ``(importance_rows, k)``, initialised to ones (hash embeddings,
            Svenstrup et al. 2017). Default: ``False``.
        importance_rows (int, optional): rows of that table. Default: ``num_rows``.
        hot_ids (Tensor, optional): ids that each get a private row of their
            own instead of ``k`` shared ones: the frequent ids, whose
            collisions cost the most. The table gets ``len(hot_ids)`` rows
            after its ``num_rows`` shared ones; the hot set is a buffer
            (``hot_ids``, sorted) searched inside the kernels, so it costs
            memory in its own size only. Default: ``None``.
        private_dim (int): give every id a private ``private_dim``-dimensional
            code (the submodule ``private``) times a shared projection
            ``private_projection`` of shape ``(private_dim, embedding_dim)``,
            added to its vector: the low-rank part of the embedding, free of
            collisions, at ``private_dim`` parameters per id. Codes start at
            std ``1/embedding_dim`` and the projection at ``1/sqrt(private_dim)``,
            so the projected code has the table's per-element scale. Its parameters
            train with the model's optimizer, never the fused one; with
            ``sparse=True`` its gradient is sparse too. Default: 0 (none).
        device (torch.device, optional): where the table lives.
        dtype (torch.dtype, optional): of the table; float32, float64, float16
            or bfloat16 (half-precision tables sum and accumulate in float32).

    Attributes:
        embeddings (ScaledEmbedding): the compressed table; its weight of shape
            ``(num_rows, embedding_dim)`` is initialised from
            :math:`\mathcal{N}(0, 1/\text{embedding\_dim})` (standard deviation).
        weight (Tensor): alias of ``embeddings.weight``.

    Shape:
        - Input: :math:`(*)`, IntTensor or LongTensor of ids
        - Output: :math:`(*, H)`, where ``H = embedding_dim``

    Examples::

        >>> emb = BloomEmbedding(1_000_000, 64, compression_ratio=0.2, num_hash_functions=4)
        >>> emb.weight.shape
        torch.Size([200000, 64])
        >>> emb(torch.tensor([[1, 2, 4, 5], [4, 3, 2, 9]])).shape
        torch.Size([2, 4, 64])
    """

    def __init__(
        self,
        num_embeddings: Optional[int],
        embedding_dim: int,
        compression_ratio: float = 0.2,
        num_hash_functions: int = 4,
        bag: bool = False,
        padding_idx: Optional[int] = 0,
        *,
        num_rows: Optional[int] = None,
        hash_cache: bool = False,
        backend: str = "auto",
        sparse: bool = False,
        fused_optimizer=None,
        signed: bool = False,
        importance: bool = False,
        importance_rows: Optional[int] = None,
        hot_ids: Optional[torch.Tensor] = None,
        private_dim: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            compression_ratio=compression_ratio,
            num_hash_functions=num_hash_functions,
            padding_idx=padding_idx,
            num_rows=num_rows,
            backend=backend,
            sparse=sparse,
            fused_optimizer=fused_optimizer,
            signed=signed,
            importance=importance,
            importance_rows=importance_rows,
            hot_ids=hot_ids,
            private_dim=private_dim,
            device=device,
            dtype=dtype,
        )
        self._bag = bag
        self.hash_cache: Optional[torch.Tensor]
        if hash_cache:
            if num_embeddings is None:
                raise ValueError("hash_cache=True needs num_embeddings")
            table = bloom_hash(torch.arange(num_embeddings, device=device), num_hash_functions, self.num_rows)
            if self.num_rows < 2**31:
                table = table.to(torch.int32)
            self.register_buffer("hash_cache", table, persistent=False)
        else:
            self.hash_cache = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = lookup(input, self.embeddings.weight, hash_cache=self.hash_cache, **self._options())
        if self.private is not None:
            codes = F.embedding(input, self.private.weight, self.padding_idx, sparse=self.sparse)
            out = out + codes @ self.private_projection
        return out

    def topk(
        self,
        queries: torch.Tensor,
        k: int,
        candidates: Optional[torch.Tensor] = None,
        exclude: Optional[torch.Tensor] = None,
        *,
        bias: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
    ):
        """The ``k`` ids whose vectors score highest (``queries @ vector``,
        plus ``bias[id]`` when given) for each of the ``(Q, embedding_dim)``
        queries, ties to the smaller id, without materialising the catalogue:
        :func:`triton_bloom.output.bloom_topk`.  Returns ``TopK(scores, ids)``,
        each ``(Q, k)``."""
        from .output import bloom_topk

        return bloom_topk(queries, self, k, candidates=candidates, exclude=exclude, bias=bias, chunk_size=chunk_size)

    def rank(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        exclude: Optional[torch.Tensor] = None,
        *,
        bias: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
    ):
        """Where each query's target id ranks among every id (ties count half),
        without materialising the catalogue: :func:`triton_bloom.output.bloom_rank`.
        Returns ``Ranks(above, others)``, each ``(Q,)``."""
        from .output import bloom_rank

        return bloom_rank(queries, targets, self, exclude=exclude, bias=bias, chunk_size=chunk_size)

    def logits(self, hidden: torch.Tensor, *, chunk_size: Optional[int] = None) -> torch.Tensor:
        """``hidden @ V^T`` over every id (a tied output layer), ``(*, num_embeddings)``,
        differentiable in ``hidden`` and the table: :func:`triton_bloom.output.bloom_logits`."""
        from .output import bloom_logits

        return bloom_logits(hidden, self, chunk_size=chunk_size)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.hash_cache is not None:
            s += ", hash_cache=True"
        return s


class BloomEmbeddingBag(_BloomTable):
    r"""A drop-in :class:`torch.nn.EmbeddingBag` whose table is
    ``compression_ratio`` times smaller.

    Each id's vector is the sum of its ``num_hash_functions`` Bloom rows, the
    same vector :class:`BloomEmbedding` gives it, and each bag pools its ids'
    vectors by ``mode`` without materialising them: on the GPU one Triton
    kernel hashes, gathers and pools.

    Args:
        num_embeddings (int or None): size of the id space (``None`` admits
            any id below ``2**63`` and needs ``num_rows``).
        embedding_dim (int): size of each embedding vector.
        compression_ratio (float): the table has
            ``int(compression_ratio * num_embeddings)`` rows. Default: 0.2.
        num_hash_functions (int): ``k``, rows summed per id, 1 to 24. Default: 4.
        mode (str): ``"sum"``, ``"mean"`` or ``"max"``, as in ``nn.EmbeddingBag``.
            Default: ``"sum"``.
        padding_idx (int, optional): this id is left out of the pooling (and
            of the mean's count) and gets no gradient. Default: ``None``.
        include_last_offset (bool): ``offsets`` carries the end of the last bag
            too (CSR layout). Default: ``False``.
        num_rows (int, optional): the table's rows, overriding ``compression_ratio``.
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"``.
        sparse (bool): sparse COO ``weight.grad``, as in ``nn.EmbeddingBag``.
        fused_optimizer (FusedSGD or FusedRowWiseAdagrad, optional): train the
            table inside the backward pass (see :mod:`triton_bloom.optim`).
        signed (bool): as in :class:`BloomEmbedding`. Default: ``False``.
        importance (bool): as in :class:`BloomEmbedding`. Default: ``False``.
        importance_rows (int, optional): as in :class:`BloomEmbedding`.
        hot_ids (Tensor, optional): as in :class:`BloomEmbedding`.
        private_dim (int): as in :class:`BloomEmbedding`, with ``mode="sum"``
            or ``"mean"`` only. Default: 0 (none).
        device (torch.device, optional): where the table lives.
        dtype (torch.dtype, optional): of the table (float32, float64, float16
            or bfloat16).

    Attributes:
        embeddings (ScaledEmbedding): the compressed table (state key
            ``embeddings.weight``), initialised from
            :math:`\mathcal{N}(0, 1/\text{embedding\_dim})`.
        weight (Tensor): alias of ``embeddings.weight``.

    Inputs: ``input`` (IntTensor or LongTensor), ``offsets`` (optional),
    ``per_sample_weights`` (optional), as in ``nn.EmbeddingBag``:

        - 2-D ``input`` of shape ``(B, N)``: ``B`` bags of ``N`` ids each;
          ``offsets`` must be ``None``.
        - 1-D ``input`` of shape ``(n,)``: ids of all bags one after another,
          ``offsets`` the start of each bag (plus the end of the last one with
          ``include_last_offset=True``).
        - ``per_sample_weights``: floats of ``input``'s shape that scale each
          id's vector; ``mode="sum"`` only.

    Shape:
        - Output: :math:`(B, H)`, where ``H = embedding_dim``. Empty bags give zeros.

    Examples::

        >>> bag = BloomEmbeddingBag(1_000_000, 32, mode="mean")
        >>> ids = torch.tensor([11, 22, 33, 44, 55, 66])
        >>> offsets = torch.tensor([0, 2, 2])  # bags: [11, 22], [], [33, 44, 55, 66]
        >>> bag(ids, offsets).shape
        torch.Size([3, 32])
    """

    def __init__(
        self,
        num_embeddings: Optional[int],
        embedding_dim: int,
        compression_ratio: float = 0.2,
        num_hash_functions: int = 4,
        mode: str = "sum",
        padding_idx: Optional[int] = None,
        *,
        include_last_offset: bool = False,
        num_rows: Optional[int] = None,
        backend: str = "auto",
        sparse: bool = False,
        fused_optimizer=None,
        signed: bool = False,
        importance: bool = False,
        importance_rows: Optional[int] = None,
        hot_ids: Optional[torch.Tensor] = None,
        private_dim: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode has to be one of {MODES}, got {mode!r}")
        if private_dim and mode == "max":
            raise NotImplementedError(
                f"private_dim={private_dim} with mode='max' is not supported: the max of a sum is not the sum of "
                "the maxima, so the private part cannot be pooled apart; use mode='sum' or 'mean'"
            )
        super().__init__(
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            compression_ratio=compression_ratio,
            num_hash_functions=num_hash_functions,
            padding_idx=padding_idx,
            num_rows=num_rows,
            backend=backend,
            sparse=sparse,
            fused_optimizer=fused_optimizer,
            signed=signed,
            importance=importance,
            importance_rows=importance_rows,
            hot_ids=hot_ids,
            private_dim=private_dim,
            device=device,
            dtype=dtype,
        )
        self.mode = mode
        self.include_last_offset = include_last_offset

    def forward(
        self,
        input: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        out = bag_lookup(
            input,
            self.embeddings.weight,
            offsets,
            per_sample_weights,
            mode=self.mode,
            include_last_offset=self.include_last_offset,
            **self._options(),
        )
        if self.private is not None:
            # Sum and mean commute with the projection: pool the codes, then project.
            codes = F.embedding_bag(
                input,
                self.private.weight,
                offsets,
                mode=self.mode,
                sparse=self.sparse,
                per_sample_weights=per_sample_weights,
                include_last_offset=self.include_last_offset,
                padding_idx=self.padding_idx,
            )
            out = out + codes @ self.private_projection
        return out

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", mode={self.mode!r}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        return s
