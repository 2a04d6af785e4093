"""The main demo: embeddings of an open id space at a budget below one
float per distinct id, the regime Bloom embeddings were made for.

The data (``triton_bloom/demo_stream.py``): a synthetic event log with raw
64-bit item ids, a catalogue of millions of items with Zipf popularity,
new items born while the log runs, users with planted topic tastes; split
by time into train (the first 70%), validation (the next 10%) and test
(the last 20%), so that the test holds items seen rarely or never.

The model: a two-tower recommender whose user is the mean of the vectors
of their last 8 items and whose item is its vector, both from one
embedding layer; no per-id bias (a float per id is over budget here),
for every layer alike.  Trained in one pass over the training events in
time order, as a stream is, with in-batch sampled softmax (the other
events' items of a batch of 1024 are the negatives) and SparseAdam.

The layers, at one byte budget of 2 B (half a float) per distinct item id
of the training part, everything counted by ``embedding_bytes`` (rows, hot
ids and id maps at 8 B per id): a vocabulary table of the most frequent
ids with an out-of-vocabulary row, the hashing trick (k=1),
quotient-remainder embeddings, plain Bloom (k=2, k=4), Bloom with hot
rows for the most frequent ids at several shares of the budget, and the
layout the planner picks for the budget; and the full table of every
training id, over budget, as the upper bound.  Each layer's learning rate
is the best of a small grid on the validation split (HR@10).

The metrics: each scored event's item is ranked against 100 items drawn
from the same split's events (popularity-sampled, new items included), a
tie counting half; AUC is the share of those ranked below it, HR@10
whether it makes the top ten (its expectation over a random order of tied
items: an out-of-vocabulary row ties every unknown item).  "rare": events whose item was seen at most
5 times in training (unseen included); "head": whose item is among the
most frequent that make half of the training events.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from .demo_layers import layer_specs, served
from .demo_stream import FULL, QUICK, eval_set, make_stream
from .modules import embedding_bytes
from .ranking import ranking_metrics
from .terminal import cpu_model, progress

LEARNING_RATES = (0.01, 0.03, 0.1)
QUICK_LEARNING_RATES = (0.03,)
EMBEDDING_DIM = 32
BATCH = 1024
BYTES_PER_ID = 2  # the budget: half a float per distinct training id


# ---------------------------------------------------------------------------
# training and scoring


def user_vectors(layer, history: torch.Tensor, mask: torch.Tensor, extra=None):
    """Mean of each row's valid history vectors, ``(B, d)``; with ``extra``
    ids, their vectors too, looked up in the same call (one hashing pass)."""
    flat = history[mask]
    ids = flat if extra is None else torch.cat([flat, extra.reshape(-1)])
    vectors = layer(ids)
    rows = mask.nonzero()[:, 0]
    sums = vectors.new_zeros(history.shape[0], vectors.shape[-1]).index_add_(0, rows, vectors[: flat.numel()])
    users = sums / mask.sum(1, keepdim=True).clamp(min=1).to(sums.dtype)
    return users if extra is None else (users, vectors[flat.numel() :].reshape(*extra.shape, -1))


def train(layer, stream, events, lr, batch=BATCH, on_step=None):
    """One pass over ``events`` in time order; returns the step times (s)
    and the layer's bytes with its optimizer state.  Tables with sparse
    gradients train with SparseAdam; parameters whose gradient is dense
    (Bloom's importance weights) with Adam at the same rate, made at the
    first step, once the gradients say which is which."""
    optimizers = None
    seconds = []
    for start in range(0, events.numel(), batch):
        tick = time.perf_counter()
        chunk = events[start : start + batch]
        history = stream.history[chunk].long()
        mask = history >= 0
        history = stream.raw_ids[history.clamp(min=0)]
        targets = stream.raw_ids[stream.item[chunk]]
        users, items = user_vectors(layer, history, mask, extra=targets)
        logits = users @ items.T
        # The same item twice in a batch is no negative of itself.
        same = targets[:, None] == targets[None, :]
        same.fill_diagonal_(False)
        loss = F.cross_entropy(logits.masked_fill(same, float("-inf")), torch.arange(chunk.numel()))
        for p in layer.parameters():
            p.grad = None
        loss.backward()
        if optimizers is None:
            params = [p for p in layer.parameters() if p.grad is not None]
            sparse = [p for p in params if p.grad.is_sparse]
            dense = [p for p in params if not p.grad.is_sparse]
            optimizers = [torch.optim.SparseAdam(sparse, lr=lr)] if sparse else []
            optimizers += [torch.optim.Adam(dense, lr=lr)] if dense else []
        for optimizer in optimizers:
            optimizer.step()
        seconds.append(time.perf_counter() - tick)
        if on_step is not None:
            on_step(float(loss.detach()))
    state = sum(
        v.numel() * v.element_size()
        for optimizer in optimizers or []
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return seconds, embedding_bytes(layer) + state


@torch.no_grad()
def evaluate(layer, data, chunk=2048) -> dict:
    """AUC and HR@10 of ``data`` (an :class:`EvalSet`) overall, on its rare
    and on its head events."""
    greater, ties, negatives = [], [], []
    for start in range(0, data.candidates.shape[0], chunk):
        part = slice(start, start + chunk)
        users, items = user_vectors(layer, data.history[part], data.history_mask[part], extra=data.candidates[part])
        scores = (items * users[:, None, :]).sum(-1)
        target, others = scores[:, :1], scores[:, 1:]
        valid = data.candidates[part, 1:] != data.candidates[part, :1]
        greater.append(((others > target) & valid).sum(1))
        ties.append(((others == target) & valid).sum(1))
        negatives.append(valid.sum(1))
    greater, ties = torch.cat(greater).double(), torch.cat(ties).double()
    per_event = ranking_metrics(greater + ties / 2, torch.cat(negatives).double(), 10)
    # A tie is a coin flip, so the hit is its expectation over a random order
    # of the tied items: with g items above and t tied, the target is one of
    # t + 1 equally likely places from g on.  (The rank with ties counting half
    # would score 0 for a target tied with ten others: an out-of-vocabulary
    # row, or a hashing-trick row that 60 ids share, would be under-counted.)
    per_event["hr@10"] = ((10 - greater) / (ties + 1)).clamp(0, 1)
    out = {}
    for name, where in (("", None), ("_rare", data.rare), ("_head", data.head)):
        for metric in ("auc", "hr@10"):
            values = per_event[metric] if where is None else per_event[metric][where]
            out[metric + name] = values.mean().item() if values.numel() else float("nan")
    return out


def _signature(layer, bits=None):
    """Layers with the same signature are the same layout (the planner's
    choice may be one of the listed rows): trained once."""
    hot = getattr(layer, "hot_ids", None)
    return (
        bits,
        type(layer).__name__,
        getattr(layer, "num_rows", None),
        getattr(layer, "num_hash_functions", None),
        None if hot is None else (hot.numel(), int(hot.sum())),
        getattr(layer, "private", None) is not None,
        embedding_bytes(layer),
    )


# ---------------------------------------------------------------------------
# one run


def run_once(seed, quick=False, say=print, learning_rates=None, config=None) -> dict:
    """Generate the stream of ``seed``, train and score every layer; returns
    the payload (``models``: one dict per row; ``verdict``, ``winner``).
    ``config`` replaces the stream's sizes (tests)."""
    config = config or (QUICK if quick else FULL)
    grid = learning_rates or (QUICK_LEARNING_RATES if quick else LEARNING_RATES)
    started = time.perf_counter()
    bar = progress(total=5, desc="data", unit="stage")
    stream = make_stream(config, seed, progress=lambda stage: (bar.set_postfix_str(stage), bar.update(1)))
    ids, counts = stream.train_counts()
    train_events = stream.split("train")
    bar.set_postfix_str("scored events")
    valid = eval_set(stream, "valid", config.eval_events // 2, seed + 1)
    test = eval_set(stream, "test", config.eval_events, seed + 2)
    bar.update(1)
    bar.close()
    budget = BYTES_PER_ID * ids.numel()
    seen = torch.zeros(config.items, dtype=torch.bool)
    seen[stream.item] = True
    data = {
        "catalogue": config.items,
        "events": config.events,
        "users": config.users,
        "distinct_items_in_log": int(seen.sum()),
        "distinct_train_ids": ids.numel(),
        "train_events": train_events.numel(),
        "test_rare_share": test.rare.double().mean().item(),
        "test_head_share": test.head.double().mean().item(),
        "data_seconds": time.perf_counter() - started,
    }
    say(
        f"Data (seed {seed}): {config.events:,} events of {config.users:,} users over a catalogue of "
        f"{config.items:,} raw int64 item ids, {data['distinct_items_in_log']:,} of them in the log; "
        f"train on the first {config.train_until:.0%} ({data['distinct_train_ids']:,} distinct ids), test on "
        f"the last {1 - config.valid_until:.0%} ({data['test_rare_share']:.0%} of its events on items seen "
        f"at most {config.rare_max} times in training).  Budget: {BYTES_PER_ID} B per distinct training id = "
        f"{budget:,} B ({budget / (ids.numel() * EMBEDDING_DIM * 4):.4f} of the full table)."
    )

    specs = layer_specs(ids, counts, EMBEDDING_DIM, budget)
    steps = math.ceil(train_events.numel() / BATCH)
    bar = progress(total=len(specs) * len(grid) * steps, desc="training", unit="step")
    rows, trained, plan = [], {}, None
    try:
        for index, (label, build, over) in enumerate(specs):
            if hasattr(build, "plan"):
                plan = build.plan
            torch.manual_seed(1000 * seed + index)
            bits = getattr(build, "bits", None)
            signature = _signature(build(True), bits)
            if signature in trained:
                rows.append(dict(trained[signature], label=label, same_as=trained[signature]["label"]))
                bar.update(len(grid) * steps)
                continue
            runs = []
            for lr in grid:
                torch.manual_seed(1000 * seed + index)  # the same initial table for every rate
                layer = build(True)

                def on_step(loss, label=label, lr=lr):
                    bar.set_postfix_str(f"{label}, lr {lr:g}, loss {loss:.3f}", refresh=False)
                    bar.update(1)

                seconds, state = train(layer, stream, train_events, lr, on_step=on_step)
                bar.set_postfix_str(f"{label}, lr {lr:g}: scoring")
                run = dict(lr=lr, step_ms=1000 * statistics.median(seconds), train_mib=state / 2**20)
                if bits:
                    # Served quantized: scored (and its rate chosen) as served,
                    # and the float table it came from kept for comparison.
                    run.update(trained_test=evaluate(layer, test), trained_bytes=embedding_bytes(layer))
                    layer = served(layer, bits)
                run.update(valid=evaluate(layer, valid), test=evaluate(layer, test), bytes=embedding_bytes(layer))
                runs.append(run)
                del layer
            best = max(runs, key=lambda r: r["valid"]["hr@10"])
            row = dict(
                label=label,
                bytes=best["bytes"],
                budget_bytes=budget,
                over_budget=over,
                lr=best["lr"],
                **best["test"],
                step_ms=best["step_ms"],
                train_mib=best["train_mib"],
                valid_hr10_by_lr={str(r["lr"]): r["valid"]["hr@10"] for r in runs},
            )
            if bits:
                row.update(bits=bits, trained_test=best["trained_test"], trained_bytes=best["trained_bytes"])
            assert over or row["bytes"] <= budget, (label, row["bytes"], budget)
            trained[signature] = row
            rows.append(row)
    finally:
        bar.close()
    payload = dict(
        seed=seed,
        quick=quick,
        budget_bytes=budget,
        embedding_dim=EMBEDDING_DIM,
        learning_rates=list(grid),
        data=data,
        config=dict(vars(config)) if hasattr(config, "__dict__") else None,
        models=rows,
        plan=str(plan) if plan is not None else None,
        seconds=time.perf_counter() - started,
        machine=dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__),
        python=platform.python_version(),
    )
    payload["verdict"], payload["winner"] = verdict(rows)
    return payload


# ---------------------------------------------------------------------------
# the verdict


def in_budget(rows):
    return [r for r in rows if not r["over_budget"]]


RIVALS = ("vocab", "hashing trick", "quotient-remainder")  # what a user tries before Bloom


def verdict(rows, metric="hr@10") -> tuple[str, str]:
    """One sentence from this run's numbers: the best in-budget layer by test
    ``metric``, by how much it leads the runner-up, the planner's choice
    against the best rival a user would try first, and plain Bloom against
    the hashing trick."""
    distinct = [r for r in in_budget(rows) if "same_as" not in r]  # a row that repeats another layout is no rival
    ranked = sorted(distinct, key=lambda r: r[metric], reverse=True)
    best = ranked[0]
    planner = next((r for r in rows if r["label"].startswith("planner")), None)
    name = best["label"]
    if planner is not None and planner.get("same_as") == name:
        name += " (the planner's choice)"
    text = f"Best at this budget: {name}, HR@10 {best[metric]:.4f}"
    if len(ranked) > 1:
        text += f", {best[metric] - ranked[1][metric]:+.4f} over {ranked[1]['label']}"
    text += "."
    rivals = [r for r in rows if r["label"].startswith(RIVALS)]
    if planner is not None and rivals:
        rival = max(rivals, key=lambda r: r[metric])
        lead = planner[metric] - rival[metric]
        where = "ahead of" if lead > 0 else "behind" if lead < 0 else "level with"
        text += (
            f"  The planner's choice is {where} the best rival a user tries first ({rival['label']}): "
            f"{lead:+.4f} HR@10 (head {planner['hr@10_head'] - rival['hr@10_head']:+.4f}), "
            f"{planner['auc'] - rival['auc']:+.4f} AUC (one seed; see --seeds for the spread)."
        )
    quantized = [r for r in rows if r.get("bits") and "same_as" not in r]
    planner_q = next((r for r in quantized if " planner" in r["label"]), None)
    rivals_q = [r for r in quantized if r["label"].partition(" ")[2].startswith(RIVALS)]
    if planner_q is not None and rivals_q:
        rival = max(rivals_q, key=lambda r: r[metric])
        bits = planner_q["bits"]
        text += (
            f"  Served at int{bits} (trained in float32 at {planner_q['trained_bytes'] / planner_q['bytes']:.1f}x "
            f"the bytes): the planner's layout {planner_q[metric] - rival[metric]:+.4f} HR@10 against "
            f"{rival['label']} (head {planner_q['hr@10_head'] - rival['hr@10_head']:+.4f})"
        )
        if planner is not None:
            text += f", {planner_q[metric] - planner[metric]:+.4f} against its float32 layout"
        text += "."
    bloom = [r for r in rows if r["label"].startswith("Bloom k=")]
    hashing = next((r for r in rows if r["label"].startswith("hashing")), None)
    if bloom and hashing is not None:
        top = max(bloom, key=lambda r: r[metric])
        text += f"  Plain {top['label']}: {top[metric] - hashing[metric]:+.4f} against the hashing trick."
    return text, best["label"]


def save_json(path, payload) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=False)
        f.write("\n")


# ---------------------------------------------------------------------------
# the command


def run_open(args) -> int:
    """``python -m triton_bloom demo``: one run per data seed, their tables,
    the summary over seeds and the verdict; ``--out`` writes the JSON."""
    import datetime
    import os

    from . import demo_report as report
    from .terminal import console

    if args.threads:
        torch.set_num_threads(args.threads)
    screen = console()

    def say(text=""):
        # Prose is cut at 80 columns between words (a terminal would cut a number); tables already fit.
        screen.print(report.wrap(text), markup=False)

    def table(text):
        screen.print(text, markup=False)

    seeds = list(dict.fromkeys(args.seeds if args.seeds is not None else [args.seed]))
    started = time.perf_counter()
    say(
        f"Open ids below one float per id: {len(seeds)} data seed(s), "
        f"{'--quick sizes, one learning rate' if args.quick else 'learning rate tuned on validation'}; "
        f"{cpu_model()}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}."
    )
    payloads = []
    for seed in seeds:
        payload = run_once(seed, quick=args.quick, say=say)
        payloads.append(payload)
        rows = payload["models"]
        say("\nAccuracy on the test (last 20% of the log); * over budget:")
        table(report.accuracy_table(rows))
        say("\nCost (train MiB: the layer's parameters, buffers and optimizer state):")
        table(report.cost_table(rows))
        bits = next((r["bits"] for r in rows if r.get("bits")), None)
        if bits:
            say(
                f"\nServed quantized (int{bits} rows: trained in float32 with the rows int{bits} buys at the "
                "budget, quantized after training; their bytes and accuracy above are the served layer's):"
            )
            table(report.quantized_table(rows))
        if payload["plan"]:
            say("\n" + payload["plan"])
        say(f"\nVerdict (seed {seed}): {payload['verdict']}")
    result = dict(payloads[0]) if len(payloads) == 1 else {}
    if len(payloads) > 1:
        summary = report.summarize(payloads)
        say(f"\nMean ± std over seeds {seeds}:")
        table(report.summary_table(summary))
        say("\nPaired by seed, the planner's choice minus each row:")
        table(report.paired_table(summary))
        text = report.seeds_verdict(summary)
        say("\nVerdict: " + text)
        winner = max(
            (k for k, v in summary["rows"].items() if not v["over_budget"]),
            key=lambda k: summary["rows"][k]["hr@10"]["mean"],
        )
        result = dict(
            runs=payloads,
            summary=summary,
            models=[
                dict(
                    label=k,
                    bytes=payloads[0]["models"][i]["bytes"],
                    budget_bytes=payloads[0]["budget_bytes"],
                    over_budget=v["over_budget"],
                    **{m: v[m]["mean"] for m in report.METRICS + ("step_ms",)},
                )
                for i, (k, v) in enumerate(summary["rows"].items())
            ],
            verdict=text,
            winner=winner,
        )
    seconds = time.perf_counter() - started
    result.update(
        command="python -m triton_bloom demo" + (" --quick" if args.quick else ""),
        seeds=seeds,
        wall_seconds=seconds,
        load_average=list(os.getloadavg()),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    say(f"Done in {seconds:.0f} s.")
    if args.out:
        save_json(args.out, result)
        say(f"Wrote {args.out}.")
    return 0
