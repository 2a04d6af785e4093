"""Memory of BloomEmbedding against Spotlight's layer and a full
``nn.Embedding``, from 10 thousand to a billion ids.

For each provider, optimizer (Adam: two states per weight; Adagrad: one) and
``num_embeddings``, a row gives:

- ``module_bytes``: weights plus per-id hash tables (ours hashes on the fly
  and holds none; ``triton_bloom_hash_cache`` is ours with
  ``hash_cache=True``, an int32 ``(num_embeddings, k)`` table; the seed holds
  an int64 one);
- ``grad_bytes`` (dense, one per weight) and ``optimizer_state_bytes``;
- ``peak_step_bytes``: the most memory live during a steady-state training
  step (forward, ``sum().backward()``, ``optimizer.step()``), module included.

A row is ``measured`` where its analytic footprint fits under
``--measure-limit-gib`` (default 3 GiB on CPU, a shared 24 GiB machine; half
the device on CUDA) and ``analytic`` otherwise.  Measured rows build the
module and run two steps (the first allocates the optimizer state): tensor
bytes are summed exactly; the step's peak is, on CPU, the process's
resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` before the step) minus the resident set before the
module was built; on CUDA, ``torch.cuda.max_memory_allocated`` minus what was
allocated before.  Measured rows keep their analytic figures beside them, so
the model's error is visible where both exist.

The analytic model: weights ``W = rows * dim * elem``; gradient ``W``;
optimizer state ``2W`` (Adam) or ``W`` (Adagrad); the optimizer step's
temporaries (``2W`` for Adam's single-tensor CPU implementation, whose
``exp_avg_sq.sqrt() / c`` holds two, ``W`` for its CUDA foreach one and for
Adagrad); and the batch's activations (the seed materialises the gradient
of its ``(n, k, dim)`` gathered rows; ours holds ``(n, k)`` row indices and
``(n, dim)`` vectors).  ``peak = W + hash table + gradient + state + max(optimizer
temporaries, activations)``.  On this project's CPU machine it came within
about 30% of every measured peak, and within 2% from ten million ids up,
where the tables dominate.

Ratios: ``ratio_to_<p>_module = p's module_bytes / this row's`` (and
``_peak`` likewise), for the same optimizer and ``num_embeddings``.

    python bench/perf/memory.py [--out FILE.json] [--device cpu|cuda] [--sizes 1e4,1e6,1e9]

writes FILE.json, FILE.md and FILE.png.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import resource
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.baselines import SpotlightBloomEmbedding  # noqa: E402
from bench.common import environment, markdown_table, write_outputs  # noqa: E402
from triton_bloom import BloomEmbedding  # noqa: E402

PROVIDERS = ("triton_bloom", "triton_bloom_hash_cache", "seed", "full_embedding")
OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}
STATES_PER_WEIGHT = {"adam": 2, "adagrad": 1}
DEFAULT_SIZES = (10**4, 10**5, 10**6, 10**7, 10**8, 10**9)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryCase:
    provider: str
    optimizer: str
    num_embeddings: int
    embedding_dim: int = 64
    k: int = 4
    compression_ratio: float = 0.2
    batch: int = 4096
    seq: int = 8
    dtype: str = "float32"

    @property
    def num_rows(self) -> int:
        if self.provider == "full_embedding":
            return self.num_embeddings
        return int(self.compression_ratio * self.num_embeddings)


def cases(sizes=DEFAULT_SIZES, providers=PROVIDERS, optimizers=tuple(OPTIMIZERS), **shape) -> list:
    return [MemoryCase(p, o, n, **shape) for o in optimizers for n in sizes for p in providers]


# ---------------------------------------------------------------- the model


def analytic(case: MemoryCase, device_type: str) -> dict:
    """Bytes by the model in the module docstring."""
    elem = DTYPES[case.dtype].itemsize
    n, k, dim = case.batch * case.seq, case.k, case.embedding_dim
    weights = case.num_rows * dim * elem
    hash_table = 0
    if case.provider == "seed":
        hash_table = case.num_embeddings * k * 8
    elif case.provider == "triton_bloom_hash_cache":
        hash_table = case.num_embeddings * k * (4 if case.num_rows < 2**31 else 8)
    state = STATES_PER_WEIGHT[case.optimizer] * weights
    temporaries = 2 * weights if case.optimizer == "adam" and device_type == "cpu" else weights
    if case.provider == "seed":
        # The gathered (n, k, dim) rows die after the sum; their gradient,
        # materialised for the embedding's backward, is what peaks.
        activations = n * k * dim * elem + n * k * 32 + n * dim * elem
    elif case.provider == "full_embedding":
        activations = 2 * n * dim * elem + n * 24
    else:
        activations = n * k * 16 + 3 * n * dim * 4
    module = weights + hash_table
    return {
        "weights_bytes": weights,
        "hash_table_bytes": hash_table,
        "module_bytes": module,
        "grad_bytes": weights,
        "optimizer_state_bytes": state,
        "training_state_bytes": module + weights + state,
        "peak_step_bytes": module + weights + state + max(temporaries, activations),
    }


def footprint(case: MemoryCase, device_type: str) -> int:
    """Most bytes a measurement of ``case`` needs, construction included:
    hashing every id builds temporaries about twice the table (the seed's
    scikit-learn columns, then their int64 stack) or four times (the int64
    murmur passes behind ``hash_cache=True``)."""
    model = analytic(case, device_type)
    build = {"seed": 2, "triton_bloom_hash_cache": 4}.get(case.provider, 0) * model["hash_table_bytes"]
    return max(model["peak_step_bytes"], model["weights_bytes"] + build)


# ---------------------------------------------------------------- measuring


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def module_tensor_bytes(module: nn.Module) -> int:
    """Parameters, buffers, and tensors kept as plain attributes (the seed's
    hash table is one)."""
    tensors = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
    unique = {t.data_ptr(): t for t in tensors}
    return tensor_bytes(unique.values())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    # Writing 5 resets VmHWM to the current resident set (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_freed_memory():
    # Freed heap pages stay resident under glibc until trimmed; without this
    # the baseline would carry the previous measurement's leftovers.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build(case: MemoryCase, device: torch.device) -> nn.Module:
    dtype = DTYPES[case.dtype]
    if case.provider == "seed":
        # The hash table moves to the device at the first forward, as in Spotlight.
        return SpotlightBloomEmbedding(case.num_embeddings, case.embedding_dim, case.compression_ratio, case.k).to(
            device=device, dtype=dtype
        )
    if case.provider == "full_embedding":
        return nn.Embedding(case.num_embeddings, case.embedding_dim, device=device, dtype=dtype)
    return BloomEmbedding(
        case.num_embeddings,
        case.embedding_dim,
        case.compression_ratio,
        case.k,
        hash_cache=case.provider == "triton_bloom_hash_cache",
        device=device,
        dtype=dtype,
    )


def training_step(module: nn.Module, ids: torch.Tensor, params: list, optimizer) -> int:
    """One training step on ``ids``; returns the bytes of the gradients it made.
    A function, not a closure in ``measure``, so that ``measure`` can drop its
    tensors with ``del`` before emptying the CUDA cache."""
    module(ids).sum().backward()
    grad_bytes = tensor_bytes(p.grad for p in params)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_bytes


def measure(case: MemoryCase, device: torch.device) -> dict:
    """Build ``case``'s module, run two training steps, return what they held."""
    cuda = device.type == "cuda"
    _release_freed_memory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss()
    module = build(case, device)
    ids = torch.randint(0, case.num_embeddings, (case.batch, case.seq), device=device)
    optimizer = OPTIMIZERS[case.optimizer](module.parameters(), lr=1e-3)
    params = [p for p in module.parameters() if p.requires_grad]
    grad_bytes = training_step(module, ids, params, optimizer)  # allocates the optimizer state
    if cuda:
        torch.cuda.synchronize()
        built = torch.cuda.memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        grad_bytes = training_step(module, ids, params, optimizer)
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    else:
        built = _rss() - base
        resettable = _reset_peak_rss()
        grad_bytes = training_step(module, ids, params, optimizer)
        peak = _peak_rss() - base if resettable else None
        method = "VmHWM (reset via /proc/self/clear_refs) - RSS before build" if resettable else "unavailable"
    state_bytes = tensor_bytes(t for s in optimizer.state.values() for t in s.values())
    module_bytes = module_tensor_bytes(module)
    result = {
        "module_bytes": module_bytes,
        "grad_bytes": grad_bytes,
        "optimizer_state_bytes": state_bytes,
        "training_state_bytes": module_bytes + grad_bytes + state_bytes,
        "peak_step_bytes": peak,
        "resident_after_first_step_bytes": built,
        "method": method,
    }
    del module, optimizer, params, ids
    if cuda:
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- the run

REPORTED = ("module_bytes", "grad_bytes", "optimizer_state_bytes", "training_state_bytes", "peak_step_bytes")


def run(memory_cases, device, measure_limit_bytes: Optional[int] = None, log=print) -> dict:
    """Every case, measured where it fits under ``measure_limit_bytes``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if measure_limit_bytes is None:
        measure_limit_bytes = torch.cuda.get_device_properties(device).total_memory // 2 if cuda else 3 * GIB
    env = environment()
    hardware = env.get("gpu") if cuda else env["cpu"]
    stamp = {
        "hardware": hardware,
        "device": device.type,
        "date": env["date"],
        "torch": env["torch"],
        "triton": env["triton"],
        "python": env["python"],
        "cuda": env.get("cuda"),
    }
    # Every measurement collects garbage first; with the objects that exist
    # now frozen out of the collector's view, that takes milliseconds rather
    # than a quarter of a second.
    gc.collect()
    gc.freeze()
    try:
        # The first step of each optimizer and layer loads libraries and
        # fills caches (tens of MiB of resident memory) that would land in
        # whichever row came first: pay for them on a throwaway module.
        for warm in {(c.provider, c.optimizer, c.dtype) for c in memory_cases}:
            measure(MemoryCase(warm[0], warm[1], 1000, embedding_dim=8, k=2, batch=8, seq=2, dtype=warm[2]), device)
        rows = measure_all(memory_cases, device, measure_limit_bytes, stamp, log)
    finally:
        gc.unfreeze()
    add_ratios(rows)
    rows.sort(
        key=lambda r: (list(OPTIMIZERS).index(r["optimizer"]), r["num_embeddings"], PROVIDERS.index(r["provider"]))
    )
    return {
        "benchmark": "memory",
        "device": device.type,
        "hardware": hardware,
        "environment": env,
        "measure_limit_bytes": measure_limit_bytes,
        "rows": rows,
    }


def measure_all(memory_cases, device, measure_limit_bytes, stamp, log) -> list:
    """One row per case: measured when its footprint fits, else the model's."""
    rows = []
    started = time.perf_counter()
    # Smallest first: a failed large measurement should not cost the small ones.
    for case in sorted(memory_cases, key=lambda c: (footprint(c, device.type), PROVIDERS.index(c.provider))):
        model = analytic(case, device.type)
        row = {
            **stamp,
            **dataclasses.asdict(case),
            "num_rows": case.num_rows,
            "weights_bytes": model["weights_bytes"],
            "hash_table_bytes": model["hash_table_bytes"],
        }
        measured = None
        if footprint(case, device.type) <= measure_limit_bytes:
            try:
                measured = measure(case, device)
            except (RuntimeError, MemoryError) as exc:  # out of memory: fall back to the model
                row["measure_error"] = f"{type(exc).__name__}: {exc}"[:300]
                _release_freed_memory()
        if measured is not None and measured["peak_step_bytes"] is not None:
            row.update(
                kind="measured",
                method=measured["method"],
                analytic=model,
                resident_after_first_step_bytes=measured["resident_after_first_step_bytes"],
                **{key: measured[key] for key in REPORTED},
            )
        else:
            row.update(kind="analytic", **{key: model[key] for key in REPORTED})
        rows.append(row)
        log(
            f"[{time.perf_counter() - started:5.1f}s] {case.provider:>24} {case.optimizer:>7} "
            f"N={case.num_embeddings:>13,} {row['kind']:>8}: module {human(row['module_bytes'])}, "
            f"peak step {human(row['peak_step_bytes'])}"
        )
    return rows


def add_ratios(rows: list) -> None:
    for row in rows:
        peers = {
            r["provider"]: r
            for r in rows
            if r["optimizer"] == row["optimizer"] and r["num_embeddings"] == row["num_embeddings"]
        }
        for name in ("seed", "full_embedding"):
            if name in peers:
                row[f"ratio_to_{name}_module"] = peers[name]["module_bytes"] / row["module_bytes"]
                row[f"ratio_to_{name}_peak"] = peers[name]["peak_step_bytes"] / row["peak_step_bytes"]


def human(nbytes) -> str:
    if nbytes is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}" if unit == "GiB" else f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


# ---------------------------------------------------------------- outputs


def markdown_report(payload: dict) -> str:
    env = payload["environment"]
    rows = payload["rows"]
    first = rows[0]
    lines = [
        f"# Memory: triton_bloom vs Spotlight's layer and nn.Embedding on {payload['device']} ({payload['hardware']})",
        "",
        f"{env['date']}; torch {env['torch']}, python {env['python']}. embedding_dim={first['embedding_dim']}, "
        f"k={first['k']}, compression_ratio={first['compression_ratio']}, {first['dtype']}, "
        f"batch {first['batch']}x{first['seq']} ids. Rows are measured where they fit in "
        f"{human(payload['measure_limit_bytes'])}, analytic otherwise; measured rows show the model's peak beside.",
        "On CPU, measured peaks below a few MiB are mostly resident-set noise (pages, allocator arenas).",
        "`seed / this`, `full / this`: that provider's bytes over this row's (above 1: this row is smaller).",
    ]
    headers = [
        "num_embeddings",
        "provider",
        "kind",
        "module",
        "optimizer state",
        "peak step",
        "model peak",
        "module: seed / this",
        "peak: seed / this",
        "peak: full / this",
    ]
    for optimizer in OPTIMIZERS:
        selected = [r for r in rows if r["optimizer"] == optimizer]
        if not selected:
            continue
        table = [
            [
                f"{r['num_embeddings']:,}",
                r["provider"],
                r["kind"],
                human(r["module_bytes"]),
                human(r["optimizer_state_bytes"]),
                human(r["peak_step_bytes"]),
                human(r["analytic"]["peak_step_bytes"]) if "analytic" in r else "",
                f"{r['ratio_to_seed_module']:.2f}x" if "ratio_to_seed_module" in r else "-",
                f"{r['ratio_to_seed_peak']:.2f}x" if "ratio_to_seed_peak" in r else "-",
                f"{r['ratio_to_full_embedding_peak']:.2f}x" if "ratio_to_full_embedding_peak" in r else "-",
            ]
            for r in selected
        ]
        lines += ["", f"## {optimizer}", "", markdown_table(headers, table)]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: str) -> Optional[str]:
    """Module bytes and peak step bytes vs num_embeddings, log-log; filled
    markers measured, hollow analytic.  ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in payload["rows"] if r["optimizer"] == payload["rows"][0]["optimizer"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = ((axes[0], "module_bytes", "module"), (axes[1], "peak_step_bytes", "peak of a training step"))
    for ax, key, title in panels:
        for name in PROVIDERS:
            points = sorted((r["num_embeddings"], r[key], r["kind"]) for r in rows if r["provider"] == name)
            if not points:
                continue
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
            for x, y, kind in points:
                ax.plot(x, y, "o", color=line.get_color(), fillstyle="full" if kind == "measured" else "none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("num_embeddings")
        ax.set_ylabel("bytes")
        ax.set_title(f"{title} ({rows[0]['optimizer']})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Memory on {payload['device']} ({payload['hardware']}), {payload['environment']['date']}; "
        "filled: measured, hollow: analytic"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _int_list(text: str) -> list:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON path (default bench/results/memory_<device>.json)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=_int_list, default=list(DEFAULT_SIZES), help="num_embeddings, e.g. 1e4,1e6,1e9")
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.2, help="compression_ratio")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument(
        "--measure-limit-gib", type=float, help="measure rows whose footprint fits (default 3 CPU, half the GPU)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    providers = [p for p in args.providers.split(",") if p]
    optimizers = [o for o in args.optimizers.split(",") if o]
    if set(providers) - set(PROVIDERS) or set(optimizers) - set(OPTIMIZERS):
        parser.error(f"providers must be among {PROVIDERS}, optimizers among {tuple(OPTIMIZERS)}")
    limit = None if args.measure_limit_gib is None else int(args.measure_limit_gib * GIB)
    selected = cases(
        args.sizes,
        providers,
        optimizers,
        embedding_dim=args.embedding_dim,
        k=args.k,
        compression_ratio=args.ratio,
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
    )
    out = args.out or os.path.join("bench", "results", f"memory_{device.type}.json")

    started = time.perf_counter()
    payload = run(selected, device, limit)
    payload["wall_s"] = time.perf_counter() - started
    payload["config"] = {"command": "python bench/perf/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    paths = write_outputs(payload, out, markdown_report, plot)
    print("\n" + markdown_report(payload))
    print(f"wrote {', '.join(p for p in paths.values() if p)} in {payload['wall_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
