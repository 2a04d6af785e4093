#!/usr/bin/env bash
# The GPU suite: everything a machine with a CUDA GPU should check and measure
# for this project, as one command that needs no install and no network.
#
#   bash bench/perf/gpu_suite.sh [OUTPUT_DIR]     run it (OUTPUT_DIR: see below)
#   bash bench/perf/gpu_suite.sh --plan           print the steps and their time limits, run nothing
#
# It runs from a source checkout with PYTHONPATH=<checkout> (triton_bloom
# finds kernels/ itself there), with whatever python3, torch and triton the
# machine has.  Steps, in order, each with its own time limit; a failed step
# does not stop the next:
#   tests       the CUDA test files (kernels against the reference path)
#   speed       bench/perf/speed.py --quick --device cuda (GB/s, copy_ bandwidth)
#   train_step  bench/perf/train_step.py on CUDA (forward, backward, optimizer)
#   traffic     bench/perf/traffic.py --measure: each kernel's measured µs beside
#               the traffic model's (bench/results/traffic_sm90.json), float32
#   tune        python -m triton_bloom tune, the winners saved here
# The whole run stays under 8 minutes on an H200 (the limits below; a step
# that would pass the deadline is cut short).  Exit status: 0 when every step
# passed, 1 when one failed or was cut, 2 when nothing could run (no CUDA GPU).
#
# Everything goes to one folder: $OUT when set, else OUTPUT_DIR, else
# bench/results/gpu_suite_<UTC date>/, and only the files named in
# SUITE_FILES.  machine.txt records the git commit, or $GPU_SUITE_COMMIT
# where the checkout has no .git.

set -u
export PYTHONUNBUFFERED=1
START=$SECONDS

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# Every file this script may write into the output folder; nothing else goes
# there (speed.py's plot is left in a scratch folder to stay within 8).
SUITE_FILES=(machine.txt summary.txt tests.log speed.json speed.md train_step.json autotune.json bench.log)

# The whole run's ceiling, counted from the start of the script, and each
# step's own limit in seconds.  The limits add up to less than the ceiling,
# leaving room for the checks before the first step (about 15 s: torch
# imports twice, nvidia-smi); a step never runs past the ceiling.
TOTAL_LIMIT_S=470
KILL_GRACE_S=5
TESTS_S=180
SPEED_S=90
TRAIN_STEP_S=70
TRAFFIC_S=40
TUNE_S=60

# The CUDA test files.  conftest.py turns Triton's interpreter on only when no
# CUDA device is present, so here they run the compiled kernels.  The output
# side's (scores kernel: top-k, rank, tied logits) comes last: should the
# step run out of time, the lookups' tests have run.
TEST_FILES=(tests/test_kernels.py tests/test_bag.py tests/test_training.py tests/test_variants.py
            tests/test_hashing.py tests/test_compile.py tests/test_output.py)
# The only tests of those files that need the mmh3 package, which the GPU
# machine lacks.  Both check the PyTorch hashing of CPU tensors against mmh3,
# nothing on the GPU, and run in CI; test_hashing.py imports mmh3 at the top,
# so when mmh3 is missing a stand-in lets the file collect (its kernel hashing
# tests are the point here) and these two are deselected.
MMH3_TESTS=(tests/test_hashing.py::test_wide_ids_match_mmh3_of_8_bytes
            tests/test_hashing.py::test_narrow_ids_match_mmh3_of_4_bytes)

PLAN_ONLY=0
if [ "${1:-}" = "--plan" ]; then
    PLAN_ONLY=1
    shift
fi

PY=python3
command -v python3 >/dev/null 2>&1 || PY=python
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_suite: neither python3 nor python is on PATH" >&2
    exit 2
fi

TIMEOUT=()
if command -v timeout >/dev/null 2>&1; then
    TIMEOUT=(timeout -k "$KILL_GRACE_S")
fi

limited() {  # SECONDS COMMAND...: COMMAND, stopped after SECONDS where coreutils' timeout exists
    local seconds=$1
    shift
    if [ ${#TIMEOUT[@]} -gt 0 ]; then
        "${TIMEOUT[@]}" "$seconds" "$@"
    else
        "$@"
    fi
}

# -------------------------------------------------------------------------
# No GPU, no run: checked before anything is created.

if [ "$PLAN_ONLY" = 0 ]; then
    why=$(limited 30 "$PY" - 2>&1 <<'EOF'
import sys
try:
    import torch
except Exception as exc:
    print(f"torch does not import: {type(exc).__name__}: {exc}")
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)")
    sys.exit(1)
EOF
    )
    rc=$?
    if [ "$rc" != 0 ]; then
        [ "$rc" = 124 ] && why="the check (import torch; torch.cuda.is_available()) timed out"
        echo "gpu_suite: no CUDA GPU is visible: ${why:-python exited with status $rc}." >&2
        echo "gpu_suite: this suite needs a CUDA GPU; nothing was run and nothing was written." >&2
        exit 2
    fi
fi

# -------------------------------------------------------------------------
# The output folder and the scratch space.

if [ "$PLAN_ONLY" = 1 ]; then
    OUT_DIR="<out>"
    SCRATCH="<scratch>"
else
    OUT_DIR=${OUT:-${1:-$ROOT/bench/results/gpu_suite_$(date -u +%Y-%m-%d)}}
    mkdir -p "$OUT_DIR" || exit 2
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX") || exit 2
    trap 'rm -rf "$SCRATCH"' EXIT
fi

cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# The checkout stays as it was: no __pycache__, no .pytest_cache.
export PYTHONDONTWRITEBYTECODE=1
# Set before the kernels are imported it would run them on the CPU.
unset TRITON_INTERPRET
# The tests, speed and training step tune at first launch, as a fresh job
# does; no tuned-config file from an earlier run may decide for them.
export TRITON_BLOOM_AUTOTUNE_CACHE=
# Logs are files: wide tables, no progress bars.
export COLUMNS=160 TQDM_DISABLE=1

FAILED=0

record() {  # step status seconds limit
    printf '%-11s %-22s %6s s  (limit %s s)\n' "$1" "$2" "$3" "$4" >> "$OUT_DIR/summary.txt"
    printf 'gpu_suite: %-11s %-22s %6s s\n' "$1" "$2" "$3"
}

# step NAME LIMIT_S LOG COMMAND...: run COMMAND from the checkout, its output
# appended to LOG, cut at LIMIT_S or at the suite's deadline if sooner.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    if [ "$PLAN_ONLY" = 1 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$log" "$*"
        return
    fi
    local left=$((TOTAL_LIMIT_S - (SECONDS - START) - KILL_GRACE_S))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        record "$name" "skipped (no time left)" 0 "$limit"
        FAILED=1
        return
    fi
    {
        echo "=== $name: $* ==="
        echo "=== started $(date -u +%H:%M:%SZ), limit ${limit} s ==="
    } >> "$OUT_DIR/$log"
    local began=$SECONDS
    limited "$limit" "$@" >> "$OUT_DIR/$log" 2>&1 < /dev/null
    local rc=$? took=$((SECONDS - began)) status
    case $rc in
        0) status="ok" ;;
        124 | 137) status="timed out (exit $rc)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '\n=== %s: %s after %s s ===\n\n' "$name" "$status" "$took" >> "$OUT_DIR/$log"
    [ "$rc" != 0 ] && FAILED=1
    record "$name" "$status" "$took" "$limit"
}

# -------------------------------------------------------------------------
# machine.txt first: what ran, where, when.

if [ "$PLAN_ONLY" = 0 ]; then
    {
        echo "date (UTC):  $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "host:        $(uname -n), $(uname -sr), $(nproc 2>/dev/null || echo '?') CPUs"
        # A copy of the working tree may come without .git: the caller can
        # name the commit in GPU_SUITE_COMMIT.
        commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null) \
            || commit="${GPU_SUITE_COMMIT:-unknown (no git metadata here; set GPU_SUITE_COMMIT)}"
        if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
            commit="$commit, with uncommitted changes"
        fi
        echo "git commit:  $commit"
        echo "command:     bash bench/perf/gpu_suite.sh $*"
        echo "nvidia-smi (name, driver, memory):"
        limited 20 nvidia-smi --query-gpu=index,name,driver_version,memory.total \
            --format=csv,noheader 2>&1 | sed 's/^/  /' || echo "  nvidia-smi failed"
        limited 30 "$PY" - 2>&1 <<'EOF'
import platform
import torch

try:
    import triton
    triton_version = triton.__version__
except Exception as exc:
    triton_version = f"does not import ({type(exc).__name__}: {exc})"
print(f"python:      {platform.python_version()} ({platform.python_implementation()})")
print(f"torch:       {torch.__version__} (CUDA {torch.version.cuda})")
print(f"triton:      {triton_version}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}:      {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}")
EOF
    } > "$OUT_DIR/machine.txt"
    {
        echo "gpu_suite $(date -u +%Y-%m-%dT%H:%M:%SZ), output in $OUT_DIR"
        printf '%-11s %-22s %8s\n' step status seconds
    } > "$OUT_DIR/summary.txt"
    cat "$OUT_DIR/machine.txt"
fi

# -------------------------------------------------------------------------
# The steps.

PYTEST_PATH=$PYTHONPATH
DESELECT=()
if [ "$PLAN_ONLY" = 1 ] || ! "$PY" -c "import mmh3" >/dev/null 2>&1; then
    if [ "$PLAN_ONLY" = 0 ]; then
        mkdir -p "$SCRATCH/stand_in"
        cat > "$SCRATCH/stand_in/mmh3.py" <<'EOF'
"""Stand-in for the mmh3 package, missing on this machine (bench/perf/gpu_suite.sh)."""


def hash(*args, **kwargs):
    raise ImportError("mmh3 is not installed: this test should have been deselected")
EOF
    fi
    PYTEST_PATH="$SCRATCH/stand_in:$PYTHONPATH"
    for test in "${MMH3_TESTS[@]}"; do
        DESELECT+=(--deselect "$test")
    done
fi

step tests "$TESTS_S" tests.log env PYTHONPATH="$PYTEST_PATH" \
    "$PY" -m pytest -q -x --durations=15 -rfEs -p no:cacheprovider "${TEST_FILES[@]}" \
    ${DESELECT[@]+"${DESELECT[@]}"}

step speed "$SPEED_S" bench.log "$PY" bench/perf/speed.py --quick --device cuda --out "$SCRATCH/speed.json"
if [ "$PLAN_ONLY" = 0 ]; then
    # speed.py writes FILE.json, FILE.md and FILE.png; the plot stays behind.
    [ -f "$SCRATCH/speed.json" ] && cp "$SCRATCH/speed.json" "$OUT_DIR/speed.json"
    [ -f "$SCRATCH/speed.md" ] && cp "$SCRATCH/speed.md" "$OUT_DIR/speed.md"
fi

# The README's CPU setting (10M ids, dim 64, ratio 0.2, k=4, 16384 ids a
# step), so the two tables compare; on an H200 the steps take milliseconds
# and tuning the kernels at their first launch most of the minute.
step train_step "$TRAIN_STEP_S" bench.log "$PY" bench/perf/train_step.py --device cuda --num-embeddings 10000000 \
    --embedding-dim 64 --ratio 0.2 --k 4 --batch 16384 --repeats 20 --out "$OUT_DIR/train_step.json"

# The traffic model's first check (bench/perf/traffic.py's docstring): the
# float32 ops of its report at its shapes, modelled against measured µs.
step traffic "$TRAFFIC_S" bench.log "$PY" bench/perf/traffic.py --measure bench/results/traffic_sm90.json \
    --ops forward backward fused_sgd bag_forward_sum bag_backward_sum scores_topk --dtypes float32

# Two shapes only: every config of every kernel is compiled and timed, and
# the shapes the speed run used are compiled already (Triton's disk cache).
step tune "$TUNE_S" bench.log "$PY" -m triton_bloom tune --dim 64 128 --k 4 --dtype float32 --batch 65536 \
    --cache "$OUT_DIR/autotune.json"

if [ "$PLAN_ONLY" = 1 ]; then
    exit 0
fi

total=$((SECONDS - START))
if [ "$FAILED" = 0 ]; then
    echo "all steps passed in $total s" >> "$OUT_DIR/summary.txt"
else
    echo "FAILED: at least one step failed or was cut, in $total s" >> "$OUT_DIR/summary.txt"
fi
echo
cat "$OUT_DIR/summary.txt"
echo "gpu_suite: wrote $(ls "$OUT_DIR" | tr '\n' ' ')to $OUT_DIR"
exit "$FAILED"
