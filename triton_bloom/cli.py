"""The ``triton-bloom`` command (also ``python -m triton_bloom``).

    triton-bloom info     versions, backends, device, autotune cache
    triton-bloom tune     autotune the kernels for named shapes, save the winners
    triton-bloom bench    bench/perf/speed.py --quick from a checkout, else a built-in timing
    triton-bloom demo     a recommender trained with nn.Embedding vs BloomEmbedding

The kernels are imported inside the commands that need them, so ``--help``,
``info`` and ``demo`` work where Triton does not import.
Tables are drawn with ``rich`` and long loops show ``tqdm`` bars (see
``terminal``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .constants import MODES
from .terminal import console, cpu_model, progress, render_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ID_DTYPES = {"int64": torch.int64, "int32": torch.int32}
SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _autotune_module():
    """``triton_bloom.kernels.autotune``, or ``None`` where Triton does not import."""
    from . import dispatch

    if not dispatch.triton_available():
        return None
    from .kernels import autotune

    return autotune


# ---------------------------------------------------------------------------
# info


def _kernels_status(dispatch):
    """``(kernels import, interpreter on, why not)`` for ``info``, which must
    report a broken install rather than fail on it: the kernels either load,
    are left out because Triton cannot run here (``why not`` is that error),
    or raise while importing (``why not`` is that error, which every lookup
    with ``backend="triton"`` or on CUDA would raise too)."""
    try:
        module, missing = dispatch._load_kernels()
    except Exception as exc:  # a bug in the kernels, or a Triton they do not match
        return False, False, f"fails to import ({type(exc).__name__}: {exc})"
    if module is None:
        return False, False, f"Triton cannot run here ({type(missing).__name__}: {missing})"
    try:
        return True, bool(module.interpreting()), None
    except Exception as exc:
        return True, False, f"imports, but interpreting() fails ({type(exc).__name__}: {exc})"


def cmd_info(args) -> int:
    from . import __version__, dispatch

    kernels_ok, interpreting, why_not = _kernels_status(dispatch)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    except Exception as exc:  # a driver error from an old Triton
        triton_version = f"fails to import ({type(exc).__name__}: {exc})"
    rows = [
        ["triton_bloom", __version__],
        ["torch", torch.__version__],
        ["triton", triton_version],
        ["python", f"{platform.python_version()} ({platform.python_implementation()}, {platform.system()})"],
        ["Triton kernels import", "yes" if why_not is None else f"{_yes_no(kernels_ok)}: {why_not}"],
        ["Triton interpreter (TRITON_INTERPRET)", "on" if interpreting else "off"],
        ["CUDA available", _yes_no(torch.cuda.is_available())],
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows.append(
                [
                    f"device cuda:{index}",
                    f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                    f"{props.multi_processor_count} SMs, CUDA {torch.version.cuda}",
                ]
            )
    rows.append(["cpu", f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"])
    rows.append(["BloomEmbedding backend here", _backend_here(kernels_ok, interpreting)])
    rows.append(["CPU path's compiled loops", _native_row()])
    autotune = _autotune_module() if kernels_ok else None
    if autotune is None:
        rows.append(["autotune cache", "n/a (the Triton kernels do not import)"])
    else:
        path = args.cache or autotune.cache_path()
        if path is None:
            rows.append(["autotune cache", f"off (${autotune.CACHE_ENV} is empty)"])
        else:
            entries = autotune.read_entries(path)
            exists = os.path.exists(path)
            rows.append(["autotune cache file", path + ("" if exists else " (not written yet)")])
            count = f"{len(entries)}"
            if torch.cuda.is_available() and entries:
                here = autotune.device_name(torch.device("cuda"))
                count += f" ({sum(e['device'] == here for e in entries)} for {here})"
            rows.append(["autotune cache entries", count])
    render_table(["", ""], rows, title="triton_bloom environment")
    return 0


def _yes_no(flag):
    return "yes" if flag else "no"


def _native_row():
    """Whether the CPU path's C loops (hashing, scatter) built here, or why not:
    without them the PyTorch ops give the same bits, only slower."""
    from . import native

    if native.available():
        return "built (same results as the PyTorch ops, faster)"
    return f"not in use, PyTorch ops instead: {native.build_error()}"


def _backend_here(kernels_ok, interpreting):
    if torch.cuda.is_available() and kernels_ok and not interpreting:
        return "Triton kernels on CUDA tensors, PyTorch path on CPU tensors"
    if interpreting:
        return "PyTorch path (backend='triton' runs the kernels through the interpreter)"
    return "PyTorch path"


# ---------------------------------------------------------------------------
# tune


def cmd_tune(args) -> int:
    from . import dispatch

    out = console()
    if not torch.cuda.is_available() or dispatch.interpreter_enabled():
        why = (
            "Triton's interpreter is on (TRITON_INTERPRET=1)"
            if dispatch.interpreter_enabled()
            else "no CUDA device is visible"
        )
        out.print(
            f"Tuning needs a CUDA GPU: {why}. Nothing to do; on CPU every layer runs the PyTorch path, "
            "which has nothing to tune."
        )
        return 0
    if not dispatch.triton_available():
        out.print("Tuning needs Triton, which does not import here: pip install triton")
        return 1
    from .kernels import autotune

    device = torch.device(args.device)
    path = args.cache or autotune.cache_path()
    shapes = [
        (dim, k, dtype, ids) for dim in args.dim for k in args.k for dtype in args.dtype for ids in args.ids_dtype
    ]
    gpu = autotune.device_name(device)
    out.print(
        f"Tuning {len(shapes)} shape(s) on {device} ({gpu}), {args.batch:,} ids per launch, "
        f"{args.num_embeddings:,} ids hashed into {int(args.num_embeddings * args.compression_ratio):,} rows. "
        "Each new kernel and key benchmarks every config: allow seconds per row."
    )
    records, failures = [], []
    with autotune.recording() as recorded:
        for shape in progress(shapes, desc="tuning", unit="shape", leave=True):
            before = len(recorded)
            try:
                _tune_shape(device, *shape, args)
            except torch.cuda.OutOfMemoryError:
                failures.append((shape, "out of memory (lower --batch or --num-embeddings)"))
            torch.cuda.synchronize(device)
            for record in recorded[before:]:
                records.append((shape, record))
            torch.cuda.empty_cache()

    rows = []
    for (dim, k, dtype, ids), r in records:
        c, blocks = r["config"], r["config"]["kwargs"]
        us = f"{r['ms'] * 1e3:.1f}" if r.get("ms") is not None else "-"
        dtype_cell = SHORT_DTYPES[dtype] + (f" {ids}" if len(args.ids_dtype) > 1 else "")
        rows.append(
            [
                _short_kernel(r),
                dim,
                k,
                dtype_cell,
                f"{blocks.get('BLOCK_N', '-')}x{blocks.get('BLOCK_D', '-')}",
                c["num_warps"],
                c["num_stages"],
                us,
            ]
        )
    tried = sorted({r["configs_tried"] for _, r in records if r.get("configs_tried")})
    render_table(
        ["kernel", "dim", "k", "dtype", "block NxD", "warps", "stages", "us"],
        rows,
        title=f"Best configs on {gpu}",
        numeric_from=1,
        compact=True,
        caption=f"us: the winner's median time, the best of {_span(tried)} configs benchmarked" if tried else None,
    )
    for shape, why in failures:
        out.print(f"[red]skipped[/red] dim={shape[0]} k={shape[1]} {shape[2]} {shape[3]}: {why}")
    if args.no_save:
        out.print("Not saved (--no-save).")
    elif path is None:
        out.print(f"Not saved: ${autotune.CACHE_ENV} is empty (cache off); pass --cache FILE to save.")
    elif records:
        total = autotune.save_cache([r for _, r in records], path)
        out.print(f"Saved {len(records)} config(s) to {path} ({total} entries in all).")
        if args.cache and os.path.abspath(os.path.expanduser(args.cache)) != autotune.cache_path():
            out.print(f"Jobs read it when ${autotune.CACHE_ENV}={path} is set.")
        out.print(
            "A launch whose kernel, key, dtypes and GPU model match an entry runs that config without autotuning."
        )
    return 1 if failures and not records else 0


def _tune_shape(device, dim, k, dtype_name, ids_name, args):
    """Run the layers' GPU forward and backward once on this shape, so that
    every kernel production would launch for it is tuned with the very
    arguments (and so the very key and dtypes) production passes."""
    from .modules import BloomEmbedding, BloomEmbeddingBag

    dtype, id_dtype = DTYPES[dtype_name], ID_DTYPES[ids_name]
    g = torch.Generator(device=device).manual_seed(0)
    common = dict(compression_ratio=args.compression_ratio, num_hash_functions=k, device=device, dtype=dtype)
    if "embedding" in args.layers:
        emb = BloomEmbedding(args.num_embeddings, dim, padding_idx=None, **common)
        ids = torch.randint(0, args.num_embeddings, (args.batch,), generator=g, device=device, dtype=id_dtype)
        out = emb(ids)
        out.backward(torch.randn(out.shape, generator=g, device=device, dtype=out.dtype))
        del emb, ids, out
    if "bag" in args.layers:
        bags = max(1, args.batch // args.bag_length)
        ids = torch.randint(0, args.num_embeddings, (bags, args.bag_length), generator=g, device=device, dtype=id_dtype)
        for mode in args.modes:
            bag = BloomEmbeddingBag(args.num_embeddings, dim, mode=mode, **common)
            out = bag(ids)
            out.backward(torch.randn(out.shape, generator=g, device=device, dtype=out.dtype))
            del bag, out


def _span(values):
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def _short_kernel(record):
    name = record["kernel"].removeprefix("_bloom_").removesuffix("_kernel")
    mode = record["key"].get("MODE")
    if mode is not None:
        name += f"[{MODES[mode] if 0 <= mode < len(MODES) else mode}]"
    return name


# ---------------------------------------------------------------------------
# bench


def find_speed_script():
    """``bench/perf/speed.py`` of a source checkout: beside the package (an editable
    install or a run from the repository), else under the current directory."""
    here = Path(__file__).resolve().parent.parent
    for root in (here, Path.cwd()):
        script = root / "bench" / "perf" / "speed.py"
        if script.is_file() and (root / "bench" / "common.py").is_file():
            return script
    return None


def cmd_bench(args) -> int:
    out = console()
    script = None if args.builtin else find_speed_script()
    if script is None:
        if not args.builtin:
            out.print(
                "bench/perf/speed.py is not here (benchmarks ship with the source checkout, not the package): "
                "running the built-in timing instead."
            )
        return builtin_bench(args)
    root = script.parents[2]
    out_file = args.out or os.path.join(tempfile.mkdtemp(prefix="triton_bloom_bench_"), "speed_quick.json")
    command = [sys.executable, str(script), "--quick", "--out", out_file]
    for flag, value in (
        ("--device", args.device),
        ("--repeats", args.repeats),
        ("--num-embeddings", args.num_embeddings),
        ("--batch", args.batch),
    ):
        if value is not None:
            command += [flag, str(value)]
    command += [a for a in args.speed_args if a != "--"]
    out.print(
        f"Running {' '.join([Path(command[1]).relative_to(root).as_posix(), *command[2:]])} from the checkout at {root}"
    )
    return subprocess.call(command, cwd=root)


def builtin_bench(args) -> int:
    """Median forward and forward+backward time of ``BloomEmbedding`` against
    ``nn.Embedding`` at full size, on one shape, on the device present."""
    from .modules import BloomEmbedding

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    num_embeddings = args.num_embeddings or 1_000_000
    batch, seq, dim = args.batch or 4096, 8, args.dim
    repeats = args.repeats or (50 if device.type == "cuda" else 10)
    torch.manual_seed(0)
    ids = torch.randint(0, num_embeddings, (batch, seq), device=device)
    layers = [("nn.Embedding (full)", torch.nn.Embedding(num_embeddings, dim, device=device))]
    for ratio in args.ratios:
        layers.append(
            (
                f"BloomEmbedding {ratio:g}",
                BloomEmbedding(num_embeddings, dim, ratio, args.k, padding_idx=None, device=device),
            )
        )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def median_ms(fn):
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    results = []
    for name, layer in progress(layers, desc="timing", unit="layer"):
        weight = layer.weight

        def step():
            layer(ids).sum().backward()
            weight.grad = None

        with torch.no_grad():
            forward = median_ms(lambda: layer(ids))
        results.append((name, forward, median_ms(step), weight.numel() * weight.element_size()))
    _, base_step, base_bytes = results[0][1:]
    rows = [
        [
            name,
            f"{fwd:.3f}",
            f"{step:.3f}",
            f"{nbytes / 2**20:.1f}",
            f"{base_bytes / nbytes:.1f}x",
            f"{base_step / step:.2f}x",
        ]
        for name, fwd, step, nbytes in results
    ]
    render_table(
        ["layer", "fwd ms", "fwd+bwd ms", "table MiB", "smaller", "fwd+bwd faster"],
        rows,
        title=f"{num_embeddings:,} ids, dim {dim}, k={args.k}, ids ({batch}, {seq}), on {device}, median of {repeats}",
        numeric_from=1,
    )
    return 0


# ---------------------------------------------------------------------------
# demo


def cmd_demo(args) -> int:
    from .demo import run

    return run(args)


# ---------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triton-bloom",
        description="Bloom embeddings for PyTorch: inspect the installation, tune the Triton kernels, "
        "benchmark, and run the demo recommender.",
        epilog="Run 'triton-bloom COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser(
        "info",
        help="versions, backends, device and the autotune cache",
        description="Print the versions of triton_bloom, torch, triton and python, which "
        "backends work here, the device, whether Triton's interpreter is on, "
        "and the autotune cache file with its number of entries.",
    )
    info.add_argument("--cache", metavar="FILE", help="describe this cache file instead of the default")
    info.set_defaults(func=cmd_info)

    tune = sub.add_parser(
        "tune",
        help="autotune the GPU kernels for your shapes and cache the winners",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark every block-size config of the forward, backward and bag kernels for each\n"
        "shape (dim x k x dtype x id dtype), print the best config and its time, and save the\n"
        "winners to a JSON cache.  Later jobs on the same GPU model launch cached configs\n"
        "directly, paying no tuning cost.  The cache is $TRITON_BLOOM_AUTOTUNE_CACHE when set,\n"
        "else ~/.cache/triton_bloom/autotune.json.  Without a CUDA GPU (or under\n"
        "TRITON_INTERPRET=1) it says so and exits with status 0.\n\n"
        "example: triton-bloom tune --dim 64 128 --k 4 8 --dtype float32 bfloat16 --batch 65536",
    )
    tune.add_argument(
        "--dim", type=int, nargs="+", default=[32, 64, 128, 256], help="embedding dims (default 32 64 128 256)"
    )
    tune.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="hash functions per id (default 2 4 8)")
    tune.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=sorted(DTYPES),
        help="table dtypes (default float32 bfloat16)",
    )
    tune.add_argument(
        "--ids-dtype",
        nargs="+",
        default=["int64"],
        choices=sorted(ID_DTYPES),
        help="id dtypes, each tuned on its own (default int64, nn.Embedding's)",
    )
    tune.add_argument("--batch", type=int, default=65536, help="ids per launch (default 65536)")
    tune.add_argument("--bag-length", type=int, default=20, help="ids per bag for the bag kernels (default 20)")
    tune.add_argument(
        "--layers",
        nargs="+",
        default=["embedding", "bag"],
        choices=["embedding", "bag"],
        help="which layers' kernels to tune (default both)",
    )
    tune.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=MODES,
        help="bag pooling modes, each its own kernel key (default sum mean max)",
    )
    tune.add_argument("--num-embeddings", type=int, default=10_000_000, help="id space (default 10,000,000)")
    tune.add_argument("--compression-ratio", type=float, default=0.2, help="table rows / ids (default 0.2)")
    tune.add_argument("--device", default="cuda", help="the GPU to tune on (default cuda, the current one)")
    tune.add_argument("--cache", metavar="FILE", help="save to FILE instead of the default cache")
    tune.add_argument("--no-save", action="store_true", help="print the table only")
    tune.set_defaults(func=cmd_tune)

    bench = sub.add_parser(
        "bench",
        help="bench/perf/speed.py --quick from a source checkout, else a built-in timing",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="From a source checkout (bench/ beside the package or in the current directory), run\n"
        "'python bench/perf/speed.py --quick': every provider (Spotlight's layer, plain PyTorch,\n"
        "nn.Embedding, FBGEMM on CUDA) on a handful of shapes.  bench/ is not installed with\n"
        "the package; without it, time BloomEmbedding against nn.Embedding here instead.\n"
        "Arguments after '--' go to bench/perf/speed.py unchanged.\n\n"
        "example: triton-bloom bench -- --providers triton_bloom,seed",
    )
    bench.add_argument("--builtin", action="store_true", help="run the built-in timing even in a checkout")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--repeats", type=int, help="timed runs per measurement")
    bench.add_argument("--num-embeddings", type=int, help="id space (default 1,000,000)")
    bench.add_argument("--batch", type=int, help="samples of 8 ids (default 4096)")
    bench.add_argument(
        "--out",
        metavar="FILE.json",
        help="bench/perf/speed.py's output (default: a temporary "
        "directory, so recorded results in bench/results stay untouched)",
    )
    builtin = bench.add_argument_group("built-in timing only")
    builtin.add_argument("--dim", type=int, default=64, help="embedding dim (default 64)")
    builtin.add_argument("--k", type=int, default=4, help="hash functions per id (default 4)")
    builtin.add_argument("--ratios", type=float, nargs="+", default=[0.2], help="compression ratios (default 0.2)")
    bench.add_argument("speed_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    bench.set_defaults(func=cmd_bench)

    from .demo import __doc__ as demo_doc
    from .demo import add_arguments

    demo = sub.add_parser(
        "demo",
        help="train a recommender with nn.Embedding and BloomEmbedding, compare",
        description=demo_doc.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
