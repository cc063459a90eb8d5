import numpy as np
import pytest

from mlc_course.config import PRESETS, config_from_gguf_metadata, config_from_hf
from mlc_course.weights import (COURSE_GGUF_SIZE, WeightsError, course_model_path, gguf_metadata, load_gguf,
                                unpermute_rope)


@pytest.fixture(scope="module")
def gguf_path():
    return course_model_path()


def test_course_model_cached_and_verified(gguf_path):
    assert gguf_path.stat().st_size == COURSE_GGUF_SIZE


def test_good_file_loads_under_hf_names(gguf_path):
    params, meta = load_gguf(gguf_path)
    cfg = config_from_gguf_metadata(meta, "smollm2-135m", tie_embeddings="lm_head.weight" not in params)
    assert cfg.to_dict() == {**PRESETS["smollm2-135m"].to_dict(), "rms_norm_eps": cfg.rms_norm_eps}
    shapes = cfg.param_shapes()
    assert set(params) == set(shapes)
    for name, shape in shapes.items():
        assert params[name].shape == shape and params[name].dtype == np.float32, name
    assert np.isfinite(params["model.layers.0.self_attn.q_proj.weight"]).all()


def test_truncated_file(gguf_path, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(gguf_path.read_bytes()[:5_000_000])
    with pytest.raises(WeightsError, match="cut.gguf.*(truncated|corrupt)"):
        load_gguf(bad)


def test_wrong_magic(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(WeightsError, match="not a GGUF file"):
        gguf_metadata(bad)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_gguf(tmp_path / "nope.gguf")


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, d, k = 3, 8, 5
    w = np.arange(n_head * d * k, dtype=np.float32).reshape(n_head * d, k)
    # llama.cpp's converter: reshape(n_head, 2, d/2, k).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, d // 2, k).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rope(permuted, n_head), w)


def test_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, '
        '"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
        '"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true}')
    cfg = config_from_hf(tmp_path, "t")
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.tie_embeddings) == (16, 2, True)
