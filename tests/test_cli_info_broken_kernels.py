"""``triton-bloom info`` where the kernels do not load: it reports why, as a
row of its table, and exits 0, both when Triton cannot run here (the
fallback case) and when the kernels' own import raises (a bug, or a Triton
they do not match), which a lookup would raise too."""

import sys
import textwrap

import pytest

import triton_bloom
from triton_bloom import cli, dispatch


@pytest.fixture
def kernels_module(monkeypatch, tmp_path):
    """Point the kernels loader at a module written for the test; the
    loader's cache is cleared before and after, so the real kernels load
    again for later tests."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("COLUMNS", "300")  # rich folds long cells at 80 columns when not on a terminal

    def point_at(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.setattr(dispatch, "KERNELS_MODULE", name)
        dispatch._load_kernels.cache_clear()

    yield point_at
    monkeypatch.undo()
    dispatch._load_kernels.cache_clear()


def info(capsys):
    code = cli.main(["info"])
    return code, capsys.readouterr().out


def test_info_reports_kernels_that_raise_on_import(kernels_module, capsys):
    kernels_module("broken_kernels_1", "raise AttributeError('module triton.language has no attribute made_up')\n")
    with pytest.raises(AttributeError):  # what a lookup on the Triton path meets
        dispatch.triton_available()
    code, out = info(capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if "Triton kernels import" in line)
    assert "no" in row and "AttributeError" in row and "made_up" in row, row
    assert "n/a (the Triton kernels do not import)" in out
    assert "Traceback" not in out


def test_info_reports_a_missing_triton(kernels_module, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ModuleNotFoundError
    kernels_module("kernels_without_triton_1", "import triton\n")
    assert not dispatch.triton_available()
    code, out = info(capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if "Triton kernels import" in line)
    assert "no" in row and "ModuleNotFoundError" in row, row
    assert "not installed" in out  # the triton version row


def test_info_says_yes_when_the_kernels_load(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    if not dispatch.triton_available():
        pytest.skip("the kernels do not load here")
    code, out = info(capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if "Triton kernels import" in line)
    assert row.split("Triton kernels import")[1].strip(" │|").startswith("yes"), row


def test_fallback_warning_is_exported_at_the_top_level():
    assert "TritonFallbackWarning" in triton_bloom.__all__
    assert triton_bloom.TritonFallbackWarning is dispatch.TritonFallbackWarning
    assert issubclass(triton_bloom.TritonFallbackWarning, RuntimeWarning)
