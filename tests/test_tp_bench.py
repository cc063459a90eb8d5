"""The GPU measurement pieces that need no GPU: random weights, records, the TP=1 vs TP=N
comparison (run here on CPU workers), the committed study, GPU discovery and the nvcc compile
callback."""
import shutil

import numpy as np
import pytest

from mlc_course import gpu, tp_bench
from mlc_course.config import get_preset


def test_random_params_shapes_dtypes_and_reuse():
    specs = [["layers.0.w_q", [8, 4], "uint32"], ["layers.0.w_q_scale", [8, 1], "float16"],
             ["layers.1.w_q", [8, 4], "uint32"], ["layers.0.norm", [16], "float16"], ["embed", [4, 16], "float16"]]
    arrays = list(tp_bench.random_params(specs))
    assert [a.shape for a in arrays] == [(8, 4), (8, 1), (8, 4), (16,), (4, 16)]
    assert [str(a.dtype) for a in arrays] == [s[2] for s in specs]
    assert arrays[2] is arrays[0]  # the same random layer for every layer
    assert 0.002 <= arrays[1].min() and arrays[1].max() <= 0.004
    assert np.all(arrays[3] == 1)
    other = list(tp_bench.random_params(specs, seed=1))
    assert not np.array_equal(other[0], arrays[0])


def test_param_specs_match_the_model():
    from mlc_course.model import export

    cfg = get_preset("tiny")
    specs = tp_bench.param_specs(cfg, "q4f16_1", 2)
    _, named = export(cfg, "q4f16_1", 2, kv="static", gpu=True, form="half2")
    assert [s[0] for s in specs] == [n for n, _ in named]
    q = next(s for s in specs if s[0].endswith("q_proj.q_weight") or s[2] == "uint32")
    assert q[2] == "uint32"


@pytest.fixture(scope="module")
def tiny_engines():
    from mlc_course.engine import Engine

    e1 = Engine("tiny", "q0f32", 1, quiet=True)
    e2 = Engine("tiny", "q0f32", 2, session="thread", quiet=True)
    yield e1, e2
    e1.close()
    e2.close()


def test_compare_tp_on_cpu_workers(tiny_engines):
    e1, e2 = tiny_engines
    rec = tp_bench.compare_tp(e1, e2, steps=6)
    assert rec["ok"] and rec["same_tokens"] and rec["shards"] == 2
    assert len(rec["tokens_tp1"]) == 6 and rec["tokens_tp2_device_greedy"] == rec["tokens_tp2"]
    assert rec["max_rel_diff"] < 1e-4


def test_decode_record_and_ceiling(tiny_engines):
    e1, _ = tiny_engines
    results, prompt = tp_bench.time_decode(e1, prompt_len=8, new_tokens=8, runs=3)
    assert len(prompt) == 8 and len(results) == 3
    rec = tp_bench.decode_record(e1, results, 100.0, 8, 8)
    bpt = get_preset("tiny").bytes_per_token("q0f32")
    assert rec["bytes_per_token"] == bpt
    assert rec["ceiling_tok_per_s"] == round(100e9 / bpt, 1)
    assert rec["decode_tok_per_s"] == sorted(rec["decode_tok_per_s_runs"])[1]
    assert rec["fraction_of_ceiling"] == round(rec["decode_tok_per_s"] / (100e9 / bpt), 4)
    for key in ("model", "quantization", "shards", "decode_tok_per_s", "bytes_per_token", "bandwidth_GBps",
                "ceiling_tok_per_s", "fraction_of_ceiling", "engine"):
        assert key in rec


def test_study_without_gpus_is_the_committed_run(monkeypatch):
    monkeypatch.setattr(gpu, "cuda_device_count", lambda: 0)
    study = tp_bench.tp_study()
    assert not study["live"] and "committed run" in study["source"]
    shards = {(r["model"], r["shards"]) for r in study["records"]}
    assert {("llama2-70b", 1), ("llama2-70b", 2), ("llama2-70b", 4)} <= shards
    assert all(r["ok"] for r in study["tp_correctness"])
    with pytest.raises(RuntimeError, match="two or more CUDA GPUs"):
        tp_bench.tp_study(live=True)


def test_arch_names_and_the_cuda_target_without_a_gpu(monkeypatch):
    from mlc_course.compile import get_target

    assert gpu.arch_of((9, 0)) == "sm_90a" and gpu.arch_of((8, 6)) == "sm_86" and gpu.arch_of((8, 0)) == "sm_80"
    monkeypatch.setattr(gpu, "local_arch", lambda index=0: None)
    assert str(get_target("cuda").attrs["arch"]) == "sm_90a"  # compiling here for a GPU machine
    monkeypatch.setattr(gpu, "local_arch", lambda index=0: "sm_80")
    assert str(get_target("cuda").attrs["arch"]) == "sm_80"  # this machine's A100: its tag
    monkeypatch.setattr(gpu, "local_arch", lambda index=0: "sm_86")
    t = get_target("cuda")
    assert str(t.attrs["arch"]) == "sm_86" and int(t.attrs["max_num_threads"]) == 1024


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed here")
def test_nvcc_compile_callback(tmp_path):
    compile_cuda = gpu.nvcc_compiler("sm_80", fatbin_dirs=[tmp_path / "carried"], cache=tmp_path / "cache")
    src = 'extern "C" __global__ void add_one(float* x) { x[threadIdx.x] += 1.0f; }\n'
    before = len(gpu.COMPILE_LOG)
    fatbin = compile_cuda(src)
    assert len(fatbin) > 100 and gpu.COMPILE_LOG[-1]["from"] == "nvcc sm_80"
    assert compile_cuda(src) == fatbin and gpu.COMPILE_LOG[-1]["from"] == "cache"
    assert len(gpu.COMPILE_LOG) == before + 2
    assert not list((tmp_path / "cache").glob("*.cu"))  # sources of finished compiles are removed
    with pytest.raises(RuntimeError, match="nvcc failed"):
        compile_cuda("this is not CUDA")


def test_live_check_file():
    """The committed run of scripts/gpu_live_check.py: the live paths worked on GPUs."""
    import json

    doc = json.loads((tp_bench.RESULTS / "gpu_live_check_h200x2.json").read_text())
    assert not doc["errors"] and not doc["tvm_runtime_only"] and doc["gpus"] >= 2
    assert all(r["agree"] == len(r["cpu_tokens"]) == 16 for r in doc["engine"])
    assert doc["gemv"]["source"].startswith("measured live") and doc["tp"]["live"]
    assert all(r["ok"] for r in doc["tp"]["tp_correctness"])
    assert {(r["model"], r["shards"]) for r in doc["tp"]["records"]} >= {("llama2-7b", 1), ("llama2-7b", 2)}
