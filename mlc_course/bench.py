"""Decode benchmark on this machine's CPU, next to its bandwidth ceiling and its peers.

``run_cpu_bench`` measures what notebook 01 predicts: single-batch decode reads every weight
once per token, so ``tok/s <= bandwidth / bytes per token``. It loads the compiled engine for
each scheme and, when ``llama-cpp-python`` is installed, llama.cpp on the same GGUF, warms them
up, then times greedy generations round-robin (every engine once per round, so a neighbour's
load on a shared machine slows all of them alike) and reports per engine the median decode
tok/s, the weight bytes a decode step reads (``LlamaConfig.bytes_per_token``; for llama.cpp
the GGUF's tensors), the ceiling from this CPU's measured memory bandwidth and the fraction of
it reached. The independent NumPy reference (:class:`~mlc_course.reference.ReferenceLlama`,
float32 weights) is timed in the same run, as the baseline a reader could write without a
compiler. ``python -m mlc_course bench`` writes the result to ``data/results/cpu_bench.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

DEFAULT_PROMPT = "The history of the lighthouse begins"
TINY_PROMPT_IDS = [1, 17, 42, 99, 5, 63, 7, 128]  # for models without a tokenizer


def cpu_info() -> dict:
    """CPU model name, core counts and LLVM's name for it."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from .compile import host_cpu

    return {"cpu": name, "cores": os.cpu_count() or 1, "usable_cores": _usable_cores(),
            "llvm_cpu": host_cpu(), "platform": platform.platform()}


def measure_all_cores_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7,
                                threads: int | None = None) -> float:
    """Read bandwidth of all cores together, GB/s: ``threads`` NumPy threads (default: the
    usable cores) each sum their own ``nbytes / threads`` buffer at the same time (NumPy
    releases the GIL inside the loop); wall clock, the best of ``repeats`` after a warm-up
    (as STREAM reports it: on a shared machine a neighbour can only make a run slower).

    :func:`mlc_course.hardware.measure_cpu_bandwidth` measures one core; a multi-threaded
    kernel can read faster than that (on the course's 2-core VM about 35 against 25 GB/s).
    """
    import threading

    import numpy as np

    threads = threads or _usable_cores()
    bufs = [np.ones(max(1, nbytes // threads // 4), dtype=np.float32) for _ in range(threads)]

    def once() -> float:
        workers = [threading.Thread(target=b.sum) for b in bufs]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    once()
    t = min(once() for _ in range(repeats))
    return sum(b.nbytes for b in bufs) / t / 1e9


def tvm_num_threads() -> int | None:
    """Threads of TVM's CPU thread pool in this process. TVM takes ``TVM_NUM_THREADS`` if
    set, else on x86 *half* the cores it sees (it assumes hyper-threading): 1 on a 2-core VM."""
    try:
        import tvm

        return int(tvm.get_global_func("runtime.NumThreads")())
    except Exception:
        return None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _load_average() -> float | None:
    """1-minute load average (None where the OS has none): runnable jobs competing for cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _prompt_ids(engine, prompt: str) -> list[int]:
    if engine.tokenizer is None:
        return list(TINY_PROMPT_IDS)
    return engine.encode_prompt(prompt)


def time_reference_decode(reference, prompt_ids: list[int], steps: int = 8,
                          blas_threads: int | None = 1) -> dict:
    """Decode tok/s of the NumPy reference: prefill the prompt, then ``steps`` greedy
    decode steps, timed together (one warm-up step first).

    BLAS runs on ``blas_threads`` threads (1 by default): on a small shared machine
    OpenBLAS's threaded GEMV spends milliseconds waking its threads, 50x the time of the
    1536 x 576 GEMV itself (measured on the course's 2-core VM).
    """
    import numpy as np

    from .hardware import blas_threads as _blas_threads

    with _blas_threads(blas_threads) as pinned:
        reference.reset()
        logits = reference.prefill(prompt_ids)
        tok = int(np.argmax(logits))
        reference.decode(tok)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = int(np.argmax(reference.decode(tok)))
        dt = time.perf_counter() - t0
    return {"decode_tok_per_s": steps / dt, "steps": steps,
            "blas_threads": blas_threads if pinned else None}


def gguf_bytes_per_token(path) -> int:
    """Bytes llama.cpp reads per decode step from a GGUF: every tensor once (the linears in
    their own block format, e.g. Q4_1 = 20 bytes per 32 weights; the tied embedding, read
    whole as the output layer, in its format, e.g. Q8_0; the norms)."""
    from .weights import _open_gguf

    return int(sum(int(t.n_bytes) for t in _open_gguf(path).tensors))


class LlamaCppRunner:
    """llama.cpp (``llama-cpp-python``, an optional extra) on a GGUF, greedy decoding from
    prompt ids, one timed generation per call: the peer of the course's engine in the CPU bench.

    llama.cpp runs the GGUF's own kernels (Q4_1 weights times 8-bit-quantized activations,
    integer dot products), on ``threads`` threads (default: the usable cores, as TVM's)."""

    def __init__(self, gguf_path, n_ctx: int = 512, threads: int | None = None):
        import llama_cpp

        self.version, self.threads = llama_cpp.__version__, threads or _usable_cores()
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=self.threads,
                                   n_threads_batch=self.threads, n_batch=512, verbose=False,
                                   logits_all=True)  # scores of the last position after each eval

    def generate(self, prompt_ids: list[int], n: int) -> tuple[float, list[int]]:
        """(decode tok/s over the n - 1 tokens after the first, the n greedy ids)."""
        import numpy as np

        llm = self.llm
        llm.reset()
        llm.eval(prompt_ids)
        out, t0 = [], time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
        return (n - 1) / (time.perf_counter() - t0), out

    @staticmethod
    def available() -> bool:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return False
        return True


def run_cpu_bench(model: str = "smollm2-135m", schemes: Sequence[str] = ("q0f32", "q4f32_1"),
                  new_tokens: int = 32, out: str | Path | None = "data/results/cpu_bench.json",
                  prompt: str = DEFAULT_PROMPT, repeats: int = 5, reference_steps: int = 8,
                  bandwidth_GBps: float | None = None, log=None, threads: int | None = None,
                  settle_s: float = 0.5) -> dict:
    """Benchmark single-batch decoding on the CPU; returns (and writes to ``out``) a dict:

    ``model, date, command, machine{cpu, cores, usable_cores, llvm_cpu, platform,
    tvm_threads}, bandwidth_GBps{copy, read, read_all_cores}, bandwidth_GBps_runs,
    load_average_1min{before, after}, prompt, prompt_tokens, new_tokens, repeats,
    results[...], reference{...}``. ``results`` has one entry per scheme: ``{quantization,
    bytes_per_token, decode_tok_per_s, decode_tok_per_s_runs, prefill_tok_per_s,
    ceiling_tok_per_s, fraction_of_ceiling, ceiling_all_cores_tok_per_s, output_ids}``;
    ``reference`` the same numbers for the NumPy float32 reference (``decode_tok_per_s,
    steps, blas_threads, bytes_per_token, ceiling_tok_per_s, fraction_of_ceiling``).

    The ceiling uses the one-core copy bandwidth of
    :func:`~mlc_course.hardware.measure_cpu_bandwidth`, measured before and after the runs,
    the better of the two (a busy neighbour can only lower it); ``bandwidth_GBps`` overrides
    it. ``ceiling_all_cores_tok_per_s`` uses the read bandwidth of all cores together, the
    limit for an engine whose kernels use every core (``machine.tvm_threads`` tells how many
    threads TVM's kernels had). On a machine shared with other jobs every speed drops: the
    load average is recorded so that a reader can tell.
    """
    from .engine import Engine
    from .hardware import ceiling_tok_per_s, measure_cpu_bandwidth
    from .reference import ReferenceLlama

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    schemes = list(schemes)
    if not schemes:
        raise ValueError("give at least one quantization scheme")
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (the first token comes from prefill)")

    def measure_bandwidth() -> dict:
        return {"copy": measure_cpu_bandwidth(kind="copy"), "read": measure_cpu_bandwidth(kind="read"),
                "read_all_cores": measure_all_cores_bandwidth()}

    load_before = _load_average()
    if load_before is not None and load_before > 0.5:
        log(f"note: load average {load_before:.1f}: other work on this machine lowers the numbers")
    log("measuring memory bandwidth ...")
    bw_runs = [measure_bandwidth()]
    result: dict = {
        "model": model, "date": _dt.date.today().isoformat(),
        "command": "python -m mlc_course bench " + " ".join(f"--quantization {s}" for s in schemes)
        + f" --new-tokens {new_tokens}" + (f" --threads {threads}" if threads else ""),
        "machine": cpu_info(),
        "prompt": prompt, "new_tokens": new_tokens, "repeats": repeats, "results": [],
    }
    # Every engine stays loaded and the timed runs go round-robin (engine 1, 2, ..., llama.cpp,
    # then again): a neighbour's load on a shared machine slows each engine alike instead of
    # whichever happened to run at the time. Medians of the rounds. Before each run a pause
    # lets the previous engine's worker threads stop spinning (TVM's pool and llama.cpp's
    # both spin-wait for a while after a parallel region): measured back to back on 2
    # cores, llama.cpp right after TVM ran at 80-134 tok/s instead of ~130.
    engines = {}
    for scheme in schemes:
        log(f"loading {model} {scheme} ...")
        engines[scheme] = Engine(model, scheme, quiet=True)
    first = engines[schemes[0]]
    prompt_ids, source = _prompt_ids(first, prompt), first.source
    if first.tokenizer is None:
        result["prompt"] = None
    result["prompt_tokens"] = len(prompt_ids)
    lc = None
    if getattr(source, "gguf_path", None) is not None:
        if LlamaCppRunner.available():
            lc = LlamaCppRunner(source.gguf_path, n_ctx=max(512, len(prompt_ids) + new_tokens + 8), threads=threads)
        else:
            log("llama-cpp-python is not installed (pip install llama-cpp-python): no llama.cpp peer")
    runs: dict[str, list] = {s: [] for s in schemes}
    lc_runs: list = []
    try:
        for eng in engines.values():  # warm-up
            eng.generate(prompt_ids, max_new_tokens=4, stop_ids=())
        if lc:
            lc.generate(prompt_ids, 4)
        for r in range(repeats):
            log(f"round {r + 1} of {repeats} ...")
            for scheme, eng in engines.items():
                time.sleep(settle_s)
                runs[scheme].append(eng.generate(prompt_ids, max_new_tokens=new_tokens, stop_ids=()))
            if lc:
                time.sleep(settle_s)
                lc_runs.append(lc.generate(prompt_ids, new_tokens))
    finally:
        for eng in engines.values():
            eng.close()
    timings = [{"decode_tok_per_s": statistics.median(x.decode_tok_per_s for x in runs[s]),
                "decode_tok_per_s_runs": [round(x.decode_tok_per_s, 2) for x in runs[s]],
                "prefill_tok_per_s": statistics.median(x.prefill_tok_per_s for x in runs[s]),
                "output_ids": runs[s][0].output_ids} for s in schemes]
    for scheme, t in zip(schemes, timings):
        log(f"  {scheme}: {t['decode_tok_per_s']:.1f} tok/s")
    log("timing the NumPy reference ...")
    ref = ReferenceLlama(source.config, source.load_params())
    rt = time_reference_decode(ref, prompt_ids, reference_steps)
    del ref
    log("measuring memory bandwidth again ...")
    bw_runs.append(measure_bandwidth())
    # a neighbour's work can only lower a measurement: the ceiling takes the best one
    bw = {k: max(r[k] for r in bw_runs) for k in bw_runs[0]}
    # the engine runs on TVM's thread pool: its ceiling is what all those cores can read
    threads = tvm_num_threads()
    engine_bw = "read_all_cores" if threads > 1 else "copy"
    bw_used = bandwidth_GBps or bw[engine_bw]
    result["ceiling_uses"] = "given" if bandwidth_GBps else engine_bw
    result["machine"]["tvm_threads"] = tvm_num_threads()
    result["load_average_1min"] = {"before": load_before, "after": _load_average()}
    result["bandwidth_GBps"] = {k: round(v, 2) for k, v in bw.items()}
    result["bandwidth_GBps_runs"] = [{k: round(v, 2) for k, v in r.items()} for r in bw_runs]
    for scheme, timing in zip(schemes, timings):
        nbytes = source.config.bytes_per_token(scheme)
        ceiling = ceiling_tok_per_s(nbytes, bw_used)
        result["results"].append({
            "quantization": scheme, "bytes_per_token": nbytes,
            "decode_tok_per_s": round(timing["decode_tok_per_s"], 2),
            "decode_tok_per_s_runs": timing["decode_tok_per_s_runs"],
            "prefill_tok_per_s": round(timing["prefill_tok_per_s"], 2),
            "ceiling_tok_per_s": round(ceiling, 2),
            "fraction_of_ceiling": round(timing["decode_tok_per_s"] / ceiling, 4),
            "ceiling_all_cores_tok_per_s": round(ceiling_tok_per_s(nbytes, bw["read_all_cores"]), 2),
            "output_ids": timing["output_ids"]})
        log(f"{scheme}: {timing['decode_tok_per_s']:.1f} tok/s of a {ceiling:.0f} tok/s ceiling")
    nbytes = source.config.bytes_per_token("q0f32")
    ceiling = ceiling_tok_per_s(nbytes, bandwidth_GBps or bw["copy"])  # one BLAS thread: one core
    result["reference"] = {"decode_tok_per_s": round(rt["decode_tok_per_s"], 2),
                           "steps": rt["steps"], "blas_threads": rt["blas_threads"],
                           "bytes_per_token": nbytes,
                           "ceiling_tok_per_s": round(ceiling, 2),
                           "fraction_of_ceiling": round(rt["decode_tok_per_s"] / ceiling, 4)}
    log(f"NumPy reference: {rt['decode_tok_per_s']:.1f} tok/s")
    table = [{"engine": f"mlc_course {r['quantization']}", "quantization": r["quantization"],
                "decode_tok_per_s": r["decode_tok_per_s"], "bytes_per_token": r["bytes_per_token"],
                "ceiling_tok_per_s": r["ceiling_tok_per_s"], "fraction_of_ceiling": r["fraction_of_ceiling"]}
               for r in result["results"]]
    table.append({"engine": "NumPy reference (float32, 1 BLAS thread)", "quantization": "float32",
                    **{k: result["reference"][k] for k in ("decode_tok_per_s", "bytes_per_token",
                                                             "ceiling_tok_per_s", "fraction_of_ceiling")}})
    if lc is not None:
        nbytes = gguf_bytes_per_token(source.gguf_path)
        ceiling = ceiling_tok_per_s(nbytes, bw_used)
        tps = statistics.median(x[0] for x in lc_runs)
        result["llama_cpp"] = {"version": lc.version, "threads": lc.threads,
                               "decode_tok_per_s": round(tps, 2),
                               "decode_tok_per_s_runs": [round(x[0], 2) for x in lc_runs],
                               "bytes_per_token": nbytes, "ceiling_tok_per_s": round(ceiling, 2),
                               "fraction_of_ceiling": round(tps / ceiling, 4), "output_ids": lc_runs[0][1]}
        table.append({"engine": f"llama.cpp {lc.version} (Q4_1 GGUF, {lc.threads} threads)",
                      "quantization": "Q4_1 (GGUF)", **{k: result["llama_cpp"][k] for k in (
                          "decode_tok_per_s", "bytes_per_token", "ceiling_tok_per_s", "fraction_of_ceiling")}})
        log(f"llama.cpp: {tps:.1f} tok/s")
    result["engines"] = table
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def load_results(path: str | Path | None = None) -> dict:
    """The saved CPU benchmark (``data/results/cpu_bench.json`` by default)."""
    default = Path(__file__).resolve().parent.parent / "data" / "results" / "cpu_bench.json"
    path = Path(path) if path else default
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `python -m mlc_course bench`")
    return json.loads(path.read_text())


def kernel_profile(engine, prompt_ids: list[int], steps: int = 16) -> dict:
    """Time every call a decode step makes: the VM's instrument hook, with a device sync
    around each call (a no-op on the CPU). Returns the calls ranked by time per token, each
    with the bytes its arguments and outputs hold over its time (``GBps``: for a GEMV the
    weight stream it achieved). Syncs add a few microseconds per call on GPUs, so the sum
    exceeds the real step time there; the ranking and the GEMV bandwidths are what this is
    for. Needs a one-worker engine (:class:`~mlc_course.engine.LocalRunner`) without CUDA
    graphs (a replayed graph is one call)."""
    import numpy as np

    r = engine.runner
    if not hasattr(r, "vm") or getattr(r, "decoder", None) is not None:
        raise ValueError("kernel_profile needs a one-worker engine that does not replay CUDA graphs")
    tvm, dev = r.tvm, r.dev
    stats: dict[str, list] = {}
    state = {"t": 0.0}

    def instrument(func, name, before, ret, *args):
        dev.sync()
        if before:
            state["t"] = time.perf_counter()
            return 0
        dt = time.perf_counter() - state["t"]
        nbytes = sum(int(np.prod(a.shape)) * tvm.DataType(str(a.dtype)).bits // 8
                     for a in args if hasattr(a, "shape") and hasattr(a, "dtype"))
        st = stats.setdefault(str(name), [0.0, 0, 0])
        st[0] += dt
        st[1] += 1
        st[2] = nbytes
        return 0

    engine.reset()
    engine.prefill(prompt_ids)
    seq = engine.seq_len
    ids = tvm.runtime.tensor(np.array([[1]], dtype="int32"), dev)
    r.vm.set_instrument(instrument)
    try:
        for _ in range(steps):
            seq += 1
            if getattr(r, "kv", "dynamic") == "static":
                where = tvm.runtime.tensor(np.array([seq - 1], dtype="int32"), dev)
            else:
                where = tvm.runtime.ShapeTuple([seq])
            out = r.vm["decode"](ids, where, r.effects, r.params)
            r.effects = out[1]
    finally:
        r.vm.set_instrument(None)
    engine.reset()
    rows = [{"kernel": k, "us_per_token": round(v[0] / steps * 1e6, 1), "calls_per_token": v[1] // steps,
             "GBps": round(v[2] * (v[1] / steps) / (v[0] / steps) / 1e9, 1) if v[0] else 0.0}
            for k, v in stats.items()]
    rows.sort(key=lambda x: -x["us_per_token"])
    total = sum(x["us_per_token"] for x in rows)
    return {"steps": steps, "calls_per_token": sum(x["calls_per_token"] for x in rows),
            "sum_us_per_token_with_syncs": round(total, 1), "top": rows[:15], "all": rows}
