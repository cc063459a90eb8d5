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
