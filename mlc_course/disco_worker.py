"""Code that runs inside each disco worker.

A ``ProcessSession`` started with ``entrypoint="mlc_course.disco_worker"`` runs this module
as the worker's main program: it registers the course's worker-side functions, then hands
control to TVM's own worker loop. In a ``ThreadedSession`` the workers are threads of this
process, and importing the module registers the same functions.
"""

from __future__ import annotations

import json

from tvm_ffi import get_global_func, register_global_func


@register_global_func("mlc_course.load_worker_params", override=True)
def _load_worker_params(folder: str, names_json: str, device: str):
    """Load this worker's shard of the weights (``worker{rank}.npz``) onto its device."""
    import tvm

    from .engine import load_worker_params

    rank = int(get_global_func("runtime.disco.worker_id")()[0])  # a Shape([rank])
    dev = tvm.cpu() if device == "cpu" else tvm.cuda(rank)
    arrays = load_worker_params(folder, rank, json.loads(names_json))
    return [tvm.runtime.tensor(a, dev) for a in arrays]


def main() -> None:
    from tvm.exec import disco_worker

    disco_worker.main()


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyboardInterrupt):
        pass
