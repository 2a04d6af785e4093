"""Markdown summary and PNG plot of a ``bench/studies/quality.py`` result.

python bench/studies/quality_report.py bench/results/quality_cpu.json   # re-render the .md and .png
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.common import markdown_table  # noqa: E402

METRICS = {"implicit": ("auc", "mrr", "hr@10"), "ratings": ("rmse",)}
TASK_TITLES = {
    "implicit": "implicit feedback, BPR-MF, full ranking of the held-out item",
    "ratings": "explicit ratings, biased MF",
}


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1024:.1f} KiB"


def _hyper(row: dict) -> str:
    hp = row.get("hyper") or {}
    return f"{hp['lr']:g} / {hp['l2']:g}" if hp.get("lr") is not None else "-"


def _bytes_vs_full(row: dict) -> float:
    # Older results recorded parameters only.
    return row.get("embedding_bytes_vs_full", row["embedding_params_vs_full"])


def _gain(row: dict, metric: str) -> str:
    gain = row.get("gain_kept", {}).get(metric)
    return "-" if gain is None else f"{gain:.3f}"


def _task_table(rows: list, task: str) -> str:
    metrics = METRICS[task]
    headers = ["table", "emb. params", "emb. bytes", "bytes vs full", "lr / L2"]
    headers += [m.upper() for m in metrics] + [f"{m.upper()} / full" for m in metrics]
    headers += [f"{metrics[0].upper()} gain kept", "best epoch", "s / run"]
    body = []
    for r in rows:
        line = [r["label"], f"{r['embedding_params']:,}", _size(r["embedding_bytes"])]
        line += [f"{_bytes_vs_full(r):.3f}", _hyper(r)]
        line += [_pm(r["test"][m]) for m in metrics]
        line += [f"{r['kept_vs_full'][m]:.3f}" for m in metrics]
        line += [_gain(r, metrics[0]), f"{r['best_epoch']['mean']:.0f}", f"{r['seconds']['mean']:.1f}"]
        body.append(line)
    return markdown_table(headers, body)


def _chosen(pick_name: str) -> str:
    if pick_name.startswith("variant"):
        return " (best variant on validation)"
    if pick_name.startswith("layout"):
        return " (best layout on validation)"
    return " (k chosen on validation)" if pick_name.endswith("best_k") else ""


def _headline_table(headline: dict) -> str:
    headers = [
        "dataset",
        "task",
        "table",
        "emb. bytes",
        "bytes vs full",
        "lr / L2",
        "metric",
        "test (mean ± std)",
        "/ full",
        "gain kept",
    ]
    body = []
    for dataset, tasks in headline.items():
        for task, picks in tasks.items():
            shown = set()
            for name, pick in picks.items():
                if name == "verdict" or pick["label"] in shown:  # validation chose the k already shown
                    continue
                shown.add(pick["label"])
                m = METRICS[task][0]
                size = (
                    [_size(pick["embedding_bytes"]), f"{pick['embedding_bytes_vs_full']:.3f}"]
                    if "embedding_bytes" in pick
                    else ["-", "-"]
                )
                body.append(
                    [
                        dataset,
                        task,
                        pick["label"] + _chosen(name),
                        *size,
                        _hyper(pick),
                        m.upper(),
                        _pm(pick["test"][m]),
                        f"{pick['kept_vs_full'][m]:.3f}",
                        _gain(pick, m),
                    ]
                )
    return markdown_table(headers, body)


def _verdicts(headline: dict) -> list:
    lines = []
    for dataset, tasks in headline.items():
        for task, picks in tasks.items():
            v = picks.get("verdict")
            if not v:
                continue
            margins = ", ".join(f"{name} {m:+.4f}" for name, m in v["margin_over"].items())
            beats = (
                "beats every equal-bytes baseline"
                if v["beats_every_baseline"]
                else "does NOT beat every equal-bytes baseline"
            )
            lines.append(
                f"- {dataset} {task}: best {v['best']} keeps "
                f"{v['kept_vs_full']:.3f} of the full table's {v['metric'].upper()} and {beats} "
                f"(test margin over: {margins})"
            )
    return lines


def render_markdown(payload: dict) -> str:
    env = payload["environment"]
    hw = f"{env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}"
    if env.get("gpu"):
        hw += f", GPU {env['gpu']} (CUDA {env['cuda']})"
    out = [
        "# Bloom embeddings: quality versus compression",
        "",
        f"Recorded {env['date']} on {hw}; Python {env['python']}, torch {env['torch']}, "
        f"triton {env['triton']}, {env['platform']}.",
        "",
        f"Command: `{payload['command']}` ({payload['wall_seconds']:.0f} s wall"
        + (f", {payload['cpu_seconds']:.0f} s CPU" if "cpu_seconds" in payload else "")
        + f", {payload['repeats']} repeats per table).",
        "",
        "Protocol:",
        "",
    ]
    out += [f"- {key}: {text}" for key, text in payload["protocol"].items()]
    out += [f"- hyperparameters ({task}): {hp}" for task, hp in payload["hyperparameters"].items()]
    out += ["", "Datasets:", ""]
    for name, d in payload["datasets"].items():
        splits = "; ".join(f"{t}: {s}" for t, s in d["splits"].items())
        counts = f"{d['num_users']} users, {d['num_items']} items, {d['num_interactions']} events"
        out.append(f"- {name}: {counts} ({splits})")
    budget = payload.get("headline_budget", payload.get("headline_ratio"))
    out += ["", f"## At {budget:g} of the full table's embedding bytes", "", _headline_table(payload["headline"]), ""]
    out += _verdicts(payload["headline"]) + [""]
    for dataset in payload["datasets"]:
        for task in METRICS:
            rows = [r for r in payload["summary"] if r["dataset"] == dataset and r["task"] == task]
            if rows:
                out += [f"## {dataset}: {TASK_TITLES[task]}", "", _task_table(rows, task), ""]
    out.append("Metrics are test-split means ± sample std over repeats; `/ full` divides by the full table's mean.")
    return "\n".join(out) + "\n"


def write_markdown(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        f.write(render_markdown(payload))


def _series(rows: list) -> dict:
    """Compressed tables grouped into lines: one per (family, k) across
    budgets; each layout is its own point series."""
    lines: dict = {}
    for r in rows:
        family = r.get("family", r["kind"])
        if family == "none" or (family == "full" and r.get("dim") is None):
            continue
        key = (family, r["label"]) if family in ("mixed", "hot", "planner") else (family, r["k"])
        lines.setdefault(key, []).append(r)
    return {key: sorted(v, key=lambda r: r["embedding_bytes"]) for key, v in lines.items()}


def _series_label(family, second) -> str:
    if family in ("mixed", "hot", "planner"):
        return second
    if family == "small":
        return "full table, reduced dim"
    return family if family == "hash" else f"{family} k={second}"


def _panel(ax, rows: list, metric: str) -> None:
    from matplotlib.ticker import NullFormatter

    for (family, second), line in sorted(_series(rows).items(), key=lambda kv: str(kv[0])):
        xs = [r["embedding_bytes"] for r in line]
        ys = [r["test"][metric]["mean"] for r in line]
        es = [r["test"][metric]["std"] for r in line]
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=_series_label(family, second))
    for r in rows:
        stat = r["test"][metric]
        if r["kind"] == "full" and r.get("dim") is None:
            ax.errorbar(
                [r["embedding_bytes"]],
                [stat["mean"]],
                yerr=[stat["std"]],
                marker="*",
                ms=12,
                color="black",
                linestyle="none",
                label="full table",
            )
        elif r["kind"] == "none":
            ax.axhline(stat["mean"], color="gray", linestyle="--", linewidth=1, label="biases only")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short decade
    ax.set_xlabel("embedding bytes (users + items, everything counted)")
    ax.set_ylabel(metric.upper() + (" (lower is better)" if metric == "rmse" else ""))
    ax.grid(True, which="both", alpha=0.3)


def write_plot(path: str, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI machines
    import matplotlib.pyplot as plt

    panels = []
    for dataset in payload["datasets"]:
        for task, metrics in METRICS.items():
            rows = [r for r in payload["summary"] if r["dataset"] == dataset and r["task"] == task]
            panels += [(dataset, task, m, rows) for m in metrics[:2] if rows]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    for ax, (dataset, task, metric, rows) in zip(axes.flat, panels):
        _panel(ax, rows, metric)
        ax.set_title(f"{dataset}, {task}: {metric.upper()}", fontsize=10)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    env = payload["environment"]
    fig.suptitle(
        f"Quality vs bytes (mean ± std over {payload['repeats']} repeats); "
        f"{env['date'][:10]}, {env['cpu']}, torch {env['torch']}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Re-render the .md and .png of a recorded JSON, e.g. after changing the layout."""
    (path,) = argv if argv is not None else sys.argv[1:]
    with open(path) as f:
        payload = json.load(f)
    stem = os.path.splitext(path)[0]
    write_markdown(stem + ".md", payload)
    write_plot(stem + ".png", payload)


if __name__ == "__main__":
    main()
