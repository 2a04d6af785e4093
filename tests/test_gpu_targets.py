"""Every kernel specialization the launchers produce compiles for real GPU
targets (sm_80, sm_90), without register spills or shared memory past the
target's limit, under every Triton that CI provides.

The launches are recorded here, through the interpreter, by driving the
public API over ``triton_bloom.aot.option_grid()``; each Triton then
compiles them in a process of its own (``python -m triton_bloom.aot
compile``).  CI installs the H200 machine's Triton (3.6) into a folder of its
own and names it in ``TRITON_BLOOM_EXTRA_TRITON`` (a ``os.pathsep``-separated
list of folders that hold a ``triton`` package); the installed Triton always
runs.

The grid is checked in parts (:data:`CHUNKS`: one per table dtype, and the
quantized lookups), each a test that records and compiles its own cases, so
that ``pytest -n`` spreads the recording and the compiles over its workers.
Specializations that two parts share (the hash kernel's, which no table dtype
changes) compile in each: about 5% more compiles than the whole grid at once.
"""

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys

import pytest
from support import require_kernels

from triton_bloom import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def triton_installs():
    """``(label, folder or None)`` of every Triton to compile with."""
    installs = [("installed", None)]
    for folder in filter(None, os.environ.get("TRITON_BLOOM_EXTRA_TRITON", "").split(os.pathsep)):
        if not os.path.isdir(os.path.join(folder, "triton")):
            raise AssertionError(f"TRITON_BLOOM_EXTRA_TRITON names {folder}, which holds no triton package")
        installs.append((folder, folder))
    return installs


# The parts of the grid, each a test: ``chunk_of`` sends every case to one.
CHUNKS = ("float32", "bfloat16", "float16", "float64", "quantized")


def chunk_of(case):
    """The part of the grid (:data:`CHUNKS`) that records and compiles ``case``."""
    return "quantized" if case["op"].startswith("quantized") else case["dtype"]


# The kernels a part must launch, together every kernel of the package
# (test_the_chunks_cover_the_grid_and_every_kernel), so that none goes
# unchecked: float32 and float64 tables reach every kernel of the float
# tables (float64 with its own accumulator and narrower tiles: other
# specializations).
FLOAT_KERNELS = {
    "_bloom_forward_kernel",
    "_bloom_backward_kernel",
    "_bloom_bag_forward_kernel",
    "_bloom_bag_backward_kernel",
    "_bloom_bag_max_backward_kernel",
    "_bloom_hash_kernel",
    "_bloom_segment_sum_kernel",
    "_bloom_segment_step_kernel",
    "_bloom_scores_kernel",
}
MUST_LAUNCH = {
    "float32": FLOAT_KERNELS,
    "float64": FLOAT_KERNELS,
    "quantized": {"_quantized_forward_kernel", "_quantized_bag_kernel", "_quantized_scores_kernel"},
}


def package_kernels():
    """The names of every kernel the kernels package defines (its Triton
    functions named ``*_kernel``), found by reading its modules, not listed."""
    package = require_kernels()
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names |= {
            name
            for name, value in vars(module).items()
            if name.endswith("_kernel") and getattr(getattr(value, "fn", None), "__module__", None) == module.__name__
        }
    return names


def compile_recorded(launches_file, out_file, folder, cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [folder] if folder else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["TRITON_CACHE_DIR"] = cache_dir  # a fresh cache: every kernel really compiles
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "triton_bloom.aot",
            "compile",
            launches_file,
            "--targets",
            "80",
            "90",
            "--out",
            out_file,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


# Specializations known to spill, each a small frame (8 bytes: one register
# that ptxas saves around the call it builds for a data-dependent loop, not
# register pressure), listed so that any other spill fails and these stay
# visible: (triton version, kernel, cc, the case's options).  To be measured
# on a GPU and fixed; see the README's "Compiling for GPUs without a GPU".
ALL_AND_HOT = dict(variant="all", padding=True, wide_ids=True, signed=True, importance=True, hot=True)
KNOWN_SPILLS = [
    ("3.9.0", "_bloom_bag_forward_kernel", 80, dict(op="bag", mode="mean", dtype="float32", k=1, **ALL_AND_HOT)),
    (
        "3.6.0",
        "_bloom_bag_backward_kernel",
        80,
        dict(op="bag", mode="sum", psw=True, dtype="float32", k=1, **ALL_AND_HOT),
    ),
    (
        "3.6.0",
        "_bloom_scores_kernel",
        90,
        dict(op="scores", dtype="float32", k=4, variant="odd_dim", queries=1, dim=33),
    ),
    # The one-kernel fused step (sum and update in registers), found after it
    # landed: 40 registers and an 8-byte frame, as the entries above.
    (
        "3.9.0",
        "_bloom_segment_step_kernel",
        90,
        dict(op="embedding", training="fused_sgd", dtype="float32", k=4, variant="plain"),
    ),
    (
        "3.6.0",
        "_quantized_bag_kernel",
        90,
        dict(op="quantized_bag", bits=4, mode="max", dtype="float32", k=4, **ALL_AND_HOT),
    ),
    # The segment sums of a bf16 table's gradient at dim 100 (ROW_ALIGN 4),
    # scaled (signs and importance weights) and written into the dense
    # gradient: 80 registers and an 8-byte frame on sm_80 (79 registers, no
    # frame, on sm_90), found when the segment kernel took ROW_ALIGN.
    (
        "3.9.0",
        "_bloom_segment_sum_kernel",
        80,
        dict(op="embedding", dtype="bfloat16", variant="row_align", dim=100),
    ),
]


def known_spill(triton_version, result):
    case = result["case"]
    return any(
        version == triton_version
        and kernel == result["kernel"]
        and cc == result["cc"]
        and all(case.get(key) == value for key, value in options.items())
        for version, kernel, cc, options in KNOWN_SPILLS
    )


def test_the_chunks_cover_the_grid_and_every_kernel():
    # Every case of the grid belongs to a part, and the parts' required
    # kernels are exactly the package's: a new kernel fails here until some
    # part is expected (and its cases made) to launch it.
    cases = aot.option_grid()
    assert {chunk_of(case) for case in cases} == set(CHUNKS)
    assert set().union(*MUST_LAUNCH.values()) == package_kernels()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_every_specialization_compiles_for_sm80_and_sm90(chunk, tmp_path, capsys):
    require_kernels()
    launches = aot.record_in_interpreter([case for case in aot.option_grid() if chunk_of(case) == chunk])
    kernels = {entry["kernel"].rpartition(":")[2] for entry in launches}
    # The part launches the kernels it is there to check, and only the
    # package's kernels.
    assert MUST_LAUNCH.get(chunk, set()) <= kernels <= package_kernels(), kernels
    launches_file = tmp_path / "launches.json"
    launches_file.write_text(json.dumps(launches))
    # A folder to keep each compile's results in, when one is named: the
    # registers and frames of every compile (bench/results/compile_check.*).
    keep = os.environ.get("TRITON_BLOOM_COMPILE_CHECK_OUT")
    lines = []
    for label, folder in triton_installs():
        out_file = tmp_path / f"compiled-{len(lines)}.json"
        done = compile_recorded(str(launches_file), str(out_file), folder, str(tmp_path / f"cache-{len(lines)}"))
        assert out_file.exists(), f"Triton {label}:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
        compiled = json.loads(out_file.read_text())
        stats = compiled["stats"]
        if keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copyfile(out_file, os.path.join(keep, f"{chunk}-triton-{stats['triton']}.json"))
        assert stats["failures"] == 0 and stats["shared_over_limit"] == 0, (stats, done.stdout[-6000:])
        spills = [r for r in compiled["results"] if r["ok"] and (r["stack"] or r["local_memory_instructions"])]
        unknown = [r for r in spills if not known_spill(stats["triton"], r)]
        assert not unknown, [
            (r["kernel"], r["cc"], r["case"], r["config"], r["registers"], r["stack"]) for r in unknown
        ]
        assert all(r["stack"] <= 8 for r in spills), spills
        assert stats["specializations"] >= len(kernels)
        lines.append(
            f"{chunk}, triton {stats['triton']}: {stats['specializations']} specializations of {len(kernels)} "
            f"kernels from {stats['launches']} launches, {stats['compiled']} compiles for sm_80 and sm_90 "
            f"(with the autotuner's search space on the heaviest), {stats['failures']} failures, "
            f"{stats['spills']} spills (all known: {len(spills)} compiles with an 8-byte frame), "
            f"in {stats['seconds']} s"
        )
        lines += [
            f"  known spill: {r['kernel']} sm_{r['cc']} {r['case']} {r['config']['kwargs']} "
            f"{r['registers']} registers, {r['stack']} bytes of stack"
            for r in spills
        ]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_the_recorder_sees_every_argument_and_each_constexpr_value():
    # The specializations come from the launches: every parameter of the
    # kernel is recorded (a new constexpr is too, with no list to edit), and
    # another value of a constexpr is another recorded launch.
    import inspect

    require_kernels()
    plain = aot.record_in_interpreter([dict(op="embedding", dtype="float32", k=4, variant="plain")])
    signed = aot.record_in_interpreter([dict(op="embedding", dtype="float32", k=4, variant="signed", signed=True)])
    forward = [e for e in plain + signed if e["kernel"].endswith(":_bloom_forward_kernel")]
    assert [e["args"]["SIGNED"] for e in forward] == [{"bool": False}, {"bool": True}]
    module, _, name = forward[0]["kernel"].partition(":")
    kernel = getattr(__import__(module, fromlist=[name]), name)
    params = set(inspect.signature(kernel.fn).parameters)
    for entry in forward:
        tuned = {k for config in entry["configs"] for k in config["kwargs"]}
        assert set(entry["args"]) | tuned == params
