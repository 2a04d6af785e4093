"""Fused sparse optimizers: the table is updated inside the backward pass,
row by touched row, and no gradient tensor is ever allocated for it.

This is what FBGEMM's table-batched embeddings do for the largest models, and
what Spotlight's notes ask for: plain PyTorch updates the whole table every
step even though a batch touches a handful of rows.  Give a module an
optimizer object and its ``weight`` is trained by ``loss.backward()`` alone::

    >>> emb = BloomEmbedding(10_000_000, 64, fused_optimizer=FusedRowWiseAdagrad(lr=0.05))
    >>> loss = model_loss(emb(ids))
    >>> loss.backward()          # emb.weight is updated here; emb.weight.grad stays None
    >>> dense_optimizer.step()   # the rest of the model, as usual

One step equals the same optimizer run on the dense gradient of that batch
(to float32 rounding): ``FusedSGD`` is ``torch.optim.SGD(lr=lr)``, and
``FusedRowWiseAdagrad`` is row-wise Adagrad (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``):
each row keeps one accumulator, ``state[r] += mean(g_r ** 2)``, and
``w_r -= lr * g_r / (sqrt(state[r]) + eps)``.  Rows the batch does not touch
are left alone, as they would be by a zero gradient.

An optimizer object belongs to one table.  Its state is saved with its own
``state_dict()``, as a ``torch.optim`` optimizer's is, so the module's state
dict stays exactly ``embeddings.weight``.

The step is a custom op called from the lookup's autograd formula, so
``torch.compile(fullgraph=True)`` captures it with the rest of the backward.
A compiled graph can update the state but cannot create it: the modules
create it when they are built and move it when they are moved.  Calling the
functional API under ``torch.compile``, create it first with
``optimizer.state(weight)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .constants import FUSED_ROWWISE_ADAGRAD, FUSED_SGD
from .reference import bloom_rowwise_update_reference

__all__ = ["FusedSGD", "FusedRowWiseAdagrad"]


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a positive number)")
    return float(lr)


class _FusedOptimizer:
    """What the lookups read off a fused optimizer: its code for the update
    kernel (``kind``), ``lr``, ``eps`` and its state tensor."""

    kind: int
    eps = 0.0

    def state(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def step_arguments(self, weight: torch.Tensor) -> dict:
        """The lookup ops' arguments for this optimizer's step on ``weight``."""
        return {"optimizer": self.kind, "lr": self.lr, "eps": self.eps, "optimizer_state": self.state(weight)}

    def step_reference(self, weight: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """The update in plain PyTorch (CPU path and test oracle)."""
        bloom_rowwise_update_reference(
            weight, rows, values, optimizer=self.kind, lr=self.lr, eps=self.eps, state=self.state(weight)
        )


class FusedSGD(_FusedOptimizer):
    """Plain SGD applied to the touched rows inside the backward pass.

    Args:
        lr (float): learning rate; may be changed between steps (``opt.lr = ...``;
            a compiled model recompiles for the new value).
    """

    kind = FUSED_SGD

    def __init__(self, lr: float) -> None:
        self.lr = _check_lr(lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr}

    def load_state_dict(self, state_dict: dict) -> None:
        self.lr = _check_lr(state_dict["lr"])

    def __repr__(self) -> str:
        return f"FusedSGD(lr={self.lr})"


class FusedRowWiseAdagrad(_FusedOptimizer):
    """Row-wise Adagrad applied to the touched rows inside the backward pass.

    Args:
        lr (float): learning rate.
        eps (float): added to the root of the accumulator. Default: 1e-10.
        initial_accumulator_value (float): starting value of every row's
            accumulator. Default: 0.
    """

    kind = FUSED_ROWWISE_ADAGRAD

    def __init__(self, lr: float = 0.01, eps: float = 1e-10, initial_accumulator_value: float = 0.0) -> None:
        self.lr = _check_lr(lr)
        if not eps >= 0:
            raise ValueError(f"Invalid epsilon value: {eps!r}")
        if not initial_accumulator_value >= 0:
            raise ValueError(f"Invalid initial_accumulator_value: {initial_accumulator_value!r}")
        self.eps = float(eps)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.accumulator: torch.Tensor | None = None

    def state(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``(num_rows,)`` float32 accumulator of ``weight``'s rows,
        created at the first call and kept on ``weight``'s device."""
        accumulator = self.accumulator
        # A meta tensor (a table built on the meta device) holds no values to move.
        missing = accumulator is None or accumulator.shape != weight.shape[:1] or accumulator.is_meta
        if (missing or accumulator.device != weight.device) and torch.compiler.is_compiling():
            # A compiled backward updates the state in place, which AOTAutograd
            # keeps only for tensors that exist before the graph runs.  Raising
            # here makes torch.compile run this call eagerly (creating the
            # state), or, under fullgraph=True, fail with this message.
            raise RuntimeError(
                "FusedRowWiseAdagrad's state must exist, on the table's device, before torch.compile traces a "
                "lookup: call optimizer.state(weight) outside the compiled code first (BloomEmbedding and "
                "BloomEmbeddingBag do this when they are built and moved)"
            )
        if missing:
            self.accumulator = torch.full(
                weight.shape[:1], self.initial_accumulator_value, dtype=torch.float32, device=weight.device
            )
        elif self.accumulator.device != weight.device:
            self.accumulator = self.accumulator.to(weight.device)
        return self.accumulator

    def state_dict(self) -> dict:
        return {
            "lr": self.lr,
            "eps": self.eps,
            "initial_accumulator_value": self.initial_accumulator_value,
            "accumulator": self.accumulator,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.lr = _check_lr(state_dict["lr"])
        self.eps = float(state_dict["eps"])
        self.initial_accumulator_value = float(state_dict["initial_accumulator_value"])
        accumulator = state_dict["accumulator"]
        if accumulator is not None and self.accumulator is not None:
            # Where this optimizer's table lives, as torch.optim places loaded state.
            accumulator = accumulator.to(self.accumulator.device)
        self.accumulator = accumulator

    def __repr__(self) -> str:
        return f"FusedRowWiseAdagrad(lr={self.lr}, eps={self.eps})"


FUSED_OPTIMIZERS = (FusedSGD, FusedRowWiseAdagrad)
