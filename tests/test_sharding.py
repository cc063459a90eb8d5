"""How weights split over tensor-parallel workers (mlc_course.sharding), on real stored arrays.

Every weight kind (fused QKV with its three segments, fused gate/up, row-split O and down,
replicated embedding/norms/lm_head) in every scheme, on the tiny config: splitting and joining
again gives back the same bytes; each worker's QKV slice holds exactly its heads; quantizing
then splitting equals splitting then quantizing; shard-count validation of the real presets.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from mlc_course.config import get_preset
from mlc_course.model import convert_params
from mlc_course.quantization import quantize
from mlc_course.sharding import (ShardSpec, shard_array, shard_params, shard_spec, sharding_plan,
                                 unshard_array, valid_shard_counts, validate_shards)
from mlc_course.weights import synthetic_params

SCHEMES = ("q0f32", "q4f32_1", "q4f16_1", "q4f32_asym", "q4f16_asym")
TINY = get_preset("tiny")


@functools.lru_cache(maxsize=None)
def hf_params():
    return synthetic_params(TINY, seed=1)


@functools.lru_cache(maxsize=None)
def stored(scheme):
    return convert_params(hf_params(), TINY, scheme)


def kind_of(name):
    spec = shard_spec(name, TINY)
    if spec.kind == "column":
        return "qkv" if len(spec.segments) == 3 else "gate_up"
    return spec.kind


@pytest.mark.parametrize("scheme", SCHEMES)
def test_shard_then_unshard_is_identity(scheme):
    params = stored(scheme)
    for n in valid_shard_counts(TINY, scheme, limit=8):
        parts = shard_params(params, TINY, n, scheme)
        assert len(parts) == n and all(p.keys() == params.keys() for p in parts)
        seen = set()
        for name, a in params.items():
            spec = shard_spec(name, TINY)
            seen.add(kind_of(name))
            back = unshard_array([p[name] for p in parts], spec)
            assert back.dtype == a.dtype and back.shape == a.shape
            assert back.tobytes() == a.tobytes(), (scheme, n, name)
            if spec.kind == "replicated":
                assert all(p[name] is a or np.array_equal(p[name], a) for p in parts)
            elif n > 1:
                dim = 0 if spec.kind == "column" else 1
                assert all(p[name].shape[dim] == a.shape[dim] // n for p in parts)
                assert all(p[name].flags.c_contiguous for p in parts)
        assert seen == {"qkv", "gate_up", "row", "replicated"}


@pytest.mark.parametrize("scheme", ["q0f32", "q4f16_1"])
def test_each_worker_gets_its_heads(scheme):
    """Worker r's QKV rows are Q heads, K heads and V heads of block r, in that order."""
    hf, n, d = hf_params(), 4, TINY.head_dim
    hq, hkv = TINY.num_heads // n, TINY.num_kv_heads // n
    a = "model.layers.1.self_attn."
    key = "layers.1.self_attn.qkv_proj." + ("weight" if scheme == "q0f32" else "q_weight")
    parts = shard_params(stored(scheme), TINY, n, scheme)
    for r in range(n):
        expected = np.concatenate([hf[a + "q_proj.weight"][r * hq * d:(r + 1) * hq * d],
                                   hf[a + "k_proj.weight"][r * hkv * d:(r + 1) * hkv * d],
                                   hf[a + "v_proj.weight"][r * hkv * d:(r + 1) * hkv * d]])
        np.testing.assert_array_equal(parts[r][key], quantize(expected, scheme)[0])


@pytest.mark.parametrize("scheme", ["q4f32_1", "q4f16_1", "q4f32_asym", "q4f16_asym"])
@pytest.mark.parametrize("n", [2, 4])
def test_quantize_then_shard_equals_shard_then_quantize(scheme, n):
    hf = hf_params()
    cases = [("column", hf["model.layers.0.mlp.gate_proj.weight"]),
             ("row", hf["model.layers.0.mlp.down_proj.weight"]),
             ("row", hf["model.layers.1.self_attn.o_proj.weight"])]
    for kind, w in cases:
        spec = ShardSpec(kind)
        q_weight, q_scale = quantize(w, scheme)
        for r, w_r in enumerate(shard_array(w, spec, n)):
            qw_r, qs_r = quantize(w_r, scheme)
            np.testing.assert_array_equal(shard_array(q_weight, spec, n)[r], qw_r)
            np.testing.assert_array_equal(shard_array(q_scale, spec, n)[r], qs_r)


def test_segments_must_add_up():
    with pytest.raises(ValueError, match="segments"):
        shard_array(np.zeros((10, 4)), ShardSpec("column", (4, 4)), 2)


def test_smollm2_splits_only_by_its_heads():
    cfg = get_preset("smollm2-135m")
    assert valid_shard_counts(cfg, "q4f32_1") == [1, 3]
    with pytest.raises(ValueError) as err:
        validate_shards(cfg, 2, "q4f32_1")
    msg = str(err.value)
    assert "KV heads (num_kv_heads) = 3" in msg and "heads (num_heads) = 9" in msg and "by 2" in msg
    assert msg.endswith("Shard counts that work for this model: 1, 3")
    validate_shards(cfg, 3, "q4f32_1")


@pytest.mark.parametrize("name", ["llama2-70b", "codellama-34b"])
def test_big_presets_split_4_and_8_ways(name):
    cfg = get_preset(name)
    for n in (1, 2, 4, 8):
        validate_shards(cfg, n, "q4f16_1")
    with pytest.raises(ValueError, match=r"KV heads \(num_kv_heads\) = 8 .*1, 2, 4, 8$"):
        validate_shards(cfg, 16, "q4f16_1")
    rows = {r["weight"]: r for r in sharding_plan(cfg, 8)}
    assert rows["qkv_proj"]["per_worker"] == ((cfg.num_heads + 2 * cfg.num_kv_heads) * 128 // 8, 8192)
    assert rows["down_proj"]["per_worker"] == (8192, cfg.intermediate_size // 8)
    assert [w for w, r in rows.items() if r["all_reduce_after"]] == ["o_proj", "down_proj"]


def test_bad_shard_counts():
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="positive integer"):
            validate_shards(TINY, bad)
    with pytest.raises(ValueError, match="groups of 32"):
        validate_shards(TINY, 8, "q4f16_1")  # o_proj input 128 / 8 = 16 < one group
    validate_shards(TINY, 8, "q0f32")
