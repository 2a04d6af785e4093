"""An independent oracle: the Bloom embedding in numpy float64, from
scikit-learn's murmurhash3 and explicit loops, sharing no code with the
package.  Every implementation in the package is tested against it."""

import numpy as np
from sklearn.utils import murmurhash3_32

from bench.baselines import SPOTLIGHT_SEEDS  # typed in from Spotlight, not from the package

__all__ = ["SPOTLIGHT_SEEDS", "sklearn_rows", "forward_oracle", "backward_oracle"]


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
