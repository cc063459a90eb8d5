import numpy as np
import pytest

from mlc_course.quantization import (SCHEMES, build_dequantize_cpu, dequantize, error_bound, get_scheme,
                                     nbytes, pack_nibbles, quantize, unpack_nibbles)

Q4 = ["q4f32_1", "q4f16_1"]


def _w(n=16, k=256, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal((n, k))).astype(np.float32)


def _reference_q4(w, store):
    """Straight from the spec, one group at a time (slow and obvious)."""
    n, k = w.shape
    q = np.zeros((n, k), np.uint32)
    scales = np.zeros((n, k // 32), store)
    for i in range(n):
        for g in range(k // 32):
            grp = w[i, g * 32:(g + 1) * 32]
            s = store(np.float32(np.max(np.abs(grp))) / np.float32(7))
            scales[i, g] = s
            if np.float32(s) == 0:
                q[i, g * 32:(g + 1) * 32] = 7
            else:
                q[i, g * 32:(g + 1) * 32] = np.clip(np.round(grp / np.float32(s)) + 7, 0, 14)
    words = np.zeros((n, k // 8), np.uint32)
    for j in range(8):
        words |= q[:, j::8] << np.uint32(4 * j)
    return words, scales


@pytest.mark.parametrize("scheme,store", [("q4f32_1", np.float32), ("q4f16_1", np.float16)])
def test_matches_spec_bit_exact(scheme, store):
    w = _w(8, 128, seed=1)
    w[0, :32] = 0.0  # an all-zero group
    w[1, 5] = 1e-9  # a tiny group member
    qw, qs = quantize(w, scheme)
    rw, rs = _reference_q4(w, store)
    assert qw.dtype == np.uint32 and qw.shape == (8, 16)
    assert qs.dtype == store and qs.shape == (8, 4)
    np.testing.assert_array_equal(qw, rw)
    np.testing.assert_array_equal(qs, rs)
    q = unpack_nibbles(qw).astype(np.float32).reshape(8, 4, 32)
    np.testing.assert_array_equal(dequantize(qw, qs, scheme), ((q - 7) * qs.astype(np.float32)[..., None]).reshape(8, 128))


def test_bit_layout_hand_built():
    # element j of each word sits at bits 4j..4j+3, element 0 lowest
    q = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]], np.uint32)
    words = pack_nibbles(q)
    assert words.tolist() == [[0x76543210, 0xFEDCBA98]]
    np.testing.assert_array_equal(unpack_nibbles(words), q)


def test_hand_built_group():
    w = np.zeros((1, 32), np.float32)
    w[0, 0], w[0, 1], w[0, 2] = 7.0, -7.0, 3.4
    qw, qs = quantize(w, "q4f32_1")
    assert qs[0, 0] == 1.0
    assert unpack_nibbles(qw)[0, :4].tolist() == [14, 0, 10, 7]  # round(3.4)=3 -> 10


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_round_trip_error_bound(scheme):
    w = _w(32, 512, seed=2, scale=0.05)
    qw, qs = quantize(w, scheme)
    d = dequantize(qw, qs, scheme)
    assert d.shape == w.shape and d.dtype == np.float32
    if not get_scheme(scheme).quantized:
        np.testing.assert_allclose(d, w, rtol=1e-3 if scheme == "q0f16" else 0, atol=1e-7)
        return
    bound = np.repeat(error_bound(qs, scheme), 32, axis=-1).reshape(w.shape)
    slack = 1e-6 if "f32" in scheme else 2e-3 * np.abs(w).max()
    assert np.all(np.abs(d - w) <= bound + slack)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if get_scheme(s).quantized])
def test_zero_group_gives_zeros_not_nan(scheme):
    w = np.zeros((2, 64), np.float32)
    d = dequantize(*quantize(w, scheme), scheme)
    assert np.all(d == 0) and not np.any(np.isnan(d))


def test_errors():
    with pytest.raises(ValueError, match="divisible by the group size 32"):
        quantize(np.ones((4, 40), np.float32), "q4f16_1")
    with pytest.raises(ValueError, match="unknown quantization scheme 'q3f16_0'"):
        quantize(np.ones((4, 64), np.float32), "q3f16_0")
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.ones(64, np.float32), "q4f16_1")


def test_sizes():
    assert get_scheme("q4f16_1").bits_per_weight() == 4.5
    assert nbytes((4096, 4096), "q4f16_1") == 4096 * 4096 * 9 // 16


@pytest.mark.parametrize("scheme", Q4 + ["q4f16_asym"])
def test_tvm_dequantize_bit_exact(scheme):
    w = _w(64, 256, seed=3)
    qw, qs = quantize(w, scheme)
    run = build_dequantize_cpu(w.shape, scheme)
    np.testing.assert_array_equal(run(qw, qs), dequantize(qw, qs, scheme))


def test_magic_number_nibble_is_exact():
    """``te_nibble_minus_7`` (OR the nibble into the mantissa of 2**23, subtract 2**23 + 7)
    gives q - 7 exactly for every nibble at every position of a word."""
    import tvm
    from tvm import te

    from mlc_course.compile import cpu_target
    from mlc_course.quantization import te_nibble_minus_7

    words = te.placeholder((16,), "uint32", name="w")
    out = te.compute((16, 8), lambda i, j: te_nibble_minus_7(words[i], (j * 4).astype("uint32")), name="out")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([words, out])}), target=cpu_target())
    # word i holds nibble (i + j) % 16 at position j
    w = np.array([sum(int((i + j) % 16) << (4 * j) for j in range(8)) for i in range(16)], dtype=np.uint32)
    res = tvm.runtime.empty((16, 8), "float32", tvm.cpu())
    lib["main"](tvm.runtime.tensor(w), res)
    expect = np.array([[float((i + j) % 16) - 7 for j in range(8)] for i in range(16)], dtype=np.float32)
    np.testing.assert_array_equal(res.numpy(), expect)


@pytest.mark.parametrize("scheme", Q4)
@pytest.mark.parametrize("k", [320, 1312])  # 10 groups; 41 groups, padded to 64 for a warp
def test_group_sum_form_matches_the_plain_linear(scheme, k):
    """The GPU decode form (scale once per group) is the same sum as the plain form; only
    the order of float additions differs."""
    import tvm

    from mlc_course.compile import cpu_target
    from mlc_course.quantization import decode_gemv_func

    n = 48
    w = _w(n, k, seed=5)
    qw, qs = quantize(w, scheme)
    x = np.random.default_rng(6).standard_normal((1, 1, k)).astype(np.float32)
    ref = x[0, 0].astype(np.float64) @ dequantize(qw, qs, scheme).T.astype(np.float64)
    outs = []
    for form in ("plain", "group"):
        f = decode_gemv_func(n, k, scheme, act_dtype="float32", form=form)
        lib = tvm.compile(tvm.IRModule({"main": f}), target=cpu_target())
        y = tvm.runtime.empty((1, 1, n), "float32", tvm.cpu())
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(qw), tvm.runtime.tensor(qs), y)
        outs.append(y.numpy()[0, 0])
    scale = np.abs(ref).max()
    assert np.abs(outs[1] - ref).max() / scale < 1e-6
    assert np.abs(outs[1] - outs[0]).max() / scale < 1e-6


@pytest.mark.parametrize("scheme", ["q4f32_1", "q4f32_asym", "q4f16_1"])
@pytest.mark.parametrize("n,k", [(48, 384), (100, 1536)])  # 100 rows: not a multiple of a task
def test_word_sum_form_matches_the_plain_linear(scheme, n, k):
    """The CPU decode form (nibbles masked in place against activations scaled by 16**-e,
    scale once per word lane), scheduled as the pipeline does, is the same sum as the plain
    form; only the order of float additions differs."""
    import tvm

    from mlc_course.compile import cpu_target
    from mlc_course.quantization import decode_gemv_func
    from mlc_course.schedules import cpu_gemv_schedule

    w = _w(n, k, seed=7)
    qw, qs = quantize(w, scheme)
    act = get_scheme(scheme).float_dtype
    x = np.random.default_rng(8).standard_normal((1, 1, k)).astype(act)
    ref = x[0, 0].astype(np.float64) @ dequantize(qw, qs, scheme).T.astype(np.float64)
    outs = []
    for form in ("plain", "word"):
        f = decode_gemv_func(n, k, scheme, form=form)
        lib = tvm.compile(cpu_gemv_schedule(f).mod, target=cpu_target())
        y = tvm.runtime.empty((1, 1, n), act, tvm.cpu())
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(qw), tvm.runtime.tensor(qs), y)
        outs.append(y.numpy()[0, 0].astype(np.float64))
    scale = np.abs(ref).max()
    tol = 1e-6 if act == "float32" else 1e-3  # float16 outputs round to 11 bits
    assert np.abs(outs[1] - ref).max() / scale < tol
    assert np.abs(outs[1] - outs[0]).max() / scale < tol


def test_word_sum_form_only_where_it_fits():
    """K not a multiple of 64 (or an unquantized scheme) keeps the plain form."""
    from mlc_course.quantization import decode_gemv_func
    from mlc_course.schedules import has_block

    assert has_block(decode_gemv_func(16, 576, "q4f32_1", form="word"), "word_sum")
    assert not has_block(decode_gemv_func(16, 544, "q4f32_1", form="word"), "word_sum")
    assert not has_block(decode_gemv_func(16, 576, "q0f32", form="word"), "word_sum")
    with pytest.raises(ValueError, match="form must be one of"):
        decode_gemv_func(16, 576, "q4f32_1", form="words")


def test_cpu_pipeline_gives_every_decode_gemv_the_course_schedule():
    """On the CPU (``build_model`` exports with ``form="word"``) the decode step's 4-bit linears
    are written in the word-sum form and the course's GEMV rule schedules each of them (a rule
    that raises falls through silently to the next one, which would still compute the right
    numbers, slowly). GPU exports keep their forms."""
    from tvm import tirx

    from mlc_course.compile import cpu_target, run_stages
    from mlc_course.config import get_preset
    from mlc_course.model import export
    from mlc_course.schedules import CpuGEMV, has_block

    target = cpu_target()
    cfg = get_preset("smollm2-135m").with_(num_layers=1)
    for kw in ({}, {"gpu": True}):
        assert not any(has_block(f, "word_sum") for _, f in export(cfg, "q4f32_1", **kw)[0].functions_items()
                       if isinstance(f, tirx.PrimFunc))
    mod, _ = export(cfg, "q4f32_1", form="word")
    mod = run_stages(mod, target, upto="fuse")
    word = {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and has_block(f, "word_sum")}
    assert len(word) == 5, sorted(word)  # qkv, o (+ residual add), gate_up, down (+ add), lm_head
    with target:
        taken = {name for name, f in word.items() if CpuGEMV().apply(f, target, False) is not None}
    assert taken == set(word), sorted(set(word) - taken)


def test_half2_device_function_matches_float64(tmp_path):
    """The half2 form's CUDA device function (float16 pairs from nibbles by LOP3 and magic
    numbers), compiled by nvcc for the host, against float64: within float16 rounding."""
    import shutil
    import subprocess

    from mlc_course.quantization import HALF2_DOT, HALF2_DOT_SOURCE

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed (the course's machines have it: see README)")
    xs = ", ".join(f"x[{e}]" for e in range(32))
    harness = HALF2_DOT_SOURCE + f"""
#include <cstdio>
int main() {{
  unsigned int w[4];
  while (scanf("%u %u %u %u", &w[0], &w[1], &w[2], &w[3]) == 4) {{
    __half x[32];
    for (int e = 0; e < 32; ++e) {{ unsigned short b; scanf("%hu", &b); x[e] = __ushort_as_half(b); }}
    printf("%.9g\\n", {HALF2_DOT}(w[0], w[1], w[2], w[3], {xs}));
  }}
}}
"""
    (tmp_path / "h.cu").write_text(harness)
    r = subprocess.run(["nvcc", "-o", str(tmp_path / "h"), str(tmp_path / "h.cu")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rng = np.random.default_rng(0)
    rows = 500
    words = rng.integers(0, 2**32, (rows, 4), dtype=np.uint64).astype(np.uint32)
    words[0] = 0  # every nibble 0: q - 7 = -7
    words[1] = 0xFFFFFFFF  # every nibble 15: q - 7 = 8
    x = (rng.standard_normal((rows, 32)) * rng.choice([0.01, 1.0, 30.0], (rows, 1))).astype(np.float16)
    lines = [" ".join(map(str, w)) + " " + " ".join(map(str, xx.view(np.uint16))) for w, xx in zip(words, x)]
    out = subprocess.run([str(tmp_path / "h")], input="\n".join(lines), capture_output=True, text=True, check=True)
    got = np.array(out.stdout.split(), dtype=np.float64)
    q = ((words[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(rows, 32).astype(np.float64) - 7
    ref = (q * x.astype(np.float64)).sum(1)
    scale = (np.abs(q) * np.abs(x.astype(np.float64))).sum(1)  # what float16 rounding is relative to
    assert got.shape == (rows,)
    assert np.all(np.abs(got - ref) <= 2e-3 * scale), np.max(np.abs(got - ref) / scale)
    assert np.abs(got[:2] - ref[:2]).max() <= 2e-3 * scale[:2].max()


def test_half2_form_needs_float16_activations():
    """The half2 form calls a CUDA device function on float16 pairs; float32 activations (or
    an asymmetric scheme) get the float32 group-sum form, or the plain one."""
    from tvm import te

    from mlc_course.quantization import HALF2_DOT, te_linear, weight_arrays_shapes

    def body(scheme, act):
        x = te.placeholder((1, 1, 256), act, name="x")
        w = [te.placeholder(s, d, name=nm) for nm, (s, d) in weight_arrays_shapes(64, 256, scheme).items()]
        return str(te.create_prim_func([x, *w, te_linear(x, w, scheme, act, form="half2")]))

    assert HALF2_DOT in body("q4f16_1", "float16")
    assert HALF2_DOT not in body("q4f32_1", "float32") and "group_sum" in body("q4f32_1", "float32")
    assert HALF2_DOT not in body("q4f16_asym", "float16") and "group_sum" not in body("q4f16_asym", "float16")
