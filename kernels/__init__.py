"""Triton kernels of triton_bloom and their launchers (``triton_bloom.kernels``).

This subpackage imports torch, triton and, for the codes and seeds the
Python side shares with the kernels, ``triton_bloom.constants`` and
``triton_bloom.hashing`` (neither imports Triton).  ``triton_bloom`` imports
it lazily, so the package works where Triton is missing.
"""

from ..constants import FUSED_ROWWISE_ADAGRAD, FUSED_SGD, MODE_MAX, MODE_MEAN, MODE_SUM
from .backward import bloom_backward
from .bag_backward import bloom_bag_backward
from .bag_forward import bloom_bag_forward
from .forward import bloom_forward
from .hashing import bloom_hash
from .launch import interpreting
from .optimizer import bloom_rowwise_update, bloom_segment_step
from .scores import bloom_row_score_sums, bloom_scores
from .segment import bloom_row_gradients

__all__ = [
    "bloom_forward",
    "bloom_backward",
    "bloom_bag_forward",
    "bloom_bag_backward",
    "bloom_hash",
    "bloom_row_gradients",
    "bloom_rowwise_update",
    "bloom_segment_step",
    "bloom_scores",
    "bloom_row_score_sums",
    "FUSED_SGD",
    "FUSED_ROWWISE_ADAGRAD",
    "interpreting",
    "MODE_SUM",
    "MODE_MEAN",
    "MODE_MAX",
]
