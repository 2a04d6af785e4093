"""Quantized Bloom rows in the open-id regime: the stream, training and
scoring of ``triton-bloom demo --quick`` (``triton_bloom/demo_open.py``,
imported unchanged), at its budget of 2 B per distinct training id.

Trained in float32 (SparseAdam, the quick demo's learning rate), then
served as trained and quantized after training: plain Bloom k=2 at the
budget's fp32 rows (and its int8/int4 rows, below the budget), and Bloom
k=2 with the rows int8 (then int4) rows buy at the budget, quantized; the
vocabulary table of the most frequent ids + an OOV row (fp32, the rival a
user tries first) as the reference.  Each quantized table is also scored
in the first format (``quantized_format.py``: a bfloat16 scale and offset
per row), on the same trained table, with both formats' relative error.  Run: ``python -m
bench.studies.quantized_open --seeds 0``; writes
``bench/results/quantized_open_cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import triton

from triton_bloom import BloomEmbedding, embedding_bytes, quantize
from triton_bloom.demo_layers import layer_specs
from triton_bloom.demo_open import BYTES_PER_ID, EMBEDDING_DIM, QUICK_LEARNING_RATES, evaluate, train
from triton_bloom.demo_stream import FULL, QUICK, eval_set, make_stream
from triton_bloom.quantized_ops import LAYOUT

from .quantized_format import OLD_LAYOUT, new_round_trip, old_bytes, old_round_trip, relative_error, with_old_rows

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")


def run_seed(seed, log, more_rows=True, only_more_rows=False, full=False):
    config = FULL if full else QUICK
    stream = make_stream(config, seed)
    ids, counts = stream.train_counts()
    events = stream.split("train")
    test = eval_set(stream, "test", config.eval_events, seed + 2)
    budget = BYTES_PER_ID * ids.numel()
    lr = QUICK_LEARNING_RATES[0]
    d = EMBEDDING_DIM
    rows = []

    def record(key, label, layer, trained_bytes, nbytes=None, error=None):
        metrics = evaluate(layer, test)
        nbytes = embedding_bytes(layer) if nbytes is None else nbytes
        rows.append(
            dict(
                seed=seed,
                key=key,
                label=label,
                budget=budget,
                bytes=nbytes,
                trained_bytes=trained_bytes,
                relative_error=error,
                **metrics,
            )
        )
        log(f"seed {seed} {label}: {nbytes / budget:.3f} of budget, HR@10 {metrics['hr@10']:.4f}")

    def trained(build, index):
        torch.manual_seed(1000 * seed + index)
        layer = build()
        started = time.perf_counter()
        train(layer, stream, events, lr)
        log(f"seed {seed} trained {index} in {time.perf_counter() - started:.0f} s")
        return layer

    label, build, _ = layer_specs(ids, counts, d, budget, full=False, planner=False, bits=None)[0]
    if not only_more_rows:
        record("vocabulary: fp32", label + " fp32", trained(lambda: build(True), 0), None)
    # A row's bytes in the current format: its codes and a scale byte.
    sizes = ((None, 4 * d), (8, d + 1), (4, d // 2 + 1))
    for index, (bits, row) in enumerate(sizes, start=1):
        if (bits is not None and not more_rows) or (bits is None and only_more_rows):
            continue
        num_rows = budget // row
        layer = trained(
            lambda num_rows=num_rows: BloomEmbedding(
                None, d, num_rows=num_rows, num_hash_functions=2, padding_idx=None, sparse=True
            ),
            index,
        )
        name = f"Bloom k=2 {num_rows:,} rows"
        group = f"Bloom, the rows {'fp32' if bits is None else f'int{bits}'} buys"
        record(f"{group}: fp32", name + " fp32", layer, embedding_bytes(layer))
        w = layer.weight
        for q in (8, 4) if bits is None else (bits,):
            error = relative_error(w, new_round_trip(w, q))
            record(f"{group}: int{q}", f"{name} int{q}", quantize(layer, bits=q), embedding_bytes(layer), error=error)
            old = old_bytes(num_rows, d, q)
            error = relative_error(w, old_round_trip(w, q))
            served = with_old_rows(layer, q)
            record(
                f"{group}: int{q} (old format)",
                f"{name} int{q} (old format)",
                served,
                embedding_bytes(layer),
                old,
                error,
            )
    return rows, dict(budget=budget, distinct_train_ids=ids.numel(), train_events=events.numel(), lr=lr, full=full)


def _mean_sd(values):
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def render(result) -> str:
    meta = result["meta"]
    runs = result["runs"]
    lines = [
        "# Quantized Bloom rows, open ids (CPU)",
        "",
        f"Measured {meta['date']} on {meta['cpu']} (2 cores shared with other work: load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after), torch {meta['torch']}, "
        f"triton {meta['triton']}, {meta['seconds'] / 60:.0f} min.  Produced by "
        f"`python -m bench.studies.quantized_open --seeds {' '.join(map(str, meta['seeds']))}"
        f"{meta.get('flags', '')}` "
        "(`bench/studies/quantized_open.py`).",
        "",
        "Setup: the stream, model, training and scoring of "
        f"`triton-bloom demo{'' if meta['setup'].get('full') else ' --quick'}` (raw int64 item ids, "
        f"dim {EMBEDDING_DIM}, SparseAdam lr {meta['setup']['lr']}, one pass), budget {BYTES_PER_ID} B per distinct "
        f"training id (about {meta['setup']['budget']:,} B; each seed's own), seeds "
        f"{', '.join(map(str, meta['seeds']))}.  Every layer trains in fp32; int8/int4 rows are quantized after "
        f"training, in the current format (`{meta.get('layout', '?')}`: one scale byte a row, levels symmetric "
        "around the column offsets) and, on the same trained table, in the old one "
        f"(`{meta.get('old_layout', '?')}`: a bfloat16 offset and scale per row; `bench/studies/quantized_format.py`).  "
        "Bytes: the served layer's (`embedding_bytes`; for the old format, its codes and 4 bytes a row), as a share "
        "of the budget; the 'more rows' layers trained at their fp32 size (trained bytes).  HR@10 and AUC on the "
        "test events (all, and those on items seen at most a few times in training: rare).  Relative error: "
        "`||W - Q|| / ||W||` of the table's round trip through the format.  The rows int8/int4 buy are the budget "
        "over a row's bytes in the current format (codes and a scale byte), which leaves out the table's grid and "
        "column offsets (8 + 4 x dim bytes): those layers serve 1.001 of the budget.",
        "",
    ]
    if meta.get("note"):
        lines += [meta["note"], ""]
    keys = list(dict.fromkeys(r["key"] for r in runs))
    by_key = {key: [r for r in runs if r["key"] == key] for key in keys}
    fp32 = {(r["seed"], r["key"].split(": ")[0]): r for r in runs if r["key"].endswith(": fp32")}
    lines += [
        "Over the seeds (mean +- sd; change: against the same trained table in fp32, per seed):",
        "",
        "| layer | bytes / budget | HR@10 | change | HR@10 rare | AUC | change | relative error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, rows in by_key.items():
        base = [fp32.get((r["seed"], key.split(": ")[0])) for r in rows]
        quantized = ": int" in key and all(base)
        cells = [key, f"{_mean_sd([r['bytes'] / r['budget'] for r in rows])[0]:.3f}"]
        for metric in ("hr@10", "hr@10_rare", "auc"):
            mean, sd = _mean_sd([r[metric] for r in rows])
            cells.append(f"{mean:.4f} +- {sd:.4f}")
            if metric != "hr@10_rare":
                if quantized:
                    change = _mean_sd([r[metric] - b[metric] for r, b in zip(rows, base)])
                    cells.append(f"{change[0]:+.4f} +- {change[1]:.4f}")
                else:
                    cells.append("-")
        errors = [r["relative_error"] for r in rows if r.get("relative_error") is not None]
        cells.append(f"{statistics.fmean(errors):.4f}" if errors else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per seed:",
        "",
        "| seed | layer | bytes / budget | trained bytes / budget | HR@10 | HR@10 rare | AUC | relative error |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        budget = r["budget"]
        trained = "-" if r["trained_bytes"] is None else f"{r['trained_bytes'] / budget:.2f}"
        error = "-" if r.get("relative_error") is None else f"{r['relative_error']:.4f}"
        lines.append(
            f"| {r['seed']} | {r['label']} | {r['bytes'] / budget:.3f} | {trained} | {r['hr@10']:.4f} | "
            f"{r['hr@10_rare']:.4f} | {r['auc']:.4f} | {error} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=os.path.join(RESULTS, "quantized_open_cpu"))
    parser.add_argument("--render", action="store_true", help="only write OUT.md from OUT.json")
    parser.add_argument(
        "--full", action="store_true", help="the default demo's sizes instead of --quick's (same learning rate)"
    )
    parser.add_argument(
        "--no-more-rows",
        action="store_true",
        help="leave out the layers with the rows int8/int4 buy at the budget (the slowest to train)",
    )
    parser.add_argument(
        "--only-more-rows", action="store_true", help="only the layers with the rows int8/int4 buy at the budget"
    )
    args = parser.parse_args(argv)
    if args.render:
        with open(args.out + ".json") as f:
            result = json.load(f)
    else:
        started, load_before = time.perf_counter(), os.getloadavg()
        runs, setup = [], None
        cpu = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
        )
        for seed in args.seeds:
            seed_runs, setup = run_seed(
                seed, lambda line: print(line, flush=True), not args.no_more_rows, args.only_more_rows, args.full
            )
            runs += seed_runs
            # Written after every seed: a long run stopped early keeps what it measured.
            meta = dict(
                date=datetime.date.today().isoformat(),
                cpu=cpu,
                torch=torch.__version__,
                triton=triton.__version__,
                load_before=load_before,
                load_after=os.getloadavg(),
                seconds=round(time.perf_counter() - started),
                setup=setup,
                seeds=sorted({r["seed"] for r in runs}),
                layout=LAYOUT,
                old_layout=OLD_LAYOUT,
                flags="".join(
                    f" {flag}"
                    for flag, on in (
                        ("--full", args.full),
                        ("--no-more-rows", args.no_more_rows),
                        ("--only-more-rows", args.only_more_rows),
                    )
                    if on
                ),
            )
            result = dict(meta=meta, runs=runs)
            with open(args.out + ".json", "w") as f:
                json.dump(result, f, indent=1)
            with open(args.out + ".md", "w") as f:
                f.write(render(result))
    with open(args.out + ".md", "w") as f:
        f.write(render(result))


if __name__ == "__main__":
    main()
