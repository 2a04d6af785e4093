"""How every kernel of this package is launched.

One entry point, :func:`launch`, for the kernels that are tuned and for
those that run at a fixed configuration, so that what every launch needs is
done once: the interpreter's pinned block sizes, the CUDA device guard, and
the launch recorder that the ahead-of-time compile check
(``triton_bloom.aot``) uses to learn, from the launchers themselves, every
specialization they produce.  Tuning and its cache live in ``autotune.py``.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

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


# Triton's interpreter patches triton.language while it runs a kernel, so two
# threads interpreting at once break each other ("Did you forget to add
# @triton.jit?"): interpreted launches take turns.  GPU launches do not.
_INTERPRETER_LOCK = threading.RLock()


def _one_at_a_time():
    return _INTERPRETER_LOCK if _INTERPRETED else contextlib.nullcontext()


# Pinned under the interpreter: small enough that tests with dims such as 5
# or 33 cover partial blocks in both directions, large enough to keep the
# number of interpreted programs low.
INTERPRETER_META = {"BLOCK_N": 16, "BLOCK_D": 32}


def device_guard(device):
    """Triton launches on the current CUDA device: make it ``device``."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _Recorder(threading.local):
    def __init__(self):
        self.launches = None
        self.choose = None


_recorder = _Recorder()


@contextlib.contextmanager
def recording_launches():
    """Collect every launch made in this thread inside the block.

    Yields a list that fills with one dict per launch: ``kernel`` (the
    ``@triton.jit`` function), ``args`` (its arguments by name, tensors as
    passed) and ``configs`` (the configurations it may run with on a GPU: the
    autotuner's candidates for this launch, or its one fixed configuration,
    each ``{"kwargs", "num_warps", "num_stages"}``, ``None`` for Triton's
    default; for a tuned kernel, its whole search space).  The launches still
    run.
    """
    previous = _recorder.launches
    _recorder.launches = []
    try:
        yield _recorder.launches
    finally:
        _recorder.launches = previous


@contextlib.contextmanager
def choosing_tuned_configs(choose):
    """Under the interpreter, run each tuned launch made in this thread inside
    the block at ``choose(kernel, args, candidates)`` instead of
    ``INTERPRETER_META``: ``candidates`` are the configurations the autotuner
    would try for this launch (``{"kwargs", "num_warps", "num_stages"}``
    dicts, pruned as it prunes them), and ``choose`` returns one of them.  The
    traffic model (``bench/perf/traffic.py``) traces a kernel at the tiling
    it compiles, not at the interpreter's pinned one."""
    previous = _recorder.choose
    _recorder.choose = choose
    try:
        yield
    finally:
        _recorder.choose = previous


def launch(kernel, grid_for, args, device, *, config=None, tuning=None):
    """Launch ``kernel`` on ``args`` (a dict by parameter name).

    Args:
        kernel: the ``@triton.jit`` function.
        grid_for: maps the meta-parameters (``BLOCK_N``, ``BLOCK_D``, ...)
            to the grid.
        args (dict): the kernel's arguments, constexprs included, block
            sizes excluded.
        device (torch.device): where the tensors live.
        config (dict, optional): a fixed configuration ``{"kwargs": {...},
            "num_warps": int or None, "num_stages": int or None}``, for a
            kernel that is not tuned (its block sizes fix the order of its
            sums, or are derived from the shape).
        tuning (autotune.Tuning, optional): how a tuned kernel is tuned: the
            buffers it accumulates into and the arguments it is keyed on.

    Exactly one of ``config`` and ``tuning`` is given.  Under the interpreter
    a tuned kernel runs at ``INTERPRETER_META``.
    """
    from . import autotune

    if (config is None) == (tuning is None):
        raise ValueError("launch needs exactly one of config= and tuning=")
    if _recorder.launches is not None:
        configs = [config] if config is not None else autotune.search_space(args, tuning)
        _recorder.launches.append({"kernel": kernel, "args": dict(args), "configs": configs})
    if config is not None:
        meta = config["kwargs"]
        options = {name: config[name] for name in ("num_warps", "num_stages") if config.get(name) is not None}
        with device_guard(device), _one_at_a_time():
            kernel[grid_for({**args, **meta})](**args, **meta, **options)
        return
    if interpreting():
        meta, options = INTERPRETER_META, {}
        if _recorder.choose is not None:
            chosen = _recorder.choose(kernel, args, autotune.candidates(args, tuning))
            meta = chosen["kwargs"]
            options = {name: chosen[name] for name in ("num_warps", "num_stages") if chosen.get(name) is not None}
        with _one_at_a_time():
            kernel[grid_for({**args, **meta})](**args, **meta, **options)
        return
    with device_guard(device):
        autotune.run_tuned(kernel, grid_for, args, device, tuning)
