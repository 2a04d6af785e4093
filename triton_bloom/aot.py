"""Compile every kernel specialization ahead of time for real GPU targets,
with no GPU: the check that CI runs on every kernel change.

Two steps, in two processes, since a kernel is defined either for Triton's
interpreter or for the compiler, never both:

1. ``record`` (interpreter on): drive the public API over a grid of options
   (table dtypes, ``k``, padding, hash cache, wide ids, ``signed``,
   importance weights, bag modes, per-sample weights, sparse gradients,
   fused optimizers, the deterministic path) with ``backend="triton"``, and
   record every launch the launchers make (``kernels/launch.py``): the
   kernel, its arguments, and the configurations it may run with on a GPU
   (the autotuner's candidates, or its one fixed configuration).  The list
   of specializations thus comes from the launchers, never from a list kept
   by hand: a new constexpr or a new kernel is recorded the day it is used.
2. ``compile`` (interpreter off, any Triton version on ``sys.path``): rebuild
   each launch's arguments, let Triton's own binder derive the
   specialization a real launch would get (argument types, constexprs, and
   the ``tt.divisibility`` hints for pointers and integers divisible by 16),
   deduplicate, and compile each (specialization, configuration) for each
   target with ``triton.compile``, down to the cubin, with the ``ptxas``
   inside the Triton wheel.  The cubin's resource usage (``cuobjdump
   -res-usage``, also in the wheel) gives registers and the stack frame: a
   stack frame is where ``ptxas`` spills.  Shared memory comes from the
   compiled kernel's metadata, checked against the target's limit.

Run as ``python -m triton_bloom.aot record FILE`` then ``python -m
triton_bloom.aot compile FILE --targets 80 90``; ``tests/test_gpu_targets.py``
does both, and ``bench/perf/kernel_report.py`` tabulates the result.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Shared memory a block may use (bytes), by compute capability: A100's and
# H100's opt-in maxima.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

DTYPES = ("float32", "bfloat16", "float16", "float64")
KS = (1, 4, 24)


# ---------------------------------------------------------------------------
# Step 1: record what the launchers launch.


def option_grid():
    """The option combinations the recording drives, as dicts.

    Every table dtype meets every ``k`` (1, 4 and the maximum, 24) with all
    variants off and with all on; each variant alone meets each dtype at
    ``k = 4``.  Each bag mode (and sum with per-sample weights) meets each
    dtype with all variants on, and float32 with them off and at ``k`` 1 and
    24.  Sparse gradients, fused optimizers and the deterministic path run
    over the dtypes with the variants off and on (the fused step of a
    half-precision table with and without stochastic rounding, and row-wise
    Adagrad past one tile of columns).  Rows are 16-element
    aligned (what real tables have, and what lets the gathers vectorize),
    once not aligned at all (dim 33), and at each narrower alignment that
    the lookups read as a vector (``ROW_ALIGN``, ``kernels/lookup.py``).
    """
    full = {"padding": True, "wide_ids": True, "signed": True, "importance": True, "hot": True}
    variants = {"plain": {}, "all": full}
    singles = {name: {name: True} for name in ("padding", "hash_cache", "wide_ids", "signed", "importance", "hot")}
    bags = [dict(mode="sum"), dict(mode="mean"), dict(mode="max"), dict(mode="sum", psw=True)]
    cases = []
    for dtype in DTYPES:
        for k in KS:
            for name, v in variants.items():
                cases.append(dict(op="embedding", dtype=dtype, k=k, variant=name, **v))
        for name, v in singles.items():
            cases.append(dict(op="embedding", dtype=dtype, k=4, variant=name, **v))
        for bag in bags:
            cases.append(dict(op="bag", **bag, dtype=dtype, k=4, variant="all", **full))
        for name, v in variants.items():
            for training in ("sparse", "fused_sgd", "fused_adagrad", "deterministic"):
                cases.append(dict(op="embedding", training=training, dtype=dtype, k=4, variant=name, **v))
                cases.append(dict(op="bag", mode="sum", training=training, dtype=dtype, k=4, variant=name, **v))
    # The fused step rounds half-precision tables stochastically by default:
    # round-to-nearest too; and row-wise Adagrad past one tile of columns
    # (kernels/optimizer.py: the row summed twice).
    for dtype in ("bfloat16", "float16"):
        for training in ("fused_sgd_nearest", "fused_adagrad_nearest"):
            cases.append(dict(op="embedding", training=training, dtype=dtype, k=4, variant="plain"))
    for dtype in ("float32", "bfloat16", "float64"):
        cases.append(dict(op="embedding", training="fused_adagrad", dtype=dtype, k=4, variant="plain", dim=200))
    for bag in bags:
        cases.append(dict(op="bag", **bag, dtype="float32", k=4, variant="plain"))
        cases.append(dict(op="bag", **bag, dtype="float64", k=max(KS), variant="all", **full))
        for k in (1, max(KS)):
            for name, v in variants.items():
                cases.append(dict(op="bag", **bag, dtype="float32", k=k, variant=name, **v))
    for op, mode in (("embedding", None), ("bag", "sum"), ("bag", "max")):
        cases.append(dict(op=op, mode=mode, dtype="float32", k=4, variant="odd_dim", dim=33))
    # Rows aligned to less than 16 elements, which Triton cannot see and the
    # launchers pass as ROW_ALIGN (kernels/lookup.py): each vector width the
    # lookups then read (float32 4 and 2 elements, float64 2, bfloat16 4 and
    # 8), with the variants on at the largest k.
    for dtype, dim in (("float32", 100), ("float32", 50), ("float64", 100), ("bfloat16", 100), ("bfloat16", 40)):
        cases.append(dict(op="embedding", dtype=dtype, k=max(KS), variant="row_align", dim=dim, **full))
    cases += output_cases()
    cases += quantized_cases()
    return cases


def quantized_cases():
    """The quantized tables' lookups (``kernels/quantized.py``, forward
    only: they are for inference), through ``triton_bloom.quantize``: int8
    and int4 at each ``k`` with the variants off and all on (hot rows
    included); each bag mode (and sum with per-sample weights) with them all
    on; and widths 33 (an odd row, padded bytes) and 256 (a row wider than
    one block of codes).  The codes are the same whatever the float table's
    dtype, so ``dtype`` names the float32 table they were quantized from."""
    full = {"padding": True, "wide_ids": True, "signed": True, "importance": True, "hot": True}
    variants = {"plain": {}, "all": full}
    cases = []
    for bits in (8, 4):
        for k in KS:
            for name, v in variants.items():
                cases.append(dict(op="quantized", bits=bits, dtype="float32", k=k, variant=name, dim=64, **v))
        for bag in (dict(mode="sum"), dict(mode="mean"), dict(mode="max"), dict(mode="sum", psw=True)):
            cases.append(
                dict(op="quantized_bag", bits=bits, **bag, dtype="float32", k=4, variant="all", dim=64, **full)
            )
        for k in (1, max(KS)):
            cases.append(dict(op="quantized_bag", bits=bits, mode="sum", dtype="float32", k=k, variant="plain", dim=64))
        for op, mode in (("quantized", None), ("quantized_bag", "sum")):
            for variant, dim in (("odd_dim", 33), ("wide_dim", 256)):
                cases.append(dict(op=op, mode=mode, bits=bits, dtype="float32", k=4, variant=variant, dim=dim))
    return cases + quantized_output_cases()


def quantized_output_cases():
    """The quantized tables' scores (``kernels/scores.py``'s quantized
    kernel), through ``QuantizedBloomEmbedding.topk`` and ``.rank``: int8 and
    int4 at each ``k`` with the variants off, all on (wide ids through
    candidates) at 40 queries, 64 queries at dim 64 (eight warps), ranks
    (exact scores: float64 sums, small tiles) plain and with the variants,
    float64 queries, and widths 33 and 256 (several steps along the row)."""
    full = {"padding": True, "wide_ids": True, "signed": True, "importance": True, "hot": True}
    narrow = {key: value for key, value in full.items() if key != "wide_ids"}
    cases = []
    for bits in (8, 4):
        base = dict(op="quantized_scores", bits=bits, dtype="float32", dim=64)
        for k in KS:
            cases.append(dict(base, k=k, variant="plain", queries=3))
        cases.append(dict(base, k=4, variant="all", queries=40, **full))
        cases.append(dict(base, k=4, variant="plain", queries=64))
        cases.append(dict(base, k=4, variant="plain", queries=3, query_dtype="float64"))
        for variant, dim in (("odd_dim", 33), ("wide_dim", 256)):
            cases.append(dict(base, k=4, variant=variant, queries=3, dim=dim))
        cases.append(dict(base, op="quantized_rank", k=4, variant="plain", queries=3))
        cases.append(dict(base, op="quantized_rank", k=4, variant="all", queries=3, **narrow))
    return cases


def run_quantized_case(case):
    """A forward of ``case`` (a :func:`quantized_cases` entry) through a
    quantized module, under ``no_grad`` as inference runs, or a top-k or rank
    over its catalogue (a :func:`quantized_output_cases` entry)."""
    import torch

    from .modules import BloomEmbedding, BloomEmbeddingBag
    from .quantized import quantize

    k, dim, num_rows = case["k"], case["dim"], 1000
    output = case["op"] in ("quantized_scores", "quantized_rank")
    n = 200 if output else 5000  # the output ops score every id: a small catalogue
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, n, (16,), generator=g, dtype=torch.int64)
    if not case.get("wide_ids"):
        ids = ids.to(torch.int32)
    hot_ids = None
    if case.get("hot"):
        hot_ids = torch.unique(ids[1:6])
        hot_ids = hot_ids[hot_ids != ids[0]]
    options = dict(
        num_rows=num_rows,
        num_hash_functions=k,
        padding_idx=int(ids[0]) if case.get("padding") else None,
        signed=bool(case.get("signed")),
        importance=bool(case.get("importance")),
        hot_ids=hot_ids,
        backend="triton",
    )
    num_embeddings = None if case.get("wide_ids") else n
    if case["op"] == "quantized_bag":
        module = BloomEmbeddingBag(num_embeddings, dim, mode=case["mode"], **options)
    else:
        module = BloomEmbedding(num_embeddings, dim, **options)
    with torch.no_grad():
        module.embeddings.weight.normal_(generator=g)
    quantized = quantize(module, bits=case["bits"])
    if output:
        queries = torch.randn(case["queries"], dim, generator=g).to(getattr(torch, case.get("query_dtype", "float32")))
        if case["op"] == "quantized_rank":
            quantized.rank(queries, torch.randint(0, n, (case["queries"],), generator=g))
        else:
            candidates = torch.randint(2**31, 2**40, (100,), generator=g) if case.get("wide_ids") else None
            quantized.topk(queries, 5, candidates=candidates)
        return
    with torch.no_grad():
        if case["op"] == "quantized":
            quantized(ids)
        else:
            psw = torch.rand(ids.shape, generator=g) if case.get("psw") else None
            quantized(ids, torch.tensor([0, 7], dtype=torch.int64), psw)


def output_cases():
    """The output side's scores kernels (``kernels/scores.py``), through
    ``BloomEmbedding.topk``, ``BloomEmbedding.rank`` and
    ``BloomOutputLayer.topk``: every table dtype at each ``k`` with the
    variants off and all on (wide ids through candidates), at 1 query (the
    smallest query block), 40 (the largest), and a row wider than one column
    block, and 64 queries at dim 64 (the traffic model's); ranks (exact
    scores, a float64 accumulator) in every dtype; and float32 queries over
    each half-precision or float64 table."""
    full = {"padding": True, "wide_ids": True, "signed": True, "importance": True}
    cases = []
    for dtype in DTYPES:
        for k in KS:
            cases.append(dict(op="scores", dtype=dtype, k=k, variant="plain", queries=3))
            cases.append(dict(op="scores", dtype=dtype, k=k, variant="all", queries=3, **full))
            cases.append(dict(op="decoder", dtype=dtype, k=k, variant="plain", queries=3))
        cases.append(dict(op="scores", dtype=dtype, k=4, variant="all", queries=40, **full))
        # 64 queries at dim 64: the traffic model's top-k.
        cases.append(dict(op="scores", dtype=dtype, k=4, variant="plain", queries=64, dim=64))
        # Ranks score exactly (a float64 accumulator whatever the table's
        # dtype: another specialization), and queries often stay float32
        # over a half-precision table.
        narrow = {key: value for key, value in full.items() if key != "wide_ids"}
        # (Exact scores take 16 queries a block whatever their number.)
        cases.append(dict(op="rank", dtype=dtype, k=4, variant="plain", queries=3))
        cases.append(dict(op="rank", dtype=dtype, k=4, variant="all", queries=3, **narrow))
        if dtype != "float32":
            cases.append(dict(op="rank", dtype=dtype, k=4, variant="plain", queries=3, query_dtype="float32"))
            for queries in (3, 40):
                cases.append(
                    dict(op="scores", dtype=dtype, k=4, variant="plain", queries=queries, query_dtype="float32")
                )
    for queries, dim in ((1, 33), (40, 64), (40, 200)):
        cases.append(dict(op="scores", dtype="float32", k=4, variant="odd_dim", queries=queries, dim=dim))
    cases.append(dict(op="decoder", dtype="float32", k=4, variant="plain", queries=40, wide_ids=True))
    return cases


def run_output_case(case):
    """A top-k of ``case`` (an :func:`output_cases` entry) through the public API."""
    import torch

    from .modules import BloomEmbedding
    from .output import BloomOutputLayer

    dtype = getattr(torch, case["dtype"])
    k, dim, nq = case["k"], case.get("dim", 32), case["queries"]
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(nq, dim, generator=g).to(getattr(torch, case.get("query_dtype", case["dtype"])))
    # Wide ids (past 2**31) need 8-byte hashing: reached through candidates.
    wide = case.get("wide_ids")
    candidates = torch.randint(2**31, 2**40, (100,), generator=g) if wide else None
    if case["op"] == "decoder":
        layer = BloomOutputLayer(
            dim, 2**41 if wide else 200, num_rows=1000, num_hash_functions=k, backend="triton", dtype=dtype
        )
        layer.topk(queries, 5, candidates=candidates)
        return
    emb = BloomEmbedding(
        None if wide else 200,
        dim,
        num_rows=1000,
        num_hash_functions=k,
        padding_idx=7 if case.get("padding") else None,
        backend="triton",
        signed=bool(case.get("signed")),
        importance=bool(case.get("importance")),
        dtype=dtype,
    )
    if case["op"] == "rank":
        emb.rank(queries, torch.randint(0, 200, (nq,), generator=g))
        return
    emb.topk(queries, 5, candidates=candidates)


def run_case(case):
    """One forward and backward of ``case`` through the public API."""
    import torch

    from . import optim
    from .functional import bloom_embedding, bloom_embedding_bag
    from .hashing import bloom_hash

    if case["op"] in ("scores", "decoder", "rank"):
        return run_output_case(case)
    if case["op"].startswith("quantized"):
        return run_quantized_case(case)
    dtype = getattr(torch, case["dtype"])
    training = case.get("training")
    # Few ids and, where the kernels run a program per touched row, few rows:
    # the interpreter's cost grows with the programs it runs, while the
    # specialization depends only on types, constexprs and divisibility.
    k, dim, num_rows = case["k"], case.get("dim", 32), 24 if training else 1000
    num_embeddings = None if case.get("wide_ids") else 5000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5000, (16,), generator=g, dtype=torch.int64)
    if not case.get("wide_ids"):
        ids = ids.to(torch.int32)
    hot_ids = None
    if case.get("hot"):
        # A few of the ids own private rows after the shared ones (int32 hot
        # ids for narrow ids, as the modules store them).
        hot_ids = torch.unique(ids[1:6])
        hot_ids = hot_ids[hot_ids != ids[0]].to(ids.dtype)
    weight = torch.randn(num_rows + (hot_ids.numel() if hot_ids is not None else 0), dim, generator=g)
    weight = weight.to(dtype).requires_grad_(True)
    options = dict(
        hot_ids=hot_ids,
        num_embeddings=num_embeddings,
        backend="triton",
        signed=bool(case.get("signed")),
        importance=torch.rand(num_rows, k, generator=g, dtype=torch.float32).requires_grad_(True)
        if case.get("importance")
        else None,
        sparse=training == "sparse",
        fused_optimizer={
            "fused_sgd": optim.FusedSGD(lr=0.1),
            "fused_adagrad": optim.FusedRowWiseAdagrad(lr=0.1),
            "fused_sgd_nearest": optim.FusedSGD(lr=0.1, stochastic_rounding=False),
            "fused_adagrad_nearest": optim.FusedRowWiseAdagrad(lr=0.1, stochastic_rounding=False),
        }.get(training),
    )
    padding_idx = int(ids[0]) if case.get("padding") else None
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(training == "deterministic")
    try:
        if case["op"] == "embedding":
            hash_cache = None
            if case.get("hash_cache"):
                hash_cache = bloom_hash(torch.arange(num_embeddings), k, num_rows).to(torch.int32)
            out = bloom_embedding(ids, weight, k, padding_idx, hash_cache=hash_cache, **options)
        else:
            offsets = torch.tensor([0, 7], dtype=torch.int64)
            psw = torch.rand(ids.shape, generator=g, dtype=dtype).requires_grad_(True) if case.get("psw") else None
            out = bloom_embedding_bag(ids, weight, offsets, k, case["mode"], psw, padding_idx, **options)
        out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    finally:
        torch.use_deterministic_algorithms(deterministic)


def describe_value(value):
    """A JSON description of a kernel argument, enough to rebuild an argument
    that Triton specializes the same way."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if value is None:
        return {"none": True}
    name = getattr(value, "name", None)
    if name is not None and type(value).__name__ == "dtype":  # tl.float32 and the like
        return {"tl_dtype": name}
    raise TypeError(f"cannot describe kernel argument {value!r}")


def record(cases=None):
    """Every launch the launchers make over ``cases`` (default
    :func:`option_grid`), described as JSON-ready dicts: ``kernel``
    (``module:name``), ``args``, ``configs`` and the ``case`` that made it."""
    from .dispatch import interpreter_enabled, kernels

    if not interpreter_enabled():
        raise RuntimeError(
            "recording runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton_bloom.kernels is imported"
        )
    launch = importlib.import_module(kernels().__name__ + ".launch")
    launches = []
    for case in option_grid() if cases is None else cases:
        with launch.recording_launches() as recorded:
            run_case(case)
        for entry in recorded:
            fn = entry["kernel"].fn
            launches.append(
                {
                    "kernel": f"{fn.__module__}:{fn.__qualname__}",
                    "args": {name: describe_value(v) for name, v in entry["args"].items()},
                    "configs": entry["configs"],
                    "case": case,
                }
            )
    return launches


def record_in_interpreter(cases=None):
    """:func:`record`, from any process: in this one when its kernels were
    built for the interpreter, else in a fresh one with ``TRITON_INTERPRET=1``
    (on a GPU host, say)."""
    from .dispatch import interpreter_enabled

    if interpreter_enabled():
        return record(cases)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        with open(path, "w") as f:
            json.dump(cases, f)
        code = (
            "import json, sys; from triton_bloom import aot; "
            "json.dump(aot.record(json.load(open(sys.argv[1]))), open(sys.argv[1], 'w'))"
        )
        subprocess.run([sys.executable, "-c", code, path], env=env, check=True)
        with open(path) as f:
            return json.load(f)


# ---------------------------------------------------------------------------
# Step 2: compile for GPU targets.


def _rebuild_value(desc):
    import torch
    import triton.language as tl

    if "tensor" in desc:
        t = torch.empty(64, dtype=getattr(torch, desc["tensor"]))
        # Fresh CPU allocations are 64-byte aligned; a one-element offset is
        # not 16-byte aligned for any element size below 16.
        return t if desc["aligned"] else t[1:]
    if "tl_dtype" in desc:
        return tl.dtype(desc["tl_dtype"])
    if "none" in desc:
        return None
    (value,) = desc.values()
    return value


def _jit_function(name):
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def specialize(launch_desc, config, cc):
    """What Triton's launcher would compile for this launch and config on
    compute capability ``cc``: ``(key, signature, constexprs, attrs, options)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch_desc["kernel"])
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = {name: _rebuild_value(d) for name, d in launch_desc["args"].items()}
    kwargs = dict(config["kwargs"])
    for name in ("num_warps", "num_stages"):
        if config.get(name) is not None:
            kwargs[name] = config[name]
    bound, specialization, options = binder(**args, **kwargs)
    options_kwargs = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    options, signature, constexprs, attrs = fn._pack_args(backend, options_kwargs, bound, specialization, options)
    key = (launch_desc["kernel"], str(specialization), str(sorted(options.__dict__.items())), cc)
    return key, signature, constexprs, attrs, options


def _resource_usage(cubin):
    """``(registers, stack bytes, local memory instructions)`` of a cubin:
    ``cuobjdump -res-usage`` for the first two, and its SASS for the loads
    and stores of local memory (``LDL``/``STL``), which is where spilled
    registers go."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    if not regs or not stack:
        raise RuntimeError(f"unexpected cuobjdump output: {text!r}")
    return int(regs.group(1)), int(stack.group(1)), len(re.findall(r"\b(?:LDL|STL)\b", sass))


def ptx_stats(ptx):
    """Static counts of the memory instructions that matter in the report:
    global loads and how many move 16 bytes (four 32-bit words or two 64-bit
    ones), atomics, reductions and vector reductions."""
    return {
        "ld_global": len(re.findall(r"\bld\.global\b", ptx)),
        "ld_global_16b": len(re.findall(r"\bld\.global(?:\.\w+)*\.(?:v4\.[bfus]32|v2\.[bfus]64)\b", ptx)),
        "atom_global": len(re.findall(r"\batom\.global\b", ptx)),
        "red_global": len(re.findall(r"\bred\.global\b", ptx)),
        "red_global_vector": len(re.findall(r"\bred\.global(?:\.\w+)*\.v[248]\b", ptx)),
    }


def _compile_one(task):
    launch_desc, config, cc = task
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    started = time.perf_counter()
    result = {
        "kernel": launch_desc["kernel"].partition(":")[2],
        "cc": cc,
        "config": config,
        "case": launch_desc["case"],
    }
    try:
        _, signature, constexprs, attrs, options = specialize(launch_desc, config, cc)
        result["signature"] = {k: v for k, v in signature.items() if v != "constexpr"}
        result["constexprs"] = {str(k): repr(v) for k, v in constexprs.items()}
        compiled = triton.compile(
            ASTSource(_jit_function(launch_desc["kernel"]), signature, constexprs, attrs),
            target=GPUTarget("cuda", cc, 32),
            options=options.__dict__,
        )
        regs, stack, local = _resource_usage(compiled.asm["cubin"])
        result.update(
            ok=True,
            registers=regs,
            stack=stack,
            local_memory_instructions=local,
            shared=int(compiled.metadata.shared),
            num_warps=options.num_warps,
            num_stages=options.num_stages,
            **ptx_stats(compiled.asm["ptx"]),
        )
    except Exception as exc:  # reported, never swallowed: the caller fails on it
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def sweeps_search_space(case):
    """Whether the launches of ``case`` are compiled at every configuration
    of the autotuner's search space, not only at the first: the cases with
    the most registers per tile element, all variants on at ``k = 24`` in
    float32 (which half-precision tables share: they accumulate in float32)
    and in float64.  Register pressure grows with the variants, ``k`` and
    the accumulator's width, so these are where a configuration runs out of
    registers first; compiling every specialization at every configuration
    would take most of an hour on CI's two cores.  Every specialization is
    compiled at its first configuration.  One kind of spill does not follow
    register pressure: Triton 3.6's ``ptxas`` stored a few registers to local
    memory at 40 to 56 registers in some bag tilings, and only in some
    specializations, which is why the bag kernels have a single tiling."""
    return (
        case.get("variant") == "all"
        and case["k"] == max(KS)
        and case["dtype"] in ("float32", "float64")
        and not case.get("training")
    )


def compile_all(launches, targets=(80, 90), jobs=None, sweep=sweeps_search_space, sweep_targets=None):
    """Compile every distinct (specialization, configuration) of ``launches``
    for each compute capability in ``targets``.

    Args:
        launches (list): as :func:`record` returns them.
        targets (tuple of int): compute capabilities.
        jobs (int, optional): compiler processes (default: the CPU count).
        sweep (callable): given a launch's case, whether to compile it at
            every configuration it may run with (default
            :func:`sweeps_search_space`), else at the first only.
        sweep_targets (tuple of int, optional): the targets ``sweep``
            applies to (default: all of ``targets``).

    Returns:
        ``(results, stats)``: one dict per compile (``ok``, ``registers``,
        ``stack``, ``shared``, PTX counts, or ``error``), and totals.
    """
    import triton

    tasks, seen, specializations = [], set(), set()
    for launch_desc in launches:
        swept = sweep(launch_desc["case"])
        for i, config in enumerate(launch_desc["configs"]):
            for cc in targets:
                if i and not (swept and (sweep_targets is None or cc in sweep_targets)):
                    continue
                key = specialize(launch_desc, config, cc)[0]
                if i == 0 and cc == targets[0]:
                    specializations.add(key)
                if key not in seen:
                    seen.add(key)
                    tasks.append((launch_desc, config, cc))
    jobs = jobs or os.cpu_count() or 1
    started = time.perf_counter()
    if jobs > 1 and len(tasks) > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_one, tasks, chunksize=4))
    else:
        results = [_compile_one(t) for t in tasks]
    for r in results:
        limit = SHARED_MEMORY_LIMIT.get(r["cc"])
        r["shared_ok"] = bool(r.get("ok")) and (limit is None or r["shared"] <= limit)
    stats = {
        "triton": triton.__version__,
        "launches": len(launches),
        "compiled": len(results),
        "specializations": len(specializations),
        "failures": sum(not r["ok"] for r in results),
        "spills": sum(bool(r.get("ok")) and (r["stack"] > 0 or r["local_memory_instructions"] > 0) for r in results),
        "shared_over_limit": sum(bool(r.get("ok")) and not r["shared_ok"] for r in results),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return results, stats


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m triton_bloom.aot", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record the launchers' launches (runs the interpreter)")
    rec.add_argument("out", help="JSON file to write")
    comp = sub.add_parser("compile", help="compile the recorded launches for GPU targets")
    comp.add_argument("launches", help="JSON file written by record")
    comp.add_argument("--targets", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    comp.add_argument("--jobs", type=int, default=None, help="compiler processes (default: CPU count)")
    comp.add_argument("--first-config-only", action="store_true", help="skip the autotuner's other candidates")
    comp.add_argument(
        "--sweep-targets",
        type=int,
        nargs="*",
        default=None,
        help="targets on which the heaviest cases compile at every candidate (default: all)",
    )
    comp.add_argument("--out", help="JSON file for every compile's result")
    args = parser.parse_args(argv)

    if args.command == "record":
        if os.environ.get("TRITON_INTERPRET") != "1":
            # Triton reads the flag when a kernel is defined, and importing
            # torch has defined some already: start afresh with it set.
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.run([sys.executable, "-m", "triton_bloom.aot", *sys.argv[1:]], env=env).returncode
        launches = record()
        with open(args.out, "w") as f:
            json.dump(launches, f)
        print(f"recorded {len(launches)} launches")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("compile needs the interpreter off (unset TRITON_INTERPRET)")
    with open(args.launches) as f:
        launches = json.load(f)
    sweep = (lambda case: False) if args.first_config_only else sweeps_search_space
    sweep_targets = tuple(args.sweep_targets) if args.sweep_targets is not None else None
    results, stats = compile_all(launches, tuple(args.targets), args.jobs, sweep, sweep_targets)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"stats": stats, "results": results}, f)
    for r in results:
        if not r["ok"]:
            print(f"FAILED {r['kernel']} sm_{r['cc']} {r['config']} {r['case']}: {r['error']}")
        elif r["stack"] or r["local_memory_instructions"] or not r["shared_ok"]:
            print(
                f"SPILL/SHARED {r['kernel']} sm_{r['cc']} {r['config']}: {r['registers']} registers, "
                f"{r['stack']} bytes of stack, {r['shared']} bytes shared"
            )
    print(json.dumps(stats))
    return 1 if stats["failures"] or stats["spills"] or stats["shared_over_limit"] else 0


if __name__ == "__main__":
    sys.exit(main())
