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


@register_global_func("mlc_course.random_worker_params", override=True)
def _random_worker_params(params_json: str):
    """This worker's shard as random arrays (``[name, shape, dtype]`` each, JSON), made here
    and uploaded to this worker's GPU: the benchmarks' weights (:mod:`mlc_course.tp_bench`)."""
    import tvm

    from .tp_bench import random_params

    rank = int(get_global_func("runtime.disco.worker_id")()[0])
    dev = tvm.cuda(rank)
    return [tvm.runtime.tensor(a, dev) for a in random_params(json.loads(params_json), seed=rank)]


_DECODERS: dict = {}


@register_global_func("mlc_course.graph_decode", override=True)
def _graph_decode(vm_mod, params, effects, token: int, pos: int):
    """One decode step of this worker, replayed from its CUDA graph (captured on the first
    call; one graph per worker and loaded module). Every worker replays its own graph, the
    NCCL collectives inside it included; the controller reads worker 0's logits."""
    return _decoder(vm_mod, params, effects).replay(int(token), int(pos))


@register_global_func("mlc_course.graph_greedy", override=True)
def _graph_greedy(vm_mod, params, effects, token: int, pos: int, count: int):
    """``count`` greedy steps of this worker from its CUDA graph, the argmax taken on the GPU
    (:meth:`mlc_course.cuda_graph.CudaGraphDecoder.greedy`). Every worker replays its own
    graph; the step broadcasts worker 0's token to all, so they stay in step. Returns the
    tokens (the controller reads worker 0's)."""
    from tvm_ffi import Shape

    dec = _decoder(vm_mod, params, effects)
    return Shape(list(dec.greedy(int(token), int(pos), int(count))))


def _decoder(vm_mod, params, effects):
    """This worker's decoder for ``vm_mod`` (one graph per worker and loaded module)."""
    import tvm

    from .cuda_graph import CudaGraphDecoder

    key = vm_mod.__chandle__()
    dec = _DECODERS.get(key)
    if dec is None:
        rank = int(get_global_func("runtime.disco.worker_id")()[0])
        _DECODERS.clear()
        dec = _DECODERS[key] = CudaGraphDecoder(vm_mod, tvm.cuda(rank), params, effects)
    return dec


@register_global_func("mlc_course.graph_release", override=True)
def _graph_release() -> None:
    """Destroy this worker's CUDA graph and drop its references to the module, weights and
    cache. Called on every worker before the session ends: worker 0 is a thread of the
    controller process, and Python objects it still holds at shutdown would need the GIL
    while the controller holds it to wait for the thread (a deadlock seen on 2 GPUs)."""
    for dec in _DECODERS.values():
        dec.close()
    _DECODERS.clear()


def main() -> None:
    """TVM's worker loop. It ends when the controller closes its pipes (an ``OSError`` then)
    or the session is interrupted: both are the normal end of a worker, not errors."""
    from tvm.exec import disco_worker

    from .gpu import use_nvcc_compiler

    use_nvcc_compiler()  # on a GPU machine: this worker compiles the kernels it loads for its GPU
    try:
        disco_worker.main()
    except (OSError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
