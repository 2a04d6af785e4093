"""How well a model ranks each user's held-out item: the metrics of the demo
and of ``bench/studies/quality.py``, kept in one place so that both count alike.

Ties count half: an item that scores exactly what the held-out item scores
is ranked above it half the time.  Ties are what hash collisions produce (two
ids whose ``k`` rows all coincide get the same vector), so a strict ``>``
would give a collision the better half of every tie.
"""

from __future__ import annotations

import torch


def items_above(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many items rank above each row's target, ties counting half.

    Args:
        scores: ``(users, items)``; items left out of the ranking (a user's
            training items) hold ``-inf``, the target's own score does not.
        targets: ``(users,)`` int64, the column of each row's held-out item.

    Returns:
        ``(users,)`` float64: the items scoring above the target, plus half
        of those scoring the same (the target itself not counted).
    """
    target = scores.gather(1, targets[:, None])
    greater = (scores > target).sum(1).double()
    ties = (scores == target).sum(1).double() - 1  # the target equals itself
    return greater + ties / 2


def ranking_metrics(above: torch.Tensor, negatives: torch.Tensor, k: int = 10) -> dict:
    """Per-user reciprocal rank, AUC and hit at ``k`` of the held-out item.

    Args:
        above: ``(users,)``, what :func:`items_above` returns.
        negatives: ``(users,)``, the number of items each held-out item is
            ranked against (the ranked items other than itself).
        k: the cut-off of the hit rate.

    Returns:
        ``{"mrr": ..., "auc": ..., f"hr@{k}": ...}``, each ``(users,)``
        float64: ``1 / rank`` with ``rank = 1 + above``; the fraction of the
        negatives ranked below the held-out item (0 for a user with none);
        1.0 where ``rank <= k``.
    """
    rank = 1 + above
    return {
        "mrr": 1 / rank,
        "auc": (negatives - above) / negatives.clamp(min=1),
        f"hr@{k}": (rank <= k).double(),
    }
