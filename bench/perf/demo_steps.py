"""Training-step time of every layer of the open-id demo, on the demo's
full-size stream: the layers take turns (a few steps each, several rounds)
so that a change of load on a shared machine touches them all alike.

    python bench/perf/demo_steps.py --threads 1 --out bench/results/demo_open_steps_cpu.json

Prints the median step time of each layer and its ratio to the hashing
trick's, measured in this one run, with the threads and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch

from triton_bloom.demo_layers import layer_specs
from triton_bloom.demo_open import BATCH, BYTES_PER_ID, EMBEDDING_DIM, train
from triton_bloom.demo_stream import FULL, QUICK, make_stream
from triton_bloom.terminal import cpu_model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the --quick stream")
    parser.add_argument("--rounds", type=int, default=5, help="turns per layer (default 5)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per turn, after 2 untimed (default 12)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", metavar="FILE.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = QUICK if args.quick else FULL
    stream = make_stream(config, args.seed)
    ids, counts = stream.train_counts()
    events = stream.split("train")
    budget = BYTES_PER_ID * ids.numel()
    specs = layer_specs(ids, counts, EMBEDDING_DIM, budget)
    layers = []
    for index, (label, build, _) in enumerate(specs):
        torch.manual_seed(index)
        layers.append((label, build(True)))
    times = {label: [] for label, _ in layers}
    load = [os.getloadavg()[0]]
    window, turn = (2 + args.steps) * BATCH, 0
    for _ in range(args.rounds):
        for label, layer in layers:
            # Each turn trains on the next slice of the stream, as the demo's pass does.
            start = (turn * window) % max(1, events.numel() - window)
            turn += 1
            seconds, _ = train(layer, stream, events[start : start + window], 0.03)
            times[label] += seconds[2:]
        load.append(os.getloadavg()[0])
    base = statistics.median(times["hashing trick k=1"])
    rows = [
        {"label": label, "step_ms": 1000 * statistics.median(t), "vs_hashing_trick": statistics.median(t) / base}
        for label, t in times.items()
    ]
    for row in rows:
        print(f"{row['label'][:34]:34s} {row['step_ms']:8.1f} ms  {row['vs_hashing_trick']:5.2f}x")
    payload = dict(
        rows=rows,
        batch=BATCH,
        stream="quick" if args.quick else "full",
        seed=args.seed,
        rounds=args.rounds,
        steps=args.steps,
        threads=torch.get_num_threads(),
        load_average=load,
        cpu=cpu_model(),
        torch=torch.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    print(f"threads {payload['threads']}, load {min(load):.2f}..{max(load):.2f}, {cpu_model()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
    return payload


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
