"""What the open-id demo prints: plain-text tables that fit 80 columns
(no number wraps in a captured log or a default terminal), the summary
over data seeds with paired differences, and the verdict lines."""

from __future__ import annotations

import math
import statistics
import textwrap

WIDTH = 80
METRICS = ("auc", "hr@10", "auc_rare", "hr@10_rare", "auc_head", "hr@10_head")


def wrap(text: str, width: int = WIDTH) -> str:
    """Prose cut at ``width`` columns between words, never inside a number:
    each line of ``text`` is filled on its own, its continuation lines
    indented two spaces past its own indent."""
    lines = []
    for line in text.splitlines() or [""]:
        indent = line[: len(line) - len(line.lstrip())]
        lines.append(
            textwrap.fill(
                line.strip(),
                width,
                initial_indent=indent,
                subsequent_indent=indent + "  ",
                break_long_words=False,
                break_on_hyphens=False,
            )
            if line.strip()
            else ""
        )
    return "\n".join(lines)


def _table(headers, rows, first_width):
    """Fixed-width text: a left-aligned first column cut to ``first_width``,
    the rest right-aligned to their widest cell."""
    widths = [max(len(h[i]) for h in headers) for i in range(len(headers[0]))]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row)]
    widths[0] = min(widths[0], first_width)
    lines = []
    for cells in list(headers) + [None] + list(rows):
        if cells is None:
            lines.append("-" * min(WIDTH, sum(widths) + 2 * (len(widths) - 1)))
            continue
        first = str(cells[0])
        first = first if len(first) <= widths[0] else first[: widths[0] - 1] + "~"
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        lines.append("  ".join([first.ljust(widths[0])] + rest).rstrip())
    return "\n".join(lines)


def _label(row):
    label = row["label"]
    if row.get("same_as"):  # the planner's layout is one of the rows: say which, not its sizes again
        label = f"{label.split(':')[0]} = {row['same_as']}"
    if row.get("over_budget"):
        label += " *"
    return label


def accuracy_table(rows) -> str:
    headers = [
        ("", "AUC", "HR@10", "AUC", "HR@10", "AUC", "HR@10"),
        ("model", "all", "all", "rare", "rare", "head", "head"),
    ]
    body = [[_label(r)] + [f"{r[m]:.4f}" for m in METRICS] for r in rows]
    return _table(headers, body, WIDTH - 6 * 8)


def cost_table(rows) -> str:
    headers = [("model", "bytes", "of budget", "lr", "ms/step", "train MiB")]
    body = [
        [
            _label(r),
            f"{r['bytes']:,}",
            f"{r['bytes'] / r['budget_bytes']:.3f}",
            f"{r['lr']:g}",
            f"{r['step_ms']:.1f}",
            f"{r['train_mib']:.2f}",
        ]
        for r in rows
    ]
    return _table(headers, body, 32)


# ---------------------------------------------------------------------------
# several seeds


def _mean_std(values):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def quantized_table(rows) -> str:
    """The rows served quantized: test HR@10 and AUC of the float32 layer as
    trained and as served, and the bytes of each."""
    headers = [
        ("", "HR@10", "HR@10", "", "AUC", "trained", "served"),
        ("model", "float32", "served", "change", "change", "bytes", "bytes"),
    ]
    body = [
        [
            _label(r),
            f"{r['trained_test']['hr@10']:.4f}",
            f"{r['hr@10']:.4f}",
            f"{r['hr@10'] - r['trained_test']['hr@10']:+.4f}",
            f"{r['auc'] - r['trained_test']['auc']:+.4f}",
            f"{r['trained_bytes']:,}",
            f"{r['bytes']:,}",
        ]
        for r in rows
        if r.get("bits") and "same_as" not in r
    ]
    return _table(headers, body, 24)


def _key(label):
    """Labels that carry sizes (``vocab 759+OOV``, the planner's layout) vary
    with the seed's data; rows are matched across seeds by their kind (a
    row served quantized keeps its ``int4`` mark)."""
    bits, _, rest = label.partition(" ")
    if bits.startswith("int") and bits[3:].isdigit():
        return f"{bits} {_key(rest)}"
    if label.startswith("vocab "):
        return "vocab"
    if label.startswith("planner"):
        return "planner"
    if label.startswith("full "):
        return "full"
    return label


def summarize(payloads) -> dict:
    """Mean and sample std over seeds of every metric of every row, and the
    planner's paired difference from every other row, seed by seed."""
    keys = [_key(r["label"]) for r in payloads[0]["models"]]
    by_key = {k: [next(r for r in p["models"] if _key(r["label"]) == k) for p in payloads] for k in keys}
    summary = {}
    for key, rows in by_key.items():
        entry = {"labels": [r["label"] for r in rows], "over_budget": rows[0]["over_budget"]}
        for metric in METRICS + ("step_ms",):
            mean, std = _mean_std([r[metric] for r in rows])
            entry[metric] = {"mean": mean, "std": std, "by_seed": [r[metric] for r in rows]}
        summary[key] = entry
    served = next((k for k in by_key if k.endswith(" planner") and k.startswith("int")), None)
    return {
        "seeds": [p["seed"] for p in payloads],
        "rows": summary,
        "planner_minus": _paired(by_key, "planner"),
        # The planner's layout served quantized, against every other row.
        "served_planner": served,
        "served_planner_minus": _paired(by_key, served),
    }


def _paired(by_key, base) -> dict:
    """``base`` minus every other row, seed by seed, per metric."""
    paired = {}
    if base not in by_key:
        return paired
    for key, rows in by_key.items():
        if key == base:
            continue
        paired[key] = {}
        for metric in ("hr@10", "auc", "hr@10_head", "auc_head", "hr@10_rare", "auc_rare"):
            diffs = [p[metric] - r[metric] for p, r in zip(by_key[base], rows)]
            mean, std = _mean_std(diffs)
            paired[key][metric] = {"mean": mean, "std": std, "by_seed": diffs}
    return paired


def summary_table(summary) -> str:
    headers = [("model", "HR@10 all", "HR@10 head", "HR@10 rare", "AUC all")]
    body = []
    for key, entry in summary["rows"].items():
        label = key + (" *" if entry["over_budget"] else "")
        body.append(
            [label]
            + [f"{entry[m]['mean']:.4f}±{entry[m]['std']:.4f}" for m in ("hr@10", "hr@10_head", "hr@10_rare", "auc")]
        )
    return _table(headers, body, WIDTH - 4 * 15)


def paired_table(summary) -> str:
    headers = [("planner minus", "HR@10 all", "HR@10 head", "AUC all")]
    body = []
    for key, entry in summary["planner_minus"].items():
        cells = [key]
        for metric in ("hr@10", "hr@10_head", "auc"):
            d = entry[metric]
            cells.append(f"{d['mean']:+.4f}±{d['std']:.4f}")
        body.append(cells)
    return _table(headers, body, WIDTH - 3 * 16)


def _minus(paired, names) -> str:
    """``name mean ± std (head mean ± std; ahead in w/n seeds)`` of each of
    ``names`` in ``paired`` (:func:`_paired`'s HR@10), joined by "; minus "."""
    parts = []
    for name in names:
        all_, head = paired[name]["hr@10"], paired[name]["hr@10_head"]
        wins = sum(d > 0 for d in all_["by_seed"])
        parts.append(
            f"{name} {all_['mean']:+.4f} ± {all_['std']:.4f} (head {head['mean']:+.4f} ± {head['std']:.4f}; "
            f"ahead in {wins}/{len(all_['by_seed'])} seeds)"
        )
    return "; minus ".join(parts)


def seeds_verdict(summary) -> str:
    """The verdict over seeds: the best in-budget row by mean HR@10, and the
    planner's choice against the best rival a user would try first (the
    vocabulary table, the hashing trick, quotient-remainder), the hashing
    trick and quotient-remainder, paired by seed (mean ± std), overall and on
    the head; and plain Bloom's place."""
    rows = {k: v for k, v in summary["rows"].items() if not v["over_budget"]}
    ranked = sorted((k for k in rows if k != "planner"), key=lambda k: rows[k]["hr@10"]["mean"], reverse=True)
    best = ranked[0]
    text = (
        f"Over seeds {summary['seeds']}, the best mean HR@10 at this budget: {best} "
        f"({rows[best]['hr@10']['mean']:.4f}, {rows[best]['hr@10']['mean'] - rows[ranked[1]]['hr@10']['mean']:+.4f} "
        f"over {ranked[1]})."
    )
    paired = summary["planner_minus"]
    if paired:
        rivals = [k for k in ("vocab", "hashing trick k=1", "quotient-remainder") if k in paired]
        rival = max(rivals, key=lambda k: rows[k]["hr@10"]["mean"])
        text += "  HR@10 of the planner's choice minus " + _minus(paired, dict.fromkeys([rival] + rivals)) + "."
    served = summary.get("served_planner")
    if served in rows:
        bits = served.split(" ")[0]
        pairs = summary["served_planner_minus"]
        names = [k for k in (f"{bits} quotient-remainder", f"{bits} vocab", "planner") if k in pairs]
        if names:
            text += (
                f"  Served at {bits} (trained in float32 with the rows {bits} buys), HR@10 of the planner's "
                "layout minus " + _minus(pairs, names) + "."
            )
    bloom = [k for k in rows if k.startswith("Bloom k=")]
    if bloom:
        place = [k for k in sorted(rows, key=lambda k: rows[k]["hr@10"]["mean"], reverse=True)]
        text += "  Plain Bloom ranks " + ", ".join(f"{k} {place.index(k) + 1}/{len(place)}" for k in bloom) + "."
    return text
