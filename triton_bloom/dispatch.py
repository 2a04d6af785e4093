"""Which implementation runs: the Triton kernels or the PyTorch reference.

The one place that decides.  ``auto`` takes the kernels for CUDA tensors when
Triton imports; everything else runs the reference path, which computes the
same function.  The kernels are imported here, lazily, so that
``import triton_bloom`` works where Triton is missing or has no driver.
"""

from __future__ import annotations

import functools
import importlib

import torch

BACKENDS = ("auto", "triton", "torch")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names a backend, else raise ``ValueError``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def _load_kernels():
    try:
        return importlib.import_module("triton_bloom.kernels"), None
    except Exception as exc:  # ImportError, or a driver error from old Triton
        return None, exc


# Dynamo traces through lru_cache into importlib and stops there; these are
# fixed for the life of the process, so a compiled graph may bake them in.
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether the Triton kernels import on this host."""
    return _load_kernels()[0] is not None


@torch.compiler.assume_constant_result
def interpreter_enabled() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter
    (``TRITON_INTERPRET=1`` set before they were imported)."""
    module, _ = _load_kernels()
    return module is not None and module.interpreting()


def kernels():
    """The ``triton_bloom.kernels`` module; ``RuntimeError`` if it cannot load."""
    module, exc = _load_kernels()
    if module is None:
        raise RuntimeError(
            f"backend='triton' needs Triton, which failed to import: {exc!r}. "
            "Install it (pip install triton) or use backend='torch'."
        ) from exc
    return module


def use_triton(backend: str, device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the Triton kernels.

    Raises ``RuntimeError`` when ``backend="triton"`` cannot run there.
    """
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton_available()
    check_backend(backend)
    if not triton_available():
        kernels()  # raises, with the import error
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return True
    raise RuntimeError(
        f"backend='triton' got {device.type} tensors: the kernels run on CUDA tensors, "
        "or on CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 is set "
        "before triton_bloom.kernels is imported. Use backend='torch' or 'auto' instead."
    )
