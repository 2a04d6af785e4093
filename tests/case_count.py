"""How many generated cases each property or fuzz test runs, and ran in this session.

The generated tests call :func:`count` once per case they check; the
session's terminal summary (``conftest.py``) prints the totals, so a CI log
shows how much was checked and not only that nothing failed.
"""

import collections

from hypothesis import settings

CASES: "collections.Counter[str]" = collections.Counter()


def count(name: str) -> None:
    """One more case of ``name``; ``"parent, detail"`` counts a subset of
    ``parent``'s cases, shown but not added to the total."""
    CASES[name] += 1


def summary() -> list[str]:
    """Lines for the terminal summary; empty when no generated test ran."""
    if not CASES:
        return []
    lines = [f"generated cases run: {sum(n for name, n in CASES.items() if ', ' not in name)}"]
    lines += [f"  {name}: {n}" for name, n in sorted(CASES.items())]
    return lines


def examples(n: int) -> int:
    """``n`` cases under the "ci" profile, scaled with the loaded profile's
    ``max_examples`` (``conftest.py``: 100 for "ci", 1000 for "long")."""
    return max(1, n * settings.default.max_examples // 100)
