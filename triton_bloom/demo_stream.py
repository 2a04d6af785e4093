"""The open-id stream of the main demo: a synthetic event log in the regime
Bloom embeddings were made for.

Raw 64-bit item ids (random below ``2**63``, as hashes of strings are), a
catalogue of millions of items with Zipf popularity of which a growing
share appears while the log runs, users with planted tastes, and a split
by time: train on the earlier part, tune on the next, test on the last, so
that unseen and rarely seen ids are part of the test as in production.

The planted structure: every item belongs to one of ``clusters`` topics;
every user has three favourite topics (Dirichlet(1, 1, 1) weights) and an
event picks one of them, or with probability ``noise`` any topic; the item
is then drawn among the topic's items born by the event's time, in
proportion to their popularity (Zipf over a random global rank, so an id
says nothing of its popularity or topic).  User activity is Pareto.

The parameters below were fixed before any model ran on the stream and
are not to be tuned toward a model (``/work/shared/DESIGN.md``: never tune
the data until Bloom wins).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["StreamConfig", "Stream", "make_stream", "EvalSet", "eval_set", "FULL", "QUICK"]


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """The generator's parameters; see the module docstring."""

    items: int  # the catalogue, born over time
    users: int
    events: int
    clusters: int = 1000
    zipf: float = 1.05  # item popularity exponent
    born_at_start: float = 0.4  # share of the catalogue alive at time 0; the rest is born uniformly over the log
    favourites: int = 3  # topics per user
    noise: float = 0.2  # chance that an event ignores the user's favourites
    activity_alpha: float = 1.2  # Pareto exponent of user activity
    history: int = 8  # items of the user's past a user vector is made of
    train_until: float = 0.7  # events before this time train the models
    valid_until: float = 0.8  # [train_until, valid_until) tunes the learning rate; the rest is the test
    eval_events: int = 20_000  # test events scored (the validation scores half as many)
    negatives: int = 100  # popularity-sampled negatives per scored event
    rare_max: int = 5  # "rare": an item seen at most this many times in training (unseen included)
    head_mass: float = 0.5  # "head": the most frequent training items that cover this share of training events


FULL = StreamConfig(items=4_000_000, users=100_000, events=1_000_000)
QUICK = StreamConfig(items=1_000_000, users=20_000, events=200_000, eval_events=6_000)


@dataclasses.dataclass
class Stream:
    """An event log in time order.

    ``raw_ids[item]`` is an item's raw int64 id; the models see raw ids
    only.  ``history[e]`` holds the catalogue indices of the user's last
    ``config.history`` items before event ``e`` (most recent first), ``-1``
    where the user has fewer.
    """

    config: StreamConfig
    raw_ids: torch.Tensor  # (items,) int64, distinct, in [0, 2**63)
    time: torch.Tensor  # (events,) float64, non-decreasing
    user: torch.Tensor  # (events,) int64
    item: torch.Tensor  # (events,) int64 catalogue index
    history: torch.Tensor  # (events, history) int32, -1 padded

    def split(self, name: str) -> torch.Tensor:
        """Indices of the events of ``"train"``, ``"valid"`` or ``"test"``
        that have at least one history item (a user's first event has no
        user vector to score with)."""
        c = self.config
        low, high = {
            "train": (0.0, c.train_until),
            "valid": (c.train_until, c.valid_until),
            "test": (c.valid_until, 2.0),
        }[name]
        keep = (self.time >= low) & (self.time < high) & (self.history[:, 0] >= 0)
        return keep.nonzero().squeeze(1)

    def train_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, counts)``: the raw ids seen as targets in the training part
        (sorted) and how often; what a user gets from a day of logs with
        ``torch.unique(ids, return_counts=True)``, or in a stream from a
        count-min sketch or a heavy-hitters counter of the recent past."""
        items = self.item[self.split("train")]
        return torch.unique(self.raw_ids[items], return_counts=True)


def _distinct_raw_ids(n: int, g: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    while True:  # a repeat among millions of draws below 2**63 is rare, but possible
        unique = torch.unique(ids)
        if unique.numel() == n:
            return ids
        extra = torch.randint(0, 2**63 - 1, (n - unique.numel(),), generator=g, dtype=torch.int64)
        ids = torch.cat([unique, extra])[torch.randperm(n, generator=g)]


def make_stream(config: StreamConfig, seed: int = 0, progress=None) -> Stream:
    """Generate the stream (CPU, deterministic in ``seed``).

    Args:
        config (StreamConfig): the generator's parameters.
        seed (int): the data seed.
        progress (callable, optional): called with a short string per stage.
    """
    say = progress or (lambda text: None)
    c = config
    g = torch.Generator().manual_seed(seed)
    say("catalogue")
    topic = torch.randint(0, c.clusters, (c.items,), generator=g)
    born = torch.rand(c.items, generator=g, dtype=torch.float64)
    born = torch.where(torch.rand(c.items, generator=g) < c.born_at_start, torch.zeros_like(born), born)
    popularity = (torch.randperm(c.items, generator=g).double() + 1).pow(-c.zipf)
    raw_ids = _distinct_raw_ids(c.items, g)
    # Items sorted by (topic, birth): the items of a topic alive at time t are
    # a prefix of the topic's run, so drawing one is two binary searches.
    key = topic.double() + born * 0.999
    order = torch.argsort(key)
    key = key[order]
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(popularity[order], 0)])
    topic_start = torch.searchsorted(key, torch.arange(c.clusters, dtype=torch.float64))

    say("users")
    activity = torch.rand(c.users, generator=g, dtype=torch.float64).clamp_(min=1e-12).pow(-1 / c.activity_alpha)
    favourite = torch.randint(0, c.clusters, (c.users, c.favourites), generator=g)
    weights = -torch.rand(c.users, c.favourites, generator=g, dtype=torch.float64).clamp_(min=1e-12).log()
    weights = torch.cumsum(weights / weights.sum(1, keepdim=True), 1)

    say("events")
    time = torch.sort(torch.rand(c.events, generator=g, dtype=torch.float64)).values
    user = torch.multinomial(activity, c.events, replacement=True, generator=g)
    pick = (
        (torch.rand(c.events, 1, generator=g, dtype=torch.float64) > weights[user]).sum(1).clamp_(max=c.favourites - 1)
    )
    event_topic = favourite[user, pick]
    noisy = torch.rand(c.events, generator=g) < c.noise
    event_topic = torch.where(noisy, torch.randint(0, c.clusters, (c.events,), generator=g), event_topic)
    start = topic_start[event_topic]
    end = torch.searchsorted(key, event_topic.double() + time * 0.999, right=True)
    end = torch.maximum(end, start + 1)  # at least the topic's first-born item
    low, high = cumulative[start], cumulative[end]
    target = low + torch.rand(c.events, generator=g, dtype=torch.float64) * (high - low)
    position = (torch.searchsorted(cumulative, target, right=True) - 1).clamp_(start, end - 1)
    item = order[position]

    say("histories")
    by_user = torch.argsort(user, stable=True)  # each user's events, in time order
    history = torch.full((c.events, c.history), -1, dtype=torch.int32)
    sorted_user, sorted_item = user[by_user], item[by_user].to(torch.int32)
    for back in range(1, c.history + 1):
        same = torch.zeros(c.events, dtype=torch.bool)
        same[back:] = sorted_user[back:] == sorted_user[:-back]
        previous = torch.full((c.events,), -1, dtype=torch.int32)
        previous[back:] = sorted_item[:-back]
        history[by_user, back - 1] = torch.where(same, previous, -1)
    return Stream(c, raw_ids, time, user, item, history)


@dataclasses.dataclass
class EvalSet:
    """Scored events of one split: each target against ``negatives`` items
    drawn from the same split's events (so in proportion to popularity, new
    items included), and the segment each target falls in."""

    history: torch.Tensor  # (E, L) raw ids
    history_mask: torch.Tensor  # (E, L) bool
    candidates: torch.Tensor  # (E, 1 + negatives) raw ids, the target first
    rare: torch.Tensor  # (E,) bool: target seen at most rare_max times in training
    head: torch.Tensor  # (E,) bool: target among the training head


def eval_set(stream: Stream, split: str, size: int, seed: int) -> EvalSet:
    """Up to ``size`` events of ``split`` (uniformly sampled), with their
    negatives and segments, as raw ids."""
    c = stream.config
    g = torch.Generator().manual_seed(seed)
    events = stream.split(split)
    if events.numel() > size:
        events = events[torch.randperm(events.numel(), generator=g)[:size]].sort().values
    pool = stream.item[stream.split(split)]
    negatives = pool[torch.randint(0, pool.numel(), (events.numel(), c.negatives), generator=g)]
    candidates = torch.cat([stream.item[events, None], negatives], 1)

    train_items = stream.item[stream.split("train")]
    counts = torch.bincount(train_items, minlength=c.items)
    ranked = torch.sort(counts, descending=True, stable=True)
    covered = torch.cumsum(ranked.values, 0) <= c.head_mass * train_items.numel()
    head_items = torch.zeros(c.items, dtype=torch.bool)
    head_items[ranked.indices[covered]] = True
    targets = stream.item[events]

    history = stream.history[events].long()
    mask = history >= 0
    return EvalSet(
        history=torch.where(mask, stream.raw_ids[history.clamp(min=0)], 0),
        history_mask=mask,
        candidates=stream.raw_ids[candidates],
        rare=counts[targets] <= c.rare_max,
        head=head_items[targets],
    )
