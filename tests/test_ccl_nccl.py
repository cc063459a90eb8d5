"""The NCCL collective library plugin (mlc_course.ccl, "mlc_nccl", nccl.cc).

CI has no GPU: there the plugin is built with g++ (against the real nccl.h/cuda_runtime_api.h
when they are installed, which makes the compiler check every NCCL/CUDA signature it uses),
loaded into TVM, and checked to register the whole disco CCL contract; its library lookup and
its refusal to start without GPUs are checked too. With two or more CUDA GPUs the collectives
run for real through TVM's disco builtins on a ProcessSession (scripts/gpu_tp_test.py does the
same on a lent GPU machine and records the numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlc_course import ccl
from mlc_course.gpu import cuda_device_count

ONESHOT_FUNCS = ("configure_oneshot", "debug_allreduce_path", "debug_set_allreduce_path",
                 "oneshot_source", "oneshot_compile", "oneshot_eligible", "oneshot_plan",
                 "configure_oneshot_pdl", "debug_set_oneshot_pdl")
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
                   "debug_bench_allreduce", *ONESHOT_FUNCS):
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
# The one-shot all-reduce (nccl.cc, "One-shot all-reduce"): what can be checked without a GPU
# ---------------------------------------------------------------------------------------------

def _plugin_func(name):
    import tvm

    ccl.load_nccl_ccl()
    return tvm.get_global_func(f"runtime.disco.{ccl.NCCL_CCL_NAME}.{name}")


def test_oneshot_takes_only_small_float_sums(plugin):
    from tvm_ffi import dtype

    eligible = _plugin_func("oneshot_eligible")
    cap = 256 << 10
    for dt, nbytes in (("float16", 2), ("float16", 16384), ("bfloat16", 14), ("float32", 4),
                       ("float16", cap)):
        assert str(eligible(0, dtype(dt), nbytes, cap)) == "", (dt, nbytes)
    for kind in (1, 2, 3, 4):  # prod, min, max, avg go to NCCL
        assert "not sum" in str(eligible(kind, dtype("float16"), 16384, cap))
    for dt in ("int32", "float64", "int8", "float16x2", "uint16"):
        assert "dtype" in str(eligible(0, dtype(dt), 64, cap)), dt
    assert "max_bytes" in str(eligible(0, dtype("float16"), cap + 2, cap))
    assert str(eligible(0, dtype("float32"), 0, cap)) == "empty"


@pytest.mark.parametrize("nranks", [2, 4, 8])
def test_oneshot_plan_keeps_chunk_ownership_fixed(plugin, nranks):
    """Chunk c (16 bytes) must belong to block (c // threads) % max_blocks in every call, whatever
    its size: that is what makes reusing the double buffer safe across mixed sizes."""
    plan = _plugin_func("oneshot_plan")
    cap = 256 << 10
    sizes = [2, 14, 16, 18, 8190, 8192, 8194, 16384, 65536, 131070, cap]
    layouts = set()
    for nbytes in sizes:
        blocks, threads, max_blocks, slot, flags_off, data_off, total = map(int, plan(nbytes, nranks, cap))
        layouts.add((max_blocks, slot, flags_off, data_off, total))
        chunks = -(-nbytes // 16)
        assert threads == 512 and 1 <= blocks <= max_blocks
        # no loop unless the grid is the full max_blocks (then c -> (c // threads) % max_blocks)
        assert blocks * threads >= chunks or blocks == max_blocks
        assert blocks == min(max_blocks, -(-chunks // threads))
    (max_blocks, slot, flags_off, data_off, total), = layouts  # one layout for every size
    assert slot == cap and slot % 16 == 0
    assert max_blocks == 32  # 256 KiB = 32 blocks x 512 threads x 16 bytes: one chunk each
    assert flags_off >= 256 and flags_off + 8 * max_blocks * 8 <= data_off and data_off % 256 == 0
    assert total == data_off + 2 * nranks * slot
    # odd capacities round up to whole chunks; huge ones cap the grid and loop
    assert int(plan(2, nranks, 1000)[3]) == 1008
    big = list(map(int, plan(4 << 20, nranks, 4 << 20)))
    assert big[0] == big[2] == 64


def test_oneshot_struct_layout_matches_the_kernel(plugin):
    """The host mirror (nccl.cc) and the kernel's MlcOneshotArgs assert the same layout."""
    import re
    from pathlib import Path

    src = ccl.oneshot_source()
    host = (Path(ccl.__file__).parent / "nccl.cc").read_text()
    host = host.replace(src, "")  # the host part only
    dev_size = re.findall(r"sizeof\(MlcOneshotArgs\) == (\d+)", src)
    host_size = re.findall(r"sizeof\(OneShotArgs\) == (\d+)", host)
    assert dev_size and dev_size == host_size
    dev_off = dict(re.findall(r"__builtin_offsetof\(MlcOneshotArgs, (\w+)\) == (\d+)", src))
    host_off = dict(re.findall(r"offsetof\(OneShotArgs, (\w+)\) == (\d+)", host))
    assert len(dev_off) >= 7 and dev_off == host_off
    # the constants the host plans with are the kernel's
    assert "#define MLC_OS_THREADS 512" in src and "kOneShotThreads = 512" in host
    assert "#define MLC_OS_MAX_RANKS 8" in src and "kOneShotMaxRanks = 8" in host
    for name in ("mlc_oneshot_allreduce_f16", "mlc_oneshot_allreduce_bf16", "mlc_oneshot_allreduce_f32"):
        assert f"mlc_oneshot_allreduce_{name.rsplit('_', 1)[1]}(const MlcOneshotArgs a)" in src
        assert f'"{name}"' in host


def _nvcc():
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (the CUDA toolkit compiles the one-shot kernel)")
    return nvcc


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_oneshot_kernel_compiles_with_nvcc(plugin, tmp_path, arch):
    nvcc = _nvcc()
    cu = tmp_path / "oneshot.cu"
    cu.write_text(ccl.oneshot_source())
    r = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o",
                        str(tmp_path / "oneshot.cubin"), str(cu)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    for dt in ("f16", "bf16", "f32"):
        assert f"mlc_oneshot_allreduce_{dt}" in log
    assert "spill stores" in log and " 0 bytes spill stores" in log
    assert "bytes spill stores" not in log.replace(" 0 bytes spill stores", "")
    assert (tmp_path / "oneshot.cubin").stat().st_size > 1000


def test_oneshot_ptx_is_exact_under_fast_math(plugin, tmp_path):
    """TVM's own callback compiles with --use_fast_math: the sums must still neither flush
    denormals nor fuse, and the flag/data accesses must keep their ordering and cache flags."""
    nvcc = _nvcc()
    cu = tmp_path / "oneshot.cu"
    cu.write_text(ccl.oneshot_source())
    ptx = tmp_path / "oneshot.ptx"
    r = subprocess.run([nvcc, "-arch=sm_90a", "-ptx", "-O3", "--use_fast_math", "-o", str(ptx), str(cu)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    text = ptx.read_text()
    assert "add.rn.f32" in text and "add.ftz" not in text and "fma" not in text
    for needed in ("ld.acquire.sys.global.u64", "st.release.sys.global.u64", "fence.acq_rel.sys",
                   "%globaltimer", "ld.global.cg.v4.u32", "cvt.rn.f16.f32", "cvt.rn.bf16.f32"):
        assert needed in text, needed
    assert "multimem" not in text  # never multicast (NVLS stays off)


# --- programmatic dependent launch (PDL) of the one-shot kernel -----------------------------

ONESHOT_KERNELS = ("mlc_oneshot_allreduce_f16", "mlc_oneshot_allreduce_bf16",
                   "mlc_oneshot_allreduce_f32")


def _ptx_entries(ptx: str) -> dict:
    """{kernel name: its PTX body} of every .entry in ``ptx``."""
    import re

    parts = re.split(r"^\.visible \.entry (\w+)\(", ptx, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _pdl_problems(ptx: str) -> list:
    """What keeps the PTX of the one-shot kernels from being safe under PDL (empty: nothing):
    each kernel must issue griddepcontrol.launch_dependents, then griddepcontrol.wait, with no
    memory access but kernel-parameter loads before the wait, and no non-coherent global load
    (ld.global.nc / ldu, which ptxas may hoist above the wait) anywhere."""
    import re

    problems = []
    entries = _ptx_entries(ptx)
    for name in ONESHOT_KERNELS:
        body = entries.get(name)
        if body is None:
            problems.append(f"{name}: not in the PTX")
            continue
        lines = [ln.strip() for ln in body.splitlines()]
        launch = [i for i, ln in enumerate(lines) if ln.startswith("griddepcontrol.launch_dependents")]
        wait = [i for i, ln in enumerate(lines) if ln.startswith("griddepcontrol.wait")]
        if not launch:
            problems.append(f"{name}: no griddepcontrol.launch_dependents")
        if not wait:
            problems.append(f"{name}: no griddepcontrol.wait")
            continue
        if launch and launch[0] > wait[0]:
            problems.append(f"{name}: launch_dependents after wait")
        for ln in lines[:wait[0]]:
            instr = re.sub(r"^@!?%\w+\s+", "", ln)  # drop a predicate guard
            op = instr.split()[0] if instr.split() else ""
            if re.match(r"(ld|ldu|st|atom|red|cp|prefetch|prefetchu|multimem)\.", op) \
                    and ".param" not in op:
                problems.append(f"{name}: memory access before griddepcontrol.wait: {ln}")
        for ln in lines:
            if re.match(r"(@!?%\w+\s+)?(ld\.global\.nc|ldu\.)", ln):
                problems.append(f"{name}: non-coherent load: {ln}")
    return problems


def _kernel_ptx(tmp_path, arch: str, source: str | None = None, name: str = "oneshot") -> str:
    nvcc = _nvcc()
    cu = tmp_path / f"{name}.cu"
    cu.write_text(ccl.oneshot_source() if source is None else source)
    ptx = tmp_path / f"{name}_{arch}.ptx"
    r = subprocess.run([nvcc, f"-arch={arch}", "-ptx", "-O3", "--use_fast_math", "-o", str(ptx),
                        str(cu)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return ptx.read_text()


def test_pdl_checker_catches_what_it_should():
    """The checker itself, on hand-written PTX (so that the tests below can fail)."""
    def kernel(name, body):
        return f".visible .entry {name}(\n  .param .align 8 .b8 p[272]\n)\n{{\n{body}\n}}\n"

    good = ("ld.param.u64 %rd1, [p+0];\ngriddepcontrol.launch_dependents;\ngriddepcontrol.wait;\n"
            "ld.global.v4.u32 {%r1, %r2, %r3, %r4}, [%rd1];\nret;")
    assert _pdl_problems("".join(kernel(k, good) for k in ONESHOT_KERNELS)) == []
    cases = {
        "no griddepcontrol.wait": good.replace("griddepcontrol.wait;\n", ""),
        "no griddepcontrol.launch_dependents": good.replace("griddepcontrol.launch_dependents;\n", ""),
        "launch_dependents after wait": good.replace(
            "griddepcontrol.launch_dependents;\ngriddepcontrol.wait;",
            "griddepcontrol.wait;\ngriddepcontrol.launch_dependents;"),
        "memory access before": good.replace(
            "griddepcontrol.wait;", "@%p1 ld.global.u16 %rs1, [%rd1];\ngriddepcontrol.wait;"),
        "non-coherent load": good.replace("ld.global.v4.u32", "ld.global.nc.v4.u32"),
    }
    for what, body in cases.items():
        ptx = kernel(ONESHOT_KERNELS[0], body) + "".join(kernel(k, good) for k in ONESHOT_KERNELS[1:])
        found = _pdl_problems(ptx)
        assert found and all(ONESHOT_KERNELS[0] in f for f in found), (what, found)
        assert any(what in f for f in found), (what, found)
    assert any("not in the PTX" in f for f in _pdl_problems(kernel(ONESHOT_KERNELS[0], good)))


def test_oneshot_ptx_waits_for_the_previous_kernel(plugin, tmp_path):
    """sm_90a: launch_dependents, then griddepcontrol.wait before any global access (the send
    buffer is the GEMV's output), and no ld.global.nc that ptxas could hoist above the wait."""
    ptx = _kernel_ptx(tmp_path, "sm_90a")
    assert _pdl_problems(ptx) == []
    for name, body in _ptx_entries(ptx).items():
        if name in ONESHOT_KERNELS:
            assert body.count("griddepcontrol.wait") == 1 and body.count("griddepcontrol.launch_dependents") == 1
    assert "ld.global.nc" not in ptx and "ldu." not in ptx


def test_oneshot_sm80_build_has_no_griddepcontrol(plugin, tmp_path):
    ptx = _kernel_ptx(tmp_path, "sm_80")
    assert set(ONESHOT_KERNELS) <= set(_ptx_entries(ptx))
    assert "griddepcontrol" not in ptx


def test_pdl_ptx_check_fails_on_broken_kernels(plugin, tmp_path):
    """Real compiles of two broken variants of the kernel: without the wait, and with the
    send buffer's tail read through __ldg (ld.global.nc)."""
    src = ccl.oneshot_source()
    no_wait = src.replace("  mlc_pdl_wait();  // nothing global", "  // nothing global")
    assert no_wait != src
    assert any("no griddepcontrol.wait" in p
               for p in _pdl_problems(_kernel_ptx(tmp_path, "sm_90a", no_wait, "no_wait")))
    old = 'asm volatile("ld.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");'
    assert old in src
    ldg = src.replace(old, "v = __ldg(static_cast<const mlc_u32*>(p));")
    assert any("non-coherent load" in p
               for p in _pdl_problems(_kernel_ptx(tmp_path, "sm_90a", ldg, "ldg")))


def _nvdisasm():
    import shutil
    from pathlib import Path

    cands = [os.environ.get("MLC_NVDISASM"), shutil.which("nvdisasm")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent / "nvdisasm"))
    for c in cands:
        if c and Path(c).is_file():
            return c
    pytest.skip("nvdisasm not found (CUDA toolkit, the nvidia-cuda-nvdisasm wheel or $MLC_NVDISASM)")


def test_oneshot_sass_waits_before_any_global_access(plugin, tmp_path):
    """What ptxas made of it (sm_90a SASS): PREEXIT (launch_dependents) and ACQBULK
    (griddepcontrol.wait) come before every global/generic load, store or atomic."""
    import re

    nvcc, nvdisasm = _nvcc(), _nvdisasm()
    cu = tmp_path / "oneshot.cu"
    cu.write_text(ccl.oneshot_source())
    cubin = tmp_path / "oneshot.cubin"
    r = subprocess.run([nvcc, "-arch=sm_90a", "-cubin", "-O3", "--use_fast_math", "-o", str(cubin),
                        str(cu)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sass = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0, sass.stderr[-2000:]
    funcs = re.split(r"^(mlc_oneshot_allreduce_\w+):", sass.stdout, flags=re.M)
    bodies = {funcs[i]: funcs[i + 1] for i in range(1, len(funcs) - 1, 2)}
    assert set(ONESHOT_KERNELS) <= set(bodies)
    for name in ONESHOT_KERNELS:
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", bodies[name])
        assert "PREEXIT" in ops and "ACQBULK" in ops, (name, ops[:20])
        wait = ops.index("ACQBULK")
        assert ops.index("PREEXIT") < wait
        early = [op for op in ops[:wait] if re.match(r"(LDG|STG|LD|ST|ATOM|ATOMG|RED|LDGSTS)(\.|$)", op)]
        assert not early, (name, early)
        assert not any(op.startswith("LDG") and ".CONSTANT" in op for op in ops), name


def _syntax_check(src_path, extra: list) -> subprocess.CompletedProcess:
    """g++ -fsyntax-only of nccl.cc (or a copy) with the plugin's include paths."""
    cxx = ccl._compiler()
    tc = ccl._toolchain()
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", f"-I{tc['includes'][0]}"]
    for inc in tc["includes"][1:]:
        cmd += ["-isystem", inc]
    return subprocess.run(cmd + extra + [str(src_path)], capture_output=True, text=True, timeout=300)


def test_launch_structs_match_cuda_h(plugin, tmp_path):
    """CUlaunchConfig / CUlaunchAttribute / cuLaunchKernelEx as nccl.cc declares them, checked
    by its static_asserts against the real cuda.h (MLC_NCCL_CHECK_DRIVER_ABI: no nccl.h
    needed); a copy with a wrong attribute id or layout must not compile."""
    from pathlib import Path

    inc = ccl.nccl_build_info()["cuda_include"]
    if not inc or not (Path(inc) / "cuda.h").is_file():
        pytest.skip("cuda.h not found (CUDA toolkit, or set CUDA_HOME)")
    src = Path(ccl.__file__).parent / "nccl.cc"
    abi = ["-DMLC_NCCL_CHECK_DRIVER_ABI", "-isystem", inc]
    r = _syntax_check(src, abi)
    assert r.returncode == 0, r.stderr[-3000:]
    text = src.read_text()
    wrong_id = text.replace("kLaunchAttributeProgrammaticStreamSerialization = 6;",
                            "kLaunchAttributeProgrammaticStreamSerialization = 7;")
    wrong_layout = text.replace("  unsigned int sharedMemBytes;\n  Stream hStream;",
                                "  Stream hStream;\n  unsigned int sharedMemBytes;")
    assert wrong_id != text and wrong_layout != text
    for what, variant, needs_header in (("wrong_id", wrong_id, True), ("wrong_layout", wrong_layout, False)):
        p = tmp_path / f"{what}.cc"
        p.write_text(variant)
        r = _syntax_check(p, abi)
        assert r.returncode != 0 and "static assertion failed" in r.stderr, (what, r.stderr[-2000:])
        # the plugin's own layout asserts catch a reordering even without cuda.h
        r = _syntax_check(p, [])
        assert (r.returncode == 0) == needs_header, (what, r.stderr[-2000:])


def test_oneshot_compiles_through_tvm_callback(plugin, tmp_path):
    """init compiles the kernel with tvm_callback_cuda_compile in the controller; a missing or
    failing callback leaves NCCL in charge, with the reason."""
    _nvcc()
    r = _run(f"""
        import json, subprocess, tvm, tvm_ffi
        from mlc_course import ccl
        ccl.load_nccl_ccl()
        compile_ = tvm.get_global_func("runtime.disco.mlc_nccl.oneshot_compile")
        if tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True) is not None:
            tvm_ffi.registry.remove_global_func("tvm_callback_cuda_compile")
        print("MISSING", compile_())

        @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
        def broken(code):
            raise RuntimeError("nvcc exploded")
        print("BROKEN", compile_())

        seen = []
        @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
        def nvcc(code):
            seen.append(code)
            open({str(tmp_path / 'k.cu')!r}, "w").write(code)
            subprocess.run(["nvcc", "-arch=sm_90a", "-cubin", "-o", {str(tmp_path / 'k.cubin')!r},
                            {str(tmp_path / 'k.cu')!r}], check=True)
            return open({str(tmp_path / 'k.cubin')!r}, "rb").read()
        print("OK", compile_())
        print("SAME_SOURCE", seen == [ccl.oneshot_source()])
        print("CACHED", compile_(), len(seen))
        """)
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    missing, broken, ok = (json.loads(out[k]) for k in ("MISSING", "BROKEN", "OK"))
    assert missing["bytes"] == 0 and "not registered" in missing["note"]
    assert broken["bytes"] == 0 and "nvcc exploded" in broken["note"]
    assert ok["bytes"] > 1000 and "tvm_callback_cuda_compile" in ok["note"]
    assert out["SAME_SOURCE"] == "True"
    assert out["CACHED"].endswith(" 1")  # compiled once per process


def test_path_helpers_talk_to_every_worker(monkeypatch):
    calls = []

    class Ref:
        def __init__(self, args):
            self.args = args

        def debug_get_from_remote(self, w):
            return json.dumps({"worker": w, "args": list(self.args)})

    class FakeSession:
        num_workers = 3

        def get_global_func(self, name):
            return lambda *a: calls.append((name, a)) or Ref(a)

    assert ccl.allreduce_path(FakeSession()) == {"worker": 0, "args": []}
    assert [d["worker"] for d in ccl.allreduce_path(FakeSession(), worker=None)] == [0, 1, 2]
    got = ccl.set_allreduce_path(FakeSession(), "nccl")
    assert [d["args"] for d in got] == [["nccl", -1]] * 3
    ccl.set_allreduce_path(FakeSession(), "oneshot", max_bytes=4096)
    assert calls[-1] == ("runtime.disco.mlc_nccl.debug_set_allreduce_path", ("oneshot", 4096))
    got = ccl.set_oneshot_pdl(FakeSession(), False)
    assert [d["args"] for d in got] == [[0]] * 3
    assert calls[-1] == ("runtime.disco.mlc_nccl.debug_set_oneshot_pdl", (0,))


def test_allreduce_check_script_on_cpu(tmp_path):
    """scripts/gpu_allreduce_test.py's checking harness (inputs, ordered float32 reference,
    misaligned views, guard bytes, back-to-back calls) run on the CPU CCL, which sums in the
    same order as the one-shot kernel; on a GPU the script checks the one-shot path with it."""
    r = subprocess.run([sys.executable, str(_root() / "scripts" / "gpu_allreduce_test.py"),
                        "--device", "cpu", "--workers", "2", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "ALL EXACT" in r.stdout
    data = json.loads((tmp_path / "gpu_allreduce.json").read_text())
    eager = data["sessions"]["process2"]["eager"]
    assert len(eager) == 2 and all(w["paths"]["cpu_shm"]["exact"] for w in eager)
    assert data["sessions"]["thread2"]["ok"]


def test_allreduce_check_reference_rounds_once():
    """The script's reference: a float32 sum in rank order, rounded once (bfloat16 by round to
    nearest even, subnormals kept)."""
    import numpy as np

    from scripts import gpu_allreduce_test as t

    x = np.array([1.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -1e-39, 3.0e38], dtype=np.float32)
    bits = t.to_bits(x, "bfloat16")
    assert list(bits) == [0x3F80, 0x3F80, 0x3F82, 0x800B, 0x7F62]  # ties to even, subnormal kept
    assert np.array_equal(t.from_bits(bits[:1], "bfloat16"), np.float32([1.0]))
    # order matters in float32: (1e8 + 1) - 1e8 = 0, but 1e8 + (1 - 1e8) = 0 too; 3 ranks:
    xs = [t.to_bits(np.float32([v]), "float32") for v in (1e8, 1.0, -1e8)]
    assert t.from_bits(t.reference(xs, "float32"), "float32")[0] == 0.0  # (1e8 + 1) rounds to 1e8
    xs = [t.to_bits(np.float32([v]), "float32") for v in (1e8, -1e8, 1.0)]
    assert t.from_bits(t.reference(xs, "float32"), "float32")[0] == 1.0
    # float16: 2048 + 1 is a tie between 2048 and 2050 in float16 only after the float32 sum
    xs = [t.to_bits(np.float32([v]), "float16") for v in (2048.0, 1.0)]
    assert t.from_bits(t.reference(xs, "float16"), "float16")[0] == 2048.0
    xs = [t.to_bits(np.float32([v]), "float16") for v in (2048.0, 1.0, 1.0)]  # 2049 -> 2048, +1
    assert t.from_bits(t.reference(xs, "float16"), "float16")[0] == 2050.0


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


@NEED_2_GPUS
def test_oneshot_allreduce_on_two_gpus(tmp_path):
    """The one-shot path against NCCL and the float32 reference, eager and in CUDA graphs."""
    r = subprocess.run([sys.executable, str(_root() / "scripts" / "gpu_allreduce_test.py"),
                        "--workers", "2", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "ALL EXACT" in r.stdout
