"""One compile pipeline for every notebook, test and the engine."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def host_cpu() -> str:
    """This CPU's LLVM name. ``"mcpu": "native"`` silently falls back to ``generic`` in TVM
    0.27 (12x slower), so ask LLVM for the real name."""
    import tvm

    return str(tvm.get_global_func("target.llvm_get_system_cpu")())


def cpu_target(num_cores: int | None = None):
    """A TVM target for this machine's CPU."""
    import os

    import tvm

    cfg = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": num_cores or os.cpu_count() or 1}
    return tvm.target.Target(cfg)
