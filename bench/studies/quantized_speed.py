"""Speed of the quantized lookups' PyTorch path on CPU against the float32
lookup's, and against an earlier commit's PyTorch path (``--old``: a folder
holding that commit's ``triton_bloom`` and ``kernels``, e.g. from ``git
archive``).

Each build runs in a process of its own (the two cannot share one import),
in turns: per turn and build, the best of ``--repeats`` timings of a
forward of ``--ids`` ids, one thread, ``k = 4``, width 64, a table of
100,000 rows; fp32 is the float module's PyTorch path, in the same process
as the quantized ones, so each turn gives a ratio measured side by side.
Run: ``python -m bench.studies.quantized_speed --old /tmp/old``; writes
``bench/results/quantized_speed_cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MEASURE = """
import json, sys, time, torch
import triton_bloom
from triton_bloom import BloomEmbedding, quantize
torch.set_num_threads(1)
ids_count, repeats = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
m = BloomEmbedding(1_000_000, 64, num_rows=100_000, backend="torch")
ids = torch.randint(0, 1_000_000, (ids_count,))
runs = {"fp32": lambda: m(ids)}
for bits in (8, 4):
    q = quantize(m, bits)
    runs[f"int{bits}"] = lambda q=q: q(ids)
best = {name: float("inf") for name in runs}
with torch.no_grad():
    for name, run in runs.items():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
print(json.dumps({"file": triton_bloom.__file__, **{k: v * 1e3 for k, v in best.items()}}))
"""


def measure(path, ids, repeats):
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("TRITON_INTERPRET", None)
    # Run from the build's folder: ``-c`` puts the working directory first on sys.path.
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(ids), str(repeats)],
        env=env,
        cwd=path,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(result) -> str:
    meta = result["meta"]
    lines = [
        "# Quantized lookups' PyTorch path on CPU",
        "",
        f"Measured {meta['date']} on {meta['cpu']} (2 cores shared with other work: load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after), torch {meta['torch']}, "
        f"one thread.  Produced by `python -m bench.studies.quantized_speed --old <folder of commit "
        f"{meta['old_commit']}>` (`bench/studies/quantized_speed.py`).",
        "",
        f"A forward of {meta['ids']:,} ids (k=4, width 64, 100,000 rows; the best of {meta['repeats']} timings a "
        "turn, the builds measured in alternating processes): milliseconds, and the quantized lookup's time "
        "over the float32 lookup's measured in the same process.  'before': the PyTorch path of commit "
        f"{meta['old_commit']} (a batched einsum over uint8 rows gathered byte by byte, bf16 scale and offset); "
        "'now': this commit's (rows gathered as int32 words, int4 unpacked on words, accumulated hash by "
        "hash).",
        "",
        "| turn | build | fp32 ms | int8 ms | int4 ms | int8 / fp32 | int4 / fp32 |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for turn, pair in enumerate(result["turns"], start=1):
        for build in ("before", "now"):
            r = pair[build]
            lines.append(
                f"| {turn} | {build} | {r['fp32']:.2f} | {r['int8']:.2f} | {r['int4']:.2f} | "
                f"{r['int8'] / r['fp32']:.1f} | {r['int4'] / r['fp32']:.1f} |"
            )
    lines.append("")
    for build in ("before", "now"):
        for bits in ("int8", "int4"):
            ratios = [pair[build][bits] / pair[build]["fp32"] for pair in result["turns"]]
            lines.append(f"- {build}, {bits} / fp32: median {statistics.median(ratios):.1f} over the turns")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="folder with the earlier commit's triton_bloom and kernels")
    parser.add_argument("--old-commit", default="ebab2d2")
    parser.add_argument("--ids", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(RESULTS, "quantized_speed_cpu"))
    args = parser.parse_args(argv)
    import torch

    load_before = os.getloadavg()
    turns = []
    for _ in range(args.turns):
        before = measure(args.old, args.ids, args.repeats)
        now = measure(ROOT, args.ids, args.repeats)
        turns.append({"before": before, "now": now})
        print(turns[-1], flush=True)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    meta = dict(
        date=datetime.date.today().isoformat(),
        cpu=cpu,
        torch=torch.__version__,
        load_before=load_before,
        load_after=os.getloadavg(),
        ids=args.ids,
        repeats=args.repeats,
        old_commit=args.old_commit,
    )
    result = dict(meta=meta, turns=turns)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(render(result))


if __name__ == "__main__":
    main()
