"""Plain-PyTorch prototypes of embedding layouts that mix private and hashed
parameters, for the quality study to try before the library offers them.

``MixedTable(num, dim, hot_ids, private_dim, num_rows, k)``: an id's vector is

- its own full row if it is one of the ``hot_ids`` (collision-free: the
  frequent ids, which carry most of the training signal), else the sum of its
  ``k`` Bloom rows (``triton_bloom.bloom_hash``, the library's hashing) when
  ``num_rows > 0``, else nothing;
- plus, when ``private_dim > 0``, a per-id code of ``private_dim`` numbers
  times a shared ``(private_dim, dim)`` projection.

It is the layout the library's ``hot_ids=`` / ``private_dim=`` options build,
computed the slow way, so the study can measure which mix wins at a byte
budget.  ``layout_bytes`` counts what the library will store: every
parameter, and the hot-id index at ``HOT_INDEX_BYTES`` per hot id (an
open-addressing set of int64 ids at load factor 1/2), not the dense
``num -> slot`` map this prototype keeps for speed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from triton_bloom import bloom_hash

HOT_INDEX_BYTES = 16
FLOAT_BYTES = 4


def layout_bytes(num: int, dim: int, hot: int, private_dim: int, num_rows: int, hot_dim: Optional[int] = None) -> int:
    hot_dim = dim if hot_dim is None else hot_dim
    floats = hot * hot_dim + (hot_dim * dim if hot and hot_dim < dim else 0) + num_rows * dim
    floats += num * private_dim + private_dim * dim if private_dim else 0
    return floats * FLOAT_BYTES + hot * HOT_INDEX_BYTES


def rows_for_budget(
    num: int, dim: int, hot: int, private_dim: int, max_bytes: int, hot_dim: Optional[int] = None
) -> int:
    """Bloom rows that fit in what ``max_bytes`` leaves after the hot rows and
    the private part; 0 when nothing is left (or when it does not fit at all:
    the caller checks ``layout_bytes``)."""
    left = max_bytes - layout_bytes(num, dim, hot, private_dim, 0, hot_dim)
    return max(0, left // (dim * FLOAT_BYTES))


def top_ids(counts: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most frequent ids, ties broken by the smaller id (stable)."""
    n = min(int(n), counts.numel())
    order = torch.sort(-counts.double(), stable=True).indices
    return order[:n].sort().values


class MixedTable(nn.Module):
    def __init__(
        self,
        num: int,
        dim: int,
        hot_ids: Optional[torch.Tensor] = None,
        private_dim: int = 0,
        num_rows: int = 0,
        k: int = 4,
        init_std: Optional[float] = None,
        hot_dim: Optional[int] = None,
    ):
        super().__init__()
        self.hot_dim = dim if hot_dim is None else hot_dim
        self.num_embeddings, self.embedding_dim, self.k = num, dim, k
        self.private_dim, self.num_rows = private_dim, num_rows
        std = init_std if init_std is not None else 1.0 / dim
        hot_ids = torch.empty(0, dtype=torch.int64) if hot_ids is None else hot_ids.long()
        self.num_hot = hot_ids.numel()
        slot = torch.full((num,), -1, dtype=torch.int64)
        slot[hot_ids] = torch.arange(self.num_hot)
        self.register_buffer("slot", slot, persistent=False)
        self.hot = nn.Parameter(torch.randn(self.num_hot, self.hot_dim) * std) if self.num_hot else None
        # Narrower hot rows (a middle tier of a mixed-dimension table) reach
        # dim through their own projection.
        self.hot_projection = (
            nn.Parameter(_orthonormal(self.hot_dim, dim)) if self.num_hot and self.hot_dim < dim else None
        )
        self.rows = nn.Parameter(torch.randn(num_rows, dim) * std) if num_rows else None
        if private_dim:
            self.code = nn.Parameter(torch.randn(num, private_dim) * std)
            # Orthonormal rows: the projection starts by copying the code's
            # scale into the output instead of shrinking it by another
            # factor of init_std (a product of two small inits barely moves).
            self.projection = nn.Parameter(_orthonormal(private_dim, dim))
        else:
            self.code = self.projection = None

    def nbytes(self) -> int:
        return layout_bytes(
            self.num_embeddings, self.embedding_dim, self.num_hot, self.private_dim, self.num_rows, self.hot_dim
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shape = ids.shape
        ids = ids.reshape(-1)
        out = ids.new_zeros((ids.numel(), self.embedding_dim), dtype=torch.float32)
        if self.rows is not None:
            out = F.embedding_bag(bloom_hash(ids, self.k, self.num_rows).long(), self.rows, mode="sum")
        if self.hot is not None:
            slot = self.slot[ids]
            is_hot = slot >= 0
            hot = self.hot[slot.clamp(min=0)]
            if self.hot_projection is not None:
                hot = hot @ self.hot_projection
            out = torch.where(is_hot[:, None], hot, out)
        if self.code is not None:
            out = out + self.code[ids] @ self.projection
        return out.view(*shape, self.embedding_dim)


def _orthonormal(rows: int, cols: int) -> torch.Tensor:
    """A ``(rows, cols)`` matrix with orthonormal rows (``rows <= cols``)."""
    q, _ = torch.linalg.qr(torch.randn(cols, rows))
    return q.T.contiguous()
