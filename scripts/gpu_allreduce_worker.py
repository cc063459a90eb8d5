"""Disco worker entrypoint for ``scripts/gpu_allreduce_test.py``.

A ProcessSession starts its workers 1..N-1 as ``python -m <entrypoint> ...``. On the lent GPU
machines TVM is only carried (``$MLC_TP_CARRY/site``) and its CUDA runtime must be loaded by
hand (``scripts/gpu_run.py``'s ``setup_runtime``); elsewhere the installed TVM serves. The
worker then registers the test's worker-side functions (``mlc_ar_test.*``) and enters TVM's
worker loop.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    carry = os.environ.get("MLC_TP_CARRY")
    if carry and (Path(carry) / "site" / "tvm").is_dir():
        from scripts.gpu_run import setup_runtime

        setup_runtime(Path(carry))
    from scripts.gpu_allreduce_test import register_worker_functions

    register_worker_functions()
    from tvm.exec import disco_worker

    try:
        disco_worker.main()
    except (OSError, KeyboardInterrupt):  # the controller closed the pipes: the normal end
        pass


if __name__ == "__main__":
    main()
