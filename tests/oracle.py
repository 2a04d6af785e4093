"""An independent oracle: the Bloom embedding in numpy float64, from
scikit-learn's murmurhash3 and explicit loops, sharing no code with the
package.  Every implementation in the package is tested against it."""

import numpy as np
from sklearn.utils import murmurhash3_32

from bench.baselines import SPOTLIGHT_SEEDS  # typed in from Spotlight, not from the package

__all__ = [
    "SPOTLIGHT_SEEDS",
    "sklearn_rows",
    "forward_oracle",
    "backward_oracle",
    "bag_forward_oracle",
    "bag_backward_oracle",
]


def sklearn_rows(ids, k, num_rows):
    """Spotlight's recipe: signed murmurhash3_32 of the int32 id, numpy floor modulo."""
    ids = np.asarray(ids).astype(np.int32)
    cols = [murmurhash3_32(ids.reshape(-1), seed=s).astype(np.int64) % num_rows for s in SPOTLIGHT_SEEDS[:k]]
    return np.stack(cols, axis=-1).reshape(*ids.shape, k)


def forward_oracle(ids, weight, k, padding_idx=None):
    """``(*, dim)`` float64 sums of each id's k rows; zero for the padding id."""
    ids = np.asarray(ids)
    weight = np.asarray(weight, dtype=np.float64)
    rows = sklearn_rows(ids, k, weight.shape[0])
    out = np.zeros((*ids.shape, weight.shape[1]))
    for pos in np.ndindex(*ids.shape):
        if padding_idx is not None and ids[pos] == padding_idx:
            continue
        for j in range(k):
            out[pos] += weight[rows[pos][j]]
    return out


def backward_oracle(ids, grad_out, num_rows, k, padding_idx=None):
    """``(num_rows, dim)`` float64 gradient of :func:`forward_oracle`."""
    ids = np.asarray(ids)
    grad_out = np.asarray(grad_out, dtype=np.float64)
    rows = sklearn_rows(ids, k, num_rows)
    grad = np.zeros((num_rows, grad_out.shape[-1]))
    for pos in np.ndindex(*ids.shape):
        if padding_idx is not None and ids[pos] == padding_idx:
            continue
        for j in range(k):
            grad[rows[pos][j]] += grad_out[pos]
    return grad


def _bags(offsets, n):
    """(start, end) of every bag from ``B + 1`` offsets ending at n."""
    offsets = list(np.asarray(offsets))
    return [(int(offsets[b]), int(offsets[b + 1])) for b in range(len(offsets) - 1)]


def bag_forward_oracle(ids, offsets, weight, k, mode, per_sample_weights=None, padding_idx=None):
    """``(B, dim)`` float64 pooled vectors; ``offsets`` has ``B + 1`` entries."""
    ids = np.asarray(ids)
    vectors = forward_oracle(ids, weight, k, padding_idx)
    out = np.zeros((len(offsets) - 1, np.asarray(weight).shape[1]))
    for b, (start, end) in enumerate(_bags(offsets, len(ids))):
        members = [i for i in range(start, end) if padding_idx is None or ids[i] != padding_idx]
        if not members:
            continue
        if mode == "max":
            out[b] = np.max([vectors[i] for i in members], axis=0)
            continue
        for i in members:
            w = 1.0 if per_sample_weights is None else float(per_sample_weights[i])
            out[b] += w * vectors[i]
        if mode == "mean":
            out[b] /= len(members)
    return out


def bag_backward_oracle(ids, offsets, weight, k, mode, grad_out, per_sample_weights=None, padding_idx=None):
    """float64 gradients ``(grad_weight, grad_per_sample_weights)``; in max mode
    the gradient of a column goes to the first id reaching the maximum."""
    ids = np.asarray(ids)
    weight = np.asarray(weight, dtype=np.float64)
    grad_out = np.asarray(grad_out, dtype=np.float64)
    rows = sklearn_rows(ids, k, weight.shape[0])
    vectors = forward_oracle(ids, weight, k, padding_idx)
    grad_w = np.zeros_like(weight)
    grad_psw = np.zeros(len(ids))
    for b, (start, end) in enumerate(_bags(offsets, len(ids))):
        members = [i for i in range(start, end) if padding_idx is None or ids[i] != padding_idx]
        if not members:
            continue
        if mode == "max":
            for d in range(weight.shape[1]):
                winner = max(members, key=lambda i: (vectors[i][d], -i))
                for j in range(k):
                    grad_w[rows[winner][j], d] += grad_out[b, d]
            continue
        for i in members:
            w = 1.0 if per_sample_weights is None else float(per_sample_weights[i])
            scale = w / len(members) if mode == "mean" else w
            for j in range(k):
                grad_w[rows[i][j]] += scale * grad_out[b]
            grad_psw[i] = float(np.dot(grad_out[b], vectors[i]))
    return grad_w, grad_psw
