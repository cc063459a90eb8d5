"""What the course adds to each CUDA kernel after TVM has lowered it, in one TIR pass over
the device functions (:func:`course_device_pass`, in the TIR pipeline :data:`PIPELINE_NAME`):

1. **the device functions it calls**: the half2 GEMV's group dot product
   (:data:`mlc_course.quantization.HALF2_DOT_SOURCE`) is printed ahead of each kernel that
   calls it (TVM prints the value of a ``pragma_import_c`` attribute into the source);
2. **programmatic dependent launch** (sm_90 and newer): each kernel may start while the one
   before it is still finishing;
3. **no** ``__restrict__`` on the kernels that wait;
4. optionally (off by default: it measured slower), **the GEMVs' weights prefetched into L2**
   before that wait.

Why 2: a decode step is ~350 kernels in a row, most a few microseconds long; between two of
them the GPU idles while the next is launched and its blocks are scheduled (notebook 06's
kernel trace). Hopper lets a kernel be launched *before* the one it depends on has finished:
launched with the attribute ``programmaticStreamSerializationAllowed``, its blocks may start
as soon as every block of the kernel before it has executed
``griddepcontrol.launch_dependents``; it must execute ``griddepcontrol.wait`` (which returns
once the kernel before has completed and its writes are visible) before it touches anything
that kernel reads or writes. CUDA graphs keep this as a programmatic edge. The pass gives
every kernel the launch tag :data:`PDL_TAG` (TVM's CUDA runtime then launches it with that
attribute) and, as its first statements, ``launch_dependents`` then ``wait``: nothing of the
previous kernel is read, or overwritten, before it completed, so results are unchanged; the
next kernel's launch and block scheduling overlap the previous kernel's tail.

Why 3: TVM marks every pointer parameter ``__restrict__``; nvcc then reads buffers the kernel
does not write through the non-coherent path (``ld.global.nc``), whose data must not change
while the kernel runs, and ptxas may move such a load above ``griddepcontrol.wait``: seen in
the SASS of a GEMV, its first activation load placed ahead of the wait once the prefetch was
added. With PDL the activations *are* still being written by the previous kernel, so the
kernels that wait drop ``__restrict__`` (``tirx.noalias``); their loads are then plain
``ld.global`` and stay after the wait (``tests/test_gpu_compile.py`` checks the PTX). This
changed nothing measurable (7B: 464.3 tok/s against 461.4 with ``__restrict__``, same run).

Why 4, and why off: a GEMV could stream its weights before waiting, since no kernel writes
them, but ptxas schedules ``griddepcontrol.wait`` ahead of the kernel's loads whatever the
source order. An
L2 prefetch is no load: one thread of each block asks the copy engine
(``cp.async.bulk.prefetch.L2``) for the first :data:`PREFETCH_BYTES` of the block's slice of
the weights and scales, before the wait, so the block's first loads hit L2 instead of paying
the trip to memory after the previous kernel ends.
Measured on one H100 (``data/results/gpu_h100x1_prefetch.json``, one run, same machine):
Llama-2-7B q4f16_1 464.3 tok/s without it, 455.1 with 4 KiB and 416.2 with 16 KiB per block;
Llama-2-70B 66.1 against 60.3. The next GEMV's blocks become resident while the previous
GEMV still streams, so its prefetch competes for memory with that GEMV (and with the
attention kernels, which slowed too) and can be evicted before use.

"""

from __future__ import annotations

import re

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
PREFETCH_SOURCE = r"""
#ifndef COURSE_L2_PREFETCH
#define COURSE_L2_PREFETCH
// ask the copy engine to bring this block's slice of a weight buffer into L2 (sm_90+): one
// instruction of one thread; the block's own loads then find it there
__device__ __forceinline__ void course_l2_prefetch(const void* base, unsigned long long chunk, unsigned int nbytes) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) {
    const char* p = static_cast<const char*>(base) + static_cast<unsigned long long>(blockIdx.x) * chunk;
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(nbytes) : "memory");
  }
}
#endif
"""
#: bytes of its weight slice each GEMV block asks to have brought into L2 before it waits for
#: the kernel before it (0: no prefetch, the default: slower when measured, see the module doc)
PREFETCH_BYTES = 0
PIPELINE_NAME = "course_cuda"
MIN_PDL_ARCH = 90


def supports_pdl(target) -> bool:
    """Whether ``target`` is CUDA with compute capability 9.0 or newer."""
    if target.kind.name != "cuda":
        return False
    arch = str(target.attrs.get("arch", ""))
    digits = "".join(ch for ch in arch.removeprefix("sm_") if ch.isdigit())
    return bool(digits) and int(digits) >= MIN_PDL_ARCH


_DECL = re.compile(r'T\.decl_buffer\(\((\d+),\), "(\w+)", data=(\w+)\)')
_GRID = re.compile(r'T\.launch_thread\("blockIdx\.x", (\d+)\)')


def _prefetches(func, script: str, max_bytes: int) -> list[tuple]:
    """(pointer parameter, bytes per block, bytes to prefetch) for each weight buffer of one
    of the course's 4-bit GEMV kernels (those that call the half2 group dot product): its
    packed weights and its scales.

    Blocks own contiguous, equal slices of the weight rows (the GEMV schedules split the
    rows over ``blockIdx.x`` alone), so block ``b``'s slice of a buffer of ``S`` bytes starts
    at ``b * S / grid``. Buffers whose slice is under 512 bytes (the activations, the output)
    are left alone."""
    from .quantization import HALF2_DOT

    if not max_bytes or HALF2_DOT not in script or "blockIdx.y" in script or "blockIdx.z" in script:
        return []
    grid = _GRID.findall(script)
    decls = _DECL.findall(script)
    if len(set(grid)) != 1 or not any(dtype == "uint32" for _, dtype, _ in decls):
        return []
    grid = int(grid[0])
    params = {p.name: p for p in func.params}
    out = []
    for size, dtype, data in decls:
        nbytes = int(size) * _DTYPE_BYTES.get(dtype, 0)
        if data in params and nbytes % grid == 0 and nbytes // grid >= 512 and (nbytes // grid) % 16 == 0:
            chunk = nbytes // grid
            out.append((params[data], chunk, min(chunk, max_bytes)))
    return out


_DTYPE_BYTES = {"uint32": 4, "float16": 2, "bfloat16": 2, "float32": 4}


def _kernel(func, pdl: bool, prefetch_bytes: int = PREFETCH_BYTES, restrict: bool = False):
    """One device function with the course's additions (see the module doc)."""
    import tvm
    from tvm import tirx

    from .quantization import HALF2_DOT, HALF2_DOT_SOURCE

    sources, body, script = [], func.body, func.script()
    if HALF2_DOT in script:
        sources.append(HALF2_DOT_SOURCE)
    if pdl:
        sources.append(PDL_SOURCE)
        first = [tirx.Evaluate(tirx.call_extern("int32", "course_pdl_launch_dependents"))]
        pre = _prefetches(func, script, prefetch_bytes)
        if pre:
            sources.append(PREFETCH_SOURCE)
            first += [tirx.Evaluate(tirx.call_extern("int32", "course_l2_prefetch", ptr,
                                                     tirx.const(chunk, "uint64"), tirx.const(n, "uint32")))
                      for ptr, chunk, n in pre]
        body = tirx.SeqStmt(first + [tirx.Evaluate(tirx.call_extern("int32", "course_pdl_wait")), body])
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
        if not restrict:
            out = out.with_attr("tirx.noalias", False)
    return out


def course_device_pass(pdl: bool, prefetch_bytes: int = PREFETCH_BYTES, restrict: bool = False):
    """The module pass over the device functions (after TVM's ``SplitHostDevice``)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="CourseCudaKernels")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None \
                    and int(func.attrs.get("calling_conv", 0)) == 2:  # kDeviceKernelLaunch
                updates[gv] = _kernel(func, pdl, prefetch_bytes, restrict)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def tir_pipeline(target, pdl: bool = True, prefetch: int | None = None, restrict: bool = False) -> str:
    """The name of the TIR pipeline for ``target``: for CUDA, TVM's ``s_tir`` pipeline with
    :func:`course_device_pass` added to its device passes (programmatic dependent launch,
    the GEMVs' L2 prefetch of ``prefetch`` bytes per block (None: :data:`PREFETCH_BYTES`) and
    no ``__restrict__`` unless ``restrict``, where ``pdl`` and the arch allow PDL); TVM's
    default elsewhere."""
    import tvm
    from tvm.tirx import compilation_pipeline as cp

    if target.kind.name != "cuda":
        return "default"
    use = bool(pdl and supports_pdl(target))
    prefetch = PREFETCH_BYTES if prefetch is None else int(prefetch)
    name = f"{PIPELINE_NAME}{'_pdl' if use else ''}"
    if use:
        name += f"_pf{prefetch}{'_restrict' if restrict else ''}"
    if name not in cp.PIPELINE_MAP:
        def factory(**kwargs):
            pipeline, finalize_host, finalize_device = cp.PIPELINE_MAP["s_tir"](**kwargs)

            def device_passes():
                return tvm.ir.transform.Sequential([finalize_device(), course_device_pass(use, prefetch, restrict)])

            return pipeline, finalize_host, device_passes

        cp.register_tir_pipeline(name, factory)
    return name
