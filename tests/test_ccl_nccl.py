"""The NCCL collective library plugin (mlc_course.ccl, "mlc_nccl", nccl.cc).

CI has no GPU: there the plugin is built with g++ (against the real nccl.h/cuda_runtime_api.h
when they are installed, which makes the compiler check every NCCL/CUDA signature it uses),
loaded into TVM, and checked to register the whole disco CCL contract; its library lookup and
its refusal to start without GPUs are checked too. With two or more CUDA GPUs the collectives
run for real through TVM's disco builtins on a ProcessSession (scripts/gpu_tp_test.py does the
same on a lent GPU machine and records the numbers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mlc_course import ccl
from mlc_course.gpu import cuda_device_count

CONTRACT = ("init_ccl", "init_ccl_per_worker", "allreduce", "allgather", "broadcast_from_worker0",
            "scatter_from_worker0", "gather_to_worker0", "recv_from_worker0", "send_to_worker",
            "recv_from_worker", "send_to_next_group", "recv_from_prev_group", "sync_worker")


def _run(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a process holds one build of a plugin)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def plugin():
    try:
        return ccl.build_nccl_ccl()
    except ccl.CCLBuildError as e:
        if "not found on PATH" in str(e):
            pytest.skip(f"no C++ compiler: {e}")
        raise


def test_build_is_cached(plugin):
    assert plugin.name == ccl.NCCL_LIB_NAME and plugin.is_file()
    mtime = plugin.stat().st_mtime_ns
    assert ccl.build_nccl_ccl() == plugin
    assert plugin.stat().st_mtime_ns == mtime
    assert "nccl.cc" in (plugin.parent / "build.txt").read_text()


def test_no_link_time_dependency_on_nccl_or_cudart(plugin):
    """libnccl/libcudart are dlopen-ed at init: the plugin loads on machines without them."""
    out = subprocess.run(["readelf", "-d", str(plugin)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("readelf is not available")
    needed = [line for line in out.stdout.splitlines() if "(NEEDED)" in line]
    assert needed and not any("nccl" in n or "cudart" in n for n in needed), needed


def test_registers_the_ccl_contract(plugin):
    import tvm
    import tvm_ffi

    assert ccl.load_nccl_ccl() == plugin
    names = set(tvm_ffi.registry.list_global_func_names())
    missing = [op for op in CONTRACT if f"runtime.disco.{ccl.NCCL_CCL_NAME}.{op}" not in names]
    assert not missing
    for helper in ("configure", "library_info", "built_with_headers", "worker_info",
                   "debug_bench_allreduce"):
        assert f"runtime.disco.{ccl.NCCL_CCL_NAME}.{helper}" in names
    built_with = bool(tvm.get_global_func(f"runtime.disco.{ccl.NCCL_CCL_NAME}.built_with_headers")())
    info = ccl.nccl_build_info()
    assert built_with == bool(info["nccl_include"] and info["cuda_include"])


def test_build_against_real_headers(tmp_path):
    """Compiling with nccl.h + cuda_runtime_api.h checks the plugin's ABI declarations."""
    info = ccl.nccl_build_info()
    if not (info["nccl_include"] and info["cuda_include"]):
        pytest.skip(f"NCCL/CUDA headers not installed (found {info}); `pip install "
                    "nvidia-nccl-cu13` and the CUDA toolkit, or set MLC_NCCL_INCLUDE/CUDA_HOME")
    r = _run("""
        import tvm
        from mlc_course import ccl
        path = ccl.build_nccl_ccl(headers=True)
        tvm.runtime.load_module(str(path))
        print("WITH_HEADERS", tvm.get_global_func("runtime.disco.mlc_nccl.built_with_headers")())
        """, env={"MLC_COURSE_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WITH_HEADERS True" in r.stdout


def test_headers_required_but_missing(monkeypatch):
    monkeypatch.setattr(ccl, "nccl_build_info",
                        lambda: {"nccl_include": None, "cuda_include": None})
    with pytest.raises(ccl.CCLBuildError, match="nccl.h"):
        ccl.build_nccl_ccl(headers=True)


def test_library_lookup_explains_itself(plugin, tmp_path):
    """Either NCCL + cudart are found (and reported with versions), or the error lists the
    candidates it tried and the variables that fix it."""
    r = _run(f"""
        import tvm
        tvm.runtime.load_module({str(plugin)!r})
        f = tvm.get_global_func("runtime.disco.mlc_nccl.library_info")
        try:
            print("FOUND", f({str(tmp_path / 'no' / 'libnccl.so.2')!r}, ""))
        except Exception as e:
            print("ERROR", e)
        """, env={"MLC_NCCL_LIBRARY": "", "MLC_CUDART_LIBRARY": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    if "FOUND" in r.stdout:
        assert "nccl=2" in r.stdout and "cudart=" in r.stdout
    else:
        assert "MLC_NCCL_LIBRARY" in r.stdout or "MLC_CUDART_LIBRARY" in r.stdout
        assert "Tried" in r.stdout


def test_init_ccl_cuda_uses_the_plugin(monkeypatch):
    calls = []
    monkeypatch.setattr(ccl, "init_nccl_ccl", lambda s, n, **kw: calls.append((n, kw)) or "ok")

    class FakeSession:
        num_workers = 2

    assert ccl.init_ccl(FakeSession(), 2, "cuda", device_ids=[1, 0]) == "ok"
    assert ccl.init_ccl(FakeSession(), None, "cuda:0") == "ok"
    assert calls == [(2, {"device_ids": [1, 0]}), (2, {})]


@pytest.mark.skipif(cuda_device_count() > 0, reason="this machine has a GPU")
def test_refuses_without_gpus_before_touching_workers():
    ds = ccl.disco_session()
    sess = ds.ThreadedSession(2)
    with pytest.raises(ccl.CCLUnavailableError, match="GPU"):
        ccl.init_nccl_ccl(sess, 2)
    with pytest.raises(NotImplementedError, match="NCCL"):  # what init_ccl's callers catch
        ccl.init_ccl(sess, 2, "cuda")
    sess.shutdown()


# ---------------------------------------------------------------------------------------------
# On GPUs (skipped in CI)
# ---------------------------------------------------------------------------------------------

NEED_2_GPUS = pytest.mark.skipif(cuda_device_count() < 2, reason="needs 2 CUDA GPUs")


@NEED_2_GPUS
def test_collectives_on_two_gpus():
    r = _run("""
        import json, sys
        sys.argv = ["gpu_tp_test", "--quick"]
        from scripts.gpu_tp_test import main
        main()
        """, env={"NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"),
                  "PYTHONPATH": os.pathsep.join([str(_root()), os.environ.get("PYTHONPATH", "")])},
        timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "ALL EXACT" in r.stdout


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent

