"""Generated differential tests: cases nobody chose, each run on both
backends (the Triton kernels through the interpreter on CPU) and checked
against the independent float64 oracle (``property_oracle.py``) for outputs
and for every gradient (table, importance weights, per-sample weights).

Hypothesis draws the cases; the "ci" profile (``conftest.py``) draws the same
ones every run, ``HYPOTHESIS_PROFILE=long`` ten times as many fresh ones.
The interpreter is slow, so shapes stay tiny and ``k`` leans small; the
draws still reach every option and both ends of every range.  A failure
that Hypothesis shrank is kept as an ``@example`` below its test, with the
bug it found, so it runs on every profile forever after.

Table values, importance weights, per-sample weights and output gradients
are small dyadic rationals: their float32 sums are exact, so max pooling's
ties are real ties (broken towards the first id, as ``nn.EmbeddingBag``
does) on every backend and in the oracle alike, instead of rounding noise.
"""

from __future__ import annotations

import math

import numpy as np
import property_oracle as oracle
import torch
from case_count import count, examples
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import DEVICE, require_kernels

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, bloom_hash
from triton_bloom.functional import bloom_embedding, bloom_embedding_bag
from triton_bloom.hashing import seed_tensor

BACKENDS = ("torch", "triton")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ID_DTYPES = {"int32": torch.int32, "int64": torch.int64}
# Relative to the summed magnitudes of the terms: float32 accumulation, and
# one rounding of the result to the table's dtype.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
ID_LIMIT = 2**63  # ids are below this whatever num_embeddings is
BOUNDARY_IDS = (0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1)


# Strategies. ----------------------------------------------------------------------


def id_values(num_embeddings):
    high = ID_LIMIT if num_embeddings is None else num_embeddings
    edges = [i for i in BOUNDARY_IDS if i < high] + [high - 1]
    return st.one_of(st.integers(0, high - 1), st.sampled_from(edges))


def num_embeddings_strategy():
    # None admits every id below 2**63; the rest straddle the 4-byte/8-byte
    # hashing boundary at 2**31.
    return st.one_of(st.integers(1, 1000), st.sampled_from([2**31 - 1, 2**31, 2**31 + 1, 2**40, 2**63 - 1]), st.none())


def flat_ids(draw, n, num_embeddings):
    """``n`` ids: mixtures of a small pool (duplicates) and free draws, or Zipf-skewed."""
    values = id_values(num_embeddings)
    if draw(st.booleans()):
        high = ID_LIMIT if num_embeddings is None else num_embeddings
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        ranks = rng.zipf(1.3, size=n) - 1
        base = draw(values)
        return [int((base + int(r)) % high) for r in ranks]
    pool = draw(st.lists(values, min_size=1, max_size=4))
    return draw(st.lists(st.one_of(st.sampled_from(pool), values), min_size=n, max_size=n))


def padding_strategy(draw, ids, num_embeddings):
    choices = [st.none(), id_values(num_embeddings)]
    if ids:
        choices.append(st.sampled_from(sorted(set(ids))))
    return draw(st.one_of(*choices))


def id_dtype(draw, ids):
    return "int32" if max(ids, default=0) < 2**31 and draw(st.booleans()) else "int64"


def shape_strategy():
    # 0-d, empty and up to rank 5, at most 32 ids.
    return st.lists(st.integers(0, 4), min_size=0, max_size=5).filter(lambda s: math.prod(s) <= 32)


def table_options(draw, num_embeddings, max_dim=70):
    # The interpreter pins BLOCK_D = 32: dims past it cover a partial second tile.
    return dict(
        num_rows=draw(st.one_of(st.just(1), st.integers(1, 64))),
        dim=draw(st.one_of(st.integers(1, 8), st.integers(1, max_dim))),
        k=draw(st.one_of(st.integers(1, 4), st.integers(1, 24))),
        signed=draw(st.booleans()),
        importance_rows=draw(st.one_of(st.none(), st.integers(1, 6))),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        api=draw(st.sampled_from(["module", "functional"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def embedding_cases(draw):
    num_embeddings = draw(num_embeddings_strategy())
    shape = draw(shape_strategy())
    ids = flat_ids(draw, math.prod(shape), num_embeddings)
    case = dict(
        num_embeddings=num_embeddings,
        shape=shape,
        ids=ids,
        id_dtype=id_dtype(draw, ids),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded", "flipped"])),
        padding_idx=padding_strategy(draw, ids, num_embeddings),
        **table_options(draw, num_embeddings),
    )
    # The module keeps a (num_embeddings, k) cache: only small id spaces.
    case["hash_cache"] = num_embeddings is not None and num_embeddings <= 1000 and draw(st.booleans())
    case["negative_padding"] = case["api"] == "module" and num_embeddings is not None and draw(st.booleans())
    return case


def embedding_case(**fields):
    """A full case from the fields that matter (for ``@example``)."""
    case = dict(
        num_embeddings=100,
        shape=[3],
        ids=[1, 2, 3],
        id_dtype="int64",
        layout="contiguous",
        padding_idx=None,
        num_rows=7,
        dim=3,
        k=2,
        signed=False,
        importance_rows=None,
        dtype="float64",
        api="module",
        seed=0,
        hash_cache=False,
        negative_padding=False,
    )
    case.update(fields)
    return case


# Building the tensors of a case. -------------------------------------------------


def dyadic(generator, shape, scale, dtype):
    """Values ``m / scale`` with small integers ``m``: exact in every dtype we use."""
    return (torch.randint(-8, 9, shape, generator=generator).double() / scale).to(dtype)


def layout_ids(ids: torch.Tensor, layout: str) -> torch.Tensor:
    """The ids tensor in a given memory layout (its values may change: the
    oracle reads the tensor that is passed).  PyTorch tensors have no
    negative strides: flips (a reversed copy), every-other-element slices
    and stride-0 expansions stand in for unusual layouts."""
    if layout == "transposed" and ids.dim() >= 2:
        return ids.permute(*reversed(range(ids.dim())))
    if layout == "strided" and ids.dim() >= 1:
        wide = torch.stack([ids, torch.full_like(ids, -1)], dim=-1)  # -1 would raise if ever read
        return wide.flatten(-2)[..., ::2]
    if layout == "expanded" and ids.dim() >= 1 and ids.numel():
        return ids[:1].expand_as(ids)  # stride 0: one id read many times
    if layout == "flipped" and ids.dim() >= 1:
        return ids.flip(0)
    return ids


def build_ids(case) -> torch.Tensor:
    ids = torch.tensor(case["ids"], dtype=torch.int64).reshape(case["shape"]).to(ID_DTYPES[case["id_dtype"]])
    return layout_ids(ids, case["layout"])


def build_values(case):
    g = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    weight = dyadic(g, (case["num_rows"], case["dim"]), 4, dtype)
    importance = None
    if case["importance_rows"] is not None:
        imp_dtype = dtype if case["api"] == "functional" and dtype == torch.float64 else torch.float32
        importance = dyadic(g, (case["importance_rows"], case["k"]), 4, imp_dtype)
    return g, weight, importance


def on_device(*tensors):
    """The tensors where the kernels run (CUDA when there is one); the oracle keeps the CPU copies."""
    return [None if t is None else t.to(DEVICE) for t in tensors]


def tolerance(*dtypes: str) -> float:
    return max(TOLERANCE[d] for d in dtypes)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_gradients(expected, grad_weight, grad_importance, table_dtype, importance):
    oracle.assert_close(
        grad_weight, expected.grad_weight, expected.grad_weight_mag, TOLERANCE[table_dtype], "table gradient"
    )
    if importance is not None:
        tol = tolerance(table_dtype, dtype_name(importance.dtype))
        oracle.assert_close(
            grad_importance, expected.grad_importance, expected.grad_importance_mag, tol, "importance gradient"
        )


# Hashing. -------------------------------------------------------------------------

HASH_ID_DTYPES = {
    "uint8": (torch.uint8, 2**8),
    "int8": (torch.int8, 2**7),
    "int16": (torch.int16, 2**15),
    "int32": (torch.int32, 2**31),
    "int64": (torch.int64, 2**63),
}


@st.composite
def hash_cases(draw):
    dtype = draw(st.sampled_from(sorted(HASH_ID_DTYPES)))
    limit = HASH_ID_DTYPES[dtype][1]
    shape = draw(shape_strategy())
    values = st.one_of(st.integers(0, limit - 1), st.sampled_from([i for i in BOUNDARY_IDS if i < limit]))
    ids = draw(st.lists(values, min_size=math.prod(shape), max_size=math.prod(shape)))
    # Past 2**31 rows, the floor modulo of a negative hash leaves int32.
    num_rows = draw(
        st.one_of(
            st.integers(1, 1000),
            st.integers(2**31 - 3, 2**31 + 3),
            st.integers(2**31, 2**62),
            st.just(2**63 - 1),
            st.just(1),
        )
    )
    return dict(dtype=dtype, shape=shape, ids=ids, k=draw(st.integers(1, 24)), num_rows=num_rows)


@settings(max_examples=examples(400))
@given(case=hash_cases())
def test_hash_matches_oracle(case):
    """``bloom_hash`` and the kernels' own hash function give the oracle's rows."""
    kernels = require_kernels()
    count("hash")
    ids = torch.tensor(case["ids"], dtype=torch.int64).reshape(case["shape"]).to(HASH_ID_DTYPES[case["dtype"]][0])
    expected = oracle.rows(ids.numpy(), case["k"], case["num_rows"]).reshape(*ids.shape, case["k"])
    rows = bloom_hash(ids, case["k"], case["num_rows"])
    assert rows.dtype == torch.int64 and rows.shape == (*ids.shape, case["k"])
    np.testing.assert_array_equal(rows.numpy(), expected)
    if ids.dtype in (torch.int32, torch.int64):  # what the kernels take
        rows = kernels.bloom_hash(
            ids.to(DEVICE),
            seed_tensor(DEVICE),
            num_hash_functions=case["k"],
            num_rows=case["num_rows"],
            wide_ids=ids.dtype == torch.int64,
        )
        np.testing.assert_array_equal(rows.cpu().numpy(), expected)


# BloomEmbedding. ------------------------------------------------------------------


def run_embedding(case, backend, ids, weight, importance, grad_out):
    """``(out, table gradient, importance gradient)`` through the public API."""
    padding_idx = case["padding_idx"]
    if case["api"] == "module":
        if padding_idx is not None and case["negative_padding"]:
            padding_idx -= case["num_embeddings"]
        module = BloomEmbedding(
            case["num_embeddings"],
            case["dim"],
            0.2,
            case["k"],
            padding_idx=padding_idx,
            num_rows=case["num_rows"],
            hash_cache=case["hash_cache"],
            backend=backend,
            signed=case["signed"],
            importance=importance is not None,
            importance_rows=None if importance is None else importance.shape[0],
            dtype=weight.dtype,
            device=weight.device,
        )
        with torch.no_grad():
            module.weight.copy_(weight)
            if importance is not None:
                module.importance_weight.copy_(importance)
        out = module(ids)
        out.backward(grad_out)
        imp_grad = None if importance is None else module.importance_weight.grad
        return out, module.weight.grad, imp_grad
    w = weight.clone().requires_grad_(True)
    imp = None if importance is None else importance.clone().requires_grad_(True)
    cache = None
    if case["hash_cache"]:
        cache = bloom_hash(torch.arange(case["num_embeddings"], device=ids.device), case["k"], case["num_rows"])
        cache = cache.to(torch.int32)
    out = bloom_embedding(
        ids,
        w,
        case["k"],
        padding_idx,
        num_embeddings=case["num_embeddings"],
        hash_cache=cache,
        backend=backend,
        signed=case["signed"],
        importance=imp,
    )
    out.backward(grad_out)
    return out, w.grad, None if imp is None else imp.grad


@settings(max_examples=examples(350))
@given(case=embedding_cases())
# Regression cases Hypothesis found (see the report of issue 15):
# no ids with importance weights: the PyTorch backward could not reshape an empty gradient.
@example(case=embedding_case(shape=[0], ids=[], importance_rows=1, api="functional"))
def test_embedding_matches_oracle(case):
    """``BloomEmbedding`` and ``bloom_embedding``: outputs and gradients on
    both backends equal the float64 oracle's."""
    require_kernels()
    count("embedding")
    ids = build_ids(case)
    g, weight, importance = build_values(case)
    grad_out = dyadic(g, (*ids.shape, case["dim"]), 4, weight.dtype)
    spec = oracle.Spec(
        case["k"], case["padding_idx"], case["signed"], None if importance is None else importance.double().numpy()
    )
    expected = oracle.embedding(ids.numpy(), weight.double().numpy(), spec, grad_out.double().numpy())
    for backend in BACKENDS:
        out, grad_weight, grad_importance = run_embedding(case, backend, *on_device(ids, weight, importance, grad_out))
        assert out.dtype == weight.dtype and grad_weight.dtype == weight.dtype, backend
        oracle.assert_close(out, expected.out, expected.out_mag, TOLERANCE[case["dtype"]], f"{backend} output")
        check_gradients(expected, grad_weight, grad_importance, case["dtype"], importance)


# BloomEmbeddingBag. ---------------------------------------------------------------


@st.composite
def bag_cases(draw):
    num_embeddings = draw(num_embeddings_strategy())
    table = table_options(draw, num_embeddings, max_dim=40)
    # The interpreted bag kernels run a program per bag and column tile that
    # walks its ids and, for each, the k hashes: the cost grows with
    # k * tiles * (ids + bags).  Keep that product small, so a case takes
    # about a tenth of a second; small k still gets long bags.
    budget = max(3, 64 // (table["k"] * -(-table["dim"] // 32)))  # ids + bags
    form = draw(st.sampled_from(["1d", "2d"]))
    include_last_offset = False
    if form == "2d":
        bags = draw(st.integers(0, min(5, budget - 1)))
        shape = [bags, draw(st.integers(0, min(5, (budget - bags) // max(bags, 1))))]
        n, offsets = shape[0] * shape[1], None
    else:
        n = draw(st.integers(0, min(24, budget - 2)))
        shape = [n]
        include_last_offset = draw(st.booleans())
        starts = sorted(draw(st.lists(st.integers(0, n), min_size=0, max_size=max(0, min(6, budget - n - 2)))))
        offsets = [0] + starts
        if include_last_offset:
            offsets.append(n)  # CSR: the last offset ends the last bag (a shorter one is test_fuzz's)
    ids = flat_ids(draw, n, num_embeddings)
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    psw_dtype = (
        draw(st.one_of(st.none(), st.sampled_from(["float32", "float64", "float16"]))) if mode == "sum" else None
    )
    case = dict(
        num_embeddings=num_embeddings,
        form=form,
        shape=shape,
        ids=ids,
        id_dtype=id_dtype(draw, ids),
        offsets=offsets,
        offsets_dtype=draw(st.sampled_from(["int32", "int64"])),
        include_last_offset=include_last_offset,
        mode=mode,
        psw_dtype=psw_dtype,
        padding_idx=padding_strategy(draw, ids, num_embeddings),
        **table,
    )
    return case


def bag_case(**fields):
    """A full case from the fields that matter (for ``@example``)."""
    case = dict(
        num_embeddings=100,
        form="1d",
        shape=[3],
        ids=[1, 2, 3],
        id_dtype="int64",
        offsets=[0, 1],
        offsets_dtype="int64",
        include_last_offset=False,
        mode="sum",
        psw_dtype=None,
        padding_idx=None,
        num_rows=7,
        dim=3,
        k=2,
        signed=False,
        importance_rows=None,
        dtype="float64",
        api="module",
        seed=0,
    )
    case.update(fields)
    return case


def full_offsets(case, n):
    """The ``B + 1`` bag boundaries, computed here from the case's description."""
    if case["form"] == "2d":
        length = case["shape"][1]
        return [b * length for b in range(case["shape"][0] + 1)]
    return case["offsets"] if case["include_last_offset"] else case["offsets"] + [n]


def run_bag(case, backend, ids, offsets, weight, importance, psw, grad_out):
    """``(out, table gradient, importance gradient, per-sample weights' gradient)``."""
    p = None if psw is None else psw.clone().requires_grad_(True)
    if case["api"] == "module":
        module = BloomEmbeddingBag(
            case["num_embeddings"],
            case["dim"],
            0.2,
            case["k"],
            mode=case["mode"],
            padding_idx=case["padding_idx"],
            include_last_offset=case["include_last_offset"],
            num_rows=case["num_rows"],
            backend=backend,
            signed=case["signed"],
            importance=importance is not None,
            importance_rows=None if importance is None else importance.shape[0],
            dtype=weight.dtype,
            device=weight.device,
        )
        with torch.no_grad():
            module.weight.copy_(weight)
            if importance is not None:
                module.importance_weight.copy_(importance)
        out = module(ids, offsets, p)
        out.backward(grad_out)
        imp_grad = None if importance is None else module.importance_weight.grad
        return out, module.weight.grad, imp_grad, None if p is None else p.grad
    w = weight.clone().requires_grad_(True)
    imp = None if importance is None else importance.clone().requires_grad_(True)
    out = bloom_embedding_bag(
        ids,
        w,
        offsets,
        case["k"],
        case["mode"],
        p,
        case["padding_idx"],
        case["include_last_offset"],
        num_embeddings=case["num_embeddings"],
        backend=backend,
        signed=case["signed"],
        importance=imp,
    )
    out.backward(grad_out)
    return out, w.grad, None if imp is None else imp.grad, None if p is None else p.grad


@settings(max_examples=examples(300))
@given(case=bag_cases())
# The failure this test found (include_last_offset=True with ids past the
# last offset crashed the PyTorch backward) is now a ValueError: its
# regression case lives in test_fuzz.py.
def test_bag_matches_oracle(case):
    """``BloomEmbeddingBag`` and ``bloom_embedding_bag``, every mode, random
    offsets: outputs and gradients on both backends equal the oracle's."""
    require_kernels()
    count("bag")
    ids = torch.tensor(case["ids"], dtype=torch.int64).reshape(case["shape"]).to(ID_DTYPES[case["id_dtype"]])
    offsets = None
    if case["offsets"] is not None:
        offsets = torch.tensor(case["offsets"], dtype=ID_DTYPES[case["offsets_dtype"]])
    g, weight, importance = build_values(case)
    psw = None
    if case["psw_dtype"] is not None:
        psw = dyadic(g, tuple(case["shape"]), 4, DTYPES[case["psw_dtype"]])
    bounds = full_offsets(case, ids.numel())
    grad_out = dyadic(g, (len(bounds) - 1, case["dim"]), 4, weight.dtype)
    spec = oracle.Spec(
        case["k"], case["padding_idx"], case["signed"], None if importance is None else importance.double().numpy()
    )
    # The table's dtype is the one the pooling runs in: per-sample weights
    # are read in it, as the functional form documents.
    psw_used = None if psw is None else psw.to(weight.dtype).double().numpy()
    expected = oracle.bag(
        ids.reshape(-1).numpy(),
        bounds,
        weight.double().numpy(),
        spec,
        case["mode"],
        grad_out.double().numpy(),
        psw_used,
    )
    for backend in BACKENDS:
        out, grad_weight, grad_importance, grad_psw = run_bag(
            case, backend, *on_device(ids, offsets, weight, importance, psw, grad_out)
        )
        assert out.dtype == weight.dtype, backend
        oracle.assert_close(out, expected.out, expected.out_mag, TOLERANCE[case["dtype"]], f"{backend} output")
        check_gradients(expected, grad_weight, grad_importance, case["dtype"], importance)
        if psw is not None:
            assert grad_psw.dtype == psw.dtype
            oracle.assert_close(
                grad_psw.reshape(-1),
                expected.grad_psw,
                expected.grad_psw_mag,
                tolerance(case["dtype"], case["psw_dtype"]),
                f"{backend} per-sample weights' gradient",
            )
