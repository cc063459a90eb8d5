"""CUDA code generation on a machine without a GPU, the GPU carry folder, the GPU results file.

Compiling needs no GPU: TVM 0.27 keeps the kernels as CUDA C++ inside the library (they are
compiled to machine code when it is loaded on the GPU machine), so CI can check that the
decode step's quantized linears got dlight's GEMV schedule for each GPU arch.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cuda_source(lib_module) -> str:
    stack, out = [lib_module], []
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(m.inspect_source(""))
        stack.extend(m.imports)
    return "\n".join(out)


def _kernels(src: str) -> dict[str, str]:
    """Kernel name -> its definition's text."""
    heads = list(re.finditer(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\([^)]*\) \{', src))
    return {m.group(1): src[m.start(): heads[i + 1].start() if i + 1 < len(heads) else len(src)]
            for i, m in enumerate(heads)}


def _tiny_fused(gpu_form: bool):
    from mlc_course.compile import get_target, run_stages
    from mlc_course.config import get_preset
    from mlc_course.model import export

    mod, _ = export(get_preset("tiny"), "q4f16_1", 1, kv="static", gpu=True, form="half2" if gpu_form else "plain")
    return run_stages(mod, get_target("cuda"), upto="fuse")


def _decode_linears(fused, report) -> list[str]:
    text = fused["decode"].script()  # the decode function's kernels: static one-token shapes
    called = {k for k in report if re.search(rf"\b{k}\b", text)}
    return [k for k in called if "linear" in k or k == "lm_head"]


@pytest.mark.parametrize("gemv,rule", [("course", "CudaGEMV"), ("dlight", "GEMV")])
def test_decode_linears_get_the_gemv_rule(gemv, rule):
    """The course's pipeline: every decode linear (and the lm_head) in the half2 form
    gets the course's CUDA GEMV; with ``gemv="dlight"`` the plain form gets dlight's."""
    from mlc_course.compile import get_target, schedule_report

    fused = _tiny_fused(gpu_form=gemv == "course")
    report = schedule_report(fused, get_target("cuda"), gemv)
    assert "none" not in report.values(), report
    linears = _decode_linears(fused, report)
    assert len(linears) >= 5, linears  # qkv, o, gate_up, down (+ residual adds), lm_head
    assert all(report[k] == rule for k in linears), {k: report[k] for k in linears}
    # the decode step's attention is the course's two plain-TIR kernels; prefill's TE
    # attention (a dynamic number of rows) goes to dlight's rules
    assert report["decode_attention"] == report["decode_attention_combine"] == "written scheduled", report
    assert re.search(r"\bdecode_attention\b", fused["decode"].script())
    assert not re.search(r"\bdecode_attention\b", fused["prefill"].script())


@pytest.mark.parametrize("device,arch", [("cuda", "sm_90a"), ("a100", "sm_80"), ("rtx4090", "sm_89")])
@pytest.mark.parametrize("scheme", ["q4f16_1", "q0f16"])
def test_tiny_compiles_to_cuda(device, arch, scheme):
    from mlc_course.compile import compile_module, get_target
    from mlc_course.config import get_preset
    from mlc_course.model import export

    target = get_target(device)
    assert str(target.attrs["arch"]) == arch
    mod, _ = export(get_preset("tiny"), scheme, 1)
    ex = compile_module(mod, target)
    kernels = _kernels(_cuda_source(ex.mod))
    decode_linears = [k for k in kernels if k in ("lm_head_kernel", "linear4_kernel", "linear6_kernel")
                      or re.fullmatch(r"fused_linear\d+_add\w*_kernel", k)]
    assert {"lm_head_kernel", "linear4_kernel"} <= set(kernels), sorted(kernels)
    # dlight's GEMV: partial sums per thread (rfactor, "_rf_" buffers), then a cross-thread
    # reduction with warp shuffles. Prefill's linears (GeneralReduction) have no rfactor.
    gemv = [k for k in decode_linears if "_rf_" in kernels[k] and "__shfl" in kernels[k]]
    assert {"lm_head_kernel", "linear4_kernel"} <= set(gemv), gemv


def test_carry_dry_run_excludes_the_compiler():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_carry.py"), "--dry-run"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)["site"]
    names = {Path(f).name for f in files}
    assert {"libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_runtime_cuda.so"} <= names
    assert "libtvm_compiler.so" not in names
    assert not any("/3rdparty/" in f for f in files)


GPU_RESULTS = sorted((ROOT / "data" / "results").glob("gpu_h*.json"))


@pytest.mark.parametrize("path", GPU_RESULTS, ids=[p.name for p in GPU_RESULTS])
def test_gpu_results_schema(path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_run import REQUIRED_KEYS

    doc = json.loads(path.read_text())
    assert doc["records"], "no records"
    for rec in doc["records"]:
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        assert not missing, (rec.get("model"), missing)
        assert rec["decode_tok_per_s"] > 0 and 0 < rec["fraction_of_ceiling"] < 1.5
    assert not doc.get("errors"), doc["errors"]


def test_final_gpu_runs_are_complete():
    """The committed final runs of the current engine have every configuration the course
    reports, all correct: one H100 (the single-GPU target: the GEMV ladder, the transformers
    peer, kernel traces, with and without programmatic dependent launch) and several GPUs
    (TP = 1, 2, 4 in one run, each multi-GPU library with the one-shot all-reduce and NCCL; the
    one-shot kernel with and without PDL on two)."""
    one = json.loads((ROOT / "data" / "results" / "gpu_h100x1.json").read_text())
    assert "H100" in one["machine"]["gpu"]
    assert all(c["ok"] and c.get("greedy_tokens_equal") for c in one["correctness"])
    assert any(r["engine"].startswith("transformers") for r in one["records"])
    assert {r["linear"] for r in one["gemv"][0]["rows"]} == {"qkv_proj", "o_proj", "gate_up_proj",
                                                             "down_proj", "lm_head"}
    assert {v["name"] for v in one["gemv"][0]["variants"]} >= {"dlight", "half2", "course"}
    traced = [r for r in one["records"] if "gpu_kernels" in r]
    assert traced and all(r["gpu_kernels"]["kernel_us_per_token"] > 0 for r in traced)
    seven = {(r.get("pdl"), r.get("gemv")) for r in one["records"]
             if r["model"] == "llama2-7b" and r["quantization"] == "q4f16_1" and r.get("kv") == "static"
             and r.get("cuda_graph")}
    assert {(True, "course"), (False, "course"), (True, "dlight")} <= seven
    multi = json.loads((ROOT / "data" / "results" / "gpu_h200x4_tp4.json").read_text())
    got = {(r["model"], r["quantization"], r["shards"], r.get("allreduce")) for r in multi["records"]
           if r.get("cuda_graph")}
    for model in ("llama2-7b", "codellama-34b", "llama2-70b"):
        assert (model, "q4f16_1", 1, None) in got, model
        assert {(model, "q4f16_1", 2, "oneshot"), (model, "q4f16_1", 2, "nccl")} <= got, model
    assert {("codellama-34b", "q4f16_1", 4, "oneshot"), ("llama2-70b", "q4f16_1", 4, "oneshot"),
            ("llama2-70b", "q0f16", 4, "oneshot")} <= got
    assert all(c["ok"] for c in multi["correctness"] + multi["tp_correctness"]) and multi["tp_correctness"]
    pdl = json.loads((ROOT / "data" / "results" / "gpu_h200x2_oneshot_pdl.json").read_text())
    assert {r.get("allreduce") for r in pdl["records"] if r["shards"] == 2} == {"oneshot", "oneshot-pdl", "nccl"}
    assert all(r["allreduce_detail"]["pdl"] == (r["allreduce"] == "oneshot-pdl")
               for r in pdl["records"] if str(r.get("allreduce", "")).startswith("oneshot"))


def test_course_cuda_gemv_keeps_the_epilogue_in_the_kernel():
    """The course's CUDA GEMV schedule moves the whole epilogue chain (cast, residual add)
    into the kernel: a host-side loop over GPU memory would crash at run time."""
    import tvm
    from tvm import te

    from mlc_course.compile import get_target
    from mlc_course.quantization import te_linear
    from mlc_course.schedules import cuda_gemv_schedule

    n, k = 128, 256
    x = te.placeholder((1, 1, k), "float16", name="x")
    res = te.placeholder((1, 1, n), "float16", name="res")
    qw = te.placeholder((n, k // 8), "uint32", name="qw")
    qs = te.placeholder((n, k // 32), "float16", name="qs")
    y = te_linear(x, (qw, qs), "q4f16_1", "float16")
    z = te.compute((1, 1, n), lambda a, b, c: y[a, b, c] + res[a, b, c], name="T_add")
    sch = cuda_gemv_schedule(te.create_prim_func([x, qw, qs, res, z]), words_per_thread=1)
    lib = tvm.compile(sch.mod, target=get_target("h100"))
    src = lib.mod.imports[0].inspect_source()
    kernel = src[src.index('extern "C" __global__'):]
    assert "T_add_ptr[" in kernel and "__shfl_down_sync" in kernel
    assert "uint4" in src or "qw_local_ptr" in kernel


def test_gemv_ladder_schedules_every_llama_shape():
    """Every step of the CUDA GEMV ladder applies to each decode linear of Llama-2-7B and
    70B at TP=2 (K = 11008 and 14336 split over fewer threads) and to the lm_head."""
    from mlc_course.compile import get_target
    from mlc_course.config import get_preset
    from mlc_course.schedules import CUDA_GEMV_LADDER, schedule_gemv_variant

    target = get_target("cuda")
    shapes = set(get_preset("llama2-7b").linear_shapes_per_layer().values()) | {(32000, 4096), (8192, 14336)}
    for variant in CUDA_GEMV_LADDER:
        for n, k in sorted(shapes):
            func = schedule_gemv_variant(variant["name"], n, k, "q4f16_1", target)
            assert "blockIdx.x" in func.script(), (variant["name"], n, k)
    with pytest.raises(ValueError, match="unknown GEMV variant"):
        schedule_gemv_variant("fastest", 64, 64, "q4f16_1", target)


def test_course_group_gemv_cuda_code():
    """The group-sum GEMV as CUDA: nibbles through the 2**23 mantissa (no int-to-float
    conversion), one scale multiply per group, two rows per thread, warp shuffles."""
    import tvm

    from mlc_course.compile import get_target
    from mlc_course.quantization import MAGIC_F32, decode_gemv_func
    from mlc_course.schedules import cuda_group_gemv_schedule

    sch = cuda_group_gemv_schedule(decode_gemv_func(4096, 11008, "q4f16_1", form="group"), rows_per_thread=2)
    src = tvm.compile(sch.mod, target=get_target("h100")).mod.imports[0].inspect_source()
    kernel = src[src.index('extern "C" __global__'):]
    assert str(MAGIC_F32) in kernel and "__shfl_down_sync" in kernel
    assert "(float)((" not in kernel  # the old form converted each nibble: (float)((w >> s) & 15)
    assert "float matmul_rf_local_ptr[2]" in kernel  # two rows' partial sums per thread
    assert kernel.count("q_scale") < kernel.count("q_weight")  # a scale per group, not per weight


def test_course_half2_gemv_cuda_code():
    """The half2 GEMV as CUDA: one call of the course's device function per group and row
    (its source printed ahead of the kernel, once), one scale multiply per group."""
    import tvm

    from mlc_course.compile import compile_kernels, get_target
    from mlc_course.quantization import HALF2_DOT, decode_gemv_func
    from mlc_course.schedules import cuda_group_gemv_schedule

    sch = cuda_group_gemv_schedule(decode_gemv_func(4096, 11008, "q4f16_1", form="half2"))
    src = compile_kernels(sch.mod, get_target("h100")).mod.imports[0].inspect_source()
    kernel = src[src.index('extern "C" __global__'):]
    assert src.index(f"float {HALF2_DOT}(") < src.index('extern "C" __global__')
    assert "lop3.b32" in src and "__shfl_down_sync" in kernel
    assert src.count("#define COURSE_Q4_DOT32") == 1
    assert kernel.count(f"{HALF2_DOT}(") == 2 * 4  # two rows per thread x four unrolled steps
    assert "float matmul_rf_local_ptr[2]" in kernel  # the rows' float32 partial sums


def test_tiny_model_cuda_source_compiles_with_nvcc(tmp_path):
    """The whole tiny model's CUDA source (half2 GEMVs, attention, norms) goes through nvcc
    for the H100 here, not only on the GPU machine where a failure would cost device time."""
    import shutil

    from mlc_course.compile import compile_module, cuda_sources, get_target
    from mlc_course.config import get_preset
    from mlc_course.model import export

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed (the course's machines have it: see README)")
    mod, _ = export(get_preset("tiny"), "q4f16_1", 1, kv="static", gpu=True)
    src = "\n".join(cuda_sources(compile_module(mod, get_target("cuda")).mod))
    assert "course_q4_dot32(" in src
    (tmp_path / "tiny.cu").write_text(src)
    r = subprocess.run(["nvcc", "-cubin", "-gencode", "arch=compute_90a,code=sm_90a", "-O3",
                        "-o", str(tmp_path / "tiny.cubin"), str(tmp_path / "tiny.cu")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("prefetch", [None, 16384])
def test_kernels_that_wait_read_nothing_before_the_wait(tmp_path, prefetch):
    """With programmatic dependent launch no kernel may read through the non-coherent path
    (ld.global.nc): ptxas may move such a load above griddepcontrol.wait, before the previous
    kernel has written what it reads (seen with TVM's __restrict__ pointers). Nothing but the
    optional L2 prefetch of the GEMVs' weights comes before the wait."""
    import shutil

    from mlc_course.compile import compile_module, cuda_sources, get_target
    from mlc_course.config import get_preset
    from mlc_course.model import export

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed (the course's machines have it: see README)")
    mod, _ = export(get_preset("tiny"), "q4f16_1", 1, kv="static", gpu=True)
    (tmp_path / "tiny.cu").write_text("\n".join(cuda_sources(compile_module(mod, get_target("cuda"), prefetch=prefetch).mod)))
    r = subprocess.run(["nvcc", "-ptx", "-gencode", "arch=compute_90a,code=compute_90a", "-O3",
                        "-o", str(tmp_path / "tiny.ptx"), str(tmp_path / "tiny.cu")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = (tmp_path / "tiny.ptx").read_text().split(".entry ")[1:]
    waiting = [e for e in entries if "griddepcontrol.wait" in e]
    assert waiting and len(waiting) == len([e for e in entries if "griddepcontrol.launch_dependents" in e])

    def nc_loads(entry):  # (the CUDA math library's own constant tables, e.g. for sinf, are fine)
        regs = re.findall(r"ld\.global\.nc\.\w+\s+%\w+, \[(%rd\d+)", entry)
        return [r for r in regs if not re.search(rf"mov\.u64\s+{re.escape(r)}, __cudart_", entry)]

    assert not [e.split("(")[0] for e in waiting if nc_loads(e)]
    for e in waiting:
        before = e[:e.index("griddepcontrol.wait")]
        assert "ld.global" not in before and "st.global" not in before, e.split("(")[0]
    gemvs = [e for e in waiting if "lop3.b32" in e]
    prefetching = [e for e in entries if "cp.async.bulk.prefetch.L2" in e]
    assert gemvs and prefetching == (gemvs if prefetch else [])
    assert all(e.index("cp.async.bulk.prefetch.L2") < e.index("griddepcontrol.wait") for e in prefetching)


def test_smollm2_on_gpu_matches_cpu():
    """The committed SmolLM2 check: the engine on a GPU (static cache, graphs) gives the CPU's
    greedy tokens for float32 and float16 activations, every prompt."""
    doc = json.loads((ROOT / "data" / "results" / "gpu_smollm2.json").read_text())
    schemes = {c["scheme"] for c in doc["cases"]}
    assert {"q0f32", "q4f16_1", "q0f16"} <= schemes
    assert all(c["identical"] and c["kv"] == "static" for c in doc["cases"]), doc["cases"]


def test_gemv_ladder_reads_the_committed_run_without_a_gpu(monkeypatch):
    """Notebook 06's GEMV ladder: timed live where a GPU is usable, else the committed run,
    saying which; asking for a live run without a GPU is a clear error."""
    from mlc_course import gemv_bench
    from mlc_course.schedules import CUDA_GEMV_LADDER

    monkeypatch.setattr(gemv_bench, "gpu_here", lambda: None)
    run = gemv_bench.gemv_ladder()
    assert "committed" in run["source"] and "H100" in run["gpu"]
    assert [v["name"] for v in run["variants"]] == [v["name"] for v in CUDA_GEMV_LADDER]
    assert all(r[f"{v['name']}_GBps"] > 0 for r in run["rows"] for v in CUDA_GEMV_LADDER)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        gemv_bench.gemv_ladder(live=True)
