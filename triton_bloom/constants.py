"""Codes and rules that the kernels and the Python side must agree on, each
defined once.

The Python side imports this module where Triton is absent; the kernels
import it too and wrap the numbers in ``tl.constexpr`` (Triton reads
module-level ``tl.constexpr`` globals inside ``@triton.jit`` functions).
"""

from __future__ import annotations

import torch

# Pooling modes of the bags: the index in MODES is the code the kernels see.
MODES = ("sum", "mean", "max")
MODE_SUM, MODE_MEAN, MODE_MAX = (MODES.index(name) for name in MODES)

# Fused optimizers, as the row-wise update kernel sees them.
FUSED_SGD, FUSED_ROWWISE_ADAGRAD = 0, 1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of ``dtype`` values are accumulated in: float64 for
    float64, float32 for everything else (half-precision sums lose the small
    terms, and half-precision atomics are emulated and contend badly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
