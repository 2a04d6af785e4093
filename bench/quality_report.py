"""Markdown summary and PNG plot of a ``bench/quality.py`` result.

    python bench/quality_report.py bench/results/quality_cpu.json   # re-render the .md and .png
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def _task_table(rows: list, task: str) -> str:
    metrics = METRICS[task]
    headers = ["table", "emb. params", "emb. bytes", "params vs full"]
    headers += [m.upper() for m in metrics] + [f"{m.upper()} / full" for m in metrics] + ["best epoch", "s / run"]
    body = []
    for r in rows:
        line = [r["label"], f"{r['embedding_params']:,}", _size(r["embedding_bytes"])]
        line.append(f"{r['embedding_params_vs_full']:.3f}")
        line += [_pm(r["test"][m]) for m in metrics]
        line += [f"{r['kept_vs_full'][m]:.3f}" for m in metrics]
        line += [f"{r['best_epoch']['mean']:.0f}", f"{r['seconds']['mean']:.1f}"]
        body.append(line)
    return markdown_table(headers, body)


def _chosen(pick_name: str) -> str:
    if pick_name.startswith("variant"):
        return " (best variant on validation)"
    return " (k chosen on validation)" if pick_name.endswith("best_k") else ""


def _headline_table(headline: dict) -> str:
    headers = ["dataset", "task", "metric", "table", "test (mean ± std)", "kept vs full"]
    body = []
    for dataset, tasks in headline.items():
        for task, picks in tasks.items():
            shown = set()
            for name, pick in picks.items():
                if pick["label"] in shown:  # validation chose the k already shown
                    continue
                shown.add(pick["label"])
                for m in METRICS[task][:2]:
                    body.append([dataset, task, m.upper(), pick["label"] + _chosen(name),
                                 _pm(pick["test"][m]), f"{pick['kept_vs_full'][m]:.3f}"])  # fmt: skip
    return markdown_table(headers, body)


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
        f"Command: `{payload['command']}` ({payload['wall_seconds']:.0f} s wall, "
        f"{payload['repeats']} repeats per table).",
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
    out += ["", f"## At ratio {payload['headline_ratio']:g}", "", _headline_table(payload["headline"]), ""]
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
    """Compressed tables grouped into lines: one per (kind, k), across ratios."""
    lines: dict = {}
    for r in rows:
        if r["kind"] not in ("full", "none"):
            lines.setdefault((r["kind"], r["k"]), []).append(r)
    return {key: sorted(v, key=lambda r: r["embedding_params"]) for key, v in lines.items()}


def _panel(ax, rows: list, metric: str) -> None:
    from matplotlib.ticker import NullFormatter

    for (kind, k), line in sorted(_series(rows).items()):
        xs = [r["embedding_params"] for r in line]
        ys = [r["test"][metric]["mean"] for r in line]
        es = [r["test"][metric]["std"] for r in line]
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=f"{kind} k={k}")
    for r in rows:
        stat = r["test"][metric]
        if r["kind"] == "full":
            ax.errorbar([r["embedding_params"]], [stat["mean"]], yerr=[stat["std"]], marker="*", ms=12,
                        color="black", linestyle="none", label="full table")  # fmt: skip
        elif r["kind"] == "none":
            ax.axhline(stat["mean"], color="gray", linestyle="--", linewidth=1, label="biases only")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short decade
    ax.set_xlabel("embedding parameters (users + items)")
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
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    env = payload["environment"]
    fig.suptitle(f"Quality vs parameters (mean ± std over {payload['repeats']} repeats); "
                 f"{env['date'][:10]}, {env['cpu']}, torch {env['torch']}", fontsize=9)  # fmt: skip
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
