"""Bloom tables on TorchRec (``triton_bloom.torchrec``).

Single process: the KJT transform feeding an unsharded
``EmbeddingBagCollection`` gives the Bloom modules' outputs and gradients,
the weight helpers round-trip, and bad input raises.

Two ranks (gloo, CPU, loopback): ``DistributedModelParallel`` shards the
collection table-wise, column-wise and row-wise, pooled and unpooled, with
FBGEMM's fused exact SGD and exact row-wise Adagrad.  Every rank's lookup,
the importance weights' gradient, and the tables after two fused steps must
equal single-process Bloom modules trained on the whole global batch with
``triton_bloom.optim``'s fused optimizers, with two adjustments that are
TorchRec's semantics, not ours:

- TorchRec divides a sharded table's gradient by the world size (the mean
  over ranks, as DDP does), so the reference loss is the global sum / world.
- FBGEMM keeps one row-wise Adagrad accumulator per row *of each shard*: a
  column-wise shard averages ``g**2`` over its own columns.  The reference is
  then one Bloom module per column block, as the plan cuts them.

Nothing here is ever skipped: without TorchRec the tests fail, saying how to
install it.
"""

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from support import free_port, spawn_ranks

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, FusedRowWiseAdagrad, FusedSGD

try:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from triton_bloom import torchrec as bloom_torchrec
except ImportError as exc:
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

INSTALL = 'pip install "triton-bloom[torchrec]" && pip install --no-deps torchrec==1.8.0'
WORLD_SIZE = 2
LOCAL_BATCH = 4
STEPS = 2
LR = 0.1
EPS = 1e-2  # big enough that sqrt(s) + eps and sqrt(s + eps) differ well past rounding
TIMEOUT_S = 150
SHARDINGS = ("table_wise", "column_wise", "row_wise")
OPTIMIZERS = ("sgd", "rowwise_adagrad")
CASES = [(s, p, o) for s in SHARDINGS for p in ("pooled", "unpooled") for o in OPTIMIZERS]


def require_torchrec():
    if IMPORT_ERROR is not None:
        pytest.fail(f"the TorchRec stack does not import ({IMPORT_ERROR!r}); install it with: {INSTALL}")


# Tables of each test case ------------------------------------------------------


def make_tables(pooled, weighted, seed):
    """Bloom modules of one case, the same on every rank (``seed``), and the
    features each reads: the SGD cases run plain tables (an unweighted
    collection, one table read by two features), the Adagrad cases add the
    variants (a weighted collection)."""
    torch.manual_seed(seed)
    dim = 8
    if pooled:
        a = BloomEmbeddingBag(60, dim, num_hash_functions=3, num_rows=17, padding_idx=0)
        if weighted:
            b = BloomEmbeddingBag(
                40, dim, num_hash_functions=2, num_rows=11, mode="mean", signed=True, importance=True, importance_rows=5
            )
        else:
            b = BloomEmbeddingBag(40, dim, num_hash_functions=1, num_rows=11)
    else:
        a = BloomEmbedding(60, dim, num_hash_functions=3, num_rows=17, padding_idx=0)
        if weighted:
            b = BloomEmbedding(
                40,
                dim,
                num_hash_functions=2,
                num_rows=11,
                padding_idx=None,
                signed=True,
                importance=True,
                importance_rows=5,
            )
        else:
            b = BloomEmbedding(40, dim, num_hash_functions=1, num_rows=11, padding_idx=None)
    if b.importance_weight is not None:
        with torch.no_grad():
            b.importance_weight.uniform_(0.5, 1.5)
    features = {"a": ["a"], "b": ["b"] if weighted else ["b1", "b2"]}
    return {"a": a, "b": b}, features


def like(table, columns=None, fused_optimizer=None, share_importance=False):
    """A Bloom module hashing as ``table`` does, holding ``columns`` of its
    weight (all by default) and a copy of its importance weights (or, with
    ``share_importance``, the same parameter)."""
    start, stop = columns or (0, table.embedding_dim)
    options = dict(
        num_hash_functions=table.num_hash_functions,
        num_rows=table.num_rows,
        padding_idx=table.padding_idx,
        signed=table.signed,
        fused_optimizer=fused_optimizer,
    )
    if table.importance_weight is not None:
        options.update(importance=True, importance_rows=table.importance_weight.shape[0])
    if isinstance(table, BloomEmbeddingBag):
        copy = BloomEmbeddingBag(table.num_embeddings, stop - start, mode=table.mode, **options)
    else:
        copy = BloomEmbedding(table.num_embeddings, stop - start, **options)
    with torch.no_grad():
        copy.weight.copy_(table.weight[:, start:stop])
    if table.importance_weight is not None:
        if share_importance:
            copy.importance_weight = table.importance_weight
        else:
            with torch.no_grad():
                copy.importance_weight.copy_(table.importance_weight)
            copy.importance_weight.requires_grad_(table.importance_weight.requires_grad)
    return copy


def global_batch(tables, features, pooled, generator):
    """Per feature, ``(ids, lengths)`` of the whole global batch (every
    rank's samples, rank after rank), with padding ids and empty bags."""
    batch = {}
    for name, table in tables.items():
        for feature in features[name]:
            lengths = torch.randint(0, 4, (WORLD_SIZE * LOCAL_BATCH,), generator=generator)
            ids = torch.randint(0, table.num_embeddings, (int(lengths.sum()),), generator=generator)
            if table.padding_idx is not None and ids.numel() > 2:
                ids[:: max(ids.numel() // 3, 1)] = table.padding_idx
            batch[feature] = (ids, lengths)
    return batch


def local_kjt(batch, rank):
    """This rank's samples of the global batch as a ``KeyedJaggedTensor``."""
    keys, values, lengths = [], [], []
    for feature, (ids, all_lengths) in batch.items():
        start = int(all_lengths[: rank * LOCAL_BATCH].sum())
        mine = all_lengths[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]
        keys.append(feature)
        values.append(ids[start : start + int(mine.sum())])
        lengths.append(mine)
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), torch.cat(lengths))


def offsets_of(lengths):
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])


def local_slice(batch, feature, rank, pooled):
    """Which rows of the reference's output this rank computes."""
    ids, lengths = batch[feature]
    if pooled:
        return slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    start = int(lengths[: rank * LOCAL_BATCH].sum())
    return slice(start, start + int(lengths[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH].sum()))


# The two-rank run ---------------------------------------------------------------


def column_blocks(parameter_sharding, dim):
    """The column ranges the plan cuts a table into (one for table- and row-wise)."""
    spec = parameter_sharding.sharding_spec
    shards = spec.shards if spec is not None else []
    blocks = sorted({(s.shard_offsets[1], s.shard_offsets[1] + s.shard_sizes[1]) for s in shards})
    return blocks or [(0, dim)]


def sharded_model(collection, sharding, optimizer, rank):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    # A hand-built plan defaults to the "dense" kernel, which ignores the
    # optimizer settings; "fused" without them trains with SGD at lr 0.01.
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
    if optimizer == "rowwise_adagrad":
        fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": LR, "eps": EPS}
    sharder = EmbeddingBagCollectionSharder(fused_params=fused)
    generators = {
        "table_wise": lambda i: table_wise(rank=i % WORLD_SIZE, compute_kernel="fused"),
        "column_wise": lambda i: column_wise(ranks=list(range(WORLD_SIZE)), compute_kernel="fused"),
        "row_wise": lambda i: row_wise(compute_kernel="fused"),
    }
    names = [config.name for config in collection.ebc.embedding_bag_configs()]
    module_plan = construct_module_sharding_plan(
        collection.ebc,
        {name: generators[sharding](i) for i, name in enumerate(names)},
        sharder=sharder,
        local_size=WORLD_SIZE,
        world_size=WORLD_SIZE,
        device_type="cpu",
    )
    # No DDP: the collection has no trainable dense parameter here (DDP
    # refuses a module without one); in a model, DMP wraps the dense rest.
    model = DistributedModelParallel(
        collection,
        device=torch.device("cpu"),
        plan=ShardingPlan({"ebc": module_plan}),
        sharders=[sharder],
        init_data_parallel=False,
    )
    return model, module_plan


def max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def run_case(rank, sharding, pooled_name, optimizer):
    pooled = pooled_name == "pooled"
    weighted = optimizer == "rowwise_adagrad"
    seed = CASES.index((sharding, pooled_name, optimizer))
    tables, features = make_tables(pooled, weighted, seed)
    # The input all-to-all carries the KJT's weights without their gradient:
    # sharded, importance weights are fixed (they train unsharded, tested below).
    for table in tables.values():
        if table.importance_weight is not None:
            table.importance_weight.requires_grad_(False)
    kind = bloom_torchrec.BloomEmbeddingBagCollection if pooled else bloom_torchrec.BloomEmbeddingCollection
    # On the meta device, as for real tables: DMP allocates only the shards.
    meta = {name: like(t) for name, t in tables.items()}
    collection = kind({name: t.to("meta") for name, t in meta.items()}, features, device="meta")
    model, plan = sharded_model(collection, sharding, optimizer, rank)
    result = {}

    # The round trip, both ways, before training: bit-exact.
    bloom_torchrec.copy_weights_to_collection(tables, model)
    back = {name: like(t) for name, t in tables.items()}
    for t in back.values():
        with torch.no_grad():
            t.weight.zero_()
    bloom_torchrec.copy_weights_from_collection(model, back)
    result["round_trip"] = max(max_diff(back[n].weight, tables[n].weight) for n in tables)

    # The reference: per table and column block, a Bloom module with our fused optimizer.
    def fused_optimizer():
        return FusedSGD(lr=LR) if optimizer == "sgd" else FusedRowWiseAdagrad(lr=LR, eps=EPS)

    blocks = {name: column_blocks(plan[name], t.embedding_dim) for name, t in tables.items()}
    result["blocks"] = {name: [list(b) for b in bl] for name, bl in blocks.items()}
    reference = {
        name: [like(t, block, fused_optimizer(), share_importance=True) for block in blocks[name]]
        for name, t in tables.items()
    }
    generator = torch.Generator().manual_seed(1000 + seed)
    if weighted:
        # Importance weights that would train must be refused, not silently frozen.
        importance = bloom_torchrec._collection_of(model).transform.importance_weight["b"]
        importance.requires_grad_(True)
        try:
            model(local_kjt(global_batch(tables, features, pooled, torch.Generator()), rank))
        except RuntimeError as error:
            result["refused"] = "cannot train them" in str(error)
        importance.requires_grad_(False)
    forward = 0.0
    for _ in range(STEPS):
        batch = global_batch(tables, features, pooled, generator)
        out = model(local_kjt(batch, rank))
        loss, ref_loss = 0.0, 0.0
        for name in tables:
            for feature in features[name]:
                ids, lengths = batch[feature]
                if pooled:
                    ref = torch.cat([m(ids, offsets_of(lengths)) for m in reference[name]], dim=1)
                    mine = out[feature]
                else:
                    ref = torch.cat([m(ids) for m in reference[name]], dim=1)
                    mine = out[feature].values()
                    assert torch.equal(out[feature].lengths(), lengths[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH])
                g = torch.randn(ref.shape, generator=generator)
                part = local_slice(batch, feature, rank, pooled)
                forward = max(forward, max_diff(mine, ref[part]))
                loss = loss + (mine * g[part]).sum()
                # TorchRec's sharded gradient is the mean over ranks.
                ref_loss = ref_loss + (ref * g).sum() / WORLD_SIZE
        loss.backward()
        ref_loss.backward()
    result["forward"] = forward

    trained = {name: like(t) for name, t in tables.items()}
    bloom_torchrec.copy_weights_from_collection(model, trained)
    result["weights"] = max(
        max_diff(trained[name].weight, torch.cat([m.weight for m in reference[name]], dim=1)) for name in tables
    )
    result["moved"] = min(max_diff(trained[name].weight, tables[name].weight) for name in tables)
    for name, table in tables.items():
        if table.importance_weight is not None:
            result["importance"] = max_diff(trained[name].importance_weight, table.importance_weight)
    return result


def _worker(rank, port, out_dir, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for case in cases:
            start = time.perf_counter()
            try:
                results["/".join(case)] = run_case(rank, *case)
            except Exception:
                results["/".join(case)] = {"error": traceback.format_exc()}
            results["/".join(case)]["seconds"] = time.perf_counter() - start
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Every case's measurements on both ranks: ``{rank: {case: result}}``."""
    require_torchrec()
    out_dir = tmp_path_factory.mktemp("torchrec")
    spawn_ranks(_worker, (free_port(), str(out_dir), CASES), WORLD_SIZE, TIMEOUT_S, "the two ranks")
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)}


@pytest.mark.parametrize("sharding,pooled,optimizer", CASES)
def test_sharded_matches_single_process(two_rank_results, sharding, pooled, optimizer):
    case = f"{sharding}/{pooled}/{optimizer}"
    for rank, results in two_rank_results.items():
        result = results[case]
        assert "error" not in result, f"rank {rank}, {case}:\n{result.get('error')}"
        where = f"rank {rank}, {case}: {result}"
        assert result["round_trip"] == 0.0, where
        assert result["forward"] < 1e-5, where
        assert result["weights"] < 1e-5, where
        assert result["moved"] > 1e-3, f"the tables did not train: {where}"
        if optimizer == "rowwise_adagrad":
            assert result["importance"] == 0.0, where
            assert result.get("refused"), f"trainable importance weights were not refused: {where}"
        if sharding == "column_wise":
            assert all(len(blocks) == WORLD_SIZE for blocks in result["blocks"].values()), where


# Single process -----------------------------------------------------------------

POOLED_VARIANTS = {
    "sum-padding": dict(padding_idx=0),
    "mean-padding": dict(mode="mean", padding_idx=3),
    "signed": dict(signed=True),
    "importance": dict(importance=True, importance_rows=7, mode="mean"),
    "per-id-weights": dict(signed=True),
    "wide-ids": dict(num_embeddings=None, num_rows=23),
}
SEQUENCE_VARIANTS = {
    "padding": dict(padding_idx=0),
    "signed-importance": dict(padding_idx=None, signed=True, importance=True, importance_rows=7),
    "no-padding": dict(padding_idx=None),
}


def random_module(kind, options, generator):
    options = dict(options)
    num_embeddings = options.pop("num_embeddings", 300)
    options.setdefault("num_rows", 41)
    module = kind(num_embeddings, 6, num_hash_functions=3, **options)
    if module.importance_weight is not None:
        with torch.no_grad():
            module.importance_weight.copy_(torch.rand(module.importance_weight.shape, generator=generator) + 0.5)
    return module


def random_bags(module, generator, num_bags=5):
    lengths = torch.randint(0, 5, (num_bags,), generator=generator)
    lengths[1] = 0  # an empty bag
    high = module.num_embeddings or 2**62
    ids = torch.randint(0, high, (int(lengths.sum()),), generator=generator)
    if module.padding_idx is not None:
        ids[::3] = module.padding_idx
    return ids, lengths


def check_gradients(collection, module, name="t"):
    assert collection.ebc.embedding_bags[name].weight.grad is not None
    torch.testing.assert_close(collection.ebc.embedding_bags[name].weight.grad, module.weight.grad)
    if module.importance_weight is not None:
        torch.testing.assert_close(collection.transform.importance_weight[name].grad, module.importance_weight.grad)


@pytest.mark.parametrize("variant", POOLED_VARIANTS)
def test_pooled_collection_equals_bloom_embedding_bag(variant):
    require_torchrec()
    generator = torch.Generator().manual_seed(len(variant))
    torch.manual_seed(len(variant))
    bag = random_module(BloomEmbeddingBag, POOLED_VARIANTS[variant], generator)
    collection = bloom_torchrec.BloomEmbeddingBagCollection({"t": bag})
    bloom_torchrec.copy_weights_to_collection({"t": bag}, collection)
    ids, lengths = random_bags(bag, generator)
    weights = torch.rand(ids.shape, generator=generator) if variant == "per-id-weights" else None
    kjt = KeyedJaggedTensor.from_lengths_sync(["t"], ids, lengths, weights=weights)
    out = collection(kjt)["t"]
    expected = bag(ids, offsets_of(lengths), per_sample_weights=weights)
    torch.testing.assert_close(out, expected)
    g = torch.randn(expected.shape, generator=generator)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    check_gradients(collection, bag)


@pytest.mark.parametrize("variant", SEQUENCE_VARIANTS)
def test_unpooled_collection_equals_bloom_embedding(variant):
    require_torchrec()
    generator = torch.Generator().manual_seed(len(variant))
    torch.manual_seed(len(variant))
    emb = random_module(BloomEmbedding, SEQUENCE_VARIANTS[variant], generator)
    collection = bloom_torchrec.BloomEmbeddingCollection({"t": emb}, {"t": ["t", "u"]})
    bloom_torchrec.copy_weights_to_collection({"t": emb}, collection)
    ids_t, lengths_t = random_bags(emb, generator)
    ids_u, lengths_u = random_bags(emb, generator)
    kjt = KeyedJaggedTensor.from_lengths_sync(["u", "t"], torch.cat([ids_u, ids_t]), torch.cat([lengths_u, lengths_t]))
    out = collection(kjt)
    assert torch.equal(out["t"].lengths(), lengths_t) and torch.equal(out["u"].lengths(), lengths_u)
    expected = {"t": emb(ids_t), "u": emb(ids_u)}
    loss, ref_loss = 0, 0
    for feature in ("t", "u"):
        torch.testing.assert_close(out[feature].values(), expected[feature])
        g = torch.randn(expected[feature].shape, generator=generator)
        loss, ref_loss = loss + (out[feature].values() * g).sum(), ref_loss + (expected[feature] * g).sum()
    loss.backward()
    ref_loss.backward()
    check_gradients(collection, emb)


def test_transform_layout_and_other_features():
    """A Bloom feature's bags grow k-fold (less padding ids); other features
    pass through untouched, with weights of one when the KJT is weighted."""
    require_torchrec()
    generator = torch.Generator().manual_seed(7)
    bag = BloomEmbeddingBag(100, 4, num_hash_functions=3, num_rows=10, padding_idx=0, signed=True)
    transform = bloom_torchrec.BloomKJTTransform({"bloom": bag})
    ids, lengths = random_bags(bag, generator)
    other = torch.randint(0, 1000, (6,), generator=generator)
    other_lengths = torch.tensor([1, 2, 0, 3, 0])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["x", "bloom"], torch.cat([other, ids]), torch.cat([other_lengths, lengths])
    )
    out = transform(kjt).to_dict()
    assert torch.equal(out["x"].values(), other) and torch.equal(out["x"].lengths(), other_lengths)
    assert torch.equal(out["x"].weights(), torch.ones(6))
    live = ids[ids != 0]
    starts = offsets_of(lengths)
    live_lengths = torch.tensor([int((ids[s : s + n] != 0).sum()) for s, n in zip(starts.tolist(), lengths.tolist())])
    assert torch.equal(out["bloom"].lengths(), 3 * live_lengths)
    rows = bloom_hash_reference(live, 3, 10)
    assert torch.equal(out["bloom"].values(), rows.reshape(-1))
    from triton_bloom.hashing import bloom_signs

    assert torch.equal(out["bloom"].weights(), bloom_signs(live, 3).float().reshape(-1))


def bloom_hash_reference(ids, k, num_rows):
    from triton_bloom import bloom_hash

    return bloom_hash(ids, k, num_rows)


def test_weights_round_trip_and_hash_spec_check():
    require_torchrec()
    torch.manual_seed(3)
    bag = BloomEmbeddingBag(500, 8, num_hash_functions=4, signed=True, importance=True)
    with torch.no_grad():
        bag.importance_weight.uniform_(0.5, 1.5)
    collection = bloom_torchrec.BloomEmbeddingBagCollection({"t": bag})
    bloom_torchrec.copy_weights_to_collection({"t": bag}, collection)
    assert torch.equal(collection.ebc.embedding_bags["t"].weight, bag.weight)
    back = BloomEmbeddingBag(500, 8, num_hash_functions=4, signed=True, importance=True)
    bloom_torchrec.copy_weights_from_collection(collection, {"t": back})
    assert torch.equal(back.weight, bag.weight)
    assert torch.equal(back.importance_weight, bag.importance_weight)
    # The collection's own checkpoint carries the specification too.
    state = collection.state_dict()
    bloom_torchrec.BloomEmbeddingBagCollection({"t": back}).load_state_dict(state)
    for other, key in [
        (dict(num_hash_functions=3, signed=True, importance=True), "num_hash_functions"),
        (dict(num_hash_functions=4, importance=True), "sign_seeds"),
        (dict(num_hash_functions=4, signed=True, importance=True, num_rows=99), "num_rows"),
    ]:
        wrong = BloomEmbeddingBag(500, 8, **other)
        with pytest.raises(ValueError, match=key):
            bloom_torchrec.copy_weights_to_collection({"t": wrong}, collection)
        with pytest.raises(ValueError, match=key):
            bloom_torchrec.copy_weights_from_collection(collection, {"t": wrong})
        with pytest.raises(ValueError, match=key):
            bloom_torchrec.BloomEmbeddingBagCollection({"t": wrong}).load_state_dict(state)


def test_bad_input_raises():
    require_torchrec()
    bag = BloomEmbeddingBag(100, 4, num_hash_functions=2, num_rows=10)
    kjt = KeyedJaggedTensor.from_lengths_sync(["t"], torch.tensor([5, 100]), torch.tensor([2]))
    with pytest.raises(IndexError, match="100"):
        bloom_torchrec.BloomEmbeddingBagCollection({"t": bag})(kjt)
    with pytest.raises(KeyError, match="'u'"):
        bloom_torchrec.BloomEmbeddingBagCollection({"u": bag})(kjt)
    with pytest.raises(NotImplementedError, match="max"):
        bloom_torchrec.BloomEmbeddingBagCollection({"t": BloomEmbeddingBag(100, 4, mode="max")})
    with pytest.raises(NotImplementedError, match="float64"):
        bloom_torchrec.BloomEmbeddingBagCollection({"t": BloomEmbeddingBag(100, 4, dtype=torch.float64)})
    with pytest.raises(TypeError, match="BloomEmbedding"):
        bloom_torchrec.BloomEmbeddingCollection({"t": bag})
    with pytest.raises(ValueError, match="feature 't' is read by two tables"):
        bloom_torchrec.BloomEmbeddingBagCollection({"t": bag, "s": bag}, {"s": ["t"]})
    emb = BloomEmbedding(100, 4, num_hash_functions=2)
    with pytest.raises(ValueError, match="2 ids, more than num_bags=1"):
        bloom_torchrec.BloomEmbeddingCollection({"t": emb}, num_bags=1)(
            KeyedJaggedTensor.from_lengths_sync(["t"], torch.tensor([5, 6]), torch.tensor([2]))
        )


def test_unsupported_layouts_are_refused():
    """Options that change which rows an id reads must not be hashed as plain Bloom."""
    require_torchrec()
    import inspect

    options = inspect.signature(BloomEmbeddingBag).parameters
    cases = [("hot_ids", dict(hot_ids=torch.tensor([1, 2, 3]))), ("private_dim", dict(private_dim=2))]
    cases = [(name, kwargs) for name, kwargs in cases if name in options]
    assert cases, "BloomEmbeddingBag takes neither hot_ids nor private_dim: update this test"
    for name, kwargs in cases:
        with pytest.raises(NotImplementedError, match=name):
            bloom_torchrec.BloomEmbeddingBagCollection({"t": BloomEmbeddingBag(100, 4, **kwargs)})


def test_example_runs(tmp_path):
    """The README's example, as written, on two processes."""
    require_torchrec()
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "torchrec_example.py"), "--steps", "2", "--batch", "32"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert report["max_diff_sharded_vs_bloom"] < 1e-5, report
    assert report["kjt_bytes_after"] > report["kjt_bytes_before"], report
