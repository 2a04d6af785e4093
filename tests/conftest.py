"""Shared test set-up: the environment, the report header and fixtures.
The helpers tests import (``DEVICE``, ``TOLERANCES``, ``require_kernels``)
live in ``support.py``.

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

from support import DEVICE  # noqa: E402
from triton_bloom import dispatch  # noqa: E402


def pytest_report_header(config):
    return (
        f"triton_bloom: device={DEVICE}, triton importable={dispatch.triton_available()}, "
        f"interpreter={dispatch.interpreter_enabled()}"
    )


@pytest.fixture
def device():
    return DEVICE
