"""The CPU path's inner loops in C, compiled on first use.

- :func:`rows`: the ids' ``(n, k)`` rows in one pass (AVX-512 / AVX2 / plain
  clones chosen at load time), where ``hashing.murmurhash3_32`` takes about
  forty elementwise PyTorch ops, each a trip through memory and, with several
  threads, a barrier; the same pass gives the ids' minimum, maximum and
  padding count, so the range check and the padding test cost nothing more.
- :func:`gather_sum` (small batches) and :func:`scatter_add`: the forward's
  sums and the backward's scatter on one thread, in ``embedding_bag``'s and
  ``index_add_``'s order, so the same bits.  On a busy machine each of
  PyTorch's parallel loops waits for its slowest thread, and ``index_add_``
  splits a row's columns between threads, which then share cache lines.
- :func:`zero`: ``memset`` of a reused gradient, for the same reason.

The source is compiled with the system's C compiler (``$CC``, else ``cc``)
the first time a process needs it, about half a second, into
``$TRITON_BLOOM_CACHE`` or ``~/.cache/triton_bloom`` (keyed by the source and
flags), where later processes find it.  No compiler, a failed build,
``TRITON_BLOOM_NATIVE=0``, or a platform other than Linux/macOS: the
functions return ``None`` / ``False`` and the callers run PyTorch ops, which
give the same results (``tests/test_cpu_path.py`` holds both to scikit-learn,
``mmh3`` and a numpy lookup, bit for bit).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from typing import Optional

import torch

__all__ = ["available", "rows", "gather_sum", "scatter_add", "zero", "build_error"]

# Written from the murmur3_x86_32 specification: one or two 4-byte blocks
# (ids below 2**31 hash as int32, as scikit-learn does; larger ids as their 8
# little-endian bytes), then the length and the finaliser.  The signed hash
# is reduced floor-modulo num_rows in float64, exactly (every value involved
# is below 2**53; the two corrections absorb the reciprocal's rounding).
_SOURCE = r"""
#include <stdint.h>
#define CHUNK 512
#define MAX_K 24
#define WIDE_START 2147483648LL

static inline uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }
static inline uint32_t mix_block(uint32_t b) { return rotl32(b * 0xCC9E2D51u, 15) * 0x1B873593u; }
static inline uint32_t add_block(uint32_t h, uint32_t mixed) { return rotl32(h ^ mixed, 13) * 5u + 0xE6546B64u; }
static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16; return h;
}
static inline int32_t floor_mod(uint32_t h, double d, double inv) {
    double x = (double)(int32_t)h;
    double r = x - __builtin_floor(x * inv) * d;
    r = r < 0 ? r + d : r;
    r = r >= d ? r - d : r;
    return (int32_t)r;
}

/* The (n, k) int32 rows of n ids (int32 when id_bytes == 4, else int64) under
   seeds[0..k), in [0, num_rows) for num_rows < 2**31.  stats receives the ids'
   minimum, maximum and how many equal pad. */
#define BODY(T) \
    const double d = (double)num_rows, inv = 1.0 / d; \
    uint32_t low[CHUNK], high[CHUNK]; \
    int32_t tmp[MAX_K][CHUNK]; \
    int64_t lo = n ? (int64_t)ids[0] : 0, hi = lo, pads = 0; \
    for (int64_t base = 0; base < n; base += CHUNK) { \
        const int64_t c = n - base < CHUNK ? n - base : CHUNK; \
        const T* restrict v = ids + base; \
        int64_t chunk_hi = (int64_t)v[0]; \
        for (int64_t i = 0; i < c; i++) { \
            const int64_t id = (int64_t)v[i]; \
            lo = id < lo ? id : lo; \
            chunk_hi = id > chunk_hi ? id : chunk_hi; \
            pads += id == pad; \
            low[i] = mix_block((uint32_t)id); \
            high[i] = mix_block((uint32_t)((uint64_t)id >> 32)); \
        } \
        hi = chunk_hi > hi ? chunk_hi : hi; \
        for (int64_t j = 0; j < k; j++) { \
            const uint32_t s = seeds[j]; \
            int32_t* restrict t = tmp[j]; \
            if (chunk_hi < WIDE_START) { \
                for (int64_t i = 0; i < c; i++) t[i] = floor_mod(fmix32(add_block(s, low[i]) ^ 4u), d, inv); \
            } else { \
                for (int64_t i = 0; i < c; i++) { \
                    const uint32_t h = add_block(s, low[i]); \
                    const uint32_t narrow = h ^ 4u, wide = add_block(h, high[i]) ^ 8u; \
                    t[i] = floor_mod(fmix32((int64_t)v[i] >= WIDE_START ? wide : narrow), d, inv); \
                } \
            } \
        } \
        int32_t* restrict o = out + base * k; \
        for (int64_t i = 0; i < c; i++) \
            for (int64_t j = 0; j < k; j++) o[i * k + j] = tmp[j][i]; \
    } \
    stats[0] = lo; stats[1] = hi; stats[2] = pads;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define CLONES
#endif

/* dst[rows[i, j]] += src[i] for j = 0..k-1, then i = 0..n-1: index_add_'s
   order, one thread.  Returns -1, or the position of a row outside the table
   (nothing after it is added). */
#define SCATTER(T, R) \
    for (int64_t j = 0; j < k; j++) \
        for (int64_t i = 0; i < n; i++) { \
            const int64_t r = (int64_t)((const R*)rows)[i * k + j]; \
            if (r < 0 || r >= num_rows) return i * k + j; \
            T* restrict d = dst + r * dim; \
            const T* restrict v = src + i * dim; \
            for (int64_t c = 0; c < dim; c++) d[c] += v[c]; \
        } \
    return -1;

CLONES int64_t bloom_scatter_f32(float* restrict dst, int64_t num_rows, int64_t dim, const float* restrict src,
                                 int64_t n, const void* restrict rows, int64_t rows_i64, int64_t k) {
    if (rows_i64) { SCATTER(float, int64_t) } else { SCATTER(float, int32_t) }
}
CLONES int64_t bloom_scatter_f64(double* restrict dst, int64_t num_rows, int64_t dim, const double* restrict src,
                                 int64_t n, const void* restrict rows, int64_t rows_i64, int64_t k) {
    if (rows_i64) { SCATTER(double, int64_t) } else { SCATTER(double, int32_t) }
}

/* out[i] = weight[rows[i, 0]] + weight[rows[i, 1]] + ..., left to right (as
   embedding_bag sums a bag), one thread.  Returns -1, or the position of a row
   outside the table. */
#define GATHER(T, R) \
    for (int64_t i = 0; i < n; i++) { \
        T* restrict o = out + i * dim; \
        for (int64_t j = 0; j < k; j++) { \
            const int64_t r = (int64_t)((const R*)rows)[i * k + j]; \
            if (r < 0 || r >= num_rows) return i * k + j; \
            const T* restrict v = weight + r * dim; \
            if (j == 0) for (int64_t c = 0; c < dim; c++) o[c] = v[c]; \
            else for (int64_t c = 0; c < dim; c++) o[c] += v[c]; \
        } \
    } \
    return -1;

CLONES int64_t bloom_gather_f32(float* restrict out, const float* restrict weight, int64_t num_rows, int64_t dim,
                                int64_t n, const void* restrict rows, int64_t rows_i64, int64_t k) {
    if (rows_i64) { GATHER(float, int64_t) } else { GATHER(float, int32_t) }
}
CLONES int64_t bloom_gather_f64(double* restrict out, const double* restrict weight, int64_t num_rows, int64_t dim,
                                int64_t n, const void* restrict rows, int64_t rows_i64, int64_t k) {
    if (rows_i64) { GATHER(double, int64_t) } else { GATHER(double, int32_t) }
}

CLONES void bloom_rows_i32(const int32_t* restrict ids, int64_t n, const uint32_t* restrict seeds, int64_t k,
                           int64_t num_rows, int64_t pad, int32_t* restrict out, int64_t* restrict stats) { BODY(int32_t) }
CLONES void bloom_rows_i64(const int64_t* restrict ids, int64_t n, const uint32_t* restrict seeds, int64_t k,
                           int64_t num_rows, int64_t pad, int32_t* restrict out, int64_t* restrict stats) { BODY(int64_t) }
"""

# -fno-trapping-math lets the compiler vectorise the float64 modulo's
# selects; nothing here depends on floating-point exceptions.
# -ffp-contract=off: no fused multiply-adds, so every sum rounds as PyTorch's does.
_FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-fPIC", "-shared"]
MAX_K = 24

_lock = threading.Lock()
_library = None
_tried = False
_error: Optional[str] = None


def _cache_dir() -> str:
    root = os.environ.get("TRITON_BLOOM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "triton_bloom"
    )
    return os.path.join(root, "native")


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *_FLAGS, sys.platform]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # a home without write access: this user's folder under the system's temp
        folder = os.path.join(tempfile.gettempdir(), f"triton_bloom_native_{os.getuid()}")
        os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"bloom_rows_{key}.so")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            source = os.path.join(scratch, "bloom_rows.c")
            with open(source, "w") as f:
                f.write(_SOURCE)
            built = os.path.join(scratch, "bloom_rows.so")
            subprocess.run([compiler, *_FLAGS, source, "-o", built], check=True, capture_output=True, timeout=120)
            # Atomic: processes building at the same time each rename a whole file.
            os.replace(built, path)
    library = ctypes.CDLL(path)
    argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    for name in ("bloom_rows_i32", "bloom_rows_i64"):
        fn = getattr(library, name)
        fn.argtypes = [*argtypes, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = None
    for name in ("bloom_scatter_f32", "bloom_scatter_f64", "bloom_gather_f32", "bloom_gather_f64"):
        fn = getattr(library, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
        fn.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int64
    return library


def _load():
    global _library, _tried, _error
    if _tried:
        return _library
    with _lock:
        if not _tried:
            if os.environ.get("TRITON_BLOOM_NATIVE", "1") == "0":
                _error = "disabled by TRITON_BLOOM_NATIVE=0"
            elif not (sys.platform.startswith("linux") or sys.platform == "darwin"):
                _error = f"not built on {sys.platform}"
            else:
                try:
                    _library = _build()
                except Exception as exc:  # no compiler, a failed build: hash with PyTorch ops
                    detail = getattr(exc, "stderr", b"") or b""
                    _error = f"{type(exc).__name__}: {exc} {detail.decode(errors='replace')[-500:]}".strip()
            _tried = True
    return _library


def available() -> bool:
    """Whether the compiled hash loop is built and loaded (building it if needed)."""
    return _load() is not None


def build_error() -> Optional[str]:
    """Why the compiled loop is not in use, or ``None`` when it is (or was never tried)."""
    return _error


_SEEDS = {}


def _seeds(seeds: tuple) -> torch.Tensor:
    tensor = _SEEDS.get(seeds)
    if tensor is None:
        tensor = _SEEDS.setdefault(seeds, torch.tensor(seeds, dtype=torch.int64).to(torch.int32))
    return tensor


def rows(ids: torch.Tensor, seeds: tuple, num_rows: int, pad: Optional[int] = None):
    """``(rows, (low, high, pads))``: the ids' ``(*, k)`` int32 rows under
    ``seeds``, floor-modulo ``num_rows``, with the ids' minimum, maximum and
    the count of ids equal to ``pad``; ``None`` when the compiled loop cannot
    take this input (not built, not a CPU tensor, ``num_rows >= 2**31``, more
    than 24 seeds).

    Args:
        ids (Tensor): int32 or int64 ids on the CPU, any shape.
        seeds (tuple of int): the murmurhash3 seeds, one per hash function.
        num_rows (int): rows of the table, ``1 <= num_rows < 2**31``.
        pad (int, optional): the id to count (``padding_idx``).
    """
    k = len(seeds)
    if (
        ids.device.type != "cpu"
        or ids.dtype not in (torch.int32, torch.int64)
        or not 1 <= num_rows < 2**31
        or not 1 <= k <= MAX_K
    ):
        return None
    library = _load()
    if library is None:
        return None
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    out = torch.empty((*ids.shape, k), dtype=torch.int32, device="cpu")
    stats = (ctypes.c_int64 * 3)()
    fn = library.bloom_rows_i32 if ids.dtype == torch.int32 else library.bloom_rows_i64
    # pad=-1 counts no valid id (a negative id fails the range check anyway).
    pad = -1 if pad is None else pad
    fn(flat.data_ptr(), n, _seeds(seeds).data_ptr(), k, num_rows, pad, out.data_ptr(), ctypes.addressof(stats))
    return out, (stats[0], stats[1], stats[2])


def scatter_add(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> bool:
    """``dst.index_add_(0, rows[:, j], src)`` for every column ``j`` of the
    ``(n, k)`` rows, in that order, on one thread: the same sums, bit for bit,
    without the threads' false sharing of ``index_add_``'s column split.
    Returns ``False`` (nothing done) when the loop cannot take the input.

    Raises:
        IndexError: a row outside ``dst``.
    """
    library = _library if _tried else _load()
    if (
        library is None
        or not (type(dst) is type(src) is type(rows) is torch.Tensor)
        or dst.dtype not in (torch.float32, torch.float64)
        or src.dtype != dst.dtype
        or rows.dtype not in (torch.int32, torch.int64)
        or not (dst.device.type == src.device.type == rows.device.type == "cpu")
        or not (dst.is_contiguous() and src.is_contiguous() and rows.is_contiguous())
        or dst.dim() != 2
        or src.shape != (rows.shape[0], dst.shape[1])
    ):
        return False
    fn = library.bloom_scatter_f32 if dst.dtype == torch.float32 else library.bloom_scatter_f64
    n, k = rows.shape
    bad = fn(
        dst.data_ptr(), dst.shape[0], dst.shape[1], src.data_ptr(), n, rows.data_ptr(), rows.dtype == torch.int64, k
    )
    if bad >= 0:
        raise IndexError(f"row {int(rows.reshape(-1)[bad])} is outside the table's {dst.shape[0]} rows")
    return True


# The sums of a batch up to this many elements (ids x k x dim) run on one
# thread: below it embedding_bag's parallel loop costs more in waiting for
# its threads than it saves.
GATHER_ONE_THREAD = 1 << 19


def gather_sum(weight: torch.Tensor, rows: torch.Tensor) -> Optional[torch.Tensor]:
    """``(n, dim)`` sums of each id's ``k`` rows of ``weight``, left to right
    (``embedding_bag``'s bits), on one thread, for a batch below
    ``GATHER_ONE_THREAD`` elements; ``None`` when the loop does not take it.

    Raises:
        IndexError: a row outside ``weight``.
    """
    library = _library if _tried else _load()
    n, k = rows.shape
    if (
        library is None
        or n * k * weight.shape[1] > GATHER_ONE_THREAD
        or k == 0
        or not (type(rows) is torch.Tensor and type(weight) in (torch.Tensor, torch.nn.Parameter))
        or weight.dtype not in (torch.float32, torch.float64)
        or rows.dtype not in (torch.int32, torch.int64)
        or not (weight.device.type == rows.device.type == "cpu")
        or not (weight.is_contiguous() and rows.is_contiguous())
    ):
        return None
    out = torch.empty((n, weight.shape[1]), dtype=weight.dtype, device="cpu")
    fn = library.bloom_gather_f32 if weight.dtype == torch.float32 else library.bloom_gather_f64
    bad = fn(out.data_ptr(), weight.data_ptr(), *weight.shape, n, rows.data_ptr(), rows.dtype == torch.int64, k)
    if bad >= 0:
        raise IndexError(f"row {int(rows.reshape(-1)[bad])} is outside the table's {weight.shape[0]} rows")
    return out


def zero(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.zero_()`` on one thread for a contiguous CPU tensor: with
    several threads a busy machine stalls each one on the slowest (zeroing
    51 MB took 2 ms on one thread and 31 ms on two at a load of 13)."""
    if tensor.device.type == "cpu" and tensor.is_contiguous() and type(tensor) is torch.Tensor:
        ctypes.memset(tensor.data_ptr(), 0, tensor.numel() * tensor.element_size())
        return tensor
    return tensor.zero_()
