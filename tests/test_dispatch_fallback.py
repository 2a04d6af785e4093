"""Backend dispatch when the kernels do not load: which import errors mean
"Triton is missing" (fall back, and say so once) and which are bugs (raise);
and the kernels' import from a source checkout that is not installed.

No GPU is needed: ``torch.device("cuda")`` exists without one, and the loader
is pointed at stand-in modules.
"""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from triton_bloom import dispatch

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def loader(monkeypatch, tmp_path):
    """Point the loader at a module written for the test; ``loader(source)``
    returns its name.  The warning's once-flag and the loader's cache are
    reset before and after, so the real kernels load again for later tests."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(dispatch, "_fallback_warned", False)
    dispatch._load_kernels.cache_clear()
    count = 0

    def point_at(source):
        nonlocal count
        count += 1
        name = f"stand_in_kernels_{count}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.setattr(dispatch, "KERNELS_MODULE", name)
        dispatch._load_kernels.cache_clear()
        return name

    yield point_at
    monkeypatch.undo()
    dispatch._load_kernels.cache_clear()


@pytest.fixture
def no_triton(loader, monkeypatch):
    """The loader sees the ModuleNotFoundError of a host without Triton."""
    monkeypatch.setitem(sys.modules, "triton", None)
    loader("import triton\n")


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, dispatch.TritonFallbackWarning)]


def test_missing_triton_warns_once_with_the_reason(no_triton):
    with pytest.warns(dispatch.TritonFallbackWarning) as record:
        assert dispatch.use_triton("auto", CUDA) is False
    [warning] = fallback_warnings(record)
    message = str(warning.message)
    assert "ModuleNotFoundError" in message and "triton" in message
    assert "pip install triton" in message and "backend='torch'" in message
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert dispatch.use_triton("auto", CUDA) is False
        assert dispatch.use_triton("auto", torch.device("cuda", 1)) is False
    assert not fallback_warnings(again)


def test_no_warning_for_torch_backend_or_cpu_tensors(no_triton):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert dispatch.use_triton("torch", CUDA) is False
        assert dispatch.use_triton("torch", CPU) is False
        assert dispatch.use_triton("auto", CPU) is False
    assert not fallback_warnings(record)
    # The flag is still unset: the first CUDA fallback would warn.
    with pytest.warns(dispatch.TritonFallbackWarning):
        dispatch.use_triton("auto", CUDA)


def test_triton_backend_without_triton_names_the_import_error(no_triton):
    for device in (CUDA, CPU):
        with pytest.raises(RuntimeError, match="failed to import.*ModuleNotFoundError.*pip install triton"):
            dispatch.use_triton("triton", device)
    assert not dispatch.triton_available()


def test_old_triton_without_gpu_driver_counts_as_missing(loader):
    # What Triton 3.0-3.2 raised when an autotuned kernel was defined on a
    # host with no GPU driver.
    loader('raise RuntimeError("0 active drivers ([]). There should only be one.")\n')
    with pytest.warns(dispatch.TritonFallbackWarning, match="0 active drivers.*no GPU driver"):
        assert dispatch.use_triton("auto", CUDA) is False


@pytest.mark.parametrize(
    "source, error",
    [
        ('raise ValueError("a bug in the kernels module")\n', ValueError),
        ("def broken(:\n", SyntaxError),
        ('raise RuntimeError("2 active drivers ([a, b]). There should only be one.")\n', RuntimeError),
        # Triton installed, but without what the kernels need: an API mismatch.
        ('raise ModuleNotFoundError("No module named \'triton.moved\'", name="triton.moved")\n', ModuleNotFoundError),
        ("raise ImportError(\"cannot import name 'knobs' from 'triton'\", name=\"triton\")\n", ImportError),
        ("import a_module_nobody_has\n", ModuleNotFoundError),
    ],
    ids=["ValueError", "SyntaxError", "other-RuntimeError", "triton-submodule", "triton-name", "other-module"],
)
def test_other_import_errors_propagate(loader, source, error):
    loader(source)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for call in (
            lambda: dispatch.use_triton("auto", CUDA),
            dispatch.triton_available,
            lambda: dispatch.use_triton("triton", CUDA),
        ):
            with pytest.raises(error):
                call()
    assert not fallback_warnings(record)
    # CPU tensors under auto never load the kernels, so they still run.
    assert dispatch.use_triton("auto", CPU) is False


def test_triton_missing_classifies_errors():
    assert dispatch.triton_missing(ModuleNotFoundError("No module named 'triton'", name="triton"))
    assert not dispatch.triton_missing(ModuleNotFoundError("x", name="tritonish"))
    assert not dispatch.triton_missing(ModuleNotFoundError("x", name="triton.language"))
    assert not dispatch.triton_missing(ImportError("cannot import name 'x' from 'triton'", name="triton"))
    assert not dispatch.triton_missing(RuntimeError("1 active drivers ([x]). There should only be one."))
    assert not dispatch.triton_missing(OSError("libcuda.so"))


def test_fallback_decision_compiles_without_graph_break(monkeypatch):
    # Not through sys.modules["triton"] = None: torch.compile itself imports
    # Triton, which this host has.
    missing = ModuleNotFoundError("No module named 'triton'", name="triton")
    monkeypatch.setattr(dispatch, "_load_kernels", lambda: (None, missing))
    monkeypatch.setattr(dispatch, "_fallback_warned", False)
    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def step(x):
        if dispatch.use_triton("auto", torch.device("cuda")):
            return x + 1
        return x - 1

    try:
        with pytest.warns(dispatch.TritonFallbackWarning):
            assert torch.equal(step(torch.zeros(3)), torch.full((3,), -1.0))
    finally:
        torch._dynamo.reset()


def test_kernels_import_from_an_uninstalled_source_checkout(tmp_path):
    # The GPU host runs the working tree with PYTHONPATH=<checkout> and no
    # install, so triton_bloom.kernels does not exist as a module there.  Here
    # the project may be pip-installed editable: setuptools' editable finder
    # sits on sys.meta_path after the path finder and maps
    # triton_bloom.kernels to kernels/ itself, so it would answer even for a
    # checkout found through PYTHONPATH.  Remove it, as that host has none.
    code = textwrap.dedent(
        """
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path
                            if not getattr(f, "__module__", "").startswith("__editable__")]
        import importlib.util
        import triton_bloom
        assert importlib.util.find_spec("triton_bloom.kernels") is None, "triton_bloom.kernels is installed"
        from triton_bloom import dispatch
        assert dispatch.triton_available()
        import triton_bloom.kernels as kernels
        from triton_bloom.kernels import autotune
        print(triton_bloom.__file__)
        print(kernels.__file__)
        print(autotune.__file__)
        print(sys.modules["triton_bloom.kernels.forward"].__name__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines == [
        str(ROOT / "triton_bloom" / "__init__.py"),
        str(ROOT / "kernels" / "__init__.py"),
        str(ROOT / "kernels" / "autotune.py"),
        "triton_bloom.kernels.forward",
    ]


def test_checkout_fallback_only_for_the_kernels_package_itself(loader):
    # A module missing *inside* the kernels is a bug, not a missing install.
    loader(
        'raise ModuleNotFoundError("No module named \'triton_bloom.kernels.gone\'", name="triton_bloom.kernels.gone")\n'
    )
    with pytest.raises(ModuleNotFoundError, match="gone"):
        dispatch.triton_available()
