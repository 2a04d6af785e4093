"""Block-size configurations, and how a kernel is launched tuned or pinned.

One place for every kernel's search space.  ``triton.autotune`` needs a GPU
driver, so it is applied lazily at the first launch: importing this package
never touches the driver (older Triton raised "0 active drivers" when an
autotuned kernel was merely defined on a CPU-only host).  Under
``TRITON_INTERPRET=1`` there is nothing to tune, and every launch uses one
pinned configuration so that the interpreter runs few, predictable programs.
"""

import contextlib
import functools
import os

import torch
import triton


# ``triton.jit`` reads TRITON_INTERPRET when a kernel is defined, so what
# counts is its value when this package was imported, not its value now.
try:
    from triton import knobs as _knobs

    _INTERPRETED = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # Triton before knobs (< 3.4)
    _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter."""
    return _INTERPRETED


# Pinned under the interpreter: small enough that tests with dims such as 5
# or 33 cover partial blocks in both directions, large enough to keep the
# number of interpreted programs low.
INTERPRETER_META = {"BLOCK_N": 16, "BLOCK_D": 32}


def _gather_configs():
    configs = []
    for block_n in (16, 32, 64, 128):
        for block_d in (32, 64, 128, 256):
            for num_warps in (2, 4, 8):
                # A tile below 32 elements a thread gives the scheduler too little
                # to hide gather latency; one above 256 spills.
                per_thread = block_n * block_d // (32 * num_warps)
                if 8 <= per_thread <= 128:
                    for num_stages in (1, 2):
                        configs.append(
                            triton.Config(
                                {"BLOCK_N": block_n, "BLOCK_D": block_d},
                                num_warps=num_warps,
                                num_stages=num_stages,
                            )
                        )
    return configs


def _prune_block_d(configs, named_args, **kwargs):
    # A BLOCK_D wider than the row only masks lanes off: keep the narrowest
    # width that covers the row, and every narrower one.
    dim = named_args["dim"]
    cover = max(32, triton.next_power_of_2(dim))
    kept = [c for c in configs if c.kwargs["BLOCK_D"] <= cover]
    return kept or configs


# The autotuner keys on these arguments (and, by itself, on the dtype of every
# tensor argument, so each weight dtype is tuned on its own).
TUNING_KEY = ("dim", "K")


def tuned(kernel, reset_to_zero=None, key=TUNING_KEY):
    """The autotuned twin of ``kernel``, built at first use.

    ``reset_to_zero`` names the buffers a kernel accumulates into: the tuner
    runs every candidate on the same arguments, and without zeroing between
    trials the gradient would be added once per trial.  ``key`` names the
    arguments whose values get a tuning of their own.
    """
    return _tuned(kernel, tuple(reset_to_zero or ()), tuple(key))


@functools.lru_cache(maxsize=None)
def _tuned(kernel, reset_to_zero, key):
    return triton.autotune(
        configs=_gather_configs(),
        key=list(key),
        prune_configs_by={"early_config_prune": _prune_block_d},
        reset_to_zero=list(reset_to_zero) or None,
    )(kernel)


def launch(kernel, grid_for, args, device, reset_to_zero=None, key=TUNING_KEY):
    """Launch ``kernel`` on ``args``: tuned on a GPU, pinned under the interpreter.

    ``grid_for`` maps the meta-parameters (``BLOCK_N``, ``BLOCK_D``) to the grid.
    """
    if interpreting():
        kernel[grid_for(INTERPRETER_META)](**args, **INTERPRETER_META)
        return
    with device_guard(device):
        tuned(kernel, reset_to_zero, key)[grid_for](**args)


def device_guard(device):
    """Triton launches on the current CUDA device: make it ``device``."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
