"""Speed of BloomEmbedding / BloomEmbeddingBag against every way PyTorch
users compute (or avoid computing) the same lookup, timed in one run.

Providers (every one computes Spotlight's Bloom function on the same table
and the same ids, checked before timing, except ``full_embedding``):

- ``triton_bloom``: our module with ``backend="auto"``: the Triton kernels on
  CUDA; on CPU that *is* the reference path (the output says so);
- ``reference``: our module with ``backend="torch"`` (hash, one fused
  ``embedding_bag``; ``index_add_`` backward);
- ``seed``: Spotlight's way (``bench/baselines.py``): a per-id hash table,
  ``index_select``, a gather of ``(n, k, dim)`` rows, a sum over ``k``;
- ``embedding_bag_cached``: the best plain-PyTorch way: the precomputed
  ``(num_embeddings, k)`` row table (int32), then one ``F.embedding_bag``
  over the ``(n, k)`` rows (or ``(bags, ids_per_bag * k)`` for bags), mode sum;
- ``full_embedding``: ``nn.Embedding`` / ``nn.EmbeddingBag`` at full size,
  ``num_embeddings`` rows: what Bloom compression replaces;
- ``fbgemm`` (CUDA only, when ``fbgemm_gpu`` imports): FBGEMM's
  ``SplitTableBatchedEmbeddingBagsCodegen`` over the compressed table with
  the cached rows as bags of ``k``.  Its backward fuses an SGD update into the
  table (that is how TBE trains), so its backward does a little more.

Padding is Spotlight's: id 0 is padding (our modules' ``padding_idx=0``), the
seed's table sends its ``k`` hashes to row 0, and row 0 of the shared table
is zero, so all Bloom providers give the same outputs.

Modes: ``forward`` (autograd on, as in training), ``backward`` (one forward,
then ``output.backward(grad, retain_graph=True)`` timed alone) and
``forward_backward``; gradients are reset to ``None`` between runs, outside
the timed region, as ``zero_grad()`` does.  Times are the median of
``repeats`` runs after ``warmup`` runs; CUDA runs are timed with CUDA events,
and a 256 MB buffer is written before every timed run so no table is served
from the H200's 60 MB L2 (``--flush`` does the same on CPU, off by default:
it costs more than the lookups).

Effective bandwidth (``gbps``) counts the bytes the lookup cannot avoid:
forward reads ``n*k*dim*elem`` bytes of rows and the ``n`` int64 ids, and
writes the output (``n*dim*elem``, or ``bags*dim*elem``); backward reads the
ids and the output gradient and read-modify-writes ``n*k*dim*4`` bytes of
float32 accumulator (counted twice, read and written, as the copy's bytes
are); ``forward_backward`` is the sum.  ``full_embedding`` has ``k = 1``.
``fraction_of_copy`` divides it by ``Tensor.copy_``'s bandwidth (bytes read
plus written) measured in the same run (1 GiB on CUDA, 256 MiB on CPU).  The
dense ``(num_rows, dim)`` gradient's zero fill is not counted.

Ratios: ``ratio_to_<p> = ms of p / ms of this row`` for the same shape and
mode (above 1: this row is faster than ``p``).

    python bench/perf/speed.py [--quick] [--out FILE.json] [--device cpu|cuda]

writes FILE.json, FILE.md (tables) and FILE.png (ms vs embedding_dim).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import types
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.baselines import SpotlightBloomEmbedding  # noqa: E402
from bench.common import environment, markdown_table, write_outputs  # noqa: E402
from triton_bloom import BloomEmbedding, BloomEmbeddingBag, dispatch  # noqa: E402

PROVIDERS = ("triton_bloom", "reference", "seed", "embedding_bag_cached", "full_embedding", "fbgemm")
MODES = ("forward", "backward", "forward_backward")
LAYERS = ("embedding", "bag")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PADDING_IDX = 0
ZIPF_EXPONENT = 1.1
FLUSH_BYTES = 256 * 2**20
ID_BYTES = 8  # int64 ids, nn.Embedding's default
# Comparing different functions would make the timings meaningless: outputs
# must agree with the seed's to these tolerances (half precision: the seed
# rounds its k-sum in the table's dtype, we accumulate in float32).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape: ``batch`` samples (or bags) of ``seq`` ids each."""

    layer: str = "embedding"
    batch: int = 4096
    seq: int = 8
    embedding_dim: int = 64
    k: int = 4
    dtype: str = "float32"
    distribution: str = "uniform"
    num_embeddings: int = 1_000_000
    compression_ratio: float = 0.2

    @property
    def num_ids(self) -> int:
        return self.batch * self.seq

    @property
    def num_rows(self) -> int:
        return int(self.compression_ratio * self.num_embeddings)


def sweep(base: Case, **axes) -> list:
    """``base``, then ``base`` with one field changed at a time: every axis is
    covered without the full product, and the plot's x axis is one of them."""
    cases = [base]
    for field, values in axes.items():
        cases += [dataclasses.replace(base, **{field: v}) for v in values]
    return list(dict.fromkeys(cases))


def default_cases(
    device: torch.device, quick: bool, num_embeddings: Optional[int] = None, batch: Optional[int] = None
) -> list:
    """The sweeps ``main`` runs; ``--quick`` is a handful of shapes."""
    cuda = device.type == "cuda"
    dtypes = ["float32", "bfloat16"] + (["float16"] if cuda else [])
    if quick:
        base = Case(batch=batch or 1024, seq=8, num_embeddings=num_embeddings or 1_000_000)
        embedding = sweep(base, embedding_dim=[16, 128], k=[1, 8], dtype=dtypes, distribution=["zipf"])
        bag = sweep(dataclasses.replace(base, layer="bag"), embedding_dim=[16, 128])
        return embedding + bag
    # Big enough that the compressed table (2M rows) outgrows the H200's L2.
    base = Case(batch=batch or 4096, seq=8, num_embeddings=num_embeddings or (10_000_000 if cuda else 1_000_000))
    batches = [b for b in (512, 4096, 32768) if cuda or b <= 4096]
    axes = dict(
        batch=batches,
        embedding_dim=[16, 32, 64, 128, 256, 512],
        k=[1, 2, 4, 8],
        dtype=dtypes,
        distribution=["uniform", "zipf"],
    )
    return sweep(base, **axes) + sweep(dataclasses.replace(base, layer="bag"), **axes)


# ---------------------------------------------------------------- timing


class Timer:
    """Runs of ``fn`` in milliseconds, warm-up excluded.

    CUDA: events around each run; ``setup`` and the cache flush are enqueued
    before the start event, so neither is timed.  CPU: ``perf_counter``.
    """

    def __init__(self, device: torch.device, repeats: int, warmup: int, flush: bool):
        self.cuda = device.type == "cuda"
        self.repeats, self.warmup = repeats, warmup
        self.flush_buffer = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if flush else None

    def __call__(self, fn: Callable, setup: Optional[Callable] = None) -> list:
        for _ in range(self.warmup):
            if setup:
                setup()
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
            for start, end in zip(starts, ends):
                if setup:
                    setup()
                if self.flush_buffer is not None:
                    self.flush_buffer.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in zip(starts, ends)]
        times = []
        for _ in range(self.repeats):
            if setup:
                setup()
            if self.flush_buffer is not None:
                self.flush_buffer.fill_(1)
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)``, bytes read plus bytes written: the
    ceiling the lookups' effective bandwidth is compared with."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(Timer(device, repeats, warmup=2, flush=False)(lambda: dst.copy_(src)))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def traffic_bytes(case: Case, mode: str, rows_per_id: int) -> int:
    """Bytes a lookup of ``case`` must move (see the module docstring)."""
    elem = DTYPES[case.dtype].itemsize
    n, dim = case.num_ids, case.embedding_dim
    outputs = case.batch if case.layer == "bag" else n
    forward = n * rows_per_id * dim * elem + n * ID_BYTES + outputs * dim * elem
    backward = n * ID_BYTES + outputs * dim * elem + 2 * n * rows_per_id * dim * 4
    return {"forward": forward, "backward": backward, "forward_backward": forward + backward}[mode]


# ---------------------------------------------------------------- inputs and providers


class Cache:
    """One slot per kind of expensive object (the seed's hash table, the
    shared weights, the full tables, Zipf's CDF), kept while consecutive
    shapes share its key and dropped before the next one is built, so the
    sweep neither rebuilds nor accumulates them."""

    def __init__(self):
        self.slots = {}

    def get(self, slot: str, key, build: Callable):
        held = self.slots.get(slot)
        if held is not None and held[0] == key:
            return held[1]
        self.slots.pop(slot, None)
        value = build()
        self.slots[slot] = (key, value)
        return value


def zipf_cdf(num_embeddings: int, exponent: float):
    """CDF of a Zipf law over ranks ``1..num_embeddings`` and a fixed random
    permutation from ranks to ids: popular ids are spread over the id space,
    and the most popular one is not the padding id."""
    weights = np.arange(1, num_embeddings + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    permutation = np.random.default_rng(1).permutation(num_embeddings)
    return cdf, permutation


def sample_ids(case: Case, device: torch.device, cache: Cache, seed: int = 0) -> torch.Tensor:
    """``(batch, seq)`` int64 ids drawn uniformly or Zipf(1.1) from the id space."""
    if case.distribution == "uniform":
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, case.num_embeddings, (case.batch, case.seq), generator=generator)
    elif case.distribution == "zipf":
        cdf, permutation = cache.get(
            "zipf", (case.num_embeddings, ZIPF_EXPONENT), lambda: zipf_cdf(case.num_embeddings, ZIPF_EXPONENT)
        )
        draws = np.random.default_rng(seed).random(case.num_ids)
        ranks = np.minimum(np.searchsorted(cdf, draws, side="right"), case.num_embeddings - 1)
        ids = torch.from_numpy(permutation[ranks].reshape(case.batch, case.seq).astype(np.int64))
    else:
        raise ValueError(f"unknown distribution {case.distribution!r}")
    return ids.to(device)


def shared_weight(case: Case, device: torch.device) -> torch.Tensor:
    """The compressed table every Bloom provider copies: Spotlight's init,
    row 0 zero (the seed's padding row)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(case.num_rows, case.embedding_dim, generator=generator) / case.embedding_dim
    weight[PADDING_IDX] = 0
    return weight.to(device=device, dtype=DTYPES[case.dtype])


def seed_layer(case: Case, k_max: int, device: torch.device):
    """Spotlight's layer and its per-id hash table for ``k_max`` hash
    functions.  Hashing every id with scikit-learn costs seconds, so it runs
    once per id space: column ``j`` is hash function ``j``'s, so the table for
    a smaller ``k`` is the first ``k`` columns, and each shape gives the layer
    its own ``(num_rows, dim)`` table."""
    seed = SpotlightBloomEmbedding(case.num_embeddings, 1, case.compression_ratio, k_max, PADDING_IDX)
    return seed, seed.hashes.to(device)


_FBGEMM = None


def load_fbgemm():
    """FBGEMM's TBE classes, or ``(None, why)``: the provider is optional."""
    global _FBGEMM
    if _FBGEMM is not None:
        return _FBGEMM
    try:
        import fbgemm_gpu  # registers the torch.ops.fbgemm operators

        try:
            from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
                ComputeDevice,
                SplitTableBatchedEmbeddingBagsCodegen,
            )
        except ImportError:  # fbgemm_gpu before 0.5 kept them in one module
            from fbgemm_gpu.split_table_batched_embeddings_ops import (
                ComputeDevice,
                EmbeddingLocation,
                PoolingMode,
                SplitTableBatchedEmbeddingBagsCodegen,
            )
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType

        api = types.SimpleNamespace(
            TBE=SplitTableBatchedEmbeddingBagsCodegen,
            EmbeddingLocation=EmbeddingLocation,
            ComputeDevice=ComputeDevice,
            PoolingMode=PoolingMode,
            EmbOptimType=EmbOptimType,
            SparseType=SparseType,
            version=getattr(fbgemm_gpu, "__version__", "unknown"),
        )
        _FBGEMM = (api, None)
    except Exception as exc:  # ImportError, or a library built for another torch/CUDA
        _FBGEMM = (None, f"fbgemm_gpu did not import ({type(exc).__name__}: {exc}); provider 'fbgemm' skipped")
    return _FBGEMM


@dataclasses.dataclass
class Provider:
    forward: Callable[[], torch.Tensor]
    params: list
    rows_per_id: int
    backend: str
    bloom: bool = True  # computes the Bloom function (checked against the seed)


def fbgemm_table(case: Case, weight: torch.Tensor, device: torch.device):
    """A one-table TBE holding ``weight``, pooling bags of rows by sum and
    training by exact SGD (TBE's backward applies the update itself)."""
    api, why = load_fbgemm()
    if api is None:
        raise RuntimeError(why)
    precision = {"float32": api.SparseType.FP32, "float16": api.SparseType.FP16, "bfloat16": api.SparseType.BF16}
    tbe = api.TBE(
        embedding_specs=[(case.num_rows, case.embedding_dim, api.EmbeddingLocation.DEVICE, api.ComputeDevice.CUDA)],
        optimizer=api.EmbOptimType.EXACT_SGD,
        learning_rate=0.01,
        weights_precision=precision[case.dtype],
        output_dtype=precision[case.dtype],
        pooling_mode=api.PoolingMode.SUM,
        device=device,
    )
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(weight)
    return tbe


def output_shape(case: Case) -> tuple:
    if case.layer == "bag":
        return (case.batch, case.embedding_dim)
    return (case.batch, case.seq, case.embedding_dim)


def build_providers(
    case: Case, ids: torch.Tensor, device: torch.device, names, cache: Cache, notes: list, k_max: Optional[int] = None
) -> dict:
    """``name -> Provider`` for ``case``, all on copies of one table;
    ``k_max``: the most hash functions any case of this id space needs."""
    dtype = DTYPES[case.dtype]
    bag = case.layer == "bag"
    weight = cache.get("weight", (case.num_rows, case.embedding_dim, case.dtype), lambda: shared_weight(case, device))
    space = (case.num_embeddings, case.compression_ratio)
    k_max = max(k_max or case.k, case.k)
    seed, all_hashes = cache.get("seed", (*space, k_max), lambda: seed_layer(case, k_max, device))
    hashes = cache.get("hashes", (*space, case.k), lambda: all_hashes[:, : case.k].contiguous())
    flat_ids = ids.reshape(-1)
    out_shape = output_shape(case)
    providers = {}
    if dispatch.use_triton("auto", device):
        auto_backend = "triton"
    elif device.type == "cuda":
        auto_backend = "torch (reference path: Triton did not import)"
    else:
        auto_backend = "torch (reference path: no CUDA)"

    for name, backend in (("triton_bloom", "auto"), ("reference", "torch")):
        if name not in names:
            continue
        if bag:
            module = BloomEmbeddingBag(
                case.num_embeddings,
                case.embedding_dim,
                case.compression_ratio,
                case.k,
                mode="sum",
                padding_idx=PADDING_IDX,
                backend=backend,
                device=device,
                dtype=dtype,
            )
        else:
            module = BloomEmbedding(
                case.num_embeddings,
                case.embedding_dim,
                case.compression_ratio,
                case.k,
                padding_idx=PADDING_IDX,
                backend=backend,
                device=device,
                dtype=dtype,
            )
        with torch.no_grad():
            module.weight.copy_(weight)
        providers[name] = Provider(
            lambda m=module: m(ids), [module.weight], case.k, auto_backend if backend == "auto" else "torch"
        )

    if "seed" in names:
        seed.hashes = hashes
        seed.embeddings = nn.Embedding(
            case.num_rows, case.embedding_dim, padding_idx=PADDING_IDX, device=device, dtype=dtype
        )
        with torch.no_grad():
            seed.embeddings.weight.copy_(weight)
        fn = (lambda: seed(ids).sum(1)) if bag else (lambda: seed(ids))
        providers["seed"] = Provider(fn, [seed.embeddings.weight], case.k, "torch")

    if "embedding_bag_cached" in names:
        table = cache.get("table", (*space, case.k), lambda: hashes.to(torch.int32))
        cached_weight = nn.Parameter(weight.clone())
        width = case.seq * case.k if bag else case.k

        def cached():
            rows = table.index_select(0, flat_ids).view(-1, width)
            return F.embedding_bag(rows, cached_weight, mode="sum").view(out_shape)

        providers["embedding_bag_cached"] = Provider(cached, [cached_weight], case.k, "torch")

    if "full_embedding" in names:
        # One full table for both layers: initialising num_embeddings rows
        # costs more than most timings.
        full_weight = cache.get(
            "full",
            (case.num_embeddings, case.embedding_dim, case.dtype),
            lambda: torch.randn(case.num_embeddings, case.embedding_dim, device=device, dtype=dtype),
        )
        if bag:
            full = nn.EmbeddingBag.from_pretrained(full_weight, freeze=False, mode="sum")
        else:
            full = nn.Embedding.from_pretrained(full_weight, freeze=False)
        providers["full_embedding"] = Provider(lambda: full(ids), [full.weight], 1, "torch", bloom=False)

    if "fbgemm" in names and device.type == "cuda":
        try:
            tbe = fbgemm_table(case, weight, device)
            per_bag = case.seq * case.k if bag else case.k
            offsets = torch.arange(0, case.num_ids * case.k + 1, per_bag, device=device, dtype=torch.int64)

            def tbe_forward():
                rows = hashes.index_select(0, flat_ids).reshape(-1)
                return tbe(rows, offsets).view(out_shape)

            providers["fbgemm"] = Provider(tbe_forward, [], case.k, f"fbgemm_gpu {load_fbgemm()[0].version}")
        except Exception as exc:
            note = f"fbgemm skipped for {case.layer} dim={case.embedding_dim} {case.dtype}: {type(exc).__name__}: {exc}"
            if note not in notes:
                notes.append(note)
    return providers


def check_outputs(providers: dict, case: Case) -> dict:
    """Whether each Bloom provider's forward equals the seed's (``None`` for
    ``full_embedding``, a different function)."""
    if "seed" not in providers:
        return {}
    with torch.no_grad():
        expected = providers["seed"].forward().float()
        tolerance = TOLERANCES[DTYPES[case.dtype]]
        return {
            name: bool(torch.allclose(p.forward().float(), expected, **tolerance)) if p.bloom else None
            for name, p in providers.items()
        }


def time_provider(provider: Provider, mode: str, grad_out: torch.Tensor, timer: Timer) -> list:
    def clear():
        for p in provider.params:
            p.grad = None

    if mode == "forward":
        return timer(provider.forward)
    if mode == "forward_backward":
        return timer(lambda: provider.forward().backward(grad_out), setup=clear)
    out = provider.forward()
    times = timer(lambda: out.backward(grad_out, retain_graph=True), setup=clear)
    clear()
    return times


# ---------------------------------------------------------------- the run


def run(
    cases,
    device,
    repeats: int = 20,
    warmup: int = 3,
    providers=PROVIDERS,
    flush: Optional[bool] = None,
    copy_bytes: Optional[int] = None,
    log=print,
) -> dict:
    """Time every provider on every case; returns the JSON payload.

    ``flush`` defaults to on for CUDA, off for CPU; ``copy_bytes`` to 1 GiB on
    CUDA and 256 MiB on CPU.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    flush = cuda if flush is None else flush
    copy_bytes = copy_bytes or (2**30 if cuda else 256 * 2**20)
    names = [p for p in PROVIDERS if p in providers]
    env = environment()
    hardware = env.get("gpu") if cuda else env["cpu"]
    notes = []
    if not cuda:
        notes.append(
            "CPU run: 'triton_bloom' (backend='auto') runs the reference PyTorch path here, "
            "as 'reference' does; the Triton kernels need CUDA."
        )
        if "fbgemm" in names:
            notes.append("fbgemm is CUDA-only: provider skipped on CPU.")
    if not flush:
        notes.append("caches were not flushed between runs: small tables may be served from cache.")
    if cuda and "fbgemm" in names:
        api, why = load_fbgemm()
        if api is None:
            notes.append(why)
        else:
            env["fbgemm_gpu"] = api.version
    for note in notes:
        log(f"note: {note}")

    copy_gbps = copy_bandwidth(device, copy_bytes)
    log(f"copy_ bandwidth on {device} ({hardware}): {copy_gbps:.1f} GB/s (read + write, {copy_bytes / 2**20:.0f} MiB)")
    timer = Timer(device, repeats, warmup, flush)
    cache = Cache()
    stamp = {
        "hardware": hardware,
        "device": device.type,
        "date": env["date"],
        "torch": env["torch"],
        "triton": env["triton"],
        "python": env["python"],
        "cuda": env.get("cuda"),
        "fbgemm_gpu": env.get("fbgemm_gpu"),
    }
    k_max = {}
    for case in cases:
        space = (case.num_embeddings, case.compression_ratio)
        k_max[space] = max(k_max.get(space, 0), case.k)
    rows = []
    started = time.perf_counter()
    for index, case in enumerate(cases):
        ids = sample_ids(case, device, cache)
        space = (case.num_embeddings, case.compression_ratio)
        built = build_providers(case, ids, device, names, cache, notes, k_max[space])
        matches = check_outputs(built, case)
        for name, ok in matches.items():
            if ok is False:
                log(f"WARNING: {name} disagrees with seed on {case}: its timings compare different functions")
        grad_out = torch.randn(output_shape(case), generator=torch.Generator().manual_seed(1))
        grad_out = grad_out.to(device, DTYPES[case.dtype])
        case_rows = []
        for mode in MODES:
            for name, provider in built.items():
                times = time_provider(provider, mode, grad_out, timer)
                ms = statistics.median(times)
                gbps = traffic_bytes(case, mode, provider.rows_per_id) / (ms * 1e-3) / 1e9
                case_rows.append(
                    {
                        **stamp,
                        "provider": name,
                        "backend": provider.backend,
                        "mode": mode,
                        **dataclasses.asdict(case),
                        "num_ids": case.num_ids,
                        "num_rows": case.num_rows,
                        "ms": ms,
                        "ms_min": min(times),
                        "repeats": len(times),
                        "gbps": gbps,
                        "fraction_of_copy": gbps / copy_gbps,
                        "cache_flushed": flush,
                        "matches_seed": matches.get(name),
                    }
                )
        add_ratios(case_rows)
        rows += case_rows
        del built, ids, grad_out
        log(
            f"[{index + 1}/{len(cases)} {time.perf_counter() - started:.0f}s] {describe(case)}: "
            + summary_line(case_rows)
        )
    return {
        "benchmark": "speed",
        "device": device.type,
        "hardware": hardware,
        "environment": env,
        "copy_gbps": copy_gbps,
        "copy_bytes": copy_bytes,
        "cache_flushed": flush,
        "repeats": repeats,
        "warmup": warmup,
        "zipf_exponent": ZIPF_EXPONENT,
        "notes": notes,
        "rows": rows,
    }


def add_ratios(case_rows: list) -> None:
    """``ratio_to_<p>`` on every row of one shape: ``p``'s ms over the row's,
    same mode."""
    for mode in MODES:
        same = [r for r in case_rows if r["mode"] == mode]
        baseline_ms = {r["provider"]: r["ms"] for r in same}
        for r in same:
            for name, ms in baseline_ms.items():
                r[f"ratio_to_{name}"] = ms / r["ms"]


def describe(case: Case) -> str:
    return (
        f"{case.layer} batch={case.batch}x{case.seq} dim={case.embedding_dim} k={case.k} {case.dtype} "
        f"{case.distribution}"
    )


def summary_line(case_rows: list) -> str:
    ours = [r for r in case_rows if r["provider"] == "triton_bloom" and "ratio_to_seed" in r]
    return ", ".join(f"{r['mode']} {r['ms']:.2f} ms ({r['ratio_to_seed']:.2f}x seed)" for r in ours)


# ---------------------------------------------------------------- outputs

SHAPE_FIELDS = ("batch", "seq", "embedding_dim", "k", "dtype", "distribution")


def markdown_report(payload: dict) -> str:
    rows = payload["rows"]
    env = payload["environment"]
    names = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    lines = [
        f"# Speed: triton_bloom vs baselines on {payload['device']} ({payload['hardware']})",
        "",
        f"{env['date']}; torch {env['torch']} ({env['torch_threads']} CPU threads), triton {env['triton']}, "
        f"python {env['python']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        + (f", fbgemm_gpu {env['fbgemm_gpu']}" if env.get("fbgemm_gpu") else "")
        + ".",
        f"Median of {payload['repeats']} runs after {payload['warmup']} warm-up runs; "
        f"copy_ bandwidth {payload['copy_gbps']:.1f} GB/s (read + write). "
        "`x seed` is seed ms / triton_bloom ms (above 1: triton_bloom is faster).",
        "",
    ]
    lines += [f"- {note}" for note in payload["notes"]]
    cuda = payload["device"] == "cuda"
    for layer in LAYERS:
        for mode in MODES:
            selected = [r for r in rows if r["layer"] == layer and r["mode"] == mode]
            if not selected:
                continue
            shapes = list(dict.fromkeys(tuple(r[f] for f in SHAPE_FIELDS) for r in selected))
            headers = ["batch", "dim", "k", "dtype", "ids"] + [f"{n} ms" for n in names]
            headers += ["ours x seed", "ours x cached"] + (["ours GB/s", "ours % copy"] if cuda else [])
            table = []
            for shape in shapes:
                by = {r["provider"]: r for r in selected if tuple(r[f] for f in SHAPE_FIELDS) == shape}
                ours = by.get("triton_bloom", {})
                line = [f"{shape[0]}x{shape[1]}", shape[2], shape[3], shape[4], shape[5]]
                line += [f"{by[n]['ms']:.3f}" if n in by else "-" for n in names]
                line += [
                    f"{ours[key]:.2f}x" if key in ours else "-"
                    for key in ("ratio_to_seed", "ratio_to_embedding_bag_cached")
                ]
                if cuda:
                    line += [
                        f"{ours['gbps']:.0f}" if ours else "-",
                        f"{100 * ours['fraction_of_copy']:.0f}%" if ours else "-",
                    ]
                table.append(line)
            lines += ["", f"## {layer}, {mode.replace('_', '+')}", "", markdown_table(headers, table)]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: str) -> Optional[str]:
    """ms vs embedding_dim per provider (log-log), one panel per layer and
    mode, over the shapes that differ from the first one only in
    ``embedding_dim``.  ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = payload["rows"]
    fig, axes = plt.subplots(len(LAYERS), len(MODES), figsize=(15, 8), squeeze=False)
    for i, layer in enumerate(LAYERS):
        layer_rows = [r for r in rows if r["layer"] == layer]
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            ax.set_title(f"{layer}, {mode.replace('_', '+')}")
            if not layer_rows:
                ax.set_visible(False)
                continue
            base = {f: layer_rows[0][f] for f in SHAPE_FIELDS if f != "embedding_dim"}
            for name in PROVIDERS:
                points = sorted(
                    (r["embedding_dim"], r["ms"])
                    for r in layer_rows
                    if r["mode"] == mode and r["provider"] == name and all(r[f] == v for f, v in base.items())
                )
                if points:
                    ax.plot(*zip(*points), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("embedding_dim")
            ax.set_ylabel("ms (median)")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
            ax.text(0.02, 0.02, ", ".join(f"{f}={v}" for f, v in base.items()), transform=ax.transAxes, fontsize=7)
    fig.suptitle(f"Speed on {payload['device']} ({payload['hardware']}), {payload['environment']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a handful of shapes (under 3 minutes on 2 CPU cores)")
    parser.add_argument("--out", help="JSON path (default bench/results/speed_<device>[_quick].json)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (default 50 CUDA, 20 CPU, 10 quick)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 10 CUDA, 3 CPU, 2 quick CPU)")
    parser.add_argument("--num-embeddings", type=int, help="id space (default 10M CUDA, 1M CPU and quick)")
    parser.add_argument("--batch", type=int, help="base batch size (samples or bags of 8 ids)")
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ", ".join(PROVIDERS)
    )
    parser.add_argument("--copy-mib", type=int, help="size of the copy_ bandwidth probe (default 1024 CUDA, 256 CPU)")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default torch's; 1 is steadier on a busy machine)"
    )
    parser.add_argument(
        "--flush",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write 256 MB between timed runs (default: on CUDA only)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = set(providers) - set(PROVIDERS)
    if unknown or "seed" not in providers:
        parser.error(f"--providers must name known providers and include seed (got unknown {sorted(unknown)})")
    repeats = args.repeats or (50 if cuda and not args.quick else 30 if cuda else 10 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2 if args.quick else 3)
    cases = default_cases(device, args.quick, args.num_embeddings, args.batch)
    out = args.out or os.path.join("bench", "results", f"speed_{device.type}{'_quick' if args.quick else ''}.json")

    started = time.perf_counter()
    copy_bytes = args.copy_mib * 2**20 if args.copy_mib else None
    payload = run(cases, device, repeats, warmup, providers, args.flush, copy_bytes)
    payload["config"] = {
        "quick": args.quick,
        "cases": len(cases),
        "command": "python bench/perf/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    payload["wall_s"] = time.perf_counter() - started
    paths = write_outputs(payload, out, markdown_report, plot)
    print("\n" + markdown_report(payload))
    print(f"wrote {', '.join(p for p in paths.values() if p)} in {payload['wall_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
