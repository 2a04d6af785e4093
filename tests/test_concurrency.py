"""Concurrency: lookups from several threads on one module give the
single-threaded results (the seed-tensor cache, the kernels and the
autotune cache are shared by every thread), the autotune cache file stays
whole under concurrent readers and writers, and hashing is the same in
every process whatever ``PYTHONHASHSEED`` is.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from support import DEVICE, require_kernels

from triton_bloom import BloomEmbedding, BloomEmbeddingBag

THREADS = 4
ROUNDS = 3


def run_threads(work, count):
    """``work(i)`` in ``count`` threads started together; their results, or
    the first exception any of them raised."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def body(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def make_module(kind, backend):
    torch.manual_seed(0)
    options = dict(num_rows=53, backend=backend, signed=True, importance=True, importance_rows=7, device=DEVICE)
    if kind == "embedding":
        return BloomEmbedding(5000, 12, 0.2, 5, padding_idx=3, **options)
    return BloomEmbeddingBag(5000, 12, 0.2, 5, mode="mean", padding_idx=3, **options)


def inputs(kind, i):
    g = torch.Generator().manual_seed(100 + i)
    ids = torch.randint(0, 5000, (6, 5), generator=g)
    ids[0, :2] = 3
    ids[1] = ids[2]  # duplicates across the batch
    grad = torch.randn(6, 5, 12, generator=g) if kind == "embedding" else torch.randn(6, 12, generator=g)
    return ids.to(DEVICE), grad.to(DEVICE)


def lookup(module, kind, i):
    """Forward and backward of input ``i``: ``(out, table gradient, importance gradient)``.

    ``torch.autograd.grad`` returns each call's own gradients; accumulating
    into the shared ``.grad`` from several threads is a race in any module.
    """
    ids, grad = inputs(kind, i)
    out = module(ids)
    grads = torch.autograd.grad(out, [module.weight, module.importance_weight], grad)
    return out.detach(), *grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["embedding", "bag"])
def test_threads_share_a_module(kind, backend):
    if backend == "triton":
        require_kernels()
    module = make_module(kind, backend)
    alone = [lookup(module, kind, i) for i in range(THREADS * ROUNDS)]
    together = run_threads(lambda t: [lookup(module, kind, t + THREADS * r) for r in range(ROUNDS)], THREADS)
    for t, results in enumerate(together):
        for r, result in enumerate(results):
            for got, expected in zip(result, alone[t + THREADS * r]):
                # Bit for bit: each lookup sums in its own order, whoever runs beside it.
                assert torch.equal(got, expected), f"thread {t}, round {r}"


def test_threads_see_one_seed_tensor_per_device():
    from triton_bloom.hashing import seed_tensor

    seed_tensor.cache_clear()
    tensors = run_threads(lambda i: seed_tensor(torch.device("cpu")), 8)
    reference = tensors[0].clone()
    assert all(torch.equal(t, reference) for t in tensors)


def _entry(i):
    return {
        "kernel": f"k{i}",
        "source": "s",
        "key": {"dim": i},
        "dtypes": {"W": "torch.float32"},
        "device": "GPU",
        "config": {"kwargs": {"BLOCK_N": 16, "BLOCK_D": 32}, "num_warps": 4, "num_stages": 1},
    }


def test_autotune_cache_under_concurrent_writers_and_readers(tmp_path, monkeypatch):
    require_kernels()
    from triton_bloom.kernels import autotune

    path = str(tmp_path / "autotune.json")
    autotune.set_cache_path(path)
    try:

        def work(i):
            if i % 2 == 0:  # writers, each adding its own entry
                for r in range(5):
                    autotune.save_cache([_entry(i * 10 + r)], path)
                return None
            seen = []
            for _ in range(20):  # readers: the file is always whole
                seen.append(len(autotune.read_entries(path)))
                autotune.cached_configs()
            return seen

        run_threads(work, 8)
        # No writer's entry is lost to another's read-merge-write.
        stored = {e["kernel"] for e in autotune.read_entries(path)}
        assert stored == {f"k{i * 10 + r}" for i in range(0, 8, 2) for r in range(5)}
        with open(path) as f:
            assert json.load(f)["format"] == autotune.CACHE_FORMAT
    finally:
        autotune.reset_cache_path()


HASH_SCRIPT = r"""
import hashlib, sys, torch
from triton_bloom import BloomEmbedding, bloom_hash
from triton_bloom.hashing import bloom_signs, importance_rows
ids = torch.tensor([0, 1, 2, 3, 999, 2**31 - 1, 2**31, 2**40 + 7, 2**63 - 1] + list(range(10_000, 10_200)))
digest = hashlib.sha256()
for k, rows in ((1, 1), (4, 97), (24, 2**31 + 11)):
    digest.update(bloom_hash(ids, k, rows).numpy().tobytes())
digest.update(bloom_signs(ids, 24).numpy().tobytes())
digest.update(importance_rows(ids, 13).numpy().tobytes())
torch.manual_seed(0)
emb = BloomEmbedding(None, 8, num_rows=101, num_hash_functions=6, padding_idx=None, signed=True)
digest.update(emb(ids).detach().numpy().tobytes())
print(digest.hexdigest())
"""


def test_processes_agree_whatever_pythonhashseed():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for hashseed in ("0", "4242", "random"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run([sys.executable, "-c", HASH_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        digests.add(done.stdout.strip())
    assert len(digests) == 1, digests
    # And this process, under its own PYTHONHASHSEED, agrees.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(HASH_SCRIPT, {})
    assert digests == {out.getvalue().strip()}
