#!/usr/bin/env python3
"""The mlc_nccl plugin's one-shot all-reduce against NCCL, on 2 (and 4) GPUs of one host.

On the GPU machine, from the repository root, with ``.carry`` built by
``scripts/build_carry.py`` (it carries the runtime-only TVM and the plugin)::

    NCCL_NVLS_ENABLE=0 python3 scripts/gpu_allreduce_test.py --out $OUT

For 2 workers, and 4 where the machine has 4 GPUs, a ProcessSession (the engine's set-up:
worker 0 a thread of this process, the others processes, buffers shared through CUDA IPC):

1. ``init``: the all-reduce path the plugin set up (``ccl.allreduce_path``): must be "oneshot";
2. ``eager``: float16, bfloat16 and float32 sums of 2 B .. 256 KiB (odd sizes, 16-byte and
   misaligned pointers, in place), plus sizes over the threshold (NCCL), issued back to back
   (three rounds, new inputs each): one-shot results must equal bit for bit a float32 sum in
   rank order rounded once (NumPy), leave the bytes around each output untouched, and agree
   with NCCL's within rounding (bit for bit on 2 GPUs);
3. ``graph``: the same kind of calls captured in one CUDA graph and replayed 24 times with new
   inputs each replay (every result checked), then 300 replays back to back, then eager
   calls again (the epochs on the GPU must stay in step);
4. ``bench``: time per float16 all-reduce, NCCL and one-shot, in a worker loop (CUDA events)
   and inside a CUDA graph of 100 calls; the one-shot path twice, launched with programmatic
   dependent launch on sm_90+ (this script sets ``MLC_NCCL_ONESHOT_PDL=1`` unless told
   otherwise; the engine's default is off: slower in decode) and without (``oneshot_nopdl``:
   plain cuLaunchKernel);

then a ThreadedSession of 2 workers (peer access within one process): ``eager`` and ``graph``.

Prints a table, writes ``$OUT/gpu_allreduce.json`` after each stage and ``ALL EXACT`` when
every check passed (exit 0; else 1). The one-shot kernels wait at most 5 s for a peer
(``--kernel-timeout``), and the script stops itself after ``--timeout`` seconds (default 150;
a normal run takes well under a minute), writing what it has.

``--device cpu`` runs the checking harness without a GPU on the CPU CCL (``cpu_shm``, which
sums in the same order): eager checks only, for testing this script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".carry"
WORKER = "scripts.gpu_allreduce_worker"  # entrypoint of the worker processes

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never multicast on shared machines

ESIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23}
MAX_BYTES = 256 << 10  # the plugin's default threshold


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Host reference (NumPy): inputs every worker can make for every rank, their ordered sum
# ---------------------------------------------------------------------------------------------

def _np():
    import numpy as np

    return np


def bits_type(dtype: str):
    np = _np()
    return np.uint32 if dtype == "float32" else np.uint16


def to_bits(x, dtype: str):
    """float32 array -> storage bits of ``dtype``, rounded to nearest even (no flush)."""
    np = _np()
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.view(np.uint32).copy()
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint16)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # bfloat16, round to nearest even
    return rounded.astype(np.uint16)


def from_bits(b, dtype: str):
    """storage bits -> float32 (exact)."""
    np = _np()
    if dtype == "float32":
        return np.asarray(b, dtype=np.uint32).view(np.float32)
    if dtype == "float16":
        return np.asarray(b, dtype=np.uint16).view(np.float16).astype(np.float32)
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def flush_to_zero_active() -> bool:
    """Whether this process's CPU flushes float32 subnormals (a library built with fast-math
    can switch it on for the whole process); then the reference skips subnormal inputs."""
    np = _np()
    tiny = np.array([1e-39], dtype=np.float32)
    return bool((tiny + np.float32(0.0))[0] == 0.0 or (tiny * np.float32(1.0))[0] == 0.0)


def make_input(seed: int, case: int, rep: int, rank: int, n: int, dtype: str, subnormals: bool):
    """Rank ``rank``'s input of a case and repetition, as storage bits."""
    np = _np()
    rng = np.random.default_rng([seed, case, rep, rank])
    x = rng.standard_normal(n).astype(np.float32)
    if n > 0:
        x[0] = -0.0  # -0 + -0 must stay -0 (a sum started at +0 would not)
    if n > 1:
        x[1] = 1000.0 + rank
    if n > 2 and subnormals:  # float16 / bfloat16 / float32 subnormals: summed, not flushed
        x[2] = {"float16": 3e-6, "bfloat16": 1e-39, "float32": 1e-40}[dtype] * (rank + 1)
    return to_bits(x, dtype)


def reference(inputs: list, dtype: str):
    """Sum in float32 in rank order 0..N-1, rounded once to ``dtype`` (what the kernel does).
    Each step is taken in float64 and rounded to float32: the correctly rounded float32 sum."""
    np = _np()
    acc = from_bits(inputs[0], dtype).astype(np.float32)
    for x in inputs[1:]:
        acc = (acc.astype(np.float64) + from_bits(x, dtype).astype(np.float64)).astype(np.float32)
    return to_bits(acc, dtype)


# ---------------------------------------------------------------------------------------------
# Worker side (each disco worker runs these; registered by scripts/gpu_allreduce_worker.py in
# the worker processes and by this script in its own process, whose thread is worker 0)
# ---------------------------------------------------------------------------------------------

MODES = ("out", "inplace", "offset", "inplace_offset")
PAD = 8  # elements of guard on each side of every output


class Case:
    """One all-reduce: buffers with guard elements, views at an element offset for the
    misaligned modes, and integer views of the same memory to write and read raw bits."""

    def __init__(self, index: int, dtype: str, nbytes: int, mode: str, dev):
        import tvm

        self.index, self.dtype, self.nbytes, self.mode = index, dtype, nbytes, mode
        self.esize = ESIZE[dtype]
        self.n = nbytes // self.esize
        bits = "uint32" if dtype == "float32" else "uint16"
        total = self.n + 2 * PAD
        self.sbase = tvm.runtime.empty((total,), dtype, dev)
        soff = PAD + (1 if "offset" in mode else 0)
        self.send = self.sbase._create_view((self.n,), dtype, soff * self.esize)
        self.sbits = self.sbase._create_view((total,), bits, 0)
        self.soff = soff
        if mode.startswith("inplace"):
            self.rbase, self.recv, self.rbits, self.roff = self.sbase, self.send, self.sbits, soff
        else:
            self.rbase = tvm.runtime.empty((total,), dtype, dev)
            self.roff = PAD + (3 if mode == "offset" else 0)
            self.recv = self.rbase._create_view((self.n,), dtype, self.roff * self.esize)
            self.rbits = self.rbase._create_view((total,), bits, 0)
        self.sentinel = 0xFFFFFFFF if dtype == "float32" else 0xFFFF  # a NaN

    def write(self, x_bits) -> None:
        np = _np()
        t = bits_type(self.dtype)
        full = np.full(self.n + 2 * PAD, self.sentinel, dtype=t)
        full[self.soff:self.soff + self.n] = x_bits
        self.sbits.copyfrom(full)
        if self.rbase is not self.sbase:
            self.rbits.copyfrom(np.full(self.n + 2 * PAD, self.sentinel, dtype=t))

    def read(self):
        """(the result bits, whether every guard element kept its sentinel)."""
        full = self.rbits.numpy()
        got = full[self.roff:self.roff + self.n].copy()
        guard = [i for i in range(len(full)) if not self.roff <= i < self.roff + self.n]
        if self.rbase is self.sbase:  # in place: the guards are the send buffer's
            guard = [i for i in guard if not self.soff <= i < self.soff + self.n]
        return got, bool((full[guard] == self.sentinel).all())


def default_cases(max_bytes: int = MAX_BYTES, quick: bool = False) -> list:
    """(dtype, bytes, mode): odd and even sizes from one element to the threshold, and two
    sizes over it (NCCL's), every mode, every dtype."""
    out = []
    sizes16 = [2, 4, 6, 14, 16, 18, 30, 32, 34, 62, 1000, 4094, 8192, 8194, 16384, 16386,
               65534, 131072, max_bytes - 2, max_bytes]
    sizes32 = [4, 8, 12, 16, 20, 36, 1000, 8188, 8192, 16384, 16388, 131072, max_bytes - 4, max_bytes]
    if quick:
        sizes16 = [2, 14, 16, 34, 16384, 16386, max_bytes]
        sizes32 = [4, 20, 16384, max_bytes]
    for dtype, sizes in (("float16", sizes16), ("bfloat16", sizes16), ("float32", sizes32)):
        for i, nbytes in enumerate(sizes):
            mode = MODES[i % len(MODES)]
            out.append((dtype, nbytes, mode))
            if nbytes in (16384, max_bytes):  # the decode sizes in every mode
                out += [(dtype, nbytes, m) for m in MODES if m != mode]
    out += [("float16", max_bytes + 2, "out"), ("float32", 1 << 20, "inplace")]  # over: NCCL
    return out


def _worker_context(cfg: dict):
    import tvm
    from tvm_ffi import get_global_func

    rank = int(get_global_func("runtime.disco.worker_id")()[0])
    if cfg["device"] == "cpu":
        dev = tvm.cpu(0)
    else:
        dev = tvm.cuda(int(cfg["devices"][rank]))
    return rank, dev


def _set_path(cfg: dict, mode: str) -> dict:
    """This worker's path switch (every worker makes the same call at the same point)."""
    if cfg["device"] == "cpu":
        return {"path": "cpu_shm"}
    from tvm_ffi import get_global_func

    return json.loads(str(get_global_func("runtime.disco.mlc_nccl.debug_set_allreduce_path")(mode, -1)))


def _path_info(cfg: dict) -> dict:
    if cfg["device"] == "cpu":
        return {"path": "cpu_shm"}
    from tvm_ffi import get_global_func

    return json.loads(str(get_global_func("runtime.disco.mlc_nccl.debug_allreduce_path")()))


def _compare(case: Case, got, guards_ok: bool, want, nranks: int) -> dict | None:
    """None when exact and the guards are intact, else what went wrong."""
    np = _np()
    if guards_ok and np.array_equal(got, want):
        return None
    bad = np.nonzero(got != want)[0]
    rec = {"case": case.index, "dtype": case.dtype, "bytes": case.nbytes, "mode": case.mode,
           "guards_ok": guards_ok, "mismatches": int(bad.size)}
    if bad.size:
        i = int(bad[0])
        rec.update(first=i, got=float(from_bits(got[i:i + 1], case.dtype)[0]),
                   want=float(from_bits(want[i:i + 1], case.dtype)[0]))
    return rec


def _within_rounding(a_bits, b_bits, inputs: list, dtype: str, nranks: int) -> tuple[bool, int, float]:
    """Two sums of the same inputs in different orders: |a - b| <= 2 n eps sum|x| (+ a few
    subnormals). Returns (ok, elements that differ, largest difference)."""
    np = _np()
    a, b = from_bits(a_bits, dtype).astype(np.float64), from_bits(b_bits, dtype).astype(np.float64)
    same = (a_bits == b_bits) | (np.isnan(a) & np.isnan(b))
    both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b))
    mag = np.sum([np.abs(from_bits(x, dtype).astype(np.float64)) for x in inputs], axis=0)
    tol = 2 * nranks * EPS[dtype] * mag + 1e-30
    diff = np.where(same | both_inf, 0.0, np.abs(a - b))
    ok = bool(np.all(diff <= tol))
    return ok, int(np.count_nonzero(~(same | both_inf))), float(np.nanmax(diff)) if diff.size else 0.0


def _allreduce_func(cfg: dict):
    from tvm_ffi import get_global_func

    return get_global_func(f"runtime.disco.{cfg['ccl']}.allreduce")


def _sync(cfg: dict) -> None:
    from tvm_ffi import get_global_func

    get_global_func(f"runtime.disco.{cfg['ccl']}.sync_worker")()


def worker_check_eager(cfg_json: str) -> str:
    """All cases back to back, ``rounds`` times with new inputs, once per path; compared here.
    Returns JSON."""
    try:
        return json.dumps(_check_eager(json.loads(cfg_json)))
    except Exception as e:  # noqa: BLE001  (an error must come back, not kill the worker)
        return json.dumps({"error": f"{type(e).__name__}: {e}"[:3000],
                           "traceback": traceback.format_exc()[-3000:]})


def _check_eager(cfg: dict) -> dict:
    rank, dev = _worker_context(cfg)
    nranks, seed, rounds = int(cfg["nranks"]), int(cfg["seed"]), int(cfg["rounds"])
    sub = not flush_to_zero_active()
    cases = [Case(i, d, b, m, dev) for i, (d, b, m) in enumerate(cfg["cases"])]
    allreduce = _allreduce_func(cfg)
    paths = ["cpu_shm"] if cfg["device"] == "cpu" else ["nccl", "oneshot"]
    results: dict = {"rank": rank, "subnormal_inputs": sub, "paths": {}}
    outputs: dict = {}
    # sizes over the one-shot threshold go to NCCL on either path, and NCCL's sum of more
    # than two ranks is in its own order: those are checked against NCCL (within rounding,
    # below), not bit for bit against the rank-order reference
    limit = int(_path_info(cfg).get("max_bytes", MAX_BYTES) or MAX_BYTES)
    for path in paths:
        before = _set_path(cfg, path)
        failures, t0 = [], time.perf_counter()
        for rep in range(rounds):
            inputs = []
            for c in cases:
                xs = [make_input(seed, c.index, rep, q, c.n, c.dtype, sub) for q in range(nranks)]
                inputs.append(xs)
                c.write(xs[rank])
            for c in cases:  # back to back, no host synchronisation in between
                allreduce(c.send, 0, False, c.recv)
            _sync(cfg)
            for c, xs in zip(cases, inputs):
                got, guards_ok = c.read()
                outputs[(path, c.index, rep)] = (got, xs)
                if path != "nccl" and (c.nbytes <= limit or nranks <= 2):
                    bad = _compare(c, got, guards_ok, reference(xs, c.dtype), nranks)
                    if bad is not None:
                        failures.append(dict(bad, round=rep))
                elif not guards_ok:
                    failures.append({"case": c.index, "guards_ok": False, "round": rep})
        after = _path_info(cfg)
        results["paths"][path] = {
            "exact": not failures, "failures": failures[:10], "failure_count": len(failures),
            "calls": len(cases) * rounds, "seconds": round(time.perf_counter() - t0, 3),
            "oneshot_calls": after.get("oneshot_calls", 0) - before.get("oneshot_calls", 0),
            "nccl_calls": after.get("nccl_calls", 0) - before.get("nccl_calls", 0),
            "error": after.get("error", "")}
    if "nccl" in paths:  # one-shot against NCCL, same inputs
        agree, equal, worst, differing = True, True, 0.0, 0
        for c in cases:
            for rep in range(rounds):
                a, xs = outputs[("oneshot", c.index, rep)]
                b, _ = outputs[("nccl", c.index, rep)]
                ok, ndiff, diff = _within_rounding(a, b, xs, c.dtype, nranks)
                agree &= ok
                equal &= ndiff == 0
                differing += ndiff
                worst = max(worst, diff)
        results["vs_nccl"] = {"within_rounding": agree, "bit_equal": equal,
                              "differing_elements": differing, "max_abs_diff": worst}
    if cfg["device"] != "cpu":
        _set_path(cfg, "oneshot")
    return results


def worker_check_graph(cfg_json: str) -> str:
    """The cases captured in one CUDA graph: replays with new inputs (each checked), a burst of
    replays, eager calls after. Returns JSON."""
    try:
        return json.dumps(_check_graph(json.loads(cfg_json)))
    except Exception as e:  # noqa: BLE001
        return json.dumps({"error": f"{type(e).__name__}: {e}"[:3000],
                           "traceback": traceback.format_exc()[-3000:]})


class _Graph:
    """A CUDA graph of ``body()`` captured on a stream of its own (cudart through ctypes)."""

    def __init__(self, dev):
        import ctypes

        from mlc_course.cuda_graph import cudart

        self.ct, self.rt, self.dev = ctypes, cudart(), dev
        self._ok(self.rt.cudaSetDevice(dev.index), "cudaSetDevice")
        self.stream = ctypes.c_void_p()
        self._ok(self.rt.cudaStreamCreateWithFlags(ctypes.byref(self.stream), 1), "cudaStreamCreate")
        self.exec = None

    def _ok(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what}: CUDA error {rc}")

    def run_on_stream(self, body) -> None:
        import tvm_ffi

        with tvm_ffi.use_raw_stream(self.dev, self.stream.value):
            body()

    def capture(self, body) -> None:
        import tvm_ffi

        ct = self.ct
        self._ok(self.rt.cudaStreamBeginCapture(self.stream, 2), "cudaStreamBeginCapture")  # relaxed
        try:
            with tvm_ffi.use_raw_stream(self.dev, self.stream.value):
                body()
        finally:
            graph = ct.c_void_p()
            rc = self.rt.cudaStreamEndCapture(self.stream, ct.byref(graph))
        self._ok(rc, "cudaStreamEndCapture")
        exec_ = ct.c_void_p()
        self._ok(self.rt.cudaGraphInstantiateWithFlags(ct.byref(exec_), graph, ct.c_ulonglong(0)),
                 "cudaGraphInstantiate")
        self.rt.cudaGraphDestroy(graph)
        self.exec = exec_

    def launch(self) -> None:
        self._ok(self.rt.cudaGraphLaunch(self.exec, self.stream), "cudaGraphLaunch")

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def time(self, replays: int) -> float:
        """Seconds per replay (CUDA events around ``replays`` back-to-back launches)."""
        ct = self.ct
        ev = [ct.c_void_p(), ct.c_void_p()]
        for e in ev:
            self._ok(self.rt.cudaEventCreate(ct.byref(e)), "cudaEventCreate")
        self._ok(self.rt.cudaEventRecord(ev[0], self.stream), "cudaEventRecord")
        for _ in range(replays):
            self.launch()
        self._ok(self.rt.cudaEventRecord(ev[1], self.stream), "cudaEventRecord")
        self._ok(self.rt.cudaEventSynchronize(ev[1]), "cudaEventSynchronize")
        ms = ct.c_float()
        self._ok(self.rt.cudaEventElapsedTime(ct.byref(ms), ev[0], ev[1]), "cudaEventElapsedTime")
        for e in ev:
            self.rt.cudaEventDestroy(e)
        return ms.value * 1e-3 / replays

    def close(self) -> None:
        if self.exec is not None:
            self.rt.cudaGraphExecDestroy(self.exec)
            self.exec = None
        if self.stream.value:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = self.ct.c_void_p()


def _check_graph(cfg: dict) -> dict:
    rank, dev = _worker_context(cfg)
    nranks, seed = int(cfg["nranks"]), int(cfg["seed"])
    sub = not flush_to_zero_active()
    cases = [Case(i, d, b, m, dev) for i, (d, b, m) in enumerate(cfg["cases"])]
    allreduce = _allreduce_func(cfg)
    _set_path(cfg, cfg.get("path", "oneshot"))
    before = _path_info(cfg)
    failures: list = []

    def body():
        for c in cases:
            allreduce(c.send, 0, False, c.recv)

    def fill(rep):
        inputs = []
        for c in cases:
            xs = [make_input(seed, c.index, rep, q, c.n, c.dtype, sub) for q in range(nranks)]
            inputs.append(xs)
            c.write(xs[rank])
        return inputs

    def check(inputs, rep, stage):
        for c, xs in zip(cases, inputs):
            got, guards_ok = c.read()
            bad = _compare(c, got, guards_ok, reference(xs, c.dtype), nranks)
            if bad is not None:
                failures.append(dict(bad, replay=rep, stage=stage))

    g = _Graph(dev)
    t0 = time.perf_counter()
    try:
        inputs = fill(1000)  # a warm-up pass on the graph's stream (as CudaGraphDecoder does)
        g.run_on_stream(body)
        g.sync()
        check(inputs, -1, "warm-up on the stream")
        g.capture(body)
        replays = int(cfg["replays"])
        for rep in range(replays):
            inputs = fill(rep)
            g.launch()
            g.sync()
            check(inputs, rep, "replay")
        # a burst of replays, no host in between: the in-place cases sum again and again,
        # the others must still hold the last inputs' sum at the end
        burst = int(cfg["burst"])
        inputs = fill(5000)
        for _ in range(burst):
            g.launch()
        g.sync()
        for c, xs in zip(cases, inputs):
            if c.rbase is not c.sbase:
                got, guards_ok = c.read()
                bad = _compare(c, got, guards_ok, reference(xs, c.dtype), nranks)
                if bad is not None:
                    failures.append(dict(bad, replay=burst, stage="burst"))
        # eager again, after the graph moved the epochs on
        inputs = fill(6000)
        body()
        _sync(cfg)
        check(inputs, 0, "eager after graph")
    finally:
        g.close()
    after = _path_info(cfg)
    return {"rank": rank, "exact": not failures, "failures": failures[:10],
            "failure_count": len(failures), "calls_per_graph": len(cases),
            "replays": int(cfg["replays"]) + int(cfg["burst"]),
            "seconds": round(time.perf_counter() - t0, 3),
            "path": after.get("path"), "host_dispatched_oneshot":
                after.get("oneshot_calls", 0) - before.get("oneshot_calls", 0),
            "error": after.get("error", "")}


def worker_bench(cfg_json: str) -> str:
    """Seconds per float16 all-reduce, per size and path: a loop in the worker and a CUDA graph
    of ``per_graph`` calls. Returns JSON."""
    try:
        return json.dumps(_bench(json.loads(cfg_json)))
    except Exception as e:  # noqa: BLE001
        return json.dumps({"error": f"{type(e).__name__}: {e}"[:3000],
                           "traceback": traceback.format_exc()[-3000:]})


def _bench(cfg: dict) -> dict:
    import numpy as np
    import tvm
    from tvm_ffi import get_global_func

    rank, dev = _worker_context(cfg)
    allreduce = _allreduce_func(cfg)
    loop = get_global_func("runtime.disco.mlc_nccl.debug_bench_allreduce")
    # PDL on / off for the one-shot kernel (None: a plugin that predates it). Every rank runs
    # the same paths in the same order (they are collectives); where PDL is not supported the
    # two one-shot rows are the same plain launch, and "pdl" in the result says so.
    set_pdl = get_global_func("runtime.disco.mlc_nccl.debug_set_oneshot_pdl", allow_missing=True)
    info0 = _path_info(cfg)
    pdl_default = bool(info0.get("pdl"))
    paths = ("nccl", "oneshot", "oneshot_nopdl") if set_pdl is not None else ("nccl", "oneshot")
    rows = []
    for nbytes in cfg["sizes"]:
        buf = tvm.runtime.empty((max(1, nbytes // 2),), "float16", dev)
        buf.copyfrom(np.zeros(buf.shape, np.float16))  # zeros stay zeros
        row = {"bytes": nbytes}
        for path in paths:
            _set_path(cfg, "nccl" if path == "nccl" else "oneshot")
            if set_pdl is not None and path != "nccl":
                set_pdl(1 if path == "oneshot" and info0.get("pdl_supported") else 0)
            loop(buf, 20)  # warm-up
            row[f"{path}_loop_us"] = round(float(loop(buf, int(cfg["iters"]))) * 1e6, 2)
            g = _Graph(dev)
            try:
                per = int(cfg["per_graph"])
                g.capture(lambda: [allreduce(buf, 0, False, buf) for _ in range(per)])
                for _ in range(3):
                    g.launch()
                g.sync()
                row[f"{path}_graph_us"] = round(g.time(int(cfg["replays"])) / per * 1e6, 2)
            finally:
                g.close()
        rows.append(row)
    _set_path(cfg, "oneshot")
    if set_pdl is not None:
        set_pdl(1 if pdl_default else 0)
    return {"rank": rank, "rows": rows, "pdl": {"supported": info0.get("pdl_supported"),
                                                "default": pdl_default,
                                                "note": info0.get("pdl_note")},
            "path": _path_info(cfg)}


def register_worker_functions() -> None:
    from tvm_ffi import register_global_func

    register_global_func("mlc_ar_test.check_eager", worker_check_eager, override=True)
    register_global_func("mlc_ar_test.check_graph", worker_check_graph, override=True)
    register_global_func("mlc_ar_test.bench", worker_bench, override=True)


# ---------------------------------------------------------------------------------------------
# Controller
# ---------------------------------------------------------------------------------------------

class Results:
    def __init__(self, out: Path | None):
        self.path = out / "gpu_allreduce.json" if out else None
        self.data: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "command": " ".join(sys.argv)}
        self.lock = threading.Lock()

    def save(self) -> None:
        with self.lock:
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.data, indent=1, default=str))
                tmp.replace(self.path)


def setup(carry: Path, device: str):
    """The carried runtime-only TVM (lent GPU machines) when ``carry/site`` has one, else the
    installed TVM. Returns the worker entrypoint to use."""
    sys.path.insert(0, str(ROOT))
    if device == "cuda" and (carry / "site" / "tvm").is_dir():
        os.environ["MLC_TP_CARRY"] = str(carry)
        os.environ["MLC_NCCL_CCL_LIBRARY"] = str(carry / "libmlc_ccl_nccl.so")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(carry / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")])
        from scripts.gpu_run import setup_runtime

        setup_runtime(carry)  # loads the CUDA runtime, registers tvm_callback_cuda_compile
    else:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        import tvm  # noqa: F401

        from mlc_course import ccl

        ccl.disco_session()
        if device == "cuda":
            try:  # the course's nvcc callback where this checkout has it (TVM's needs NVRTC)
                from mlc_course.gpu import use_nvcc_compiler

                use_nvcc_compiler()
            except ImportError:
                pass
    register_worker_functions()  # worker 0 is a thread of this process
    return WORKER


def _on_workers(sess, name: str, cfg: dict) -> list:
    ref = sess.get_global_func(name)(json.dumps(cfg))
    return [json.loads(str(ref.debug_get_from_remote(w))) for w in range(int(sess.num_workers))]


def _ok_eager(per_worker: list, device: str) -> bool:
    ok = True
    for r in per_worker:
        if "error" in r:
            return False
        for path, p in r["paths"].items():
            ok &= bool(p["exact"]) and not p.get("error")
            if path == "oneshot":
                ok &= p["oneshot_calls"] > 0  # the one-shot path really ran
        if device == "cuda":
            ok &= bool(r["vs_nccl"]["within_rounding"])
    return ok


def run_session(kind: str, n: int, args, res: Results, entry: str) -> bool:
    from mlc_course import ccl

    ds = ccl.disco_session()
    key = f"{kind}{n}"
    rec: dict = {"workers": n, "session": kind}
    res.data.setdefault("sessions", {})[key] = rec
    sess = None
    ok = True
    try:
        t0 = time.time()
        sess = ds.ProcessSession(num_workers=n, entrypoint=entry) if kind == "process" \
            else ds.ThreadedSession(n)
        if args.device == "cuda":
            info = ccl.init_nccl_ccl(sess, n, oneshot_timeout_s=args.kernel_timeout)
            rec["init"] = {"seconds": round(time.time() - t0, 2), "libraries": info.libraries,
                           "allreduce": info.allreduce}
            path = info.allreduce.get("path")
            log(f"[{key}] init {rec['init']['seconds']} s: all-reduce path {path}: "
                f"{info.allreduce.get('reason')} ({info.allreduce.get('kernel')}); "
                f"PDL: {info.allreduce.get('pdl')} ({info.allreduce.get('pdl_note')})")
            if path != "oneshot":
                ok = False
                rec["error"] = (f"one-shot path not set up: {info.allreduce.get('reason')}"
                                if info.allreduce else
                                f"the plugin {info.library} has no one-shot all-reduce: rebuild "
                                ".carry with scripts/build_carry.py")
                log(f"[{key}] {rec['error']}")
                return ok
        else:
            ccl.init_cpu_ccl(sess, n)
        res.save()
        base = {"device": args.device, "nranks": n, "devices": list(range(n)), "seed": 7,
                "ccl": ccl.NCCL_CCL_NAME if args.device == "cuda" else ccl.CCL_NAME}
        cases = default_cases(quick=args.quick or kind == "thread")
        t0 = time.time()
        eager = _on_workers(sess, "mlc_ar_test.check_eager", dict(base, cases=cases, rounds=3))
        rec["eager"] = eager
        e_ok = _ok_eager(eager, args.device)
        ok &= e_ok
        v = eager[0].get("vs_nccl", {})
        log(f"[{key}] eager: {len(cases)} calls x 3 rounds per path: "
            f"{'exact' if e_ok else 'FAILED'} ({time.time() - t0:.1f} s); vs NCCL: {v}")
        if not e_ok:
            log(json.dumps(eager, indent=1)[:4000])
        res.save()
        if args.device == "cuda":
            gcases = [c for c in cases if c[1] <= MAX_BYTES][:: (2 if kind == "thread" else 1)]
            t0 = time.time()
            graph = _on_workers(sess, "mlc_ar_test.check_graph",
                                dict(base, cases=gcases, replays=args.replays, burst=args.burst))
            rec["graph"] = graph
            g_ok = all(r.get("exact") and not r.get("error") for r in graph)  # ("error": the kernel's error word, or an exception)
            ok &= g_ok
            log(f"[{key}] graph: {len(gcases)} calls per graph, {args.replays} checked replays + "
                f"{args.burst} back to back: {'exact' if g_ok else 'FAILED'} ({time.time() - t0:.1f} s)")
            if not g_ok:
                log(json.dumps(graph, indent=1)[:4000])
            res.save()
            if kind == "process" and not args.quick:
                t0 = time.time()
                bench = _on_workers(sess, "mlc_ar_test.bench",
                                    dict(base, sizes=args.sizes, iters=300, per_graph=100, replays=20))
                rec["bench"] = bench
                if any("error" in r for r in bench):
                    ok = False
                    log(json.dumps(bench, indent=1)[:3000])
                else:
                    log(f"[{key}] bench ({time.time() - t0:.1f} s)")
                res.save()
            rec["allreduce_after"] = ccl.allreduce_path(sess, worker=None)
            ok &= not any(w.get("error") for w in rec["allreduce_after"])
    except Exception as e:  # noqa: BLE001
        ok = False
        rec["error"] = f"{type(e).__name__}: {str(e)[:3000]}"
        rec["traceback"] = traceback.format_exc()[-3000:]
        log(rec["traceback"])
    finally:
        rec["ok"] = ok
        res.save()
        if kind == "thread" and sess is not None:
            sess.shutdown()
        sess = None  # dropped here, in the main thread (never shutdown() + destroy later)
        gc.collect()
    return ok


def table(res: Results) -> str:
    lines = ["workers    bytes   NCCL loop  1-shot loop  NCCL graph  1-shot graph  no-PDL graph"
             "  graph speed-up",
             "                        (µs per all-reduce, float16, worker 0; 1-shot: with PDL "
             "where supported)"]
    for key, rec in res.data.get("sessions", {}).items():
        bench0 = (rec.get("bench") or [{}])[0]
        if bench0.get("pdl"):
            lines.append(f"{'':>7} [{key}] PDL supported: {bench0['pdl'].get('supported')} "
                         f"({bench0['pdl'].get('note')})")
        for row in bench0.get("rows", []):
            sp = row["nccl_graph_us"] / row["oneshot_graph_us"] if row.get("oneshot_graph_us") else 0
            nopdl = row.get("oneshot_nopdl_graph_us")
            lines.append(f"{rec['workers']:>7} {row['bytes']:>8} {row['nccl_loop_us']:>11.2f} "
                         f"{row['oneshot_loop_us']:>12.2f} {row['nccl_graph_us']:>11.2f} "
                         f"{row['oneshot_graph_us']:>13.2f} "
                         f"{(f'{nopdl:.2f}' if nopdl is not None else '-'):>13} {sp:>14.2f}x")
            if row["bytes"] == 16384:
                lines.append(f"{'':>7} Llama-2-70B token (160 x 16 KiB in a graph): NCCL "
                             f"{160 * row['nccl_graph_us'] / 1000:.2f} ms, one-shot "
                             f"{160 * row['oneshot_graph_us'] / 1000:.2f} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ.setdefault("MLC_NCCL_ONESHOT_PDL", "1")  # check and time the PDL launch too
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--carry", default=str(CARRY))
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--workers", default="auto", help="e.g. 2,4 (auto: 2, and 4 if 4 GPUs)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes, no timing")
    ap.add_argument("--no-thread", action="store_true", help="skip the ThreadedSession")
    ap.add_argument("--replays", type=int, default=24)
    ap.add_argument("--burst", type=int, default=300)
    ap.add_argument("--sizes", default="2,1024,4096,16384,65536,262144",
                    help="bytes of the timed float16 all-reduces")
    ap.add_argument("--kernel-timeout", type=float, default=5.0,
                    help="seconds a one-shot kernel waits for a peer before it gives up")
    ap.add_argument("--timeout", type=float, default=150.0, help="the whole run, seconds")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    res = Results(Path(args.out) if args.out else None)
    res.data["env"] = {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "NCCL_DEBUG",
                                                      "MLC_NCCL_ONESHOT", "MLC_NCCL_ONESHOT_MAX_BYTES",
                                                      "MLC_NCCL_ONESHOT_PDL")}

    def watchdog():
        res.data["timed_out"] = f"stopped after {args.timeout:.0f} s"
        try:
            res.save()
        except Exception as e:  # noqa: BLE001  (the main thread may be changing the data)
            log(f"could not save the results: {e}")
        print(f"TIMED OUT after {args.timeout:.0f} s (results so far in {res.path})", flush=True)
        os._exit(3)

    timer = threading.Timer(args.timeout, watchdog)
    timer.daemon = True
    timer.start()
    t_start = time.time()
    entry = setup(Path(args.carry).resolve(), args.device)
    if args.device == "cuda":
        from mlc_course.gpu import cuda_device_count

        gpus = cuda_device_count()
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from scripts.gpu_tp_test import gpu_info

        res.data["machine"] = gpu_info()
    else:
        gpus = 4
    res.data["gpus"] = gpus
    counts = [2, 4] if args.workers == "auto" else [int(w) for w in args.workers.split(",")]
    counts = [c for c in counts if c <= gpus]
    if not counts:
        print(f"needs 2 GPUs, found {gpus}", flush=True)
        return 1
    ok = True
    for n in counts:
        ok &= run_session("process", n, args, res, entry)
    if not args.no_thread:  # last: an error in a worker *thread* aborts this process
        ok &= run_session("thread", 2, args, res, entry)
    res.data["all_exact"] = ok
    res.data["seconds"] = round(time.time() - t_start, 1)
    res.save()
    timer.cancel()
    if args.device == "cuda" and not args.quick:
        print(table(res), flush=True)
    print("ALL EXACT" if ok else "CHECKS FAILED", flush=True)
    log(f"{res.data['seconds']} s; results: {res.path}")
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # sessions are gone and results written: skip the interpreter's teardown
