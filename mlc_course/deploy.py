"""Universal deployment: one model, one pipeline, code for every backend TVM can target.

The seed's third claim is that the same compiler lowers the same model to CUDA, ROCm,
Vulkan, Metal, OpenCL and WebGPU. :func:`deployment_table` checks that claim for *this*
TVM build: it compiles the decode step of a SmolLM2-shaped model with the course pipeline
(:func:`mlc_course.compile.pipeline_stages`: legalize, fuse, dlight schedules, lower) for
each target of :data:`TARGETS`, and records for each

* whether code was generated (or the real error, summarised in one line),
* whether the result can be exported as a shared library here,
* whether it can *run* here (the wheel has CPU and CUDA runtimes only, and this machine has
  no GPU, so only the host CPU runs),
* a short excerpt of the generated kernel source (CUDA C, Metal, OpenCL C, WGSL, LLVM IR
  for AMDGPU, assembly for CPUs).

To keep it fast the model has **2 layers** (``PRESETS["smollm2-135m"].with_(num_layers=2)``)
and only the ``decode`` function (one token: the step whose linears dlight schedules as
GEMVs) is compiled. Layers are identical, so the kernels are those of the 30-layer model.
GPU targets use q4f16_1 (fp16 activations, as MLC deploys); CPUs q4f32_1 (f16 arithmetic
on x86 compiles slowly and runs slower: see design.md).

``python -m mlc_course.deploy`` regenerates ``data/results/deployment_targets.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_JSON = Path(__file__).resolve().parent.parent / "data" / "results" / "deployment_targets.json"
NUM_LAYERS = 2

# key -> (backend, description, target spec, scheme). A spec is a tag, a dict, or "host".
# GPU targets get this machine's CPU as host: the host code (the VM's glue) is x86-64 here;
# a real Metal or WebGPU deployment would use arm64-apple-darwin or wasm32 for the host.
TARGETS: dict[str, tuple[str, str, object, str]] = {
    "cpu-x86_64": ("llvm", "this machine's CPU (x86-64, LLVM)", "host", "q4f32_1"),
    "cpu-aarch64": ("llvm", "AArch64 Linux, cross-compiled (LLVM, NEON)",
                    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "q4f32_1"),
    "cuda-sm_80": ("cuda", "NVIDIA A100 (sm_80)", "nvidia/nvidia-a100", "q4f16_1"),
    "cuda-sm_89": ("cuda", "NVIDIA RTX 4090 (sm_89)", "nvidia/geforce-rtx-4090", "q4f16_1"),
    "cuda-sm_90a": ("cuda", "NVIDIA H100 (sm_90a)", "nvidia/nvidia-h100", "q4f16_1"),
    "rocm-gfx1100": ("rocm", "AMD RX 7900 XTX (ROCm, gfx1100)",
                     {"kind": "rocm", "mtriple": "amdgcn-amd-amdhsa-hcc", "mcpu": "gfx1100",
                      "max_num_threads": 256, "thread_warp_size": 32}, "q4f16_1"),
    "vulkan": ("vulkan", "Vulkan (SPIR-V), any vendor",
               {"kind": "vulkan", "max_num_threads": 256, "thread_warp_size": 1,
                "supports_float16": True, "supports_int64": True,
                "supports_16bit_buffer": True}, "q4f16_1"),
    "metal": ("metal", "Apple M2 GPU (Metal)", "apple/m2-gpu", "q4f16_1"),
    "opencl": ("opencl", "OpenCL (Intel/Adreno/Mali GPUs)",
               {"kind": "opencl", "max_num_threads": 256}, "q4f16_1"),
    "webgpu": ("webgpu", "WebGPU (WGSL, in a browser)",
               {"kind": "webgpu", "max_num_threads": 256}, "q4f16_1"),
}

FAST_TARGETS = ("cpu-x86_64", "cuda-sm_90a")


@dataclass
class TargetResult:
    key: str
    backend: str
    description: str
    scheme: str
    codegen: bool = False
    codegen_error: str | None = None
    export: bool = False
    export_error: str | None = None
    runs_here: bool = False
    run_note: str = ""
    source_kind: str | None = None  # e.g. cuda, metal, opencl, webgpu, llvm-ir, asm
    source_chars: int = 0
    excerpt: str = ""
    compile_s: float = 0.0
    num_kernels: int = 0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- targets


def make_target(key: str):
    import tvm

    from .compile import cpu_target

    _, _, spec, _ = TARGETS[key]
    if spec == "host":
        return cpu_target()
    if isinstance(spec, dict) and spec.get("kind") == "llvm":
        return tvm.target.Target(spec)
    return tvm.target.Target(spec, host=cpu_target())


def deploy_config():
    from .config import PRESETS

    return PRESETS["smollm2-135m"].with_(num_layers=NUM_LAYERS)


def decode_module(cfg, scheme: str):
    """The model's Relax module with only ``decode`` (and the KV-cache initialiser) kept."""
    import tvm
    from tvm import relax

    from .model import export

    mod, _ = export(cfg, scheme, 1)
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "prefill"})
    return relax.transform.DeadCodeElimination(["decode", "_initialize_effect"])(mod)


def deploy_pipeline(target):
    """The course's one pipeline (:func:`mlc_course.compile.pipeline`) for ``target``: dlight's
    GPU rules for every GPU backend, the course's CPU schedule on CPUs."""
    from .compile import pipeline

    return pipeline(target)


# ---------------------------------------------------------------------------- helpers


def summarize_error(e: BaseException, width: int = 160) -> str:
    """One line from a TVM error: the ``Check failed``/``...Error:`` line if there is one,
    else the last non-empty line of the message, with the exception type in front."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"^"}]
    pick = None
    for pat in (r"Check failed", r"ld: .*error|error adding symbols|fatal error",
                r"InternalError|RuntimeError|ValueError|TVMError",
                r"not enabled|not found|No such file|cannot|Cannot|error:"):
        pick = next((ln for ln in lines if re.search(pat, ln)), None)
        if pick:
            break
    pick = pick or (lines[-1] if lines else "")
    pick = re.sub(r"/tmp/\S+", "<tmp>", pick)
    line = f"{type(e).__name__}: {pick}"
    return line if len(line) <= width else line[: width - 1] + "…"


def _walk(mod):
    yield mod
    for im in mod.imports:
        yield from _walk(im)


def device_source(ex, target) -> tuple[str, str]:
    """(kind, text) of the generated kernel code: the device module's source for GPUs
    (CUDA C, Metal, OpenCL C, WGSL, AMDGPU LLVM IR), the assembly for CPU targets."""
    mods = list(_walk(ex.mod))
    kind = target.kind.name
    if kind == "llvm":
        host = next(m for m in mods if m.kind == "llvm")
        return "asm", host.inspect_source("s")
    dev = [m for m in mods if m.kind not in ("llvm", "relax.VMExecutable", "c")]
    for m in dev:
        if m.kind == "hip":  # ROCm: LLVM IR is inspect_source(""), GCN assembly "asm"
            return "hip-asm", m.inspect_source("asm")
        for fmt in ("", "ll", "s"):
            try:
                src = m.inspect_source(fmt)
            except Exception:  # noqa: BLE001 - not every module knows every format
                continue
            if src and src.strip():
                return (m.kind if fmt == "" else f"{m.kind}-{fmt}"), src
    return (dev[0].kind if dev else kind), ""


# What to centre an excerpt on: the 4-bit unpacking (a shift) in GPU sources; a vector
# shift or multiply-add in CPU/GPU assembly.
_FOCUS = {
    "asm": re.compile(r"\b(vpsrlv\w*|vfmadd\d*ps|ushl|fmla)\b"),
    # a 4-bit bitfield extract (offset, width 4): the nibble unpacking
    "hip-asm": re.compile(r"v_bfe_u32\s+v\d+,\s*v\d+,\s*\d+,\s*4\s*$"),
}


def excerpt(source: str, kind: str, lines: int = 10) -> str:
    """About ``lines`` lines of a q4 GEMV kernel. GPU sources: the signature of the first
    kernel *definition* whose name holds ``linear`` (a decode GEMV; forward declarations
    skipped), then the dequantize ``((w >> shift) & 15) - 7) * scale`` (wrapped in full when
    it is one line) or the lines around the first shift followed by a ``15`` mask.
    Assembly: the lines around the first nibble unpacking (x86 ``vpsrlvd``, NEON ``ushl``,
    AMDGPU ``v_bfe_u32 ..., 4``) or vector multiply-add."""
    text = [ln.rstrip() for ln in source.splitlines()]
    if not text:
        return ""
    if kind in _FOCUS:
        idx = next((i for i, ln in enumerate(text) if _FOCUS[kind].search(ln)), 0)
        start = max(0, idx - lines // 2)
        return "\n".join(text[start:start + lines])
    kdef = re.compile(r"(__global__|kernel void|^fn |define )")
    head = next((i for i, ln in enumerate(text)
                 if kdef.search(ln) and "linear" in ln and not ln.endswith(";")), 0)
    end = next((i for i in range(head + 1, len(text)) if kdef.search(text[i])), len(text))
    cut = lambda ln: ln if len(ln) <= 120 else ln[:119] + "…"  # noqa: E731
    # the dequantize: a shift and the "& 15" mask, on one line (Metal, OpenCL, WGSL) ...
    one = next((i for i in range(head, end) if ">>" in text[i] and "15" in text[i]
                and ("7.0" in text[i] or "- 7" in text[i])), None)
    if one is not None:
        import textwrap

        wrapped = textwrap.wrap(text[one].strip(), 100, initial_indent="  ", subsequent_indent="      ")
        before = [cut(ln) for ln in text[max(head + 1, one - (lines - 2 - len(wrapped))):one]]
        return "\n".join([cut(text[head]), "  ..."] + before + wrapped)
    # ... or spread over a few (CUDA C's vectorised uint4 code)
    focus = next((i for i in range(head, end)
                  if ">>" in text[i] and any("15" in ln for ln in text[i:i + 4])), head)
    if focus - head < lines:
        return "\n".join(cut(ln) for ln in text[head:head + lines])
    body = text[focus - (lines - 2) // 2: focus - (lines - 2) // 2 + lines - 2]
    return "\n".join([cut(text[head]), "  ..."] + [cut(ln) for ln in body])


@contextmanager
def quiet_stderr(enabled: bool = True):
    """Silence TVM's C++ warnings (written to file descriptor 2: "Cannot get maximum number
    of threads for AMD codegen", ...) and Python's stderr inside the block."""
    if not enabled:
        yield
        return
    import contextlib
    import io

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextmanager
def rocm_codegen_only():
    """Within the block, TVM's ROCm build skips ROCm's device bitcode (``ocml``/``ockl``) and
    returns the unlinked object instead of a linked ``.hsaco``: enough to inspect the code."""
    import tvm

    names = ("tvm_callback_rocm_bitcode_path", "tvm_callback_rocm_link")
    saved = {n: tvm.get_global_func(n, allow_missing=True) for n in names}
    tvm.register_global_func(names[0], lambda *a: [], override=True)
    tvm.register_global_func(names[1], lambda obj: obj, override=True)
    try:
        yield
    finally:
        for n, f in saved.items():
            if f is not None:
                tvm.register_global_func(n, f, override=True)


_KERNEL_NAME = re.compile(r"(?:__global__ void(?: __launch_bounds__\(\d+\))?|kernel void|^fn"
                          r"|^\s*\.amdhsa_kernel)\s+(\w+)", re.M)


def count_kernels(source: str) -> int:
    """Distinct kernel names in a GPU source (CUDA, Metal, OpenCL, WGSL, GCN assembly); 0 for
    CPU assembly."""
    return len(set(_KERNEL_NAME.findall(source)))


def _runtime_available(backend: str) -> tuple[bool, str]:
    import tvm

    if backend == "llvm":
        return True, ""
    try:
        enabled = tvm.runtime.enabled(backend)
    except Exception:  # noqa: BLE001 - "Unknown optional runtime webgpu"
        enabled = False
    if not enabled and backend == "cuda":
        return False, ("the wheel's CUDA runtime does not load here (no GPU, no driver); "
                       "this code runs on the lent H100s")
    if not enabled:
        return False, f"no {backend} runtime in this TVM wheel (and no such GPU here)"
    dev = tvm.device(backend, 0)
    if not dev.exist:
        return False, f"{backend} runtime present, but no {backend} device on this machine"
    return True, ""


def _run_decode_cpu(lib_path: str, cfg, scheme: str) -> dict:
    """Load the exported library and run one decode step with synthetic weights."""
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from .model import LlamaForCausalLM

    dev = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(lib_path), dev)
    model = LlamaForCausalLM(cfg, scheme, 1)
    _, named = model.export_tvm(spec=model.get_default_spec())
    rng = np.random.default_rng(0)
    params = []
    for _, p in named:
        shape, dtype = [int(s) for s in p.shape], p.dtype
        if dtype == "uint32":
            arr = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
        else:
            arr = (rng.standard_normal(shape) * 0.02).astype(dtype)
        params.append(tvm.runtime.tensor(arr, dev))
    effects = vm["_initialize_effect"]()
    ids = tvm.runtime.tensor(np.array([[1]], dtype=np.int32), dev)
    t0 = time.perf_counter()
    out = vm["decode"](ids, tvm.runtime.ShapeTuple([1]), effects, params)
    dt = time.perf_counter() - t0
    logits = out[0].numpy()
    return {"logits_shape": list(logits.shape), "finite": bool(np.isfinite(logits).all()),
            "decode_ms": round(dt * 1e3, 2)}


# ---------------------------------------------------------------------------- the table


def compile_target(key: str, cfg=None, workdir: str | None = None, run: bool = True) -> TargetResult:
    """Compile the decode step for one target and fill in a :class:`TargetResult`."""
    import tvm

    backend, desc, _, scheme = TARGETS[key]
    cfg = cfg or deploy_config()
    res = TargetResult(key=key, backend=backend, description=desc, scheme=scheme)
    t0 = time.perf_counter()
    target = make_target(key)
    mod = decode_module(cfg, scheme)
    try:
        ex = tvm.compile(mod, target=target, relax_pipeline=deploy_pipeline(target))
        res.codegen = True
    except Exception as e:  # noqa: BLE001 - the point is to report what fails
        res.codegen_error = summarize_error(e)
        ex = None
    if ex is None and backend == "rocm":
        # TVM's AMDGPU backend is LLVM's and is in the wheel; what fails is the step after it
        # (linking ROCm's device bitcode and a .hsaco with ld.lld, from a ROCm install).
        # Without those two steps the kernels still come out as LLVM IR and GCN assembly.
        try:
            with rocm_codegen_only():
                ex = tvm.compile(mod, target=target, relax_pipeline=deploy_pipeline(target))
            res.codegen = True
            res.extra["codegen_only"] = ("kernels generated (AMDGPU LLVM IR, GCN assembly) with "
                                         "ROCm's device library and .hsaco link skipped")
        except Exception as e:  # noqa: BLE001
            res.extra["codegen_only_error"] = summarize_error(e)
    if ex is None:
        res.compile_s = round(time.perf_counter() - t0, 2)
        res.run_note = "no code to run"
        return res
    res.compile_s = round(time.perf_counter() - t0, 2)
    try:
        res.source_kind, src = device_source(ex, target)
        res.source_chars = len(src)
        res.excerpt = excerpt(src, res.source_kind)
        res.num_kernels = count_kernels(src)
        res.extra["source_sha1"] = hashlib.sha1(src.encode()).hexdigest()[:12]
    except Exception as e:  # noqa: BLE001
        res.excerpt = f"(source not available: {summarize_error(e)})"
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    lib = os.path.join(workdir or tmp.name, f"{key}.so")
    if "codegen_only" in res.extra:
        res.export_error = "not exported: the .hsaco was not linked (needs a ROCm install)"
    else:
        try:
            ex.export_library(lib)
            res.export = True
        except Exception as e:  # noqa: BLE001
            res.export_error = summarize_error(e)
    ok, note = _runtime_available(backend)
    if ok and backend == "llvm" and key != "cpu-x86_64":
        ok, note = False, "compiled for another CPU architecture"
    if ok and not res.export:
        ok, note = False, "not exported"
    if ok and run and backend == "llvm":
        try:
            info = _run_decode_cpu(lib, cfg, scheme)
            res.extra.update(info)
            res.runs_here = info["finite"]
            res.run_note = (f"ran one decode step: logits {tuple(info['logits_shape'])}, "
                            f"finite={info['finite']}")
        except Exception as e:  # noqa: BLE001
            res.run_note = f"load/run failed: {summarize_error(e)}"
    elif ok and backend != "llvm":
        res.run_note = "runtime and device present (not run by this table)"
    else:
        res.run_note = note
    if tmp is not None:
        tmp.cleanup()
    return res


def deployment_table(keys=None, run: bool = True, log=None, quiet: bool = True) -> list[TargetResult]:
    """Compile the decode step for each target in ``keys`` (default: all of :data:`TARGETS`);
    ``quiet`` hides TVM's compile-time warnings."""
    cfg = deploy_config()
    out = []
    for key in keys or TARGETS:
        with quiet_stderr(quiet):
            r = compile_target(key, cfg, run=run)
        if log:
            log(f"{key:<13} codegen={r.codegen!s:<5} export={r.export!s:<5} "
                f"runs_here={r.runs_here!s:<5} {r.compile_s:5.1f} s  "
                f"{r.codegen_error or r.export_error or ''}")
        out.append(r)
    return out


def save_table(rows: list[TargetResult], path: str | Path = RESULTS_JSON) -> Path:
    import tvm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"tvm": tvm.__version__, "model": f"smollm2-135m with num_layers={NUM_LAYERS}",
           "function": "decode", "date": time.strftime("%Y-%m-%d"),
           "command": "python -m mlc_course.deploy",
           "targets": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_table(path: str | Path = RESULTS_JSON) -> list[TargetResult]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `python -m mlc_course.deploy`")
    return [TargetResult(**r) for r in json.loads(path.read_text())["targets"]]


def table_rows(rows: list[TargetResult]) -> list[list]:
    """Rows for :func:`mlc_course.plots.md_table`: target, code?, exported?, runs here?, note."""
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    return [[r.key, r.description, yes(r.codegen), yes(r.export), yes(r.runs_here),
             r.codegen_error or r.export_error or r.run_note] for r in rows]


TABLE_HEADERS = ["target", "device", "code generated", "exported (.so)", "runs here", "note / error"]


def main(argv=None) -> int:
    rows = deployment_table(log=lambda m: print(m, file=sys.stderr, flush=True))
    print(save_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
