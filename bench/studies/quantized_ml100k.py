"""Post-training int8/int4 quantization of trained Bloom tables on
MovieLens-100K, in the current format and the old one, on the same trained
models.

The model and protocol are ``quality.py``'s implicit task (BPR matrix
factorisation, leave-last-out split, full ranking of the held-out item
against every unseen item): Bloom tables for users and items at 0.2 of the
full tables' bytes, ``k = 4``, dim 32, trained in float32 with the learning
rate and L2 ``quality.py``'s tuning chose for that table on validation
(``bench/results/quality_cpu.json``: lr 0.005, L2 0.001), early stopping on
validation AUC.  Each trained model is scored as trained, through
``triton_bloom.quantize`` (int8, int4: both tables quantized, scored
through the quantized lookups by ``bloom_rank``) and with its tables in the
old format (``quantized_format.py``).

``--study bytes`` trains, at the same lr and L2, the layouts a user would
compare at that budget (0.2 of the full fp32 tables' bytes) and the full
table they are measured against:

- "fewer rows": Bloom at 0.2, fp32 (the model above);
- "more rows, fewer bits": Bloom with the most rows whose int8 (int4)
  quantized tables fit the same bytes (``embedding_bytes`` of the built
  quantized modules: codes, scale bytes, scale grid, column offsets), trained
  in fp32 at that row count and quantized after training;
- "fewer bits": the full tables (dim 32) with their rows quantized the same
  way (``quantize_rows``, each row's dequantised codes in the float table;
  bytes: what the quantized rows hold), int8 and int4;
- smaller-dim rivals: the full tables at dim 6 in fp32 (0.1875 of the
  bytes), and at dim 16 quantized to int8 (the row bytes of dim 32 at int4:
  rows are padded to 16 bytes, so at int4 a narrower full table saves nothing).

Run: ``python -m bench.studies.quantized_ml100k --seeds 0 1 2`` (``--study
bytes`` for the second part; both parts are kept in one JSON); writes
``bench/results/quantized_ml100k_cpu.{md,json}``.  Needs ml-100k
(``bench/studies/data.py`` fetches it from the recbole wheel on PyPI).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import time

import numpy as np
import torch
import triton

from triton_bloom import BloomEmbedding, embedding_bytes, quantize
from triton_bloom.quantized_ops import LAYOUT, dequantize_rows, quantize_rows, row_bytes

from . import data as datasets
from .quality import HYPER, TableSpec, full_bytes, init_std_for, make_table, make_tasks
from .quantized_format import OLD_LAYOUT, new_round_trip, old_bytes, old_round_trip, relative_error, with_old_rows

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")
SPEC = TableSpec("bloom", budget=0.2, k=4)
LR, L2 = 0.005, 0.001


def bloom_rows_at_bytes(num, dim, bits, budget):
    """The most rows of a Bloom table of ``num`` ids whose quantized module
    (``bits``) holds at most ``budget`` bytes, everything counted."""

    def served(rows):
        return embedding_bytes(quantize(BloomEmbedding(num, dim, num_rows=rows, num_hash_functions=4), bits=bits))

    per_row = served(2) - served(1)
    if per_row != row_bytes(dim, bits) + 1:
        raise RuntimeError(f"a quantized row costs {per_row} bytes, the format says {row_bytes(dim, bits) + 1}")
    rows = 1 + (budget - served(1)) // per_row
    if served(rows) > budget or served(rows + 1) <= budget:
        raise RuntimeError(f"{rows} rows at int{bits} miss the budget of {budget} bytes")
    return rows


def train(task, seed, log, spec=SPEC, rows=None):
    """``quality.fit``'s loop, keeping the trained model (the best
    validation epoch's weights).  ``rows``: ``(user rows, item rows)`` of
    Bloom tables that replace ``spec``'s (built after the seed is set)."""
    hp = dataclasses.replace(task.hyper, lr=LR, l2=L2)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = task.model(spec, hp)
    if rows is not None:
        train_set = task.split.train
        for side, num, num_rows in (("users", train_set.num_users, rows[0]), ("items", train_set.num_items, rows[1])):
            spec_rows = TableSpec("bloom", k=SPEC.k, kwargs=(("num_rows", num_rows),))
            setattr(model, side, make_table(spec_rows, num, hp.dim, None, init_std_for(hp, hp.dim)))
    optimizer = torch.optim.Adam(model.parameters(), lr=hp.lr)
    best, best_state, best_epoch = None, None, 0
    for epoch in range(1, hp.max_epochs + 1):
        model.train()
        task.epoch(model, optimizer, rng, hp)
        model.eval()
        valid = task.evaluate(model, "valid")[task.select]
        if best is None or valid > best:
            best, best_state, best_epoch = valid, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= hp.patience:
            break
    model.load_state_dict(best_state)
    name = spec.label if rows is None else f"bloom k={SPEC.k}, {rows[0]} user and {rows[1]} item rows"
    log(f"seed {seed} {name}: trained, best epoch {best_epoch}, valid AUC {best:.4f}")
    return model


def table_bytes(model) -> int:
    return embedding_bytes(model.users) + embedding_bytes(model.items)


def run_seed(task, seed, log):
    model = train(task, seed, log)
    rows = []

    def record(label, served, nbytes, error=None):
        metrics = task.evaluate(served, "test")
        rows.append(dict(seed=seed, label=label, bytes=nbytes, relative_error=error, **metrics))
        log(f"seed {seed} {label}: AUC {metrics['auc']:.4f} HR@10 {metrics['hr@10']:.4f} MRR {metrics['mrr']:.4f}")

    record("fp32", model, table_bytes(model))
    tables = (model.users.weight, model.items.weight)
    for bits in (8, 4):
        error = relative_error(torch.cat(tables), torch.cat([new_round_trip(w, bits) for w in tables]))
        quantized = quantize(model, bits=bits)
        record(f"int{bits}", quantized, table_bytes(quantized), error)
        error = relative_error(torch.cat(tables), torch.cat([old_round_trip(w, bits) for w in tables]))
        nbytes = sum(old_bytes(w.shape[0], w.shape[1], bits) for w in tables)
        record(f"int{bits} (old format)", with_old_rows(model, bits), nbytes, error)
    return rows, dict(users=model.users.num_rows, items=model.items.num_rows, dim=model.users.embedding_dim)


def fake_quantized_full(model, bits):
    """A copy of a model with full tables whose rows hold their dequantised
    codes (what a quantized lookup returns), and the bytes those rows hold."""
    quantized, total = copy.deepcopy(model), 0
    for table in (quantized.users, quantized.items):
        parts = quantize_rows(table.weight, bits)
        total += sum(t.numel() * t.element_size() for t in parts)
        with torch.no_grad():
            table.weight.copy_(dequantize_rows(*parts, bits, table.weight.shape[1]))
    return quantized, total


def run_bytes_seed(task, seed, log):
    """The equal-bytes rows of one seed (``--study bytes``)."""
    runs = []
    train_set = task.split.train
    nums = (train_set.num_users, train_set.num_items)

    def record(label, kind, served, nbytes, bits=None, base=None):
        metrics = task.evaluate(served, "test")
        runs.append(dict(seed=seed, label=label, kind=kind, bits=bits, bytes=nbytes, base=base, **metrics))
        log(f"seed {seed} {label}: AUC {metrics['auc']:.4f} HR@10 {metrics['hr@10']:.4f} MRR {metrics['mrr']:.4f}")

    bloom = train(task, seed, log)
    record("Bloom 0.2 fp32", "fewer rows", bloom, table_bytes(bloom))
    budgets = [int(SPEC.budget * full_bytes(num, task.hyper.dim)) for num in nums]
    for bits in (8, 4):
        rows = [bloom_rows_at_bytes(num, task.hyper.dim, bits, budget) for num, budget in zip(nums, budgets)]
        more = train(task, seed, log, rows=rows)
        label = f"Bloom {sum(rows) / sum(nums):.3g}"
        record(f"{label} fp32", "more rows", more, table_bytes(more))
        quantized = quantize(more, bits=bits)
        record(f"{label} int{bits}", "more rows, fewer bits", quantized, table_bytes(quantized), bits, f"{label} fp32")
        runs[-1]["rows"] = runs[-2]["rows"] = rows
    full = train(task, seed, log, spec=TableSpec("full"))
    record("full fp32", "full", full, table_bytes(full))
    for bits in (8, 4):
        record(f"full int{bits}", "fewer bits", *fake_quantized_full(full, bits), bits, "full fp32")
    small = train(task, seed, log, spec=TableSpec("full", dim=6))
    record("full dim 6 fp32", "smaller dim", small, table_bytes(small))
    narrow = train(task, seed, log, spec=TableSpec("full", dim=16))
    record("full dim 16 fp32", "smaller dim", narrow, table_bytes(narrow))
    record("full dim 16 int8", "smaller dim, fewer bits", *fake_quantized_full(narrow, 8), 8, "full dim 16 fp32")
    return runs


def render(result) -> str:
    meta, runs = result["meta"], result["runs"]
    full = meta["full_fp32_bytes"]
    lines = [
        "# Quantized Bloom tables on MovieLens-100K (CPU)",
        "",
        f"Measured {meta['date']} on {meta['cpu']} (2 cores shared with other work: load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after), torch {meta['torch']}, "
        f"triton {meta['triton']}, {meta.get('threads', 'torch default')} thread(s), {duration(meta['seconds'])}.  "
        f"Produced by `python -m bench.studies.quantized_ml100k --seeds {' '.join(map(str, meta['seeds']))}` "
        "(`bench/studies/quantized_ml100k.py`).",
        "",
        "Setup: `quality.py`'s implicit task on ml-100k (BPR, leave-last-out, the held-out item ranked against "
        f"every unseen item), Bloom user and item tables at 0.2 of the full tables' bytes ({meta['rows']['users']} "
        f"and {meta['rows']['items']} rows of dim {meta['rows']['dim']}), k=4, lr {LR}, L2 {L2} (quality.py's "
        "tuned choice for this table), early stopping on validation AUC; seeds "
        f"{', '.join(map(str, meta['seeds']))} (init and sampling).  Quantized after training: current format "
        f"`{meta['layout']}`, old format `{meta['old_layout']}`, both on the same trained tables.  Bytes: both "
        "tables, as a share of the full fp32 tables.  Change: against the same trained model in fp32, per seed "
        "(mean +- sd).  Relative error: `||W - Q|| / ||W||` over both tables.",
        "",
        "| tables | bytes / full fp32 | AUC | change | HR@10 | change | MRR | relative error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["seed"]: r for r in runs if r["label"] == "fp32"}
    for label in dict.fromkeys(r["label"] for r in runs):
        rows = [r for r in runs if r["label"] == label]
        cells = [label, f"{rows[0]['bytes'] / full:.4f}"]
        for metric in ("auc", "hr@10"):
            cells.append("{:.4f} +- {:.4f}".format(*mean_sd([r[metric] for r in rows])))
            change = mean_sd([r[metric] - base[r["seed"]][metric] for r in rows])
            cells.append("-" if label == "fp32" else f"{change[0]:+.4f} +- {change[1]:.4f}")
        cells.append("{:.4f}".format(mean_sd([r["mrr"] for r in rows])[0]))
        errors = [r["relative_error"] for r in rows if r["relative_error"] is not None]
        cells.append(f"{statistics.fmean(errors):.4f}" if errors else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per seed:", "", "| seed | tables | AUC | HR@10 | MRR |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['label']} | {r['auc']:.4f} | {r['hr@10']:.4f} | {r['mrr']:.4f} |" for r in runs]
    if "equal_bytes" in result:
        lines += [""] + render_bytes(result["equal_bytes"], full, runs)
    return "\n".join(lines) + "\n"


def duration(seconds) -> str:
    return f"{seconds} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def mean_sd(values):
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def answer(runs, budget) -> str:
    """The one-line answer at equal bytes: "fewer rows" (Bloom 0.2 in fp32),
    "fewer bits" (the full tables in int4) and "both" (Bloom at the rows int4
    buys, in int4), by mean AUC over the seeds, and who wins each seed."""
    both = next(r["label"] for r in runs if r["kind"] == "more rows, fewer bits" and r["bits"] == 4)
    rivals = {"fewer rows": "Bloom 0.2 fp32", "fewer bits": "full int4", "both": both}
    per_seed = {}
    for r in runs:
        per_seed.setdefault(r["seed"], {})[r["label"]] = r
    seeds = sorted(per_seed)
    stats = {
        name: [mean_sd([per_seed[s][label][m] for s in seeds]) for m in ("auc", "hr@10", "mrr")]
        for name, label in rivals.items()
    }
    order = sorted(rivals, key=lambda name: -stats[name][0][0])
    wins = sum(1 for s in seeds if max(rivals, key=lambda name: per_seed[s][rivals[name]]["auc"]) == order[0])
    parts = [
        f'"{name}" ({rivals[name]}, {per_seed[seeds[0]][rivals[name]]["share"]:.3f} of the bytes): AUC '
        f"{stats[name][0][0]:.4f} +- {stats[name][0][1]:.4f}, HR@10 {stats[name][1][0]:.4f} +- "
        f"{stats[name][1][1]:.4f}, MRR {stats[name][2][0]:.4f} +- {stats[name][2][1]:.4f}"
        for name in order
    ]
    return (
        f"**At equal bytes ({budget:g} of the full fp32 tables), most accurate first:** "
        + "; ".join(parts)
        + f' (mean +- sd over {len(seeds)} seeds; "{order[0]}" has the best AUC of the three on {wins} of '
        f"{len(seeds)} seeds)."
    )


def render_bytes(part, full, ptq_runs) -> list:
    """The equal-bytes section (``--study bytes``); ``ptq_runs``: the first
    section's, whose fp32 model this one retrains as Bloom 0.2 fp32."""
    meta, runs = part["meta"], part["runs"]
    first = {r["seed"]: r for r in ptq_runs if r["label"] == "fp32"}
    again = [r for r in runs if r["label"] == "Bloom 0.2 fp32" and r["seed"] in first]
    same = all(r[m] == first[r["seed"]][m] for r in again for m in ("auc", "hr@10", "mrr"))
    retrained = (
        f"Bloom 0.2 fp32 is the model of the table above, trained again: the same AUC, HR@10 and MRR on seeds "
        f"{', '.join(str(r['seed']) for r in again)}."
        if again and same
        else "Bloom 0.2 fp32 is the model of the table above, trained again: its metrics differ from that run's."
    )
    for r in runs:
        r["share"] = r["bytes"] / full
    more = {r["label"]: r["rows"] for r in runs if r.get("rows") and r["label"].endswith(" fp32")}
    lines = [
        "## At equal bytes: fewer rows, fewer bits, or both",
        "",
        f"Measured {meta['date']} on {meta['cpu']} (load average {meta['load_before'][0]:.1f} before, "
        f"{meta['load_after'][0]:.1f} after), torch {meta['torch']}, triton {meta['triton']}, "
        f"{meta['threads']} thread, {duration(meta['seconds'])}.  Produced by `python -m "
        f"bench.studies.quantized_ml100k --study bytes --seeds {' '.join(map(str, meta['seeds']))}`.",
        "",
        f"The same task, lr {LR} and L2 {L2} for every model (quality.py's tuned choice for the Bloom 0.2 tables "
        "and for the full tables at dim 32 and dim 6; untuned for the larger Bloom tables and dim 16), early "
        "stopping on validation AUC.  The "
        'layouts at 0.2 of the full fp32 tables\' bytes: Bloom 0.2 in fp32 ("fewer rows"); Bloom with the most '
        "rows whose int8 (int4) tables fit those bytes, everything the quantized modules hold counted ("
        + "; ".join(f"{label[:-5]}: {rows[0]} user and {rows[1]} item rows" for label, rows in more.items())
        + '), trained in fp32 at that size and quantized after training ("both"; training holds the fp32 '
        "tables, "
        + ", ".join(f"{next(r['share'] for r in runs if r['label'] == label):.3f}" for label in more)
        + " of the full tables' bytes: the budget is the served model's); the full tables with their rows "
        'quantized the same way ("fewer bits"); the full tables at dim 6 in fp32, and at dim 16 in int8 '
        "(17 bytes a row, the same as dim 32 in int4: codes are padded to 16 bytes a row, so a narrower int4 "
        "table saves nothing).  Change: against the same trained model in fp32, per seed (mean +- sd).  " + retrained,
        "",
        "| tables | bytes / full fp32 | AUC | change | HR@10 | change | MRR |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_seed = {(r["seed"], r["label"]): r for r in runs}
    labels = list(dict.fromkeys(r["label"] for r in runs))
    for label in labels:
        rows = [r for r in runs if r["label"] == label]
        cells = [label, f"{rows[0]['share']:.4f}"]
        for metric in ("auc", "hr@10"):
            cells.append("{:.4f} +- {:.4f}".format(*mean_sd([r[metric] for r in rows])))
            base = rows[0]["base"]
            change = base and mean_sd([r[metric] - by_seed[(r["seed"], base)][metric] for r in rows])
            cells.append(f"{change[0]:+.4f} +- {change[1]:.4f}" if base else "-")
        cells.append("{:.4f} +- {:.4f}".format(*mean_sd([r["mrr"] for r in rows])))
        lines.append("| " + " | ".join(cells) + " |")
    budget = SPEC.budget
    within = [label for label in labels if by_seed[(runs[0]["seed"], label)]["share"] <= budget * 1.0001]
    within.sort(key=lambda label: -mean_sd([r["auc"] for r in runs if r["label"] == label])[0])
    lines += ["", f"Within {budget:g} of the full tables' bytes, by AUC:", ""]
    for i, label in enumerate(within):
        rows = [r for r in runs if r["label"] == label]
        lines.append(
            f"{i + 1}. {label} ({rows[0]['share']:.3f} of the bytes): AUC {mean_sd([r['auc'] for r in rows])[0]:.4f}, "
            f"HR@10 {mean_sd([r['hr@10'] for r in rows])[0]:.4f}, MRR {mean_sd([r['mrr'] for r in rows])[0]:.4f}"
        )
    lines += ["", answer(runs, budget), ""]
    lines += ["Per seed:", "", "| seed | tables | AUC | HR@10 | MRR |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['label']} | {r['auc']:.4f} | {r['hr@10']:.4f} | {r['mrr']:.4f} |" for r in runs]
    for r in runs:
        del r["share"]
    return lines


def environment(started, load_before, seeds, threads) -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?")
    return dict(
        date=datetime.date.today().isoformat(),
        cpu=cpu,
        torch=torch.__version__,
        triton=triton.__version__,
        load_before=load_before,
        load_after=os.getloadavg(),
        seconds=round(time.perf_counter() - started),
        seeds=seeds,
        threads=threads,
        layout=LAYOUT,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--study",
        choices=("ptq", "bytes"),
        default="ptq",
        help="ptq: post-training int8/int4 of Bloom 0.2, both formats; bytes: the layouts at equal bytes "
        "(added to OUT.json's ptq results, which it needs for the full tables' bytes)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shares the machine)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "quantized_ml100k_cpu"))
    parser.add_argument("--cache-dir", help="where ml-100k is kept")
    parser.add_argument("--render", action="store_true", help="only write OUT.md from OUT.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        with open(args.out + ".json") as f:
            result = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(render(result))
        return
    started, load_before = time.perf_counter(), os.getloadavg()
    (task,) = make_tasks(datasets.load_ml100k(args.cache_dir), ["implicit"], HYPER)

    def log(line):
        print(line, flush=True)

    if args.study == "bytes":
        with open(args.out + ".json") as f:
            result = json.load(f)
        runs = []
        # Written after every seed, so that a run cut short still leaves its seeds.
        for index, seed in enumerate(args.seeds):
            runs += run_bytes_seed(task, seed, log)
            meta = environment(started, load_before, args.seeds[: index + 1], args.threads)
            result["equal_bytes"] = dict(meta=meta, runs=runs)
            with open(args.out + ".json", "w") as f:
                json.dump(result, f, indent=1)
            with open(args.out + ".md", "w") as f:
                f.write(render(result))
        return
    runs, rows = [], None
    for seed in args.seeds:
        seed_runs, rows = run_seed(task, seed, log)
        runs += seed_runs
    train_set = task.split.train
    meta = dict(
        environment(started, load_before, args.seeds, args.threads),
        rows=rows,
        full_fp32_bytes=(train_set.num_users + train_set.num_items) * rows["dim"] * 4,
        old_layout=OLD_LAYOUT,
    )
    result = dict(meta=meta, runs=runs)
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            kept = json.load(f).get("equal_bytes")
        if kept is not None:
            result["equal_bytes"] = kept
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(render(result))


if __name__ == "__main__":
    main()
