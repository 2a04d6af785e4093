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
"""

from __future__ import annotations

import torch

__all__ = ["FusedSGD", "FusedRowWiseAdagrad"]


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a positive number)")
    return float(lr)


class FusedSGD:
    """Plain SGD applied to the touched rows inside the backward pass.

    Args:
        lr (float): learning rate; may be changed between steps (``opt.lr = ...``).
    """

    kind = 0  # kernels/optimizer.py's FUSED_SGD

    def __init__(self, lr: float) -> None:
        self.lr = _check_lr(lr)

    def step_reference(self, weight: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """The update in plain PyTorch (CPU path and test oracle)."""
        updated = weight.index_select(0, rows).to(values.dtype) - self.lr * values
        weight.index_copy_(0, rows, updated.to(weight.dtype))

    def state(self, weight: torch.Tensor):
        return None

    def state_dict(self) -> dict:
        return {"lr": self.lr}

    def load_state_dict(self, state_dict: dict) -> None:
        self.lr = _check_lr(state_dict["lr"])

    def __repr__(self) -> str:
        return f"FusedSGD(lr={self.lr})"


class FusedRowWiseAdagrad:
    """Row-wise Adagrad applied to the touched rows inside the backward pass.

    Args:
        lr (float): learning rate.
        eps (float): added to the root of the accumulator. Default: 1e-10.
        initial_accumulator_value (float): starting value of every row's
            accumulator. Default: 0.
    """

    kind = 1  # kernels/optimizer.py's FUSED_ROWWISE_ADAGRAD

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
        """The ``(num_rows,)`` float32 accumulator, created at the first step
        and kept on ``weight``'s device."""
        if self.accumulator is None or self.accumulator.shape != weight.shape[:1]:
            self.accumulator = torch.full(
                weight.shape[:1], self.initial_accumulator_value, dtype=torch.float32, device=weight.device
            )
        elif self.accumulator.device != weight.device:
            self.accumulator = self.accumulator.to(weight.device)
        return self.accumulator

    def step_reference(self, weight: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """The update in plain PyTorch (CPU path and test oracle)."""
        accumulator = self.state(weight)
        mean_square = values.float().pow(2).mean(dim=1)
        accumulator.index_add_(0, rows, mean_square)
        step = self.lr / (accumulator.index_select(0, rows).sqrt() + self.eps)
        updated = weight.index_select(0, rows).to(values.dtype) - step.to(values.dtype).unsqueeze(1) * values
        weight.index_copy_(0, rows, updated.to(weight.dtype))

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
        self.accumulator = state_dict["accumulator"]

    def __repr__(self) -> str:
        return f"FusedRowWiseAdagrad(lr={self.lr}, eps={self.eps})"


FUSED_OPTIMIZERS = (FusedSGD, FusedRowWiseAdagrad)
