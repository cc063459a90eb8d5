"""Collective communication libraries (CCLs) for TVM's disco runtime, built on demand.

Disco runs one program on N workers. When that program calls a collective, e.g. the builtin
``runtime.disco.allreduce`` that relax's ``ccl.allreduce`` lowers to, the builtin looks up the
global function ``runtime.disco.<ccl>.allreduce``, where ``<ccl>`` is the name the worker was
initialised with. A CCL is therefore just a set of global functions with those names:
``init_ccl`` (run by the controller), ``init_ccl_per_worker``, ``allreduce``, ``allgather``,
``broadcast_from_worker0``, ``scatter_from_worker0``, ``gather_to_worker0``,
``recv_from_worker0``, ``send_to_worker``, ``recv_from_worker``, ``send_to_next_group``,
``recv_from_prev_group`` and ``sync_worker``.

TVM's own CCLs are for GPUs only (NCCL/RCCL). This package builds a CPU one,
``cpu_shm`` (``cpu_shm.cc``): the workers exchange data through one POSIX shared-memory segment
and synchronise with futex barriers, so it serves both a :class:`ThreadedSession` (workers are
threads) and a :class:`ProcessSession` (worker 0 is a thread of the controller, the others are
processes). Next to it sits an NCCL one for CUDA GPUs, ``mlc_nccl`` (``nccl.cc``, built and
loaded the same way; :func:`init_nccl_ccl`), because the apache-tvm 0.27 wheel is built
without NCCL. It opens libnccl and libcudart with dlopen when the session is initialised, so it
builds with g++ alone and loads on machines without a GPU (CI checks its registrations).

Small sum all-reduces on GPUs take a path of the plugin's own, the *one-shot* all-reduce:
in tensor-parallel decoding at batch 1 each layer all-reduces a few KB twice, and NCCL spends
~7-10 µs on each such call even inside a CUDA graph, most of a 70B model's per-token
communication. One kernel per call instead writes the rank's vector straight into every
peer's buffer over NVLink, raises a flag there, waits for the peers' flags and sums locally
(float32, rank order 0..N-1: every rank gets bitwise the same result). It is used for float16 /
bfloat16 / float32 sums of at most 256 KiB (``MLC_NCCL_ONESHOT_MAX_BYTES``) when 2..8 workers
are GPUs of one host with peer access, and it is CUDA-graph safe (its state lives on the GPU).
Its kernel is compiled at init through ``tvm_callback_cuda_compile`` (the callback TVM uses for
its own kernels), so the plugin still builds with g++ alone; anything that keeps it from
starting (``MLC_NCCL_ONESHOT=0``, no callback, no peer access, ...) leaves every all-reduce to
NCCL, and :func:`allreduce_path` says which path is active and why. A wait for a peer gives up
after ``MLC_NCCL_ONESHOT_TIMEOUT_S`` (30 s) and the worker's next all-reduce or sync reports it
instead of hanging. ``MLC_NCCL_ONESHOT_PDL=1`` launches the kernel with programmatic
dependent launch on sm_90+ (``cuLaunchKernelEx``, like the course's other decode kernels: it
may start while the kernel before it still runs, and waits for it in ``griddepcontrol.wait``);
off by default, because it measured slower in decode (2x H200, Llama-2-70B at TP=2: 111.0
tok/s with it, 116.0 without), and :func:`allreduce_path` says which (``pdl``). See nccl.cc ("One-shot
all-reduce") for the protocol.

Typical use::

    from mlc_course.ccl import disco_session, init_cpu_ccl
    ds = disco_session()                      # tvm.runtime.disco.session, FFI fixed up
    sess = ds.ProcessSession(2)
    init_cpu_ccl(sess)                        # build (cached), load everywhere, init "cpu_shm"
    # ... now runtime.disco.allreduce & co. work on CPU tensors of the workers

How the pieces fit:

* :func:`build_cpu_ccl` compiles ``cpu_shm.cc`` with g++ against the headers of the installed
  wheels (``tvm/include``, ``tvm_ffi/include``, plus ``shim/`` for two headers the wheel lacks)
  into ``<cache>/ccl/<hash>/libmlc_ccl_cpu.so``. The hash covers the sources, the TVM and
  tvm-ffi versions, the compiler and the flags, so a change rebuilds and nothing else does.
* :func:`init_cpu_ccl` loads the library into the controller (for ``init_ccl``) and into every
  worker through disco itself (``runtime.disco.load_vm_module``, which dlopens a shared
  library and keeps it loaded; the library's static initialiser registers the functions), then
  calls ``runtime.disco.SessionInitCCL(session, "cpu_shm", ShapeTuple(device_ids))``, the FFI
  function behind ``Session.init_ccl`` (whose Python wrapper only accepts nccl/rccl).

Numerics: sums are taken in a fixed order (worker 0, 1, ..., N-1) by one worker per element, so
every worker receives bitwise the same result. float16 and bfloat16 are accumulated in float32
and rounded once to the storage type (round to nearest even); the result can therefore differ
from a float16 sum rounded at every step (usually it is the more accurate one).

Failure: a collective never waits forever. A waiting worker notices within ~50 ms when a peer
*process* has died, and gives up after ``timeout_s`` when a peer is alive but does not arrive
(hung, or busy elsewhere). It then marks the communicator aborted (the other workers
fail fast too) and throws a TVM error naming the worker, the op and the reason. In TVM 0.27 the
disco worker loop does not catch errors, so an error in a worker *thread* (all workers of a
ThreadedSession, worker 0 of a ProcessSession) aborts the whole process after printing the
message, and a worker process exits with a traceback; a ProcessSession whose worker died cannot
be shut down cleanly either (TVM aborts in its destructor when a pipe is broken). The CCL's
job is to turn a silent hang into a quick, explained failure; it cannot make TVM recover.

TVM 0.27 session pitfall (not specific to this CCL): do not call ``shutdown()`` on a
ProcessSession and then let the object live on: when it is destroyed after its workers have
exited, its destructor shuts down again, writes to the closed pipes and aborts the process
("Write Error: Broken pipe"). Drop the last reference instead; that shuts down and reaps the
workers. (ThreadedSession.shutdown() is harmless.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CCL_NAME", "LIB_NAME", "CCLBuildError", "CCLUnavailableError", "CpuCCL",
    "disco_session", "cache_dir", "build_cpu_ccl", "load_cpu_ccl", "init_cpu_ccl", "init_ccl",
    "benchmark_allreduce", "REDUCE_KINDS",
    "NCCL_CCL_NAME", "NCCL_LIB_NAME", "NcclCCL", "nccl_build_info", "build_nccl_ccl",
    "load_nccl_ccl", "init_nccl_ccl", "find_nccl_library", "find_cudart_library",
    "allreduce_path", "set_allreduce_path", "set_oneshot_pdl", "oneshot_source",
]

#: Name under which the CPU CCL registers (``runtime.disco.cpu_shm.*``).
CCL_NAME = "cpu_shm"
#: File name of the built library.
LIB_NAME = "libmlc_ccl_cpu.so"
#: ``ReduceKind`` codes that ``runtime.disco.allreduce`` expects, wrapped in a 1-element Shape.
REDUCE_KINDS = {"sum": 0, "prod": 1, "min": 2, "max": 3, "avg": 4}

_HERE = Path(__file__).resolve().parent
_CPU_SOURCES = ("cpu_shm.cc", "shim/tvm/support/io.h", "shim/tvm/support/serializer.h")
_CXXFLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall")

# Defaults of the knobs; environment variables override them, arguments override both.
_DEFAULTS = {
    "timeout_s": ("MLC_CCL_TIMEOUT_S", 10.0),
    "slot_bytes": ("MLC_CCL_SLOT_BYTES", 1 << 20),
    "p2p_bytes": ("MLC_CCL_P2P_BYTES", 256 << 10),
    "spin_us": ("MLC_CCL_SPIN_US", 20),
}

_LOADED: dict[str, object] = {}  # the library loaded here -> its module; never unloaded


class CCLBuildError(RuntimeError):
    """The CCL library could not be compiled (no compiler, or the compiler failed)."""


class CCLUnavailableError(NotImplementedError):
    """This machine cannot run the requested CCL (no GPU for NCCL, no libnccl, ...).

    Raised before any worker is touched: a failure inside a disco worker aborts its process.
    """


# ---------------------------------------------------------------------------------------------
# TVM plumbing
# ---------------------------------------------------------------------------------------------

def disco_session():
    """Return the module ``tvm.runtime.disco.session``, usable.

    In apache-tvm 0.27 ``import tvm`` imports ``tvm.runtime.disco`` before it loads
    ``libtvm_runtime_extra`` (where the disco C++ code lives): ``tvm.runtime.disco`` ends up
    None and ``tvm.runtime.disco._ffi_api`` half-initialised (no ``SessionThreaded`` ...).
    This re-binds the FFI functions and imports the session module.
    """
    import tvm  # noqa: F401  (loads libtvm_runtime_extra)
    import tvm_ffi

    api = sys.modules.get("tvm.runtime.disco._ffi_api")
    if api is not None and not hasattr(api, "SessionThreaded"):
        tvm_ffi.init_ffi_api("runtime.disco", api.__name__)
    import tvm.runtime.disco.session as session_mod

    # Runtime-only TVM (TVM_USE_RUNTIME_LIB=1, as on the lent GPU machines) loads
    # libtvm_runtime_extra after `import tvm` has imported this module: its
    # @register_object("runtime.disco.DRef") & co. were skipped (type unknown then), and DRefs
    # come back as bare objects without debug_copy_from/debug_get_from_remote. Register now.
    for key, cls in (("runtime.disco.DRef", session_mod.DRef),
                     ("runtime.disco.Session", session_mod.Session),
                     ("runtime.disco.ThreadedSession", session_mod.ThreadedSession),
                     ("runtime.disco.ProcessSession", session_mod.ProcessSession),
                     ("runtime.disco.SocketSession", session_mod.SocketSession)):
        if "__tvm_ffi_type_info__" not in cls.__dict__:
            try:
                tvm_ffi.register_object(key)(cls)
            except Exception:  # noqa: BLE001  (type still unknown: nothing to fix)
                pass
    return session_mod


def _ffi_api():
    disco_session()
    return sys.modules["tvm.runtime.disco._ffi_api"]


def _toolchain() -> dict:
    """Include and library directories of the installed tvm and tvm-ffi wheels."""
    import tvm
    import tvm.libinfo
    import tvm_ffi
    import tvm_ffi.libinfo

    tvm_lib = Path(tvm.libinfo.find_libtvm_runtime()).resolve().parent
    ffi_lib = Path(tvm_ffi.libinfo.find_libtvm_ffi()).resolve().parent
    return {
        "tvm_version": tvm.__version__,
        "ffi_version": getattr(tvm_ffi, "__version__", "?"),
        "includes": [
            str(_HERE / "shim"),  # first: supplies tvm/support/{io,serializer}.h
            str(Path(tvm.libinfo.find_include_path()).resolve()),
            *dict.fromkeys([  # (the same folder in current wheels)
                str(Path(tvm_ffi.libinfo.find_include_path()).resolve()),
                str(Path(tvm_ffi.libinfo.find_dlpack_include_path()).resolve()),
            ]),
        ],
        "libdirs": [str(tvm_lib), str(ffi_lib)],
        "libs": ["tvm_runtime_extra", "tvm_runtime", "tvm_ffi"],
    }


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$MLC_COURSE_CACHE/ccl`` if that variable is set, else ``~/.cache/mlc_course/ccl``."""
    root = os.environ.get("MLC_COURSE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "mlc_course"
    return base / "ccl"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise CCLBuildError(
            f"cannot build the {CCL_NAME} CCL: C++ compiler {cxx!r} not found on PATH. "
            "Install g++ (Debian/Ubuntu: `apt-get install g++`; conda: `conda install gxx`) "
            "or point $CXX at a C++17 compiler."
        )
    return path


def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def _summarize_stderr(stderr: str, max_lines: int = 25) -> str:
    """The first compiler errors (with a little context), not the whole wall of text."""
    lines = stderr.splitlines()
    picked: list[str] = []
    for i, line in enumerate(lines):
        if re.search(r"\berror\b|fatal error|undefined reference|cannot find", line):
            picked.extend(lines[max(0, i - 1): i + 3])
        if len(picked) >= max_lines:
            break
    if not picked:
        picked = lines[-max_lines:]
    out = []
    for line in picked:  # drop adjacent duplicates from overlapping windows
        if not out or out[-1] != line:
            out.append(line)
    return "\n".join(out[:max_lines])


def _build_command(cxx: str, tc: dict, src: Path, out: Path) -> list[str]:
    cmd = [cxx, *_CXXFLAGS, f"-DMLC_CCL_NAME=\"{CCL_NAME}\""]
    cmd += [f"-I{tc['includes'][0]}"]
    for inc in tc["includes"][1:]:
        cmd += ["-isystem", inc]  # keep TVM's own header warnings quiet
    cmd += [str(src), "-o", str(out)]
    for d in tc["libdirs"]:
        cmd += [f"-L{d}", f"-Wl,-rpath,{d}"]
    cmd += [f"-l{lib}" for lib in tc["libs"]]
    cmd += ["-Wl,-z,defs", "-lrt", "-lpthread"]
    return cmd


def _build_key(cxx: str, tc: dict) -> str:
    h = hashlib.sha256()
    for rel in _CPU_SOURCES:
        h.update(rel.encode() + b"\0" + (_HERE / rel).read_bytes() + b"\0")
    for part in (tc["tvm_version"], tc["ffi_version"], _compiler_id(cxx), " ".join(_CXXFLAGS),
                 CCL_NAME, *tc["includes"][1:], *tc["libdirs"], sys.platform, os.uname().machine):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()[:16]


def _locked_build(out: Path, name: str, make_cmd, force: bool, verbose: bool) -> Path:
    """Run ``make_cmd(tmp_path)`` to compile ``out`` unless it is cached.

    Concurrent callers (several processes, pytest-xdist) are serialised with a file lock, and
    the library is written under a temporary name and renamed, so nobody loads half a file.
    A failed compile raises :class:`CCLBuildError` with the command and the first errors.
    """
    out_dir = out.parent
    if out.exists() and not force:
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if out.exists() and not force:
                return out
            fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
            os.close(fd)
            cmd = make_cmd(Path(tmp))
            if verbose:
                print("[mlc_course.ccl] building:", " ".join(cmd), file=sys.stderr)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                Path(tmp).unlink(missing_ok=True)
                raise CCLBuildError(
                    f"building the {name} CCL failed (exit {proc.returncode}).\n"
                    f"command: {' '.join(cmd)}\n"
                    f"compiler errors (summary):\n{_summarize_stderr(proc.stderr)}")
            if verbose and proc.stderr.strip():
                print(proc.stderr, file=sys.stderr)
            os.replace(tmp, out)
            (out_dir / "build.txt").write_text(" ".join(cmd) + "\n")
            if verbose:
                print(f"[mlc_course.ccl] built {out} in {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


def build_cpu_ccl(verbose: bool = False, force: bool = False) -> Path:
    """Compile the CPU CCL if it is not in the cache yet; return the path of the library.

    Raises :class:`CCLBuildError` when there is no compiler or the compilation fails (see
    :func:`_locked_build`).
    """
    cxx = _compiler()
    tc = _toolchain()
    out = cache_dir() / _build_key(cxx, tc) / LIB_NAME
    return _locked_build(out, CCL_NAME, lambda tmp: _build_command(cxx, tc, _HERE / "cpu_shm.cc", tmp),
                         force, verbose)



# ---------------------------------------------------------------------------------------------
# Loading and initialising
# ---------------------------------------------------------------------------------------------

def load_cpu_ccl(verbose: bool = False) -> Path:
    """Build (if needed) and load the CPU CCL into *this* process; return its path.

    Loading registers ``runtime.disco.cpu_shm.*`` here. That is all a ThreadedSession needs;
    worker processes load it through :func:`init_cpu_ccl`. A process can hold only one build
    (a second one would register the same global names, which TVM refuses by aborting): if
    the sources changed after a build was loaded, the loaded one keeps being used, with a
    warning; restart the process (kernel) to pick up the new one.
    """
    path = build_cpu_ccl(verbose=verbose)
    if _LOADED:
        loaded = Path(next(iter(_LOADED)))
        if loaded != path:
            warnings.warn(f"{CCL_NAME}: the sources changed since {loaded} was loaded into this "
                          f"process; still using it (restart the process to use {path})",
                          stacklevel=2)
        return loaded
    import tvm

    _LOADED[str(path)] = tvm.runtime.load_module(str(path))
    return path


def _knob(name: str, value):
    """Argument if given, else the environment variable, else the default."""
    env, default = _DEFAULTS[name]
    if value is None:
        raw = os.environ.get(env, "").strip()
        value = float(raw) if raw else default
    return value


@dataclass(frozen=True)
class CpuCCL:
    """What :func:`init_cpu_ccl` set up (for logs and notebooks)."""

    name: str            # CCL name the workers now use ("cpu_shm")
    library: Path        # the shared library loaded in every worker
    num_workers: int
    segment: str         # name the shared-memory segment had (already unlinked)
    timeout_s: float
    slot_bytes: int      # bytes per worker per buffer: larger tensors go in chunks of this


def init_cpu_ccl(session, num_workers: int | None = None, *, timeout_s: float | None = None,
                 slot_bytes: int | None = None, p2p_bytes: int | None = None,
                 spin_us: int | None = None, verbose: bool = False) -> CpuCCL:
    """Load the CPU CCL into every worker of ``session`` and make it the session's CCL.

    Parameters
    ----------
    session : tvm.runtime.disco.Session
        A ThreadedSession or ProcessSession (all workers on this machine).
    num_workers : int, optional
        Checked against ``session.num_workers`` when given.
    timeout_s : float
        How long a worker waits for its peers inside one collective before it fails
        (default 10 s, or $MLC_CCL_TIMEOUT_S). A dead peer process is noticed in ~50 ms anyway.
    slot_bytes : int
        Shared-memory bytes per worker and buffer (default 1 MiB, $MLC_CCL_SLOT_BYTES);
        the segment holds 2 * num_workers slots, plus as much again per worker group.
    p2p_bytes : int
        Mailbox bytes per ordered worker pair for send/recv (default 256 KiB).
    spin_us : int
        How long a waiting worker spins before it sleeps on a futex (default 20 us).
    """
    n = int(session.num_workers)
    if num_workers is not None and int(num_workers) != n:
        raise ValueError(f"session has {n} workers, not {num_workers}")
    import tvm
    from tvm_ffi import Shape

    path = load_cpu_ccl(verbose=verbose)  # controller: init_ccl runs here
    # Every worker (threads share the controller's registry, processes need their own copy)
    # dlopens the library; load_vm_module caches it for the life of the process.
    session.get_global_func("runtime.disco.load_vm_module")(str(path), tvm.cpu(0))
    timeout = float(_knob("timeout_s", timeout_s))
    slot = int(_knob("slot_bytes", slot_bytes))
    p2p = int(_knob("p2p_bytes", p2p_bytes))
    spin = int(_knob("spin_us", spin_us))
    if timeout <= 0 or slot <= 0 or p2p <= 0 or spin < 0:
        raise ValueError("timeout_s, slot_bytes and p2p_bytes must be > 0, spin_us >= 0")
    tvm.get_global_func(f"runtime.disco.{CCL_NAME}.configure")(
        max(1, int(timeout * 1000)), slot, p2p, spin)
    _ffi_api().SessionInitCCL(session, CCL_NAME, Shape([0] * n))
    segment = str(tvm.get_global_func(f"runtime.disco.{CCL_NAME}.last_segment")())
    slot_rounded = max(4096, (slot + 63) // 64 * 64)
    return CpuCCL(CCL_NAME, path, n, segment, timeout, slot_rounded)


def init_ccl(session, num_workers: int | None = None, device="cpu", **kwargs):
    """Give ``session`` the collective library that fits ``device`` ("cpu"/"cuda" or a Device).

    CPU: :func:`init_cpu_ccl` (``kwargs`` go to it). CUDA: the course's NCCL plugin,
    :func:`init_nccl_ccl` (``kwargs`` go to it); ``ccl="nccl"`` asks for TVM's own NCCL CCL
    instead, which only TVM builds with NCCL have (the apache-tvm 0.27 wheel has none).
    """
    kind = device if isinstance(device, str) else {1: "cpu", 2: "cuda"}.get(
        int(getattr(device, "dlpack_device_type", lambda: device.device_type)()), str(device))
    kind = kind.split(":")[0].lower()
    n = int(session.num_workers)
    if num_workers is not None and int(num_workers) != n:
        raise ValueError(f"session has {n} workers, not {num_workers}")
    if kind in ("cpu", "llvm"):
        return init_cpu_ccl(session, n, **kwargs)
    if kind in ("cuda", "gpu", "nvidia"):
        if kwargs.pop("ccl", NCCL_CCL_NAME) == "nccl":
            import tvm

            if tvm.get_global_func("runtime.disco.nccl.init_ccl", allow_missing=True) is None:
                raise NotImplementedError(
                    "TVM's own NCCL CCL is missing (the apache-tvm wheel is built without NCCL): "
                    f"use the course's plugin, ccl={NCCL_CCL_NAME!r} (the default)")
            session.init_ccl("nccl", *range(n))
            return "nccl"
        return init_nccl_ccl(session, n, **kwargs)
    raise ValueError(f"no collective library for device {device!r}")


def benchmark_allreduce(session, nbytes: int, dtype: str = "float32", iters: int = 100,
                        warmup: int = 5, ccl: str = CCL_NAME) -> dict:
    """Time a sum all-reduce of ``nbytes`` on an initialised session.

    Returns ``{"end_to_end_us": ..., "in_worker_us": ...}``: the first drives each
    all-reduce from the controller through ``runtime.disco.allreduce`` (what a compiled model
    pays, dispatch included, one sync at the end); the second loops inside the workers
    (``debug_bench_allreduce``), i.e. the CCL alone. ``ccl`` names the library the session
    was initialised with (``cpu_shm``, or ``mlc_nccl``: then the buffer lives on the workers'
    GPUs and the in-worker time comes from CUDA events).
    """
    import numpy as np
    from tvm_ffi import Shape

    itemsize = np.dtype(dtype).itemsize
    n = max(1, nbytes // itemsize)
    buf = session.empty((n,), dtype)
    zeros = np.zeros(n, dtype=dtype)  # zeros stay zeros: no inf/denormal slow paths
    for w in range(session.num_workers):
        buf.debug_copy_from(w, zeros)
    allreduce = session.get_global_func("runtime.disco.allreduce")
    kind = Shape([REDUCE_KINDS["sum"]])
    for _ in range(warmup):
        allreduce(buf, kind, False, buf)
    session._sync_worker(0)
    t0 = time.perf_counter()
    for _ in range(iters):
        allreduce(buf, kind, False, buf)
    session._sync_worker(0)
    end_to_end = (time.perf_counter() - t0) / iters
    bench = session.get_global_func(f"runtime.disco.{ccl}.debug_bench_allreduce")
    in_worker = float(bench(buf, iters).debug_get_from_remote(0))
    return {"end_to_end_us": end_to_end * 1e6, "in_worker_us": in_worker * 1e6}


# ---------------------------------------------------------------------------------------------
# The NCCL plugin (CUDA GPUs): nccl.cc, built and loaded the same way as the CPU one
# ---------------------------------------------------------------------------------------------

#: Name under which the NCCL plugin registers (``runtime.disco.mlc_nccl.*``).
NCCL_CCL_NAME = "mlc_nccl"
#: File name of the built NCCL plugin.
NCCL_LIB_NAME = "libmlc_ccl_nccl.so"

_NCCL_SOURCES = ("nccl.cc", "shim/tvm/support/io.h", "shim/tvm/support/serializer.h")
_LOADED_NCCL: dict[str, object] = {}  # like _LOADED, for the NCCL plugin


def _site_dirs() -> list[Path]:
    """site-packages folders of this interpreter (where pip puts nvidia-* wheels)."""
    import site

    dirs = []
    for d in [*sys.path, *getattr(site, "getsitepackages", lambda: [])(),
              getattr(site, "getusersitepackages", lambda: "")()]:
        if d and (d.endswith("site-packages") or d.endswith("dist-packages")):
            dirs.append(Path(d))
    return list(dict.fromkeys(dirs))


def _first_existing(paths) -> Path | None:
    for p in paths:
        if p and Path(p).is_file():
            return Path(p).resolve()
    return None


def _cuda_roots() -> list[Path]:
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    roots += ["/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")), reverse=True)]
    return [Path(r) for r in dict.fromkeys(r for r in roots if r)]


def nccl_build_info() -> dict:
    """Where the NCCL plugin's build finds ``nccl.h`` and ``cuda_runtime_api.h`` (or None).

    ``nccl.h``: ``$MLC_NCCL_INCLUDE``, ``$NCCL_HOME/include``, an installed ``nvidia-nccl-cu*``
    wheel (``site-packages/nvidia/nccl/include``), the CUDA folders, ``/usr/include``.
    ``cuda_runtime_api.h``: ``$CUDA_HOME`` & co., the folder above ``nvcc``, ``/usr/local/cuda*``,
    the ``nvidia-cuda-runtime`` wheels. The headers only serve to check the plugin's own
    declarations at compile time: without them it still builds (see nccl.cc, "Linking").
    """
    sites = _site_dirs()
    cuda_incs = [r / "include" for r in _cuda_roots()] + [r / "targets/x86_64-linux/include"
                                                          for r in _cuda_roots()]
    nccl_dirs = [os.environ.get("MLC_NCCL_INCLUDE"),
                 os.environ.get("NCCL_HOME") and str(Path(os.environ["NCCL_HOME"]) / "include"),
                 *[str(s / "nvidia/nccl/include") for s in sites],
                 *map(str, cuda_incs), "/usr/include"]
    cuda_dirs = [*map(str, cuda_incs),
                 *[str(s / sub) for s in sites
                   for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include")]]
    nccl_h = _first_existing(Path(d) / "nccl.h" for d in nccl_dirs if d)
    cuda_h = _first_existing(Path(d) / "cuda_runtime_api.h" for d in cuda_dirs if d)
    return {"nccl_include": str(nccl_h.parent) if nccl_h else None,
            "cuda_include": str(cuda_h.parent) if cuda_h else None}


def find_nccl_library() -> str:
    """Path of ``libnccl.so.2`` to hand to the plugin, or "" to let dlopen search.

    ``$MLC_NCCL_LIBRARY``, else an ``nvidia-nccl-cu*`` wheel of this interpreter (PyTorch's
    CUDA wheels depend on one), else the CUDA folders. The plugin tries the library the process
    already has loaded, this path, then plain ``libnccl.so.2`` ($LD_LIBRARY_PATH, ldconfig).
    """
    env = os.environ.get("MLC_NCCL_LIBRARY")
    if env:
        return env
    cands = [s / "nvidia/nccl/lib/libnccl.so.2" for s in _site_dirs()]
    cands += [r / d / "libnccl.so.2" for r in _cuda_roots() for d in ("lib64", "lib")]
    found = _first_existing(cands)
    return str(found) if found else ""


def find_cudart_library() -> str:
    """Path of ``libcudart.so.13`` (CUDA 13, as TVM 0.27's CUDA runtime) or ""."""
    env = os.environ.get("MLC_CUDART_LIBRARY")
    if env:
        return env
    cands = [s / sub / "libcudart.so.13" for s in _site_dirs()
             for sub in ("nvidia/cu13/lib", "nvidia/cuda_runtime/lib")]
    cands += [r / d / "libcudart.so.13" for r in _cuda_roots() for d in ("lib64", "lib")]
    found = _first_existing(cands)
    return str(found) if found else ""


def _nccl_build_key(cxx: str, tc: dict, flags: list[str], headers: dict) -> str:
    h = hashlib.sha256()
    for rel in _NCCL_SOURCES:
        h.update(rel.encode() + b"\0" + (_HERE / rel).read_bytes() + b"\0")
    for inc, name in ((headers.get("nccl_include"), "nccl.h"),
                      (headers.get("cuda_include"), "cuda_runtime_api.h")):
        if inc:
            h.update((Path(inc) / name).read_bytes())
    for part in (tc["tvm_version"], tc["ffi_version"], _compiler_id(cxx), " ".join(flags),
                 NCCL_CCL_NAME, *tc["includes"][1:], *tc["libdirs"], sys.platform,
                 os.uname().machine):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()[:16]


def build_nccl_ccl(verbose: bool = False, force: bool = False, headers: str | bool = "auto"
                   ) -> Path:
    """Compile the NCCL plugin if it is not in the cache yet; return the path of the library.

    It needs g++ and the tvm/tvm-ffi wheels only: libnccl and libcudart are opened at run time.
    ``headers``: "auto" compiles against the real ``nccl.h``/``cuda_runtime_api.h`` when
    :func:`nccl_build_info` finds both (the compiler then checks every NCCL/CUDA signature the
    plugin uses), True requires them (:class:`CCLBuildError` if absent), False never uses them.
    Cached under ``<cache>/ccl/<hash>/libmlc_ccl_nccl.so`` like :func:`build_cpu_ccl`.
    """
    cxx = _compiler()
    tc = _toolchain()
    info = nccl_build_info() if headers else {"nccl_include": None, "cuda_include": None}
    have = bool(info["nccl_include"] and info["cuda_include"])
    if headers is True and not have:
        raise CCLBuildError(
            f"building the {NCCL_CCL_NAME} CCL with headers: nccl.h found in "
            f"{info['nccl_include']}, cuda_runtime_api.h in {info['cuda_include']}. Install "
            "nvidia-nccl-cu13 (pip) and the CUDA toolkit, or set $MLC_NCCL_INCLUDE / $CUDA_HOME")
    if not have:
        info = {"nccl_include": None, "cuda_include": None}
    flags = [*_CXXFLAGS, f"-DMLC_CCL_NAME=\"{NCCL_CCL_NAME}\""]
    if have:
        flags += ["-DMLC_NCCL_WITH_HEADERS"]
    out = cache_dir() / _nccl_build_key(cxx, tc, flags, info) / NCCL_LIB_NAME

    def make_cmd(tmp: Path) -> list[str]:
        cmd = [cxx, *flags, f"-I{tc['includes'][0]}"]
        for inc in [*tc["includes"][1:], info["nccl_include"], info["cuda_include"]]:
            if inc:
                cmd += ["-isystem", inc]
        cmd += [str(_HERE / "nccl.cc"), "-o", str(tmp)]
        for d in tc["libdirs"]:
            cmd += [f"-L{d}", f"-Wl,-rpath,{d}"]
        cmd += [f"-l{lib}" for lib in tc["libs"]]
        return cmd + ["-Wl,-z,defs", "-ldl", "-lpthread"]

    return _locked_build(out, NCCL_CCL_NAME, make_cmd, force, verbose)


def load_nccl_ccl(verbose: bool = False) -> Path:
    """Build (if needed) and load the NCCL plugin into *this* process; return its path.

    ``$MLC_NCCL_CCL_LIBRARY`` names a prebuilt plugin to use instead of building one (a GPU
    machine that has no TVM headers or compiler, e.g. a runtime-only TVM). Loading needs
    neither a GPU nor NCCL: they are opened by ``init_ccl``. One build per process, as for
    :func:`load_cpu_ccl`.
    """
    pre = os.environ.get("MLC_NCCL_CCL_LIBRARY")
    path = Path(pre).resolve() if pre else build_nccl_ccl(verbose=verbose)
    if not path.is_file():
        raise CCLBuildError(f"$MLC_NCCL_CCL_LIBRARY={pre} is not a file")
    if _LOADED_NCCL:
        loaded = Path(next(iter(_LOADED_NCCL)))
        if loaded != path:
            warnings.warn(f"{NCCL_CCL_NAME}: {loaded} is already loaded into this process; "
                          f"still using it (restart the process to use {path})", stacklevel=2)
        return loaded
    import tvm

    _LOADED_NCCL[str(path)] = tvm.runtime.load_module(str(path))
    return path


@dataclass(frozen=True)
class NcclCCL:
    """What :func:`init_nccl_ccl` set up (for logs and notebooks)."""

    name: str               # CCL name the workers now use ("mlc_nccl")
    library: Path           # the plugin loaded in every worker
    num_workers: int
    device_ids: tuple       # worker i uses cuda:device_ids[i]
    libraries: str          # "nccl=<version> <path>; cudart=<version> <path>" (controller's)
    # worker 0's all-reduce path after init (:func:`allreduce_path`): "path" is "oneshot" or
    # "nccl", "reason" says why; the same on every worker
    allreduce: dict = field(default_factory=dict)


def init_nccl_ccl(session, num_workers: int | None = None, *, device_ids=None,
                  disable_nvls: bool = True, oneshot: bool | None = None,
                  oneshot_max_bytes: int | None = None, oneshot_timeout_s: float | None = None,
                  oneshot_pdl: bool | None = None, verbose: bool = False) -> NcclCCL:
    """Load the NCCL plugin into every worker of ``session`` and make it the session's CCL.

    The controller creates one ``ncclUniqueId`` and every worker calls ``cudaSetDevice``
    (``device_ids[worker]``, default: its worker id) and ``ncclCommInitRank``; see nccl.cc.
    ``disable_nvls``: set ``NCCL_NVLS_ENABLE=0`` in the workers when the variable is unset
    (NVLink SHARP multicast off; shared machines may require it). Environment variables that
    NCCL reads (NCCL_DEBUG=INFO, ...) must be set before the workers start.

    The one-shot all-reduce (module docstring) is set up here too; each argument left None
    comes from its environment variable, read by this (the controller) process and handed to
    every worker, so all workers agree: ``oneshot`` (``MLC_NCCL_ONESHOT``, default on),
    ``oneshot_max_bytes`` (``MLC_NCCL_ONESHOT_MAX_BYTES``, 262144: the largest message it
    takes, and the size of its buffers, 2 x workers x this per GPU), ``oneshot_timeout_s``
    (``MLC_NCCL_ONESHOT_TIMEOUT_S``, 30: how long a kernel waits for a peer before it gives up
    and the worker reports an error), ``oneshot_pdl`` (``MLC_NCCL_ONESHOT_PDL``, default off:
    programmatic dependent launch of its kernel on sm_90+; slower in decode when measured). The result's ``allreduce`` says what
    was set up.
    Compiling its kernel needs ``tvm_callback_cuda_compile`` in this process (TVM's own, or the
    course's nvcc one on GPU machines); without it all-reduces go to NCCL, and say so.
    """
    n = int(session.num_workers)
    if num_workers is not None and int(num_workers) != n:
        raise ValueError(f"session has {n} workers, not {num_workers}")
    ids = tuple(range(n)) if device_ids is None else tuple(int(i) for i in device_ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} device ids for {n} workers")
    import tvm
    from tvm_ffi import Shape

    from ..gpu import cuda_device_count

    # Check here what would otherwise fail inside the workers (and abort their processes).
    gpus = cuda_device_count()
    if gpus == 0 or max(ids) >= gpus or min(ids) < 0:
        raise CCLUnavailableError(
            f"the NCCL CCL needs CUDA GPUs {list(ids)}, but the driver reports {gpus} GPU(s)")
    path = load_nccl_ccl(verbose=verbose)  # controller: init_ccl runs here
    nccl_hint, cudart_hint = find_nccl_library(), find_cudart_library()
    try:
        info = str(tvm.get_global_func(f"runtime.disco.{NCCL_CCL_NAME}.library_info")(
            nccl_hint, cudart_hint))
    except Exception as e:  # noqa: BLE001  (a tvm error: the message says what is missing)
        raise CCLUnavailableError(f"the NCCL CCL cannot run here: {e}") from None
    tvm.get_global_func(f"runtime.disco.{NCCL_CCL_NAME}.configure")(
        nccl_hint, cudart_hint, bool(disable_nvls))
    configure_oneshot = tvm.get_global_func(f"runtime.disco.{NCCL_CCL_NAME}.configure_oneshot",
                                            allow_missing=True)
    if configure_oneshot is not None:  # (None: an older prebuilt plugin, $MLC_NCCL_CCL_LIBRARY)
        configure_oneshot(-1 if oneshot is None else int(bool(oneshot)),
                          -1 if oneshot_max_bytes is None else int(oneshot_max_bytes),
                          -1.0 if oneshot_timeout_s is None else float(oneshot_timeout_s))
    configure_pdl = tvm.get_global_func(f"runtime.disco.{NCCL_CCL_NAME}.configure_oneshot_pdl",
                                        allow_missing=True)
    if configure_pdl is not None:  # -1: the controller reads $MLC_NCCL_ONESHOT_PDL at init
        configure_pdl(-1 if oneshot_pdl is None else int(bool(oneshot_pdl)))
    elif oneshot_pdl is not None:
        warnings.warn(f"{path} predates MLC_NCCL_ONESHOT_PDL: oneshot_pdl={oneshot_pdl} ignored",
                      stacklevel=2)
    session.get_global_func("runtime.disco.load_vm_module")(str(path), tvm.cpu(0))
    if verbose:
        print(f"[mlc_course.ccl] {NCCL_CCL_NAME}: {info}", file=sys.stderr)
    _ffi_api().SessionInitCCL(session, NCCL_CCL_NAME, Shape(list(ids)))
    path_info = allreduce_path(session) if configure_oneshot is not None else {}
    if verbose and path_info:
        print(f"[mlc_course.ccl] {NCCL_CCL_NAME}: all-reduce path {path_info.get('path')} "
              f"({path_info.get('reason')})", file=sys.stderr)
    return NcclCCL(NCCL_CCL_NAME, path, n, ids, info, path_info)


def _on_workers(session, name: str, *args, worker: int | None = 0):
    """Call ``runtime.disco.mlc_nccl.<name>`` on every worker; the JSON answer of ``worker``
    (a dict) or of all of them (a list) when ``worker`` is None."""
    ref = session.get_global_func(f"runtime.disco.{NCCL_CCL_NAME}.{name}")(*args)
    workers = range(int(session.num_workers)) if worker is None else [worker]
    out = [json.loads(str(ref.debug_get_from_remote(w))) for w in workers]
    return out if worker is None else out[0]


def allreduce_path(session, worker: int | None = 0):
    """Which path the sum all-reduces of an :func:`init_nccl_ccl` session take, and why.

    Returns worker ``worker``'s state as a dict (a list of all workers' when None):
    ``path`` ("oneshot" or "nccl" for calls that qualify; see the module docstring), ``reason``
    (why it is or is not set up), ``kernel`` (how its kernel was built), ``max_bytes``,
    ``timeout_s``, ``peers`` (how each rank's buffer is reached: "self", "cuda ipc", "peer
    access"), ``pdl`` (whether the kernel is launched with programmatic dependent launch),
    ``pdl_supported`` and ``pdl_note`` (why or why not), ``oneshot_calls`` / ``nccl_calls``
    (all-reduces dispatched by the host each way; CUDA-graph replays are not counted) and ``error`` (a one-shot kernel that gave up). Meant
    for result files and A/B runs.
    """
    return _on_workers(session, "debug_allreduce_path", worker=worker)


def set_allreduce_path(session, mode: str = "oneshot", max_bytes: int | None = None) -> list:
    """Switch every worker's all-reduce path: "oneshot" (only where it was set up) or "nccl";
    ``max_bytes`` lowers the one-shot threshold (at most what init set up). For A/B timing in
    one session: all workers switch between the same two collectives, as the ranks must agree.
    Calls captured in a CUDA graph before the switch keep their path. Returns every worker's
    :func:`allreduce_path`."""
    return _on_workers(session, "debug_set_allreduce_path", str(mode),
                       -1 if max_bytes is None else int(max_bytes), worker=None)


def set_oneshot_pdl(session, on: bool = True) -> list:
    """Switch programmatic dependent launch of every worker's one-shot kernel (on only where
    :func:`allreduce_path` says ``pdl_supported``; an error otherwise). For A/B timing in one
    session; calls captured in a CUDA graph keep the launch they were captured with. Returns
    every worker's :func:`allreduce_path`."""
    return _on_workers(session, "debug_set_oneshot_pdl", int(bool(on)), worker=None)


def oneshot_source() -> str:
    """The CUDA C++ of the one-shot all-reduce kernel, as the plugin holds it (what init
    compiles through ``tvm_callback_cuda_compile``; tests compile it with nvcc). Loads the
    plugin into this process."""
    import tvm

    load_nccl_ccl()
    return str(tvm.get_global_func(f"runtime.disco.{NCCL_CCL_NAME}.oneshot_source")())
