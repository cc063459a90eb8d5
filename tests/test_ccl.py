"""The CPU collective library (mlc_course.ccl, "cpu_shm") under real disco sessions.

Every collective is called through TVM's disco builtins (``runtime.disco.allreduce`` & co.),
the path a compiled model takes, on ThreadedSession and ProcessSession with 1-4 workers.
Sessions are module-scoped (one per kind and size) because worker processes are slow to start.
Failure tests run in a subprocess: in TVM 0.27 an error in a disco worker thread aborts the
process that hosts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mlc_course import ccl

ds = ccl.disco_session()
from tvm_ffi import Shape  # noqa: E402  (after disco_session() has imported tvm)

SIZES = (1, 7, 1000, 10**6)
DTYPES = ("float32", "float16")
SESSIONS = [("thread", n) for n in (1, 2, 3, 4)] + [("process", n) for n in (1, 2, 3, 4)]
SUM = Shape([ccl.REDUCE_KINDS["sum"]])


def _make_session(kind: str, n: int, **ccl_kwargs):
    sess = ds.ThreadedSession(n) if kind == "thread" else ds.ProcessSession(n)
    info = ccl.init_cpu_ccl(sess, n, **ccl_kwargs)
    return sess, info


@pytest.fixture(scope="module", params=SESSIONS, ids=[f"{k}{n}" for k, n in SESSIONS])
def sess(request):
    kind, n = request.param
    s, info = _make_session(kind, n)
    assert info.name == ccl.CCL_NAME and info.num_workers == n
    yield s
    # No s.shutdown(): in TVM 0.27 a ProcessSession that was shut down aborts the process when
    # it is destroyed later (its destructor writes to the exited workers' pipes). Dropping the
    # last reference shuts the session down and reaps the workers.
    del s


def put(sess, arrays):
    """One array per worker -> a DRef holding them."""
    d = sess.empty(arrays[0].shape, str(arrays[0].dtype))
    for w, a in enumerate(arrays):
        d.debug_copy_from(w, a)
    return d


def get(dref, n):
    return [dref.debug_get_from_remote(w).numpy() for w in range(n)]


def rand_ints(rng, n, size, dtype):
    # small integers: every partial sum is exact in float16 too
    return [rng.integers(-64, 65, size=size).astype(dtype) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

def test_build_is_cached():
    p1 = ccl.build_cpu_ccl()
    t0 = time.perf_counter()
    p2 = ccl.build_cpu_ccl()
    assert p1 == p2 and p1.exists() and p1.name == ccl.LIB_NAME
    assert time.perf_counter() - t0 < 2.0  # hashing only, no compile


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("MLC_COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(ccl.CCLBuildError, match="not found on PATH"):
        ccl.build_cpu_ccl()


def test_compiler_errors_are_summarized(monkeypatch, tmp_path):
    fake = tmp_path / "fake-g++"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\n"
                    "echo 'cpu_shm.cc:1:1: error: boom' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MLC_COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(ccl.CCLBuildError, match="(?s)exit 1.*error: boom"):
        ccl.build_cpu_ccl()
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built left behind


def test_init_ccl_dispatch():
    import tvm

    sess = ds.ThreadedSession(2)
    assert ccl.init_ccl(sess, 2, "cpu").name == ccl.CCL_NAME
    assert ccl.init_ccl(sess, 2, tvm.cpu(0)).name == ccl.CCL_NAME
    with pytest.raises(ValueError, match="3"):
        ccl.init_ccl(sess, 3, "cpu")
    if tvm.get_global_func("runtime.disco.nccl.init_ccl", allow_missing=True) is None:
        with pytest.raises(NotImplementedError, match="NCCL"):
            ccl.init_ccl(sess, 2, "cuda")


# ---------------------------------------------------------------------------------------------
# Collectives through the disco builtins
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_sum(sess, dtype, size):
    n = sess.num_workers
    xs = rand_ints(np.random.default_rng(size + n), n, size, dtype)
    send, recv = put(sess, xs), sess.empty((size,), dtype)
    sess.get_global_func("runtime.disco.allreduce")(send, SUM, False, recv)
    want = np.sum(np.stack(xs).astype(np.float64), axis=0).astype(dtype)
    outs = get(recv, n)
    for out in outs:
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(get(send, n)[n - 1], xs[n - 1])  # input left alone


@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_in_place_non_integer(sess, dtype):
    """Real-valued data, send is recv: float32 accumulation in worker order, one rounding."""
    n, size = sess.num_workers, 3001
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(size).astype(dtype) for _ in range(n)]
    buf = put(sess, xs)
    sess.get_global_func("runtime.disco.allreduce")(buf, SUM, True, buf)
    acc = xs[0].astype(np.float32)
    for x in xs[1:]:
        acc = acc + x.astype(np.float32)
    outs = get(buf, n)
    for out in outs:  # bitwise: same order, same accumulator, same rounding
        assert out.tobytes() == acc.astype(dtype).tobytes()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_from_worker0(sess, dtype, size):
    n = sess.num_workers
    rng = np.random.default_rng(size)
    src = rng.standard_normal(size).astype(dtype)
    send = put(sess, [src] + [np.full(size, -1, dtype)] * (n - 1))  # others hold junk
    recv = put(sess, [np.zeros(size, dtype)] * n)
    sess.get_global_func("runtime.disco.broadcast_from_worker0")(send, False, recv)
    for out in get(recv, n):
        assert out.tobytes() == src.tobytes()


def test_other_reduce_kinds(sess):
    n, size = sess.num_workers, 1003
    xs = [np.random.default_rng(w).integers(1, 4, size=size).astype("float32") for w in range(n)]
    stack = np.stack(xs).astype(np.float64)
    expected = {"prod": stack.prod(0), "min": stack.min(0), "max": stack.max(0),
                "avg": stack.sum(0) / n}
    allreduce = sess.get_global_func("runtime.disco.allreduce")
    for name, want in expected.items():
        send, recv = put(sess, xs), sess.empty((size,), "float32")
        allreduce(send, Shape([ccl.REDUCE_KINDS[name]]), False, recv)
        for out in get(recv, n):
            np.testing.assert_allclose(out, want.astype("float32"), rtol=1e-6, err_msg=name)


def test_allgather_scatter_gather(sess):
    n, m = sess.num_workers, 1001
    xs = [np.arange(m, dtype="float32") + 10000 * w for w in range(n)]
    whole = np.concatenate(xs)

    send, recv = put(sess, xs), sess.empty((n * m,), "float32")
    sess.get_global_func("runtime.disco.allgather")(send, False, recv)
    for out in get(recv, n):
        np.testing.assert_array_equal(out, whole)

    # scatter: only worker 0 holds the source (a DRef that is None elsewhere)
    src = sess.empty((n * m,), "float32", worker0_only=True)
    src.debug_copy_from(0, whole)
    part = sess.empty((m,), "float32")
    sess.get_global_func("runtime.disco.scatter_from_worker0")(src, False, part)
    for w, out in enumerate(get(part, n)):
        np.testing.assert_array_equal(out, xs[w])

    # gather: the reverse
    dst = sess.empty((n * m,), "float32", worker0_only=True)
    sess.get_global_func("runtime.disco.gather_to_worker0")(part, False, dst)
    np.testing.assert_array_equal(dst.debug_get_from_remote(0).numpy(), whole)


def test_send_recv_and_sync(sess):
    n = sess.num_workers
    if n == 1:
        pytest.skip("needs two workers")
    p2p = sess.get_global_func(f"runtime.disco.{ccl.CCL_NAME}.debug_send_recv")
    for size in (5, 300_001):  # the second is larger than one mailbox: goes in chunks
        xs = [np.full(size, w, "float32") for w in range(n)]
        xs[0] = np.random.default_rng(size).standard_normal(size).astype("float32")
        buf = put(sess, xs)
        p2p(buf, 0, n - 1)
        outs = get(buf, n)
        np.testing.assert_array_equal(outs[n - 1], xs[0])
        for w in range(n - 1):  # senders and bystanders unchanged
            np.testing.assert_array_equal(outs[w], xs[w])
    sess._sync_all()  # kSyncWorker -> runtime.disco.cpu_shm.sync_worker on every worker


# ---------------------------------------------------------------------------------------------
# Half-precision rounding, on both code paths (F16C instructions / portable C++)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["thread", "process-portable"])
def test_float16_every_value(kind, monkeypatch):
    """All 65536 float16 bit patterns plus random partners: sum in float32, round once (RNE).

    In the ProcessSession, worker 1 runs with MLC_CCL_NO_F16C=1 (portable conversion code) and
    reduces the second half of the elements, worker 0 (a thread here) uses F16C if present; the
    data is also sent rotated so that each half of the patterns goes through each path.
    """
    if kind == "thread":
        sess = ds.ThreadedSession(2)
    else:
        monkeypatch.setenv("MLC_CCL_NO_F16C", "1")  # inherited by the worker process
        sess = ds.ProcessSession(2)
    ccl.init_cpu_ccl(sess, 2)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    rng = np.random.default_rng(0)
    partner = rng.standard_normal(1 << 16).astype(np.float16) * np.float16(8)
    partner[::7] = 0  # x + 0 = x exercises every value's conversion both ways
    for shift in (0, 1 << 15):
        a, b = np.roll(every, shift), np.roll(partner, shift)
        buf = put(sess, [a, b])
        sess.get_global_func("runtime.disco.allreduce")(buf, SUM, False, buf)
        with np.errstate(over="ignore", invalid="ignore"):
            want = (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
        for out in get(buf, 2):
            nan = np.isnan(want)
            np.testing.assert_array_equal(np.isnan(out), nan)
            assert out[~nan].tobytes() == want[~nan].tobytes()


def test_bfloat16_sum(sess):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    n, size = sess.num_workers, 1001
    xs = [np.random.default_rng(w).standard_normal(size).astype(ml_dtypes.bfloat16)
          for w in range(n)]
    buf = put(sess, xs)
    sess.get_global_func("runtime.disco.allreduce")(buf, SUM, False, buf)
    acc = xs[0].astype(np.float32)
    for x in xs[1:]:
        acc = acc + x.astype(np.float32)
    for out in get(buf, n):
        assert out.tobytes() == acc.astype(ml_dtypes.bfloat16).tobytes()


# ---------------------------------------------------------------------------------------------
# Special sessions: tiny slots (many chunks), worker groups
# ---------------------------------------------------------------------------------------------

def test_many_chunks_small_slots():
    sess, info = _make_session("thread", 3, slot_bytes=4096, p2p_bytes=4096)
    assert info.slot_bytes == 4096
    for dtype in DTYPES:
        size = 100_003  # ~100 chunks of 1024 (f32) / 2048 (f16) elements, odd tail
        xs = rand_ints(np.random.default_rng(1), 3, size, dtype)
        send, recv = put(sess, xs), sess.empty((size,), dtype)
        sess.get_global_func("runtime.disco.allreduce")(send, SUM, False, recv)
        want = np.sum(np.stack(xs).astype(np.float64), axis=0).astype(dtype)
        for out in get(recv, 3):
            np.testing.assert_array_equal(out, want)
        bsend = put(sess, [xs[1], xs[0], xs[0]])
        sess.get_global_func("runtime.disco.broadcast_from_worker0")(bsend, False, send)
        for out in get(send, 3):
            np.testing.assert_array_equal(out, xs[1])


def test_worker_groups():
    sess = ds.ThreadedSession(4, 2)  # groups {0, 1} and {2, 3}
    ccl.init_cpu_ccl(sess, 4)
    xs = [np.full(9, 10.0**w, "float32") for w in range(4)]
    allreduce = sess.get_global_func("runtime.disco.allreduce")
    send, recv = put(sess, xs), sess.empty((9,), "float32")
    allreduce(send, SUM, True, recv)  # in_group
    outs = get(recv, 4)
    for w in range(4):
        np.testing.assert_array_equal(outs[w], np.full(9, (11.0, 1100.0)[w // 2], "float32"))
    allreduce(send, SUM, False, recv)  # global
    for out in get(recv, 4):
        np.testing.assert_array_equal(out, np.full(9, 1111.0, "float32"))
    sess.get_global_func("runtime.disco.broadcast_from_worker0")(send, True, recv)
    outs = get(recv, 4)  # each group's first worker is its root
    for w in range(4):
        np.testing.assert_array_equal(outs[w], xs[(w // 2) * 2])


# ---------------------------------------------------------------------------------------------
# Failures: a dead or hung peer makes the collective fail within seconds (in a subprocess)
# ---------------------------------------------------------------------------------------------

_FAILURE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from mlc_course import ccl
    ds = ccl.disco_session()
    from tvm_ffi import Shape
    mode = sys.argv[1]
    n = 3
    sess = ds.ThreadedSession(n) if mode == "hang" else ds.ProcessSession(n)
    ccl.init_cpu_ccl(sess, n, timeout_s=1.0)
    pid1 = int(sess.get_global_func("runtime.disco.cpu_shm.debug_getpid")().debug_get_from_remote(1))
    buf = sess.empty((1000,), "float32")
    # worker 1 is busy for 4 s, so workers 0 and 2 wait inside the all-reduce
    sess.get_global_func("runtime.disco.cpu_shm.debug_sleep_on_worker")(1, 4000)
    sess.get_global_func("runtime.disco.allreduce")(buf, Shape([0]), False, buf)
    print("WAITING", flush=True)
    if mode == "kill":
        time.sleep(0.3)
        os.kill(pid1, signal.SIGKILL)
    sess._sync_worker(0)
    print("UNEXPECTED: the collective completed", flush=True)
""")


@pytest.mark.parametrize("mode,message", [("kill", "has died"), ("hang", "timed out")])
def test_peer_failure_fails_fast(mode, message, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(_FAILURE_SCRIPT)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    elapsed = time.perf_counter() - t0
    report = f"rc={proc.returncode} stdout={proc.stdout!r}\nstderr={proc.stderr[-3000:]}"
    assert "WAITING" in proc.stdout, report
    assert "UNEXPECTED" not in proc.stdout, report
    assert proc.returncode != 0, report  # TVM 0.27 aborts the process of a failed worker thread
    assert "[cpu_shm]" in proc.stderr and message in proc.stderr, report
    # worker 1 would only have arrived after 4 s: the error came before that (plus start-up)
    assert elapsed < 30, elapsed
