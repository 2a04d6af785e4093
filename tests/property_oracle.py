"""The float64 oracle of every option the generated tests draw: wide ids,
``num_rows`` past ``2**31``, ``signed``, importance weights, bags in every
mode with per-sample weights, and the gradients of all of them.

Like ``oracle.py`` it shares no code with the package: rows come from
scikit-learn's murmurhash3 (ids below ``2**31``) and the ``mmh3`` package
(wider ids, their 8 little-endian bytes), the seeds from Spotlight's list in
``bench/baselines.py`` and the variants' seed constants as the README states
them, and every sum is an explicit float64 loop.  Alongside each result it
returns the sum of the magnitudes of the terms that made it, which is what
a float32 (or half-precision) implementation's rounding error grows with.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import mmh3
import numpy as np
from oracle import SPOTLIGHT_SEEDS
from sklearn.utils import murmurhash3_32

# As the README documents them: sign seeds SEEDS[j] ^ 0x5BD1E995, importance seed 0x2545F491.
SIGN_MASK = 0x5BD1E995
IMPORTANCE_SEED = 0x2545F491
WIDE = 2**31


def signed_hash(i: int, seed: int) -> int:
    """murmurhash3_x86_32 of one id, as a signed int32."""
    i = int(i)
    if i < WIDE:
        return int(murmurhash3_32(i, seed=seed))
    return int(mmh3.hash(i.to_bytes(8, "little"), seed, signed=True))


def rows(ids, k: int, num_rows: int) -> np.ndarray:
    """``(n, k)`` rows of the flattened ids (Python ints: ``num_rows`` may pass int64's comfort)."""
    flat = [int(i) for i in np.asarray(ids).reshape(-1)]
    out = np.zeros((len(flat), k), dtype=np.int64)
    for a, i in enumerate(flat):
        for j in range(k):
            out[a, j] = signed_hash(i, SPOTLIGHT_SEEDS[j]) % num_rows  # Python's % floors, as numpy's
    return out


@dataclasses.dataclass
class Spec:
    """What decides an id's vector, besides the table."""

    k: int
    padding_idx: Optional[int] = None
    signed: bool = False
    importance: Optional[np.ndarray] = None  # (importance_rows, k) float64


def _terms(ids, num_rows, spec: Spec):
    """Per flattened id: rows, signs, importance row and the factors sign * importance."""
    flat = np.asarray(ids).reshape(-1)
    r = rows(flat, spec.k, num_rows)
    signs = np.ones((len(flat), spec.k))
    if spec.signed:
        for a, i in enumerate(flat):
            for j in range(spec.k):
                signs[a, j] = -1.0 if signed_hash(i, SPOTLIGHT_SEEDS[j] ^ SIGN_MASK) < 0 else 1.0
    imp_rows = None
    factors = signs.copy()
    if spec.importance is not None:
        imp_rows = np.array([signed_hash(i, IMPORTANCE_SEED) % spec.importance.shape[0] for i in flat], dtype=np.int64)
        for a in range(len(flat)):
            factors[a] *= spec.importance[imp_rows[a]]
    live = np.array([spec.padding_idx is None or int(i) != spec.padding_idx for i in flat], dtype=bool)
    return r, signs, imp_rows, factors, live


def _vectors(weight, r, factors, live):
    """``(n, dim)`` id vectors and the magnitudes of their terms."""
    n, dim = len(r), weight.shape[1]
    vec, mag = np.zeros((n, dim)), np.zeros((n, dim))
    for a in range(n):
        if not live[a]:
            continue
        for j in range(r.shape[1]):
            vec[a] += factors[a, j] * weight[r[a, j]]
            mag[a] += np.abs(factors[a, j] * weight[r[a, j]])
    return vec, mag


@dataclasses.dataclass
class Result:
    """Values and magnitudes; gradients are ``None`` where not asked for."""

    out: np.ndarray
    out_mag: np.ndarray
    grad_weight: np.ndarray
    grad_weight_mag: np.ndarray
    grad_importance: Optional[np.ndarray] = None
    grad_importance_mag: Optional[np.ndarray] = None
    grad_psw: Optional[np.ndarray] = None
    grad_psw_mag: Optional[np.ndarray] = None


def _spread(acc: "_Grads", a, column, g, weight, r, signs, factors, imp_rows):
    """Add the gradient ``g`` of id ``a``'s vector (over ``column``, a slice or
    one index) into the table's and the importance weights' gradients."""
    for j in range(r.shape[1]):
        acc.w[r[a, j], column] += factors[a, j] * g
        acc.w_mag[r[a, j], column] += np.abs(factors[a, j] * g)
        if acc.imp is not None:
            term = signs[a, j] * np.sum(g * weight[r[a, j], column])
            acc.imp[imp_rows[a], j] += term
            acc.imp_mag[imp_rows[a], j] += np.sum(np.abs(g * weight[r[a, j], column]))


class _Grads:
    def __init__(self, weight, importance):
        self.w, self.w_mag = np.zeros_like(weight), np.zeros_like(weight)
        self.imp = None if importance is None else np.zeros(importance.shape)
        self.imp_mag = None if importance is None else np.zeros(importance.shape)


def embedding(ids, weight, spec: Spec, grad_out) -> Result:
    """``BloomEmbedding``: ``(*, dim)`` vectors, and the gradients for ``grad_out``."""
    ids = np.asarray(ids)
    weight = np.asarray(weight, dtype=np.float64)
    dim = weight.shape[1]
    grad_out = np.asarray(grad_out, dtype=np.float64).reshape(-1, dim)
    r, signs, imp_rows, factors, live = _terms(ids, weight.shape[0], spec)
    vec, mag = _vectors(weight, r, factors, live)
    acc = _Grads(weight, spec.importance)
    for a in range(len(r)):
        if live[a]:
            _spread(acc, a, slice(None), grad_out[a], weight, r, signs, factors, imp_rows)
    shape = (*ids.shape, dim)
    return Result(vec.reshape(shape), mag.reshape(shape), acc.w, acc.w_mag, acc.imp, acc.imp_mag)


def bag(ids, offsets, weight, spec: Spec, mode: str, grad_out, per_sample_weights=None) -> Result:
    """``BloomEmbeddingBag`` on flat ``ids`` and ``B + 1`` offsets: bag ``b``
    is ``ids[offsets[b]:offsets[b + 1]]`` less its padding ids.  In max mode each column's gradient goes
    to the first id reaching the maximum."""
    ids = np.asarray(ids).reshape(-1)
    weight = np.asarray(weight, dtype=np.float64)
    dim = weight.shape[1]
    grad_out = np.asarray(grad_out, dtype=np.float64)
    psw = None if per_sample_weights is None else np.asarray(per_sample_weights, dtype=np.float64).reshape(-1)
    r, signs, imp_rows, factors, live = _terms(ids, weight.shape[0], spec)
    vec, vmag = _vectors(weight, r, factors, live)
    num_bags = len(offsets) - 1
    out, out_mag = np.zeros((num_bags, dim)), np.zeros((num_bags, dim))
    acc = _Grads(weight, spec.importance)
    gpsw, gpsw_mag = np.zeros(len(ids)), np.zeros(len(ids))
    for b in range(num_bags):
        members = [a for a in range(int(offsets[b]), int(offsets[b + 1])) if live[a]]
        if not members:
            continue
        if mode == "max":
            for d in range(dim):
                winner = max(members, key=lambda a: (vec[a, d], -a))
                out[b, d], out_mag[b, d] = vec[winner, d], vmag[winner, d]
                _spread(acc, winner, d, grad_out[b, d], weight, r, signs, factors, imp_rows)
            continue
        scale = 1.0 / len(members) if mode == "mean" else 1.0
        for a in members:
            w = scale * (1.0 if psw is None else psw[a])
            out[b] += w * vec[a]
            out_mag[b] += np.abs(w) * vmag[a]
            _spread(acc, a, slice(None), w * grad_out[b], weight, r, signs, factors, imp_rows)
            gpsw[a] = np.dot(grad_out[b], vec[a])
            gpsw_mag[a] = np.dot(np.abs(grad_out[b]), vmag[a])
    result = Result(out, out_mag, acc.w, acc.w_mag, acc.imp, acc.imp_mag)
    if psw is not None:
        result.grad_psw, result.grad_psw_mag = gpsw, gpsw_mag
    return result


def assert_close(actual, expected, magnitude, tol: float, what: str) -> None:
    """``actual`` (a tensor) equals the oracle's ``expected`` to ``tol``
    relative to ``magnitude``, the summed magnitudes of the terms; NaN and
    infinities must sit at the same places (with the same signs)."""
    actual = actual.detach().double().cpu().numpy()
    expected = np.asarray(expected, dtype=np.float64)
    magnitude = np.asarray(magnitude, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, oracle {expected.shape}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN at {np.argwhere(nan_a != nan_e)[:5].tolist()} differ"
    inf_e = np.isinf(expected)
    assert np.array_equal(np.isinf(actual), inf_e) and np.array_equal(actual[inf_e], expected[inf_e]), (
        f"{what}: infinities differ"
    )
    finite = np.isfinite(expected)
    scale = np.where(np.isfinite(magnitude), np.maximum(magnitude, 1e-30), 0.0)
    err = np.abs(actual - expected)
    bad = finite & (err > tol * scale + 1e-300)
    if bad.any():
        where = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements differ; first at {where}: got {actual[where]!r}, "
            f"oracle {expected[where]!r} (magnitude {magnitude[where]:.3g}, tol {tol})"
        )
