"""What the ``triton-bloom`` commands print with, shared by ``cli`` and
``demo``: a ``rich`` console and tables, ``tqdm`` progress bars, and the
CPU's name for the headers.

``rich`` and ``tqdm`` are imported inside the functions, so that
``triton-bloom --help`` does not pay for them.
"""

from __future__ import annotations

import platform


def console():
    """A ``rich`` console that leaves numbers unstyled and long lines unwrapped."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def render_table(headers, rows, title=None, caption=None, numeric_from=None, compact=False):
    """Print ``rows`` under ``headers``; columns from ``numeric_from`` on are
    right-aligned.  ``compact`` drops the vertical rules, for wide tables."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    numeric_from = len(headers) if numeric_from is None else numeric_from
    table = Table(
        title=title,
        caption=caption,
        title_justify="left",
        caption_justify="left",
        show_header=any(headers),
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
    )
    for i, header in enumerate(headers):
        # Fold rather than cut long cells: a cut path or version is useless.
        table.add_column(header, justify="right" if i >= numeric_from else "left", no_wrap=i == 0, overflow="fold")
    for row in rows:
        # Text, not markup: a cell such as "bag_forward[max]" is not a style tag.
        table.add_row(*(Text(str(c)) for c in row))
    Console(highlight=False).print(table)


def progress(iterable=None, **kwargs):
    """A ``tqdm`` bar on stderr, so that tables on stdout stay clean."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
