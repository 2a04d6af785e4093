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

# Hypothesis profiles of the generated tests (tests/test_properties.py,
# tests/test_fuzz.py): "ci", the default, draws the same cases every run, so
# a red CI run is reproducible and a green one means the same thing each
# time; "long" (HYPOTHESIS_PROFILE=long) draws ten times as many fresh cases
# for local runs.  Tests size their budgets relative to max_examples.
from hypothesis import HealthCheck, settings  # noqa: E402
from support import DEVICE  # noqa: E402

from triton_bloom import dispatch  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=_SLOW_OK,
    print_blob=True,
)
settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=_SLOW_OK, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    return (
        f"triton_bloom: device={DEVICE}, triton importable={dispatch.triton_available()}, "
        f"interpreter={dispatch.interpreter_enabled()}"
    )


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per worker: `pytest -n auto` runs a worker per core,
    # and two threads each on CI's two cores would wait on each other.
    torch.set_num_threads(1)


def pytest_sessionfinish(session):
    # An xdist worker hands its generated-case counts to the controller,
    # which prints the totals (pytest_testnodedown below).
    if hasattr(session.config, "workeroutput"):
        from case_count import CASES

        session.config.workeroutput["case_counts"] = dict(CASES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    from case_count import CASES

    CASES.update(getattr(node, "workeroutput", {}).get("case_counts", {}))


def pytest_terminal_summary(terminalreporter):
    # The generated tests' case counts, visible under `pytest -q` too.
    from case_count import summary

    for line in summary():
        terminalreporter.write_line(line)


@pytest.fixture
def device():
    return DEVICE
