"""The engine: weights on the workers, prefill and decode with a KV cache, sampling, streaming.

``Engine(model, quantization, shards, device)`` compiles (or reuses) the model library,
converts and shards the weights once (cached on disk, like MLC's preshard), and runs:

* ``shards == 1``: a Relax VM in this process;
* ``shards > 1``: a disco session of N workers, each holding its own shard and KV cache,
  the all-reduces going through the collective library (the course's shared-memory CCL on
  CPU workers, NCCL on GPUs). Input ids go to worker 0, the model broadcasts them; logits
  come back from worker 0.

The same ``stream``/``generate`` API serves both.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import LlamaConfig
from .quantization import get_scheme


class EngineError(RuntimeError):
    """A clear, user-facing failure of the engine (bad input, dead worker, no GPU...)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_quantization(device: str) -> str:
    """q4f32_1 on CPU (f16 math is slow on CPUs), q4f16_1 on GPUs."""
    return "q4f32_1" if device == "cpu" else "q4f16_1"


# ---------------------------------------------------------------------------- sampling


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when ``temperature == 0``; else softmax(logits / T) restricted to the smallest
    set of tokens whose probability reaches ``top_p``, sampled with ``rng``."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p  # always keeps the first
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


# ---------------------------------------------------------------------- weights on disk


def _weights_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("model.py", "quantization.py", "sharding.py", "weights.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:12]


def presharded_params(source, scheme: str, shards: int, log=_log) -> Path:
    """Convert, quantize and shard the weights once; return the folder of worker files.

    Folder layout: ``worker{r}.npz`` with the model's parameter names. Rebuilt when the
    source weights or the code that converts them change.
    """
    from .model import convert_params
    from .sharding import shard_params
    from .weights import cache_dir

    key = json.dumps([source.ident, scheme, shards, _weights_digest()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_dir() / "params" / f"{source.config.name}-{scheme}-tp{shards}-{digest}"
    files = [folder / f"worker{r}.npz" for r in range(shards)]
    if all(f.exists() for f in files):
        return folder
    t0 = time.time()
    log(f"converting weights of {source.config.name} to {scheme}, {shards} shard(s) ...")
    params = convert_params(source.load_params(), source.config, scheme)
    parts = shard_params(params, source.config, shards, scheme)
    folder.mkdir(parents=True, exist_ok=True)
    for r, part in enumerate(parts):
        tmp = folder / f"worker{r}.tmp.npz"
        np.savez(tmp, **part)
        tmp.replace(files[r])
    log(f"weights ready in {time.time() - t0:.1f} s ({folder})")
    return folder


def load_worker_params(folder: str | Path, rank: int, names: list[str]) -> list[np.ndarray]:
    with np.load(Path(folder) / f"worker{rank}.npz") as z:
        return [z[n] for n in names]


# ------------------------------------------------------------------------------ runners


class LocalRunner:
    """One worker: a Relax VM in this process.

    ``kv="static"`` libraries take the position of the first new token as a device tensor;
    with ``graph=True`` (CUDA) their decode step is replayed as one CUDA graph
    (:class:`mlc_course.cuda_graph.CudaGraphDecoder`)."""

    def __init__(self, lib_path: Path, params_dir: Path | None, names: list[str], device: str,
                 arrays=None, kv: str = "dynamic", graph: bool = False):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # relax.VirtualMachine; needs only the runtime

        if graph and (device == "cpu" or kv != "static"):
            raise EngineError("CUDA graphs need device='cuda' and a static-KV library (kv='static')")
        self.tvm, self.kv, self.graph = tvm, kv, graph
        if device == "cuda":
            from .gpu import use_nvcc_compiler

            use_nvcc_compiler()  # kernels are compiled for this GPU as the library loads
        self.dev = tvm.cpu() if device == "cpu" else tvm.cuda(0)
        self.vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), self.dev)
        if arrays is None:
            arrays = load_worker_params(params_dir, 0, names)
        self.params = [a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(a, self.dev)
                       for a in arrays]
        self.effects = None
        self.decoder = None

    def reset(self) -> None:
        if self.kv == "static" and self.effects is not None:
            return  # the same cache buffers for the whole session: stale rows are masked
        self.effects = self.vm["_initialize_effect"]()

    def step(self, fn: str, ids: np.ndarray, total: int) -> np.ndarray:
        tvm = self.tvm
        if self.kv != "static":
            where = tvm.runtime.ShapeTuple([total])
        elif fn == "decode" and self.graph:
            if self.decoder is None:
                from .cuda_graph import CudaGraphDecoder

                self.decoder = CudaGraphDecoder(self.vm, self.dev, self.params, self.effects)
            return self.decoder.step(int(ids.reshape(-1)[0]), total - 1)
        else:
            where = tvm.runtime.tensor(np.array([total - ids.shape[1]], dtype=np.int32), self.dev)
        out = self.vm[fn](tvm.runtime.tensor(ids, self.dev), where, self.effects, self.params)
        self.effects = out[1]
        return out[0].numpy().reshape(-1)

    def can_greedy(self) -> bool:
        """Whether greedy tokens can come from the device (:meth:`greedy`): a CUDA-graph
        runner whose library has ``greedy_next``."""
        return self.graph and self.kv == "static" and _has_greedy_next(self.vm)

    def greedy(self, token: int, pos: int, count: int):
        """``count`` greedy tokens from the device, the first after appending ``token`` at
        ``pos`` (:meth:`mlc_course.cuda_graph.CudaGraphDecoder.greedy`)."""
        if self.decoder is None:
            from .cuda_graph import CudaGraphDecoder

            self.decoder = CudaGraphDecoder(self.vm, self.dev, self.params, self.effects)
        return self.decoder.greedy(token, pos, count)

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
        self.vm = self.params = self.effects = self.decoder = None


def _has_greedy_next(module) -> bool:
    """Whether a loaded library (a VM, or a disco module) has ``greedy_next`` (libraries
    built for GPUs before it existed do not)."""
    try:
        module["greedy_next"]
        return True
    except Exception:  # noqa: BLE001
        return False


class DiscoRunner:
    """N workers in a disco session; all-reduces through the collective library."""

    def __init__(self, lib_path: Path, params_dir: Path | None, names: list[str], device: str, shards: int,
                 session: str = "process", kv: str = "dynamic", graph: bool = False, params=None,
                 entrypoint: str = "mlc_course.disco_worker"):
        """``params``: a function of the session that returns the workers' parameters (a
        disco DRef; e.g. random weights made on each GPU by ``scripts/gpu_run.py``), instead
        of loading ``params_dir``.
        ``graph`` (CUDA, static KV): every worker replays its decode step as a CUDA graph.
        ``entrypoint``: the module worker processes run (one that registers this package's
        worker functions, e.g. after setting up a runtime-only TVM)."""
        from . import disco_worker  # registers the worker-side loader (thread sessions)
        import tvm

        from .ccl import disco_session, init_ccl

        ds = disco_session()

        if graph and (device == "cpu" or kv != "static"):
            raise EngineError("CUDA graphs need device='cuda' and a static-KV library (kv='static')")
        self.tvm, self.n, self.kv, self.graph = tvm, shards, kv, graph
        if device == "cuda":
            from .gpu import use_nvcc_compiler

            use_nvcc_compiler()  # for worker 0, a thread of this process (the others: disco_worker)
        before = {p.pid for p in _worker_processes()} if session != "thread" else set()
        try:
            if session == "thread":
                self.sess = ds.ThreadedSession(num_workers=shards)
            else:
                # each worker process gets its share of the cores (it inherits this variable)
                import os

                cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
                saved = os.environ.get("TVM_NUM_THREADS")
                os.environ["TVM_NUM_THREADS"] = str(max(1, cores // shards))
                try:
                    self.sess = ds.ProcessSession(num_workers=shards, entrypoint=entrypoint)
                finally:
                    if saved is None:
                        os.environ.pop("TVM_NUM_THREADS", None)
                    else:
                        os.environ["TVM_NUM_THREADS"] = saved
            init_ccl(self.sess, shards, device)
            self.mod = self.sess.load_vm_module(str(lib_path))
            if params is None:
                loader = self.sess.get_global_func("mlc_course.load_worker_params")
                self.params = loader(str(params_dir), json.dumps(names), device)
            else:
                self.params = params(self.sess)
            self._graph_decode = self.sess.get_global_func("mlc_course.graph_decode") if graph else None
            self._graph_greedy = self.sess.get_global_func("mlc_course.graph_greedy") if graph else None
            self._getitem = self.sess.get_global_func("ffi.ArrayGetItem")
            self.sess._sync_all()
            # this session's worker processes only (an earlier session's may linger as zombies)
            self._procs = [p for p in _worker_processes() if p.pid not in before] if session != "thread" else []
        except Exception as e:
            self.close()
            raise EngineError(f"starting {shards} disco workers failed: {_first_line(e)}") from None
        self.effects = None
        del disco_worker

    def _ensure_alive(self) -> None:
        if self.sess is None:
            raise EngineError("the multi-worker session has ended; create a new Engine")
        dead = _dead(self._procs)
        if dead:
            _abandon(self.sess, self.mod, self.params, self.effects)
            self.sess = self.mod = self.params = self.effects = None
            raise EngineError(f"disco worker process {dead[0]} has died; the session was ended. "
                              "Create a new Engine (or rerun the command)")

    def reset(self) -> None:
        self._ensure_alive()
        if self.kv == "static" and self.effects is not None:
            return  # the same cache buffers for the whole session: stale rows are masked
        self.effects = self.mod["_initialize_effect"]()

    #: greedy tokens per call to the workers (each call costs a round trip through the pipes)
    GREEDY_CHUNK = 32

    def can_greedy(self) -> bool:
        """Whether greedy tokens can come from the workers' GPUs (:meth:`greedy`)."""
        return getattr(self, "_graph_greedy", None) is not None and self.kv == "static" \
            and _has_greedy_next(self.mod)

    def greedy(self, token: int, pos: int, count: int):
        """``count`` greedy tokens, the first after appending ``token`` at ``pos``: every worker
        replays its graph with the argmax on its GPU, :data:`GREEDY_CHUNK` steps per call."""
        done = 0
        while done < count:
            n = min(self.GREEDY_CHUNK, count - done)
            self._ensure_alive()
            try:
                out = self._graph_greedy(self.mod, self.params, self.effects, int(token), int(pos) + done, n)
                toks = [int(t) for t in out.debug_get_from_remote(0)]
            except Exception as e:
                self.close()
                raise EngineError(f"a disco worker failed during decode: {_first_line(e)}; the "
                                  "session was shut down") from None
            yield from toks
            done += n
            token = toks[-1]

    def step(self, fn: str, ids: np.ndarray, total: int) -> np.ndarray:
        tvm = self.tvm
        self._ensure_alive()
        if fn == "decode" and self._graph_decode is not None:
            try:
                out = self._graph_decode(self.mod, self.params, self.effects, int(ids.reshape(-1)[0]), total - 1)
                return out.debug_get_from_remote(0).numpy().reshape(-1)
            except Exception as e:
                self.close()
                raise EngineError(f"a disco worker failed during decode: {_first_line(e)}; the "
                                  "session was shut down") from None
        try:
            dids = self.sess.empty(ids.shape, "int32")
            dids.debug_copy_from(0, ids)
            if self.kv == "static":  # the model broadcasts worker 0's position
                where = self.sess.empty((1,), "int32")
                where.debug_copy_from(0, np.array([total - ids.shape[1]], dtype=np.int32))
            else:
                where = tvm.runtime.ShapeTuple([total])
            out = self.mod[fn](dids, where, self.effects, self.params)
            self.effects = self._getitem(out, 1)
            logits = self._getitem(out, 0).debug_get_from_remote(0)
            return logits.numpy().reshape(-1)
        except Exception as e:
            self.close()
            raise EngineError(f"a disco worker failed during {fn}: {_first_line(e)}; the session "
                              "was shut down") from None

    def close(self) -> None:
        # Drop every reference instead of calling shutdown(): in TVM 0.27 a ProcessSession that
        # was shut down and is destroyed later aborts the process; destroying it shuts it down.
        if getattr(self, "_graph_decode", None) is not None and getattr(self, "sess", None) is not None:
            try:  # workers release their CUDA graphs first (see disco_worker._graph_release)
                self.sess.get_global_func("mlc_course.graph_release")()
                self.sess._sync_all()
            except Exception:  # noqa: BLE001  (a dead worker: nothing left to release)
                pass
        self.mod = self.params = self.effects = self._getitem = self._graph_decode = self._graph_greedy = None
        self.sess = None


def _worker_processes() -> list:
    """This process's live disco worker processes (ProcessSession workers 1..N-1)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "disco_worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _dead(procs: list) -> list:
    import psutil

    dead = []
    for p in procs:
        try:
            if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                dead.append(p.pid)
        except psutil.NoSuchProcess:
            dead.append(p.pid)
    return dead


# Sessions whose worker died: TVM 0.27 aborts when such a session is destroyed or sent a
# message (broken pipe), so they are kept, unused, and the process ends without running
# their destructors.
_ABANDONED: list = []


def _abandon(*objs) -> None:
    import atexit
    import os

    if not _ABANDONED:
        def _exit_without_destructors():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        atexit.register(_exit_without_destructors)
    _ABANDONED.append(objs)


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(e).__name__
    return msg[:300]


# ------------------------------------------------------------------------------- engine


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tok_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_per_s(self) -> float:
        n = max(len(self.output_ids) - 1, 0)  # the first token comes from prefill
        return n / self.decode_s if self.decode_s else 0.0


class Engine:
    """Load a model once, then generate from it (greedy or sampled), streaming tokens."""

    def __init__(self, model: str = "smollm2-135m", quantization: str | None = None, shards: int = 1,
                 device: str = "cpu", session: str = "process", quiet: bool = False,
                 kv: str | None = None, graph: bool | None = None):
        """``kv``/``graph``: the KV cache and CUDA-graph decoding; by default on GPUs a static
        cache with each worker's decode step replayed as a CUDA graph, on CPUs the dynamic
        cache (``nn.KVCache``; see :mod:`mlc_course.model`)."""
        from .compile import build_model
        from .model import export
        from .sharding import validate_shards
        from .weights import resolve_model

        self.log = (lambda m: None) if quiet else _log
        self.device = device
        self.scheme = quantization or default_quantization(device)
        get_scheme(self.scheme)
        self.shards = shards
        _check_device(device, shards)
        self.source = resolve_model(model)
        self.config: LlamaConfig = self.source.config
        self.model_name = model
        validate_shards(self.config, shards, self.scheme)
        self.tokenizer = self.source.tokenizer()
        self.kv = kv or ("static" if device == "cuda" else "dynamic")
        graph = device == "cuda" and self.kv == "static" if graph is None else graph
        self.kv_capacity = kv_capacity(self.config, self.kv)
        if device == "cuda":
            check_fits(self.config, self.scheme, shards, self.kv)
        lib = build_model(self.config, self.scheme, shards, device, quiet=quiet, kv=self.kv)
        params_dir = presharded_params(self.source, self.scheme, shards, self.log)
        names = [n for n, _ in export(self.config, self.scheme, shards)[1]]
        if shards == 1:
            self.runner = LocalRunner(lib, params_dir, names, device, kv=self.kv, graph=graph)
        else:
            self.runner = DiscoRunner(lib, params_dir, names, device, shards, session, kv=self.kv,
                                      graph=graph)
        self.reset()

    @classmethod
    def from_compiled(cls, lib_path: str | Path, config: LlamaConfig, arrays, quantization: str,
                      device: str = "cuda", tokenizer=None, quiet: bool = False,
                      kv: str = "dynamic", graph: bool = False) -> "Engine":
        """One worker over an already compiled library and its parameter arrays, given in
        the model's parameter order (an iterable: each array goes to the device as it comes;
        arrays already on the device are used as they are). Needs neither the compiler nor
        weight conversion: this is how ``scripts/gpu_run.py`` runs on GPU machines that have
        only TVM's runtime."""
        if device == "cuda":
            check_fits(config, quantization, 1, kv)
        runner = LocalRunner(Path(lib_path), None, [], device, arrays=arrays, kv=kv, graph=graph)
        return cls.from_runner(runner, config, quantization, device, tokenizer, quiet, kv)

    @classmethod
    def from_runner(cls, runner, config: LlamaConfig, quantization: str, device: str = "cuda",
                    tokenizer=None, quiet: bool = False, kv: str = "dynamic", shards: int = 1) -> "Engine":
        """An engine over a runner made by the caller (a :class:`LocalRunner` or a
        :class:`DiscoRunner`, e.g. with weights created on the workers)."""
        self = cls.__new__(cls)
        self.log = (lambda m: None) if quiet else _log
        self.device, self.scheme, self.shards = device, quantization, shards
        get_scheme(quantization)
        self.source, self.config, self.model_name = None, config, config.name
        self.tokenizer = tokenizer
        self.kv, self.kv_capacity = kv, kv_capacity(config, kv)
        self.runner = runner
        self.reset()
        return self

    # -- low level ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation: a fresh KV cache."""
        self.runner.reset()
        self.seq_len = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Append ``ids`` to the cache; logits of the last one."""
        ids = [int(i) for i in ids]
        if not ids:
            raise EngineError("empty prompt: give at least one token")
        self._check_room(len(ids))
        self.seq_len += len(ids)
        return self.runner.step("prefill", np.asarray([ids], dtype=np.int32), self.seq_len)

    def decode(self, token: int) -> np.ndarray:
        self._check_room(1)
        self.seq_len += 1
        return self.runner.step("decode", np.asarray([[int(token)]], dtype=np.int32), self.seq_len)

    def _check_room(self, n: int) -> None:
        limit = self.kv_capacity
        if self.seq_len + n > limit:
            what = ("the context window of" if limit == self.config.context_length
                    else "the static KV cache of")
            raise EngineError(f"{self.seq_len + n} tokens exceed {what} "
                              f"{self.config.name} ({limit} tokens); shorten the prompt or /reset")

    # -- generation -----------------------------------------------------------------
    def stream(self, prompt_ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, stop_ids: tuple[int, ...] | None = None,
               keep_cache: bool = False, result: GenerationResult | None = None) -> Iterator[int]:
        """Yield generated ids one by one; stops after a stop id (included) or at the limit."""
        if max_new_tokens < 1:
            raise EngineError("max_new_tokens must be at least 1")
        if len(prompt_ids) + (self.seq_len if keep_cache else 0) >= self.kv_capacity:
            raise EngineError(f"the prompt has {len(prompt_ids)} tokens, the context window of "
                              f"{self.config.name} is {self.kv_capacity}")
        if stop_ids is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            stop_ids = () if eos is None else (eos,)
        rng = np.random.default_rng(seed)
        res = result or GenerationResult(list(prompt_ids))
        if not keep_cache:
            self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids)
        res.prefill_s = time.perf_counter() - t0
        # greedy on a CUDA graph: the tokens come from the device, the host only reads them
        on_device = temperature == 0 and getattr(self.runner, "can_greedy", lambda: False)()
        tokens = None
        t1 = time.perf_counter()
        try:
            for i in range(max_new_tokens):
                if tokens is None:
                    tok = sample(logits, temperature, top_p, rng)
                else:
                    tok = next(tokens)
                    res.decode_s = time.perf_counter() - t1
                res.output_ids.append(tok)
                yield tok
                if tok in stop_ids or i + 1 == max_new_tokens or self.seq_len >= self.kv_capacity:
                    break
                if on_device:
                    if tokens is None:
                        left = min(max_new_tokens - i - 1, self.kv_capacity - self.seq_len)
                        tokens = self.runner.greedy(tok, self.seq_len, left)
                    self._check_room(1)
                    self.seq_len += 1
                else:
                    logits = self.decode(tok)
                    res.decode_s = time.perf_counter() - t1
        finally:
            if tokens is not None:
                tokens.close()
        # the last yielded token's decode is not timed: decode_s covers len(output)-1 steps

    def generate(self, prompt_ids: list[int], **kw) -> GenerationResult:
        res = GenerationResult(list(prompt_ids))
        for _ in self.stream(prompt_ids, result=res, **kw):
            pass
        if self.tokenizer is not None:
            res.text = self.tokenizer.decode(res.output_ids)
        return res

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise EngineError(f"{self.model_name} has no tokenizer; pass token ids instead")
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_fits(config: LlamaConfig, scheme: str, shards: int, kv: str = "dynamic") -> None:
    """Raise a clear error when one worker's weights and KV cache do not fit in the free
    memory of its GPU (before anything is uploaded)."""
    from .gpu import gpu_memory
    from .spmd import memory_per_device

    need = memory_per_device(config, scheme, shards, context=kv_capacity(config, kv))["total"]
    need += 512 * 2**20  # activations, workspace, the CUDA context's own allocations
    for dev in range(shards):
        mem = gpu_memory(dev)
        if mem is None:
            return  # no way to ask here: let the upload say it
        free, total = mem
        if need > free:
            raise EngineError(
                f"{config.name} in {scheme} with {shards} shard(s) needs {need / 2**30:.1f} GiB per GPU "
                f"(weights + KV cache + workspace); GPU {dev} has {free / 2**30:.1f} GiB free of "
                f"{total / 2**30:.1f} GiB. Use more shards, a 4-bit scheme, or a larger GPU")


def kv_capacity(config: LlamaConfig, kv: str) -> int:
    """Tokens the KV cache holds: the context window, or the static cache's rows."""
    from .config import STATIC_MAX_LEN

    return min(config.context_length, STATIC_MAX_LEN) if kv == "static" else config.context_length


def _check_device(device: str, shards: int) -> None:
    if device == "cpu":
        return
    if device != "cuda":
        raise EngineError(f"unknown device {device!r}: use cpu or cuda")
    from .gpu import cuda_device_count

    n = cuda_device_count()
    if n == 0:
        raise EngineError("--device cuda: no CUDA GPU is visible here (no driver or no device); "
                          "use --device cpu, or run on a GPU machine (see README, 'GPU runs')")
    if shards > n:
        raise EngineError(f"--shards {shards} needs {shards} GPUs, this machine has {n}")
