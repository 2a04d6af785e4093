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
  the fp32 Bloom table, trained in fp32, quantized after training;
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

from triton_bloom import QuantizedBloomEmbedding, embedding_bytes, quantize
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
from triton_bloom.quantized_ops import LAYOUT, dequantize_rows, quantize_rows, row_scales

DIM, K, RATIO = 32, 4, 0.2
HISTORY, BATCH, LR, L2 = 16, 2048, 0.01, 1e-4
RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")


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

    # Equal bytes: rows of dim + 1 (int8) or dim / 2 + 1 (int4) bytes instead of 4 * dim.
    for index, bits in ((2, 8), (3, 4)):
        row = DIM * bits // 8 + 1
        ratio = RATIO * 4 * DIM / row
        more = trained(ratio, index)
        record(f"Bloom {ratio:.3g} fp32", more, "bloom-more-rows")
        record(f"Bloom {ratio:.3g} int{bits}", quantize(more, bits=bits), "bloom-more-rows", bits)

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


def render(result) -> str:
    """The Markdown page of a result (the JSON's summary, as measured)."""
    meta, summary = result["meta"], result["summary"]
    setup = meta["setup"]
    full = next(r for r in summary if r["label"] == "full fp32")
    lines = [
        "# Quantized tables: post-training int8/int4, and more rows at fewer bits (CPU)",
        "",
        f"Measured {meta['date']} on {meta['cpu']} (2 cores shared with other work: load average "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after), torch {meta['torch']}, "
        f"triton {meta['triton']}, {meta['seconds'] / 60:.0f} min.  Produced by `python -m bench.studies.quantized` "
        "(`bench/studies/quantized.py`).",
        "",
        f"Setup: the closed-vocabulary two-tower model of `triton-bloom demo --closed --quick` "
        f"({setup['users']:,} users x {setup['items']:,} items, {setup['interactions']:,} interactions, one per user "
        f"held out; dim {setup['dim']}, k={setup['k']}, BPR, Adam lr {setup['lr']}, batch {setup['batch']}, "
        f"{setup['epochs']} epochs), seeds {', '.join(map(str, meta['seeds']))} (data, init and sampling per seed).  "
        "Every model trains in float32; int8/int4 rows are quantized after training (the format of "
        f"`quantize`: {meta.get('layout', 'rowwise-asymmetric, bfloat16 scale and offset per row')}) and evaluated through the quantized lookups.  Bytes: the two item "
        "tables, everything they hold, as a share of the full fp32 tables.  AUC and HR@10: the held-out item "
        "against every unseen item, mean +- standard deviation over the seeds.  The bytes are the served "
        "model's: the 'more rows' Bloom tables train in fp32 at their full row count (1.28 of the full "
        "tables' bytes for Bloom 1.28), so at training time they cost more, not the same.  Every model uses "
        "the demo's hyperparameters, untuned for any of them.",
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
    args = parser.parse_args(argv)
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

    all_rows, inflations, interactions = [], [], None
    for seed in args.seeds:
        rows, inflation, interactions = run_seed(seed, size, log)
        for r in rows:
            r["seed"] = seed
        all_rows += rows
        inflations.append(inflation)
    full_bytes = next(r["bytes"] for r in all_rows if r["label"] == "full fp32")
    summary = summarize(all_rows, full_bytes)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
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
        seeds=args.seeds,
        layout=LAYOUT,
    )
    result = dict(meta=meta, summary=summary, runs=all_rows, scale_inflation=inflations)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(render(result))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
