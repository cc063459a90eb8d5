"""hardware.py: the GPU and seed tables, the ceiling arithmetic, the measurements."""

import math

import numpy as np
import pytest

from mlc_course import hardware as H
from mlc_course.config import PRESETS
from mlc_course.quantization import SCHEMES


def test_gpu_table():
    gpus = H.load_gpus()
    for key in ["H100-SXM", "H100-PCIe", "A100-80G-PCIe", "A100-80G-SXM", "A10G", "RTX 4090",
                "RX 7900 XTX", "H200"]:
        assert key in gpus
    assert gpus["H100-SXM"].bandwidth_GBps == 3350 and gpus["H100-SXM"].memory_GB == 80
    assert gpus["A100-80G-PCIe"].bandwidth_GBps == 1935
    assert gpus["A100-80G-SXM"].bandwidth_GBps == 2039
    assert (gpus["A10G"].bandwidth_GBps, gpus["A10G"].memory_GB) == (600, 24)
    assert (gpus["RTX 4090"].bandwidth_GBps, gpus["RTX 4090"].memory_GB) == (1008, 24)
    assert (gpus["RX 7900 XTX"].bandwidth_GBps, gpus["RX 7900 XTX"].memory_GB) == (960, 24)
    assert (gpus["H200"].bandwidth_GBps, gpus["H200"].memory_GB) == (4800, 141)
    assert gpus["A10G"].fp16_tensor_TFLOPS is None and gpus["A10G"].ops_per_byte is None
    assert gpus["H100-SXM"].ops_per_byte == pytest.approx(989e12 / 3350e9)
    assert gpus["RTX 4090"].memory_bytes == 24 * 2**30
    assert all(g.source for g in gpus.values())


def test_seed_table():
    seed = H.load_seed_results()
    gpus = H.load_gpus()
    assert len(seed) == 19
    assert all(r.system == "MLC LLM" and r.source == H.SEED_SOURCE for r in seed)
    assert all(r.gpu in gpus and r.precision in SCHEMES and r.preset in PRESETS for r in seed)
    headline = {(r.model, r.precision, r.gpu, r.num_gpus): r.tok_per_s for r in seed}
    assert headline["Llama-2-70B", "q4f16_1", "RTX 4090", 2] == 34.5
    assert headline["Llama-2-70B", "q4f16_1", "RX 7900 XTX", 2] == 29.9
    assert headline["CodeLlama-34B", "q4f16_1", "A10G", 8] == 84.2
    peers = [r for r in H.load_seed_results(include_peers=True) if r.system != "MLC LLM"]
    assert {r.system for r in peers} == {"exllama", "llama.cpp", "vLLM"}
    headers, rows = H.seed_pivot(seed)
    assert len(headers) == 6 and sum(v is not None for r in rows for v in r[3:]) == len(seed)


def test_ceiling_math():
    assert H.ceiling_tok_per_s(1e9, 1000) == pytest.approx(1000.0)
    assert H.ceiling_tok_per_s(2e9, 1000, num_gpus=4) == pytest.approx(2000.0)
    with pytest.raises(ValueError):
        H.ceiling_tok_per_s(0, 1000)
    cfg = PRESETS["llama2-70b"]
    # design.md: Llama-2-70B q4f16_1 reads about 39 GB per token -> about 87 tok/s on an H100 SXM
    c = H.ceiling_tok_per_s(cfg.bytes_per_token("q4f16_1"), 3350)
    assert 80 < c < 90


def test_seed_below_ceiling():
    rows = H.seed_vs_ceiling(H.load_seed_results(), H.load_gpus(), PRESETS)
    assert len(rows) == 19
    assert all(0 < r["fraction"] < 1 for r in rows)


def test_memory_fit():
    gpus = H.load_gpus()
    cfg = PRESETS["llama2-70b"]
    q4, f16 = H.weight_bytes(cfg, "q4f16_1"), H.weight_bytes(cfg, "q0f16")
    assert q4 == pytest.approx(cfg.num_params() * 4.5 / 8, rel=0.01)
    assert f16 == pytest.approx(cfg.num_params() * 2, rel=0.001)
    assert H.min_gpus(q4, gpus["RTX 4090"], num_kv_heads=cfg.num_kv_heads) == 2
    assert H.min_gpus(f16, gpus["A10G"], num_kv_heads=cfg.num_kv_heads) == 8
    assert H.min_gpus(f16, gpus["A100-80G-PCIe"]) == 2
    assert H.min_gpus(1e15, gpus["A10G"]) is None
    assert H.min_gpus(1, gpus["A10G"], num_kv_heads=3) == 1  # 1 divides everything
    # a count must divide the KV heads: 3 KV heads allow only 1 (and 3, not offered)
    assert H.min_gpus(30 * 2**30, gpus["A10G"], num_kv_heads=3) is None
    rows = H.ceiling_rows(cfg, "q4f16_1", [gpus["A10G"], gpus["H100-SXM"]])
    assert rows[0][1] is None and rows[0][2] is not None and rows[1][1] is not None


def test_fit_bandwidth_exact_line():
    nbytes = np.array([1e8, 2e8, 4e8])
    fit = H.fit_bandwidth(nbytes, nbytes / 20e9 + 1e-4)
    assert fit.bandwidth_GBps == pytest.approx(20.0)
    assert fit.overhead_s == pytest.approx(1e-4)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.predict(3e8) == pytest.approx(3e8 / 20e9 + 1e-4)


@pytest.mark.parametrize("kind", ["copy", "read"])
def test_measure_cpu_bandwidth_small(kind):
    bw = H.measure_cpu_bandwidth(nbytes=4 * 2**20, repeats=3, kind=kind)
    assert math.isfinite(bw) and bw > 0
    with pytest.raises(ValueError):
        H.measure_cpu_bandwidth(nbytes=1024, kind="write")


def test_time_gemv_small():
    t = H.time_gemv(256, 512, repeats=3)
    assert math.isfinite(t) and t > 0
    assert H.gemv_bytes(256, 512) == (256 * 512 + 512 + 256) * 4


def test_blas_threads_restores():
    handles = H._openblas_thread_setters()
    with H.blas_threads(None) as changed:
        assert changed is False
    if handles is None:
        pytest.skip("NumPy does not link OpenBLAS here")
    before = handles[1]()
    with H.blas_threads(1) as changed:
        assert changed and handles[1]() == 1
    assert handles[1]() == before


def test_time_gemvs_round_robin():
    ts = H.time_gemvs([64, 128], 256, repeats=3)
    assert len(ts) == 2 and all(math.isfinite(t) and t > 0 for t in ts)
    assert all(t > 0 for t in H.time_gemvs([64], 256, repeats=2, threads=None, clock="wall"))


def test_pick_clock():
    import time

    assert H._pick_clock("auto", True) is time.thread_time
    assert H._pick_clock("auto", False) is time.perf_counter
    assert H._pick_clock("wall", True) is time.perf_counter
    with pytest.raises(ValueError):
        H._pick_clock("sundial", True)
