"""Hostile input through the public API, generated: every call either gives
the float64 oracle's answer or raises one of the documented exceptions
(``TypeError``, ``ValueError``, ``IndexError``, ``RuntimeError``,
``NotImplementedError``) naming the offending value; never a crash, a hang
(each case runs under an alarm), an out-of-bounds read or a wrong answer.

Each case is a small valid lookup (``BloomEmbedding`` or
``BloomEmbeddingBag``, module or functional form, either backend) with up to
three perturbations drawn from ``PERTURBATIONS``.  A perturbation either
makes the call invalid, and says which exceptions may come and what their
message must contain, or keeps it valid in an unusual way (NaN and
infinities in per-sample weights or in the output gradient), and then the
result is held to the oracle.  NaN and infinities propagate as in
``nn.Embedding`` / ``nn.EmbeddingBag``: a NaN per-sample weight or gradient
makes NaN of what it touches and nothing else; the weight of a padding id
touches nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from typing import Any, Optional

import numpy as np
import property_oracle as oracle
import torch
from case_count import count, examples
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import require_kernels

from triton_bloom import BloomEmbedding, BloomEmbeddingBag
from triton_bloom.functional import bloom_embedding, bloom_embedding_bag

DOCUMENTED = (TypeError, ValueError, IndexError, RuntimeError, NotImplementedError)
# On CPU tensors: the kernels' only through the interpreter.  (The fuzz stays
# on CPU: on CUDA an id out of range is a device-side assert, which ends the
# process's CUDA context, so it cannot be tested case after case.)
BACKENDS = ("torch", "triton") if not torch.cuda.is_available() else ("torch",)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
SECONDS_PER_CASE = 60


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, rather than hang CI, if a call does not return."""

    def expire(signum, frame):
        raise TimeoutError(f"call did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass
class Call:
    """One call through the public API, and what it may raise."""

    kind: str  # "embedding" or "bag"
    api: str  # "module" or "functional"
    backend: str
    num_embeddings: Optional[int]
    num_rows: int
    dim: int
    k: int
    padding_idx: Optional[int]
    signed: bool
    mode: str
    include_last_offset: bool
    ids: Any
    offsets: Any
    psw: Any
    weight: Any
    importance: Any
    grad_out: torch.Tensor
    move_module_to: Optional[str] = None
    hash_cache: Any = None  # the functional form's precomputed rows
    errors: list = dataclasses.field(default_factory=list)  # (exception types, texts one of which the message holds)

    def expect(self, types, needle) -> None:
        # A shape may be printed as a tuple or as a torch.Size.
        texts = (str(needle), str(torch.Size(needle))) if isinstance(needle, tuple) else (str(needle),)
        self.errors.append((types, texts))


# The base case: small and valid. ---------------------------------------------------


@st.composite
def base_cases(draw):
    kind = draw(st.sampled_from(["embedding", "bag"]))
    num_embeddings = draw(st.one_of(st.none(), st.integers(1, 50), st.just(2**31 + 5)))
    high = 2**63 if num_embeddings is None else num_embeddings
    n = draw(st.integers(0, 8))
    ids = draw(st.lists(st.one_of(st.integers(0, min(high, 50) - 1), st.just(high - 1)), min_size=n, max_size=n))
    starts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    return dict(
        kind=kind,
        api=draw(st.sampled_from(["module", "functional"])),
        backend=draw(st.sampled_from(["torch", "triton"])),
        num_embeddings=num_embeddings,
        num_rows=draw(st.integers(1, 9)),
        dim=draw(st.integers(1, 5)),
        k=draw(st.integers(1, 4)),
        padding_idx=draw(st.one_of(st.none(), st.sampled_from(ids or [0]))),
        signed=draw(st.booleans()),
        importance_rows=draw(st.one_of(st.none(), st.integers(1, 3))),
        mode=draw(st.sampled_from(["sum", "mean", "max"])) if kind == "bag" else "sum",
        include_last_offset=draw(st.booleans()),
        ids=ids,
        starts=starts,
        psw=kind == "bag" and draw(st.booleans()),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        seed=draw(st.integers(0, 2**16)),
        hash_cache=draw(st.booleans()),
    )


def dyadic(g, shape, dtype):
    return (torch.randint(-8, 9, shape, generator=g).double() / 4).to(dtype)


def build(base) -> Call:
    g = torch.Generator().manual_seed(base["seed"])
    dtype = getattr(torch, base["dtype"])
    ids = torch.tensor(base["ids"], dtype=torch.int64)
    n = ids.numel()
    offsets = None
    if base["kind"] == "bag":
        offsets = torch.tensor([0] + base["starts"] + ([n] if base["include_last_offset"] else []), dtype=torch.int64)
        num_bags = offsets.numel() - (1 if base["include_last_offset"] else 0)
        grad_shape = (num_bags, base["dim"])
    else:
        grad_shape = (n, base["dim"])
    psw = dyadic(g, (n,), dtype) if base["psw"] and base["mode"] == "sum" else None
    importance = (
        None if base["importance_rows"] is None else dyadic(g, (base["importance_rows"], base["k"]), torch.float32)
    )
    fields = {
        f: base[f]
        for f in (
            "kind",
            "api",
            "backend",
            "num_embeddings",
            "num_rows",
            "dim",
            "k",
            "padding_idx",
            "signed",
            "mode",
            "include_last_offset",
        )
    }
    fields["backend"] = base["backend"] if base["backend"] in BACKENDS else "torch"
    call = Call(
        **fields,
        ids=ids,
        offsets=offsets,
        psw=psw,
        weight=dyadic(g, (base["num_rows"], base["dim"]), dtype),
        importance=importance,
        grad_out=dyadic(g, grad_shape, dtype),
    )
    small = base["num_embeddings"] is not None and base["num_embeddings"] <= 50
    if base.get("hash_cache") and base["kind"] == "embedding" and base["api"] == "functional" and small:
        # Built by the oracle, not the package: a wrong cache would be caught here.
        rows = oracle.rows(np.arange(base["num_embeddings"]), base["k"], base["num_rows"])
        call.hash_cache = torch.from_numpy(rows).to(torch.int32)
    return call


# Perturbations: each takes the call and its drawn parameters. ----------------------


def _ids_list(call: Call) -> bool:
    """Whether the ids are still a non-empty tensor of valid dtype (another
    perturbation may have replaced them already)."""
    return isinstance(call.ids, torch.Tensor) and call.ids.numel() > 0 and call.ids.dtype in (torch.int32, torch.int64)


def ids_dtype(call, p):
    dtype = getattr(torch, p["dtype"])
    if isinstance(call.ids, torch.Tensor):
        call.ids = call.ids.to(dtype) if dtype != torch.float32 else call.ids.float().requires_grad_(p["grad"])
        call.expect(TypeError, dtype)


def ids_not_tensor(call, p):
    garbage = {"list": [1, 2], "int": 3, "none": None, "ndarray": np.array([1, 2]), "str": "12"}[p["what"]]
    call.ids = garbage
    call.expect(TypeError, type(garbage).__name__)


def ids_out_of_range(call, p):
    if not _ids_list(call):
        return
    high = call.num_embeddings
    value = {
        "at_num_embeddings": high,
        "past": None if high is None else high + p["delta"],
        "max": 2**63 - 1,
        "minus_one": -1,
        "min": -(2**63),
        "negative": -p["delta"],
    }[p["which"]]
    if value is None or (high is None and value >= 0):
        return  # every non-negative id is valid without num_embeddings
    ids = call.ids.to(torch.int64).clone()
    ids.view(-1)[p["pos"] % ids.numel()] = value
    call.ids = ids
    call.expect(IndexError, value)


def _table_moved(call) -> bool:
    return call.move_module_to is not None or call.weight.device.type == "meta"


def ids_wrong_device(call, p):
    # Ids and table both on "meta" would be a valid (shape-only) call.
    if isinstance(call.ids, torch.Tensor) and not _table_moved(call):
        call.ids = call.ids.to("meta")
        call.expect(RuntimeError, "meta")


def module_wrong_device(call, p):
    # A module (or functional table) on another device than the input.
    if isinstance(call.ids, torch.Tensor) and call.ids.device.type == "meta":
        return
    if call.api == "module":
        call.move_module_to = "meta"
    else:
        call.weight = call.weight.to("meta")
    # The importance weights' check names the device in a TypeError.
    call.expect((RuntimeError, TypeError) if call.importance is not None else RuntimeError, "meta")


def offsets_decreasing(call, p):
    n = call.ids.numel() if isinstance(call.ids, torch.Tensor) else 0
    if call.kind != "bag" or n < 1:
        return
    high = 1 + p["a"] % n
    low = p["b"] % high
    tail = [n] if call.include_last_offset else []
    call.offsets = torch.tensor([0, high, low] + tail)
    call.grad_out = torch.zeros(3, call.dim, dtype=call.grad_out.dtype)  # three bags either way
    call.expect(ValueError, f"offsets[1]={high} > offsets[2]={low}")


def offsets_past_end(call, p):
    if call.kind != "bag" or not isinstance(call.ids, torch.Tensor):
        return
    n = call.ids.numel()
    end = min(n + p["delta"], 2**63 - 1)
    call.offsets = torch.tensor([0, end])
    call.expect(ValueError, end)


def offsets_first_nonzero(call, p):
    if call.kind != "bag" or call.offsets is None:
        return
    offsets = call.offsets.clone()
    offsets[0] = p["value"]
    call.offsets = offsets
    call.expect(ValueError, p["value"])


def short_last_offset(call, p):
    # include_last_offset=True with ids past the last offset.
    n = call.ids.numel() if isinstance(call.ids, torch.Tensor) else 0
    if call.kind != "bag" or not call.include_last_offset or n < 1:
        return
    last = p["a"] % n
    call.offsets = torch.tensor([0, last])
    call.grad_out = torch.zeros(1, call.dim, dtype=call.grad_out.dtype)
    call.expect(ValueError, last)


def offsets_garbage(call, p):
    if call.kind != "bag":
        return
    if p["what"] == "float":
        call.offsets = torch.tensor([0.0, 1.0], requires_grad=True)
        call.expect(TypeError, "float32")
    elif p["what"] == "meta":
        call.offsets = torch.tensor([0, 1], device="meta")
        call.expect(RuntimeError, "meta")
    elif p["what"] == "2d":
        call.offsets = torch.zeros(2, 2, dtype=torch.int64)
        call.expect(ValueError, (2, 2))
    else:  # none with 1-D input
        call.offsets = None
        call.expect(ValueError, "None")


def psw_garbage(call, p):
    if call.kind != "bag" or not isinstance(call.ids, torch.Tensor):
        return
    n = call.ids.numel()
    what = p["what"]
    if call.mode != "sum":  # whatever the weights, that mode takes none
        call.expect(NotImplementedError, repr(call.mode))
    if what == "other_mode" and call.mode != "sum":
        call.psw = torch.ones(n, requires_grad=True)
        call.expect(NotImplementedError, repr(call.mode))
    elif what == "shape":
        call.psw = torch.ones(n + 1)
        call.expect(ValueError, (n + 1,))
    elif what == "int":
        call.psw = torch.ones(n, dtype=torch.int64)
        call.expect(TypeError, "int64")
    elif what == "meta":
        call.psw = torch.ones(n, device="meta")
        call.expect(RuntimeError, "meta")


SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def psw_special(call, p):
    # Valid: nn.EmbeddingBag propagates NaN and infinities of the weights.
    if isinstance(call.psw, torch.Tensor) and call.psw.numel() and call.psw.device.type == "cpu":
        psw = call.psw.clone()
        psw[p["pos"] % psw.numel()] = SPECIALS[p["value"]]
        call.psw = psw


def grad_special(call, p):
    if call.grad_out.numel():
        grad = call.grad_out.clone()
        grad.view(-1)[p["pos"] % grad.numel()] = SPECIALS[p["value"]]
        call.grad_out = grad


def hash_cache_garbage(call, p):
    # A user's cache is read without bounds checks by the kernels.
    if call.hash_cache is None:
        return
    cache = call.hash_cache.clone()
    what = p["what"]
    if what in ("row_past_table", "negative_row") and _ids_list(call):
        value = call.num_rows + p["delta"] if what == "row_past_table" else -p["delta"]
        first = int(call.ids.reshape(-1)[0])
        if 0 <= first < cache.shape[0]:
            cache[first, p["delta"] % cache.shape[1]] = value
            call.expect(IndexError, value)
    elif what == "short" and _ids_list(call):
        high = int(call.ids.max())
        if 0 <= high < cache.shape[0]:
            cache = cache[:high]
            call.expect(IndexError, high)
    elif what == "float":
        cache = cache.float()
        call.expect(TypeError, "float32")
    elif what == "meta":
        cache = cache.to("meta")
        call.expect(RuntimeError, "meta")
    elif what == "wrong_k":
        cache = torch.cat([cache, cache[:, :1]], dim=1)
        call.expect(ValueError, tuple(cache.shape))
    call.hash_cache = cache


def bad_arguments(call, p):
    what = p["what"]
    if what == "k":
        call.k = p["k"]
        call.expect((ValueError, TypeError), p["k"])
    elif what == "weight_rank" and call.api == "functional":
        call.weight = call.weight.reshape(-1)
        call.expect(ValueError, tuple(call.weight.shape))
    elif what == "weight_dtype" and call.api == "functional":
        call.weight = call.weight.to(torch.int64)
        call.expect(TypeError, "int64")
    elif what == "no_rows":
        call.num_rows = 0
        call.weight = call.weight[:0]
        call.expect(ValueError, 0)
    elif what == "padding" and call.num_embeddings is not None:
        call.padding_idx = call.num_embeddings + p["delta"]
        call.expect(ValueError, call.padding_idx)
    elif what == "backend":
        call.backend = "cuda"
        call.expect(ValueError, "'cuda'")
    elif what == "mode" and call.kind == "bag":
        call.mode = "median"
        call.expect(ValueError, "'median'")
    elif what == "importance_device" and call.api == "functional" and call.importance is not None:
        call.importance = call.importance.to("meta")
        call.expect((TypeError, RuntimeError), "meta")


PERTURBATIONS = {
    "ids_dtype": (
        ids_dtype,
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["float32", "float64", "bool", "int8", "int16", "uint8", "complex64"]),
                "grad": st.booleans(),
            }
        ),
    ),
    "ids_not_tensor": (
        ids_not_tensor,
        st.fixed_dictionaries({"what": st.sampled_from(["list", "int", "none", "ndarray", "str"])}),
    ),
    "ids_out_of_range": (
        ids_out_of_range,
        st.fixed_dictionaries(
            {
                "which": st.sampled_from(["at_num_embeddings", "past", "max", "minus_one", "min", "negative"]),
                "delta": st.integers(1, 2**40),
                "pos": st.integers(0, 7),
            }
        ),
    ),
    "ids_wrong_device": (ids_wrong_device, st.just({})),
    "module_wrong_device": (module_wrong_device, st.just({})),
    "offsets_decreasing": (offsets_decreasing, st.fixed_dictionaries({"a": st.integers(0, 7), "b": st.integers(0, 7)})),
    "offsets_past_end": (
        offsets_past_end,
        st.fixed_dictionaries({"delta": st.one_of(st.integers(1, 3), st.just(2**63))}),
    ),
    "offsets_first_nonzero": (
        offsets_first_nonzero,
        st.fixed_dictionaries({"value": st.one_of(st.integers(1, 9), st.integers(-(2**63), -1))}),
    ),
    "short_last_offset": (short_last_offset, st.fixed_dictionaries({"a": st.integers(0, 7)})),
    "offsets_garbage": (
        offsets_garbage,
        st.fixed_dictionaries({"what": st.sampled_from(["float", "meta", "2d", "none"])}),
    ),
    "psw_garbage": (
        psw_garbage,
        st.fixed_dictionaries({"what": st.sampled_from(["other_mode", "shape", "int", "meta"])}),
    ),
    "psw_special": (
        psw_special,
        st.fixed_dictionaries({"value": st.sampled_from(sorted(SPECIALS)), "pos": st.integers(0, 7)}),
    ),
    "grad_special": (
        grad_special,
        st.fixed_dictionaries({"value": st.sampled_from(sorted(SPECIALS)), "pos": st.integers(0, 40)}),
    ),
    "hash_cache_garbage": (
        hash_cache_garbage,
        st.fixed_dictionaries(
            {
                "what": st.sampled_from(["row_past_table", "negative_row", "short", "float", "meta", "wrong_k"]),
                "delta": st.integers(1, 2**31),
            }
        ),
    ),
    "bad_arguments": (
        bad_arguments,
        st.fixed_dictionaries(
            {
                "what": st.sampled_from(
                    ["k", "weight_rank", "weight_dtype", "no_rows", "padding", "backend", "mode", "importance_device"]
                ),
                "k": st.sampled_from([0, 25, -1, 2.0, True]),
                "delta": st.integers(0, 5),
            }
        ),
    ),
}


@st.composite
def perturbation(draw):
    name = draw(st.sampled_from(sorted(PERTURBATIONS)))
    return name, draw(PERTURBATIONS[name][1])


@st.composite
def hostile_cases(draw):
    return dict(base=draw(base_cases()), perturbations=draw(st.lists(perturbation(), min_size=0, max_size=3)))


# Running a call. --------------------------------------------------------------------


def run(call: Call):
    """``(out, table gradient, importance gradient, per-sample weights' gradient)``."""
    psw = call.psw
    if isinstance(psw, torch.Tensor) and psw.is_floating_point() and psw.device.type == "cpu":
        psw = psw.clone().requires_grad_(True)
    if call.api == "module":
        cls = BloomEmbedding if call.kind == "embedding" else BloomEmbeddingBag
        options = dict(
            num_rows=call.num_rows,
            backend=call.backend,
            signed=call.signed,
            importance=call.importance is not None,
            dtype=call.weight.dtype,
        )
        if call.kind == "bag":
            options.update(mode=call.mode, include_last_offset=call.include_last_offset)
        module = cls(
            call.num_embeddings,
            call.dim,
            0.2,
            call.k,
            padding_idx=call.padding_idx,
            importance_rows=None if call.importance is None else call.importance.shape[0],
            **options,
        )
        with torch.no_grad():
            module.weight.copy_(call.weight)
            if call.importance is not None:
                module.importance_weight.copy_(call.importance)
        if call.move_module_to is not None:
            module.to(call.move_module_to)
        out = module(call.ids) if call.kind == "embedding" else module(call.ids, call.offsets, psw)
        weight, importance = module.weight, module.importance_weight
    else:
        weight = call.weight.clone().requires_grad_(call.weight.is_floating_point())
        importance = None
        if call.importance is not None:
            importance = call.importance.clone().requires_grad_(True)
        common = dict(
            num_embeddings=call.num_embeddings, backend=call.backend, signed=call.signed, importance=importance
        )
        if call.kind == "embedding":
            out = bloom_embedding(call.ids, weight, call.k, call.padding_idx, hash_cache=call.hash_cache, **common)
        else:
            out = bloom_embedding_bag(
                call.ids,
                weight,
                call.offsets,
                call.k,
                call.mode,
                psw,
                call.padding_idx,
                call.include_last_offset,
                **common,
            )
    out.backward(call.grad_out)
    return out, weight.grad, None if importance is None else importance.grad, psw.grad if psw is not None else None


def check_against_oracle(call: Call, result) -> None:
    out, grad_weight, grad_importance, grad_psw = result
    tol = TOLERANCE[call.weight.dtype]
    spec = oracle.Spec(
        call.k, call.padding_idx, call.signed, None if call.importance is None else call.importance.double().numpy()
    )
    weight, grad_out = call.weight.double().numpy(), call.grad_out.double().numpy()
    if call.kind == "embedding":
        expected = oracle.embedding(call.ids.numpy(), weight, spec, grad_out)
    else:
        n = call.ids.numel()
        if call.ids.dim() == 2:
            bounds = [b * call.ids.shape[1] for b in range(call.ids.shape[0] + 1)]
        else:
            bounds = call.offsets.tolist() + ([] if call.include_last_offset else [n])
        psw = None if call.psw is None else call.psw.double().numpy()
        expected = oracle.bag(call.ids.reshape(-1).numpy(), bounds, weight, spec, call.mode, grad_out, psw)
    oracle.assert_close(out, expected.out, expected.out_mag, tol, "output")
    oracle.assert_close(grad_weight, expected.grad_weight, expected.grad_weight_mag, tol, "table gradient")
    if call.importance is not None:
        oracle.assert_close(
            grad_importance,
            expected.grad_importance,
            expected.grad_importance_mag,
            max(tol, 1e-5),
            "importance gradient",
        )
    if call.psw is not None:
        oracle.assert_close(grad_psw, expected.grad_psw, expected.grad_psw_mag, tol, "per-sample weights' gradient")


@settings(max_examples=examples(300))
@given(case=hostile_cases())
# Regression cases Hypothesis found (see the report of issue 15):
# a NaN per-sample weight of a padding id made its bag NaN on the PyTorch path.
@example(
    case=dict(
        base=dict(
            kind="bag",
            api="module",
            backend="torch",
            num_embeddings=50,
            num_rows=3,
            dim=2,
            k=1,
            padding_idx=4,
            signed=False,
            importance_rows=None,
            mode="sum",
            include_last_offset=False,
            ids=[4, 7],
            starts=[],
            psw=True,
            dtype="float32",
            seed=0,
            hash_cache=False,
        ),
        perturbations=[("psw_special", {"value": "nan", "pos": 0})],
    )
)
# a table of no rows: a division by zero in the hash's modulo, a segfault in the kernels.
@example(
    case=dict(
        base=dict(
            kind="embedding",
            api="functional",
            backend="triton",
            num_embeddings=None,
            num_rows=1,
            dim=2,
            k=1,
            padding_idx=None,
            signed=False,
            importance_rows=None,
            mode="sum",
            include_last_offset=False,
            ids=[3],
            starts=[],
            psw=False,
            dtype="float32",
            seed=0,
            hash_cache=False,
        ),
        perturbations=[("bad_arguments", {"what": "no_rows", "k": 0, "delta": 0})],
    )
)
# include_last_offset=True with ids past the last offset: the PyTorch backward crashed.
@example(
    case=dict(
        base=dict(
            kind="bag",
            api="module",
            backend="torch",
            num_embeddings=50,
            num_rows=3,
            dim=2,
            k=1,
            padding_idx=None,
            signed=False,
            importance_rows=None,
            mode="sum",
            include_last_offset=True,
            ids=[1, 2],
            starts=[],
            psw=False,
            dtype="float32",
            seed=0,
            hash_cache=False,
        ),
        perturbations=[("short_last_offset", {"a": 1})],
    )
)
# a user's hash cache with a row past the table: the kernels read outside it, silently.
@example(
    case=dict(
        base=dict(
            kind="embedding",
            api="functional",
            backend="triton",
            num_embeddings=50,
            num_rows=5,
            dim=2,
            k=2,
            padding_idx=None,
            signed=False,
            importance_rows=None,
            mode="sum",
            include_last_offset=False,
            ids=[7, 8],
            starts=[],
            psw=False,
            dtype="float32",
            seed=0,
            hash_cache=True,
        ),
        perturbations=[("hash_cache_garbage", {"what": "row_past_table", "delta": 1000})],
    )
)
# a hash cache on another device: the call returned a "meta" tensor instead of raising.
@example(
    case=dict(
        base=dict(
            kind="embedding",
            api="functional",
            backend="torch",
            num_embeddings=50,
            num_rows=5,
            dim=2,
            k=2,
            padding_idx=None,
            signed=False,
            importance_rows=None,
            mode="sum",
            include_last_offset=False,
            ids=[7, 8],
            starts=[],
            psw=False,
            dtype="float32",
            seed=0,
            hash_cache=True,
        ),
        perturbations=[("hash_cache_garbage", {"what": "meta", "delta": 1})],
    )
)
def test_hostile_input(case):
    require_kernels()
    count("fuzz")
    call = build(case["base"])
    for name, params in case["perturbations"]:
        PERTURBATIONS[name][0](call, params)
    try:
        with deadline(SECONDS_PER_CASE):
            result = run(call)
    except DOCUMENTED as exc:
        if not call.errors:
            raise AssertionError(f"a valid call raised {type(exc).__name__}: {exc}") from exc
        message = str(exc)
        assert any(isinstance(exc, types) and any(t in message for t in texts) for types, texts in call.errors), (
            f"{type(exc).__name__}({message!r}) is none of the expected {call.errors}"
        )
        return
    assert not call.errors, f"expected one of {call.errors}, but the call returned"
    count("fuzz, valid: held to the oracle")
    check_against_oracle(call, result)
