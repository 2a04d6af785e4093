"""Helpers the tests import: the device they run on, the kernels'
tolerances, and the check that the kernels load.

A plain module, not ``conftest.py`` (pytest loads that itself and does not
mean it to be imported).  ``conftest.py`` sets ``TRITON_INTERPRET`` before
anything imports this module, and this module must not import
``triton_bloom.kernels`` itself: ``require_kernels`` loads it when called.
"""

import socket
import time

import torch

from triton_bloom import dispatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances of the kernels against the reference, per weight dtype: float32
# sums of k rows agree to rounding; half precision rounds the output once.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def require_kernels():
    """The kernels module; kernel tests fail (never skip) when it cannot load,
    since CI must run them through the interpreter."""
    return dispatch.kernels()


def free_port():
    """A TCP port free on this host now, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, args, nprocs, timeout_s, what):
    """Runs ``worker(rank, *args)`` on ``nprocs`` spawned processes.  A rank's
    exception is raised here with its traceback; a hang ends after
    ``timeout_s`` with every process killed (``what`` names the job)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish in {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
