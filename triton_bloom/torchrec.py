"""Bloom tables as sharded TorchRec tables (``pip install triton-bloom[torchrec]``).

A Bloom lookup is a TorchRec ``EmbeddingBagCollection`` lookup with sum
pooling over a table of ``num_rows`` rows, fed a ``KeyedJaggedTensor`` whose
ids are replaced by their ``k`` hashed rows (each bag ``k`` times longer).
The sign and importance factors of the variants ride along as the KJT's
weights, so the collection is a weighted one.  An unpooled lookup (a
``BloomEmbedding``) is one bag of ``k`` rows per id.  Everything TorchRec
does with an ``EmbeddingBagCollection`` then applies unchanged:
``DistributedModelParallel`` shards the table-wise, column-wise or row-wise,
FBGEMM's fused optimizers train it inside the backward, and no rank ever
holds a dense gradient of it.  TorchRec is imported by this module alone:
``import triton_bloom`` never needs it.

The pieces, from the bottom up:

- :class:`BloomKJTTransform`: the ``KeyedJaggedTensor`` transform.
- :func:`embedding_bag_configs`: the ``EmbeddingBagConfig`` of each Bloom table.
- :class:`BloomEmbeddingBagCollection` (pooled, like ``BloomEmbeddingBag``;
  returns a ``KeyedTensor``) and :class:`BloomEmbeddingCollection` (unpooled,
  like ``BloomEmbedding``; returns a ``JaggedTensor`` per feature): a
  transform followed by an ``EmbeddingBagCollection`` named ``ebc``, the
  submodule ``DistributedModelParallel`` shards.
- :func:`copy_weights_to_collection` and :func:`copy_weights_from_collection`:
  move trained tables between Bloom modules and a collection, sharded or not,
  checking the hash specification.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from . import dispatch
from .checks import check_id_range
from .hashing import hash_rows, seed_tensor
from .modules import BloomEmbedding, BloomEmbeddingBag
from .reference import row_factors

try:
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        f"triton_bloom.torchrec needs TorchRec and FBGEMM, which failed to import: {exc}. Install the pinned stack: "
        'pip install "triton-bloom[torchrec]" && pip install --no-deps torchrec==1.8.0'
    ) from exc

__all__ = [
    "BloomKJTTransform",
    "BloomEmbeddingBagCollection",
    "BloomEmbeddingCollection",
    "embedding_bag_configs",
    "copy_weights_to_collection",
    "copy_weights_from_collection",
]

# TorchRec's table dtypes for ours; it has no float64 tables.
_DATA_TYPES = {torch.float32: DataType.FP32, torch.float16: DataType.FP16, torch.bfloat16: DataType.BF16}


def _unsupported_options(table: nn.Module) -> Dict[str, object]:
    """The options a Bloom module uses that this path does not implement
    (hot ids' private rows, a private low-dimensional part): hashing without
    them would silently read other rows than the module does."""
    found = {}
    hot = getattr(table, "hot_ids", None)
    if hot is not None and hot.numel():
        found["hot_ids"] = f"<{hot.numel()} ids>"
    private = getattr(table, "private", None)
    if private is not None:
        found["private_dim"] = private.embedding_dim
    return found


def _check_table(name: str, table: nn.Module, pooled: bool) -> None:
    kind = BloomEmbeddingBag if pooled else BloomEmbedding
    if not isinstance(table, kind):
        raise TypeError(f"table {name!r} must be a triton_bloom.{kind.__name__}, got {type(table).__name__}")
    unsupported = _unsupported_options(table)
    if unsupported:
        options = ", ".join(f"{option}={value}" for option, value in unsupported.items())
        raise NotImplementedError(
            f"table {name!r} uses {options}, which triton_bloom.torchrec does not implement: "
            "its lookups would differ from the module's"
        )
    if pooled and table.mode == "max":
        raise NotImplementedError(
            f"table {name!r} has mode='max': TorchRec pools rows, and the max of per-id sums of k rows "
            "is no pooling of rows; use mode='sum' or 'mean'"
        )
    if table.weight.dtype not in _DATA_TYPES:
        raise NotImplementedError(f"table {name!r} has dtype {table.weight.dtype}, which TorchRec tables do not take")


def _feature_map(tables: Mapping[str, nn.Module], feature_names: Optional[Mapping[str, Sequence[str]]]):
    """``{table: [features]}`` (each table reads the feature of its own name
    by default) and ``{feature: table}``; ``ValueError`` on a feature read by
    two tables or a table without features."""
    if not tables:
        raise ValueError("tables is empty: give at least one Bloom table")
    feature_names = dict(feature_names or {})
    unknown = sorted(set(feature_names) - set(tables))
    if unknown:
        raise ValueError(f"feature_names names tables that are not in tables: {unknown}")
    per_table = {name: list(feature_names.get(name, [name])) for name in tables}
    owner: Dict[str, str] = {}
    for name, features in per_table.items():
        if not features:
            raise ValueError(f"table {name!r} reads no feature")
        for feature in features:
            if feature in owner:
                raise ValueError(f"feature {feature!r} is read by two tables: {owner[feature]!r} and {name!r}")
            owner[feature] = name
    return per_table, owner


def embedding_bag_configs(
    tables: Mapping[str, nn.Module], feature_names: Optional[Mapping[str, Sequence[str]]] = None
) -> List[EmbeddingBagConfig]:
    """The ``EmbeddingBagConfig`` of each Bloom table: ``num_embeddings`` is the
    table's ``num_rows`` (the KJT carries rows, not ids), pooling is ``SUM``
    (``mean`` bags are folded into the KJT's weights).

    Args:
        tables (dict): table name to ``BloomEmbeddingBag`` or ``BloomEmbedding``
            (only the sizes are read: a module on the ``meta`` device will do).
        feature_names (dict, optional): table name to the features it reads.
            Default: each table reads the feature of its own name.

    Examples::

        >>> from triton_bloom import BloomEmbeddingBag
        >>> bag = BloomEmbeddingBag(1_000_000, 64, device="meta")
        >>> embedding_bag_configs({"history": bag})[0].num_embeddings
        200000
    """
    per_table, _ = _feature_map(tables, feature_names)
    return [
        EmbeddingBagConfig(
            name=name,
            embedding_dim=table.embedding_dim,
            num_embeddings=table.num_rows,
            feature_names=per_table[name],
            pooling=PoolingType.SUM,
            data_type=_DATA_TYPES.get(table.weight.dtype, DataType.FP32),
        )
        for name, table in tables.items()
    ]


class _Table:
    """What the transform needs of one Bloom table: how its ids hash."""

    def __init__(self, table: nn.Module) -> None:
        self.num_hash_functions = table.num_hash_functions
        self.num_rows = table.num_rows
        self.num_embeddings = table.num_embeddings
        self.padding_idx = table.padding_idx
        self.signed = table.signed
        self.backend = table.backend
        self.mean = getattr(table, "mode", "sum") == "mean"
        self.importance_rows = None if table.importance_weight is None else table.importance_weight.shape[0]
        self.hash_spec = table.hash_spec()

    @property
    def weighted(self) -> bool:
        return self.signed or self.importance_rows is not None or self.mean

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The ``(n, k)`` int64 rows of the ``(n,)`` ids, hashed where the
        package's backend choice says: the Triton kernel for CUDA ids, the
        PyTorch path elsewhere (the same rows either way)."""
        k = self.num_hash_functions
        if dispatch.use_triton(self.backend, ids.device):
            # int32 ids are all below 2**31: only int64 ids may need 8-byte hashing.
            return dispatch.kernels().bloom_hash(
                ids,
                seed_tensor(ids.device),
                num_hash_functions=k,
                num_rows=self.num_rows,
                wide_ids=ids.dtype == torch.int64,
            )
        return hash_rows(ids, k, self.num_rows).to(torch.int64)


def _segment_counts(mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """How many entries of each segment (``lengths``) ``mask`` keeps."""
    bag_of_id = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), lengths.long(), output_size=mask.numel()
    )
    return torch.zeros(lengths.numel(), dtype=lengths.dtype, device=lengths.device).index_add_(
        0, bag_of_id, mask.to(lengths.dtype)
    )


class BloomKJTTransform(nn.Module):
    r"""Replaces each Bloom feature's ids in a ``KeyedJaggedTensor`` by their
    ``k`` hashed rows, for an ``EmbeddingBagCollection`` over the Bloom tables.

    Rows are hashed on the ids' device with the package's backend choice (the
    Triton kernel for CUDA ids, the PyTorch path on CPU).  Padding ids are
    dropped (they contribute nothing, as in the Bloom modules).  The rows'
    weights, when any table needs them, are the KJT's weights: the variants'
    ``sign * importance`` factors (:func:`triton_bloom.reference.row_factors`),
    the input's own per-id weights (``sum`` bags only), and ``1 / (ids in the
    bag)`` for ``mean`` bags.  Importance weights are parameters of this
    module (``importance_weight[table]``); their gradient comes back through
    the KJT's weights in an unsharded collection only (TorchRec's input
    all-to-all drops it: sharded, freeze them).

    With ``pooled=True`` the result keeps the input's batch: each bag of ``n``
    ids becomes a bag of ``k * n`` rows, and features of no Bloom table pass
    through untouched (with weights of one when the result is weighted and
    they had none).  With ``pooled=False`` each id becomes a bag of its own
    ``k`` rows (an empty bag for padding), so the result's batch is
    ``num_bags``; it holds the Bloom features only, since a KJT has one batch
    size for all its keys.

    Args:
        tables (dict): table name to ``BloomEmbeddingBag`` (pooled) or
            ``BloomEmbedding`` (unpooled); only their hashing options and
            importance weights are read.
        feature_names (dict, optional): table name to the features it reads.
            Default: each table reads the feature of its own name.
        pooled (bool): see above. Default: ``True``.
        num_bags (int, optional): ``pooled=False`` only: the result's batch,
            which must hold every feature's ids.  Default: the most ids of
            any feature, made equal on every rank by an all-reduce when
            ``torch.distributed`` is initialised with more than one rank
            (row-wise sharding needs the same batch on every rank).
        process_group (ProcessGroup, optional): the group of that all-reduce.
            Default: the world.

    Shape:
        - Input: a ``KeyedJaggedTensor`` of ``B`` samples.
        - Output: a ``KeyedJaggedTensor`` of ``B`` samples (``pooled=True``) or
          ``num_bags`` (``pooled=False``); a Bloom feature's values are
          ``k`` times as many (less its padding ids).

    Examples::

        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> bag = BloomEmbeddingBag(1000, 8, num_hash_functions=2)
        >>> transform = BloomKJTTransform({"item": bag})
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["item"], torch.tensor([3, 5, 7]), torch.tensor([2, 1]))
        >>> transform(kjt).lengths()
        tensor([4, 2])
    """

    def __init__(
        self,
        tables: Mapping[str, nn.Module],
        feature_names: Optional[Mapping[str, Sequence[str]]] = None,
        *,
        pooled: bool = True,
        num_bags: Optional[int] = None,
        process_group=None,
    ) -> None:
        super().__init__()
        for name, table in tables.items():
            _check_table(name, table, pooled)
        if num_bags is not None and (
            pooled or isinstance(num_bags, bool) or not isinstance(num_bags, int) or num_bags < 0
        ):
            raise ValueError(f"num_bags must be a non-negative int, and only with pooled=False; got {num_bags!r}")
        self.per_table, self.owner = _feature_map(tables, feature_names)
        self.pooled = pooled
        self.num_bags = num_bags
        self.process_group = process_group
        self.tables = {name: _Table(table) for name, table in tables.items()}
        self.weighted = any(table.weighted for table in self.tables.values())
        self.importance_weight = nn.ParameterDict()
        for name, table in tables.items():
            if table.importance_weight is not None:
                source = table.importance_weight
                # A module built on the meta device holds no values: start
                # from the Bloom modules' own initial value, ones.
                init = torch.ones_like(source, device="cpu") if source.is_meta else source.detach().clone()
                self.importance_weight[name] = nn.Parameter(init, requires_grad=source.requires_grad)

    def features(self) -> List[str]:
        """The Bloom features, in the order the ``EmbeddingBagCollection`` reads them."""
        return [feature for features in self.per_table.values() for feature in features]

    def hash_specs(self) -> Dict[str, dict]:
        """Each table's hash specification (``BloomEmbedding.hash_spec()``)."""
        return {name: table.hash_spec for name, table in self.tables.items()}

    def get_extra_state(self) -> dict:
        return {"hash_specs": self.hash_specs()}

    def set_extra_state(self, state) -> None:
        saved = state.get("hash_specs") if isinstance(state, dict) else None
        if saved is None:
            raise ValueError(f"this checkpoint's extra state holds no hash specifications: {state!r}")
        _check_specs(saved, self.hash_specs(), "checkpoint")

    def _rows(self, name: str, ids: torch.Tensor):
        """``(rows, factors)``: the ``(n, k)`` rows of live ids and their
        factors (``None`` for plain tables)."""
        table = self.tables[name]
        check_id_range(ids, table.num_embeddings)
        importance = self.importance_weight[name] if name in self.importance_weight else None
        factors, _, _ = row_factors(ids, table.num_hash_functions, signed=table.signed, importance=importance)
        return table.rows(ids), factors

    def _pooled_feature(self, name: str, jt: JaggedTensor):
        table = self.tables[name]
        ids, lengths, weights = jt.values(), jt.lengths(), jt.weights_or_none()
        if weights is not None and table.mean:
            raise ValueError(f"feature of table {name!r} has weights, but the table's mode is 'mean' (sum only)")
        if table.padding_idx is not None:
            live = ids != table.padding_idx
            lengths = _segment_counts(live, lengths)
            ids = ids[live]
            weights = weights[live] if weights is not None else None
        rows, factors = self._rows(name, ids)
        k = table.num_hash_functions
        if not self.weighted:
            return rows.reshape(-1), lengths * k, None
        row_weights = torch.ones(rows.shape, device=ids.device) if factors is None else factors
        if weights is not None:
            row_weights = row_weights * weights.unsqueeze(1)
        if table.mean:
            per_id = torch.repeat_interleave(lengths.clamp_min(1).reciprocal(), lengths.long(), output_size=ids.numel())
            row_weights = row_weights * per_id.unsqueeze(1)
        return rows.reshape(-1), lengths * k, row_weights.reshape(-1).to(torch.float32)

    def _sequence_feature(self, name: str, jt: JaggedTensor, num_bags: int):
        table = self.tables[name]
        ids = jt.values()
        if jt.weights_or_none() is not None:
            raise ValueError(f"feature of table {name!r} has weights: unpooled lookups take none")
        k = table.num_hash_functions
        if table.padding_idx is not None:
            live = ids != table.padding_idx
            ids = ids[live]
            lengths = live.to(jt.lengths().dtype) * k
        else:
            lengths = torch.full((ids.numel(),), k, dtype=jt.lengths().dtype, device=ids.device)
        # Bags past the feature's ids are empty: every feature shares one batch.
        lengths = torch.cat([lengths, lengths.new_zeros(num_bags - lengths.numel())])
        rows, factors = self._rows(name, ids)
        weights = None
        if self.weighted:
            weights = (torch.ones(rows.shape, device=ids.device) if factors is None else factors).reshape(-1)
        return rows.reshape(-1), lengths, None if weights is None else weights.to(torch.float32)

    def _num_bags(self, features: Dict[str, JaggedTensor]) -> int:
        counts = [jt.values().numel() for jt in features.values()]
        if self.num_bags is not None:
            for feature, count in zip(features, counts):
                if count > self.num_bags:
                    raise ValueError(f"feature {feature!r} has {count} ids, more than num_bags={self.num_bags}")
            return self.num_bags
        most = max(counts)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            device = next(iter(features.values())).values().device
            # The group's collective runs where its backend does (gloo: CPU).
            backend_device = "cuda" if dist.get_backend(self.process_group) == "nccl" else "cpu"
            count = torch.tensor([most], dtype=torch.int64, device=backend_device if device.type != "meta" else "cpu")
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.process_group)
            most = int(count)
        return most

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        missing = [feature for feature in self.features() if feature not in keys]
        if missing:
            raise KeyError(f"the KeyedJaggedTensor lacks the Bloom features {missing}; it has {keys}")
        by_key = features.to_dict()
        if self.pooled:
            out_keys = list(keys)
            stride = features.stride()
        else:
            out_keys = self.features()
            stride = self._num_bags({feature: by_key[feature] for feature in out_keys})
        values, lengths, weights = [], [], []
        for key in out_keys:
            jt = by_key[key]
            if key in self.owner:
                if self.pooled:
                    v, lens, w = self._pooled_feature(self.owner[key], jt)
                else:
                    v, lens, w = self._sequence_feature(self.owner[key], jt, stride)
            else:
                v, lens, w = jt.values(), jt.lengths(), jt.weights_or_none()
                if w is None and self.weighted:
                    w = torch.ones(v.shape, dtype=torch.float32, device=v.device)
            values.append(v.to(torch.int64))
            lengths.append(lens)
            weights.append(w)
        return KeyedJaggedTensor(
            keys=out_keys,
            values=torch.cat(values),
            lengths=torch.cat(lengths),
            weights=torch.cat(weights) if self.weighted else None,
            stride=stride,
        )


def _check_specs(saved: Mapping[str, dict], mine: Mapping[str, dict], what: str) -> None:
    """``ValueError`` naming each table and key whose hashing differs."""
    problems = []
    for name in sorted(set(saved) | set(mine)):
        a, b = saved.get(name), mine.get(name)
        if a is None or b is None:
            problems.append(
                f"table {name!r}: {what} {'lacks' if a is None else 'has'} it, the other side "
                f"{'has' if a is None else 'lacks'} it"
            )
            continue
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                problems.append(f"table {name!r} {key}: {what} {a.get(key)!r}, modules {b.get(key)!r}")
    if problems:
        raise ValueError("hash specifications differ (" + "; ".join(problems) + "); the same ids would read other rows")


def _select(features: KeyedJaggedTensor, keys: List[str]) -> KeyedJaggedTensor:
    """``features`` with only ``keys``, in that order (other features need not
    travel through the collection's all-to-all)."""
    have = features.keys()
    if have == keys:
        return features
    missing = [key for key in keys if key not in have]
    if missing:
        raise KeyError(f"the KeyedJaggedTensor lacks the Bloom features {missing}; it has {have}")
    return features.permute([have.index(key) for key in keys])


class _BloomCollection(nn.Module):
    """A :class:`BloomKJTTransform` (``transform``) feeding an
    ``EmbeddingBagCollection`` (``ebc``)."""

    def __init__(self, tables, feature_names, *, pooled: bool, device, **transform_options) -> None:
        super().__init__()
        self.transform = BloomKJTTransform(tables, feature_names, pooled=pooled, **transform_options)
        device = torch.device(device) if device is not None else None
        if device is not None and device.type != "meta":
            # Dense parameters: on the meta device DistributedModelParallel
            # would have nothing to replicate.
            self.transform.importance_weight.to(device)
        # Kept here: once sharded, `ebc` no longer answers embedding_bag_configs().
        self.configs = embedding_bag_configs(tables, self.transform.per_table)
        self.ebc = EmbeddingBagCollection(
            self.configs,
            is_weighted=self.transform.weighted,
            device=device,
        )

    def hash_specs(self) -> Dict[str, dict]:
        """Each table's hash specification, as its Bloom module gives it."""
        return self.transform.hash_specs()

    def _lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """The ``ebc``'s pooled rows of the transformed ``features`` (only this collection's)."""
        if type(self.ebc) is not EmbeddingBagCollection and torch.is_grad_enabled():
            # Sharded, the input all-to-all moves the KJT's weights without
            # their gradient: importance weights would silently never train.
            training = [name for name, p in self.transform.importance_weight.items() if p.requires_grad]
            if training:
                raise RuntimeError(
                    f"tables {training} have importance weights that require grad, but the sharded lookup "
                    "cannot train them (TorchRec's input all-to-all does not carry the gradient of KJT weights): "
                    "freeze them (transform.importance_weight[name].requires_grad_(False)) or train unsharded"
                )
        return self.ebc(self.transform(_select(features, self.transform.features())))


class BloomEmbeddingBagCollection(_BloomCollection):
    r"""Pooled Bloom tables as a TorchRec ``EmbeddingBagCollection``: each
    feature's bags pooled as its ``BloomEmbeddingBag`` pools them.

    Put it in a model and wrap the model in ``DistributedModelParallel``: the
    submodule ``ebc`` is sharded like any ``EmbeddingBagCollection``
    (table-wise, column-wise, row-wise) and trained by FBGEMM's fused
    optimizers; the transform (and importance weights, if any) stays dense.

    Args:
        tables (dict): table name to ``BloomEmbeddingBag`` (``sum`` or ``mean``),
            whose hashing, sizes and dtype the collection takes; its weights are
            not copied (use :func:`copy_weights_to_collection`), so a module on
            the ``meta`` device will do.
        feature_names (dict, optional): table name to the features it reads.
            Default: each table reads the feature of its own name.
        device (torch.device, optional): of the tables (``meta`` for
            ``DistributedModelParallel`` to allocate only the shards).

    Shape:
        - Input: a ``KeyedJaggedTensor`` with (at least) the tables' features,
          ``B`` samples.
        - Output: a ``KeyedTensor`` of the features, values of shape
          :math:`(B, \sum \text{embedding\_dim})`.

    Examples::

        >>> bag = BloomEmbeddingBag(1_000_000, 16, mode="mean", device="meta")
        >>> collection = BloomEmbeddingBagCollection({"history": bag}, device="meta")
        >>> collection.ebc.embedding_bags["history"].weight.shape
        torch.Size([200000, 16])
    """

    def __init__(
        self,
        tables: Mapping[str, BloomEmbeddingBag],
        feature_names: Optional[Mapping[str, Sequence[str]]] = None,
        *,
        device=None,
    ) -> None:
        super().__init__(tables, feature_names, pooled=True, device=device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self._lookup(features)


class BloomEmbeddingCollection(_BloomCollection):
    r"""Unpooled Bloom tables (``BloomEmbedding``) as a TorchRec
    ``EmbeddingBagCollection``: each id becomes a bag of its own ``k`` rows,
    so the collection returns one vector per id, as an ``EmbeddingCollection``
    would, but pooled before the output all-to-all (``k`` times fewer bytes
    than looking up the ``k`` rows unpooled).

    Args:
        tables (dict): table name to ``BloomEmbedding``.
        feature_names (dict, optional): table name to the features it reads.
        device (torch.device, optional): of the tables.
        num_bags (int, optional): bags per rank, at least the most ids of any
            feature; by default that most, agreed on by an all-reduce across
            ranks (see :class:`BloomKJTTransform`).
        process_group (ProcessGroup, optional): the group of that all-reduce.

    Shape:
        - Input: a ``KeyedJaggedTensor`` with the tables' features.
        - Output: ``dict`` of feature name to ``JaggedTensor`` with the feature's
          lengths and values of shape :math:`(n, \text{embedding\_dim})`, one
          vector per id (zeros for ``padding_idx``).

    Examples::

        >>> emb = BloomEmbedding(1000, 8, num_hash_functions=2, padding_idx=None)
        >>> collection = BloomEmbeddingCollection({"item": emb})
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["item"], torch.tensor([3, 5, 7]), torch.tensor([2, 1]))
        >>> collection(kjt)["item"].values().shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        tables: Mapping[str, BloomEmbedding],
        feature_names: Optional[Mapping[str, Sequence[str]]] = None,
        *,
        device=None,
        num_bags: Optional[int] = None,
        process_group=None,
    ) -> None:
        super().__init__(
            tables, feature_names, pooled=False, device=device, num_bags=num_bags, process_group=process_group
        )

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        pooled = self._lookup(features).to_dict()
        by_key = features.to_dict()
        return {
            feature: JaggedTensor(
                values=pooled[feature][: by_key[feature].values().numel()], lengths=by_key[feature].lengths()
            )
            for feature in self.transform.features()
        }


def _collection_of(module: nn.Module) -> _BloomCollection:
    """The one Bloom collection in ``module`` (itself, or inside a model,
    ``DistributedModelParallel`` and DDP wrappers included)."""
    found = [m for m in module.modules() if isinstance(m, _BloomCollection)]
    if len(found) != 1:
        raise (TypeError if not found else ValueError)(
            f"expected one BloomEmbeddingBagCollection or BloomEmbeddingCollection in {type(module).__name__}, "
            f"found {len(found)}" + ("; pass the collection itself" if found else "")
        )
    return found[0]


def _table_weights(collection: _BloomCollection) -> Dict[str, object]:
    """Each table's weight as the ``ebc``'s state dict holds it: a tensor, or
    a ``ShardedTensor`` / ``DTensor`` once sharded."""
    state = collection.ebc.state_dict()
    return {name: state[f"embedding_bags.{name}.weight"] for name in collection.transform.tables}


def _local_shards(weight):
    """``[(offsets, tensor)]``: the pieces of ``weight`` this rank holds,
    with the row and column where each starts."""
    if hasattr(weight, "local_shards"):  # ShardedTensor
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in weight.local_shards()]
    if hasattr(weight, "to_local"):  # DTensor, whose local part TorchRec wraps
        local = weight.to_local()
        if hasattr(local, "local_shards"):
            return list(zip((tuple(o) for o in local.local_offsets()), local.local_shards()))
        raise NotImplementedError(f"unsupported DTensor layout of a TorchRec table: {weight.placements}")
    return [((0, 0), weight)]


def _check_modules(collection: _BloomCollection, tables: Mapping[str, nn.Module]) -> None:
    unknown = sorted(set(tables) - set(collection.transform.tables))
    if unknown:
        raise KeyError(f"tables {unknown} are not in the collection, which has {sorted(collection.transform.tables)}")
    specs = collection.hash_specs()
    _check_specs(
        {name: specs[name] for name in tables}, {name: t.hash_spec() for name, t in tables.items()}, "collection"
    )
    for name, table in tables.items():
        expected = (table.num_rows, table.embedding_dim)
        config = next(c for c in collection.configs if c.name == name)
        if (config.num_embeddings, config.embedding_dim) != expected:
            raise ValueError(
                f"table {name!r}: the collection's table is {config.num_embeddings} x {config.embedding_dim}, "
                f"the module's {expected[0]} x {expected[1]}"
            )


@torch.no_grad()
def copy_weights_to_collection(tables: Mapping[str, nn.Module], collection: nn.Module) -> None:
    """Copy Bloom modules' tables (and importance weights) into a collection,
    sharded or not: each rank fills the shards it holds.

    Args:
        tables (dict): table name to ``BloomEmbeddingBag`` / ``BloomEmbedding``
            with the trained weights (the same on every rank).
        collection (nn.Module): a ``BloomEmbeddingBagCollection`` or
            ``BloomEmbeddingCollection``, or ``DistributedModelParallel`` around one.

    Raises:
        ValueError: a table's hash specification or shape differs from the
            collection's (the same ids would read other rows).

    Examples::

        >>> bag = BloomEmbeddingBag(1000, 8)
        >>> collection = BloomEmbeddingBagCollection({"item": bag})
        >>> copy_weights_to_collection({"item": bag}, collection)
    """
    collection = _collection_of(collection)
    _check_modules(collection, tables)
    weights = _table_weights(collection)
    for name, table in tables.items():
        full = table.weight
        for (row, col), shard in _local_shards(weights[name]):
            rows, cols = shard.shape
            shard.copy_(full[row : row + rows, col : col + cols])
        if name in collection.transform.importance_weight:
            collection.transform.importance_weight[name].copy_(table.importance_weight)


@torch.no_grad()
def copy_weights_from_collection(collection: nn.Module, tables: Mapping[str, nn.Module], process_group=None) -> None:
    """Copy a collection's tables (and importance weights) into Bloom modules.

    Sharded, each rank contributes the shards it holds and an all-reduce
    assembles every table on every rank: a collective, to call on all ranks,
    moving each table's full size once.

    Args:
        collection (nn.Module): a ``BloomEmbeddingBagCollection`` or
            ``BloomEmbeddingCollection``, or ``DistributedModelParallel`` around one.
        tables (dict): table name to the ``BloomEmbeddingBag`` /
            ``BloomEmbedding`` to fill; its hashing must be the collection's.
        process_group (ProcessGroup, optional): the sharding's group. Default: the world.

    Raises:
        ValueError: a table's hash specification or shape differs from the collection's.

    Examples::

        >>> copy_weights_from_collection(collection, {"item": bag})
        >>> bag.state_dict()["embeddings.weight"].shape
        torch.Size([200, 8])
    """
    collection = _collection_of(collection)
    _check_modules(collection, tables)
    weights = _table_weights(collection)
    for name, table in tables.items():
        weight = weights[name]
        pieces = _local_shards(weight)
        sharded = hasattr(weight, "local_shards") or hasattr(weight, "to_local")
        full = torch.zeros(table.weight.shape, dtype=table.weight.dtype, device=table.weight.device)
        for (row, col), shard in pieces:
            rows, cols = shard.shape
            full[row : row + rows, col : col + cols] = shard
        if sharded and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            # Shards are disjoint: the sum over ranks is the table.
            dist.all_reduce(full, group=process_group)
        table.weight.copy_(full)
        if name in collection.transform.importance_weight:
            table.importance_weight.copy_(collection.transform.importance_weight[name])
