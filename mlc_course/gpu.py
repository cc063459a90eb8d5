"""GPU discovery: the driver's GPUs, their arch, and the CUDA compile callback TVM calls when it loads a library."""

from __future__ import annotations

import ctypes


def cuda_device_count() -> int:
    """Number of CUDA GPUs the driver reports; 0 without a driver (asks libcuda directly, so
    it works whether or not TVM's CUDA runtime is loaded)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    if lib.cuInit(0) != 0:
        return 0
    n = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(n)) != 0:
        return 0
    return int(n.value)


def gpu_memory(index: int = 0) -> tuple[int, int] | None:
    """(free, total) bytes of GPU ``index`` from the CUDA runtime, None where it cannot be
    asked (no libcudart, no GPU)."""
    try:
        from .cuda_graph import cudart

        rt = cudart()
        cur = ctypes.c_int(0)
        rt.cudaGetDevice(ctypes.byref(cur))
        if rt.cudaSetDevice(index) != 0:
            return None
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        rc = rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
        rt.cudaSetDevice(cur.value)
        return (int(free.value), int(total.value)) if rc == 0 else None
    except Exception:  # noqa: BLE001
        return None


def compute_capability(index: int = 0) -> tuple[int, int] | None:
    """(major, minor) of GPU ``index`` from the driver (libcuda), None without one."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            return None
        dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
            return None
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        if lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) or lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev):
            return None
        return int(major.value), int(minor.value)
    except OSError:
        return None


def arch_of(capability: tuple[int, int]) -> str:
    """``sm_XY`` for a compute capability; ``sm_XYa`` from Hopper on, whose architecture-specific
    instructions (programmatic dependent launch among them) need the ``a`` target."""
    major, minor = capability
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


def local_arch(index: int = 0) -> str | None:
    """The arch of this machine's GPU ``index`` (e.g. ``sm_90a``), None without a GPU."""
    cc = compute_capability(index)
    return arch_of(cc) if cc else None


def nvcc_command(arch: str, src: str, out: str) -> list[str]:
    """nvcc building a fatbin of ``src`` for one arch (``sm_90a`` needs the -gencode form)."""
    return ["nvcc", "-w", "-O3", "-fatbin", f"-gencode=arch=compute_{arch[3:]},code={arch}", "-o", out, src]


COMPILE_LOG: list[dict] = []  # what each kernel compile did (fatbin found or nvcc run), for result files


def nvcc_compiler(arch: str, fatbin_dirs=(), cache=None):
    """A ``tvm_callback_cuda_compile``: TVM 0.27 keeps a library's kernels as CUDA C++ and
    calls this when the library is loaded. A fatbin built beforehand for the same source
    (named by its sha256, in one of ``fatbin_dirs``: built for ``arch``) or in ``cache`` (for
    ``arch``) is used when present, else nvcc compiles the source for ``arch`` with -O3 and
    caches it.

    TVM's own callback takes the arch from ``Target.current()`` (unset when a library is
    loaded) and compiles through NVRTC from the ``cuda-bindings`` package; this one names the
    arch and needs only nvcc, which loading CUDA kernels needs anyway."""
    import hashlib
    import os
    import subprocess
    import time
    from pathlib import Path

    cache = Path(cache or os.environ.get("MLC_COURSE_FATBIN_CACHE", "/tmp/mlc_course_fatbin"))

    def compile_cuda(code: str) -> bytes:
        digest = hashlib.sha256(code.encode()).hexdigest()
        # carried fatbins are named by the source alone (built for the carry's arch); the
        # cache, which other GPUs of this machine may share, by source and arch
        for f, where in [*((Path(d) / f"{digest}.fatbin", "carried") for d in fatbin_dirs),
                         (cache / f"{digest}.{arch}.fatbin", "cache")]:
            if f.exists():
                COMPILE_LOG.append({"sha256": digest[:16], "from": where})
                return f.read_bytes()
        cache.mkdir(parents=True, exist_ok=True)
        cu, out = cache / f"{digest}.{os.getpid()}.cu", cache / f"{digest}.{arch}.fatbin"
        tmp = out.with_name(f"{digest}.{arch}.{os.getpid()}.fatbin")
        cu.write_text(code)
        t0 = time.time()
        try:
            run = subprocess.run(nvcc_command(arch, str(cu), str(tmp)), capture_output=True, text=True)
        except FileNotFoundError:
            raise RuntimeError("nvcc not found: loading the course's CUDA kernels compiles them with nvcc. "
                               "Install the CUDA toolkit (or put its bin folder on PATH)") from None
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed on a kernel source ({cu}):\n{run.stderr[-2000:]}")
        tmp.replace(out)  # atomic: several worker processes may compile the same source
        cu.unlink(missing_ok=True)
        COMPILE_LOG.append({"sha256": digest[:16], "from": f"nvcc {arch}", "s": round(time.time() - t0, 1)})
        return out.read_bytes()

    return compile_cuda


_REGISTERED: list[str] = []  # the arch a course compiler was registered for, once done


def use_nvcc_compiler(fatbin_dirs=(), index: int = 0) -> bool:
    """Register :func:`nvcc_compiler` for this machine's GPU as TVM's CUDA compile callback
    in this process, unless done already (the first call's ``fatbin_dirs`` stay). False, and
    nothing registered, where there is no GPU or no nvcc (TVM's own callback stays)."""
    import shutil

    if _REGISTERED:
        return True
    arch = local_arch(index)
    if arch is None or (shutil.which("nvcc") is None and not fatbin_dirs):
        return False
    import tvm_ffi

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", nvcc_compiler(arch, fatbin_dirs), override=True)
    _REGISTERED.append(arch)
    return True
