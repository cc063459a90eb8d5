#!/usr/bin/env python3
"""Tensor parallelism on 2 GPUs: the course's NCCL plugin (``mlc_nccl``) under TVM disco.

Two halves:

* ``--prepare`` (here, with the compiler): builds the NCCL plugin (against the real NCCL and
  CUDA headers when found), compiles the ``tiny`` model for sm_90a with 1 and 2 shards, its
  kernels as fatbins (nvcc), its per-worker weights, and copies the runtime-only TVM of
  ``.carry/site`` (``scripts/build_carry.py``) into ``build/tp2/``.
* default (on the GPU machine, from the repository root, ``build/tp2`` carried)::

      NCCL_NVLS_ENABLE=0 python3 scripts/gpu_tp_test.py --out $OUT

  1. collectives through TVM's disco builtins on a ProcessSession of 2 GPU workers (and a
     ThreadedSession): all-reduce sum f32/f16/bf16 (+ in place, + prod/min/max/avg),
     broadcast, all-gather, scatter, gather, send/recv; every result compared exactly;
  2. all-reduce latency, 4 KB .. 64 MB float16: driven from the controller per call
     (what a compiled model pays) and in-worker (CUDA events, NCCL alone);
  3. the tiny model: logits of a prefill + greedy decode steps with 2 shards (disco + NCCL)
     against 1 shard on one GPU.

  Writes ``$OUT/gpu_tp2.json`` after each stage; prints ``ALL EXACT`` when stage 1 passed.
  ``--quick`` runs stage 1 only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / "build" / "tp2"
TINY = [("tiny", "q0f32"), ("tiny", "q4f16_1")]
DEVICE = "cuda"  # "cpu" only to smoke-test this script without a GPU (cpu_shm instead of NCCL)

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # multicast stays off on shared machines


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ prepare


def prepare(out: Path, device: str = "cuda") -> None:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from mlc_course import ccl
    from mlc_course.compile import compile_module, get_target
    from mlc_course.config import get_preset
    from mlc_course.engine import presharded_params
    from mlc_course.model import export
    from mlc_course.weights import resolve_model
    from scripts.build_carry import nvcc_fatbin

    try:
        from mlc_course.compile import cuda_sources
    except ImportError:
        from scripts.build_carry import cuda_sources

    out.mkdir(parents=True, exist_ok=True)
    plugin = ccl.build_nccl_ccl(verbose=True)
    shutil.copy2(plugin, out / ccl.NCCL_LIB_NAME)
    log(f"plugin: {plugin} (headers: {ccl.nccl_build_info()})")
    site = ROOT / ".carry" / "site"
    if not (site / "tvm").is_dir():
        raise SystemExit("no .carry/site: run scripts/build_carry.py first")
    if (out / "site").exists():
        shutil.rmtree(out / "site")
    shutil.copytree(site, out / "site")
    target = get_target(device)
    arch = str(target.attrs.get("arch", "cpu"))
    manifest = {"arch": arch, "models": {}}
    for name, scheme in TINY:
        cfg = get_preset(name)
        source = resolve_model(name)
        for shards in (1, 2):
            key = f"{name}-{scheme}-tp{shards}"
            mod, named = export(cfg, scheme, shards)
            ex = compile_module(mod, target)
            (out / "lib").mkdir(exist_ok=True)
            ex.export_library(str(out / "lib" / f"{key}.so"))
            for src in cuda_sources(ex.mod):
                import hashlib

                fb = out / "fatbin" / f"{hashlib.sha256(src.encode()).hexdigest()}.fatbin"
                fb.parent.mkdir(exist_ok=True)
                if not fb.exists() and not nvcc_fatbin(src, arch, fb):
                    log("no nvcc here: kernels get compiled on the GPU machine")
            folder = presharded_params(source, scheme, shards, log)
            dst = out / "params" / key
            dst.mkdir(parents=True, exist_ok=True)
            for r in range(shards):
                shutil.copy2(folder / f"worker{r}.npz", dst / f"worker{r}.npz")
            manifest["models"][key] = {"model": name, "quantization": scheme, "shards": shards,
                                       "names": [n for n, _ in named], "config": cfg.to_dict()}
            log(f"compiled {key}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"{out}: {total / 2**20:.1f} MiB")
    del np


# ------------------------------------------------------------------------------ GPU side


WORKER = "mlc_course.disco_worker"  # the entrypoint of worker processes (see setup)


def setup(carry: Path):
    """Runtime-only TVM from ``carry/site`` (lent GPU machines), else the installed TVM."""
    global WORKER
    sys.path.insert(0, str(ROOT))
    if not (carry / "site" / "tvm").is_dir():
        import tvm

        from mlc_course import ccl

        ccl.disco_session()
        return tvm
    WORKER = "scripts.gpu_tp_worker"
    os.environ["MLC_TP_CARRY"] = str(carry)
    os.environ["MLC_NCCL_CCL_LIBRARY"] = str(carry / "libmlc_ccl_nccl.so")
    # Worker processes import the repository and the carried TVM too.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(carry / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    from scripts.gpu_run import setup_runtime

    return setup_runtime(carry)


class Results:
    def __init__(self, out: Path | None):
        self.path = out / "gpu_tp2.json" if out else None
        self.data: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))


def gpu_info() -> dict:
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                              timeout=30)
        return {"gpus": q.stdout.strip().splitlines(), "topology": topo.stdout.strip()[:1500]}
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)[:200]}


def collectives(sess, n: int, label: str) -> list[dict]:
    """Every collective through the disco builtins, compared exactly with NumPy."""
    import numpy as np
    from tvm_ffi import Shape

    from mlc_course import ccl

    try:
        import ml_dtypes
        bf16 = np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        bf16 = None
    rng = np.random.default_rng(0)
    checks = []

    def put(arrays):
        d = sess.empty(arrays[0].shape, str(arrays[0].dtype))
        for w, a in enumerate(arrays):
            d.debug_copy_from(w, a)
        return d

    def get(d, shape=None):
        return [d.debug_get_from_remote(w).numpy() for w in range(n)]

    def record(name, ok, **kw):
        checks.append({"session": label, "check": name, "exact": bool(ok), **kw})
        log(f"  [{label}] {name}: {'exact' if ok else 'MISMATCH'} {kw if not ok else ''}")

    allreduce = sess.get_global_func("runtime.disco.allreduce")
    dtypes = ["float32", "float16"] + (["bfloat16"] if bf16 is not None else [])
    for dtype in dtypes:
        npdt = bf16 if dtype == "bfloat16" else np.dtype(dtype)
        for size in (1, 7, 1000, 1 << 20):
            xs = [rng.standard_normal(size).astype(np.float32).astype(npdt) for _ in range(n)]
            # the reference: a float32 sum rounded once (for 2 ranks every order gives it)
            want = np.sum([x.astype(np.float32) for x in xs], axis=0).astype(npdt)
            src, dst = put(xs), sess.empty((size,), dtype)
            allreduce(src, Shape([ccl.REDUCE_KINDS["sum"]]), False, dst)
            got = get(dst)
            ok = all(np.array_equal(g.view(np.uint8), want.view(np.uint8)) for g in got)
            record(f"allreduce sum {dtype} n={size}", ok)
            allreduce(src, Shape([ccl.REDUCE_KINDS["sum"]]), False, src)  # in place
            ok = all(np.array_equal(g.view(np.uint8), want.view(np.uint8)) for g in get(src))
            record(f"allreduce sum in place {dtype} n={size}", ok)
    xs = [rng.integers(-4, 5, 1000).astype(np.float32) for _ in range(n)]
    for kind, fn in (("prod", np.prod), ("min", np.min), ("max", np.max), ("avg", np.mean)):
        src, dst = put(xs), sess.empty((1000,), "float32")
        allreduce(src, Shape([ccl.REDUCE_KINDS[kind]]), False, dst)
        want = fn(np.stack(xs), axis=0).astype(np.float32)
        record(f"allreduce {kind} float32", all(np.array_equal(g, want) for g in get(dst)))
    for dtype in ("float32", "float16", "int32"):
        size = 4099
        xs = [(rng.standard_normal(size) * 100).astype(dtype) for _ in range(n)]
        src, dst = put(xs), sess.empty((size,), dtype)
        sess.get_global_func("runtime.disco.broadcast_from_worker0")(src, False, dst)
        record(f"broadcast_from_worker0 {dtype}", all(np.array_equal(g, xs[0]) for g in get(dst)))
    xs = [rng.standard_normal(64).astype(np.float32) for _ in range(n)]
    src, dst = put(xs), sess.empty((n * 64,), "float32")
    sess.get_global_func("runtime.disco.allgather")(src, False, dst)
    record("allgather", all(np.array_equal(g, np.concatenate(xs)) for g in get(dst)))
    big = rng.standard_normal(n * 64).astype(np.float32)
    src = put([big] * n)
    dst = sess.empty((64,), "float32")
    sess.get_global_func("runtime.disco.scatter_from_worker0")(src, False, dst)
    record("scatter_from_worker0", all(np.array_equal(g, big[w * 64:(w + 1) * 64])
                                       for w, g in enumerate(get(dst))))
    src, dst = put(xs), sess.empty((n * 64,), "float32")
    sess.get_global_func("runtime.disco.gather_to_worker0")(src, False, dst)
    record("gather_to_worker0", np.array_equal(get(dst)[0], np.concatenate(xs)))
    if n >= 2:
        buf = put([np.full(100, float(w), np.float32) for w in range(n)])
        sess.get_global_func(f"runtime.disco.{ccl.NCCL_CCL_NAME}.debug_send_recv")(buf, 0, 1)
        got = get(buf)
        record("send 0 -> recv 1", np.array_equal(got[1], np.zeros(100, np.float32)))
    for w in range(n):
        sess._sync_worker(w)
    info = sess.get_global_func(f"runtime.disco.{ccl.NCCL_CCL_NAME}.worker_info")()
    checks.append({"session": label, "worker_info": [list(info.debug_get_from_remote(w))
                                                     for w in range(n)]})
    return checks


def bench(sess, n: int) -> list[dict]:
    from mlc_course import ccl

    rows = []
    for kb in (4, 16, 64, 256, 1024, 4096, 16384, 65536):
        nbytes = kb * 1024
        iters = 200 if nbytes <= 1 << 20 else 50
        r = ccl.benchmark_allreduce(sess, nbytes, "float16", iters=iters, warmup=10,
                                    ccl=ccl.NCCL_CCL_NAME)
        bus = 2 * (n - 1) / n * nbytes
        row = {"bytes": nbytes, "dtype": "float16", "iters": iters,
               "end_to_end_us": round(r["end_to_end_us"], 2),
               "in_worker_us": round(r["in_worker_us"], 2),
               "busbw_GBps_in_worker": round(bus / (r["in_worker_us"] * 1e-6) / 1e9, 1)}
        rows.append(row)
        log(f"  allreduce {kb:>6} KB: {row['end_to_end_us']:9.1f} us end-to-end, "
            f"{row['in_worker_us']:9.1f} us in-worker, {row['busbw_GBps_in_worker']} GB/s bus")
    return rows


def tiny_tp(carry: Path, tvm, steps: int = 16) -> list[dict]:
    """tiny: 2 shards (disco + mlc_nccl) against 1 shard, same prompt, greedy decoding."""
    import numpy as np

    from mlc_course import ccl
    from mlc_course import disco_worker  # noqa: F401  (worker 0 is a thread of this process)
    from mlc_course.engine import LocalRunner

    ds = ccl.disco_session()
    manifest = json.loads((carry / "manifest.json").read_text())
    prompt = np.asarray([[1, 17, 42, 99, 200, 3, 64, 128]], dtype=np.int32)
    out = []
    for key1, meta in manifest["models"].items():
        if meta["shards"] != 1:
            continue
        key2 = key1.replace("-tp1", "-tp2")
        meta2 = manifest["models"][key2]
        rec = {"model": meta["model"], "quantization": meta["quantization"], "steps": steps}
        one = mod = params = getitem = eff2 = step2 = sess = None
        try:
            one = LocalRunner(carry / "lib" / f"{key1}.so", carry / "params" / key1,
                              meta["names"], DEVICE)
            sess = ds.ProcessSession(num_workers=2, entrypoint=WORKER)
            ccl.init_ccl(sess, 2, DEVICE)
            mod = sess.load_vm_module(str(carry / "lib" / f"{key2}.so"))
            params = sess.get_global_func("mlc_course.load_worker_params")(
                str(carry / "params" / key2), json.dumps(meta2["names"]), DEVICE)
            getitem = sess.get_global_func("ffi.ArrayGetItem")

            def step2(fn, ids, total, effects):
                d = sess.empty(ids.shape, "int32")
                d.debug_copy_from(0, ids)
                res = mod[fn](d, tvm.runtime.ShapeTuple([total]), effects, params)
                return getitem(res, 0).debug_get_from_remote(0).numpy().reshape(-1), getitem(res, 1)

            one.reset()
            eff2 = mod["_initialize_effect"]()
            total = prompt.shape[1]
            l1 = one.step("prefill", prompt, total)
            l2, eff2 = step2("prefill", prompt, total, eff2)
            diffs, tok1, tok2 = [float(np.max(np.abs(l1 - l2)))], [], []
            scale = [float(np.max(np.abs(l1)))]
            for _ in range(steps):
                t = int(np.argmax(l1))
                tok1.append(t)
                tok2.append(int(np.argmax(l2)))
                total += 1
                ids = np.asarray([[t]], dtype=np.int32)  # both follow the 1-shard tokens
                l1 = one.step("decode", ids, total)
                l2, eff2 = step2("decode", ids, total, eff2)
                diffs.append(float(np.max(np.abs(l1 - l2))))
                scale.append(float(np.max(np.abs(l1))))
            tol = 1e-4 if meta["quantization"] in ("q0f32", "q4f32_1") else 2e-2
            rel = max(d / max(s, 1e-6) for d, s in zip(diffs, scale))
            rec.update(max_abs_diff=max(diffs), max_rel_diff=rel, tolerance_rel=tol,
                       tokens_tp1=tok1, tokens_tp2=tok2, same_tokens=tok1 == tok2,
                       ok=bool(rel <= tol and tok1 == tok2))
        except Exception as e:  # noqa: BLE001
            import traceback

            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:1500]}",
                       traceback=traceback.format_exc()[-2000:])
        finally:
            one = mod = params = getitem = eff2 = step2 = sess = None
            gc.collect()
        log(f"  tiny {rec['quantization']}: {json.dumps({k: v for k, v in rec.items() if 'tokens' not in k and k != 'traceback'})}")
        out.append(rec)
    return out


def run(args) -> int:
    carry = Path(args.carry).resolve()
    res = Results(Path(args.out) if args.out else None)
    res.data["command"] = " ".join(sys.argv)
    res.data["env"] = {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "NCCL_DEBUG")}
    res.data["machine"] = gpu_info()
    tvm = setup(carry)
    from mlc_course import ccl
    from mlc_course.gpu import cuda_device_count

    ds = ccl.disco_session()
    n = 2
    res.data["cuda_device_count"] = cuda_device_count()
    ok = True
    t0 = time.time()
    try:
        sess = ds.ProcessSession(num_workers=n, entrypoint=WORKER)
        info = ccl.init_nccl_ccl(sess, n, verbose=True)
        res.data["nccl"] = {"plugin": str(info.library), "libraries": info.libraries,
                            "init_s": round(time.time() - t0, 2)}
        log(f"init: {info}")
        checks = collectives(sess, n, "process")
        ok = all(c.get("exact", True) for c in checks)
        res.data["collectives"] = checks
        res.save()
        if not args.quick:
            res.data["allreduce_latency_2gpu"] = bench(sess, n)
            res.save()
    except Exception as e:  # noqa: BLE001
        import traceback

        ok = False
        res.data["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        res.data["traceback"] = traceback.format_exc()[-3000:]
        log(res.data["traceback"])
    finally:
        sess = None  # drop it here, in the main thread (never shutdown() + destroy later)
        gc.collect()
    res.data["all_exact"] = ok
    res.save()
    if not args.quick and (carry / "manifest.json").exists():
        res.data["tiny_tp2_vs_tp1"] = tiny_tp(carry, tvm)
        res.save()
    # Last: an error in a worker *thread* aborts this process (TVM 0.27), results are saved.
    tsess = None
    try:
        tsess = ds.ThreadedSession(n)
        ccl.init_nccl_ccl(tsess, n)
        tchecks = collectives(tsess, n, "thread")
        ok = ok and all(c.get("exact", True) for c in tchecks)
        res.data["collectives"] = res.data.get("collectives", []) + tchecks
        res.save()
        tsess.shutdown()
    except Exception as e:  # noqa: BLE001
        ok = False
        res.data["thread_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    finally:
        tsess = None
        gc.collect()
    res.data["all_exact"] = ok
    res.save()
    print("ALL EXACT" if ok else "COLLECTIVES FAILED", flush=True)
    log(json.dumps({k: res.data.get(k) for k in ("all_exact", "nccl")}, default=str))
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", action="store_true", help="build build/tp2 here (no GPU)")
    ap.add_argument("--carry", default=str(CARRY))
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--quick", action="store_true", help="collectives only")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(Path(args.carry))
        return 0
    return run(args)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Sessions are already gone and the results written: skip the interpreter's teardown,
    # whose destruction order (CUDA, NCCL, TVM globals) is not this test's subject.
    os._exit(code)
