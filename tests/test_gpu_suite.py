"""bench/perf/gpu_suite.sh, checked where it cannot run: without a GPU it must stop
at once and write nothing, and its plan (``--plan``) must fit its budget of
files and time and call only flags and tests that exist."""

import ast
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "perf" / "gpu_suite.sh"
RESULTS = ROOT / "bench" / "results"
MAX_FILES = 8
MAX_SECONDS = 8 * 60
# Time before the first step: two torch imports and nvidia-smi.
PRELUDE_S = 20


def script_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env.update(extra)
    return env


def run_script(*args, env=None, timeout=60):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or script_env(),
        timeout=timeout,
        check=False,
    )


def shell_array(name):
    """The words of the bash array ``NAME=(...)`` in the script."""
    match = re.search(rf"^{name}=\((.*?)\)", SCRIPT.read_text(), re.DOTALL | re.MULTILINE)
    assert match, f"{name}=(...) not found in {SCRIPT}"
    return shlex.split(match.group(1), comments=True)


def shell_int(name):
    match = re.search(rf"^{name}=(\d+)$", SCRIPT.read_text(), re.MULTILINE)
    assert match, f"{name}=<int> not found in {SCRIPT}"
    return int(match.group(1))


@pytest.fixture(scope="module")
def plan():
    """``[(step, limit_s, log, argv)]`` as ``--plan`` prints them."""
    result = run_script("--plan")
    assert result.returncode == 0, result.stderr
    steps = []
    for line in result.stdout.splitlines():
        name, limit, log, command = line.split("\t")
        steps.append((name, int(limit), log, shlex.split(command)))
    return steps


def step(plan, name):
    [argv] = [argv for step_name, _, _, argv in plan if step_name == name]
    return argv


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")
@pytest.mark.parametrize("via", ["argument", "OUT"])
def test_without_cuda_it_stops_at_once_and_writes_nothing(tmp_path, via):
    results_before = sorted(p.name for p in RESULTS.iterdir()) if RESULTS.exists() else []
    argument_dir = tmp_path / "from_argument"
    env = script_env()
    if via == "OUT":
        out_dir = tmp_path / "from_env"
        out_dir.mkdir()
        env["OUT"] = str(out_dir)
    started = time.monotonic()
    result = run_script(str(argument_dir), env=env)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < 30, f"took {elapsed:.0f} s to notice there is no GPU"
    assert "no CUDA GPU" in result.stderr, result.stderr
    assert "nothing was run" in result.stderr
    assert "=== " not in result.stdout + result.stderr  # no step started
    assert not argument_dir.exists()
    if via == "OUT":
        assert list(out_dir.iterdir()) == []
    assert (sorted(p.name for p in RESULTS.iterdir()) if RESULTS.exists() else []) == results_before


def test_it_writes_at_most_eight_declared_files(plan):
    files = shell_array("SUITE_FILES")
    assert len(files) == len(set(files)) <= MAX_FILES
    assert files[0] == "machine.txt" and "summary.txt" in files
    text = SCRIPT.read_text()
    # Every file named under the output folder, in the script and in the
    # commands it runs, is a declared one.
    written = set(re.findall(r"\$OUT_DIR/([A-Za-z0-9_.]+)", text))
    for _, _, log, argv in plan:
        written.add(log)
        written |= {word.split("<out>/", 1)[1] for word in argv if "<out>/" in word}
    assert written <= set(files), f"writes undeclared files: {sorted(written - set(files))}"
    assert "$OUT_DIR/$" not in text.replace("$OUT_DIR/$log", ""), "a file name computed at run time"


def test_plan_fits_in_eight_minutes(plan):
    total = shell_int("TOTAL_LIMIT_S")
    assert total <= MAX_SECONDS - 5
    assert [name for name, *_ in plan] == ["tests", "speed", "train_step", "traffic", "tune"]
    limits = [limit for _, limit, _, _ in plan]
    assert all(limit >= 30 for limit in limits)
    # In a normal run no step is cut by the overall deadline.
    assert sum(limits) + PRELUDE_S <= total, limits


def test_tests_step_runs_the_cuda_test_files(plan):
    argv = step(plan, "tests")
    files = shell_array("TEST_FILES")
    assert [a for a in argv if a.startswith("tests/") and "::" not in a] == files
    for name in ("test_kernels", "test_bag", "test_training", "test_variants", "test_hashing", "test_compile"):
        assert f"tests/{name}.py" in files
    assert all((ROOT / f).is_file() for f in files)
    assert {"-m", "pytest", "-x", "--durations=15"} <= set(argv)


def mmh3_tests(path):
    """``path::test`` for each test function of ``path`` that uses mmh3."""
    tree = ast.parse((ROOT / path).read_text())
    return {
        f"{path}::{node.name}"
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and node.name.startswith("test")
        and any(isinstance(n, ast.Name) and n.id == "mmh3" for n in ast.walk(node))
    }


def test_deselects_exactly_the_tests_that_need_mmh3(plan):
    # The GPU machine has no mmh3: those tests, and only those, are left out.
    argv = step(plan, "tests")
    deselected = {argv[i + 1] for i, a in enumerate(argv) if a == "--deselect"}
    needed = set().union(*(mmh3_tests(f) for f in shell_array("TEST_FILES")))
    assert needed, "no test uses mmh3 any more: drop the stand-in and MMH3_TESTS"
    assert deselected == needed


def help_text(argv):
    result = subprocess.run(
        [sys.executable, *argv, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=script_env(PYTHONPATH=str(ROOT)),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "name, program",
    [
        ("speed", ["bench/perf/speed.py"]),
        ("train_step", ["bench/perf/train_step.py"]),
        ("tune", ["-m", "triton_bloom", "tune"]),
    ],
)
def test_benchmark_steps_use_existing_flags(plan, name, program):
    argv = step(plan, name)
    assert argv[1 : 1 + len(program)] == program
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    assert "--device" in flags or name == "tune"
    available = set(re.findall(r"--[a-z][a-z0-9-]*", help_text(program)))
    assert flags <= available, f"{name}: unknown flags {sorted(flags - available)}"
