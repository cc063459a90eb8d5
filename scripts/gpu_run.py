#!/usr/bin/env python3
"""The course's one GPU run: correctness on the tiny model and Llama-2-7B-shaped decode speed.

Runs on a lent GPU machine that has Python 3.12, CUDA, nvcc, PyTorch and NumPy but no TVM,
with the folder that ``scripts/build_carry.py`` built here (``.carry/``: runtime-only TVM,
the model libraries compiled for sm_90a, their kernels as fatbins, the tiny model's
weights). From the repository root there::

    python3 scripts/gpu_run.py --out $OUT

Stages, most important first (each saves ``$OUT/<--name>`` again, so a stage that fails
keeps the others; a stage that hangs dumps every thread's stack and ends the run):

1. ``bandwidth``: a 1 GiB device-to-device copy through PyTorch (bytes read + written);
2. ``llama``: every single-GPU Llama-shape library (``Engine.from_compiled``, random weights
   made on the GPU): 128-token prompt, 256 decode tokens, tok/s against the bandwidth
   ceiling; the graph-replayed ones traced with CUPTI (``gpu_kernel_trace``);
3. ``tiny``: every tiny library against the NumPy reference (``ReferenceLlama``) on the
   CPU: logits after a prefill and along 20 greedy decode steps;
4. ``gemv``: each decode GEMV of a 7B layer and the lm_head alone, every step of the course's
   GEMV ladder, dlight's and PyTorch's int4 kernel (``gemv_peer``);
5. ``peer``: Hugging Face ``transformers`` eager fp16 on the 7B shape (random init);
6. with 2 or more GPUs: tiny TP=2 against TP=1, then every TP=2 and (with 4 GPUs) TP=4
   library through disco workers and NCCL.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = ["model", "quantization", "shards", "gpu", "decode_tok_per_s", "bytes_per_token",
                 "bandwidth_GBps", "ceiling_tok_per_s", "fraction_of_ceiling", "engine", "date",
                 "driver", "command"]

# Multicast over NVLink stays off on these machines (KINDS.md): set before any CUDA library.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- runtime-only TVM


def find_cudart() -> str | None:
    """libcudart.so.13 (libtvm_runtime_cuda.so needs it; without it TVM's CUDA runtime fails
    to load silently and loading a model says no 'cuda' loader is registered)."""
    pats = []
    for base in sys.path:
        if base and os.path.isdir(base):
            pats += [f"{base}/nvidia/cu13/lib/libcudart.so.13*", f"{base}/nvidia/cuda_runtime/lib/libcudart.so.13*",
                     f"{base}/torch/lib/libcudart*.so.13*"]
    pats += ["/usr/local/cuda/lib64/libcudart.so.13*", "/usr/local/cuda-13*/lib64/libcudart.so.13*",
             "/usr/local/cuda/targets/x86_64-linux/lib/libcudart.so.13*", "/usr/lib/x86_64-linux-gnu/libcudart.so.13*"]
    for p in pats:
        hits = sorted(glob.glob(p))
        if hits:
            return hits[0]
    return None


def setup_runtime(carry: Path, cuda: bool = True):
    """Import the carried runtime-only TVM and load its CUDA runtime; register the CUDA
    compile callback. Returns the ``tvm`` module."""
    site = str(carry / "site")
    if site not in sys.path:
        sys.path.insert(0, site)
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    if cuda:
        cudart = find_cudart()
        if cudart is None:
            raise RuntimeError("libcudart.so.13 not found (looked in nvidia/cu13/lib of sys.path, /usr/local/cuda*)")
        ctypes.CDLL(cudart, mode=ctypes.RTLD_GLOBAL)
        log(f"cudart: {cudart}")
    import tvm
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    libdir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    # Runtime-only mode skips the backends' autoload: load the sidecar runtimes here.
    for name in ["tvm_runtime_extra"] + (["tvm_runtime_cuda"] if cuda else []):
        if name not in _LOADED_LIBS:
            _LOADED_LIBS[name] = load_lib_ctypes(package="tvm", target_name=name,
                                                 extra_lib_paths=[libdir], mode="RTLD_LOCAL")
    if cuda:
        if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
            raise RuntimeError("libtvm_runtime_cuda.so loaded but registered no 'cuda' module loader")
        from mlc_course.gpu import use_nvcc_compiler

        if not use_nvcc_compiler(fatbin_dirs=[carry / "fatbin"]):
            raise RuntimeError("no GPU arch from the driver: cannot register the CUDA compile callback")
    log(f"tvm {tvm.__version__} from {Path(tvm.__file__).parent} (runtime only: {tvm.base._RUNTIME_ONLY})")
    return tvm


# ----------------------------------------------------------------------------- stages


def gpu_info() -> dict:
    info = {"gpu": "unknown", "driver": "unknown"}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        name, driver, mem = [x.strip() for x in q.stdout.strip().splitlines()[0].split(",")]
        info.update(gpu=name, driver=driver, memory=mem)
    except Exception as e:  # noqa: BLE001
        info["nvidia_smi_error"] = str(e)[:200]
    info.update(python=platform.python_version(), host=platform.node())
    return info


def tiny_correctness(carry: Path, manifest: dict, steps: int = 20) -> list[dict]:
    import numpy as np

    from mlc_course.config import LlamaConfig
    from mlc_course.engine import Engine
    from mlc_course.quantization import dequantize, get_scheme, quantize
    from mlc_course.reference import ReferenceLlama

    out = []
    hf = dict(np.load(carry / "params" / "tiny-hf.npz"))
    for lib, meta in manifest["libraries"].items():
        if meta["model"] != "tiny" or meta.get("shards", 1) != 1:
            continue
        scheme, kv = meta["quantization"], meta.get("kv", "dynamic")
        cfg = LlamaConfig(**meta["config"])
        z = np.load(carry / meta["params_file"])
        arrays = [z[k] for k in sorted(z.files)]
        ref_params = {k: dequantize(*quantize(v, scheme), scheme) if v.ndim == 2 and get_scheme(scheme).quantized else v
                      for k, v in hf.items()}
        ref = ReferenceLlama(cfg, ref_params)
        rec = {"model": "tiny", "quantization": scheme, "library": lib, "kv": kv,
               "cuda_graph": kv == "static" or bool(meta.get("cuda_graph"))}
        try:
            t0 = time.time()
            eng = Engine.from_compiled(carry / "lib" / lib, cfg, arrays, scheme, "cuda", quiet=True,
                                       kv=kv, graph=kv == "static")
            rec["load_s"] = round(time.time() - t0, 2)
            prompt = [3, 17, 99, 5, 200]
            b = ref.prefill(prompt)
            a = eng.prefill(prompt)
            diffs, scale, agree, ties = [], float(np.abs(b).max()), [], []

            def compare(a, b):
                # logits within d of the reference everywhere can only pick another token where
                # the reference's margin over it is at most 2 d: a tie within the error
                d = float(np.abs(a - b).max())
                diffs.append(d)
                agree.append(int(a.argmax() == b.argmax()))
                if not agree[-1]:
                    ties.append({"step": len(agree) - 1, "margin": float(b.max() - b[a.argmax()]), "max_abs_diff": d})

            compare(a, b)
            for _ in range(steps):
                tok = int(np.argmax(b))
                a, b = eng.decode(tok), ref.decode(tok)
                compare(a, b)
            # greedy tokens chosen on the device (argmax in the graph) against the host's
            # argmax of the same engine's logits
            eng.reset()
            a, host_tokens = eng.prefill(prompt), []
            for _ in range(steps):
                host_tokens.append(int(np.argmax(a)))
                a = eng.decode(host_tokens[-1])
            eng.reset()
            device_tokens = eng.generate(prompt, max_new_tokens=steps, stop_ids=()).output_ids
            on_device = bool(getattr(eng.runner, "can_greedy", lambda: False)())
            eng.close()
            tol = 1e-3 if scheme == "q0f32" else 3e-2
            rec.update(max_abs_diff_prefill=diffs[0], max_abs_diff_decode=max(diffs[1:]),
                       max_abs_logit=scale, rel_diff=max(diffs) / scale, argmax_agree=f"{sum(agree)}/{len(agree)}",
                       argmax_differs_at=ties, tolerance_rel=tol,
                       greedy_on_device=on_device, greedy_tokens_equal=list(device_tokens) == host_tokens,
                       ok=bool(max(diffs) / scale < tol and all(t["margin"] <= 2 * t["max_abs_diff"] for t in ties)
                               and list(device_tokens) == host_tokens))
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
        log(f"tiny {scheme}: {rec}")
        out.append(rec)
    return out


def speed_record(eng, meta: dict, lib: str, bandwidth: float, prompt_len: int, new_tokens: int,
                 runs: int, deadline: float, graph: bool, profile: bool, load_s: float) -> dict:
    """Time greedy generation (``runs`` times ``new_tokens`` after a ``prompt_len`` prompt)
    and return one decode record (:func:`mlc_course.tp_bench.decode_record`), with the
    single-GPU graph's kernel trace or the kernel profile without graphs."""
    from mlc_course.tp_bench import decode_record, time_decode

    results, prompt = time_decode(eng, prompt_len, new_tokens, runs, deadline, log)
    kernels = None
    trace = None
    if graph and eng.shards == 1 and time.time() < deadline:
        trace = gpu_kernel_trace(eng, prompt)
        if trace:
            log(f"  GPU kernels: {trace['kernel_us_per_token']:.0f} us per token of a "
                f"{trace['step_us']:.0f} us step; idle {trace['idle_between_kernels_us_per_token']:.0f} us "
                f"between kernels, {trace['idle_between_steps_us_per_token']:.0f} us between steps")
            for k in trace["top"][:8]:
                log(f"    {k['kernel']:<40s} {k['us_per_token']:8.1f} us/token  ({k['calls_per_token']} calls)")
    if profile and time.time() < deadline:
        from mlc_course.bench import kernel_profile

        kernels = kernel_profile(eng, prompt)
        for k in kernels["top"][:8]:
            log(f"    {k['kernel']:<40s} {k['us_per_token']:8.1f} us/token  {k['GBps']:7.0f} GB/s")
    rec = decode_record(eng, results, bandwidth, prompt_len, new_tokens, gemv=meta.get("gemv", "dlight"),
                        pdl=bool(meta.get("pdl", False)), graph=graph)
    return {**rec, "library": lib, "load_s": round(load_s, 1),
            **{k: meta[k] for k in ("prefetch", "restrict") if k in meta},
            **({"kernels": kernels} if kernels else {}), **({"gpu_kernels": trace} if trace else {})}


def gpu_kernel_trace(eng, prompt: list[int], steps: int = 32) -> dict | None:
    """Every kernel the GPU ran while ``steps`` tokens were decoded, as CUPTI saw it
    (``torch.profiler``: it records the kernels of any library in the process, those
    replayed from CUDA graphs included). GPU time per token by kernel name, their sum, and
    the step time, so the gap (the GPU idle between kernels) shows. None without torch."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except Exception:  # noqa: BLE001
        return None
    eng.reset()
    eng.prefill(prompt)
    eng.decode(1)  # (the graph is captured already: warm-up ran)
    eng.runner.dev.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.decode(1)
        step_us = (time.perf_counter() - t0) / steps * 1e6
    eng.reset()
    events = []
    for ev in prof.events():
        if getattr(ev, "device_type", None) is None or "CUDA" not in str(ev.device_type):
            continue
        tr = getattr(ev, "time_range", None)
        if tr is not None:
            events.append((tr.start, tr.end, ev.name))
    if not events:
        return None
    # Each kernel is charged the time it adds to the GPU's timeline: from the later of its
    # start and the previous kernel's end, to its end. Without overlap that is its duration;
    # with programmatic dependent launch a kernel starts (and waits) before the previous one
    # ends, and only its part past that end counts. Idle GPU time: between kernels of one
    # step (launch gaps inside the graph) and between steps (the host's part: copies,
    # sampling, Python), split at gaps of 20 us.
    events.sort()
    per, inner, outer, prev_end = {}, 0.0, 0.0, None
    for start, end, name in events:
        if prev_end is not None and start > prev_end:
            gap = start - prev_end
            if gap > 20:
                outer += gap
            else:
                inner += gap
        begin = start if prev_end is None else max(start, prev_end)
        st = per.setdefault(name, [0.0, 0])
        st[0] += max(0.0, end - begin)
        st[1] += 1
        prev_end = end if prev_end is None else max(prev_end, end)
    rows = [{"kernel": k, "us_per_token": round(v[0] / steps, 2), "calls_per_token": round(v[1] / steps, 2)}
            for k, v in per.items()]
    rows.sort(key=lambda r: -r["us_per_token"])
    return {"steps": steps, "step_us": round(step_us, 1),
            "kernel_us_per_token": round(sum(r["us_per_token"] for r in rows), 1),
            "idle_between_kernels_us_per_token": round(inner / steps, 1),
            "idle_between_steps_us_per_token": round(outer / steps, 1),
            "note": "decode steps only, logits read and argmax taken on the host (included in "
                    "step_us), timed while CUPTI traced them; each kernel is charged the time it "
                    "adds to the GPU's timeline (past the previous kernel's end)", "top": rows[:25]}


def llama_libraries(manifest: dict, shards: int, deadline: float):
    """(library, manifest entry, config, scheme, kv) of each Llama-shape library with
    ``shards`` shards, while time is left."""
    from mlc_course.config import LlamaConfig

    for lib, meta in manifest["libraries"].items():
        if meta["model"] == "tiny" or meta.get("shards", 1) != shards:
            continue
        if time.time() > deadline:
            log(f"{lib}: skipped (time budget)")
            continue
        yield lib, meta, LlamaConfig(**meta["config"]), meta["quantization"], meta.get("kv", "dynamic")


def llama_speed(carry: Path, manifest: dict, bandwidth: float, prompt_len: int, new_tokens: int,
                runs: int, deadline: float, sink: list, save=lambda: None) -> None:
    """Every single-GPU Llama-shape library: static-KV ones replayed as CUDA graphs; the
    7B q4f16_1 static one (course GEMV) also without graphs, with its kernel profile (what the
    graph removes)."""
    from mlc_course.tp_bench import random_weight_engine

    for lib, meta, cfg, scheme, kv in llama_libraries(manifest, 1, deadline):
        modes = [kv == "static" or bool(meta.get("cuda_graph"))]
        if kv == "static" and cfg.name == "llama2-7b" and scheme == "q4f16_1" and lib.endswith("-static.so") \
                and meta.get("gemv") == "course":
            modes.append(False)
        t0 = time.time()
        eng = random_weight_engine(carry / "lib" / lib, cfg, scheme, 1, meta["params"], kv=kv, graph=modes[0])
        load_s = time.time() - t0
        log(f"{lib}: library + random weights on the GPU in {load_s:.1f} s")
        try:
            for graph in modes:
                if kv == "static":
                    eng.runner.graph = graph
                    if not graph and eng.runner.decoder is not None:
                        eng.runner.decoder.close()
                        eng.runner.decoder = None
                sink.append(speed_record(eng, meta, lib, bandwidth, prompt_len, new_tokens, runs, deadline,
                                         graph=graph, profile=not graph, load_s=load_s))
                save()
        finally:
            eng.close()
            del eng
            import gc

            gc.collect()


def tp_setup(carry: Path) -> str:
    """Environment of disco worker processes on a runtime-only TVM; their entrypoint."""
    os.environ["MLC_TP_CARRY"] = str(carry)
    os.environ["MLC_NCCL_CCL_LIBRARY"] = str(carry / "libmlc_ccl_nccl.so")
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(carry / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    from mlc_course import disco_worker  # noqa: F401,I001  (worker 0's functions: random_worker_params & co.)

    return "scripts.gpu_tp_worker"


def tp_speed(carry: Path, manifest: dict, bandwidth: float, prompt_len: int, new_tokens: int,
             runs: int, deadline: float, graph: bool = True, sink: list | None = None, save=lambda: None,
             shards: int = 2, allreduce=("oneshot", "nccl")) -> None:
    """Every ``shards``-shard Llama-shape library on that many GPUs: disco workers, random
    weights made by each worker, each worker replaying its decode step as a CUDA graph; timed
    once per all-reduce path in ``allreduce`` (the plugin's one-shot kernel over peer memory,
    NCCL), switched in the same session on the same weights (the graphs recaptured)."""
    from mlc_course import ccl
    from mlc_course.tp_bench import allreduce_info, random_weight_engine

    entry = tp_setup(carry)
    for lib, meta, cfg, scheme, kv in llama_libraries(manifest, shards, deadline):
        graph = graph and kv == "static"
        t0 = time.time()
        eng = random_weight_engine(carry / "lib" / lib, cfg, scheme, shards, meta["params"], kv=kv, graph=graph,
                                   entrypoint=entry)
        load_s = time.time() - t0
        log(f"{lib}: {shards} workers, library + random weights on {shards} GPUs in {load_s:.1f} s")
        try:
            for k, mode in enumerate(allreduce):
                sess = eng.runner.sess
                if k:
                    sess.get_global_func("mlc_course.graph_release")()  # recaptured with the new path
                    ccl.set_allreduce_path(sess, "nccl" if mode == "nccl" else "oneshot")
                if mode.startswith("oneshot"):
                    try:
                        ccl.set_oneshot_pdl(sess, mode == "oneshot-pdl")
                    except Exception as e:  # noqa: BLE001  (a plugin without it, or no PDL here)
                        log(f"  one-shot launch not switched: {str(e)[:200]}")
                path = allreduce_info(sess)
                if path["allreduce"] == "oneshot" and path["allreduce_detail"].get("pdl"):
                    path["allreduce"] = "oneshot-pdl"
                log(f"  all-reduce: {path['allreduce']} ({path['allreduce_detail'].get('reason')})")
                if k and path["allreduce"] != mode:
                    continue
                sink.append({**speed_record(eng, meta, lib, bandwidth, prompt_len, new_tokens, runs, deadline,
                                            graph=graph, profile=False, load_s=load_s), **path})
                save()
        finally:
            eng.close()
            del eng
            import gc

            gc.collect()


def tiny_tp(carry: Path, manifest: dict, steps: int = 16, graph: bool = True) -> list[dict]:
    """tiny on 2 GPUs (disco + NCCL, each worker replaying a CUDA graph) against tiny on 1
    GPU (CUDA graph), the same carried weights: logits and greedy tokens."""
    import numpy as np

    from mlc_course.config import LlamaConfig
    from mlc_course.engine import DiscoRunner, Engine
    from mlc_course.tp_bench import compare_tp

    entry = tp_setup(carry)
    libs = manifest["libraries"]
    out = []
    for lib2, meta2 in libs.items():
        if meta2["model"] != "tiny" or meta2.get("shards", 1) != 2:
            continue
        lib1, meta1 = next((k, m) for k, m in libs.items() if m["model"] == "tiny" and m.get("shards", 1) == 1
                           and m["quantization"] == meta2["quantization"] and m.get("kv") == meta2.get("kv"))
        cfg, scheme, kv = LlamaConfig(**meta2["config"]), meta2["quantization"], meta2.get("kv", "dynamic")
        graph = graph and kv == "static"
        rec = {"model": "tiny", "quantization": scheme, "kv": kv, "cuda_graph": graph, "steps": steps}
        e1 = e2 = None
        try:
            z = np.load(carry / meta1["params_file"])
            e1 = Engine.from_compiled(carry / "lib" / lib1, cfg, [z[k] for k in sorted(z.files)], scheme,
                                      "cuda", quiet=True, kv=kv, graph=kv == "static")
            names = [n for n, _, _ in meta2["params"]]
            r2 = DiscoRunner(carry / "lib" / lib2, carry / meta2["params_file"], names, "cuda", 2, kv=kv,
                             graph=graph, entrypoint=entry)
            e2 = Engine.from_runner(r2, cfg, scheme, "cuda", quiet=True, kv=kv, shards=2)
            rec.update(compare_tp(e1, e2, steps))  # greedy on the GPUs too (in every worker's graph)
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[-500:]}")
        finally:
            for e in (e1, e2):
                if e is not None:
                    e.close()
            import gc

            gc.collect()
        log(f"tiny TP=2 vs TP=1 {scheme}: {json.dumps({k: v for k, v in rec.items() if 'tokens' not in k})}")
        out.append(rec)
    return out


def gemv_peer(carry: Path, manifest: dict, bandwidth: float) -> list[dict]:
    """Each decode GEMV of one Llama-2-7B layer (and its lm_head) by itself, every step of the
    course's GEMV ladder next to PyTorch's int4 GEMV (:func:`mlc_course.gemv_bench.time_gemv_ladder`,
    which notebook 06 runs live where it finds a GPU), from the library built here."""
    import torch
    import tvm

    from mlc_course.gemv_bench import TIMING, time_gemv_ladder

    meta = manifest.get("gemv")
    if not meta:
        return []
    lib = tvm.runtime.load_module(str(carry / "lib" / meta["library"]))
    kinds = [v["name"] for v in meta.get("variants", [])] or ["course", "dlight"]
    rows = time_gemv_ladder(lib, {name: tuple(nk) for name, nk in meta["shapes"].items()}, kinds)
    for row in rows:
        log(f"  GEMV {row['linear']:<13} {row['n']:>6}x{row['k']:<6} "
            + "  ".join(f"{k[:-5]} {v:.0f}" for k, v in row.items() if k.endswith("_GBps")) + " GB/s")
    return [{"model": meta["model"], "quantization": meta["quantization"], "copy_bandwidth_GBps": round(bandwidth, 1),
             "torch": torch.__version__, "timing": TIMING,
             "variants": meta.get("variants", []), "rows": rows}]


def transformers_peer(cfg_dict: dict, bandwidth: float, prompt_len: int, new_tokens: int) -> dict:
    import torch
    import transformers
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from mlc_course.config import LlamaConfig

    cfg = LlamaConfig(**cfg_dict)
    hcfg = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                    intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                    max_position_embeddings=cfg.context_length, tie_word_embeddings=cfg.tie_embeddings)
    t0 = time.time()
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hcfg).eval()
    torch.set_default_dtype(torch.float32)
    log(f"transformers {transformers.__version__}: random fp16 model on the GPU in {time.time() - t0:.1f} s")
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda")

    def decode(n):
        out = model(input_ids=ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    with torch.no_grad():
        decode(8)
        tps = decode(new_tokens)
    del model
    torch.cuda.empty_cache()
    bpt = cfg.bytes_per_token("q0f16")
    ceiling = bandwidth * 1e9 / bpt
    return {"model": cfg.name, "weights": "random init", "quantization": "fp16 (q0f16)", "shards": 1,
            "decode_tok_per_s": round(tps, 2), "bytes_per_token": bpt, "bandwidth_GBps": round(bandwidth, 1),
            "ceiling_tok_per_s": round(ceiling, 1), "fraction_of_ceiling": round(tps / ceiling, 4),
            "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "engine": f"transformers {transformers.__version__} eager (torch {torch.__version__})"}


# ------------------------------------------------------------------------------- main


def run_stage(doc: dict, name: str, fn, timeout_s: float, save):
    """``fn()``'s value; an exception is printed and recorded in ``doc["errors"]``, the time
    in ``doc["stages_s"]``, then ``save()``. A stage that hangs (a collective waiting for a
    peer that died, say) prints every thread's stack after ``timeout_s`` and ends the run
    instead of eating the machine's time."""
    import faulthandler
    import traceback

    t0 = time.time()
    log(f"== {name}")
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        doc["errors"].append({"stage": name, "error": f"{type(e).__name__}: {str(e).strip()[-800:]}"})
    finally:
        faulthandler.cancel_dump_traceback_later()
        doc["stages_s"][name] = round(time.time() - t0, 1)
        save()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the course's GPU run")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--carry", default=str(ROOT / ".carry"))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420, help="skip later stages past this")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: tiny,tp,llama,gemv,peer")
    ap.add_argument("--only", default="", help="comma-separated library names (or substrings) to run")
    ap.add_argument("--name", default="gpu_run.json", help="file name of the results under --out")
    ap.add_argument("--allreduce", default="oneshot,oneshot-pdl,nccl",
                    help="multi-GPU runs: all-reduce paths to time, in one session each (oneshot: the "
                         "plugin's kernel over peer memory where it is set up, launched plainly; "
                         "oneshot-pdl: the same with programmatic dependent launch; nccl)")
    ap.add_argument("--tp-modes", default="nograph,graph",
                    help="2-GPU runs: without and/or with each worker replaying CUDA graphs")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget_s
    out_dir, carry = Path(args.out), Path(args.carry)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    info = gpu_info()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from mlc_course.gemv_bench import copy_bandwidth
    from mlc_course.gpu import cuda_device_count

    info["gpus"] = cuda_device_count()
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "gpu": info["gpu"], "driver": info["driver"],
            "command": "python3 scripts/gpu_run.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    doc = {"machine": info, "records": [], "correctness": [], "tp_correctness": [], "gemv": [],
           "errors": [], "stages_s": {}}

    def save():
        # in place: stages append to this very list as they go
        doc["records"][:] = [{**r, **{k: r.get(k, v) for k, v in meta.items()}} for r in doc["records"]]
        (out_dir / args.name).write_text(json.dumps(doc, indent=1))

    def stage(name, fn, timeout_s: float = 300):
        return run_stage(doc, name, fn, timeout_s, save)

    log(f"machine: {info}")
    bandwidth = stage("bandwidth", copy_bandwidth) or 0.0
    doc["bandwidth_GBps"] = round(bandwidth, 1)
    log(f"copy bandwidth {bandwidth:.0f} GB/s")
    tvm = stage("runtime", lambda: setup_runtime(carry))
    manifest = json.loads((carry / "lib" / "manifest.json").read_text())
    if args.only:
        wanted = args.only.split(",")
        manifest["libraries"] = {k: v for k, v in manifest["libraries"].items() if any(w in k for w in wanted)}
    two = info["gpus"] >= 2
    # most important first: a stage that hangs ends the run (see stage)
    if tvm is not None:
        if "llama" not in skip:
            stage("llama", lambda: llama_speed(
                carry, manifest, bandwidth, args.prompt_tokens, args.new_tokens, args.runs, deadline - 200,
                sink=doc["records"], save=save), timeout_s=args.budget_s)
        if "tiny" not in skip:
            doc["correctness"] = stage("tiny", lambda: tiny_correctness(carry, manifest), 60) or []
        if "gemv" not in skip:
            doc["gemv"] = stage("gemv", lambda: gemv_peer(carry, manifest, bandwidth), 60) or []
        from mlc_course.gpu import COMPILE_LOG

        doc["cuda_compile"] = COMPILE_LOG
    seven = next((m for m in manifest["libraries"].values() if m["model"] == "llama2-7b"), None)
    if "peer" not in skip and seven and time.time() < deadline:
        rec = stage("peer", lambda: transformers_peer(seven["config"], bandwidth, args.prompt_tokens,
                                                      args.new_tokens), 120)
        if rec:
            doc["records"].append(rec)
    if tvm is not None and two and "tp" not in skip:
        for graph in [m == "graph" for m in args.tp_modes.split(",") if m]:
            if "tiny" not in skip:
                doc["tp_correctness"] += stage(f"tiny_tp{'_graph' if graph else ''}",
                                               lambda: tiny_tp(carry, manifest, graph=graph), 90) or []
            for shards in (2, 4):
                if info["gpus"] < shards:
                    continue
                stage(f"llama_tp{shards}{'_graph' if graph else ''}", lambda: tp_speed(
                    carry, manifest, bandwidth, args.prompt_tokens, args.new_tokens, args.runs, deadline - 30,
                    graph=graph, sink=doc["records"], save=save, shards=shards,
                    allreduce=args.allreduce.split(",")), max(30, deadline - time.time()))
    doc["total_s"] = round(time.time() - t_start, 1)
    save()
    print("\n%-28s %-13s %9s %9s %9s  %s" % ("model", "quantization", "tok/s", "ceiling", "fraction", "engine"))
    for r in doc["records"]:
        print("%-28s %-13s %3s %9s %9s %9s  %s %s" % (r["model"], r["quantization"], r["shards"], r["decode_tok_per_s"],
                                                       r.get("ceiling_tok_per_s"), r.get("fraction_of_ceiling"),
                                                       r["engine"], r.get("allreduce", "")))
    for c in doc["correctness"]:
        print(f"tiny {c['quantization']:8s} ok={c.get('ok')} rel_diff={c.get('rel_diff')} argmax={c.get('argmax_agree')} {c.get('error', '')}")
    for c in doc["tp_correctness"]:
        print(f"tiny TP2 {c['quantization']:8s} ok={c.get('ok')} rel_diff={c.get('max_rel_diff')} same_tokens={c.get('same_tokens')} {c.get('error', '')}")
    print(f"errors: {doc['errors']}")
    return 0 if not doc["errors"] else 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The results are saved. Skip the interpreter's teardown: with PyTorch's profiler (CUPTI)
    # and TVM's CUDA runtime both loaded, their exit handlers abort with "free(): invalid
    # pointer" after everything is written, which would turn a good run into a failed one.
    os._exit(rc)
