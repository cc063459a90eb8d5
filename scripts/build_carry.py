#!/usr/bin/env python
"""Build ``.carry/``: everything a GPU machine without TVM needs to run the course's engine.

The lent GPU machines (see README, "GPU runs") have Python 3.12, CUDA 13, nvcc, PyTorch and
NumPy, but no TVM, and reach no package registry. What travels with a run is the working
tree plus the ignored paths named in ``carry`` (64 MiB in all), so this script packs:

* ``site/tvm_ffi``: the cp312 manylinux wheel of apache-tvm-ffi (downloaded with pip);
* ``site/tvm``: the installed ``tvm`` package *runtime only*: its Python files and
  ``libtvm_runtime.so``, ``libtvm_runtime_extra.so`` (disco, the VM builtins) and
  ``libtvm_runtime_cuda.so``; not ``libtvm_compiler.so`` (250 MB), ``3rdparty/``
  (CUTLASS headers), the C++ sources, headers, web runtime or CMake files;
* ``lib/*.so``: model libraries compiled here for the GPU arch (CUDA source inside: TVM 0.27
  keeps the kernels as CUDA C++ and compiles them when the library is loaded, through the
  ``tvm_callback_cuda_compile`` function), and ``lib/manifest.json``: per library the
  config, scheme and the ordered parameter names, shapes and dtypes (the GPU machine has no
  compiler to call ``model.export``);
* ``fatbin/<sha256 of the CUDA source>.fatbin``: the kernels compiled here with nvcc for the
  arch, when nvcc is present here, so that loading there costs no compile
  (``scripts/gpu_run.py`` compiles with nvcc there on a miss).

The ``mlc_course`` package itself travels with the working tree. Usage::

    python scripts/build_carry.py                 # build .carry/ (a few minutes on 2 cores)
    python scripts/build_carry.py --dry-run       # list the files, copy/compile nothing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# preset:quantization[:option...] compiled for the GPU run: tiny for correctness against the
# NumPy reference (and TP=2 against TP=1), the Llama shapes for speed. Options:
#   static  the static KV cache (kv="static"): the engine replays each decode step as one
#           CUDA graph (mlc_course.cuda_graph)
#   graph   the dynamic KV cache with Relax's RewriteCUDAGraph (graphs between attention calls)
#   dlight  stock dlight GEMV for the decode linears instead of the course's schedule
#   tp2/tp4 2 or 4 tensor-parallel shards (each worker's library; NCCL all-reduces)
#   nopdl   no programmatic dependent launch (mlc_course.cuda_device)
#   pf4k / pf16k / nopf   the GEMVs' L2 prefetch: 4 or 16 KiB per block, or none (default:
#           cuda_device.PREFETCH_BYTES, none: it measured slower)
#   restrict      keep __restrict__ on kernels that wait (the engine before the fix; for measurements)
DEFAULT_MODELS = ["tiny:q0f32:static", "tiny:q4f16_1:static", "tiny:q0f16:static",
                  "tiny:q0f32:static:tp2", "tiny:q4f16_1:static:tp2",
                  "llama2-7b:q4f16_1:static", "llama2-7b:q4f16_1:static:nopdl",
                  "llama2-7b:q4f16_1:static:dlight", "llama2-7b:q0f16:static",
                  "llama2-7b:q4f16_1:graph:dlight", "llama2-7b:q4f16_1:static:tp2",
                  "codellama-34b:q4f16_1:static", "codellama-34b:q4f16_1:static:tp2",
                  "codellama-34b:q4f16_1:static:tp4",
                  "llama2-70b:q4f16_1:static", "llama2-70b:q4f16_1:static:tp2", "llama2-70b:q4f16_1:static:tp4",
                  "llama2-70b:q0f16:static:tp4"]
OPTIONS = {"static", "graph", "dlight", "tp2", "tp4", "nopdl", "nopf", "pf4k", "pf16k", "restrict"}

# Parts of the installed tvm package a runtime-only import does not need.
TVM_EXCLUDE_DIRS = {"3rdparty", "src", "web", "include", "cmake", "lib64", "licenses", "__pycache__"}
TVM_RUNTIME_LIBS = ["libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_runtime_cuda.so"]
FFI_EXCLUDE_DIRS = {"3rdparty", "include", "src", "cmake", "share", "__pycache__"}
FFI_EXCLUDE_FILES = {"CMakeLists.txt"}

LIMIT_BYTES = 60 * 2**20  # stay well under the 64 MiB that may travel with a run


def tvm_runtime_files() -> list[tuple[Path, str]]:
    """(source file, path under site/) for the runtime-only tvm package."""
    import importlib.util

    spec = importlib.util.find_spec("tvm")
    pkg = Path(spec.origin).parent
    out = []
    for p in sorted(pkg.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(pkg)
        if rel.parts[0] in TVM_EXCLUDE_DIRS or "__pycache__" in rel.parts or p.suffix == ".pyc":
            continue
        if rel.parts[0] == "lib":
            if rel.name not in TVM_RUNTIME_LIBS:
                continue
        elif p.suffix not in (".py", ".pyi") and rel.name not in ("LICENSE", "NOTICE"):
            continue
        out.append((p, str(Path("tvm") / rel)))
    names = {Path(d).name for _, d in out}
    missing = [n for n in TVM_RUNTIME_LIBS if n not in names]
    if missing:
        raise SystemExit(f"the installed tvm lacks {missing}")
    return out


def ffi_version() -> str:
    from importlib.metadata import version

    return version("apache-tvm-ffi")


def wheel_cache() -> Path:
    from mlc_course.weights import cache_dir

    return cache_dir() / "wheels"


def download_ffi_wheel(dest: Path, python_version: str = "3.12") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    tag = "cp" + python_version.replace(".", "")
    have = list(dest.glob(f"apache_tvm_ffi-{ffi_version()}-{tag}-*.whl"))
    if have:
        return have[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
           "-d", str(dest), f"apache-tvm-ffi=={ffi_version()}"]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return next(dest.glob(f"apache_tvm_ffi-{ffi_version()}-{tag}-*.whl"))


def ffi_members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        keep = []
        for n in z.namelist():
            parts = Path(n).parts
            if parts[0] != "tvm_ffi" or n.endswith("/"):
                continue
            if set(parts[1:-1]) & FFI_EXCLUDE_DIRS or parts[-1] in FFI_EXCLUDE_FILES:
                continue
            keep.append(n)
        return keep


def nvcc_fatbin(source: str, arch: str, out: Path) -> bool:
    """``source`` compiled by nvcc into the fatbin ``out``; False where there is no nvcc."""
    from mlc_course.gpu import nvcc_command

    if shutil.which("nvcc") is None:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "k.cu"
        cu.write_text(source)
        subprocess.run(nvcc_command(arch, str(cu), str(out)), check=True)
    return True


def build_libraries(out: Path, models: list[str], device: str, log) -> dict:
    """Compile each model for ``device``; write lib/*.so, lib/manifest.json, fatbin/*."""
    from mlc_course.compile import _source_digest, compile_module, cuda_sources, get_target
    from mlc_course.config import get_preset
    from mlc_course.model import export
    from mlc_course.cuda_device import PREFETCH_BYTES, supports_pdl
    from mlc_course.tp_bench import specs_of

    target = get_target(device)
    arch = str(target.attrs["arch"])
    (out / "lib").mkdir(parents=True, exist_ok=True)
    (out / "fatbin").mkdir(parents=True, exist_ok=True)
    manifest = {"arch": arch, "device": device, "libraries": {}}
    old = {}
    if (out / "lib" / "manifest.json").exists():
        old = json.loads((out / "lib" / "manifest.json").read_text()).get("libraries", {})
    for item in models:
        name, scheme, *opts = item.split(":")
        unknown = set(opts) - OPTIONS
        if unknown:
            raise SystemExit(f"{item}: unknown option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
        graph, static = "graph" in opts, "static" in opts
        gemv = "dlight" if "dlight" in opts else "course"
        shards = 4 if "tp4" in opts else 2 if "tp2" in opts else 1
        kv = "static" if static else "dynamic"
        cfg = get_preset(name)
        pdl = "nopdl" not in opts
        prefetch = 0 if "nopf" in opts else 4096 if "pf4k" in opts else 16384 if "pf16k" in opts else None
        restrict = "restrict" in opts
        extra = "".join(f"-{o}" for o in ("nopf", "pf4k", "pf16k", "restrict") if o in opts)
        lib = (f"{name}-{scheme}-{arch}{'-static' if static else ''}{'-graph' if graph else ''}"
               f"{'-dlight' if gemv == 'dlight' else ''}{'' if pdl else '-nopdl'}{extra}"
               f"{f'-tp{shards}' if shards > 1 else ''}.so")
        mod, named = export(cfg, scheme, shards, kv=kv, gpu=True, form="half2" if gemv == "course" else "plain")
        key = {"source": _source_digest(), "arch": arch}
        if (out / "lib" / lib).exists() and old.get(lib, {}).get("key") == key:
            log(f"{lib}: up to date")
            ex = None
        else:
            log(f"compiling {lib}")
            ex = compile_module(mod, target, cuda_graph=graph, gemv=gemv, pdl=pdl, prefetch=prefetch,
                                restrict=restrict)
            ex.export_library(str(out / "lib" / lib))
        known = old.get(lib, {}).get("cuda_source_sha256") if ex is None else None
        if known and all((out / "fatbin" / f"{d}.fatbin").exists() for d in known):
            digests, sources = list(known), []  # an up-to-date library's kernels: its last build's
        else:
            digests, sources = [], cuda_sources(ex.mod if ex is not None else _load_for_sources(out / "lib" / lib))
        for src in sources:
            digest = hashlib.sha256(src.encode()).hexdigest()
            digests.append(digest)
            fb = out / "fatbin" / f"{digest}.fatbin"
            if not fb.exists():
                if nvcc_fatbin(src, arch, fb):
                    log(f"  nvcc -> fatbin/{fb.name[:16]}... ({fb.stat().st_size // 1024} KiB)")
                else:
                    log("  no nvcc here: the GPU machine compiles the kernels at load")
        params_file = None
        if name == "tiny":  # small enough to travel: converted weights + the float32 originals
            params_file = write_tiny_params(out, cfg, scheme, [n for n, _ in named], shards)
        manifest["libraries"][lib] = {
            "params_file": params_file, "key": key,
            "model": name, "quantization": scheme, "shards": shards, "kv": kv,
            "cuda_graph": graph or static, "graph_kind": "whole step" if static else "relax" if graph else None,
            "gemv": gemv, "pdl": pdl and supports_pdl(target),
            "prefetch": (PREFETCH_BYTES if prefetch is None else prefetch) if pdl and supports_pdl(target) else 0,
            "restrict": restrict or not (pdl and supports_pdl(target)),
            "config": cfg.to_dict(),
            "params": specs_of(named),
            "cuda_source_sha256": digests,
        }
    manifest["gemv"] = build_gemv_library(out, device, log)
    (out / "lib" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def build_gemv_library(out: Path, device: str, log, model: str = "llama2-7b",
                       scheme: str = "q4f16_1") -> dict:
    """``lib/gemv-<arch>.so``: the decode GEMVs of one layer of ``model`` (and its lm_head)
    alone, once per step of :data:`mlc_course.schedules.CUDA_GEMV_LADDER`
    (:func:`mlc_course.gemv_bench.compile_gemv_ladder`), named ``gemv_<variant>_<linear>``, so
    that the GPU run times each kernel by itself next to PyTorch's int4 GEMV."""
    from mlc_course.compile import cuda_sources, get_target
    from mlc_course.gemv_bench import compile_gemv_ladder, ladder_variants

    arch = str(get_target(device).attrs["arch"])
    lib, shapes, names = compile_gemv_ladder(model, scheme, device)
    name = f"gemv-{arch}.so"
    lib.export_library(str(out / "lib" / name))
    for src in cuda_sources(lib.mod):
        digest = hashlib.sha256(src.encode()).hexdigest()
        fb = out / "fatbin" / f"{digest}.fatbin"
        if not fb.exists():
            nvcc_fatbin(src, arch, fb)
    log(f"{name}: {len(names) * len(shapes)} GEMV kernels ({model} {scheme})")
    return {"library": name, "model": model, "quantization": scheme,
            "variants": ladder_variants(),
            "shapes": {k: list(v) for k, v in shapes.items()}}


def write_tiny_params(out: Path, cfg, scheme: str, names: list[str], shards: int = 1) -> str:
    """``params/tiny-<scheme>.npz`` (the model's arrays, in order) or, with shards, the
    folder ``params/tiny-<scheme>-tp<n>/`` of ``worker{r}.npz`` files (what
    ``mlc_course.engine.load_worker_params`` reads), and ``params/tiny-hf.npz`` (the float32
    weights that the NumPy reference uses), from the engine's own tiny source."""
    import numpy as np

    from mlc_course.model import convert_params
    from mlc_course.sharding import shard_params
    from mlc_course.weights import resolve_model

    (out / "params").mkdir(parents=True, exist_ok=True)
    source = resolve_model("tiny")
    hf = source.load_params()
    if not (out / "params" / "tiny-hf.npz").exists():
        np.savez(out / "params" / "tiny-hf.npz", **hf)
    conv = convert_params(hf, cfg, scheme)
    if shards == 1:
        rel = f"params/tiny-{scheme}.npz"
        np.savez(out / rel, **{f"{i:04d}": conv[n] for i, n in enumerate(names)})
        return rel
    rel = f"params/tiny-{scheme}-tp{shards}"
    (out / rel).mkdir(parents=True, exist_ok=True)
    for r, part in enumerate(shard_params(conv, cfg, shards, scheme)):
        np.savez(out / rel / f"worker{r}.npz", **part)
    return rel


def _load_for_sources(path: Path):
    """A compiled library, loaded only to read its CUDA sources (no GPU needed)."""
    import tvm

    return tvm.runtime.load_module(str(path))


def plan(wheel: Path | None) -> list[str]:
    """The relative paths under .carry/ that the site part holds (no compile, no copy)."""
    files = ["site/" + d for _, d in tvm_runtime_files()]
    if wheel is not None:
        files += ["site/" + n for n in ffi_members(wheel)]
    return files


def pack_compiler(dest: Path, log) -> Path:
    """``dest/libtvm_compiler.so.xz``: TVM's compiler library (260 MB; xz -9e: ~60 MB), the one
    part of the wheel the runtime-only site lacks. It travels to a GPU machine in a call of its
    own (with the site it would exceed 64 MiB), for ``scripts/gpu_live_check.py``: README, "GPU
    runs". Kept when newer than the library."""
    import lzma

    src = tvm_compiler_file()
    out = dest / "libtvm_compiler.so.xz"
    if out.exists() and out.stat().st_mtime > src.stat().st_mtime:
        log(f"{out}: up to date")
        return out
    dest.mkdir(parents=True, exist_ok=True)
    log(f"{out}: compressing {src.stat().st_size / 2**20:.0f} MiB (xz -9e, a few minutes)")
    tmp = out.with_suffix(".tmp")
    with open(src, "rb") as f, lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as z:
        shutil.copyfileobj(f, z, 1 << 24)
    tmp.replace(out)
    log(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
    return out


def tvm_compiler_file() -> Path:
    """libtvm_compiler.so of the installed wheel."""
    import tvm

    lib = Path(tvm.__file__).resolve().parent / "lib" / "libtvm_compiler.so"
    if not lib.exists():
        raise SystemExit(f"{lib} not found: the compiler archive needs the full apache-tvm wheel here")
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / ".carry"))
    ap.add_argument("--device", default="cuda", help="compile target: cuda (sm_90a), a100, rtx4090")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated preset:quantization pairs")
    ap.add_argument("--python-version", default="3.12", help="of the GPU machine's python")
    ap.add_argument("--dry-run", action="store_true", help="print the file list as JSON; build nothing")
    ap.add_argument("--compiler", metavar="DIR", help="only pack TVM's compiler library into DIR (for "
                    "scripts/gpu_live_check.py; e.g. .carry_compiler) and stop")
    args = ap.parse_args(argv)
    out = Path(args.out)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.compiler:
        pack_compiler(Path(args.compiler), log)
        return 0

    wheels = wheel_cache()
    if args.dry_run:
        have = sorted(wheels.glob(f"apache_tvm_ffi-{ffi_version()}-*.whl")) if wheels.exists() else []
        print(json.dumps({"site": plan(have[0] if have else None),
                          "models": args.models.split(",")}, indent=0))
        return 0

    wheel = download_ffi_wheel(wheels, args.python_version)
    site = out / "site"
    if site.exists():
        shutil.rmtree(site)
    for src, rel in tvm_runtime_files():
        dst = site / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    with zipfile.ZipFile(wheel) as z:
        for n in ffi_members(wheel):
            z.extract(n, site)
    log(f"site/: runtime-only tvm + tvm_ffi {ffi_version()} ({wheel.name})")
    if any(m.startswith("smollm2") for m in args.models.split(",")):
        # scripts/smollm2_gpu_check.py reads the GGUF there: the pure-Python gguf package
        import gguf

        shutil.copytree(Path(gguf.__file__).parent, site / "gguf",
                        ignore=shutil.ignore_patterns("__pycache__"))
        log("site/gguf: the GGUF reader (for the SmolLM2 check)")
    from mlc_course import ccl

    plugin = ccl.build_nccl_ccl()  # NCCL and cudart are dlopen'd there: builds without them
    shutil.copy2(plugin, out / ccl.NCCL_LIB_NAME)
    log(f"{ccl.NCCL_LIB_NAME}: the NCCL collective library for disco ({ccl.nccl_build_info()})")
    build_libraries(out, [m for m in args.models.split(",") if m], args.device, log)

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True).stdout.split("\0")
    tree = sum((ROOT / f).stat().st_size for f in listed if f and (ROOT / f).is_file())
    log(f".carry/: {total / 2**20:.1f} MiB; rest of the tree ~{tree / 2**20:.1f} MiB")
    if total + tree > LIMIT_BYTES:
        log(f"WARNING: over {LIMIT_BYTES / 2**20:.0f} MiB; a run carries at most 64 MiB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
