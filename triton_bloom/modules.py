"""Modules: ``BloomEmbedding``, ``BloomEmbeddingBag``, and the seed's
``ScaledEmbedding``, ``ZeroEmbedding`` and ``ScaledEmbeddingBag``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import dispatch
from .checks import WEIGHT_DTYPES, check_training_options
from .constants import MODES
from .functional import bag_lookup, lookup
from .hashing import IMPORTANCE_SEED, SEEDS, SIGN_SEEDS, bloom_hash, check_num_hash_functions

__all__ = ["BloomEmbedding", "BloomEmbeddingBag", "ScaledEmbedding", "ZeroEmbedding", "ScaledEmbeddingBag"]


class ScaledEmbedding(nn.Embedding):
    r"""An :class:`torch.nn.Embedding` initialised from
    :math:`\mathcal{N}(0, 1/\text{embedding\_dim})` (standard deviation
    ``1 / embedding_dim``), as in Spotlight.  Takes ``nn.Embedding``'s arguments.

    Examples::

        >>> emb = ScaledEmbedding(10, 4, padding_idx=0)
        >>> emb(torch.tensor([0, 3])).shape
        torch.Size([2, 4])
    """

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0, 1.0 / self.embedding_dim)
            if self.padding_idx is not None:
                self.weight[self.padding_idx].fill_(0)


class ZeroEmbedding(nn.Embedding):
    r"""An :class:`torch.nn.Embedding` initialised to zeros, as Spotlight uses
    for biases.  Takes ``nn.Embedding``'s arguments.

    Examples::

        >>> bias = ZeroEmbedding(10, 1)
        >>> bias(torch.tensor([3])).sum().item()
        0.0
    """

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()


class ScaledEmbeddingBag(nn.EmbeddingBag):
    r"""An :class:`torch.nn.EmbeddingBag` initialised from
    :math:`\mathcal{N}(0, 1/\text{embedding\_dim})`, as in Spotlight.  Takes
    ``nn.EmbeddingBag``'s arguments.

    Examples::

        >>> bag = ScaledEmbeddingBag(10, 4, mode="sum")
        >>> bag(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 4])
    """

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0, 1.0 / self.embedding_dim)
            if self.padding_idx is not None:
                self.weight[self.padding_idx].fill_(0)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def compressed_rows(num_embeddings: Optional[int], compression_ratio: float, num_rows: Optional[int]) -> int:
    """Rows of the compressed table: ``num_rows`` if given, else Spotlight's
    ``int(compression_ratio * num_embeddings)``; ``ValueError`` below one row."""
    if num_rows is not None:
        return _positive_int("num_rows", num_rows)
    if num_embeddings is None:
        raise ValueError("num_rows is required when num_embeddings is None")
    if not compression_ratio > 0:
        raise ValueError(f"compression_ratio must be positive, got {compression_ratio!r}")
    rows = int(compression_ratio * num_embeddings)
    if rows < 1:
        raise ValueError(
            f"compression_ratio={compression_ratio} of num_embeddings={num_embeddings} "
            f"leaves {rows} rows; the table needs at least one"
        )
    return rows


def normalize_padding_idx(padding_idx: Optional[int], num_embeddings: Optional[int]) -> Optional[int]:
    """``padding_idx`` as a non-negative id (negative counts from
    ``num_embeddings``, as in ``nn.Embedding``); ``ValueError`` when out of range."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
    if num_embeddings is None:
        if padding_idx < 0:
            raise ValueError(f"padding_idx={padding_idx} must be non-negative when num_embeddings is None")
        return padding_idx
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx={padding_idx} must be within num_embeddings={num_embeddings}")
    return padding_idx % num_embeddings


class _BloomTable(nn.Module):
    """What both Bloom modules share: the checked sizes, the hashing
    parameters, and the compressed table as the submodule ``embeddings``."""

    def __init__(self, *, num_embeddings, embedding_dim, compression_ratio, num_hash_functions, padding_idx,
                 num_rows, backend, sparse, fused_optimizer, signed, importance, importance_rows, device,
                 dtype):  # fmt: skip
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
        # The table knows it is sparse: DDP reads that flag off nn.Embedding
        # modules to expect sparse gradients.
        self.embeddings = ScaledEmbedding(self.num_rows, embedding_dim, sparse=sparse, device=device, dtype=dtype)
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
    _LOOKUP_OPTIONS = ("num_hash_functions", "padding_idx", "num_embeddings", "backend", "sparse", "fused_optimizer",
                       "signed")  # fmt: skip

    def _options(self) -> dict:
        """The lookup's options, checked in ``__init__``."""
        return {name: getattr(self, name) for name in self._LOOKUP_OPTIONS} | {"importance": self.importance_weight}

    @property
    def weight(self) -> torch.Tensor:
        """The compressed table, ``embeddings.weight``."""
        return self.embeddings.weight

    def reset_parameters(self) -> None:
        self.embeddings.reset_parameters()
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
        return spec

    def get_extra_state(self) -> dict:
        return {"hash_spec": self.hash_spec()}

    def set_extra_state(self, state) -> None:
        saved = state.get("hash_spec") if isinstance(state, dict) else None
        if saved is None:
            raise ValueError(f"this checkpoint's extra state holds no hash specification: {state!r}")
        mine = self.hash_spec()
        differ = sorted(key for key in saved.keys() | mine.keys() if saved.get(key) != mine.get(key))
        if differ:
            details = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, module {mine.get(key)!r}" for key in differ)
            raise ValueError(
                f"checkpoint was saved with other hashing than this {type(self).__name__} uses ({details}); "
                "loading it would read other rows for the same ids"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
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
        device, dtype: of the table; float32, float64, float16 or bfloat16
            (half-precision tables sum and accumulate in float32).

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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                         compression_ratio=compression_ratio, num_hash_functions=num_hash_functions,
                         padding_idx=padding_idx, num_rows=num_rows, backend=backend, sparse=sparse,
                         fused_optimizer=fused_optimizer, signed=signed, importance=importance,
                         importance_rows=importance_rows, device=device, dtype=dtype)  # fmt: skip
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
        return lookup(input, self.embeddings.weight, hash_cache=self.hash_cache, **self._options())

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
        signed, importance, importance_rows: the variants, as in :class:`BloomEmbedding`.
        device, dtype: of the table (float32, float64, float16 or bfloat16).

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
        device=None,
        dtype=None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode has to be one of {MODES}, got {mode!r}")
        super().__init__(num_embeddings=num_embeddings, embedding_dim=embedding_dim,
                         compression_ratio=compression_ratio, num_hash_functions=num_hash_functions,
                         padding_idx=padding_idx, num_rows=num_rows, backend=backend, sparse=sparse,
                         fused_optimizer=fused_optimizer, signed=signed, importance=importance,
                         importance_rows=importance_rows, device=device, dtype=dtype)  # fmt: skip
        self.mode = mode
        self.include_last_offset = include_last_offset

    def forward(
        self,
        input: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return bag_lookup(input, self.embeddings.weight, offsets, per_sample_weights, mode=self.mode,
                          include_last_offset=self.include_last_offset, **self._options())  # fmt: skip

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", mode={self.mode!r}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        return s
