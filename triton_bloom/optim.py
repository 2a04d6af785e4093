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

Half-precision tables (bfloat16, float16) are rounded stochastically by
default: each updated value is stored as the representable neighbour above
the float32 result with probability proportional to its distance from the one
below, so updates smaller than half a unit in the last place add up in
expectation instead of being rounded away (round-to-nearest stops a bf16 row
from learning once its updates fall below ``|w| / 256``).  The random bits
are a hash of the optimizer's ``seed``, its step count, the row and the
column (``rounding.py``), the same on the Triton and the PyTorch path (a
GPU's fused multiply-add may move the float32 update by its last bit, and so,
rarely, the stored value), so a run is reproducible from the seed.  ``stochastic_rounding=False`` gives
round-to-nearest; float32 and float64 tables are never rounded.  Only the
fused step rounds: with ``sparse=True`` or a dense gradient, the table is
updated by your own optimizer (``torch.optim``), which rounds to nearest.

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
from .rounding import ROUNDED_DTYPES, check_seed

__all__ = ["FusedSGD", "FusedRowWiseAdagrad"]


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a positive number)")
    return float(lr)


def _draw_seed() -> int:
    # From PyTorch's generator, so torch.manual_seed makes the default reproducible.
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _compiling_error(name: str) -> RuntimeError:
    # A compiled backward updates the state in place, which AOTAutograd keeps
    # only for tensors that exist before the graph runs.  Raising makes
    # torch.compile run the call eagerly (creating the state), or, under
    # fullgraph=True, fail with this message.
    return RuntimeError(
        f"{name}'s state must exist, on the table's device, before torch.compile traces a lookup: call "
        "optimizer.state(weight) outside the compiled code first (BloomEmbedding and BloomEmbeddingBag do this "
        "when they are built and moved)"
    )


class _FusedOptimizer:
    """What the lookups read off a fused optimizer: its code for the update
    kernel (``kind``), ``lr``, ``eps``, its state tensor and its stochastic
    rounding's ``(2,)`` int64 seed and step (``rounding``)."""

    kind: int
    eps = 0.0

    def _init_rounding(self, stochastic_rounding: bool, seed: Optional[int]) -> None:
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"Invalid stochastic_rounding: {stochastic_rounding!r} (must be True or False)")
        self.stochastic_rounding = stochastic_rounding
        self.seed = check_seed(seed) if seed is not None else _draw_seed()
        self.rounding: torch.Tensor | None = None

    def _place_rounding(self, weight: torch.Tensor) -> None:
        """Create, or move to ``weight``'s device, the ``(2,)`` seed and step
        (when ``weight``'s steps are rounded)."""
        if not self.rounds(weight):
            return
        rounding = self.rounding
        if rounding is not None and rounding.device == weight.device and not rounding.is_meta:
            return
        if torch.compiler.is_compiling():
            raise _compiling_error(type(self).__name__)
        if rounding is None or rounding.is_meta:
            self.rounding = torch.tensor([self.seed, 0], dtype=torch.int64, device=weight.device)
        else:
            self.rounding = rounding.to(weight.device)

    def state(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """The optimizer's per-row state for ``weight`` (none for SGD); also
        places the rounding's seed and step beside ``weight``."""
        self._place_rounding(weight)
        return None

    def rounds(self, weight: torch.Tensor) -> bool:
        """Whether steps on ``weight`` are rounded stochastically."""
        return self.stochastic_rounding and weight.dtype in ROUNDED_DTYPES

    @property
    def steps(self) -> int:
        """Rounded steps taken (the rounding's counter)."""
        return int(self.rounding[1]) if self.rounding is not None and not self.rounding.is_meta else 0

    def step_arguments(self, weight: torch.Tensor) -> dict:
        """The lookup ops' arguments for this optimizer's step on ``weight``."""
        state = self.state(weight)
        return {
            "optimizer": self.kind,
            "lr": self.lr,
            "eps": self.eps,
            "optimizer_state": state,
            "rounding": self.rounding if self.rounds(weight) else None,
        }

    def step_reference(self, weight: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """The update in plain PyTorch (CPU path and test oracle)."""
        arguments = self.step_arguments(weight)
        bloom_rowwise_update_reference(
            weight,
            rows,
            values,
            optimizer=self.kind,
            lr=self.lr,
            eps=self.eps,
            state=arguments["optimizer_state"],
            rounding=arguments["rounding"],
        )

    def _rounding_state(self) -> dict:
        return {
            "stochastic_rounding": self.stochastic_rounding,
            "seed": self.seed,
            "steps": self.steps,
        }

    def _load_rounding_state(self, state_dict: dict) -> None:
        # Checkpoints written before stochastic rounding keep this optimizer's settings.
        if "stochastic_rounding" not in state_dict:
            return
        self.stochastic_rounding = bool(state_dict["stochastic_rounding"])
        self.seed = check_seed(state_dict["seed"])
        device = self.rounding.device if self.rounding is not None else None
        self.rounding = torch.tensor([self.seed, int(state_dict["steps"])], dtype=torch.int64, device=device)


class FusedSGD(_FusedOptimizer):
    """Plain SGD applied to the touched rows inside the backward pass.

    Args:
        lr (float): learning rate; may be changed between steps (``opt.lr = ...``;
            a compiled model recompiles for the new value).
        stochastic_rounding (bool): round a bfloat16 or float16 table's
            updated values stochastically (see the module's docstring);
            ``False`` rounds to nearest. Default: ``True``.
        seed (int, optional): the rounding's seed, in ``[0, 2**32)``.
            Default: drawn from PyTorch's generator when the optimizer is built.

    Examples::

        >>> emb = BloomEmbedding(100_000, 64, dtype=torch.bfloat16, fused_optimizer=FusedSGD(lr=0.1, seed=0))
    """

    kind = FUSED_SGD

    def __init__(self, lr: float, *, stochastic_rounding: bool = True, seed: Optional[int] = None) -> None:
        self.lr = _check_lr(lr)
        self._init_rounding(stochastic_rounding, seed)

    def state_dict(self) -> dict:
        return {"lr": self.lr, **self._rounding_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.lr = _check_lr(state_dict["lr"])
        self._load_rounding_state(state_dict)

    def __repr__(self) -> str:
        return f"FusedSGD(lr={self.lr}{_rounding_repr(self)})"


class FusedRowWiseAdagrad(_FusedOptimizer):
    """Row-wise Adagrad applied to the touched rows inside the backward pass.

    Args:
        lr (float): learning rate.
        eps (float): added to the root of the accumulator. Default: 1e-10.
        initial_accumulator_value (float): starting value of every row's
            accumulator. Default: 0.
        stochastic_rounding (bool), seed (int, optional): as :class:`FusedSGD`'s.
    """

    kind = FUSED_ROWWISE_ADAGRAD

    def __init__(
        self,
        lr: float = 0.01,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
        *,
        stochastic_rounding: bool = True,
        seed: Optional[int] = None,
    ) -> None:
        self.lr = _check_lr(lr)
        if not eps >= 0:
            raise ValueError(f"Invalid epsilon value: {eps!r}")
        if not initial_accumulator_value >= 0:
            raise ValueError(f"Invalid initial_accumulator_value: {initial_accumulator_value!r}")
        self.eps = float(eps)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.accumulator: torch.Tensor | None = None
        self._init_rounding(stochastic_rounding, seed)

    def state(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``(num_rows,)`` float32 accumulator of ``weight``'s rows,
        created at the first call and kept on ``weight``'s device."""
        self._place_rounding(weight)
        accumulator = self.accumulator
        # A meta tensor (a table built on the meta device) holds no values to move.
        missing = accumulator is None or accumulator.shape != weight.shape[:1] or accumulator.is_meta
        if (missing or accumulator.device != weight.device) and torch.compiler.is_compiling():
            raise _compiling_error("FusedRowWiseAdagrad")
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
            **self._rounding_state(),
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
        self._load_rounding_state(state_dict)

    def __repr__(self) -> str:
        return f"FusedRowWiseAdagrad(lr={self.lr}, eps={self.eps}{_rounding_repr(self)})"


def _rounding_repr(optimizer: _FusedOptimizer) -> str:
    return "" if optimizer.stochastic_rounding else ", stochastic_rounding=False"


FUSED_OPTIMIZERS = (FusedSGD, FusedRowWiseAdagrad)
