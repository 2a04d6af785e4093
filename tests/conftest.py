"""Shared test set-up.

Without a CUDA device the Triton kernels run through Triton's interpreter on
CPU tensors.  ``TRITON_INTERPRET`` must be set before ``triton.jit`` defines
them, that is before ``triton_bloom.kernels`` is first imported, hence here,
at the top of the first file pytest loads.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's pool of compile workers, once started by a torch.compile test,
# stalls the processes the distributed tests spawn later in the same session
# (their training hangs until the test's deadline). On CI's 2 cores parallel
# compilation gains little anyway: compile in the test process itself.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from triton_bloom import dispatch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Tolerances of the kernels against the reference, per weight dtype: float32
# sums of k rows agree to rounding; half precision rounds the output once.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def pytest_report_header(config):
    return (
        f"triton_bloom: device={DEVICE}, triton importable={dispatch.triton_available()}, "
        f"interpreter={dispatch.interpreter_enabled()}"
    )


@pytest.fixture
def device():
    return DEVICE


def require_kernels():
    """The kernels module; kernel tests fail (never skip) when it cannot load,
    since CI must run them through the interpreter."""
    return dispatch.kernels()
