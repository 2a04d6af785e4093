"""BloomEmbedding and the seed's layers: construction, semantics, errors."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from oracle import forward_oracle, sklearn_rows
from support import DEVICE

from triton_bloom import (
    SEEDS,
    BloomEmbedding,
    BloomEmbeddingBag,
    ScaledEmbedding,
    ScaledEmbeddingBag,
    ZeroEmbedding,
    bloom_hash,
)

BACKENDS = ["torch", "triton"]


def test_defaults_follow_the_seed():
    emb = BloomEmbedding(1000, 16)
    assert emb.num_rows == int(0.2 * 1000)
    assert emb.num_hash_functions == 4 and emb.padding_idx == 0
    assert list(emb.state_dict()) == ["_extra_state", "embeddings.weight"]
    assert isinstance(emb.embeddings, ScaledEmbedding)
    assert emb.weight is emb.embeddings.weight
    assert emb.weight.shape == (200, 16)
    assert emb.hash_cache is None
    # Positional order of Spotlight's signature.
    emb = BloomEmbedding(500, 8, 0.5, 3, True, 7)
    assert (emb.num_rows, emb.num_hash_functions, emb.padding_idx) == (250, 3, 7)


def test_num_rows_overrides_ratio_and_ratio_truncates():
    assert BloomEmbedding(1000, 4, num_rows=33).weight.shape == (33, 4)
    assert BloomEmbedding(999, 4, compression_ratio=0.1).num_rows == int(0.1 * 999)
    assert BloomEmbedding(None, 4, num_rows=10, padding_idx=None).num_rows == 10


def test_init_is_normal_with_std_one_over_dim():
    torch.manual_seed(0)
    emb = BloomEmbedding(200_000, 20)
    w = emb.weight.detach().clone()
    assert abs(w.mean().item()) < 3e-3
    assert w.std().item() == pytest.approx(1 / 20, rel=0.02)
    emb.reset_parameters()
    assert not torch.equal(w, emb.weight.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 2)])
def test_output_shape_and_values(backend, shape):
    torch.manual_seed(1)
    emb = BloomEmbedding(300, 6, num_hash_functions=3, backend=backend, device=DEVICE)
    ids = torch.randint(0, 300, shape, device=DEVICE)
    out = emb(ids)
    assert out.shape == (*shape, 6)
    expected = forward_oracle(ids.cpu().numpy(), emb.weight.detach().cpu().numpy(), 3, padding_idx=0)
    np.testing.assert_allclose(out.detach().cpu().numpy(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_zero_is_an_ordinary_row(backend):
    # Unlike Spotlight, ids whose hash lands on row 0 keep that row, and row 0 learns.
    num_rows = 5
    emb = BloomEmbedding(100, 3, num_rows=num_rows, num_hash_functions=2, backend=backend, device=DEVICE)
    rows = sklearn_rows(np.arange(100), 2, num_rows)
    lands_on_zero = [i for i in range(1, 100) if 0 in rows[i]]
    assert lands_on_zero
    ids = torch.tensor(lands_on_zero, device=DEVICE)
    with torch.no_grad():
        emb.weight.zero_()
        emb.weight[0] = 1.0
    out = emb(ids)
    assert bool((out > 0).all())
    out.sum().backward()
    assert emb.weight.grad[0].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_idx", [None, 0, 17, 99, -1])
def test_padding(backend, padding_idx):
    torch.manual_seed(2)
    emb = BloomEmbedding(100, 5, padding_idx=padding_idx, num_rows=13, backend=backend, device=DEVICE)
    pad = None if padding_idx is None else padding_idx % 100
    assert emb.padding_idx == pad
    ids = torch.tensor([pad if pad is not None else 3, 3, 50], device=DEVICE)
    out = emb(ids)
    if pad is None:
        assert out[0].abs().sum() > 0
    else:
        assert torch.equal(out[0], torch.zeros(5, device=DEVICE))
    # The padding id adds no gradient: only the other ids' rows get some.
    emb(ids[:1]).sum().backward()
    grad = emb.weight.grad
    if pad is None:
        assert grad.abs().sum() > 0
    else:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    emb = BloomEmbedding(100, 5, backend=backend, device=DEVICE)
    for shape in [(0,), (4, 0)]:
        out = emb(torch.empty(shape, dtype=torch.long, device=DEVICE))
        assert out.shape == (*shape, 5)


def test_bag_flag_changes_nothing():
    torch.manual_seed(3)
    a = BloomEmbedding(400, 7, bag=False)
    b = BloomEmbedding(400, 7, bag=True)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 400, (9, 2))
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_cache_gives_identical_rows(backend):
    torch.manual_seed(4)
    a = BloomEmbedding(3000, 9, num_hash_functions=5, backend=backend, device=DEVICE)
    b = BloomEmbedding(3000, 9, num_hash_functions=5, hash_cache=True, backend=backend, device=DEVICE)
    b.load_state_dict(a.state_dict())
    assert list(b.state_dict()) == ["_extra_state", "embeddings.weight"]  # the cache is not state
    assert b.hash_cache.shape == (3000, 5) and b.hash_cache.dtype == torch.int32
    assert torch.equal(b.hash_cache.cpu().long(), bloom_hash(torch.arange(3000), 5, b.num_rows))
    ids = torch.randint(0, 3000, (40,), device=DEVICE)
    torch.testing.assert_close(a(ids), b(ids), atol=1e-6, rtol=1e-6)


def test_int32_and_int64_ids_agree():
    emb = BloomEmbedding(10_000, 4)
    ids = torch.randint(0, 10_000, (50,))
    assert torch.equal(emb(ids), emb(ids.int()))


def test_factory_kwargs():
    emb = BloomEmbedding(100, 3, dtype=torch.float64)
    assert emb.weight.dtype == torch.float64
    assert emb(torch.tensor([1, 2])).dtype == torch.float64
    emb = BloomEmbedding(100, 3, device="meta")
    assert emb.weight.device.type == "meta"


def test_repr():
    text = repr(BloomEmbedding(1000, 16, num_hash_functions=3, padding_idx=None, backend="torch"))
    assert "1000, 16, num_rows=200, num_hash_functions=3" in text
    assert "padding_idx" not in text and "backend='torch'" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_out_of_range_raise_index_error(backend):
    emb = BloomEmbedding(100, 4, backend=backend)
    with pytest.raises(IndexError, match="100"):
        emb(torch.tensor([3, 100]))
    with pytest.raises(IndexError, match="-5"):
        emb(torch.tensor([[3], [-5]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool, torch.int16, torch.uint8])
def test_non_index_dtypes_raise_type_error(dtype):
    emb = BloomEmbedding(100, 4)
    with pytest.raises(TypeError, match=str(dtype)):
        emb(torch.zeros(3, dtype=dtype))
    with pytest.raises(TypeError, match="Tensor"):
        emb([1, 2, 3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_hash_functions=25), "at most 24 hash functions"),
        (dict(num_hash_functions=0), "at least 1"),
        (dict(embedding_dim=0), "embedding_dim"),
        (dict(num_embeddings=0), "num_embeddings"),
        (dict(compression_ratio=0.001), "at least one"),
        (dict(compression_ratio=-1.0), "compression_ratio"),
        (dict(num_rows=0), "num_rows"),
        (dict(padding_idx=100), "padding_idx"),
        (dict(padding_idx=-101), "padding_idx"),
        (dict(backend="cuda"), "backend"),
        (dict(num_embeddings=None), "num_rows is required"),
        (dict(num_embeddings=None, num_rows=5, padding_idx=-1), "padding_idx"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(num_embeddings=100, embedding_dim=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BloomEmbedding(**args)


def test_big_id_space_holds_only_the_compressed_table():
    # 20M ids at k=4: Spotlight's cache alone would be 640 MB; ours keeps the
    # table and nothing per id, before and after a forward and backward.
    num_embeddings = 20_000_000
    emb = BloomEmbedding(num_embeddings, 8, compression_ratio=0.2, num_hash_functions=4)
    table_bytes = emb.num_rows * 8 * 4
    state = list(emb.parameters()) + list(emb.buffers())
    assert sum(t.numel() * t.element_size() for t in state) == table_bytes
    ids = torch.randint(0, num_embeddings, (64, 8))
    emb(ids).sum().backward()
    state = list(emb.parameters()) + list(emb.buffers())
    assert sum(t.numel() * t.element_size() for t in state) == table_bytes
    assert emb.hash_cache is None and not any(isinstance(v, torch.Tensor) for v in vars(emb).values())


def test_seed_layers_initialisation():
    torch.manual_seed(5)
    scaled = ScaledEmbedding(50_000, 10, padding_idx=3)
    assert scaled.weight.std().item() == pytest.approx(0.1, rel=0.03)
    assert not scaled.weight[3].any()
    zero = ZeroEmbedding(20, 1)
    assert not zero.weight.any()
    bag = ScaledEmbeddingBag(50_000, 10, mode="sum")
    assert isinstance(bag, nn.EmbeddingBag)
    assert bag.weight.std().item() == pytest.approx(0.1, rel=0.03)


def _run_python(code, env_update):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_without_triton_falls_back_to_reference():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, triton_bloom\n"
        "assert not triton_bloom.triton_available()\n"
        "emb = triton_bloom.BloomEmbedding(100, 4)\n"
        "emb(torch.tensor([1, 2])).sum().backward()\n"
        "try:\n"
        "    triton_bloom.BloomEmbedding(100, 4, backend='triton')(torch.tensor([1]))\n"
        "except RuntimeError as e:\n"
        "    assert 'failed to import' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    result = _run_python(code, {})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors with a GPU present take another path")
def test_triton_backend_on_cpu_needs_the_interpreter():
    code = (
        "import torch, triton_bloom\n"
        "emb = triton_bloom.BloomEmbedding(100, 4, backend='triton')\n"
        "try:\n"
        "    emb(torch.tensor([1]))\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "    print('ok')\n"
    )
    result = _run_python(code, {})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# Checkpoints ---------------------------------------------------------------------


def test_state_dict_round_trip_carries_the_hash_spec():
    torch.manual_seed(6)
    a = BloomEmbedding(5000, 6, num_hash_functions=3)
    state = a.state_dict()
    spec = state["_extra_state"]["hash_spec"]
    assert spec["seeds"] == list(SEEDS[:3]) and spec["num_rows"] == 1000 and spec["num_hash_functions"] == 3
    b = BloomEmbedding(5000, 6, num_hash_functions=3)
    b.load_state_dict(state)
    ids = torch.randint(0, 5000, (30,))
    assert torch.equal(a(ids), b(ids))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))


@pytest.mark.parametrize("cls", [BloomEmbedding, BloomEmbeddingBag])
def test_checkpoint_with_other_hashing_is_refused(cls):
    saved = cls(5000, 6, num_hash_functions=3).state_dict()
    # Same table shape, other k: the weights would load, and be read wrongly.
    other = cls(5000, 6, num_hash_functions=4)
    with pytest.raises(ValueError, match="num_hash_functions: checkpoint 3, module 4"):
        other.load_state_dict(saved)
    tampered = dict(saved)
    tampered["_extra_state"] = {"hash_spec": dict(saved["_extra_state"]["hash_spec"], seeds=[1, 2, 3])}
    with pytest.raises(ValueError, match="seeds"):
        cls(5000, 6, num_hash_functions=3).load_state_dict(tampered)


def test_checkpoint_without_spec_loads_as_spotlights():
    # Spotlight's state dict is just the table.
    table = torch.randn(200, 8)
    emb = BloomEmbedding(1000, 8)
    emb.load_state_dict({"embeddings.weight": table})
    assert torch.equal(emb.weight.detach(), table)
    with pytest.raises(RuntimeError, match="size mismatch"):
        emb.load_state_dict({"embeddings.weight": torch.randn(201, 8)})
