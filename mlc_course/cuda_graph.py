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

Greedy decoding skips the host altogether. Libraries built for a GPU also hold
``greedy_next`` (:func:`mlc_course.model.greedy_next_func`: the argmax of the logits into the
token buffer, the position plus one), captured in the same graph after the step: replay
``t`` leaves replay ``t + 1``'s inputs on the device. :meth:`CudaGraphDecoder.greedy` queues
replay ``t + 1`` and a 4-byte copy of its token *before* it waits for token ``t``, so the GPU
never waits for Python (the host's sampling, copies and launch took 50-150 µs per 7B token,
against a ~2.4 ms step).

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
        try:
            self.greedy_fn = vm["greedy_next"]
        except Exception:  # noqa: BLE001  (a library built before greedy_next existed)
            self.greedy_fn = None
        self._host = self._events = None

    def _call(self):
        with self.tvm_ffi.use_raw_stream(self.dev, self.stream.value):
            out = self.vm[self.fn](self.ids, self.pos, self.effects, self.params)
            if self.greedy_fn is not None:  # the next step's inputs, on the device
                self.greedy_fn(out[0], self.ids, self.pos)
            return out

    def _set_inputs(self, token: int, pos: int) -> None:
        """The next replay's token and position, into the device buffers the graph reads."""
        self.ids.copyfrom(np.array([[token]], dtype="int32"))
        self.pos.copyfrom(np.array([pos], dtype="int32"))

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
        self._sync()
        self._set_inputs(token, pos)
        if self.graph_exec is None:
            self._capture()
            # the warm-up call's greedy_next moved the inputs on: set them again
            self._set_inputs(token, pos)
        _check(self.rt.cudaGraphLaunch(self.graph_exec, self.stream), "cudaGraphLaunch")
        self._sync()
        return self.logits

    def step(self, token: int, pos: int) -> np.ndarray:
        """Logits after appending ``token`` at position ``pos``, on the host."""
        return self.replay(token, pos).numpy().reshape(-1)

    def greedy(self, token: int, pos: int, count: int):
        """Yield ``count`` greedy tokens: the first after appending ``token`` at ``pos``, each
        next one after appending the one before. Replays are queued one ahead of the host;
        the consumer may stop early (the extra step only wrote a cache row past the end)."""
        if self.greedy_fn is None:
            raise RuntimeError("this library has no greedy_next; rebuild it")
        if count < 1:
            return
        if self.graph_exec is None:
            self._set_inputs(token, pos)
            self._capture()  # (its two calls moved ids and pos on: set them again below)
        if self._host is None:
            host = ctypes.c_void_p()
            _check(self.rt.cudaHostAlloc(ctypes.byref(host), ctypes.c_size_t(8), 0), "cudaHostAlloc")
            self._host = host
            self._events = []
            for _ in range(2):
                ev = ctypes.c_void_p()
                _check(self.rt.cudaEventCreateWithFlags(ctypes.byref(ev), 2), "cudaEventCreate")  # no timing
                self._events.append(ev)
        self._sync()  # nothing of an earlier call still in flight on our stream
        self._set_inputs(token, pos)
        slots = (ctypes.c_int32 * 2).from_address(self._host.value)
        src = ctypes.c_void_p(self.ids.data_ptr())

        def launch(i):
            _check(self.rt.cudaGraphLaunch(self.graph_exec, self.stream), "cudaGraphLaunch")
            dst = ctypes.c_void_p(self._host.value + 4 * (i % 2))
            _check(self.rt.cudaMemcpyAsync(dst, src, ctypes.c_size_t(4), 2, self.stream), "cudaMemcpyAsync")
            _check(self.rt.cudaEventRecord(self._events[i % 2], self.stream), "cudaEventRecord")

        launch(0)
        try:
            for i in range(count):
                if i + 1 < count:
                    launch(i + 1)
                _check(self.rt.cudaEventSynchronize(self._events[i % 2]), "cudaEventSynchronize")
                yield int(slots[i % 2])
        finally:
            self._sync()  # a consumer that stopped early leaves no replay in flight

    def close(self) -> None:
        if self._host is not None:
            self._sync()
            self.rt.cudaFreeHost(self._host)
            for ev in self._events:
                self.rt.cudaEventDestroy(ev)
            self._host = self._events = None
        if self.graph_exec is not None:
            self.rt.cudaGraphExecDestroy(self.graph_exec)
            self.graph_exec = None
        if self.stream is not None and self.stream.value:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None
        self.logits = self.vm = self.params = self.effects = None
