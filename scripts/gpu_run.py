#!/usr/bin/env python3
"""The course's one GPU run: correctness on the tiny model and Llama-2-7B-shaped decode speed.

Runs on a lent GPU machine that has Python 3.12, CUDA, nvcc, PyTorch and NumPy but no TVM,
with the folder that ``scripts/build_carry.py`` built here (``.carry/``: runtime-only TVM,
the model libraries compiled for sm_90a, their kernels as fatbins, the tiny model's
weights). From the repository root there::

    python3 scripts/gpu_run.py --out $OUT

Stages (each writes ``$OUT/gpu_h100.json`` again, so a stage that fails keeps the others):

1. ``bandwidth``: a 1 GiB device-to-device copy through PyTorch (bytes read + written);
2. ``tiny``: every tiny library against the NumPy reference (``ReferenceLlama``) on the
   CPU: logits after a prefill and along 20 greedy decode steps;
3. ``llama2-7b``: the engine (``Engine.from_compiled``) on Llama-2-7B-shaped q4f16_1 with
   random weights: 128-token prompt, 256 decode tokens, tok/s against the bandwidth ceiling;
4. ``peer``: Hugging Face ``transformers`` eager fp16 on the same shape (random init).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
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
    import tvm_ffi
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
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", make_cuda_compiler(carry), override=True)
    log(f"tvm {tvm.__version__} from {Path(tvm.__file__).parent} (runtime only: {tvm.base._RUNTIME_ONLY})")
    return tvm


def cuda_arch() -> str:
    import tvm

    major, minor = tvm.cuda(0).compute_version.split(".")
    return f"sm_{major}{minor}" + ("a" if int(major) >= 9 else "")


COMPILE_LOG: list[dict] = []


def make_cuda_compiler(carry: Path):
    """``tvm_callback_cuda_compile``: TVM 0.27 keeps kernels as CUDA C++ in the library and
    calls this when it is loaded. A fatbin built beforehand (build_carry, keyed by the
    source's sha256) is used when present, else nvcc compiles it here and caches it."""
    cache = Path(os.environ.get("MLC_COURSE_FATBIN_CACHE", "/tmp/mlc_course_fatbin"))

    def compile_cuda(code: str) -> bytes:
        digest = hashlib.sha256(code.encode()).hexdigest()
        for folder in (carry / "fatbin", cache):
            f = folder / f"{digest}.fatbin"
            if f.exists():
                COMPILE_LOG.append({"sha256": digest[:16], "from": "carried" if folder != cache else "cache"})
                return f.read_bytes()
        cache.mkdir(parents=True, exist_ok=True)
        arch = cuda_arch()
        cu, out = cache / f"{digest}.cu", cache / f"{digest}.fatbin"
        cu.write_text(code)
        t0 = time.time()
        subprocess.run(["nvcc", "-w", "-O3", "-fatbin", f"-gencode=arch=compute_{arch[3:]},code={arch}",
                        "-o", str(out), str(cu)], check=True)
        COMPILE_LOG.append({"sha256": digest[:16], "from": f"nvcc {arch}", "s": round(time.time() - t0, 1)})
        return out.read_bytes()

    return compile_cuda


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


def copy_bandwidth(nbytes: int = 2**30, reps: int = 20) -> float:
    """Device-to-device copy through PyTorch, GB/s counting bytes read plus written."""
    import torch

    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def tiny_correctness(carry: Path, manifest: dict, steps: int = 20) -> list[dict]:
    import numpy as np

    from mlc_course.config import LlamaConfig
    from mlc_course.engine import Engine
    from mlc_course.quantization import dequantize, get_scheme, quantize
    from mlc_course.reference import ReferenceLlama

    out = []
    hf = dict(np.load(carry / "params" / "tiny-hf.npz"))
    for lib, meta in manifest["libraries"].items():
        if meta["model"] != "tiny":
            continue
        scheme = meta["quantization"]
        cfg = LlamaConfig(**meta["config"])
        z = np.load(carry / meta["params_file"])
        arrays = [z[k] for k in sorted(z.files)]
        ref_params = {k: dequantize(*quantize(v, scheme), scheme) if v.ndim == 2 and get_scheme(scheme).quantized else v
                      for k, v in hf.items()}
        ref = ReferenceLlama(cfg, ref_params)
        rec = {"model": "tiny", "quantization": scheme, "library": lib, "cuda_graph": meta.get("cuda_graph", False)}
        try:
            t0 = time.time()
            eng = Engine.from_compiled(carry / "lib" / lib, cfg, arrays, scheme, "cuda", quiet=True)
            rec["load_s"] = round(time.time() - t0, 2)
            prompt = [3, 17, 99, 5, 200]
            b = ref.prefill(prompt)
            a = eng.prefill(prompt)
            diffs, scale, agree = [float(np.abs(a - b).max())], float(np.abs(b).max()), [int(a.argmax() == b.argmax())]
            for _ in range(steps):
                tok = int(np.argmax(b))
                a, b = eng.decode(tok), ref.decode(tok)
                diffs.append(float(np.abs(a - b).max()))
                agree.append(int(a.argmax() == b.argmax()))
            eng.close()
            tol = 1e-3 if scheme == "q0f32" else 3e-2
            rec.update(max_abs_diff_prefill=diffs[0], max_abs_diff_decode=max(diffs[1:]),
                       max_abs_logit=scale, rel_diff=max(diffs) / scale, argmax_agree=f"{sum(agree)}/{len(agree)}",
                       tolerance_rel=tol, ok=bool(max(diffs) / scale < tol and all(agree)))
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
        log(f"tiny {scheme}: {rec}")
        out.append(rec)
    return out


def random_params(params: list, seed: int = 0):
    """Random arrays with the stored shapes: 4-bit words uniform over all nibbles, float16
    scales in [0.002, 0.004] (weights of std ~0.014), norms 1. Yielded one at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for name, shape, dtype in params:
        n = int(np.prod(shape))
        if dtype == "uint32":
            yield np.frombuffer(rng.bytes(4 * n), dtype=np.uint32).reshape(shape)
        elif name.endswith("q_scale"):
            yield rng.uniform(0.002, 0.004, size=shape).astype(dtype)
        elif "norm" in name:
            yield np.ones(shape, dtype=dtype)
        else:
            yield (0.014 * rng.standard_normal(size=shape)).astype(dtype)


def llama_speed(carry: Path, manifest: dict, bandwidth: float, prompt_len: int, new_tokens: int,
                runs: int, deadline: float) -> list[dict]:
    import numpy as np

    from mlc_course.config import LlamaConfig
    from mlc_course.engine import Engine

    out = []
    for lib, meta in manifest["libraries"].items():
        if meta["model"] == "tiny":
            continue
        cfg, scheme = LlamaConfig(**meta["config"]), meta["quantization"]
        t0 = time.time()
        eng = Engine.from_compiled(carry / "lib" / lib, cfg, random_params(meta["params"]), scheme, "cuda", quiet=True)
        load_s = time.time() - t0
        log(f"{cfg.name} {scheme}: library + random weights on the GPU in {load_s:.1f} s")
        prompt = [int(x) for x in np.random.default_rng(1).integers(0, cfg.vocab_size, prompt_len)]
        t0 = time.time()
        eng.generate(prompt, max_new_tokens=4, stop_ids=())  # warm-up: kernels loaded, first launches
        log(f"  warm-up {time.time() - t0:.1f} s")
        results = []
        for r in range(runs):
            res = eng.generate(prompt, max_new_tokens=new_tokens + 1, stop_ids=())
            results.append(res)
            log(f"  run {r}: prefill {res.prefill_tok_per_s:.1f} tok/s, decode {res.decode_tok_per_s:.2f} tok/s")
            if time.time() > deadline:
                break
        loop = device_loop(eng, prompt, new_tokens)
        log(f"  decode calls without reading logits back: {loop:.2f} tok/s")
        kernels = None
        if not meta.get("cuda_graph") and time.time() < deadline:
            kernels = kernel_profile(eng, prompt)
            for k in kernels["top"][:8]:
                log(f"    {k['kernel']:<40s} {k['us_per_token']:8.1f} us/token  {k['GBps']:7.0f} GB/s")
        eng.close()
        decode = sorted(x.decode_tok_per_s for x in results)[len(results) // 2]
        bpt = cfg.bytes_per_token(scheme)
        ceiling = bandwidth * 1e9 / bpt if bandwidth else None
        ctx = prompt_len + new_tokens / 2
        out.append({
            "model": cfg.name, "weights": "random (generated on the GPU machine)",
            "quantization": scheme, "shards": 1, "gemv": meta.get("gemv", "dlight"),
            "decode_tok_per_s": round(decode, 2), "decode_tok_per_s_runs": [round(x.decode_tok_per_s, 2) for x in results],
            "prefill_tok_per_s": round(results[0].prefill_tok_per_s, 1), "prompt_tokens": prompt_len,
            "new_tokens": new_tokens, "bytes_per_token": bpt,
            "kv_bytes_per_token_mean": cfg.kv_bytes_per_token(int(ctx)),
            "bandwidth_GBps": round(bandwidth, 1) if bandwidth else None,
            "ceiling_tok_per_s": round(ceiling, 1) if ceiling else None,
            "fraction_of_ceiling": round(decode / ceiling, 4) if ceiling else None,
            "decode_tok_per_s_device_loop": round(loop, 2),
            "cuda_graph": bool(meta.get("cuda_graph")),
            "engine": "mlc_course",
            "engine_detail": f"TVM 0.27 runtime, {meta.get('gemv', 'dlight')} GEMV schedule, "
                             + ("CUDA graphs" if meta.get("cuda_graph") else "no CUDA graph"),
            "library": lib,
            "load_s": round(load_s, 1),
            **({"kernels": kernels} if kernels else {})})
    return out


def device_loop(eng, prompt: list[int], n: int) -> float:
    """Decode calls back to back with the same input token, logits left on the GPU: what the
    compiled step costs without the engine's per-token read-back and sampling."""
    import numpy as np

    r, tvm = eng.runner, eng.runner.tvm
    eng.reset()
    eng.prefill(prompt)
    ids = tvm.runtime.tensor(np.array([[1]], dtype="int32"), r.dev)
    seq = len(prompt)
    out = None
    t0 = time.perf_counter()
    for _ in range(n):
        seq += 1
        out = r.vm["decode"](ids, tvm.runtime.ShapeTuple([seq]), r.effects, r.params)
        r.effects = out[1]
    out[0].numpy()  # waits for the GPU
    dt = time.perf_counter() - t0
    eng.reset()
    return n / dt


def kernel_profile(eng, prompt: list[int], steps: int = 16) -> dict:
    """Time every call the decode function makes (the VM's instrument hook, a device sync
    around each call): top kernels by time per token, and the GB/s each reads (its argument
    and output bytes over its time). Syncs add a few us per call, so the sum exceeds the
    real step time; the ranking and the GEMV bandwidths are what this is for."""
    import numpy as np

    r, tvm = eng.runner, eng.runner.tvm
    dev = r.dev
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

    eng.reset()
    eng.prefill(prompt)
    ids = tvm.runtime.tensor(np.array([[1]], dtype="int32"), dev)
    seq = len(prompt)
    r.vm.set_instrument(instrument)
    try:
        for _ in range(steps):
            seq += 1
            out = r.vm["decode"](ids, tvm.runtime.ShapeTuple([seq]), r.effects, r.params)
            r.effects = out[1]
    finally:
        r.vm.set_instrument(None)
    eng.reset()
    rows = [{"kernel": k, "us_per_token": round(v[0] / steps * 1e6, 1), "calls_per_token": v[1] // steps,
             "GBps": round(v[2] * (v[1] / steps) / (v[0] / steps) / 1e9, 1) if v[0] else 0.0}
            for k, v in stats.items()]
    rows.sort(key=lambda x: -x["us_per_token"])
    total = sum(x["us_per_token"] for x in rows)
    return {"steps": steps, "sum_us_per_token_with_syncs": round(total, 1), "top": rows[:15]}


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the course's GPU run")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--carry", default=str(ROOT / ".carry"))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420, help="skip later stages past this")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: tiny,llama,peer")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.budget_s
    out_dir, carry = Path(args.out), Path(args.carry)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    info = gpu_info()
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "gpu": info["gpu"], "driver": info["driver"],
            "command": "python3 scripts/gpu_run.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    doc = {"machine": info, "records": [], "correctness": [], "errors": [], "stages_s": {}}

    def save():
        doc["records"] = [{**r, **{k: r.get(k, v) for k, v in meta.items()}} for r in doc["records"]]
        (out_dir / "gpu_h100.json").write_text(json.dumps(doc, indent=1))

    def stage(name, fn):
        t0 = time.time()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            doc["errors"].append({"stage": name, "error": f"{type(e).__name__}: {str(e).strip()[-500:]}"})
        finally:
            doc["stages_s"][name] = round(time.time() - t0, 1)
            save()

    log(f"machine: {info}")
    bandwidth = stage("bandwidth", copy_bandwidth) or 0.0
    doc["bandwidth_GBps"] = round(bandwidth, 1)
    log(f"copy bandwidth {bandwidth:.0f} GB/s")
    tvm = stage("runtime", lambda: setup_runtime(carry))
    manifest = json.loads((carry / "lib" / "manifest.json").read_text())
    if tvm is not None:
        if "tiny" not in skip:
            doc["correctness"] = stage("tiny", lambda: tiny_correctness(carry, manifest)) or []
        if "llama" not in skip:
            recs = stage("llama2-7b", lambda: llama_speed(carry, manifest, bandwidth, args.prompt_tokens,
                                                          args.new_tokens, args.runs, deadline - 120)) or []
            doc["records"] += recs
        doc["cuda_compile"] = COMPILE_LOG
    big = [m for m in manifest["libraries"].values() if m["model"] != "tiny"]
    if "peer" not in skip and big and time.time() < deadline:
        rec = stage("peer", lambda: transformers_peer(big[0]["config"], bandwidth, args.prompt_tokens, args.new_tokens))
        if rec:
            doc["records"].append(rec)
    doc["total_s"] = round(time.time() - t_start, 1)
    save()
    print("\n%-28s %-13s %9s %9s %9s  %s" % ("model", "quantization", "tok/s", "ceiling", "fraction", "engine"))
    for r in doc["records"]:
        print("%-28s %-13s %9s %9s %9s  %s" % (r["model"], r["quantization"], r["decode_tok_per_s"],
                                              r.get("ceiling_tok_per_s"), r.get("fraction_of_ceiling"), r["engine"]))
    for c in doc["correctness"]:
        print(f"tiny {c['quantization']:8s} ok={c.get('ok')} rel_diff={c.get('rel_diff')} argmax={c.get('argmax_agree')} {c.get('error', '')}")
    print(f"errors: {doc['errors']}")
    return 0 if not doc["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
