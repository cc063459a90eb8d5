"""One decode step captured as a CUDA graph and replayed for every token.

On a GPU, a decode step of a 7B model is ~20 kernels per layer, ~700 in all, each a few
microseconds of GPU work; launched one by one from the Relax VM (plus its allocations and
shape bookkeeping) the *host* sets the pace, not the GPU's memory bandwidth (notebook 06).
A CUDA graph records the whole sequence once and replays it with one launch.

Capturing the VM's ``decode`` call needs every shape and every address to be the same from
token to token, which is what the model's static KV cache gives (``kv="static"``: the token
and its position are read from device tensors, the cache is written in place). So:

1. the token id and position live in two small device buffers that this class owns;
2. one ordinary call warms up the VM's memory pool (later allocations reuse its blocks) and
   loads the kernels;
3. the next call runs under stream capture (relaxed mode) on a stream of our own, set as
   TVM's current stream, and is instantiated as a graph;
4. each token: copy id and position into the buffers, launch the graph, read the logits
   from the output tensor kept from the capture.

Invariant this relies on: between replays nothing allocates a *long-lived* tensor from the
VM's pool (the graph's intermediates are pool blocks that were free after the capture). The
engine keeps the KV-cache tensors for the whole session (``reset`` only moves the position:
stale rows are masked and overwritten) and reads every other result back at once.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

_RELAXED = 2  # cudaStreamCaptureModeRelaxed
_NON_BLOCKING = 1  # cudaStreamNonBlocking


def _loaded_cudart_path() -> str | None:
    """The libcudart this process already loaded (TVM's CUDA runtime needs one)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "libcudart.so" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def cudart() -> ctypes.CDLL:
    """The CUDA runtime library, preferring the copy already loaded in this process."""
    names = [p for p in (_loaded_cudart_path(),) if p] + ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("CUDA graphs need the CUDA runtime library (libcudart), which was not found")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUDA error {rc}")


class CudaGraphDecoder:
    """Replays the ``decode`` function of a static-KV library as one CUDA graph."""

    def __init__(self, vm, dev, params, effects, fn: str = "decode"):
        import tvm
        import tvm_ffi

        self.tvm, self.tvm_ffi, self.vm, self.dev = tvm, tvm_ffi, vm, dev
        self.params, self.effects, self.fn = params, effects, fn
        self.rt = cudart()
        _check(self.rt.cudaSetDevice(dev.index), "cudaSetDevice")  # the stream's device
        stream = ctypes.c_void_p()
        _check(self.rt.cudaStreamCreateWithFlags(ctypes.byref(stream), _NON_BLOCKING), "cudaStreamCreate")
        self.stream = stream
        self.ids = tvm.runtime.empty((1, 1), "int32", dev)
        self.pos = tvm.runtime.empty((1,), "int32", dev)
        self.graph_exec = None
        self.logits = None
        self.capture_count = 0

    def _call(self):
        with self.tvm_ffi.use_raw_stream(self.dev, self.stream.value):
            return self.vm[self.fn](self.ids, self.pos, self.effects, self.params)

    def _sync(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def _capture(self) -> None:
        out = self._call()  # warm-up: a real step (same token, same position as the replay)
        self._sync()
        _check(self.rt.cudaStreamBeginCapture(self.stream, _RELAXED), "cudaStreamBeginCapture")
        try:
            out = self._call()
        finally:
            graph = ctypes.c_void_p()
            rc = self.rt.cudaStreamEndCapture(self.stream, ctypes.byref(graph))
        _check(rc, "cudaStreamEndCapture")
        exec_ = ctypes.c_void_p()
        _check(self.rt.cudaGraphInstantiateWithFlags(ctypes.byref(exec_), graph, ctypes.c_ulonglong(0)),
               "cudaGraphInstantiateWithFlags")
        self.rt.cudaGraphDestroy(graph)
        self.graph_exec, self.logits = exec_, out[0]  # the output buffer the graph writes
        self.capture_count += 1

    def replay(self, token: int, pos: int):
        """Append ``token`` at position ``pos``; the logits as a device tensor (complete: the
        stream has been synchronised). Captures the graph on the first call."""
        self.ids.copyfrom(np.array([[token]], dtype="int32"))
        self.pos.copyfrom(np.array([pos], dtype="int32"))
        if self.graph_exec is None:
            self._capture()
        _check(self.rt.cudaGraphLaunch(self.graph_exec, self.stream), "cudaGraphLaunch")
        self._sync()
        return self.logits

    def step(self, token: int, pos: int) -> np.ndarray:
        """Logits after appending ``token`` at position ``pos``, on the host."""
        return self.replay(token, pos).numpy().reshape(-1)

    def close(self) -> None:
        if self.graph_exec is not None:
            self.rt.cudaGraphExecDestroy(self.graph_exec)
            self.graph_exec = None
        if self.stream is not None and self.stream.value:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None
        self.logits = self.vm = self.params = self.effects = None
