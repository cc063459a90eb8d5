"""GPU discovery and the runtime-only TVM setup used on GPU machines."""

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
