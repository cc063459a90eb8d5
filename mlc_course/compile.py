"""One compile pipeline for every notebook, test and the engine.

``build_model(cfg, scheme, shards, device)`` exports the Relax module of
:mod:`mlc_course.model`, runs :func:`pipeline` for the target and returns the path of a
shared library, cached on disk under a key made of everything that changes the result
(config, scheme, shards, target, TVM and package versions, and the source of the modules
that generate code). A cache entry that fails to load is rebuilt.

The pipeline is MLC's in miniature, in named stages that notebook 06 prints one by one:

1. ``legalize``: Relax ops -> TIR PrimFuncs (``LegalizeOps``), op patterns annotated;
2. ``fuse``: ``FuseOps`` + ``FuseTIR`` merge elementwise work into the kernels around it;
3. ``schedule``: dlight rules give each kernel a schedule (GEMV, reductions, matmul; GPU
   rules on CUDA, CPU rules on the host);
4. ``lower``: Relax dataflow -> VM calls, memory planning, (CUDA graphs), shape lowering.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# ------------------------------------------------------------------------------ targets


@functools.lru_cache(maxsize=None)
def host_cpu() -> str:
    """This CPU's LLVM name. ``"mcpu": "native"`` silently falls back to ``generic`` in TVM
    0.27 (12x slower), so ask LLVM for the real name."""
    import tvm

    return str(tvm.get_global_func("target.llvm_get_system_cpu")())


def cpu_target(num_cores: int | None = None):
    """A TVM target for this machine's CPU."""
    import tvm

    cfg = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": num_cores or os.cpu_count() or 1}
    return tvm.target.Target(cfg)


# GPU targets by short name. Tags carry the right arch and limits; TVM 0.27 rejects strings.
CUDA_TAGS = {"h100": "nvidia/nvidia-h100", "a100": "nvidia/nvidia-a100", "rtx4090": "nvidia/geforce-rtx-4090"}


CUDA_TAG_OF_ARCH = {"sm_90a": "h100", "sm_80": "a100", "sm_89": "rtx4090"}


def get_target(device: str = "cpu"):
    """``cpu`` (this machine); ``cuda``: this machine's GPU, or an H100 (sm_90a) where there is
    none (compiling here for a GPU machine); ``h100`` (sm_90a), ``a100`` (sm_80), ``rtx4090``
    (sm_89) by name."""
    import tvm

    if device == "cpu":
        return cpu_target()
    if device == "cuda":
        from .gpu import local_arch

        arch = local_arch()
        if arch is not None and arch not in CUDA_TAG_OF_ARCH:
            # another GPU: its arch and the limits every CUDA GPU since Volta shares
            return tvm.target.Target({"kind": "cuda", "arch": arch, "max_num_threads": 1024,
                                      "max_threads_per_block": 1024, "thread_warp_size": 32,
                                      "max_shared_memory_per_block": 49152, "registers_per_block": 65536},
                                     host=cpu_target())
        device = CUDA_TAG_OF_ARCH.get(arch, "h100")
    key = device
    if key not in CUDA_TAGS:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, or one of {', '.join(CUDA_TAGS)}")
    return tvm.target.Target(CUDA_TAGS[key], host=cpu_target())


def is_gpu(target) -> bool:
    return target.kind.name in ("cuda", "rocm", "vulkan", "metal", "opencl", "webgpu")


# ----------------------------------------------------------------------------- pipeline


def gpu_rules(gemv: str = "course") -> list:
    """The GPU rules, in the order tried: the first that applies schedules a kernel.

    The decode step's quantized linears (one token: a static row) get the course's
    ``CudaGEMV`` (their group-sum form always; the plain form too with ``gemv="course"``)
    or dlight's ``GEMV`` (the plain form, ``gemv="dlight"``); prefill's (a dynamic number of
    rows) get ``GeneralReduction`` (the dequantize inside the reduction is no plain matmul);
    prefill's attention, norms and softmax get ``Matmul``/``Reduction``/``GeneralReduction``;
    elementwise kernels ``Fallback``. (The static decode step's attention and cache write are
    written scheduled, in TIR: ``model.decode_attention_funcs``, ``model.kv_write_func``.)
    """
    import tvm.s_tir.dlight as dl

    class SimtMatmul(dl.gpu.Matmul):
        """dlight's Matmul without its tensor-core path: in TVM 0.27 that path segfaults on
        float16 matmuls for numeric archs (sm_70...sm_89); ``sm_90a`` never takes it (the
        rule reads the arch as a number). Scheduling with an arch it cannot read as a number
        gives every CUDA target the same SIMT schedule; code is still generated for the real
        arch."""

        def apply(self, func, target, tunable):
            if target.kind.name == "cuda":
                import tvm

                cfg = {k: v for k, v in target.export().items() if k != "host"}
                cfg["arch"] = f"{cfg.get('arch', 'sm_80')}_simt"
                target = tvm.target.Target(cfg)
            return super().apply(func, target, tunable)

    class AttentionSafeReduction(dl.gpu.Reduction):
        """dlight's Reduction rule accepts the attention-score kernel (``qk`` +
        ``masked_scores``) of some head layouts (SmolLM2's 9 heads over 3 KV heads), but its
        schedule then fails to lower in TVM 0.27 ("Cross-thread reduction requires all the
        reduction-related loops to be the deepest ..."); that kernel goes to the next rule,
        ``GeneralReduction``, which lowers."""

        def apply(self, func, target, tunable):
            from .schedules import has_block

            if has_block(func, "masked_scores"):
                return None
            return super().apply(func, target, tunable)

    class WeightGEMV(dl.gpu.GEMV):
        """dlight's GEMV for the linears only. With a static KV cache (``kv="static"``) the
        decode step's attention kernels have static shapes too and look like GEMVs to the
        rule, whose schedule then fails on their masked reductions; they go on to the
        reduction rules."""

        def apply(self, func, target, tunable):
            from .schedules import has_block

            if has_block(func, "qk") or has_block(func, "pv"):
                return None
            return super().apply(func, target, tunable)

    from .schedules import CudaGEMV

    # the group-sum form of the GEMV (model.export(gpu=True)) only has the course's schedule;
    # gemv="dlight" gives the plain form to dlight's GEMV rule
    course = CudaGEMV(plain=gemv == "course")
    return [SimtMatmul(), course, WeightGEMV(), AttentionSafeReduction(),
            dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def schedule_report(mod, target, gemv: str = "course") -> dict[str, str]:
    """Kernel name -> the dlight rule that schedules it (``mod`` after the ``fuse`` stage)."""
    from tvm import tirx

    report = {}
    with target:
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            report[gv.name_hint] = "none"
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                report[gv.name_hint] = "written scheduled"  # e.g. the static cache's write
                continue
            for rule in gpu_rules(gemv):
                if rule.apply(func, target, False) is not None:
                    report[gv.name_hint] = _rule_name(rule)
                    break
    return report


def _rule_name(rule) -> str:
    """dlight's name for a rule (``GEMV`` for the course's ``WeightGEMV`` wrapper ...); the
    course's own rules (``CudaGEMV``) by their name."""
    for cls in type(rule).__mro__:
        if cls.__module__.startswith("tvm.") and cls.__name__ != "ScheduleRule":
            return cls.__name__
    return type(rule).__name__


GEMV_CHOICES = ("course", "dlight")


def pipeline_stages(target, gemv: str = "course") -> list[tuple[str, list]]:
    """The course's pipeline as (stage name, passes).

    ``gemv`` (GPU only) picks the schedule of the decode step's quantized linears in the
    plain form: the course's own (:func:`mlc_course.schedules.cuda_gemv_schedule`) or stock
    dlight's. The group-sum form (``model.export(gpu=True)``) always gets the course's
    :func:`mlc_course.schedules.cuda_group_gemv_schedule`."""
    if gemv not in GEMV_CHOICES:
        raise ValueError(f"gemv must be one of {GEMV_CHOICES}, got {gemv!r}")
    import tvm.s_tir.dlight as dl
    from tvm import relax

    legalize = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant()]
    fuse = [relax.transform.FuseOps(), relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination()]
    if is_gpu(target):
        rules = gpu_rules(gemv)
    else:
        from .schedules import CpuGEMV, CpuParallel

        rules = [CpuGEMV(), CpuParallel()]
    schedule = [dl.ApplyDefaultSchedule(*rules)] if rules else []
    lower = [relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
             relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite(),
             relax.transform.StaticPlanBlockMemory()]
    if is_gpu(target):
        lower.append(relax.transform.RewriteCUDAGraph())
    lower += [relax.transform.LowerAllocTensor(), relax.transform.KillAfterLastUse(),
              relax.transform.LowerRuntimeBuiltin(), relax.transform.ComputePrimValue(),
              relax.transform.VMShapeLower(), relax.transform.AttachGlobalSymbol()]
    return [("legalize", legalize), ("fuse", fuse), ("schedule", schedule), ("lower", lower)]


def run_stages(mod, target, upto: str | None = None, log=None, cuda_graph: bool = False,
               gemv: str = "course"):
    """Apply the pipeline's stages to ``mod`` (up to and including ``upto``).

    ``cuda_graph`` (GPU only): ``RewriteCUDAGraph`` captures the static parts of each call
    in CUDA graphs, replayed on later calls (fewer kernel launches from the host)."""
    import tvm

    config = {"relax.backend.use_cuda_graph": True} if cuda_graph and is_gpu(target) else {}
    for name, passes in pipeline_stages(target, gemv):
        t0 = time.time()
        with target, tvm.transform.PassContext(opt_level=3, config=config):
            mod = tvm.transform.Sequential(passes)(mod)
        if log:
            log(f"  {name:<9} {time.time() - t0:6.1f} s")
        if name == upto:
            break
    return mod


def pipeline(target, log=None, cuda_graph: bool = False, gemv: str = "course"):
    """The whole pipeline as one module pass, for ``tvm.compile(relax_pipeline=...)``."""
    import tvm

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        return run_stages(mod, target, log=log, cuda_graph=cuda_graph, gemv=gemv)

    return _pipeline


def compile_module(mod, target, log=None, cuda_graph: bool = False, gemv: str = "course",
                   pdl: bool = True, prefetch: int | None = None, restrict: bool = False):
    """Compile a Relax IRModule with the course pipeline; returns the VM executable.

    CUDA kernels get the course's device pass (:mod:`mlc_course.cuda_device`): the device
    functions they call and, with ``pdl`` on sm_90+, programmatic dependent launch, the GEMVs'
    L2 prefetch (``prefetch`` bytes per block; None: the default) and no ``__restrict__``
    (``restrict=True`` keeps it, for measurements only: it is unsafe with PDL)."""
    import tvm

    from .cuda_device import tir_pipeline

    t0 = time.time()
    ex = tvm.compile(mod, target=target, relax_pipeline=pipeline(target, log, cuda_graph, gemv),
                     tir_pipeline=tir_pipeline(target, pdl, prefetch, restrict))
    if log:
        log(f"  codegen + link {time.time() - t0:6.1f} s in all")
    return ex


def compile_kernels(mod, target, pdl: bool = False):
    """Compile TIR functions alone (a GEMV to time, a kernel to read): ``tvm.compile`` with
    the course's TIR pipeline for ``target``, so that CUDA kernels get the device functions
    they call (:mod:`mlc_course.cuda_device`)."""
    import tvm

    from .cuda_device import tir_pipeline

    if not isinstance(mod, tvm.IRModule):
        mod = tvm.IRModule({"main": mod})
    return tvm.compile(mod, target=target, tir_pipeline=tir_pipeline(target, pdl))


# -------------------------------------------------------------------------------- cache


def _source_digest() -> str:
    """Hash of the modules whose code ends up in a compiled library."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("model.py", "quantization.py", "compile.py", "sharding.py", "schedules.py", "cuda_device.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def cache_key(cfg, scheme: str, shards: int, target, kv: str = "dynamic") -> dict:
    import tvm

    from . import __version__

    key = {"config": cfg.to_dict(), "scheme": scheme, "shards": shards,
           "target": str(target), "tvm": tvm.__version__, "mlc_course": __version__,
           "source": _source_digest()}
    if kv != "dynamic":
        key["kv"] = kv
    return key


def library_path(cfg, scheme: str, shards: int, target, kv: str = "dynamic") -> Path:
    from .weights import cache_dir

    key = cache_key(cfg, scheme, shards, target, kv)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    kind = "gpu" if is_gpu(target) else "cpu"
    return cache_dir() / "lib" / f"{cfg.name}-{scheme}-tp{shards}-{kind}-{digest}" / "model.so"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_model(cfg, scheme: str, shards: int = 1, device: str = "cpu", *, target=None,
                force: bool = False, quiet: bool = False, kv: str = "dynamic") -> Path:
    """Compile the model (or reuse the cached library) and return the library's path.

    ``kv``: the KV cache of :func:`mlc_course.model.export` (``"static"`` for CUDA-graph
    decoding)."""
    import tvm

    from .model import export
    from .quantization import get_scheme

    get_scheme(scheme)
    target = target or get_target(device)
    path = library_path(cfg, scheme, shards, target, kv)
    log = (lambda m: None) if quiet else _log
    if path.exists() and not force and is_gpu(target):
        return path  # a GPU library cannot be loaded to check it where no GPU runtime is
    if path.exists() and not force:
        try:
            tvm.runtime.load_module(str(path))
            return path
        except Exception as e:  # corrupt or stale: rebuild
            log(f"cached library {path} does not load ({type(e).__name__}); rebuilding")
    log(f"compiling {cfg.name} {scheme} shards={shards} for {target.kind.name} "
        f"(cached afterwards in {path.parent})")
    t0 = time.time()
    # on CPUs the decode step's 4-bit linears in the form the course's CPU GEMV schedules
    mod, _ = export(cfg, scheme, shards, kv=kv, gpu=is_gpu(target), form="half2" if is_gpu(target) else "word")
    ex = compile_module(mod, target, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"model.{os.getpid()}.tmp.so")
    ex.export_library(str(tmp))
    (path.parent / "key.json").write_text(json.dumps(cache_key(cfg, scheme, shards, target, kv), indent=1))
    tmp.replace(path)
    log(f"compiled in {time.time() - t0:.1f} s")
    return path


def cuda_sources(lib_module) -> list[str]:
    """The CUDA C++ source of every CUDA module a compiled library imports (TVM 0.27 keeps
    kernels as source and compiles them when the library is loaded)."""
    out, stack = [], [lib_module]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(m.inspect_source(""))
        stack.extend(m.imports)
    return out
