"""What every benchmark shares: timing, the machine's description, output."""

import datetime
import json
import os
import platform
import statistics
import time

import torch

from triton_bloom.terminal import cpu_model


def median_ms(fn, repeats=30, warmup=5, sync=None):
    """Median wall time of ``fn()`` in milliseconds, warm-up runs excluded."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def environment():
    """Hardware, software versions and date, recorded with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def write_outputs(payload, out, markdown_report, plot):
    """FILE.json, FILE.md and FILE.png side by side; returns their paths.

    Args:
        payload (dict): the result, written as JSON to ``out``.
        out (str): the JSON path; the markdown and the plot take its stem.
        markdown_report (callable): ``payload -> str``, the summary.
        plot (callable): ``(payload, png_path) -> path or None`` (None when
            matplotlib is missing).
    """
    stem = os.path.splitext(out)[0]
    write_json(out, payload)
    with open(stem + ".md", "w") as f:
        f.write(markdown_report(payload))
    return {"json": out, "md": stem + ".md", "png": plot(payload, stem + ".png")}


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
