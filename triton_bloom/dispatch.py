"""Which implementation runs: the Triton kernels or the PyTorch reference.

The one place that decides.  ``auto`` takes the kernels for CUDA tensors when
Triton imports; everything else runs the reference path, which computes the
same function.  The kernels are imported here, lazily, so that
``import triton_bloom`` works where Triton is missing or has no driver.

Only a missing Triton (or an old Triton that finds no GPU driver) sends CUDA
tensors to the reference path, and it says so once per process with a
:class:`TritonFallbackWarning`.  Any other error while importing the kernels
(a bug in them, a Triton whose API they do not match) is raised: falling back
on it would hide a broken GPU path behind correct but slow results.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")

# Installed, pyproject maps the top-level folder ``kernels/`` to this name.
INSTALLED_KERNELS = "triton_bloom.kernels"
# What the loader imports (tests point it elsewhere).
KERNELS_MODULE = INSTALLED_KERNELS


class TritonFallbackWarning(RuntimeWarning):
    """CUDA tensors under ``backend="auto"`` run the PyTorch reference path
    because the Triton kernels cannot load.  Issued once per process; pass
    ``backend="torch"`` to choose that path without the warning."""


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names a backend, else raise ``ValueError``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_missing(exc: BaseException) -> bool:
    """Whether ``exc``, raised while importing the kernels, means that Triton
    cannot run here at all rather than that something is broken.

    Args:
        exc (BaseException): what importing ``triton_bloom.kernels`` raised.

    Returns:
        bool: ``True`` for a ``ModuleNotFoundError`` of ``triton`` itself (not
        installed, or blocked with ``sys.modules["triton"] = None``), and for
        the ``RuntimeError("0 active drivers ([]). There should only be
        one.")`` that Triton 3.0 to 3.2 raised when an ``@triton.autotune``
        kernel was defined on a host without a GPU driver.  ``False`` for the
        rest, including a missing *submodule* of an installed Triton and
        ``cannot import name ... from 'triton'``: those are an API mismatch
        between these kernels and that Triton, to be raised.
    """
    if isinstance(exc, ModuleNotFoundError):
        return exc.name == "triton"
    if isinstance(exc, RuntimeError):
        return str(exc).startswith("0 active drivers")
    return False


def _kernels_folder_of_checkout():
    """``<root>/kernels/__init__.py`` when this package runs from a source
    checkout (``<root>/triton_bloom`` beside ``<root>/kernels`` and
    ``<root>/pyproject.toml``), else ``None``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = os.path.join(root, "kernels", "__init__.py")
    # pyproject.toml tells a checkout from site-packages, where a top-level
    # ``kernels`` package beside ours would be another PyPI project's.
    if os.path.isfile(init) and os.path.isfile(os.path.join(root, "pyproject.toml")):
        return init
    return None


def _load_from_checkout(name: str, init: str):
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as the import system does, so that the
    # relative imports inside kernels/ resolve against this package.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)
    return module


def import_kernels(name: str = INSTALLED_KERNELS):
    """Import the kernels module.

    ``triton_bloom.kernels`` exists only once the project is installed: a
    source checkout run with ``PYTHONPATH=<checkout>`` has the folder
    ``kernels/`` but no module of that name, so that folder is loaded as the
    subpackage instead.

    Args:
        name (str): the module to import (``triton_bloom.kernels``).

    Returns:
        the module.  Whatever its import raises propagates, including the
        ``ModuleNotFoundError`` of a missing ``triton_bloom.kernels`` when no
        checkout folder stands in for it.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        init = _kernels_folder_of_checkout() if exc.name == name == INSTALLED_KERNELS else None
        if init is None:
            raise
    return _load_from_checkout(name, init)


@functools.cache
def _load_kernels():
    """``(module, None)``, or ``(None, exc)`` when :func:`triton_missing`
    says ``exc`` means Triton cannot run here; any other error is raised (and
    not cached: the next call tries again)."""
    try:
        return import_kernels(KERNELS_MODULE), None
    except Exception as exc:
        if triton_missing(exc):
            return None, exc
        raise


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


_fallback_warned = False
_fallback_lock = threading.Lock()


def fallback_message(exc: BaseException) -> str:
    """The :class:`TritonFallbackWarning`'s text: the reason and the fix.

    Args:
        exc (BaseException): the import error :func:`triton_missing` accepted.
    """
    if isinstance(exc, ModuleNotFoundError):
        fix = "Install it (pip install triton)"
    else:
        fix = "Fix that error (Triton finds no GPU driver)"
    return (
        "triton_bloom: CUDA tensors run the PyTorch reference path, not the Triton kernels, "
        f"because Triton failed to import: {type(exc).__name__}: {exc}. {fix}, "
        "or pass backend='torch' to choose the PyTorch path and silence this warning."
    )


# Dynamo runs this once while tracing and bakes the answer in, as for
# triton_available; the warning is a side effect it would otherwise have to
# trace (and under fullgraph=True could not).
@torch.compiler.assume_constant_result
def cuda_falls_back() -> bool:
    """Whether CUDA tensors under ``backend="auto"`` take the PyTorch path
    because the kernels cannot load; warns the first time it is ``True``."""
    global _fallback_warned
    module, exc = _load_kernels()
    if module is not None:
        return False
    with _fallback_lock:
        first, _fallback_warned = not _fallback_warned, True
    if first:
        warnings.warn(fallback_message(exc), TritonFallbackWarning, stacklevel=3)
    return True


def use_triton(backend: str, device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the Triton kernels.

    ``"auto"`` takes them for CUDA tensors; where the kernels cannot load it
    returns ``False`` and issues a :class:`TritonFallbackWarning` once per
    process.  CPU tensors under ``"auto"`` never load the kernels.  Safe to
    call from code that ``torch.compile`` traces: the answer is a constant.

    Args:
        backend (str): ``"auto"``, ``"triton"`` or ``"torch"``.
        device (torch.device): where the tensors live.

    Raises:
        RuntimeError: ``backend="triton"`` cannot run on ``device`` here.
        Exception: whatever importing the kernels raised, when that does not
            mean a missing Triton (see :func:`triton_missing`).
    """
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and not cuda_falls_back()
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
