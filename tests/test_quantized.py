"""Quantized Bloom tables (``triton_bloom.quantize``) on both backends against
an independent float64 oracle: quantize -> lookup equals dequantize -> lookup
(the dequantisation and the lookup both written here in numpy, from the raw
buffers, with scikit-learn's murmurhash3), for int8 and int4, embeddings and
bags in every mode, odd widths, hot rows, padding, signs and importance
weights; the state dict's format check; compile and export; the refusal to
train; and the bytes the quantized module holds."""

import io

import numpy as np
import pytest
import torch
from oracle import SPOTLIGHT_SEEDS
from property_oracle import IMPORTANCE_SEED, SIGN_MASK, rows, signed_hash
from support import DEVICE, require_kernels

import triton_bloom
from triton_bloom import (
    BloomEmbedding,
    BloomEmbeddingBag,
    QuantizedBloomEmbedding,
    QuantizedBloomEmbeddingBag,
    embedding_bytes,
    quantize,
)

BACKENDS = ["torch", "triton"]
NUM_IDS = 3000


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        require_kernels()
    return request.param


# The oracle: numpy float64, from the module's raw buffers. ---------------------


def oracle_codes(module) -> np.ndarray:
    """The codes unpacked from bytes (int4: column 2c in the low nibble of byte c)."""
    codes = module.codes.cpu().numpy().astype(np.int64)
    if module.bits == 4:
        unpacked = np.empty((codes.shape[0], codes.shape[1] * 2), dtype=np.int64)
        unpacked[:, 0::2] = codes % 16
        unpacked[:, 1::2] = codes // 16
        codes = unpacked
    return codes[:, : module.embedding_dim]


def oracle_scales(module) -> np.ndarray:
    """Each row's scale, ``2 ** (lo + (e - 1) * step)`` (0 for code 0), in float64."""
    lo, step = module.scale_grid.cpu().double().numpy()
    e = module.scale_codes.cpu().numpy().astype(np.float64)
    return np.where(e > 0, np.exp2(lo + (e - 1) * step), 0.0)


def oracle_table(module) -> np.ndarray:
    """Each row dequantised, ``(u - (2**bits - 1) / 2) * scale + column offset``, in float64."""
    centre = (2**module.bits - 1) / 2
    offset = module.column_offset.cpu().double().numpy()
    return (oracle_codes(module) - centre) * oracle_scales(module)[:, None] + offset


def oracle_vectors(ids, table, *, k, num_rows, padding_idx=None, hot=None, signed=False, importance=None):
    """``(n, dim)`` float64 vectors of the flattened ids: padding zero, a hot
    id its private row ``num_rows + position``, the others the sum of their
    ``k`` rows times sign and importance weight."""
    flat = [int(i) for i in np.asarray(ids).reshape(-1)]
    hot = [] if hot is None else sorted(int(i) for i in hot)
    hashed = rows(flat, k, num_rows)
    out = np.zeros((len(flat), table.shape[1]))
    for a, i in enumerate(flat):
        if padding_idx is not None and i == padding_idx:
            continue
        if i in hot:
            out[a] = table[num_rows + hot.index(i)]
            continue
        for j in range(k):
            factor = 1.0
            if signed and signed_hash(i, SPOTLIGHT_SEEDS[j] ^ SIGN_MASK) < 0:
                factor = -1.0
            if importance is not None:
                factor *= importance[signed_hash(i, IMPORTANCE_SEED) % importance.shape[0], j]
            out[a] += factor * table[hashed[a, j]]
    return out


def oracle_bags(vectors, ids, offsets, mode, per_sample_weights=None, padding_idx=None):
    """``(B, dim)`` float64 pooled bags; ``offsets`` has ``B + 1`` entries."""
    ids, offsets = np.asarray(ids).reshape(-1), [int(o) for o in offsets]
    out = np.zeros((len(offsets) - 1, vectors.shape[1]))
    for b in range(len(offsets) - 1):
        members = [i for i in range(offsets[b], offsets[b + 1]) if padding_idx is None or ids[i] != padding_idx]
        if not members:
            continue
        if mode == "max":
            out[b] = np.max(vectors[members], axis=0)
            continue
        weights = [1.0 if per_sample_weights is None else float(per_sample_weights[i]) for i in members]
        out[b] = sum(w * vectors[i] for w, i in zip(weights, members))
        if mode == "mean":
            out[b] /= len(members)
    return out


def assert_close(actual, expected):
    """float32 rounding of a sum of a few float32 terms (and of the float32
    scales the lookups compute), against float64."""
    actual = actual.detach().cpu().double().numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-5)


def trained_like(module, generator):
    """Give the float table values a trained one might hold: not the init's
    tiny normal values but rows of varied spread and offset."""
    with torch.no_grad():
        w = module.embeddings.weight
        spread = torch.rand(w.shape[0], 1, generator=generator) * 2
        shift = torch.randn(w.shape[0], 1, generator=generator)
        w.copy_((torch.randn(w.shape, generator=generator) * spread + shift).to(w.dtype))
    return module


HOT = torch.tensor([7, 11, 42, 1999])


def build(cls, bits, backend, *, seed, dim, hot=None, **options):
    generator = torch.Generator().manual_seed(seed)
    module = trained_like(cls(NUM_IDS, dim, num_rows=97, hot_ids=hot, backend=backend, **options), generator)
    return module.to(DEVICE), quantize(module.to(DEVICE), bits=bits), generator


# The format. -------------------------------------------------------------------


def oracle_error(deviation, scale, bits):
    """Squared error of each row of ``deviation`` (the rows minus the column
    offsets) at ``scale``, each value rounded to the nearest level."""
    centre = (2**bits - 1) / 2
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    levels = np.clip(np.floor(deviation / safe + centre + 0.5), 0, 2**bits - 1)
    return (((levels - centre) * safe - deviation) ** 2).sum(1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [1, 5, 33, 64])
def test_rows_take_the_nearest_level_at_the_scale_of_least_error(bits, dim):
    generator = torch.Generator().manual_seed(dim * bits)
    float_module = trained_like(BloomEmbedding(NUM_IDS, dim, num_rows=50), generator)
    quantized = quantize(float_module, bits=bits)
    w = float_module.weight.detach().double().numpy()
    offset = quantized.column_offset.double().numpy()
    assert np.allclose(offset, w.mean(0), rtol=1e-6, atol=1e-6)
    deviation = w - quantized.column_offset.double().numpy()
    centre = (2**bits - 1) / 2
    scale = oracle_scales(quantized)
    codes = oracle_codes(quantized)
    # Each value is at the level nearest to it (ties either way), clipped to the extreme levels.
    exact = deviation / scale[:, None] + centre
    assert (np.abs(codes - np.clip(exact, 0, 2**bits - 1)) <= 0.5 + 1e-6).all()
    assert ((exact < 0) <= (codes == 0)).all() and ((exact > 2**bits - 1) <= (codes == 2**bits - 1)).all()
    # The row's scale has the least squared error of the grid's scales near it, the unclipped one included.
    lo, step = quantized.scale_grid.double().numpy()
    assert 0 < step <= 1 / 16
    error = oracle_error(deviation, scale, bits)
    assert np.allclose(error, (((codes - centre) * scale[:, None] - deviation) ** 2).sum(1), rtol=1e-9, atol=1e-12)
    # The candidates: the grid's scales from the first that covers the row's
    # full range down to 3/4 of it (at most 64 codes).
    full_range = np.abs(deviation).max(1) / centre
    top = np.clip(np.ceil((np.log2(full_range) - lo) / step) + 1, 1, 255)
    lowest = top - min(64, np.ceil(np.log2(4 / 3) / step) + 1) + 1
    e = quantized.scale_codes.numpy().astype(np.float64)
    assert ((lowest - 1 <= e) & (e <= top + 1)).all()
    for other in (e - 1, e + 1, top):
        # (The float64 grid here may put a boundary a code off the lookups' float32 one.)
        inside = (other > lowest) & (other < top) | (other == top)
        other_scale = np.exp2(lo + (np.clip(other, 1, 255) - 1) * step)
        assert (error <= oracle_error(deviation, other_scale, bits) * (1 + 1e-6) + 1e-12)[inside].all()
    assert (scale >= full_range * 0.75 * 2**-step * (1 - 1e-6)).all()
    assert (scale <= full_range * 2**step * (1 + 1e-6)).all()
    # Rows start 16-byte aligned; int4 packs two columns a byte; one scale byte a row.
    assert quantized.codes.dtype == torch.uint8 and quantized.codes.shape[1] % 16 == 0
    assert quantized.codes.shape[1] == -(-(-(-dim * bits // 8)) // 16) * 16
    assert quantized.scale_codes.shape == (50,) and quantized.scale_codes.dtype == torch.uint8


def test_a_table_of_equal_rows_is_its_column_offsets():
    float_module = BloomEmbedding(NUM_IDS, 6, num_rows=20)
    with torch.no_grad():
        float_module.embeddings.weight.copy_(torch.randn(1, 6).expand(20, 6))
    quantized = quantize(float_module, bits=4)
    assert torch.equal(quantized.scale_codes, torch.zeros(20, dtype=torch.uint8))
    assert torch.equal(quantized.dequantized_weight(), float_module.weight.detach())


# Lookups against the oracle, both backends. ------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim,hot", [(5, None), (33, HOT), (64, None), (150, HOT)])
def test_embedding_matches_dequantize_then_lookup(backend, bits, dim, hot):
    float_module, quantized, generator = build(BloomEmbedding, bits, backend, seed=dim + bits, dim=dim, hot=hot)
    ids = torch.randint(0, NUM_IDS, (6, 7), generator=generator)
    ids[0, :3] = 0  # the padding id
    if hot is not None:
        ids[1, : len(hot)] = hot
    ids[2, 0] = ids[2, 1]  # a duplicate
    ids = ids.to(DEVICE)
    out = quantized(ids)
    assert out.dtype == torch.float32 and out.shape == (6, 7, dim)
    expected = oracle_vectors(ids.cpu(), oracle_table(quantized), k=4, num_rows=97, padding_idx=0, hot=hot)
    assert_close(out, expected.reshape(6, 7, dim))
    # int32 ids and a non-contiguous view read the same rows.
    assert torch.equal(quantized(ids.int()), out)
    view = quantized(ids.t())
    assert torch.equal(view, quantized(ids.t().contiguous()))
    assert_close(view, expected.reshape(6, 7, dim).transpose(1, 0, 2))


@pytest.mark.parametrize("bits", [8, 4])
def test_signed_and_importance_match_the_oracle(backend, bits):
    float_module, quantized, generator = build(
        BloomEmbedding, bits, backend, seed=5, dim=9, hot=HOT, signed=True, importance=True, importance_rows=31
    )
    with torch.no_grad():
        float_module.importance_weight.uniform_(-2, 2, generator=generator)
    quantized = quantize(float_module, bits=bits)
    ids = torch.randint(0, NUM_IDS, (40,), generator=generator)
    ids[:4] = HOT
    importance = quantized.importance_weight.cpu().double().numpy()
    expected = oracle_vectors(
        ids, oracle_table(quantized), k=4, num_rows=97, padding_idx=0, hot=HOT, signed=True, importance=importance
    )
    assert_close(quantized(ids.to(DEVICE)), expected)


def random_bags(generator, num_bags, max_len):
    lengths = torch.randint(0, max_len + 1, (num_bags,), generator=generator)
    lengths[0] = 0  # an empty bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.randint(0, NUM_IDS, (int(offsets[-1]),), generator=generator)
    return ids, offsets


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("dim,hot", [(7, HOT), (64, None)])
def test_bags_match_dequantize_then_pool(backend, bits, mode, dim, hot):
    float_module, quantized, generator = build(
        BloomEmbeddingBag, bits, backend, seed=dim * 3 + bits, dim=dim, hot=hot, mode=mode, padding_idx=3
    )
    ids, offsets = random_bags(generator, 9, 21)
    ids[offsets[2] : offsets[3]] = 3  # a bag of padding only
    ids[-5:-3] = 3
    if hot is not None:
        ids[:4] = hot
    psw = torch.rand(ids.shape, generator=generator) if mode == "sum" else None
    vectors = oracle_vectors(ids, oracle_table(quantized), k=4, num_rows=97, padding_idx=3, hot=hot)
    expected = oracle_bags(vectors, ids, offsets, mode, psw, padding_idx=3)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    out = quantized(to(ids), to(offsets[:-1]), to(psw))
    assert out.dtype == torch.float32
    assert_close(out, expected)
    # The CSR form of the same bags, and 2-D bags of equal length.
    quantized.include_last_offset = True
    assert torch.equal(quantized(to(ids), to(offsets), to(psw)), out)
    quantized.include_last_offset = False
    square = ids[:20].reshape(4, 5)
    square_offsets = torch.arange(0, 21, 5)
    sq_psw = None if psw is None else psw[:20].reshape(4, 5)
    flat_psw = None if psw is None else psw[:20]
    expected = oracle_bags(vectors[:20], ids[:20], square_offsets, mode, flat_psw, padding_idx=3)
    assert_close(quantized(to(square), per_sample_weights=to(sq_psw)), expected)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("k,dim", [(1, 33), (3, 150), (24, 64)])
def test_bags_at_every_k_with_every_variant(backend, bits, mode, k, dim):
    # The Triton bags take (id, hash function) pairs 32 a step (sum, mean)
    # or ids 32 a step (max), 64 columns a program: bags from empty to 70
    # ids cross several steps at every k (at k 3 a step ends inside an id),
    # dims 33 and 150 leave a partial block of words (150: three programs a
    # bag), with signs, importance weights, hot rows, padding and, for the
    # sum, per-sample weights all on.
    float_module, quantized, generator = build(
        BloomEmbeddingBag,
        bits,
        backend,
        seed=k * 7 + dim + bits,
        dim=dim,
        hot=HOT,
        mode=mode,
        padding_idx=3,
        num_hash_functions=k,
        signed=True,
        importance=True,
        importance_rows=31,
    )
    with torch.no_grad():
        float_module.importance_weight.uniform_(-2, 2, generator=generator)
    quantized = quantize(float_module, bits=bits)
    ids, offsets = random_bags(generator, 7, 70)
    ids[offsets[2] : offsets[3]] = 3  # a bag of padding only
    ids[: len(HOT)] = HOT
    ids[-3] = 3
    psw = torch.randn(ids.shape, generator=generator) if mode == "sum" else None
    importance = quantized.importance_weight.cpu().double().numpy()
    vectors = oracle_vectors(
        ids, oracle_table(quantized), k=k, num_rows=97, padding_idx=3, hot=HOT, signed=True, importance=importance
    )
    expected = oracle_bags(vectors, ids, offsets, mode, psw, padding_idx=3)
    # Sums of up to 70 x 24 terms: float32 rounding relative to the sum of
    # the terms' magnitudes, not to the (cancelling) result.
    magnitudes = oracle_vectors(
        ids, np.abs(oracle_table(quantized)), k=k, num_rows=97, padding_idx=3, hot=HOT, importance=np.abs(importance)
    )
    magnitude = oracle_bags(magnitudes, ids, offsets, mode, None if psw is None else psw.abs(), padding_idx=3)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    actual = quantized(to(ids), to(offsets[:-1]), to(psw)).cpu().double().numpy()
    assert np.all(np.abs(actual - expected) <= 1e-5 + 2e-5 * np.abs(expected) + 1e-6 * magnitude)
    # The lookup of the same ids, at the same k and variants.
    lookup = quantize(
        trained_like(
            BloomEmbedding(
                NUM_IDS,
                dim,
                num_rows=97,
                hot_ids=HOT,
                backend=backend,
                padding_idx=3,
                num_hash_functions=k,
                signed=True,
                importance=True,
                importance_rows=31,
            ),
            generator,
        ).to(DEVICE),
        bits=bits,
    )
    importance = lookup.importance_weight.cpu().double().numpy()
    expected = oracle_vectors(
        ids, oracle_table(lookup), k=k, num_rows=97, padding_idx=3, hot=HOT, signed=True, importance=importance
    )
    magnitude = oracle_vectors(
        ids, np.abs(oracle_table(lookup)), k=k, num_rows=97, padding_idx=3, hot=HOT, importance=np.abs(importance)
    )
    actual = lookup(to(ids)).cpu().double().numpy()
    assert np.all(np.abs(actual - expected) <= 1e-5 + 2e-5 * np.abs(expected) + 1e-6 * magnitude)


def test_empty_input_and_bags(backend):
    _, quantized, _ = build(BloomEmbedding, 4, backend, seed=1, dim=6)
    assert quantized(torch.empty(0, 3, dtype=torch.int64, device=DEVICE)).shape == (0, 3, 6)
    _, bag, _ = build(BloomEmbeddingBag, 8, backend, seed=1, dim=6, mode="mean")
    out = bag(torch.empty(0, dtype=torch.int64, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE))
    assert torch.equal(out, torch.zeros(3, 6, device=DEVICE))


def test_both_backends_agree_bit_for_bit_on_a_bag():
    require_kernels()
    _, quantized, generator = build(BloomEmbeddingBag, 4, "torch", seed=2, dim=40, hot=HOT, mode="sum")
    ids, offsets = random_bags(generator, 6, 12)
    ids, offsets = ids.to(DEVICE), offsets.to(DEVICE)
    torch_out = quantized(ids, offsets[:-1])
    quantized.backend = "triton"
    assert_close(quantized(ids, offsets[:-1]), torch_out.double().cpu().numpy())


def test_bad_ids_are_refused(backend):
    _, quantized, _ = build(BloomEmbedding, 8, backend, seed=1, dim=4)
    with pytest.raises(IndexError, match=str(NUM_IDS)):
        quantized(torch.tensor([1, NUM_IDS], device=DEVICE))
    with pytest.raises(TypeError, match="int32 or int64"):
        quantized(torch.tensor([1.0], device=DEVICE))
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize(BloomEmbedding(10, 4, num_rows=3), bits=2)


# The dequantised module and the state dict. ------------------------------------


def test_dequantize_gives_a_float_module_with_the_same_lookups():
    _, quantized, generator = build(BloomEmbeddingBag, 4, "torch", seed=4, dim=12, hot=HOT, mode="max")
    back = quantized.dequantize()
    assert type(back) is BloomEmbeddingBag and back.mode == "max"
    ids, offsets = random_bags(generator, 5, 9)
    ids, offsets = ids.to(DEVICE), offsets.to(DEVICE)
    assert_close(back(ids, offsets[:-1]), quantized(ids, offsets[:-1]).double().cpu().numpy())


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trip(bits):
    _, quantized, generator = build(BloomEmbedding, bits, "torch", seed=bits, dim=10, hot=HOT)
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["_extra_state"]["quantization"]["bits"] == bits
    fresh = QuantizedBloomEmbedding(NUM_IDS, 10, num_rows=97, bits=bits, hot_ids=HOT, device=DEVICE)
    fresh.load_state_dict(state)
    ids = torch.randint(0, NUM_IDS, (30,), generator=generator).to(DEVICE)
    assert torch.equal(fresh(ids), quantized(ids))


def snapshot(module):
    return {key: value.clone() for key, value in module.state_dict().items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize(
    "other",
    [
        dict(bits=8),  # another format
        dict(bits=4, num_hash_functions=3),  # other hashing
        dict(bits=4, float_checkpoint=True),  # not a quantized checkpoint at all
    ],
)
def test_a_refused_load_leaves_the_module_unchanged(other):
    _, module, _ = build(BloomEmbedding, 4, "torch", seed=9, dim=16)
    before = snapshot(module)
    if other.pop("float_checkpoint", False):
        state = BloomEmbedding(NUM_IDS, 16, num_rows=97).state_dict()
    else:
        bits = other.pop("bits")
        state = quantize(BloomEmbedding(NUM_IDS, 16, num_rows=97, **other), bits=bits).state_dict()
    for strict in (True, False):
        with pytest.raises((ValueError, RuntimeError), match="checkpoint"):
            module.load_state_dict(state, strict=strict)
        after = snapshot(module)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[key], after[key]) for key in before)


# Compile, export, and the refusal to train. ------------------------------------


class Ranker(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.item = BloomEmbedding(NUM_IDS, 8, num_rows=97, hot_ids=HOT, backend=backend)
        self.history = BloomEmbeddingBag(NUM_IDS, 8, num_rows=89, mode="mean", padding_idx=0, backend=backend)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, items, history, offsets):
        return self.head(self.item(items) * self.history(history, offsets)).squeeze(-1)


@pytest.mark.parametrize("bits", [8, 4])
def test_compile_fullgraph_and_export(bits):
    model = quantize(Ranker("torch").to(DEVICE), bits=bits)
    assert isinstance(model.item, QuantizedBloomEmbedding) and isinstance(model.history, QuantizedBloomEmbeddingBag)
    items = torch.tensor([1, 7, 500, 2999], device=DEVICE)
    history = torch.tensor([0, 5, 6, 7, 8, 9, 10], device=DEVICE)
    offsets = torch.tensor([0, 2, 2, 5], device=DEVICE)
    expected = model(items, history, offsets)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(items, history, offsets), expected)
    exported = torch.export.export(model, (items, history, offsets))
    torch.testing.assert_close(exported.module()(items, history, offsets), expected)


def test_training_a_quantized_table_is_refused_with_the_fix():
    _, quantized, _ = build(BloomEmbedding, 4, "torch", seed=3, dim=4)
    assert list(quantized.parameters()) == []
    with pytest.raises(RuntimeError, match=r"inference only.*triton_bloom.quantize\(module, bits=4\)"):
        quantized.requires_grad_(True)
    quantized.requires_grad_(False)  # freezing is fine
    quantized.column_offset.requires_grad_(True)
    with pytest.raises(RuntimeError, match="dequantize"):
        quantized(torch.tensor([1, 2], device=DEVICE))
    with torch.no_grad():
        quantized(torch.tensor([1, 2], device=DEVICE))  # inference still runs
    # A backward through the op itself names the fix too.
    out = triton_bloom.quantized_ops.quantized_forward(
        torch.tensor([1, 2], device=DEVICE),
        quantized.codes,
        quantized.scale_codes,
        quantized.scale_grid,
        quantized.column_offset,
        None,
        None,
        bits=4,
        dim=4,
        num_hash_functions=4,
        padding_idx=None,
        num_embeddings=NUM_IDS,
        signed=False,
        use_triton=False,
    )
    with pytest.raises(RuntimeError, match="inference only"):
        out.sum().backward()
    # A frozen quantized table under a trained head: the head trains.
    model = quantize(Ranker("torch"), bits=8)
    model(torch.tensor([1]), torch.tensor([1, 2]), torch.tensor([0])).sum().backward()
    assert model.head.weight.grad is not None


def test_private_dim_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="private_dim"):
        quantize(BloomEmbedding(100, 8, num_rows=10, private_dim=2), bits=8)


# Bytes, measured on the built modules. -----------------------------------------


@pytest.mark.parametrize("hot", [None, HOT])
def test_module_bytes(hot):
    rows, dim = 2000, 64
    float_module = BloomEmbedding(10_000, dim, num_rows=rows, hot_ids=hot)
    hot_bytes = 0 if hot is None else len(hot) * 4  # int32 hot ids, in both modules
    table_rows = rows + (0 if hot is None else len(hot))
    int8, int4 = quantize(float_module, bits=8), quantize(float_module, bits=4)
    assert embedding_bytes(float_module) == table_rows * dim * 4 + hot_bytes
    # Codes and a scale byte a row, plus the table's scale grid (2 floats) and column offsets (dim floats).
    table = 2 * 4 + dim * 4
    assert embedding_bytes(int8) == table_rows * (dim + 1) + table + hot_bytes
    assert embedding_bytes(int4) == table_rows * (dim // 2 + 1) + table + hot_bytes
    # int4 rows at width 64, everything counted: at most 0.13 of the fp32 table (33 of 256 bytes a row).
    assert embedding_bytes(int4) - hot_bytes <= 0.13 * (embedding_bytes(float_module) - hot_bytes)
    # Against the full fp32 table of the 10,000 ids the Bloom table at 0.2 replaces: 1/38.
    assert embedding_bytes(int4) <= 0.027 * 10_000 * dim * 4


@pytest.mark.parametrize("bits", [8, 4])
def test_the_custom_ops_pass_opcheck(bits):
    from triton_bloom.quantized_ops import quantized_bag_forward, quantized_forward

    _, quantized, generator = build(BloomEmbeddingBag, bits, "torch", seed=6, dim=10, hot=HOT, mode="mean")
    ids, offsets = random_bags(generator, 4, 6)
    ids, offsets = ids.to(DEVICE), offsets.to(DEVICE)
    options = dict(
        bits=bits,
        dim=10,
        num_hash_functions=4,
        padding_idx=None,
        num_embeddings=NUM_IDS,
        signed=False,
        use_triton=False,
    )
    tensors = (quantized.codes, quantized.scale_codes, quantized.scale_grid, quantized.column_offset)
    torch.library.opcheck(quantized_forward, (ids, *tensors, None, quantized.hot_ids), options)
    torch.library.opcheck(
        quantized_bag_forward, (ids, offsets, *tensors, None, None, quantized.hot_ids), dict(options, mode=1)
    )


def test_dtype_casts_keep_the_format():
    _, quantized, generator = build(
        BloomEmbedding, 4, "torch", seed=8, dim=6, hot=HOT, signed=True, importance=True, importance_rows=7
    )
    ids = torch.randint(0, NUM_IDS, (25,), generator=generator).to(DEVICE)
    before = quantized(ids)
    for cast in (lambda m: m.half(), lambda m: m.double(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        cast(quantized)
        assert quantized.scale_grid.dtype == quantized.column_offset.dtype == torch.float32
        assert quantized.importance_weight.dtype == torch.float32
        assert torch.equal(quantized(ids), before)


# The output side: scoring ids by their dequantised vectors. --------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_topk_and_rank_score_the_dequantised_vectors(backend, bits):
    _, quantized, generator = build(BloomEmbedding, bits, backend, seed=20 + bits, dim=24, hot=HOT, signed=True)
    queries = torch.randn(5, 24, generator=generator)
    vectors = oracle_vectors(
        np.arange(NUM_IDS), oracle_table(quantized), k=4, num_rows=97, padding_idx=0, hot=HOT, signed=True
    )
    scores = queries.double().numpy() @ vectors.T
    scores[:, 0] = -np.inf  # the padding id is no item
    exclude = torch.tensor([[5, 9, -1]] * 5)
    scores[:, [5, 9]] = -np.inf
    top = quantized.topk(queries.to(DEVICE), 10, exclude=exclude.to(DEVICE), chunk_size=700)
    best = -np.sort(-scores, axis=1)[:, :10]
    np.testing.assert_allclose(top.scores.cpu().double().numpy(), best, rtol=1e-5, atol=1e-4)
    # The ids returned score what the oracle says (near ties may come in either order).
    chosen = np.take_along_axis(scores, top.ids.cpu().numpy(), axis=1)
    np.testing.assert_allclose(chosen, best, rtol=1e-5, atol=1e-4)
    targets = torch.randint(1, NUM_IDS, (5,), generator=generator)
    ranks = quantized.rank(queries.to(DEVICE), targets.to(DEVICE), chunk_size=700)
    own = scores[np.arange(5), targets.numpy()]
    scores[:, [5, 9]] = queries.double().numpy() @ vectors[[5, 9]].T  # not excluded from the ranking
    gap = scores - own[:, None]
    gap[:, 0] = -np.inf
    above = (gap > 0).sum(1) + ((gap == 0).sum(1) - 1) / 2
    near = (np.abs(gap) < 1e-4).sum(1)
    assert (np.abs(ranks.above.cpu().numpy() - above) <= near).all()
    assert (ranks.others.cpu().numpy() == NUM_IDS - 2).all()


def test_the_output_side_refuses_to_train_a_quantized_table():
    from triton_bloom.output import bloom_logits

    _, quantized, _ = build(BloomEmbedding, 4, "torch", seed=2, dim=8)
    with pytest.raises(RuntimeError, match=r"inference only.*dequantize\(\)"):
        bloom_logits(torch.randn(3, 8, requires_grad=True), quantized)


def test_an_optimizer_over_a_quantized_table_alone_fails_and_the_error_says_why():
    """The rows are buffers, so an optimizer built over the quantized module
    alone gets PyTorch's own error (raised inside ``torch.optim``, before any
    of this package's code runs); the module's training error names that
    message and the way back to training, and in a model the table is frozen."""
    _, quantized, _ = build(BloomEmbedding, 8, "torch", seed=3, dim=4)
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.Adam(quantized.parameters())
    assert "optimizer got an empty parameter list" in quantized.training_error()
    assert "dequantize()" in quantized.training_error()
    model = quantize(Ranker("torch"), bits=8)
    optimizer = torch.optim.Adam(model.parameters())
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in model.head.parameters()
    }


def test_a_checkpoint_with_tampered_hot_ids_is_refused_whole():
    _, quantized, _ = build(BloomEmbedding, 4, "torch", seed=12, dim=8, hot=HOT)
    state = quantized.state_dict()
    before = snapshot(quantized)
    for hot, problem in ((HOT.flip(0), "not sorted"), (torch.tensor([7, 11, 42, NUM_IDS]), "out of range")):
        tampered = dict(state, hot_ids=hot.to(state["hot_ids"].dtype))
        tampered["codes"] = state["codes"] + 1
        with pytest.raises(ValueError, match=f"not a valid hot set: .*{problem}"):
            quantized.load_state_dict(tampered)
        after = snapshot(quantized)
        assert all(torch.equal(before[key], after[key]) for key in before)
