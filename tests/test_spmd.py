"""mlc_course.spmd: simulated column/row-parallel layers, the relax.distributed MLP lowered and
run on disco workers, memory per device, and the pictures' data."""

from __future__ import annotations

import numpy as np
import pytest

from mlc_course import spmd
from mlc_course.collectives import CommStats, ring_allreduce
from mlc_course.config import get_preset
from mlc_course.hardware import weight_bytes
from mlc_course.model import convert_params
from mlc_course.sharding import shard_params
from mlc_course.weights import synthetic_params


def mlp_weights(hidden=16, inter=32, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, hidden)).astype(np.float32)
    w1 = rng.standard_normal((inter, hidden)).astype(np.float32)  # (out, in)
    w2 = rng.standard_normal((hidden, inter)).astype(np.float32)
    return x, w1, w2


# ------------------------------------------------------------------ simulated ranks

@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_column_and_row_parallel(n):
    x, w1, w2 = mlp_weights()
    cols = spmd.column_parallel_linear(x, w1, n)
    assert [c.shape for c in cols] == [(4, 32 // n)] * n
    np.testing.assert_allclose(np.concatenate(cols, axis=-1), x @ w1.T, rtol=1e-5, atol=1e-5)
    parts = spmd.row_parallel_linear(cols, w2)
    assert [p.shape for p in parts] == [(4, 16)] * n
    np.testing.assert_allclose(sum(parts), (x @ w1.T) @ w2.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_tp_mlp_needs_one_allreduce(n, act):
    x, w1, w2 = mlp_weights()
    res = spmd.tp_mlp(x, w1, w2, n, act)
    ref = spmd.mlp_reference(x, w1, w2, act)
    for out in res.outputs:
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        assert out.tobytes() == res.outputs[0].tobytes()
    assert res.num_allreduces == (1 if n > 1 else 0)
    assert res.trace.num_steps == 2 * (n - 1)
    np.testing.assert_allclose(np.concatenate(res.hidden, axis=-1),
                               spmd.ACTIVATIONS[act](x @ w1.T), rtol=1e-5, atol=1e-5)


def test_nonlinearity_of_partial_sums_is_wrong():
    """Why the split is column first: relu(sum of partials) != sum of relu(partials)."""
    x, w1, _ = mlp_weights()
    parts = spmd.row_parallel_linear(np.split(x, 2, axis=-1), w1)
    assert not np.allclose(sum(np.maximum(p, 0) for p in parts), np.maximum(x @ w1.T, 0))


# ------------------------------------------------------------------ relax.distributed

def test_lowering_inserts_one_allreduce():
    low = spmd.lower_mlp(n=2)
    assert list(low.stages) == ["global", "legalize", "propagate", "local_view",
                                "redistribute", "lowered"]
    prop = low.text("propagate")
    assert 'w1: R.DTensor((16, 32), "float32", "mesh[0]", "S[1]")' in prop
    assert 'w2: R.DTensor((32, 16), "float32", "mesh[0]", "S[0]")' in prop
    assert spmd.ccl_calls(low.stages["global"], "mlp") == []
    assert spmd.ccl_calls(low.stages["local_view"], "mlp") == ["allreduce"]
    assert spmd.ccl_calls(low.lowered, "mlp") == [
        "broadcast_from_worker0", "scatter_from_worker0", "scatter_from_worker0", "allreduce"]
    # the per-device matmul works on half of the hidden width
    assert "T.int64(16), T.int64(16)" in low.prim_func_text("lowered", "matmul2")


def test_placements_table():
    low = spmd.lower_mlp(n=4, inter=64)
    rows = {r["tensor"]: r for r in spmd.placements(low.stages["propagate"])}
    assert rows["w1"]["placement"] == "S[1]" and rows["w1"]["per_device"] == (16, 16)
    assert rows["w2"]["placement"] == "S[0]" and rows["w2"]["per_device"] == (16, 16)
    assert rows["x"]["placement"] == "R" and rows["(result)"]["per_device"] == (4, 16)
    assert spmd._local_shape([8, 6], "S[1], R", [2, 3]) == (8, 3)
    assert spmd.placements(low.stages["global"]) == []  # no DTensors before propagation


def test_skipping_legalize_drops_the_allreduce():
    low = spmd.lower_mlp(n=2, skip=["legalize"])
    assert "allreduce" not in spmd.ccl_calls(low.lowered, "mlp")
    with pytest.raises(ValueError, match="unknown stages"):
        spmd.lower_mlp(skip=["fuse"])


def test_ccl_calls_reads_legalized_text():
    text = 'a = R.call_dps_packed("runtime.disco.allreduce", (x, R.shape([0]), 1))'
    assert spmd.ccl_calls(text) == ["runtime.disco.allreduce"]


@pytest.mark.parametrize("n", [2, 4])
def test_lowered_mlp_runs_on_disco_workers(n):
    x, w1, w2 = mlp_weights(seed=n)
    ref = spmd.mlp_reference(x, w1, w2)
    low = spmd.lower_mlp(n=n)
    outs = spmd.run_on_workers(low.lowered, [x, w1.T.copy(), w2.T.copy()])  # Relax: (in, out)
    assert len(outs) == n
    for out in outs:
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        assert out.tobytes() == outs[0].tobytes()


def test_mlp_module_checks_divisibility():
    with pytest.raises(ValueError, match="does not split"):
        spmd.mlp_global_module(inter=30, n=4)


# ------------------------------------------------------------------ memory

@pytest.mark.parametrize("scheme", ["q0f32", "q4f16_1", "q4f32_asym"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_memory_matches_the_real_shards(scheme, n):
    cfg = get_preset("tiny")
    parts = shard_params(convert_params(synthetic_params(cfg), cfg, scheme), cfg, n, scheme)
    mem = spmd.memory_per_device(cfg, scheme, n, context=64)
    for part in parts:
        assert sum(a.nbytes for a in part.values()) == mem["weights"]
    act = 4 if "f32" in scheme else 2
    assert mem["kv_cache"] == 2 * cfg.num_layers * cfg.kv_size * 64 * act // n
    assert mem["total"] == mem["weights"] + mem["kv_cache"]


def test_llama2_70b_fits_two_24gb_cards():
    cfg = get_preset("llama2-70b")
    one = spmd.memory_per_device(cfg, "q4f16_1", 1)
    assert one["weights"] == weight_bytes(cfg, "q4f16_1")
    rows = spmd.memory_table(cfg, "q4f16_1", (1, 2, 4, 8))
    assert [r["fits 24 GB"] for r in rows] == [False, True, True, True]
    assert all(r["fits 80 GB"] for r in rows)
    # replicated weights do not shrink with n
    assert len({round(r["replicated"], 9) for r in rows}) == 1
    assert rows[-1]["sharded"] == pytest.approx(rows[0]["sharded"] / 8)


# ------------------------------------------------------------------ pictures' data

@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_progress_ends_complete(n):
    trace = CommStats()
    ring_allreduce([np.ones(12, np.float32)] * n, trace=trace)
    counts = spmd.ring_progress(trace)
    assert counts.shape == (2 * (n - 1) + 1, n, n)
    assert (counts[0] == 1).all() and (counts[-1] == n).all()
    # after the reduce-scatter, rank r holds chunk r complete
    assert all(counts[n - 1][r, r] == n for r in range(n))


def test_plots_build():
    import matplotlib

    matplotlib.use("Agg")
    trace = CommStats()
    ring_allreduce([np.ones(8, np.float32)] * 4, trace=trace)
    assert len(spmd.plot_ring_allreduce(trace).axes) == 7
    assert len(spmd.plot_sharding_plan(get_preset("llama2-70b"), 4).axes) == 4
