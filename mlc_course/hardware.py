"""Hardware numbers and measurements for the memory-bound view of decoding.

Single-batch decode reads every weight once per token and does about one multiply-add per
weight read, so its speed is set by memory bandwidth, not by arithmetic. This module holds
what that argument needs:

* a table of GPUs (vendor memory bandwidth and size, ``data/gpus.csv``) and the seed's
  published decode speeds (``data/seed_results.csv``), read into small dataclasses;
* measurements on the machine at hand: NumPy copy bandwidth and NumPy GEMV time, so a
  reader sees the law ``time = bytes / bandwidth`` on their own CPU;
* the arithmetic that turns bandwidth into a tok/s ceiling and memory sizes into "how many
  cards does this model need".

Units: bandwidth in GB/s with GB = 1e9 bytes (as vendors quote it); memory sizes as the
vendors quote them ("80 GB"), which for DRAM are binary, so ``GPU.memory_bytes`` uses 2**30.
"""

from __future__ import annotations

import csv
import ctypes
import glob
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
GPUS_CSV = DATA_DIR / "gpus.csv"
SEED_RESULTS_CSV = DATA_DIR / "seed_results.csv"
SEED_SOURCE = "mlc-ai/llm-perf-bench README, batch 1, 256 decode tokens"

# The seed's model names -> the course's config presets (mlc_course.config.PRESETS).
SEED_MODEL_PRESETS = {"Llama-2-70B": "llama2-70b", "CodeLlama-34B": "codellama-34b"}


# ------------------------------------------------------------------------------ tables

@dataclass(frozen=True)
class GPU:
    """One accelerator as its vendor describes it."""

    key: str  # short name used everywhere in the course ("A100-80G-PCIe")
    name: str
    vendor: str
    memory_GB: float  # nominal, as the vendor quotes it (binary for DRAM)
    memory_type: str
    bandwidth_GBps: float  # peak DRAM bandwidth, GB = 1e9 bytes
    fp16_tensor_TFLOPS: float | None  # dense fp16 matrix peak; None where not published
    form: str  # SXM or PCIe
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_GB * 2**30)

    @property
    def ops_per_byte(self) -> float | None:
        """Peak FLOPs per byte of DRAM traffic: a kernel below this is memory-bound."""
        if self.fp16_tensor_TFLOPS is None:
            return None
        return self.fp16_tensor_TFLOPS * 1e12 / (self.bandwidth_GBps * 1e9)


@dataclass(frozen=True)
class SeedResult:
    """One published decode speed from the seed's benchmark."""

    model: str  # "Llama-2-70B" or "CodeLlama-34B"
    precision: str  # MLC scheme name ("q0f16" = fp16, "q4f16_1"); "q4" for other systems' 4-bit
    gpu: str  # a key of load_gpus()
    num_gpus: int
    tok_per_s: float
    system: str  # "MLC LLM" or a peer (exllama, llama.cpp, vLLM)
    source: str

    @property
    def preset(self) -> str | None:
        """The course config preset with this model's shapes."""
        return SEED_MODEL_PRESETS.get(self.model)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; the course's data/ folder must sit next to "
                                f"the mlc_course package (install with `pip install -e .`)")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_gpus(path: str | os.PathLike = GPUS_CSV) -> dict[str, GPU]:
    """The GPU table, keyed by ``GPU.key``, in the file's order."""
    gpus = {}
    for r in _read_csv(Path(path)):
        tflops = r["fp16_tensor_TFLOPS"].strip()
        gpus[r["key"]] = GPU(
            key=r["key"], name=r["name"], vendor=r["vendor"], memory_GB=float(r["memory_GB"]),
            memory_type=r["memory_type"], bandwidth_GBps=float(r["bandwidth_GBps"]),
            fp16_tensor_TFLOPS=float(tflops) if tflops else None, form=r["form"],
            source=r["source"])
    return gpus


def load_seed_results(path: str | os.PathLike = SEED_RESULTS_CSV,
                      include_peers: bool = False) -> list[SeedResult]:
    """The seed's published single-batch decode speeds (MLC LLM rows; peers on request).

    The precision column uses MLC's scheme names: ``q0f16`` is the seed's "fp16" and
    ``q4f16_1`` its 4-bit format, so ``LlamaConfig.bytes_per_token(row.precision)`` works.
    """
    rows = [SeedResult(model=r["model"], precision=r["precision"], gpu=r["gpu"],
                       num_gpus=int(r["num_gpus"]), tok_per_s=float(r["tok_per_s"]),
                       system=r["system"], source=r["source"])
            for r in _read_csv(Path(path))]
    return rows if include_peers else [r for r in rows if r.system == "MLC LLM"]


# ------------------------------------------------------------------------ arithmetic

def ceiling_tok_per_s(bytes_per_token: float, bandwidth_GBps: float, num_gpus: int = 1) -> float:
    """Upper bound on single-batch decode speed: ``num_gpus * bandwidth / bytes per token``.

    Each token must stream every weight from DRAM once; with tensor parallelism each of N
    devices streams 1/N of them at the same time. Communication, kernel launches and the KV
    cache only lower the real number, so this is a ceiling, not a prediction.
    """
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return num_gpus * bandwidth_GBps * 1e9 / bytes_per_token


def weight_bytes(cfg, scheme: str) -> int:
    """Bytes all of a model's weights take in ``scheme`` (scales included): its footprint.

    Unlike ``LlamaConfig.bytes_per_token`` this counts the whole embedding table, not one
    row. 1-D weights (the norms) stay in the scheme's float dtype.
    """
    from .quantization import get_scheme, nbytes

    act = np.dtype(get_scheme(scheme).float_dtype).itemsize
    total = 0
    for shape in cfg.param_shapes().values():
        total += nbytes(shape, scheme) if len(shape) == 2 else int(np.prod(shape)) * act
    return total


def min_gpus(nbytes: float, gpu: GPU, choices: Iterable[int] = (1, 2, 4, 8),
             num_kv_heads: int | None = None) -> int | None:
    """Fewest cards (from ``choices``) whose memory holds ``nbytes`` of weights.

    Tensor parallelism splits attention heads evenly, so a count must divide
    ``num_kv_heads`` when given. Only weights are counted: the KV cache and activations
    need room on top, so a "fit" here is necessary, not sufficient. None: no choice fits.
    """
    for n in sorted(choices):
        if num_kv_heads is not None and num_kv_heads % n:
            continue
        if n * gpu.memory_bytes >= nbytes:
            return n
    return None


def seed_pivot(seed: list[SeedResult], counts: tuple[int, ...] = (2, 4, 8)) -> tuple[list[str], list[list]]:
    """The seed's table as the blog prints it: one row per (model, precision, GPU), one
    column per GPU count, None where nothing was reported. Returns (headers, rows)."""
    table: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in seed:
        table.setdefault((r.model, r.precision, r.gpu), {})[r.num_gpus] = r.tok_per_s
    headers = ["model", "precision", "GPU"] + [f"{n}× tok/s" for n in counts]
    return headers, [list(k) + [v.get(n) for n in counts] for k, v in table.items()]


def ceiling_rows(cfg, scheme: str, gpus: Iterable[GPU],
                 counts: tuple[int, ...] = (1, 2, 4, 8)) -> list[list]:
    """Per GPU, the decode ceiling (tok/s) of ``cfg`` in ``scheme`` on each card count;
    None where the weights do not fit in that many cards' memory (see :func:`min_gpus`)."""
    per_token = cfg.bytes_per_token(scheme)
    footprint = weight_bytes(cfg, scheme)
    rows = []
    for g in gpus:
        need = min_gpus(footprint, g, choices=counts, num_kv_heads=cfg.num_kv_heads)
        rows.append([g.key] + [ceiling_tok_per_s(per_token, g.bandwidth_GBps, n)
                               if need is not None and n >= need else None for n in counts])
    return rows


def seed_vs_ceiling(seed: list[SeedResult], gpus: dict[str, GPU], configs: dict) -> list[dict]:
    """Each seed result next to its bandwidth ceiling and the fraction of it achieved.

    ``configs`` maps preset names to ``LlamaConfig``. Rows whose precision is not an MLC
    scheme (peers' "q4") are skipped.
    """
    from .quantization import SCHEMES

    out = []
    for r in seed:
        if r.precision not in SCHEMES or r.preset not in configs:
            continue
        nbytes = configs[r.preset].bytes_per_token(r.precision)
        ceiling = ceiling_tok_per_s(nbytes, gpus[r.gpu].bandwidth_GBps, r.num_gpus)
        out.append(dict(model=r.model, precision=r.precision, gpu=r.gpu, num_gpus=r.num_gpus,
                        measured=r.tok_per_s, ceiling=ceiling, fraction=r.tok_per_s / ceiling))
    return out


# ---------------------------------------------------------------------- measurements

def _openblas_thread_setters() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    """ctypes handles to OpenBLAS's set/get thread count, if NumPy links OpenBLAS."""
    libs: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower()})
    except OSError:
        pass
    root = Path(np.__file__).parent
    libs += glob.glob(str(root.parent / "numpy.libs" / "*openblas*")) + glob.glob(
        str(root / ".dylibs" / "*openblas*"))
    names = [("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
             ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
             ("openblas_set_num_threads", "openblas_get_num_threads")]
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in names:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                return setter, getter
    return None


@contextmanager
def blas_threads(n: int | None) -> Iterator[bool]:
    """Run NumPy's BLAS with ``n`` threads inside the block (None: leave it alone).

    Yields whether the thread count could be set. Why: on a small shared machine a
    multi-threaded GEMV waits for a busy core and its time jumps in scheduler quanta; one
    thread gives the steady, single-core numbers that the copy bandwidth is compared with.
    """
    handles = _openblas_thread_setters() if n is not None else None
    if handles is None:
        yield False
        return
    setter, getter = handles
    before = getter()
    setter(n)
    try:
        yield True
    finally:
        setter(before)


def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return float(np.median(times))


def _pick_clock(clock: str, single_thread: bool) -> Callable[[], float]:
    """``"thread"``: CPU time of the calling thread; ``"wall"``: wall clock; ``"auto"``:
    thread time when the work runs on the calling thread alone, else wall clock.

    Why thread time: on a small machine shared with other jobs, the scheduler takes the core
    away for whole time slices (milliseconds), which lands in a wall-clock timing at random.
    A thread's CPU time does not count the time it was descheduled, but it does count the time
    the core sat waiting for memory, which is what a bandwidth measurement needs. It is only
    right for work done by the calling thread, hence "auto".
    """
    if clock == "wall" or (clock == "auto" and not single_thread):
        return time.perf_counter
    if clock in ("thread", "auto"):
        return time.thread_time
    raise ValueError(f"clock must be 'auto', 'thread' or 'wall', got {clock!r}")


def measure_cpu_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7, kind: str = "copy",
                          clock: str = "auto") -> float:
    """Main-memory bandwidth one NumPy call reaches on this CPU, in GB/s (1e9 bytes/s).

    ``kind="copy"``: ``np.copyto(dst, src)`` of ``nbytes``, counted as read + write, i.e.
    ``2 * nbytes`` bytes moved per copy (the extra read a write-allocate cache may do is not
    counted, as in STREAM). ``kind="read"``: ``src.sum()``, counted as ``nbytes`` read.
    Both run on one core. The buffer should be well above the last-level cache (tens of MB)
    or the number measures the cache. Median of ``repeats`` timings after one warm-up, so a
    neighbour's burst of work moves it less than a mean would; ``clock`` as in
    :func:`_pick_clock` (both kinds run on the calling thread, so "auto" is thread time).
    """
    if kind not in ("copy", "read"):
        raise ValueError(f"kind must be 'copy' or 'read', got {kind!r}")
    n = max(1, nbytes // 4)
    src = np.ones(n, dtype=np.float32)
    if kind == "copy":
        dst = np.empty_like(src)
        t = _median_time(lambda: np.copyto(dst, src), repeats, clock=_pick_clock(clock, True))
        return 2 * src.nbytes / t / 1e9
    t = _median_time(src.sum, repeats, clock=_pick_clock(clock, True))
    return src.nbytes / t / 1e9


def gemv_bytes(n: int, k: int, itemsize: int = 4) -> int:
    """Bytes a GEMV ``y = W x`` (W: n x k) must move: W, x and y once each."""
    return (n * k + k + n) * itemsize


def time_gemv(n: int, k: int, repeats: int = 7, threads: int | None = 1, seed: int = 0,
              clock: str = "auto") -> float:
    """Median seconds of one NumPy float32 GEMV ``W @ x`` with W of shape (n, k).

    The GEMV is decode's workhorse: 2 n k FLOPs on n k weights, 0.5 FLOP per byte in
    float32, so its time should be bytes / bandwidth. W is filled with a constant (values do
    not change the speed of float32 math) so that building it costs little; x is random.
    ``threads=1`` (default) pins BLAS to one thread (see :func:`blas_threads`); None uses
    BLAS's own default. ``clock`` as in :func:`_pick_clock`.
    """
    return time_gemvs([n], k, repeats=repeats, threads=threads, seed=seed, clock=clock)[0]


def time_gemvs(ns: Sequence[int], k: int, repeats: int = 7, threads: int | None = 1,
               seed: int = 0, clock: str = "auto") -> list[float]:
    """Median seconds of GEMVs with W of shapes (n, k) for each n, timed round-robin.

    Round-robin (size 1, 2, ..., then again) rather than size by size, so that a slow spell
    of a shared machine hits every size alike instead of bending the time-vs-bytes line.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(k).astype(np.float32)
    ws = [np.full((n, k), 0.5, dtype=np.float32) for n in ns]
    ys = [np.empty(n, dtype=np.float32) for n in ns]
    times: list[list[float]] = [[] for _ in ns]
    with blas_threads(threads) as pinned:
        clk = _pick_clock(clock, single_thread=pinned and threads == 1)
        for w, y in zip(ws, ys):  # warm-up
            np.matmul(w, x, out=y)
        for _ in range(repeats):
            for i, (w, y) in enumerate(zip(ws, ys)):
                t0 = clk()
                np.matmul(w, x, out=y)
                times[i].append(clk() - t0)
    return [float(np.median(t)) for t in times]


@dataclass(frozen=True)
class BandwidthFit:
    """``time = bytes / bandwidth + overhead``, fitted by least squares."""

    bandwidth_GBps: float
    overhead_s: float
    r2: float

    def predict(self, nbytes: float | np.ndarray) -> float | np.ndarray:
        return np.asarray(nbytes) / (self.bandwidth_GBps * 1e9) + self.overhead_s


def fit_bandwidth(nbytes: Iterable[float], seconds: Iterable[float]) -> BandwidthFit:
    """Fit a line to (bytes, seconds): its inverse slope is the bandwidth the kernel reached."""
    x = np.asarray(list(nbytes), dtype=np.float64)
    y = np.asarray(list(seconds), dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else float("nan")
    bw = 1.0 / slope / 1e9 if slope > 0 else math.inf
    return BandwidthFit(bandwidth_GBps=bw, overhead_s=float(intercept), r2=r2)


def measure_cpu_gflops(n: int = 1024, repeats: int = 3, threads: int | None = 1) -> float:
    """float32 GEMM throughput of NumPy on this CPU, GFLOP/s (2 n^3 FLOPs per n x n matmul).

    With :func:`measure_cpu_bandwidth` it gives this CPU's ops:byte ratio, the point on the
    roofline where kernels stop being memory-bound.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    with blas_threads(threads) as pinned:
        t = _median_time(lambda: a @ b, repeats, clock=_pick_clock("auto", pinned and threads == 1))
    return 2 * n**3 / t / 1e9
