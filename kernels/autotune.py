"""Block-size configurations of the tuned kernels, and the tuned-config cache.

One place for the search space.  ``triton.autotune`` needs a GPU driver, so
it is applied lazily at the first launch: importing this package never
touches the driver (older Triton raised "0 active drivers" when an autotuned
kernel was merely defined on a CPU-only host).  ``launch.py`` decides when a
kernel is tuned at all (never under the interpreter).

Triton keeps an autotuner's choice for the life of the process only.
``triton-bloom tune`` pays the benchmarking once and writes the winners to a
JSON file (:func:`cache_path`), so that jobs on the same GPU model start
with them; a launch whose kernel, key values, tensor dtypes and GPU name have
an entry there runs the plain ``@triton.jit`` kernel with that configuration
and never builds an autotuner.  Each entry carries the kernel's source key
(Triton's hash of the kernel and what it calls, and Triton's version): an
edited kernel or another Triton finds no entry and tunes afresh.  The entry
is keyed here rather than by ``Autotuner.cache``'s tuple, whose layout is an
internal of Triton that differs by how arguments are passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import inspect
import json
import os
import tempfile
import threading
import warnings

import torch
import triton

from ..constants import MODE_MAX

# The search space of the lookups: tiles (BLOCK_N, BLOCK_D, warps) of 8 to
# 32 elements a thread, at row-block widths from 32 to 256.  Each kernel
# takes the tiles up to its own limit (Tuning.max_per_thread), set with the
# compile check (tests/test_gpu_targets.py) at every variant on and k = 24,
# on sm_80 and sm_90, Triton 3.6 and 3.9: one step larger spills registers.
TILES = (
    (32, 32, 4),
    (16, 64, 4),
    (16, 128, 8),
    (64, 32, 4),
    (32, 64, 4),
    (16, 128, 4),
    (16, 256, 8),
    (128, 32, 4),
    (64, 64, 4),
    (32, 128, 4),
    (32, 256, 8),
)
# The bag kernels hash a one-dimensional block of (id, hash function) pairs
# (or of ids) and broadcast the rows to the tile: that block has at least
# one element a thread (BLOCK_N >= 32 * num_warps), or Triton moves the
# hashing into the tile's layout, where every thread holding one of an id's
# columns hashes it again.  One warp a program: with all variants on at
# k = 24, the two-warp tilings (64 pairs) spilled on sm_80 and sm_90 under
# Triton 3.9, the one-warp ones did not.  The pairs make a block's idle
# rows depend on the bag length times k, not on the bag length alone.
BAG_TILES = (
    (32, 64, 1),
    (32, 32, 1),
)


def bag_bucket(n, num_bags):
    """The bag kernels' tuning key for ``n`` ids in ``num_bags`` bags: the
    mean bag length rounded up to a power of two, at most 64."""
    return min(64, triton.next_power_of_2(max(1, -(-n // max(num_bags, 1)))))


def bag_order(configs, args):
    """The bag tilings in the order the autotuner tries them: fewest idle
    rows over a bag of ``bag_bucket`` ids (``K`` rows an id; one for the
    max-pooled forward when ``K`` is not a power of two), then the wider row
    block, then fewer warps."""
    k = args["K"]
    rows = args["bag_bucket"] * (1 if args.get("MODE") == MODE_MAX and k & (k - 1) else k)

    def idle(config):
        block = config.kwargs["BLOCK_N"]
        return -(-rows // block) * block - rows

    return sorted(configs, key=lambda c: (idle(c), -c.kwargs["BLOCK_D"], c.num_warps))


def _per_thread(config):
    return config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_D"] // (32 * config.num_warps)


def _gather_configs(tiles):
    # One pipelining stage: the lookups have no loop over loads to pipeline,
    # and the bags' two-stage tilings were never measured on a GPU.
    return [triton.Config({"BLOCK_N": n, "BLOCK_D": d}, num_warps=w, num_stages=1) for n, d, w in tiles]


def _fits_registers(configs, args, max_per_thread):
    # The table (or its accumulator) tells the accumulator's width: float64
    # takes two registers an element.
    table = args["GRAD_W"] if "GRAD_W" in args else args["W"]
    limit = max_per_thread[1] if table.dtype == torch.float64 else max_per_thread[0]
    return [c for c in configs if _per_thread(c) <= limit]


def _pruner(max_per_thread, order=None):
    def prune(configs, named_args, **kwargs):
        # Triton hands the positional arguments and the keyword ones apart;
        # the launchers pass everything by keyword.
        args = {**named_args, **kwargs}
        return _prune(configs, args, max_per_thread, order)

    return prune


def _prune(configs, args, max_per_thread, order=None):
    kept = _fits_registers(configs, args, max_per_thread)
    # A BLOCK_D wider than the row only masks lanes off: keep the narrowest
    # width that covers the row, and every narrower one.
    cover = max(32, triton.next_power_of_2(args["dim"]))
    narrow = [c for c in kept if c.kwargs["BLOCK_D"] <= cover]
    kept = narrow or [c for c in kept if c.kwargs["BLOCK_D"] == min(k.kwargs["BLOCK_D"] for k in kept)]
    return order(kept, args) if order is not None else kept


def search_space(args, tuning):
    """Every configuration the autotuner may pick for a launch on ``args``
    at some row width, as ``{"kwargs", "num_warps", "num_stages"}`` dicts:
    those that fit the registers for its table's dtype.  (Of them, a launch
    tries the ones whose ``BLOCK_D`` does not pass its row; the compile check
    takes them all, since the code depends on the row width only through its
    divisibility.)"""
    return [_config_dict(c) for c in _fits_registers(_gather_configs(tuning.tiles), args, tuning.max_per_thread)]


def candidates(args, tuning):
    """The configurations the autotuner tries for a launch on ``args``, in
    its order, as :func:`search_space`'s dicts: the search space pruned as
    the autotuner prunes it (registers, then the row's width)."""
    return [_config_dict(c) for c in _prune(_gather_configs(tuning.tiles), args, tuning.max_per_thread, tuning.order)]


# The autotuner keys on these arguments (and, by itself, on the dtype of every
# tensor argument, so each weight dtype is tuned on its own).
TUNING_KEY = ("dim", "K")


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How a kernel is tuned.

    Args:
        reset_to_zero (tuple of str): the buffers the kernel accumulates
            into: the tuner runs every candidate on the same arguments, and
            without zeroing between trials the gradient would be added once
            per trial.
        key (tuple of str): the arguments whose values get a tuning of their own.
        tiles (tuple): the ``(BLOCK_N, BLOCK_D, num_warps)`` tilings to try.
        max_per_thread (tuple of int): the most tile elements a thread may
            hold with float32 accumulators and with float64 ones.
        order (callable, optional): ``order(configs, args)`` puts the
            pruned configurations in the order the autotuner tries them.
    """

    reset_to_zero: tuple = ()
    key: tuple = TUNING_KEY
    tiles: tuple = TILES
    max_per_thread: tuple = (16, 8)
    order: object = None


def tuned(kernel, tuning):
    """The autotuned twin of ``kernel``, built at first use (``triton.autotune``
    needs a driver, which importing this package must never touch)."""
    return _tuned(kernel, tuning)


@functools.lru_cache(maxsize=None)
def _tuned(kernel, tuning):
    return triton.autotune(
        configs=_gather_configs(tuning.tiles),
        key=list(tuning.key),
        prune_configs_by={"early_config_prune": _pruner(tuning.max_per_thread, tuning.order)},
        reset_to_zero=list(tuning.reset_to_zero) or None,
    )(kernel)


def run_tuned(kernel, grid_for, args, device, tuning):
    """Run ``kernel`` on a GPU with the cached configuration when
    :func:`cached_configs` has one, else through the autotuner.  The caller
    holds the device guard."""
    if not _session.retune:
        entries = cached_configs()
        if entries:
            lookup_key = entry_key_for(kernel, args, tuning.key, device_name(device))
            config = entries.get(lookup_key)
            if config is not None and _launch_with(kernel, grid_for, args, config, lookup_key):
                return
    autotuner = tuned(kernel, tuning)
    if _session.records is None:
        autotuner[grid_for](**args)
        return
    # Set to None first: the attribute outlives the call, and only a call
    # that benchmarked leaves fresh timings behind.
    autotuner.configs_timings = None
    autotuner[grid_for](**args)
    _record(kernel, args, tuning.key, device, autotuner)


# ---------------------------------------------------------------------------
# The tuned-config cache file.

CACHE_ENV = "TRITON_BLOOM_AUTOTUNE_CACHE"
CACHE_FORMAT = 2  # 2: entries carry the kernel's source key
_FILE_KIND = "triton_bloom autotune cache"


def cache_path():
    """Where tuned configs are read from and ``triton-bloom tune`` writes them.

    ``$TRITON_BLOOM_AUTOTUNE_CACHE`` when set (empty: no cache at all), else
    ``$XDG_CACHE_HOME/triton_bloom/autotune.json``, else
    ``~/.cache/triton_bloom/autotune.json``.  ``set_cache_path`` overrides all
    of these for this process.  Returns ``None`` when the cache is off.
    """
    if _session.path_override is not _UNSET:
        return _session.path_override
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return os.path.abspath(os.path.expanduser(value)) if value.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "triton_bloom", "autotune.json")


def set_cache_path(path):
    """Read tuned configs from ``path`` from now on (``None``: use none);
    what was loaded from the previous path is forgotten."""
    with _lock:
        _session.path_override = os.path.abspath(os.path.expanduser(path)) if path else None
        _session.entries = None


def reset_cache_path():
    """Back to :func:`cache_path`'s environment-derived default, reloaded at next use."""
    with _lock:
        _session.path_override = _UNSET
        _session.entries = None


def entry_key(kernel_name, source, key_values, dtypes, device):
    """The lookup key of one cache entry.

    ``source`` is :func:`source_key` of the kernel the entry was tuned for:
    an entry never outlives an edit of the kernel, of a function it calls,
    or a change of Triton.

    ``key_values`` maps the tuning-key argument names to their values,
    ``dtypes`` every tensor argument's name to ``str(tensor.dtype)``; both are
    sorted so that neither the order of ``TUNING_KEY`` nor the order of the
    launcher's keyword arguments can make an entry unreachable.
    """
    return (
        str(kernel_name),
        str(source),
        tuple(sorted((str(k), _plain(v)) for k, v in dict(key_values).items())),
        tuple(sorted((str(k), str(v)) for k, v in dict(dtypes).items())),
        str(device),
    )


def entry_key_for(kernel, args, key, device):
    """:func:`entry_key` of a launch of ``kernel`` on ``args`` (``device``: the GPU's name)."""
    return entry_key(
        _kernel_name(kernel), source_key(kernel), {name: args[name] for name in key}, _tensor_dtypes(args), device
    )


def source_key(kernel):
    """What identifies a kernel's code: Triton's own hash of its source and of
    every function it calls (``JITFunction.cache_key``, the key of Triton's
    compile cache), and Triton's version, since the same source compiles to
    other code under another Triton."""
    fn = kernel
    while not hasattr(fn, "cache_key") and hasattr(fn, "fn"):
        fn = fn.fn
    digest = getattr(fn, "cache_key", None)
    if digest is None:  # the interpreter's kernels carry no Triton hash: the source alone
        digest = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    return f"{digest}-triton-{triton.__version__}"


def cached_configs():
    """The loaded cache: ``{entry_key: {"kwargs", "num_warps", "num_stages"}}``.

    Read once per process, at the first GPU launch, from :func:`cache_path`.
    A missing file is an empty cache; an unreadable one is warned about and
    ignored, since a job must never fail because a tuning file went bad.
    """
    entries = _session.entries
    if entries is None:
        with _lock:
            if _session.entries is None:
                _session.entries = load_cache(cache_path())
            entries = _session.entries
    return entries


def load_cache(path):
    """``{entry_key: config}`` from the cache file at ``path`` ({} if none)."""
    return {_stored_key(e): e["config"] for e in read_entries(path)}


def read_entries(path):
    """The valid entries of the cache file at ``path``, as stored (a list of dicts).

    Entries that do not parse are dropped with one warning, the rest kept.
    """
    if not path or not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, ValueError) as exc:
        warnings.warn(f"triton_bloom: ignoring the autotune cache {path}: {exc}", RuntimeWarning, stacklevel=2)
        return []
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
        warnings.warn(
            f"triton_bloom: ignoring the autotune cache {path}: not format {CACHE_FORMAT} (rerun triton-bloom tune)",
            RuntimeWarning,
            stacklevel=2,
        )
        return []
    valid, bad = [], 0
    for entry in payload.get("entries", []):
        if _valid_entry(entry):
            valid.append(entry)
        else:
            bad += 1
    if bad:
        warnings.warn(
            f"triton_bloom: ignoring {bad} malformed entries of the autotune cache {path}", RuntimeWarning, stacklevel=2
        )
    return valid


def save_cache(records, path):
    """Merge ``records`` (dicts as :func:`recording` yields them) into the
    cache file at ``path`` and return the number of entries it then holds.

    A record replaces the stored entry with the same key.  The file is written
    to a temporary name and renamed, so a job reading it concurrently sees the
    old file or the new one, never half of one.
    """
    if not path:
        raise ValueError("no autotune cache path: set --cache or $" + CACHE_ENV)
    path = os.path.abspath(os.path.expanduser(path))
    records = [dict(r) for r in records]
    for entry in records:
        if not _valid_entry(entry):
            raise ValueError(f"not a cache entry: {entry!r}")
    with _write_lock:  # threads of this process: no writer's entries lost to another's merge
        count = _merge_into(path, records)
    with _lock:
        if _session.entries is not None and cache_path() == path:
            _session.entries = None  # reload: this process sees what it just wrote
    return count


def _merge_into(path, records):
    merged = {}
    for entry in read_entries(path) + records:
        merged[_stored_key(entry)] = entry
    payload = {
        "format": CACHE_FORMAT,
        "kind": _FILE_KIND,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "entries": sorted(merged.values(), key=lambda e: repr(_stored_key(e))),
    }
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(merged)


@contextlib.contextmanager
def recording():
    """Tune every launch inside the block, ignoring the cache, and collect
    one record per launch that tuned: the cache entry plus ``ms`` (the
    winner's median time as the tuner measured it, or ``None`` when the tuner
    did not benchmark, e.g. one config survived pruning) and ``configs_tried``.

    The autotuners keep their choices for the process, so a key already
    tuned earlier in this process yields a record without timings.
    """
    records = []
    previous = (_session.records, _session.retune)
    _session.records, _session.retune = records, True
    try:
        yield records
    finally:
        _session.records, _session.retune = previous


@functools.lru_cache(maxsize=None)
def _device_name_by_index(index):
    return torch.cuda.get_device_name(index)


def device_name(device):
    """The name cache entries are keyed on: the GPU's marketing name (a
    config tuned on one H200 suits every H200), ``"cpu"`` for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return _device_name_by_index(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------------------
# Internals.

_UNSET = object()


class _Session:
    """Process-wide state: the loaded cache, and the ``recording`` block."""

    def __init__(self):
        self.entries = None  # {entry_key: config}, loaded lazily
        self.path_override = _UNSET
        self.records = None  # a list while recording
        self.retune = False


_session = _Session()
_lock = threading.Lock()
_write_lock = threading.Lock()


def _launch_errors():
    # What a config that cannot build on this GPU or Triton raises before the
    # kernel runs; a runtime fault (bad address) is not among them and is
    # never retried.
    errors = []
    for module, name in (
        ("triton.runtime.errors", "OutOfResources"),
        ("triton.runtime.errors", "PTXASError"),
        ("triton.compiler.errors", "CompilationError"),
    ):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors) or (RuntimeError,)


def _launch_with(kernel, grid_for, args, config, lookup_key):
    """Launch with a cached config; ``False`` (and the entry dropped) if it
    does not build here, so the caller tunes instead of failing the job."""
    meta = dict(config["kwargs"])
    try:
        kernel[grid_for({**args, **meta})](
            **args, **meta, num_warps=config["num_warps"], num_stages=config["num_stages"]
        )
    except _launch_errors() as exc:
        warnings.warn(
            f"triton_bloom: cached config {config} for {lookup_key[0]} does not build here ({exc}); autotuning instead",
            RuntimeWarning,
            stacklevel=3,
        )
        with _lock:
            if _session.entries is not None:
                _session.entries.pop(lookup_key, None)
        return False
    return True


def _record(kernel, args, key, device, autotuner):
    best = autotuner.best_config
    timings = getattr(autotuner, "configs_timings", None) or {}
    ms = timings.get(best)
    if isinstance(ms, (list, tuple)):  # (median, p20, p80) in Triton 3.x
        ms = ms[0]
    _session.records.append(
        {
            "kernel": _kernel_name(kernel),
            "source": source_key(kernel),
            "key": {name: _plain(args[name]) for name in key},
            "dtypes": _tensor_dtypes(args),
            "device": device_name(device),
            "config": _config_dict(best),
            "ms": float(ms) if ms is not None else None,
            "configs_tried": len(timings) or None,
            "triton": triton.__version__,
            "torch": torch.__version__,
            "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )


def _stored_key(entry):
    return entry_key(entry["kernel"], entry["source"], entry["key"], entry["dtypes"], entry["device"])


def _config_dict(config):
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _kernel_name(kernel):
    fn = kernel
    while not hasattr(fn, "__name__") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn.__name__


def _tensor_dtypes(args):
    return {name: str(value.dtype) for name, value in args.items() if isinstance(value, torch.Tensor)}


def _plain(value):
    # Key values come from Python ints/bools (dim, K, MODE); JSON keeps those.
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    return str(value)


def _power_of_two(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


def _valid_entry(entry):
    try:
        config = entry["config"]
        ok = (
            isinstance(entry["kernel"], str)
            and isinstance(entry["source"], str)
            and isinstance(entry["key"], dict)
            and isinstance(entry["dtypes"], dict)
            and isinstance(entry["device"], str)
            and isinstance(config["kwargs"], dict)
            and _power_of_two(config["num_warps"])
            and isinstance(config["num_stages"], int)
            and config["num_stages"] >= 1
        )
        # Block sizes are tl.arange extents: powers of two, or the kernel cannot compile.
        return ok and all(_power_of_two(v) for k, v in config["kwargs"].items() if k.startswith("BLOCK"))
    except (KeyError, TypeError):
        return False
