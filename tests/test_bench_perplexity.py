"""bench.py and perplexity.py on the tiny model (synthetic weights, no tokenizer): fast."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from mlc_course import bench
from mlc_course.config import PRESETS
from mlc_course.engine import Engine
from mlc_course.perplexity import fake_quantized, perplexity, perplexity_table, token_nlls, weight_group
from mlc_course.reference import ReferenceLlama

IDS = [int(i) for i in np.random.default_rng(0).integers(0, 256, size=40)]


@pytest.fixture(scope="module")
def tiny_q0():
    with Engine("tiny", "q0f32", quiet=True) as eng:
        yield eng


def test_perplexity_is_finite_and_above_one(tiny_q0):
    p = perplexity(tiny_q0, IDS, max_tokens=32)
    assert math.isfinite(p) and p > 1
    assert token_nlls(tiny_q0, IDS, max_tokens=32).shape == (31,)  # the first token is not scored


def test_perplexity_equals_the_numpy_reference(tiny_q0):
    ref = ReferenceLlama(tiny_q0.config, tiny_q0.source.load_params())
    logits, nll = ref.prefill(IDS[:1]), []
    for tok in IDS[1:20]:
        z = logits.astype(np.float64) - logits.max()
        nll.append(-(z[tok] - np.log(np.exp(z).sum())))
        logits = ref.decode(tok)
    assert perplexity(tiny_q0, IDS, max_tokens=20) == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)


def test_perplexity_by_model_name_and_errors(tiny_q0):
    assert perplexity("tiny", IDS, max_tokens=16, quantization="q0f32") == \
        pytest.approx(perplexity(tiny_q0, IDS, max_tokens=16), rel=1e-6)
    with pytest.raises(ValueError):
        perplexity(tiny_q0, IDS[:1])
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity_table("tiny", ["q0f32"], out=None)


def test_fake_quantization_matches_the_quantized_model_and_restores(tiny_q0):
    assert weight_group("embed_tokens.weight") == "embedding"
    assert weight_group("layers.0.mlp.down_proj.weight") == "linears"
    assert weight_group("layers.0.input_layernorm") is None and weight_group("norm") is None
    before = perplexity(tiny_q0, IDS, max_tokens=24)
    with fake_quantized(tiny_q0, {"embedding": "q4f32_1", "linears": "q4f32_1"}):
        fake = perplexity(tiny_q0, IDS, max_tokens=24)
    assert perplexity(tiny_q0, IDS, max_tokens=24) == before  # weights restored
    with Engine("tiny", "q4f32_1", quiet=True) as q4:
        real = perplexity(q4, IDS, max_tokens=24)
        with pytest.raises(ValueError, match="float"):
            fake_quantized(q4, {"linears": "q4f32_1"})
    assert fake != before and fake == pytest.approx(real, rel=1e-4)


def test_cpu_bench_json(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.run_cpu_bench("tiny", ("q0f32",), new_tokens=4, out=out, repeats=1,
                              reference_steps=2, log=lambda m: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    for key in ("model", "date", "command", "machine", "bandwidth_GBps", "prompt_tokens",
                "new_tokens", "results", "reference"):
        assert key in res, key
    assert {"cpu", "cores"} <= set(res["machine"]) and res["machine"]["cores"] >= 1
    assert res["bandwidth_GBps"]["copy"] > 0
    (r,) = res["results"]
    for key in ("quantization", "bytes_per_token", "decode_tok_per_s", "ceiling_tok_per_s",
                "fraction_of_ceiling", "prefill_tok_per_s"):
        assert key in r, key
    assert r["bytes_per_token"] == PRESETS["tiny"].bytes_per_token("q0f32")
    assert len(r["output_ids"]) == 4 and r["decode_tok_per_s"] > 0
    ceiling = res["bandwidth_GBps"][res["ceiling_uses"]] * 1e9 / r["bytes_per_token"]
    assert r["ceiling_tok_per_s"] == pytest.approx(ceiling, rel=1e-2)
    assert r["fraction_of_ceiling"] == pytest.approx(r["decode_tok_per_s"] / r["ceiling_tok_per_s"], rel=1e-2)
    ref = res["reference"]
    assert ref["decode_tok_per_s"] > 0 and ref["steps"] == 2


def test_reference_decode_timing_pins_blas(tiny_q0):
    ref = ReferenceLlama(tiny_q0.config, tiny_q0.source.load_params())
    t = bench.time_reference_decode(ref, [1, 2, 3], steps=3)
    assert t["decode_tok_per_s"] > 0 and t["steps"] == 3


def test_bench_cli(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "-m", "mlc_course", "bench", "--model", "tiny",
                           "--quantization", "q0f32", "--new-tokens", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["quantization"] == "q0f32"
    assert out.exists()


def test_engines_table_and_tiny_has_no_llama_cpp(tmp_path):
    res = bench.run_cpu_bench("tiny", ("q0f32",), new_tokens=3, out=None, repeats=1,
                              reference_steps=2, log=lambda m: None)
    names = [e["engine"] for e in res["engines"]]
    assert names[0] == "mlc_course q0f32" and names[1].startswith("NumPy reference")
    assert "llama_cpp" not in res  # the tiny model has no GGUF to give llama.cpp


def test_gguf_bytes_per_token_counts_every_tensor(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a", np.zeros((4, 8), np.float32))
    w.add_tensor("b", np.zeros((16,), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert bench.gguf_bytes_per_token(path) == 4 * 8 * 4 + 16 * 2


def test_committed_cpu_bench_has_the_three_engines():
    """data/results/cpu_bench.json: the course's 4-bit schemes, the NumPy reference and
    llama.cpp measured in one run, with this machine's bandwidth."""
    res = bench.load_results()
    names = " | ".join(e["engine"] for e in res["engines"])
    for needed in ("mlc_course q4f32_1", "mlc_course q4f32_asym", "NumPy reference", "llama.cpp"):
        assert needed in names, names
    assert all(0 < e["fraction_of_ceiling"] < 1.5 for e in res["engines"])
    assert res["bandwidth_GBps"]["read_all_cores"] > 0
