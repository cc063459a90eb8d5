"""What the course adds to each CUDA kernel after TVM has lowered it, in one TIR pass over
the device functions (:func:`course_device_pass`, in the TIR pipeline :data:`PIPELINE_NAME`):

1. **the device functions it calls**: the half2 GEMV's group dot product
   (:data:`mlc_course.quantization.HALF2_DOT_SOURCE`) is printed ahead of each kernel that
   calls it (TVM prints the value of a ``pragma_import_c`` attribute into the source);
2. **programmatic dependent launch** (sm_90 and newer): each kernel may start while the one
   before it is still finishing.

Why 2: a decode step is ~350 kernels in a row, most a few microseconds long; between two of
them the GPU idles while the next is launched and its blocks are scheduled (notebook 06's
kernel trace). Hopper lets a kernel be
launched *before* the one it depends on has finished: launched with the attribute
``programmaticStreamSerializationAllowed``, its blocks may start as soon as every block of
the kernel before it has executed ``griddepcontrol.launch_dependents``; it must execute
``griddepcontrol.wait`` (which returns once the kernel before has completed and its writes
are visible) before it touches anything that kernel reads or writes. CUDA graphs keep this as
a programmatic edge. The pass gives every kernel the launch tag :data:`PDL_TAG` (TVM's CUDA
runtime then launches it with that attribute) and, as its first statements,
``launch_dependents`` then ``wait``: nothing of the previous kernel is read, or overwritten, before it completed,
so results are unchanged; the next kernel's launch and block scheduling overlap the previous
kernel's tail. (A GEMV could in principle stream its weights before waiting, since no kernel
writes them; tried, but ptxas schedules ``griddepcontrol.wait`` ahead of every load of the
kernel whatever the source order or register dependences, as the SASS shows.)
"""

from __future__ import annotations

#: TVM 0.27's launch-parameter tag for programmatic dependent launch (its spelling)
PDL_TAG = "tirx.use_programtic_dependent_launch"
PDL_SOURCE = r"""
#ifndef COURSE_PDL
#define COURSE_PDL
// programmatic dependent launch (sm_90+): the next kernel may be launched now
__device__ __forceinline__ void course_pdl_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;");
}
// wait until the previous kernel has completed and its writes are visible
__device__ __forceinline__ void course_pdl_wait() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
#endif
"""
PIPELINE_NAME = "course_cuda"
MIN_PDL_ARCH = 90


def supports_pdl(target) -> bool:
    """Whether ``target`` is CUDA with compute capability 9.0 or newer."""
    if target.kind.name != "cuda":
        return False
    arch = str(target.attrs.get("arch", ""))
    digits = "".join(ch for ch in arch.removeprefix("sm_") if ch.isdigit())
    return bool(digits) and int(digits) >= MIN_PDL_ARCH


def _kernel(func, pdl: bool):
    """One device function with the course's additions (see the module doc)."""
    import tvm
    from tvm import tirx

    from .quantization import HALF2_DOT, HALF2_DOT_SOURCE

    sources, body = [], func.body
    if HALF2_DOT in func.script():
        sources.append(HALF2_DOT_SOURCE)
    if pdl:
        sources.append(PDL_SOURCE)
        body = tirx.SeqStmt([tirx.Evaluate(tirx.call_extern("int32", "course_pdl_launch_dependents")),
                             tirx.Evaluate(tirx.call_extern("int32", "course_pdl_wait")), body])
    for src in sources:
        body = tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_c", tvm.ir.expr.StringImm(src), body)
    out = func.with_body(body)
    if pdl:
        tags = [str(t) for t in func.attrs.get("tirx.kernel_launch_params", [])]
        if PDL_TAG not in tags:
            # TVM wants its dynamic-shared-memory tag last
            at = tags.index("tirx.use_dyn_shared_memory") if "tirx.use_dyn_shared_memory" in tags else len(tags)
            tags.insert(at, PDL_TAG)
        out = out.with_attr("tirx.kernel_launch_params", tags)
    return out


def course_device_pass(pdl: bool):
    """The module pass over the device functions (after TVM's ``SplitHostDevice``)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="CourseCudaKernels")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None \
                    and int(func.attrs.get("calling_conv", 0)) == 2:  # kDeviceKernelLaunch
                updates[gv] = _kernel(func, pdl)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def tir_pipeline(target, pdl: bool = True) -> str:
    """The name of the TIR pipeline for ``target``: for CUDA, TVM's ``s_tir`` pipeline with
    :func:`course_device_pass` added to its device passes (programmatic dependent launch
    where ``pdl`` and the arch allow it); TVM's default elsewhere."""
    import tvm
    from tvm.tirx import compilation_pipeline as cp

    if target.kind.name != "cuda":
        return "default"
    use = bool(pdl and supports_pdl(target))
    name = f"{PIPELINE_NAME}{'_pdl' if use else ''}"
    if name not in cp.PIPELINE_MAP:
        def factory(**kwargs):
            pipeline, finalize_host, finalize_device = cp.PIPELINE_MAP["s_tir"](**kwargs)

            def device_passes():
                return tvm.ir.transform.Sequential([finalize_device(), course_device_pass(use)])

            return pipeline, finalize_host, device_passes

        cp.register_tir_pipeline(name, factory)
    return name
