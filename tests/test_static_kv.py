"""The static KV cache (``kv="static"``): what lets a GPU replay a decode step as one CUDA graph.

Everything here runs on the CPU: the in-place cache write, the static model against the
dynamic one (same logits, same tokens, across a reset), on one worker and on two, and the
static path's CUDA compile (its attention kernels must not be taken for GEMVs). The CUDA graph
itself needs a GPU (``scripts/gpu_run.py`` checks it against the NumPy reference there).
"""
import numpy as np
import pytest
import tvm


def test_kv_write_is_in_place_at_the_position():
    from mlc_course.model import kv_write_func

    # the new rows' heads as the RoPE kernel leaves them: one query head, then K's two, then V's two
    f = kv_write_func(16, 2, 4, "float32", gpu=False, src_heads=5, src_offsets=[1, 3])
    lib = tvm.compile(tvm.IRModule({"kv_write": f.with_attr("global_symbol", "kv_write")}), target="llvm")
    k, v = np.full((16, 2, 4), -1, "float32"), np.full((16, 2, 4), -2, "float32")
    nk = np.arange(24, dtype="float32").reshape(3, 2, 4)
    heads = np.concatenate([np.full((3, 1, 4), 99, "float32"), nk, -nk], axis=1)
    tk, tv = tvm.runtime.tensor(k), tvm.runtime.tensor(v)
    lib["kv_write"](tk, tv, tvm.runtime.tensor(heads), tvm.runtime.tensor(np.array([5], "int32")))
    rk, rv = tk.numpy(), tv.numpy()
    assert np.array_equal(rk[5:8], nk) and np.array_equal(rv[5:8], -nk)
    assert (rk[:5] == -1).all() and (rk[8:] == -1).all() and (rv[8:] == -2).all()


def _run(kv: str, scheme: str, steps: int = 8):
    from tvm.runtime.vm import VirtualMachine

    from mlc_course.compile import compile_module, cpu_target
    from mlc_course.config import get_preset
    from mlc_course.model import export

    cfg = get_preset("tiny")
    mod, params = export(cfg, scheme, 1, kv=kv)
    rng = np.random.default_rng(0)
    arrays = []
    for name, p in params:
        shape = [int(x) for x in p.shape]
        if p.dtype == "uint32":
            arrays.append(np.frombuffer(rng.bytes(4 * int(np.prod(shape))), np.uint32).reshape(shape))
        elif "scale" in name:
            arrays.append(rng.uniform(0.01, 0.03, shape).astype(p.dtype))
        else:
            arrays.append((0.3 * rng.standard_normal(shape)).astype(p.dtype))
    vm = VirtualMachine(compile_module(mod, cpu_target()), tvm.cpu())
    weights = [tvm.runtime.tensor(a) for a in arrays]
    state = {"eff": vm["_initialize_effect"]()}

    def step(fn, ids, total):
        where = (tvm.runtime.ShapeTuple([total]) if kv == "dynamic"
                 else tvm.runtime.tensor(np.array([total - len(ids)], "int32")))
        out = vm[fn](tvm.runtime.tensor(np.array([ids], "int32")), where, state["eff"], weights)
        state["eff"] = out[1]
        return out[0].numpy().reshape(-1)

    logits = []
    for prompt in ([1, 17, 42, 99, 5], [7, 3]):  # the second conversation reuses the cache
        if kv == "dynamic":
            state["eff"] = vm["_initialize_effect"]()
        lg = step("prefill", prompt, len(prompt))
        total = len(prompt)
        logits.append(lg)
        for _ in range(steps):
            total += 1
            lg = step("decode", [int(np.argmax(lg))], total)
            logits.append(lg)
    return np.array(logits)


@pytest.mark.parametrize("scheme,tol", [("q0f32", 1e-5), ("q4f16_1", 1e-2)])
def test_static_cache_equals_dynamic_cache(scheme, tol):
    dyn, sta = _run("dynamic", scheme), _run("static", scheme)
    assert np.abs(dyn - sta).max() <= tol * np.abs(dyn).max()
    assert (dyn.argmax(1) == sta.argmax(1)).all()


def test_static_cache_two_workers_equal_one():
    from mlc_course.engine import Engine

    ids = [1, 17, 42, 99, 5, 63, 7]
    with Engine("tiny", "q0f32", shards=1, kv="dynamic", quiet=True) as e:
        ref = e.generate(ids, max_new_tokens=10, stop_ids=()).output_ids
    with Engine("tiny", "q0f32", shards=2, kv="static", quiet=True) as e:
        got = e.generate(ids, max_new_tokens=10, stop_ids=()).output_ids
        again = e.generate(ids[:3], max_new_tokens=4, stop_ids=()).output_ids  # after a reset
    with Engine("tiny", "q0f32", shards=1, kv="dynamic", quiet=True) as e:
        again_ref = e.generate(ids[:3], max_new_tokens=4, stop_ids=()).output_ids
    assert got == ref and again == again_ref


def test_static_cache_capacity_is_enforced():
    from mlc_course.config import STATIC_MAX_LEN, get_preset
    from mlc_course.engine import kv_capacity

    cfg = get_preset("smollm2-135m")
    assert kv_capacity(cfg, "static") == min(cfg.context_length, STATIC_MAX_LEN)
    assert kv_capacity(cfg, "dynamic") == cfg.context_length


def test_cuda_graphs_need_cuda_and_a_static_cache(tmp_path):
    from mlc_course.engine import EngineError, LocalRunner

    with pytest.raises(EngineError, match="static-KV"):
        LocalRunner(tmp_path / "none.so", None, [], "cpu", arrays=[], kv="static", graph=True)
    with pytest.raises(EngineError, match="static-KV"):
        LocalRunner(tmp_path / "none.so", None, [], "cuda", arrays=[], kv="dynamic", graph=True)


def test_a_shape_that_does_not_fit_says_how_much(monkeypatch):
    from mlc_course import gpu
    from mlc_course.config import get_preset
    from mlc_course.engine import EngineError, check_fits

    monkeypatch.setattr(gpu, "gpu_memory", lambda i=0: (20 * 2**30, 24 * 2**30))
    with pytest.raises(EngineError, match=r"needs \d+\.\d GiB per GPU .* has 20\.0 GiB free of 24\.0 GiB"):
        check_fits(get_preset("llama2-70b"), "q4f16_1", 1, "static")
    check_fits(get_preset("llama2-7b"), "q4f16_1", 1, "static")  # 3.7 GB: fits


def test_static_decode_compiles_for_cuda_with_every_kernel_scheduled():
    """With static shapes the decode attention looks like a GEMV to dlight's rule, whose
    schedule then fails on the masked reduction; the pipeline sends it to the reduction rules."""
    from mlc_course.compile import compile_module, cuda_sources, get_target
    from mlc_course.config import get_preset
    from mlc_course.model import export

    mod, _ = export(get_preset("tiny"), "q4f16_1", 1, kv="static", gpu=True)
    ex = compile_module(mod, get_target("h100"))
    src = "\n".join(cuda_sources(ex.mod))
    for kernel in ("kv_write_kernel", "attention_scores", "qkv_rope", "rms_norm"):
        assert kernel in src, kernel
