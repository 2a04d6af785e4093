"""Post-training int8/int4 quantization of trained tables, and "more rows at
fewer bits" against fp32 rows at equal bytes, on the closed-vocabulary
two-tower setup of ``triton-bloom demo --closed --quick`` (its data, model,
training and metrics, imported unchanged from ``triton_bloom/demo.py``).

Per seed it trains five models (float32 throughout) and evaluates each
trained one as is and, where the row says so, quantized after training:

- the full tables (``nn.Embedding`` / ``nn.EmbeddingBag``, dim 32): fp32,
  and its rows quantized the same way as the Bloom tables' (int8, int4);
- Bloom at ``compression_ratio`` 0.2: fp32, ``quantize(bits=8)``, ``quantize(bits=4)``;
- Bloom with as many more rows as int8 (then int4) rows buy at the bytes of
  the fp32 Bloom tables (the most rows whose quantized module, codes, scale
  bytes, scale grid and column offsets, ``embedding_bytes`` counts within
  them), trained in fp32 at that row count, quantized after training;
- a full table of width 6 (0.1875 of the bytes), the closed regime's
  strongest rival at that budget (``docs/studies.md``).

Bytes are the two item tables' (``embedding_bytes`` on the built modules;
for the quantized full tables, the codes and the scale and offset they
would hold), as in the demo.  Run: ``python -m bench.studies.quantized``
(``--seeds 0 1 2``); writes ``bench/results/quantized_cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn as nn
import triton

from triton_bloom import BloomEmbedding, BloomEmbeddingBag, QuantizedBloomEmbedding, embedding_bytes, quantize
from triton_bloom.demo import (
    QUICK_SIZE,
    TwoTower,
    build_model,
    make_dataset,
    metrics,
    model_ranks,
    train_epoch,
    user_vectors,
)
from triton_bloom.quantized_ops import LAYOUT, dequantize_rows, quantize_rows, row_bytes, row_scales

DIM, K, RATIO = 32, 4, 0.2
HISTORY, BATCH, LR, L2 = 16, 2048, 0.01, 1e-4
RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")
# What the first run, in the first format, showed (kept on the page as one sentence).
FIRST_FORMAT = (
    "The first run of this study (commit 1a016cb) used the first quantized format, a bfloat16 scale and offset per "
    "row, and sized the 'more rows' tables at dim + 4 and dim / 2 + 4 bytes a row: Bloom 1.28 in int4 (AUC 0.9040), "
    "the full tables in int4 (0.156 of the bytes, 0.8913) and Bloom 0.711 in int8 (0.8875) came in the same order "
    "as below; its fp32 rows (full, Bloom 0.2, full dim 6) are those of this run to the four digits shown (same seeds, "
    "same code)."
)


def train(model, data, epochs, seed):
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        train_epoch(model, optimizer, data, BATCH, HISTORY, L2, generator)
    return model


def evaluate(model, data):
    """AUC and HR@10 of a trained TwoTower.  A quantized item table is
    scored through its own lookups: its vectors of every item, read once
    into a frozen table (the output side scores modules with parameters)."""
    if isinstance(model.items, QuantizedBloomEmbedding):
        with torch.no_grad():
            vectors = model.items(torch.arange(data.num_items))
        scored = TwoTower(model.history, nn.Embedding.from_pretrained(vectors), data.num_items)
        scored.item_bias = model.item_bias
        model = scored
    with torch.no_grad():
        return metrics(model_ranks(model, data, user_vectors(model, data)), data)


def table_bytes(model) -> int:
    return embedding_bytes(model.history) + embedding_bytes(model.items)


def bloom_model(num_items, num_rows):
    """``build_model``'s Bloom tables, at ``num_rows`` rows instead of a ratio."""
    common = dict(num_rows=num_rows, num_hash_functions=K, padding_idx=None)
    history = BloomEmbeddingBag(num_items, DIM, mode="mean", **common)
    return TwoTower(history, BloomEmbedding(num_items, DIM, **common), num_items)


def rows_at_bytes(num_items, bits, budget):
    """The most rows of a Bloom two-tower whose item tables, quantized to
    ``bits``, hold at most ``budget`` bytes (``embedding_bytes`` of the built
    quantized modules: codes, scale bytes, scale grid, column offsets)."""

    def served(rows):
        return table_bytes(quantize(bloom_model(num_items, rows), bits=bits))

    # Bytes grow by the same amount a row (two tables, each a row of codes and
    # a scale byte); the fixed part is the per-table grid and column offsets.
    per_row = served(2) - served(1)
    if per_row != 2 * (row_bytes(DIM, bits) + 1):
        raise RuntimeError(f"a quantized row costs {per_row // 2} bytes, the format says {row_bytes(DIM, bits) + 1}")
    rows = 1 + (budget - served(1)) // per_row
    if served(rows) > budget or served(rows + 1) <= budget:
        raise RuntimeError(f"{rows} rows at int{bits} miss the budget of {budget} bytes")
    return rows


def fake_quantized_full(model, bits):
    """A copy of ``model`` whose full tables hold each row's dequantised codes
    (what a quantized lookup returns), and the bytes the quantized rows hold."""
    quantized, total = copy.deepcopy(model), 0
    for table in (quantized.history, quantized.items):
        parts = quantize_rows(table.weight, bits)
        total += sum(t.numel() * t.element_size() for t in parts)
        with torch.no_grad():
            table.weight.copy_(dequantize_rows(*parts, bits, table.weight.shape[1]))
    return quantized, total


def scale_inflation(model, bits):
    """Each row's stored scale over the scale of its full range about the
    column offsets, ``max |w - c| / ((2**bits - 1) / 2)`` (below 1 where the
    row's least-error scale clips it): median and maximum over the item table."""
    w = model.items.weight.detach()
    codes, scale_codes, scale_grid, offset = quantize_rows(w, bits)
    exact = (w.double() - offset.double()).abs().amax(1) / ((2**bits - 1) / 2)
    ratio = row_scales(scale_codes, scale_grid).double() / exact
    return float(ratio.median()), float(ratio.max())


def run_seed(seed, size, log):
    data = make_dataset(size["users"], size["items"], seed=seed)
    n, epochs, rows = size["items"], size["epochs"], []

    def record(label, model, kind, bits=None):
        started = time.perf_counter()
        auc, hits = evaluate(model, data)
        rows.append(dict(label=label, kind=kind, bits=bits, auc=auc, hr10=hits, bytes=table_bytes(model)))
        log(f"seed {seed} {label}: AUC {auc:.4f} HR@10 {hits:.4f} ({time.perf_counter() - started:.0f} s eval)")

    def trained(ratio, index, **kwargs):
        torch.manual_seed(seed * 100 + index)
        started = time.perf_counter()
        model = train(build_model(ratio, n, DIM, K, "cpu", **kwargs), data, epochs, seed)
        log(f"seed {seed} trained model {index} in {time.perf_counter() - started:.0f} s")
        return model

    full = trained(None, 0)
    record("full fp32", full, "full")
    for bits in (8, 4):
        quantized, nbytes = fake_quantized_full(full, bits)
        record(f"full int{bits}", quantized, "full", bits)
        rows[-1]["bytes"] = nbytes

    bloom = trained(RATIO, 1)
    record(f"Bloom {RATIO} fp32", bloom, "bloom")
    inflation = {bits: scale_inflation(bloom, bits) for bits in (8, 4)}
    for bits in (8, 4):
        record(f"Bloom {RATIO} int{bits}", quantize(bloom, bits=bits), "bloom", bits)

    # Equal bytes: as many rows as the fp32 Bloom tables' bytes buy at int8
    # (int4), everything the quantized module holds counted.
    budget = table_bytes(bloom)
    for index, bits in ((2, 8), (3, 4)):
        num_rows = rows_at_bytes(n, bits, budget)
        torch.manual_seed(seed * 100 + index)
        started = time.perf_counter()
        more = train(bloom_model(n, num_rows), data, epochs, seed)
        log(f"seed {seed} trained model {index} ({num_rows} rows) in {time.perf_counter() - started:.0f} s")
        label = f"Bloom {num_rows / n:.3g}"
        record(f"{label} fp32", more, "bloom-more-rows")
        record(f"{label} int{bits}", quantize(more, bits=bits), "bloom-more-rows", bits)
        rows[-1]["num_rows"] = rows[-2]["num_rows"] = num_rows

    small = trained(None, 4, small_dim=6)
    record("full dim 6 fp32", small, "small-dim")
    return rows, inflation, data.num_interactions


def summarize(all_rows, full_bytes):
    labels = list(dict.fromkeys(r["label"] for r in all_rows))
    out = []
    for label in labels:
        group = [r for r in all_rows if r["label"] == label]
        aucs, hits = [r["auc"] for r in group], [r["hr10"] for r in group]
        out.append(
            dict(
                label=label,
                bytes_of_full=group[0]["bytes"] / full_bytes,
                auc_mean=statistics.mean(aucs),
                auc_sd=statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                hr10_mean=statistics.mean(hits),
                hr10_sd=statistics.stdev(hits) if len(hits) > 1 else 0.0,
                seeds=len(group),
            )
        )
    return out


def answer(result) -> str:
    """The one-line answer at equal bytes: "fewer rows" (Bloom in fp32),
    "fewer bits" (the full tables in int4) and "both" (Bloom at the rows int4
    buys, in int4), by mean AUC over the seeds, and who wins each seed."""
    ratio = result["meta"]["setup"]["ratio"]
    runs = result["runs"]
    both = next(r["label"] for r in runs if r["kind"] == "bloom-more-rows" and r["bits"] == 4)
    rivals = {
        "fewer rows": f"Bloom {ratio} fp32",
        "fewer bits": "full int4",
        "both": both,
    }
    share = {r["label"]: r["bytes_of_full"] for r in result["summary"]}
    per_seed = {}
    for run in runs:
        per_seed.setdefault(run["seed"], {})[run["label"]] = run
    stats = {}
    for name, label in rivals.items():
        aucs = [per_seed[s][label]["auc"] for s in sorted(per_seed)]
        hits = [per_seed[s][label]["hr10"] for s in sorted(per_seed)]
        sd = statistics.stdev if len(aucs) > 1 else (lambda values: 0.0)
        stats[name] = (statistics.mean(aucs), sd(aucs), statistics.mean(hits), sd(hits))
    order = sorted(rivals, key=lambda name: -stats[name][0])
    wins = sum(1 for s in per_seed if max(rivals, key=lambda name: per_seed[s][rivals[name]]["auc"]) == order[0])
    parts = [
        f'"{name}" ({rivals[name]}, {share[rivals[name]]:.3f} of the bytes): AUC {stats[name][0]:.4f} +- '
        f"{stats[name][1]:.4f}, HR@10 {stats[name][2]:.4f} +- {stats[name][3]:.4f}"
        for name in order
    ]
    return (
        f"**At equal bytes ({ratio} of the full fp32 tables), most accurate first:** " + "; ".join(parts) + f" "
        f'(mean +- sd over {len(per_seed)} seeds; "{order[0]}" has the best AUC of the three on '
        f"{wins} of {len(per_seed)} seeds)."
    )


def render(result) -> str:
    """The Markdown page of a result (the JSON's summary, as measured)."""
    meta, summary = result["meta"], result["summary"]
    setup = meta["setup"]
    full = next(r for r in summary if r["label"] == "full fp32")
    more_rows = ", ".join(
        f"{r['label'][:-5]}: {r['bytes_of_full']:.3f} of the full tables' bytes"
        for r in summary
        if r["label"].startswith("Bloom")
        and r["label"].endswith(" fp32")
        and r["label"] != f"Bloom {setup['ratio']} fp32"
    )
    lines = [
        "# Quantized tables: post-training int8/int4, and more rows at fewer bits (CPU)",
        "",
        f"Measured {meta['date']} on {meta['cpu']} (2 cores shared with other work: load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after), torch {meta['torch']}, "
        f"triton {meta['triton']}, {meta['seconds'] / 60:.0f} min.  Produced by `python -m bench.studies.quantized "
        f"--seeds {' '.join(map(str, meta['seeds']))} --threads {meta.get('threads', '?')}` "
        "(`bench/studies/quantized.py`).",
        "",
        f"Setup: the closed-vocabulary two-tower model of `triton-bloom demo --closed --quick` "
        f"({setup['users']:,} users x {setup['items']:,} items, {setup['interactions']:,} interactions, one per user "
        f"held out; dim {setup['dim']}, k={setup['k']}, BPR, Adam lr {setup['lr']}, batch {setup['batch']}, "
        f"{setup['epochs']} epochs), seeds {', '.join(map(str, meta['seeds']))} (data, init and sampling per seed).  "
        "Every model trains in float32; int8/int4 rows are quantized after training (the format of "
        f"`quantize`: {meta.get('layout', 'rowwise-asymmetric, bfloat16 scale and offset per row')}) and evaluated through the quantized lookups.  Bytes: the two item "
        "tables, everything they hold (`embedding_bytes` of the built modules: codes, scale bytes, scale grid, "
        "column offsets), as a share of the full fp32 tables.  AUC and HR@10: the held-out item "
        "against every unseen item, mean +- standard deviation over the seeds.  The bytes are the served "
        "model's: the 'more rows' Bloom tables train in fp32 at their full row count "
        f"({more_rows}), so at training time they cost more, not the same.  Every model uses "
        "the demo's hyperparameters, untuned for any of them.",
        "",
        FIRST_FORMAT,
        "",
        "| model | bytes / full fp32 | AUC | AUC / full fp32 | HR@10 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['label']} | {r['bytes_of_full']:.4f} | {r['auc_mean']:.4f} +- {r['auc_sd']:.4f} | "
            f"{r['auc_mean'] / full['auc_mean']:.3f} | {r['hr10_mean']:.4f} +- {r['hr10_sd']:.4f} |"
        )
    per_seed = {}
    for run in result["runs"]:
        per_seed.setdefault(run["seed"], {})[run["label"]] = run["auc"]
    lines += ["", "Post-training quantization, the change in AUC on the same trained model, per seed:", ""]
    pairs = [(f"Bloom {setup['ratio']} fp32", f"Bloom {setup['ratio']} int{b}") for b in (8, 4)]
    pairs += [("full fp32", f"full int{b}") for b in (8, 4)]
    pairs += [
        (r["label"].replace(" int8", " fp32").replace(" int4", " fp32"), r["label"])
        for r in summary
        if r["label"].startswith("Bloom")
        and not r["label"].startswith(f"Bloom {setup['ratio']} ")
        and "int" in r["label"]
    ]
    for base, quantized in pairs:
        deltas = [per_seed[s][quantized] - per_seed[s][base] for s in sorted(per_seed)]
        lines.append(f"- {quantized} vs {base}: " + ", ".join(f"{d:+.4f}" for d in deltas))
    budget = setup["ratio"] * 1.0001
    within = sorted((r for r in summary if r["bytes_of_full"] <= budget), key=lambda r: -r["auc_mean"])
    lines += ["", f"Within {setup['ratio']} of the full tables' bytes, by AUC (the layouts a user would compare):", ""]
    lines += [
        f"{i + 1}. {r['label']} ({r['bytes_of_full']:.3f} of the bytes): AUC {r['auc_mean']:.4f}, "
        f"HR@10 {r['hr10_mean']:.4f}"
        for i, r in enumerate(within)
    ]
    lines += ["", answer(result)]
    inflation = result["scale_inflation"]
    worst = {b: max(i[b][1] for i in inflation) for b in ("8", "4")}
    median = {b: statistics.median(i[b][0] for i in inflation) for b in ("8", "4")}
    lines += [
        "",
        "The stored scale of a row over the scale of its full range (int4/int8 levels) in the "
        f"trained Bloom 0.2 item table: median {median['8']:.4f} (int8) and {median['4']:.4f} (int4), "
        f"largest {worst['8']:.4f} and {worst['4']:.4f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=QUICK_SIZE["epochs"])
    parser.add_argument("--out", default=os.path.join(RESULTS, "quantized_cpu"))
    parser.add_argument("--render", action="store_true", help="only write OUT.md from OUT.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shares the machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render:
        with open(args.out + ".json") as f:
            result = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(render(result))
        return
    size = dict(QUICK_SIZE, epochs=args.epochs)
    started = time.perf_counter()
    load_before = os.getloadavg()

    def log(line):
        print(line, flush=True)

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    all_rows, inflations, summary = [], [], None
    # Written after every seed, so that a run cut short still leaves its seeds.
    for index, seed in enumerate(args.seeds):
        rows, inflation, interactions = run_seed(seed, size, log)
        for r in rows:
            r["seed"] = seed
        all_rows += rows
        inflations.append(inflation)
        full_bytes = next(r["bytes"] for r in all_rows if r["label"] == "full fp32")
        summary = summarize(all_rows, full_bytes)
        meta = dict(
            date=datetime.date.today().isoformat(),
            cpu=model_name,
            python=platform.python_version(),
            torch=torch.__version__,
            triton=triton.__version__,
            load_before=load_before,
            load_after=os.getloadavg(),
            seconds=round(time.perf_counter() - started),
            setup=dict(size, interactions=interactions, dim=DIM, k=K, ratio=RATIO, history=HISTORY, batch=BATCH, lr=LR),
            seeds=args.seeds[: index + 1],
            threads=args.threads,
            layout=LAYOUT,
        )
        # Through JSON, so that the page renders from what the file holds (string keys).
        result = json.loads(json.dumps(dict(meta=meta, summary=summary, runs=all_rows, scale_inflation=inflations)))
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(render(result))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
