"""Quantized Bloom tables for inference: ``quantize`` turns a trained
``BloomEmbedding`` or ``BloomEmbeddingBag`` into a ``QuantizedBloomEmbedding``
or ``QuantizedBloomEmbeddingBag`` whose rows are int8 or int4 codes with a
one-byte scale per row, symmetric around the table's mean row (the
format: ``quantized_ops.py``).  The lookups
dequantise the rows they gather and sum in float32, on the Triton kernels or
the PyTorch path by the same backend rule as the float modules."""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from . import dispatch
from .checks import check_input, normalize_padding_idx
from .constants import MODES
from .functional import bag_layout
from .hashing import check_num_hash_functions
from .layout import WholeCheckpointLoad, check_checkpoint_hot_ids, positive_int, sorted_hot_ids
from .modules import BloomEmbedding, BloomEmbeddingBag, _BloomTable
from .quantized_ops import (
    LAYOUT,
    TRAINING_ERROR,
    check_bits,
    dequantize_rows,
    quantize_rows,
    quantized_bag_forward,
    quantized_forward,
    row_bytes,
)

__all__ = ["QuantizedBloomEmbedding", "QuantizedBloomEmbeddingBag", "quantize"]


class _QuantizedTable(WholeCheckpointLoad, nn.Module):
    _EXTRA_STATE_REQUIRED = "quantization format and hashing"
    """What both quantized modules share: the hashing, the quantized rows as
    buffers (``codes`` and ``scale_codes``, the hot ids' private rows at the
    end, after ``num_rows`` shared ones; ``scale_grid`` and
    ``column_offset``), and the checked state dict."""

    _float_class = BloomEmbedding

    def __init__(
        self,
        *,
        num_embeddings,
        embedding_dim,
        num_rows,
        bits,
        num_hash_functions,
        padding_idx,
        signed,
        importance_rows,
        hot_ids,
        backend,
        device,
    ):
        super().__init__()
        if num_embeddings is not None:
            positive_int("num_embeddings", num_embeddings)
        positive_int("embedding_dim", embedding_dim)
        check_num_hash_functions(num_hash_functions)
        dispatch.check_backend(backend)
        self.bits = check_bits(bits)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_rows = positive_int("num_rows", num_rows)
        self.num_hash_functions = num_hash_functions
        self.padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
        self.signed = bool(signed)
        self.backend = backend
        self.hot_ids: Optional[torch.Tensor]
        hot = None if hot_ids is None else sorted_hot_ids(hot_ids, num_embeddings, self.padding_idx, device)
        self.register_buffer("hot_ids", hot)
        rows = self.num_rows + self.num_hot
        self.register_buffer(
            "codes", torch.zeros((rows, row_bytes(embedding_dim, bits)), dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale_codes", torch.zeros(rows, dtype=torch.uint8, device=device))
        self.register_buffer("scale_grid", torch.zeros(2, dtype=torch.float32, device=device))
        self.register_buffer("column_offset", torch.zeros(embedding_dim, dtype=torch.float32, device=device))
        self.importance_weight: Optional[torch.Tensor]
        importance = None
        if importance_rows is not None:
            rows = positive_int("importance_rows", importance_rows)
            importance = torch.ones((rows, num_hash_functions), dtype=torch.float32, device=device)
        self.register_buffer("importance_weight", importance)

    def _apply(self, fn, recurse=True):
        # .half(), .double() and .to(dtype) convert floating-point buffers:
        # the format's float32 scale grid and column offsets, and the
        # importance weights, keep their dtype, moved as integers.
        kept = {name: torch.int32 for name in ("scale_grid", "column_offset", "importance_weight")}
        originals = {name: self._buffers[name] for name in kept if self._buffers.get(name) is not None}
        for name, tensor in originals.items():
            self._buffers[name] = tensor.view(kept[name])
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, tensor in originals.items():
                self._buffers[name] = self._buffers[name].view(tensor.dtype)

    @property
    def num_hot(self) -> int:
        """Ids with a private row (0 without ``hot_ids``)."""
        return self.hot_ids.numel() if self.hot_ids is not None else 0

    # The float modules' specification, from the same attributes: a quantized
    # checkpoint never loads into a module that hashes otherwise.
    hash_spec = _BloomTable.hash_spec

    def quantization_format(self) -> dict:
        """The rows' format, saved in the state dict and checked on load."""
        return {
            "bits": self.bits,
            "layout": LAYOUT,
            "embedding_dim": self.embedding_dim,
            "row_bytes": self.codes.shape[1],
        }

    def get_extra_state(self) -> dict:
        return {"hash_spec": self.hash_spec(), "quantization": self.quantization_format()}

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("quantization"), dict):
            raise ValueError(
                f"this checkpoint holds no quantization format, so it is not a quantized {type(self).__name__}'s: "
                "load a float checkpoint into the float module and call triton_bloom.quantize on it"
            )
        for name, saved, mine in (
            ("quantization format", state["quantization"], self.quantization_format()),
            ("hash specification", state.get("hash_spec"), self.hash_spec()),
        ):
            if not isinstance(saved, dict):
                raise ValueError(f"this checkpoint's extra state holds no {name}: {state!r}")
            differ = sorted(key for key in saved.keys() | mine.keys() if saved.get(key) != mine.get(key))
            if differ:
                details = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, module {mine.get(key)!r}" for key in differ)
                raise ValueError(
                    f"checkpoint has another {name} than this {type(self).__name__} ({details}); "
                    f"build the module with the checkpoint's settings (e.g. bits={saved.get('bits', '?')}) to load it"
                )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._check_checkpoint(state_dict, prefix, strict=False)
        check_checkpoint_hot_ids(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # Training is refused where it can be seen: asking for gradients, or a
    # lookup on float buffers someone made require them.
    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise RuntimeError(self.training_error())
        return self

    def training_error(self) -> str:
        """Why this table cannot be trained, and what to do instead."""
        return TRAINING_ERROR.format(bits=self.bits)

    def _check_inference(self) -> None:
        floats = [self.scale_grid, self.column_offset]
        floats += [self.importance_weight] if self.importance_weight is not None else []
        if torch.is_grad_enabled() and any(t.requires_grad for t in floats):
            raise RuntimeError(self.training_error())

    def _options(self) -> dict:
        return dict(
            bits=self.bits,
            dim=self.embedding_dim,
            num_hash_functions=self.num_hash_functions,
            padding_idx=self.padding_idx,
            num_embeddings=self.num_embeddings,
            signed=self.signed,
            use_triton=dispatch.use_triton(self.backend, self.codes.device),
        )

    def dequantized_weight(self) -> torch.Tensor:
        """The whole table dequantised, ``(num_rows + hot rows, embedding_dim)``
        float32: what the lookups read, for inspection or fine-tuning."""
        return dequantize_rows(*self._table(), self.bits, self.embedding_dim)

    def _table(self) -> tuple:
        return self.codes, self.scale_codes, self.scale_grid, self.column_offset

    def _float_options(self) -> dict:
        return dict(
            num_rows=self.num_rows,
            num_hash_functions=self.num_hash_functions,
            padding_idx=self.padding_idx,
            signed=self.signed,
            importance=self.importance_weight is not None,
            importance_rows=None if self.importance_weight is None else self.importance_weight.shape[0],
            hot_ids=self.hot_ids,
            backend=self.backend,
            device=self.codes.device,
        )

    def dequantize(self):
        """A float module (``BloomEmbedding`` or ``BloomEmbeddingBag``) with the
        dequantised rows: the way back to training."""
        module = self._float_class(self.num_embeddings, self.embedding_dim, **self._float_options())
        with torch.no_grad():
            module.embeddings.weight.copy_(self.dequantized_weight())
            if self.importance_weight is not None:
                module.importance_weight.copy_(self.importance_weight)
        return module

    @classmethod
    def _from_float(cls, module, bits: int, **extra):
        if module.private is not None:
            raise NotImplementedError(
                f"quantize does not support private_dim={module.private.embedding_dim} yet: the private codes are a "
                "per-id float table; build the module without private_dim, or keep it in float"
            )
        quantized = cls(
            module.num_embeddings,
            module.embedding_dim,
            num_rows=module.num_rows,
            bits=bits,
            num_hash_functions=module.num_hash_functions,
            padding_idx=module.padding_idx,
            signed=module.signed,
            importance_rows=None if module.importance_weight is None else module.importance_weight.shape[0],
            hot_ids=module.hot_ids,
            backend=module.backend,
            device=module.embeddings.weight.device,
            **extra,
        )
        for buffer, value in zip(quantized._table(), quantize_rows(module.embeddings.weight, bits)):
            buffer.copy_(value)
        if module.importance_weight is not None:
            quantized.importance_weight.copy_(module.importance_weight.detach().float())
        return quantized

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, num_rows={self.num_rows}"
        s += f", num_hash_functions={self.num_hash_functions}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.signed:
            s += ", signed=True"
        if self.importance_weight is not None:
            s += f", importance_rows={self.importance_weight.shape[0]}"
        if self.hot_ids is not None:
            s += f", hot_rows={self.num_hot}"
        return s


class QuantizedBloomEmbedding(_QuantizedTable):
    r"""A :class:`~triton_bloom.BloomEmbedding` for inference whose rows are
    int8 or int4 codes with a one-byte scale per row.

    Built by :func:`quantize` from a trained module, or empty (all rows
    zero) to load a quantized checkpoint into.  Each lookup dequantises the
    ``k`` rows it gathers (``(code - centre) * scale + column_offset``) and sums them in
    float32: the output is float32 whatever the float module's dtype was.
    The hashing, padding, signs, importance weights and hot rows are the
    float module's.  There are no parameters (so an optimizer built over
    this module alone fails with PyTorch's "optimizer got an empty parameter
    list"; in a model, the table stays frozen): to train, :meth:`dequantize`.

    Args:
        num_embeddings (int or None): size of the id space.
        embedding_dim (int): size of each vector.
        num_rows (int): the table's shared rows (the hash's modulus).
        bits (int): 8 or 4. Default: 8.
        num_hash_functions (int): ``k``, 1 to 24. Default: 4.
        padding_idx (int, optional): this id gives a zero vector. Default: 0.
        signed (bool): rows enter with their sign hash's +-1. Default: ``False``.
        importance_rows (int, optional): rows of the (float32) importance
            weights, or ``None`` for none.
        hot_ids (Tensor, optional): ids with a private row after the shared ones.
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"``.
        device (torch.device, optional): where the table lives.

    Attributes:
        codes (Tensor): ``(num_rows + H, row_bytes)`` uint8 codes, two a byte
            at 4 bits, each row padded to a multiple of 16 bytes.
        scale_codes (Tensor): ``(num_rows + H,)`` uint8: each row's scale
            on the logarithmic grid ``scale_grid``.
        scale_grid (Tensor): ``(2,)`` float32: the grid's ``lo`` and ``step``.
        column_offset (Tensor): ``(embedding_dim,)`` float32: the mean row.

    Shape:
        - Input: :math:`(*)`, IntTensor or LongTensor of ids
        - Output: :math:`(*, H)` float32, where ``H = embedding_dim``

    Examples::

        >>> emb = BloomEmbedding(10_000, 64, compression_ratio=0.2)
        >>> small = triton_bloom.quantize(emb, bits=4)
        >>> small(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 2, 64])
        >>> round(embedding_bytes(small) / embedding_bytes(emb), 4)
        0.1294
    """

    def __init__(
        self,
        num_embeddings: Optional[int],
        embedding_dim: int,
        *,
        num_rows: int,
        bits: int = 8,
        num_hash_functions: int = 4,
        padding_idx: Optional[int] = 0,
        signed: bool = False,
        importance_rows: Optional[int] = None,
        hot_ids: Optional[torch.Tensor] = None,
        backend: str = "auto",
        device=None,
    ) -> None:
        super().__init__(
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            num_rows=num_rows,
            bits=bits,
            num_hash_functions=num_hash_functions,
            padding_idx=padding_idx,
            signed=signed,
            importance_rows=importance_rows,
            hot_ids=hot_ids,
            backend=backend,
            device=device,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        check_input(input, self.codes)
        self._check_inference()
        return quantized_forward(input, *self._table(), self.importance_weight, self.hot_ids, **self._options())

    # The output side: on Triton the fused quantized scores kernel
    # (kernels/scores.py: rows dequantised as they are gathered, dotted with
    # the queries, no vector written); on PyTorch this module's own lookup,
    # then a dense product.

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
        """The ``k`` ids whose dequantised vectors score highest for each query,
        as :meth:`BloomEmbedding.topk <triton_bloom.BloomEmbedding.topk>`:
        :func:`triton_bloom.output.bloom_topk`."""
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
        """Where each query's target ranks among every id by its dequantised
        vector, as :meth:`BloomEmbedding.rank <triton_bloom.BloomEmbedding.rank>`:
        :func:`triton_bloom.output.bloom_rank`."""
        from .output import bloom_rank

        return bloom_rank(queries, targets, self, exclude=exclude, bias=bias, chunk_size=chunk_size)


class QuantizedBloomEmbeddingBag(_QuantizedTable):
    r"""A :class:`~triton_bloom.BloomEmbeddingBag` for inference whose rows are
    int8 or int4 codes with a one-byte scale per row; pools in
    float32 by ``mode`` (``"sum"``, ``"mean"`` or ``"max"``), with
    ``offsets``, ``include_last_offset`` and ``per_sample_weights`` as in
    :class:`torch.nn.EmbeddingBag`.  Built by :func:`quantize`; the other
    arguments are :class:`QuantizedBloomEmbedding`'s (``padding_idx``
    defaults to ``None`` here, as in the float bag).

    Shape:
        - Output: :math:`(B, H)` float32. Empty bags give zeros.

    Examples::

        >>> bag = BloomEmbeddingBag(10_000, 32, mode="mean")
        >>> small = triton_bloom.quantize(bag, bits=8)
        >>> small(torch.tensor([1, 2, 3]), torch.tensor([0, 2])).shape
        torch.Size([2, 32])
    """

    _float_class = BloomEmbeddingBag

    def __init__(
        self,
        num_embeddings: Optional[int],
        embedding_dim: int,
        *,
        num_rows: int,
        bits: int = 8,
        mode: str = "sum",
        num_hash_functions: int = 4,
        padding_idx: Optional[int] = None,
        include_last_offset: bool = False,
        signed: bool = False,
        importance_rows: Optional[int] = None,
        hot_ids: Optional[torch.Tensor] = None,
        backend: str = "auto",
        device=None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode has to be one of {MODES}, got {mode!r}")
        super().__init__(
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            num_rows=num_rows,
            bits=bits,
            num_hash_functions=num_hash_functions,
            padding_idx=padding_idx,
            signed=signed,
            importance_rows=importance_rows,
            hot_ids=hot_ids,
            backend=backend,
            device=device,
        )
        self.mode = mode
        self.include_last_offset = include_last_offset

    def _float_options(self) -> dict:
        return super()._float_options() | {"mode": self.mode, "include_last_offset": self.include_last_offset}

    def forward(
        self,
        input: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        ids, offsets, per_sample_weights = bag_layout(
            input, offsets, per_sample_weights, self.mode, self.include_last_offset
        )
        check_input(ids, self.codes)
        self._check_inference()
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.float()
        return quantized_bag_forward(
            ids,
            offsets,
            *self._table(),
            per_sample_weights,
            self.importance_weight,
            self.hot_ids,
            mode=MODES.index(self.mode),
            **self._options(),
        )

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", mode={self.mode!r}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        return s


def _quantize_one(module, bits: int):
    if isinstance(module, BloomEmbeddingBag):
        return QuantizedBloomEmbeddingBag._from_float(
            module, bits, mode=module.mode, include_last_offset=module.include_last_offset
        )
    return QuantizedBloomEmbedding._from_float(module, bits)


def quantize(module: nn.Module, bits: int = 8) -> nn.Module:
    r"""An inference copy of ``module`` whose Bloom tables hold int8 or int4 rows.

    A :class:`~triton_bloom.BloomEmbedding` becomes a
    :class:`QuantizedBloomEmbedding`, a :class:`~triton_bloom.BloomEmbeddingBag`
    a :class:`QuantizedBloomEmbeddingBag`; any other module is deep-copied
    with each Bloom submodule so replaced (the rest of the model unchanged).
    Each row is quantized on its own (post-training): ``2**bits`` levels
    symmetric around the table's mean row, at the scale (one byte, on a
    logarithmic grid) that minimises the row's squared error, each value
    rounded to the nearest level.
    ``module`` itself is left as it was.

    Args:
        module (nn.Module): a trained Bloom module, or a model holding some.
        bits (int): 8 or 4. Default: 8.

    Returns:
        nn.Module: the quantized module (or model).

    Raises:
        ValueError: ``bits`` is not 8 or 4, a table holds NaN or infinity,
            or ``module`` holds no Bloom table.
        NotImplementedError: a Bloom module has ``private_dim``.

    Examples::

        >>> emb = BloomEmbedding(100_000, 64, compression_ratio=0.2)
        >>> small = triton_bloom.quantize(emb, bits=4)
        >>> type(small).__name__, small.codes.shape
        ('QuantizedBloomEmbedding', torch.Size([20000, 32]))
    """
    check_bits(bits)
    if isinstance(module, _BloomTable):
        return _quantize_one(module, bits)
    if not isinstance(module, nn.Module):
        raise TypeError(f"quantize takes an nn.Module, got {type(module).__name__}")
    tables = [name for name, child in module.named_modules() if isinstance(child, _BloomTable)]
    if not tables:
        raise ValueError(f"{type(module).__name__} holds no BloomEmbedding or BloomEmbeddingBag to quantize")
    model = copy.deepcopy(module)
    for name in tables:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _quantize_one(getattr(parent, child), bits))
    return model
