"""A small search over the course's half2 GEMV schedule parameters, per Llama-2-7B shape.

``cuda_group_gemv_schedule`` has four knobs: rows per thread, threads per block, threads that
share a row's K (``threads_k``) and the unroll of the group loop. The model uses one setting
for every shape (``CudaGEMV``'s defaults). This script compiles a grid of settings for each
decode GEMV of a 7B layer here (``--build``, into the carry folder: ``lib/gemv_tune.so``, its
fatbin, ``lib/gemv_tune.json``) and times them on a GPU (``--time``, with
:func:`mlc_course.gemv_bench.time_gemv_ladder`: weights rotated over copies larger than L2,
CUDA events), writing one JSON file::

    python scripts/gemv_tune.py --build                       # here, ~3 min on 2 cores
    run(kind="nvidia-h100-x1", carry=[".carry"], command="python3 scripts/gemv_tune.py --time --out $OUT")
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GRID = {"rows_per_thread": (1, 2), "threads_per_block": (64, 128, 256), "threads_k": (32, 16), "unroll": (4, 8)}


def settings() -> list[dict]:
    return [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]


def name_of(s: dict) -> str:
    return f"r{s['rows_per_thread']}b{s['threads_per_block']}k{s['threads_k']}u{s['unroll']}"


def default_name() -> str:
    """The setting the model compiles with: ``cuda_group_gemv_schedule``'s defaults (a warp of
    threads per row's K where the groups split evenly, as on every 7B shape)."""
    import inspect

    from mlc_course.schedules import cuda_group_gemv_schedule

    params = inspect.signature(cuda_group_gemv_schedule).parameters
    return name_of({k: params[k].default for k in GRID} | {"threads_k": params["threads_k"].default or 32})


def build(carry: Path, model: str = "llama2-7b") -> None:
    import hashlib

    import tvm

    from mlc_course.compile import compile_kernels, cuda_sources, get_target
    from mlc_course.config import get_preset
    from mlc_course.gemv_bench import gemv_shapes
    from mlc_course.quantization import decode_gemv_func
    from mlc_course.schedules import cuda_group_gemv_schedule
    from scripts.build_carry import nvcc_fatbin

    target = get_target("cuda")
    shapes = gemv_shapes(get_preset(model))
    funcs, names = {}, []
    for s in settings():  # a setting is kept where it schedules every shape
        try:
            these = {f"gemv_{name_of(s)}_{lin}": cuda_group_gemv_schedule(
                decode_gemv_func(n, k, "q4f16_1", form="half2"), **s).mod["main"] for lin, (n, k) in shapes.items()}
        except ValueError:
            continue
        funcs.update({sym: f.with_attr("global_symbol", sym) for sym, f in these.items()})
        names.append(name_of(s))
    t0 = time.time()
    lib = compile_kernels(tvm.IRModule(funcs), target)
    (carry / "lib").mkdir(parents=True, exist_ok=True)
    lib.export_library(str(carry / "lib" / "gemv_tune.so"))
    arch = str(target.attrs["arch"])
    for src in cuda_sources(lib.mod):
        nvcc_fatbin(src, arch, carry / "fatbin" / f"{hashlib.sha256(src.encode()).hexdigest()}.fatbin")
    (carry / "lib" / "gemv_tune.json").write_text(json.dumps(
        {"model": model, "shapes": shapes, "variants": names, "settings": {name_of(s): s for s in settings()}}))
    print(f"{len(names)} settings x {len(shapes)} shapes compiled in {time.time() - t0:.0f} s")


def time_all(carry: Path, out: Path) -> None:
    from scripts.gpu_run import gpu_info, setup_runtime

    setup_runtime(carry)
    import tvm

    from mlc_course.gemv_bench import TIMING, copy_bandwidth, time_gemv_ladder

    meta = json.loads((carry / "lib" / "gemv_tune.json").read_text())
    lib = tvm.runtime.load_module(str(carry / "lib" / "gemv_tune.so"))
    bw = copy_bandwidth()
    rows = time_gemv_ladder(lib, {k: tuple(v) for k, v in meta["shapes"].items()}, meta["variants"])
    best, default = {}, default_name()
    for row in rows:
        speeds = {v: row[f"{v}_GBps"] for v in meta["variants"]}
        top = max(speeds, key=speeds.get)
        best[row["linear"]] = {"best": top, "best_GBps": speeds[top], "default_GBps": speeds[default]}
        print(f"{row['linear']:<13} default {speeds[default]:6.0f} GB/s   best {top} {speeds[top]:6.0f} GB/s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_tune.json").write_text(json.dumps(
        {"machine": gpu_info(), "copy_bandwidth_GBps": round(bw, 1), "timing": TIMING, "grid": GRID,
         "settings": meta["settings"], "rows": rows, "best": best, "date": time.strftime("%Y-%m-%d")}, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--carry", default=str(ROOT / ".carry"))
    ap.add_argument("--out", default="gpu_out")
    args = ap.parse_args()
    if args.build:
        build(Path(args.carry))
    if args.time:
        time_all(Path(args.carry), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
