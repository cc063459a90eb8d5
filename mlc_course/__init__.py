"""mlc-course: build MLC LLM's multi-GPU 4-bit Llama inference from scratch with Apache TVM.

The package holds the real implementation; the notebooks in ``notebooks/`` explain it, call
it and check it. See ``docs/architecture.md`` for the map of modules.
"""

import os as _os

__version__ = "0.1.0"

# TVM's CPU thread pool defaults to half the cores on x86 (one thread on a 2-core laptop VM):
# use every core this process may run on, unless the user chose. Read when the first kernel
# runs, so setting it here works even after ``import tvm``.
_os.environ.setdefault("TVM_NUM_THREADS", str(len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity")
                                               else (_os.cpu_count() or 1)))
