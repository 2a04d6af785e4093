"""The layers the open-id demo compares at one byte budget, everything
counted by :func:`~triton_bloom.embedding_bytes` (tables, hot-id sets, id
maps): the rivals a user would try before Bloom, written here as small
modules, and the Bloom layouts.

- :class:`VocabularyEmbedding`: a row for each of the ``V`` most frequent
  ids seen in training and one out-of-vocabulary row for every other id;
  the id map is a sorted int64 array searched with ``searchsorted`` (8 B
  per id, counted).
- the hashing trick: ``BloomEmbedding(None, d, num_rows=R, num_hash_functions=1)``.
- :class:`QuotientRemainderEmbedding`: compositional embeddings (Shi et al.,
  "Compositional Embeddings Using Complementary Partitions for
  Memory-Efficient Recommendation Systems", KDD 2020), multiplicative: a
  raw id is hashed into ``[0, Q * R)`` and its vector is
  ``quotient[h // R] * remainder[h % R]``.
- Bloom with ``k`` hashes, with or without hot rows for the most frequent ids.
- served at int4 (:data:`SERVED_BITS`): the vocabulary table,
  quotient-remainder, plain Bloom and the planner's layout, each with the
  rows int4 buys at the budget, trained in float32 and quantized after
  training to the library's row format (:func:`served`), so that the
  demo shows whether "fewer rows" or "fewer bits" buys more per byte.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .hashing import bloom_hash
from .modules import BloomEmbedding
from .quantized import quantize
from .quantized_ops import dequantize_rows, quantize_rows, table_bytes

__all__ = [
    "VocabularyEmbedding",
    "QuotientRemainderEmbedding",
    "QuantizedRows",
    "served",
    "layer_specs",
    "HOT_SHARES",
    "SERVED_BITS",
]

# Shares of the budget the hot rows take in the "hot rows + Bloom tail" rows.
HOT_SHARES = (0.25, 0.5, 0.75)
ROW_INDEX_BYTES = 8  # a raw id in a sorted int64 array: the vocabulary's map and the hot set alike
SERVED_BITS = 4  # the quantized rows: int4, the fewest bits the library serves


class VocabularyEmbedding(nn.Module):
    """A table of the ids in ``vocabulary`` plus one out-of-vocabulary row
    (the last) shared by every other id.

    Args:
        vocabulary (Tensor): distinct int64 ids.
        embedding_dim (int): size of each vector.
        sparse (bool): sparse gradients, as ``nn.Embedding(sparse=True)``.

    Shape:
        - Input: :math:`(*)` int64 raw ids
        - Output: :math:`(*, H)`, ``H = embedding_dim``

    Examples::

        >>> emb = VocabularyEmbedding(torch.tensor([2**40, 7, 123]), 4)
        >>> emb(torch.tensor([7, 8])).shape
        torch.Size([2, 4])
    """

    def __init__(self, vocabulary: torch.Tensor, embedding_dim: int, sparse: bool = False):
        super().__init__()
        vocabulary = torch.sort(torch.as_tensor(vocabulary, dtype=torch.int64)).values
        if vocabulary.numel() and bool((vocabulary[1:] == vocabulary[:-1]).any()):
            raise ValueError("vocabulary ids must be distinct")
        self.register_buffer("vocabulary", vocabulary)
        self.table = nn.Embedding(vocabulary.numel() + 1, embedding_dim, sparse=sparse)
        nn.init.normal_(self.table.weight, 0.0, 1.0 / embedding_dim)

    def rows(self, input: torch.Tensor) -> torch.Tensor:
        """The row of each id: its place in the vocabulary, or the OOV row."""
        size = self.vocabulary.numel()
        if size == 0:
            return torch.zeros_like(input)
        where = torch.searchsorted(self.vocabulary, input).clamp_(max=size - 1)
        return torch.where(self.vocabulary[where] == input, where, size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.table(self.rows(input))


class QuotientRemainderEmbedding(nn.Module):
    """Multiplicative quotient-remainder embedding of raw ids.

    Each id is hashed (murmurhash3, the first of Bloom's seeds) into
    ``[0, num_quotient * num_remainder)``, and its vector is the product of
    a quotient row and a remainder row: two ids share a vector only when
    both their rows coincide.  The quotient table starts as Bloom's tables do,
    ``normal(0, 1/embedding_dim)``, and the remainder table near ones, so that
    the product starts at the same scale.

    Args:
        num_quotient (int), num_remainder (int): rows of the two tables.
        embedding_dim (int): size of each vector.
        sparse (bool): sparse gradients.

    Examples::

        >>> emb = QuotientRemainderEmbedding(50, 60, 8)
        >>> emb(torch.tensor([2**62, 5])).shape
        torch.Size([2, 8])
    """

    def __init__(self, num_quotient: int, num_remainder: int, embedding_dim: int, sparse: bool = False):
        super().__init__()
        if num_quotient < 1 or num_remainder < 1:
            raise ValueError(f"both tables need a row, got {num_quotient} and {num_remainder}")
        if num_quotient * num_remainder >= 2**31:
            raise ValueError(f"num_quotient * num_remainder must be below 2**31, got {num_quotient * num_remainder}")
        self.num_remainder = num_remainder
        self.space = num_quotient * num_remainder
        self.quotient = nn.Embedding(num_quotient, embedding_dim, sparse=sparse)
        self.remainder = nn.Embedding(num_remainder, embedding_dim, sparse=sparse)
        nn.init.normal_(self.quotient.weight, 0.0, 1.0 / embedding_dim)
        nn.init.normal_(self.remainder.weight, 1.0, 1.0 / embedding_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        h = bloom_hash(input, 1, self.space)[..., 0]
        return self.quotient(h // self.num_remainder) * self.remainder(h % self.num_remainder)


class QuantizedRows(nn.Module):
    """An ``nn.Embedding`` served in the library's quantized row format
    (``triton_bloom/quantized_ops.py``: codes, a scale byte a row, the
    table's scale grid and column offsets), for the rivals that are not Bloom
    tables; a lookup dequantises only the rows it gathers.

    Args:
        embedding (nn.Embedding): the trained table.
        bits (int): 8 or 4.

    Examples::

        >>> rows = QuantizedRows(nn.Embedding(10, 6), 4)
        >>> rows(torch.tensor([3, 9])).shape
        torch.Size([2, 6])
        >>> triton_bloom.embedding_bytes(rows)  # 10 rows of 16 B codes and a scale byte, grid, offsets
        202
    """

    def __init__(self, embedding: nn.Embedding, bits: int):
        super().__init__()
        self.bits, self.embedding_dim = bits, embedding.embedding_dim
        codes, scale_codes, scale_grid, column_offset = quantize_rows(embedding.weight, bits)
        self.register_buffer("codes", codes)
        self.register_buffer("scale_codes", scale_codes)
        self.register_buffer("scale_grid", scale_grid)
        self.register_buffer("column_offset", column_offset)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(
            self.codes[input],
            self.scale_codes[input],
            self.scale_grid,
            self.column_offset,
            self.bits,
            self.embedding_dim,
        )


def served(layer: nn.Module, bits: int) -> nn.Module:
    """``layer`` (trained) as it is served with ``bits``-bit rows: a Bloom
    table through :func:`~triton_bloom.quantize`, any other layer a copy with
    each ``nn.Embedding`` in :class:`QuantizedRows`."""
    if isinstance(layer, BloomEmbedding):
        return quantize(layer, bits)
    model = copy.deepcopy(layer)
    for name, child in list(model.named_modules()):
        if isinstance(child, nn.Embedding):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, QuantizedRows(child, bits))
    return model


def top_ids(ids: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most frequent of ``ids`` (ties to the earlier id)."""
    order = torch.sort(counts, descending=True, stable=True).indices
    return ids[order[: max(0, n)]]


def layer_specs(ids, counts, embedding_dim, budget, *, full=True, planner=True, bits=SERVED_BITS):
    """What the demo trains: ``[(label, build, over_budget)]``, where
    ``build(sparse)`` makes the layer to train; a layer served quantized
    has ``build.bits``, and its bytes are those of ``served(layer,
    build.bits)``.

    Args:
        ids (Tensor): distinct raw ids seen in training, sorted.
        counts (Tensor): their training counts.
        embedding_dim (int): ``d``.
        budget (int): bytes every in-budget layer keeps to.
        full (bool): add the full vocabulary table, over budget.
        planner (bool): add the layout :func:`~triton_bloom.plan_embedding`
            picks for the budget (its plan on the builder: ``build.plan``).
        bits (int, optional): add the layers served with ``bits``-bit rows
            (labels ``int4 ...``).  Default: :data:`SERVED_BITS`.
    """
    specs = _format_specs(ids, counts, embedding_dim, budget, None, planner)
    if bits:
        specs += _format_specs(ids, counts, embedding_dim, budget, bits, planner)
    if full:
        d = embedding_dim
        specs.append((f"full {ids.numel():,} rows", lambda sparse: VocabularyEmbedding(ids, d, sparse=sparse), True))
    return specs


def _format_specs(ids, counts, d, budget, bits, planner):
    """The layers of one row format at the budget: float32 rows (``bits``
    ``None``: every layout), or rows served with ``bits`` bits (labels
    ``int4 ...``: the vocabulary, quotient-remainder, Bloom k=2 and the
    planner's layout), each with the rows the format buys, everything
    counted as :func:`~triton_bloom.embedding_bytes` counts the served layer
    (a quantized table's scale grid and column offsets, ``fixed``, once a
    table); the quantized ones train in float32 at that size."""
    fixed = 0 if bits is None else table_bytes(0, d, bits)
    row = 4 * d if bits is None else table_bytes(1, d, bits) - fixed
    name = "" if bits is None else f"int{bits} "
    rows = (budget - fixed) // row
    if rows < 2:
        raise ValueError(f"a budget of {budget} B holds fewer than 2 rows of {row} B")

    def spec(label, build):
        if bits is not None:
            build.bits = bits
        return (name + label, build, False)

    specs = []
    vocab = (budget - fixed - row) // (row + ROW_INDEX_BYTES)  # V rows and ids, and the OOV row
    vocabulary = top_ids(ids, counts, vocab)
    specs.append(spec(f"vocab {vocab:,}+OOV", lambda sparse: VocabularyEmbedding(vocabulary, d, sparse=sparse)))
    if bits is None:
        specs.append(
            spec(
                "hashing trick k=1",
                lambda sparse: BloomEmbedding(
                    None, d, num_rows=rows, num_hash_functions=1, padding_idx=None, sparse=sparse
                ),
            )
        )
    pair = (budget - 2 * fixed) // row  # quotient-remainder: two tables
    specs.append(
        spec(
            "quotient-remainder",
            lambda sparse: QuotientRemainderEmbedding(pair // 2, pair - pair // 2, d, sparse=sparse),
        )
    )
    for k in (2, 4) if bits is None else (2,):
        specs.append(
            spec(
                f"Bloom k={k}",
                lambda sparse, k=k: BloomEmbedding(
                    None, d, num_rows=rows, num_hash_functions=k, padding_idx=None, sparse=sparse
                ),
            )
        )
    for share in HOT_SHARES if bits is None else ():
        hot = min(int(share * budget) // (row + ROW_INDEX_BYTES), ids.numel())
        shared = (budget - hot * (row + ROW_INDEX_BYTES)) // row
        hot_ids = top_ids(ids, counts, hot)
        specs.append(
            spec(
                f"hot {share:.0%} + Bloom k=2",
                lambda sparse, hot_ids=hot_ids, shared=shared: BloomEmbedding(
                    None, d, num_rows=shared, num_hash_functions=2, padding_idx=None, sparse=sparse, hot_ids=hot_ids
                ),
            )
        )
    if planner:
        from .planner import plan_embedding

        plan = plan_embedding(counts, d, budget, ids=ids, bits=bits)

        def build(sparse):
            return plan.build(sparse=sparse)

        build.plan = plan
        specs.append(spec(f"planner: {plan.label()}", build))
    return specs
