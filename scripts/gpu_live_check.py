"""The notebooks' live GPU paths, run where they would run for a student: a GPU machine with a
full TVM (compiler included), compiling everything there.

``scripts/gpu_run.py`` measures with libraries compiled elsewhere, on a runtime-only TVM; this
script checks the other way in: that on a machine with GPUs and the course installed,

* ``Engine("tiny", ..., device="cuda")`` compiles for this GPU's arch, loads (kernels compiled
  by nvcc through :func:`mlc_course.gpu.use_nvcc_compiler`), and decodes the same greedy tokens
  as the CPU engine;
* notebook 06's live GEMV ladder (:func:`mlc_course.gemv_bench.gemv_ladder`) compiles and times;
* notebook 07's live study (:func:`mlc_course.tp_bench.tp_study`) runs tiny at TP=2 against TP=1
  and times Llama shapes at TP=1 and 2.

It writes one JSON file under ``--out``. On the lent GPU machines (no TVM installed) the README's
"GPU runs" section says how a full TVM travels there in two calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--models", default="llama2-7b,llama2-70b", help="Llama shapes of the TP study")
    ap.add_argument("--budget-s", type=float, default=420, help="the TP study skips what is left past this")
    ap.add_argument("--skip", default="", help="comma-separated: engine,gemv,tp")
    args = ap.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    import tvm

    from mlc_course.gpu import COMPILE_LOG, cuda_device_count, local_arch
    from scripts.gpu_run import run_stage

    doc = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "command": "python3 scripts/gpu_live_check.py "
           + " ".join(sys.argv[1:] if argv is None else argv), "tvm": tvm.__version__,
           "tvm_runtime_only": bool(getattr(tvm.base, "_RUNTIME_ONLY", False)),
           "gpus": cuda_device_count(), "arch": local_arch(), "stages_s": {}, "errors": []}
    log(f"TVM {tvm.__version__} from {Path(tvm.__file__).parent}; {doc['gpus']} GPU(s), {doc['arch']}")
    t_start = time.time()

    def save():
        doc["cuda_compile"] = COMPILE_LOG
        (out / "gpu_live_check.json").write_text(json.dumps(doc, indent=1, default=str))

    def stage(name, fn, timeout_s):
        doc[name] = run_stage(doc, name, fn, timeout_s, save)

    def engine():
        from mlc_course.engine import Engine

        prompt, rows = [1, 17, 42, 99, 7, 3, 250, 12], []
        for scheme in ("q0f32", "q4f16_1"):
            t0 = time.time()
            with Engine("tiny", scheme, 1, "cuda", quiet=True) as g:
                load_s = time.time() - t0
                gpu_tokens = g.generate(prompt, max_new_tokens=16, stop_ids=()).output_ids
                on_device = bool(g.runner.can_greedy())
            with Engine("tiny", scheme, 1, "cpu", quiet=True) as c:
                cpu_tokens = c.generate(prompt, max_new_tokens=16, stop_ids=()).output_ids
            rows.append({"quantization": scheme, "compile_and_load_s": round(load_s, 1), "greedy_on_device": on_device,
                         "gpu_tokens": list(gpu_tokens), "cpu_tokens": list(cpu_tokens),
                         "agree": sum(a == b for a, b in zip(gpu_tokens, cpu_tokens))})
            log(f"tiny {scheme}: GPU and CPU tokens agree {rows[-1]['agree']}/16 (compile + load {load_s:.1f} s)")
        return rows

    def gemv():
        from mlc_course.gemv_bench import gemv_ladder

        run = gemv_ladder(live=True)
        for row in run["rows"]:
            log(f"  GEMV {row['linear']:<13} " + "  ".join(f"{k[:-5]} {v:.0f}" for k, v in row.items()
                                                             if k.endswith("_GBps")) + " GB/s")
        return run

    def tp():
        from mlc_course.tp_bench import tp_study

        study = tp_study(live=True, models=args.models.split(","), budget_s=args.budget_s, log=log)
        for r in study["records"]:
            log(f"  {r['model']} TP={r['shards']}: {r['decode_tok_per_s']} tok/s")
        return study

    if "engine" not in skip:
        stage("engine", engine, 300)
    if "gemv" not in skip:
        stage("gemv", gemv, 300)
    if "tp" not in skip and doc["gpus"] >= 2:
        stage("tp", tp, args.budget_s + 200)
    doc["total_s"] = round(time.time() - t_start, 1)
    save()
    log(f"done in {doc['total_s']} s; errors: {doc['errors']}")
    return 0 if not doc["errors"] else 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)  # skip teardown: TVM's CUDA runtime and PyTorch's exit handlers can abort after the results are saved
