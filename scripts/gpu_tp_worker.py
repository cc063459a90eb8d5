"""Disco worker entrypoint for ``scripts/gpu_tp_test.py`` on a GPU machine with runtime-only TVM.

A ProcessSession starts its workers 1..N-1 as ``python -m <entrypoint> ...``. On the lent GPU
machines TVM is only carried (``<carry>/site``) and its CUDA runtime must be loaded by hand,
so each worker process does the same set-up as the controller (``scripts/gpu_run.py``'s
``setup_runtime``) before it enters TVM's worker loop. The folder comes from
``$MLC_TP_CARRY``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from scripts.gpu_run import setup_runtime

    # MLC_TP_CUDA=0: no CUDA runtime (a CPU smoke test of this set-up without a GPU)
    setup_runtime(Path(os.environ["MLC_TP_CARRY"]), cuda=os.environ.get("MLC_TP_CUDA", "1") != "0")
    from mlc_course import disco_worker  # registers mlc_course.load_worker_params, random_worker_params & co.

    disco_worker.main()


if __name__ == "__main__":
    main()
