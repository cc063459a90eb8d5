"""Weight quantization schemes: the NumPy reference and the same math in TVM TE.

The course's schemes follow MLC LLM's names: ``q{bits}f{float bits}_{variant}``.

* ``q0f32`` / ``q0f16``: no quantization, weights kept as float32 / float16.
* ``q4f32_1`` / ``q4f16_1``: MLC's symmetric 4-bit format. Groups of 32 consecutive
  elements along the input dimension K share one scale ``max|w| / 7``; each weight is
  stored as ``q = clip(round(w / scale) + 7, 0, 14)``, eight 4-bit values per uint32
  (element j of a word at bits 4j..4j+3). ``_1`` keeps the scale as float16 (``q4f16_1``)
  or float32 (``q4f32_1``).
* ``q4f32_asym`` / ``q4f16_asym``: asymmetric 4-bit with a scale *and* a minimum per group
  of 32, ``w = q * scale + min`` with q in 0..15, the grid of GGUF's Q4_1. The scale and
  minimum are stored together in ``q_scale`` with a trailing axis of 2.

``quantize(w, name) -> (q_weight, q_scale)`` and ``dequantize(q_weight, q_scale, name)``
are the bit-exact reference every other piece (the TE kernels, the labs, the tests) is
checked against. ``q_scale`` is ``None`` for the ``q0`` schemes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP_SIZE = 32
ELEMS_PER_WORD = 8  # eight 4-bit values in one uint32


@dataclass(frozen=True)
class Scheme:
    """What a quantization name means."""

    name: str
    bits: int  # 0 = not quantized
    float_dtype: str  # dtype of activations and of the stored scale
    symmetric: bool = True
    group_size: int = GROUP_SIZE

    @property
    def quantized(self) -> bool:
        return self.bits != 0

    def bits_per_weight(self) -> float:
        """Storage bits per weight, scales included (q4f16_1: 4 + 16/32 = 4.5)."""
        if not self.quantized:
            return float(np.dtype(self.float_dtype).itemsize * 8)
        per_group = (1 if self.symmetric else 2) * np.dtype(self.float_dtype).itemsize * 8
        return self.bits + per_group / self.group_size

    def describe(self) -> str:
        if not self.quantized:
            return f"{self.name}: {self.float_dtype} weights, no quantization"
        kind = "symmetric (scale)" if self.symmetric else "asymmetric (scale + min)"
        return (f"{self.name}: {self.bits}-bit, groups of {self.group_size}, {kind} in "
                f"{self.float_dtype}, {self.bits_per_weight():g} bits/weight")


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("q0f32", 0, "float32"),
        Scheme("q0f16", 0, "float16"),
        Scheme("q4f32_1", 4, "float32"),
        Scheme("q4f16_1", 4, "float16"),
        Scheme("q4f32_asym", 4, "float32", symmetric=False),
        Scheme("q4f16_asym", 4, "float16", symmetric=False),
    ]
}


def get_scheme(name: str) -> Scheme:
    """Look a scheme up by name; unknown names get a ValueError listing the known ones."""
    if isinstance(name, Scheme):
        return name
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization scheme {name!r}; choose one of: {', '.join(SCHEMES)}"
        ) from None


def _check_weight(w: np.ndarray, scheme: Scheme) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out N, in K), got shape {w.shape}")
    if scheme.quantized and w.shape[1] % scheme.group_size:
        raise ValueError(
            f"{scheme.name} needs the input dimension K divisible by the group size "
            f"{scheme.group_size}; this weight has K = {w.shape[1]} (shape {w.shape}). "
            f"Pad K to {-(-w.shape[1] // scheme.group_size) * scheme.group_size} or use q0f32/q0f16."
        )
    return w.astype(np.float32, copy=False)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit integers (..., K) into uint32 words (..., K/8), element j at bits 4j..4j+3."""
    q = np.asarray(q, dtype=np.uint32)
    if q.shape[-1] % ELEMS_PER_WORD:
        raise ValueError(f"last dimension {q.shape[-1]} is not a multiple of {ELEMS_PER_WORD}")
    q = q.reshape(*q.shape[:-1], -1, ELEMS_PER_WORD)
    shifts = (4 * np.arange(ELEMS_PER_WORD, dtype=np.uint32))
    return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)


def unpack_nibbles(words: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: (..., K/8) uint32 -> (..., K) uint8 values 0..15."""
    words = np.asarray(words, dtype=np.uint32)
    shifts = (4 * np.arange(ELEMS_PER_WORD, dtype=np.uint32))
    q = (words[..., None] >> shifts) & np.uint32(0xF)
    return q.reshape(*words.shape[:-1], -1).astype(np.uint8)


def quantize(w: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Quantize a float weight of shape (N out, K in).

    Returns ``(q_weight, q_scale)``: for q4 schemes ``q_weight`` is (N, K/8) uint32 and
    ``q_scale`` (N, K/32) in the scheme's float dtype (asymmetric: (N, K/32, 2) holding
    scale and minimum); for q0 schemes ``(w cast to the float dtype, None)``.
    """
    scheme = get_scheme(name)
    w = _check_weight(w, scheme)
    if not scheme.quantized:
        return w.astype(scheme.float_dtype), None
    n, k = w.shape
    g = w.reshape(n, k // scheme.group_size, scheme.group_size)
    store = np.dtype(scheme.float_dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if scheme.symmetric:
            max_abs = np.max(np.abs(g), axis=-1)
            scale = (max_abs / np.float32(7)).astype(np.float32).astype(store)
            s32 = scale.astype(np.float32)[..., None]
            q = np.round(g / s32) + np.float32(7)
            q = np.where(s32 > 0, q, np.float32(7))
            q = np.clip(np.nan_to_num(q, nan=7.0), 0, 14)
            q_scale = scale
        else:
            lo = np.min(g, axis=-1)
            hi = np.max(g, axis=-1)
            scale = ((hi - lo) / np.float32(15)).astype(np.float32).astype(store)
            lo_s = lo.astype(store)
            s32 = scale.astype(np.float32)[..., None]
            q = np.round((g - lo_s.astype(np.float32)[..., None]) / s32)
            q = np.where(s32 > 0, q, np.float32(0))
            q = np.clip(np.nan_to_num(q, nan=0.0), 0, 15)
            q_scale = np.stack([scale, lo_s], axis=-1)
    q_weight = pack_nibbles(q.astype(np.uint32).reshape(n, k))
    return q_weight, q_scale


def dequantize(q_weight: np.ndarray, q_scale: np.ndarray | None, name: str) -> np.ndarray:
    """Reconstruct float32 weights (N, K) from :func:`quantize`'s output."""
    scheme = get_scheme(name)
    if not scheme.quantized:
        return np.asarray(q_weight).astype(np.float32)
    if q_scale is None:
        raise ValueError(f"{scheme.name} needs q_scale; got None")
    q = unpack_nibbles(q_weight).astype(np.float32)
    n, k = q.shape
    q = q.reshape(n, k // scheme.group_size, scheme.group_size)
    q_scale = np.asarray(q_scale)
    if scheme.symmetric:
        w = (q - np.float32(7)) * q_scale.astype(np.float32)[..., None]
    else:
        scale = q_scale[..., 0].astype(np.float32)[..., None]
        lo = q_scale[..., 1].astype(np.float32)[..., None]
        w = q * scale + lo
    return w.reshape(n, k).astype(np.float32)


def error_bound(q_scale: np.ndarray, name: str) -> np.ndarray:
    """Per-element bound on |w - dequantize(quantize(w))|: half a grid step, per group.

    Holds when the stored scale did not round below the float32 one by more than the
    rounding allows; for float16 scales the bound gets the slack of one float16 ulp.
    """
    scheme = get_scheme(name)
    s = np.asarray(q_scale).astype(np.float32)
    step = s if scheme.symmetric else s[..., 0]
    return step / 2


def nbytes(shape: tuple[int, int], name: str) -> int:
    """Bytes a weight of shape (N, K) takes in a scheme, scales included."""
    scheme = get_scheme(name)
    n, k = shape
    return int(round(n * k * scheme.bits_per_weight() / 8))


# ---------------------------------------------------------------------------------------
# The same math as TVM tensor expressions. Used by the model (quantized linear layers) and
# by notebook 02 to show that the compiled kernel agrees bit for bit with NumPy.
# ---------------------------------------------------------------------------------------

def te_weight_element(name: str, q_weight, q_scale=None):
    """The dequantized weight as a TE element function ``f(row, col) -> float32``.

    Writing the dequantize as an element function lets every consumer put it *inside* its
    own loop: the matmul's reduction (so no float copy of the weight is ever materialised),
    the embedding's gather, or a plain elementwise dequantize.
    """
    from tvm import tirx

    scheme = get_scheme(name)
    if not scheme.quantized:
        return lambda i, j: q_weight[i, j].astype("float32")
    gs = scheme.group_size

    def nibble(i, j):
        word = q_weight[i, j // ELEMS_PER_WORD]
        shift = (j % ELEMS_PER_WORD * 4).astype("uint32")
        return ((word >> shift) & tirx.const(0xF, "uint32")).astype("float32")

    if scheme.symmetric:
        return lambda i, j: ((nibble(i, j) - tirx.const(7, "float32"))
                             * q_scale[i, j // gs].astype("float32"))
    return lambda i, j: (nibble(i, j) * q_scale[i, j // gs, 0].astype("float32")
                         + q_scale[i, j // gs, 1].astype("float32"))


def te_dequantize(q_weight, q_scale, name: str, out_dtype: str = "float32"):
    """A TE compute that dequantizes ``q_weight`` (N, K/8) with ``q_scale`` to (N, K)."""
    from tvm import te

    n, kw = q_weight.shape
    elem = te_weight_element(name, q_weight, q_scale)
    return te.compute((n, kw * ELEMS_PER_WORD), lambda i, j: elem(i, j).astype(out_dtype),
                      name="dequantize")


GEMV_FORMS = ("plain", "group", "half2", "word")


def te_linear(x, weights, name: str, out_dtype: str, form: str = "plain"):
    """``y = x @ W.T`` with W stored in scheme ``name``: one TE op, dequantize inside the sum.

    x is (b, s, K) in the activation dtype; ``weights`` are the scheme's stored arrays
    (``(weight,)`` for q0, ``(q_weight, q_scale)`` for q4). Accumulates in float32. Because
    the dequantize sits inside the reduction, TVM's fusion and dlight's GEMV rule see one
    kernel that reads 4-bit words, never a float copy of W.

    ``form`` (one of :data:`GEMV_FORMS`) writes the same sum for a schedule: ``"group"``
    (symmetric 4-bit schemes) in the form the course's CUDA GEMV schedules,
    :func:`te_linear_group_sums`; ``"half2"`` (the same, float16 activations; the GPU
    decode step) with each group's 32 products in float16 pairs,
    :func:`te_linear_half2_sums`, falling back to ``"group"`` for float32 activations;
    ``"word"`` (4-bit schemes, K a multiple of 64; the CPU decode step) in the form the
    course's CPU GEMV schedules, :func:`te_linear_word_sums`. A weight the form does not
    fit keeps the plain form.
    """
    from tvm import te

    if form not in GEMV_FORMS:
        raise ValueError(f"form must be one of {GEMV_FORMS}, got {form!r}")
    scheme = get_scheme(name)
    if form == "half2" and half2_sums_fit(x, name):
        return te_linear_half2_sums(x, weights, name, out_dtype)
    if form in ("group", "half2") and scheme.quantized and scheme.symmetric:
        return te_linear_group_sums(x, weights, name, out_dtype)
    if form == "word" and word_sums_fit(x.shape[-1], name):
        return te_linear_word_sums(x, weights, name, out_dtype)
    elem = te_weight_element(name, *weights)
    b, s, k_dim = x.shape
    n = weights[0].shape[0]
    k = te.reduce_axis((0, k_dim), name="k")
    acc = te.compute((b, s, n), lambda i, t, j: te.sum(x[i, t, k].astype("float32") * elem(j, k), axis=k),
                     name="matmul")
    return _cast(acc, out_dtype)


def _cast(acc, out_dtype: str):
    """A linear's float32 sum ``(b, s, n)``, cast to the activation dtype (a ``cast`` stage)
    unless that is float32."""
    from tvm import te

    if out_dtype == "float32":
        return acc
    return te.compute(acc.shape, lambda i, t, j: acc[i, t, j].astype(out_dtype), name="cast")


MAGIC_F32 = 0x4B000000  # the bits of 2**23 as a float32
GPU_GROUPS_PER_STEP = 32  # groups a warp reads side by side in the GPU GEMV (one per thread)


def te_nibble_minus_7(word, shift):
    """``float32(nibble - 7)`` of the 4-bit value at ``shift`` in ``word``, without an
    int-to-float conversion: OR-ing the nibble into the mantissa of 2**23 (bits 0x4B000000)
    gives the float 2**23 + q exactly, and subtracting 2**23 + 7 leaves q - 7, exactly.
    Two integer ops and one float add, all at full rate on a GPU (the conversion it
    replaces is not)."""
    from tvm import tirx

    # (word << (28 - shift)) >> 28 isolates the nibble; adding the magic bits equals OR-ing
    # them (the nibble is below bit 23). A GPU does the second shift and the add in one
    # instruction (LEA.HI), where mask-then-OR takes two.
    nib = (word << (tirx.const(28, "uint32") - shift)) >> tirx.const(28, "uint32")
    bits = nib + tirx.const(MAGIC_F32, "uint32")
    return tirx.reinterpret("float32", bits) - tirx.const(float(2**23 + 7), "float32")


def _padded_groups(groups: int) -> tuple[int, object]:
    """The GPU forms' group count, padded to a multiple of :data:`GPU_GROUPS_PER_STEP` (a
    warp shares a row's groups; K = 11008 has 344), and the map from a padded group to the
    real one it reads (a padded group reads the last real one again, cached, and counts
    zero)."""
    from tvm import tirx

    padded = groups if groups % GPU_GROUPS_PER_STEP == 0 or groups < GPU_GROUPS_PER_STEP else \
        -(-groups // GPU_GROUPS_PER_STEP) * GPU_GROUPS_PER_STEP
    return padded, (lambda g: g) if padded == groups else (lambda g: tirx.min(g, groups - 1))


def _group_layout(x, q_weight, name: str):
    """What both GPU forms need of a linear's shapes: the output shape ``(b, s, n)``, the group
    size, words per group, the real and padded group counts and the padded-to-real map."""
    gs = get_scheme(name).group_size
    b, s, k_dim = x.shape
    groups = int(k_dim) // gs
    padded, real = _padded_groups(groups)
    return (b, s, q_weight.shape[0]), gs, gs // ELEMS_PER_WORD, groups, padded, real


def _scaled_group_sum(gsum, q_scale, groups: int, padded: int, real, out_dtype: str):
    """``y[j] = sum_g scale[j, g] * group_sum[j, g]`` over the padded groups (a padded group's
    scale is zero), cast to the activation dtype."""
    from tvm import te, tirx

    def scale(j, g):
        sc = q_scale[j, real(g)].astype("float32")
        return sc if padded == groups else tirx.if_then_else(g < groups, sc, tirx.const(0.0, "float32"))

    b, s, n, _ = gsum.shape
    g = te.reduce_axis((0, padded), name="g")
    acc = te.compute((b, s, n), lambda i, t, j: te.sum(gsum[i, t, j, g] * scale(j, g), axis=g), name="matmul")
    return _cast(acc, out_dtype)


def te_linear_group_sums(x, weights, name: str, out_dtype: str):
    """The symmetric 4-bit linear with the scale taken out of the inner sum:

        y[j] = sum_g scale[j, g] * group_sum[j, g],
        group_sum[j, g] = sum_{e < 32} x[32 g + e] * (q[j, 32 g + e] - 7)

    Mathematically the same as :func:`te_linear` (both in float32; the order of the float
    additions differs, so results agree to rounding, not bit for bit). Per weight the inner
    loop is then a shift, a mask-and-OR, an add and one fused multiply-add (the nibble
    through :func:`te_nibble_minus_7`), not the seven instructions of the plain form: on a
    GPU that is what lets the GEMV keep up with the memory (notebook 06)."""
    from tvm import te

    q_weight, q_scale = weights
    (b, s, n), gs, words_per_group, groups, padded, real = _group_layout(x, q_weight, name)
    e = te.reduce_axis((0, gs), name="e")

    def q_minus_7(j, g, el):
        word = q_weight[j, real(g) * words_per_group + el // ELEMS_PER_WORD]
        return te_nibble_minus_7(word, (el % ELEMS_PER_WORD * 4).astype("uint32"))

    gsum = te.compute((b, s, n, padded), lambda i, t, j, g: te.sum(
        x[i, t, real(g) * gs + e].astype("float32") * q_minus_7(j, g, e), axis=e), name="group_sum")
    return _scaled_group_sum(gsum, q_scale, groups, padded, real, out_dtype)


#: The CUDA device function behind the ``half2`` form (:func:`te_linear_half2_sums`): one
#: group's 32 products, two weights per instruction. Each pair of nibbles (q_j, q_j+4) of a
#: word is masked and OR-ed into the mantissas of two float16 1024s with one LOP3 (bits
#: 0x64006400): the half2 (1024 + q_j, 1024 + q_j+4) for the low nibble of each byte, or
#: (1024 + 16 q_j, ...) for the high one; one HSUB2 (or one HFMA2 by 1/16) leaves q - 7,
#: exactly; one HFMA2 multiplies it by the activations (x_j, x_j+4), paired by a PRMT.
#: Products are summed in float16 pairs, 8 per pair and accumulator, then in float32.
#: The course's TIR pass prints it ahead of each kernel that calls it
#: (:mod:`mlc_course.cuda_device`; compile with :func:`mlc_course.compile.compile_kernels`).
HALF2_DOT = "course_q4_dot32"
HALF2_DOT_SOURCE = r"""
#ifndef COURSE_Q4_DOT32
#define COURSE_Q4_DOT32
#include <cuda_fp16.h>
// d = (a & mask) | bits in one instruction (nvcc emits two LOP3s when both are constants)
#ifdef __CUDA_ARCH__
#define COURSE_LOP3_AND_OR(d, a, mask, bits) \
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "n"(mask), "n"(bits))
#else
#define COURSE_LOP3_AND_OR(d, a, mask, bits) ((d) = ((a) & (mask)) | (bits))
#endif
// sum_{e < 32} x[e] * (q[e] - 7) for the 32 nibbles q of words w0..w3 (nibble e of word e / 8
// at bits 4 (e % 8)): the course's half2 decode GEMV (mlc_course.quantization)
__host__ __device__ __forceinline__ float course_q4_dot32(
    unsigned int w0, unsigned int w1, unsigned int w2, unsigned int w3,
    __half x0, __half x1, __half x2, __half x3, __half x4, __half x5, __half x6, __half x7,
    __half x8, __half x9, __half x10, __half x11, __half x12, __half x13, __half x14, __half x15,
    __half x16, __half x17, __half x18, __half x19, __half x20, __half x21, __half x22, __half x23,
    __half x24, __half x25, __half x26, __half x27, __half x28, __half x29, __half x30, __half x31) {
  const __half xs[32] = {x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
                         x16, x17, x18, x19, x20, x21, x22, x23, x24, x25, x26, x27, x28, x29, x30, x31};
  const unsigned int ws[4] = {w0, w1, w2, w3};
  const __half2 lo_sub = __half2half2(__ushort_as_half((unsigned short)0x6407));  // 1031 = 1024 + 7
  const __half2 hi_mul = __half2half2(__ushort_as_half((unsigned short)0x2C00));  // 1/16
  const __half2 hi_add = __half2half2(__ushort_as_half((unsigned short)0xD470));  // -71 = -(1024/16 + 7)
  __half2 acc[2] = {__float2half2_rn(0.f), __float2half2_rn(0.f)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    unsigned int d[4];
    COURSE_LOP3_AND_OR(d[0], ws[i], 0x000F000Fu, 0x64006400u);       // 1024 + (q0, q4)
    COURSE_LOP3_AND_OR(d[1], ws[i], 0x00F000F0u, 0x64006400u);       // 1024 + 16 (q1, q5)
    COURSE_LOP3_AND_OR(d[2], ws[i] >> 8, 0x000F000Fu, 0x64006400u);  // 1024 + (q2, q6)
    COURSE_LOP3_AND_OR(d[3], ws[i] >> 8, 0x00F000F0u, 0x64006400u);  // 1024 + 16 (q3, q7)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      __half2 h = *reinterpret_cast<__half2*>(&d[j]);
      // operators rather than __hfma2 (device only) so that tests can run this on the host;
      // nvcc contracts each multiply-add into one HFMA2
      __half2 q = (j % 2 == 0) ? h - lo_sub : h * hi_mul + hi_add;  // q - 7, exact
      acc[i / 2] = q * __halves2half2(xs[8 * i + j], xs[8 * i + j + 4]) + acc[i / 2];
    }
  }
  const float2 a = __half22float2(acc[0]), b = __half22float2(acc[1]);
  return (a.x + a.y) + (b.x + b.y);
}
#endif
"""


def half2_sums_fit(x, name: str) -> bool:
    """Whether a linear can take the ``half2`` form: a symmetric 4-bit scheme with groups of
    32 and float16 activations."""
    scheme = get_scheme(name)
    return (scheme.quantized and scheme.symmetric and scheme.group_size == 32
            and str(x.dtype) == "float16")


def te_linear_half2_sums(x, weights, name: str, out_dtype: str):
    """The group-sum form (:func:`te_linear_group_sums`) with each group's 32 products
    computed two at a time in float16 pairs, by the CUDA device function
    :data:`HALF2_DOT_SOURCE` (``group_sum`` calls it with the group's 4 words and 32
    activations; CUDA targets only, compiled through the course's TIR pipeline).

    Why: the float32 group-sum form still spends about five instructions per weight (a
    shift, a LEA, a float add, a fused multiply-add, a share of the activation's conversion),
    so the GPU's instruction issue, not its memory, set the GEMV's speed. In float16 pairs
    it is about two: a LOP3 makes two weights' float16 values from their nibbles, an HSUB2
    or HFMA2 removes the offset, an HFMA2 multiplies-adds both. The products of a group are
    summed in float16 (8 per accumulator lane, then in float32): the same precision the
    activations are stored in, and no float16 overflow unless |x| reaches about 1000 across
    a group. Not bit-identical to the float32 form; tests and the GPU runs compare it within
    float16 tolerance."""
    from tvm import te, tirx

    q_weight, q_scale = weights
    (b, s, n), gs, words_per_group, groups, padded, real = _group_layout(x, q_weight, name)

    def group_dot(i, t, j, g):
        words = [q_weight[j, real(g) * words_per_group + w] for w in range(words_per_group)]
        acts = [x[i, t, real(g) * gs + e] for e in range(gs)]
        return tirx.call_pure_extern("float32", HALF2_DOT, *words, *acts)

    gsum = te.compute((b, s, n, padded), group_dot, name="group_sum")
    return _scaled_group_sum(gsum, q_scale, groups, padded, real, out_dtype)


WORDS_PER_CHUNK = 8  # the CPU form's vector: eight consecutive words (64 weights, 2 groups)
WORD_SUM_SPLITS = 2  # independent partial sums per word lane in the CPU form (shorter FMA chains)


def word_sums_fit(k, name: str) -> bool:
    """Whether a linear with input size ``k`` can take the CPU form :func:`te_linear_word_sums`
    (a 4-bit scheme and ``k`` a static multiple of 64)."""
    from tvm import tirx

    scheme = get_scheme(name)
    if isinstance(k, tirx.IntImm):
        k = int(k)
    return (scheme.quantized and scheme.group_size == 32 and isinstance(k, int)
            and k % (WORDS_PER_CHUNK * ELEMS_PER_WORD) == 0)


def te_linear_word_sums(x, weights, name: str, out_dtype: str, splits: int = WORD_SUM_SPLITS):
    """The 4-bit linear of one token in the form the course's CPU GEMV schedules
    (:func:`mlc_course.schedules.cpu_gemv_schedule`): the nibbles are never shifted, the
    scale is applied once per word lane, not once per weight.

    K is walked in chunks of 8 consecutive words (64 weights, 2 groups); a CPU vector holds
    the 8 words, lane ``w`` the word ``8c + w``. Nibble ``e`` of every lane is taken out with
    one AND, in place (``word & (0xF << 4e)`` is the integer ``q * 16**e``), and converted to
    float32 exactly; the activations were put in the same lane order and multiplied by
    ``16**-e`` once per token (``x_lanes``; a power of two, so each product equals
    ``q * x`` bit for bit). Per weight that is an AND, a conversion and a fused multiply-add
    on full vectors (the plain form broadcasts, shifts, masks, converts, subtracts 7 and
    multiplies by the scale first). Per row and chunk:

        word_sum[j, c, h, w] = sum_{e in split h} q[j, 64c + 8w + e] * x[64c + 8w + e]
        y[j] = sum_{c, w} scale[j, 2c + w // 4] * (sum_h word_sum[j, c, h, w] - 7 * x_word_sums[c, w])

    with ``x_word_sums`` (the sums of x over each word's 8 positions) computed once per
    token and shared by every row; the asymmetric schemes add ``min * x_word_sums`` instead.
    The 8 nibbles of a word are summed in ``splits`` independent partial sums (``h``): a
    chain of 8 dependent fused multiply-adds per chunk kept the CPU waiting on their
    latency. Mathematically the same as :func:`te_linear` (products exact, float32 sums in
    another order: results agree to rounding, not bit for bit)."""
    from tvm import te, tirx

    scheme = get_scheme(name)
    q_weight, q_scale = weights
    b, s, k_dim = x.shape
    n = q_weight.shape[0]
    chunks = int(k_dim) // (WORDS_PER_CHUNK * ELEMS_PER_WORD)
    f32 = "float32"

    def pos(c, w, e):  # element of K held by nibble e of lane w in chunk c
        return (c * WORDS_PER_CHUNK + w) * ELEMS_PER_WORD + e

    def inv_16_pow(e):  # 16**-e as float32, exact: exponent bits 127 - 4e (unsigned: an index
        # dtype would be widened to int64 by create_prim_func, and a bitcast needs 32 bits)
        u32 = "uint32"
        return tirx.reinterpret(f32, (tirx.const(127, u32) - (4 * e).astype(u32)) << tirx.const(23, u32))

    x_lanes = te.compute((b, s, chunks, ELEMS_PER_WORD, WORDS_PER_CHUNK),
                         lambda i, t, c, e, w: x[i, t, pos(c, w, e)].astype(f32) * inv_16_pow(e),
                         name="x_lanes")
    e0 = te.reduce_axis((0, ELEMS_PER_WORD), name="e0")
    offset = tirx.const(7.0 if scheme.symmetric else 1.0, f32)
    x_words = te.compute((b, s, chunks, WORDS_PER_CHUNK),
                         lambda i, t, c, w: te.sum(x[i, t, pos(c, w, e0)].astype(f32) * offset, axis=e0),
                         name="x_word_sums")
    per_split = ELEMS_PER_WORD // splits
    e = te.reduce_axis((0, per_split), name="e")

    def q_times_16_pow(j, c, w, e):  # the nibble in place: q * 16**e, an exact float32
        mask = tirx.const(0xF, "uint32") << (4 * e).astype("uint32")
        return (q_weight[j, c * WORDS_PER_CHUNK + w] & mask).astype(f32)

    word_sum = te.compute((b, s, n, chunks, splits, WORDS_PER_CHUNK), lambda i, t, j, c, h, w: te.sum(
        q_times_16_pow(j, c, w, h * per_split + e) * x_lanes[i, t, c, h * per_split + e, w], axis=e),
        name="word_sum")

    def word_total(i, t, j, c, w):
        total = word_sum[i, t, j, c, 0, w]
        for h in range(1, splits):
            total = total + word_sum[i, t, j, c, h, w]
        return total
    rc = te.reduce_axis((0, chunks), name="rc")
    rw = te.reduce_axis((0, WORDS_PER_CHUNK), name="rw")
    words_per_group = scheme.group_size // ELEMS_PER_WORD

    def group(c, w):
        return c * (WORDS_PER_CHUNK // words_per_group) + w // words_per_group

    if scheme.symmetric:
        def term(i, t, j):
            return ((word_total(i, t, j, rc, rw) - x_words[i, t, rc, rw])
                    * q_scale[j, group(rc, rw)].astype(f32))
    else:
        def term(i, t, j):
            return (word_total(i, t, j, rc, rw) * q_scale[j, group(rc, rw), 0].astype(f32)
                    + x_words[i, t, rc, rw] * q_scale[j, group(rc, rw), 1].astype(f32))
    acc = te.compute((b, s, n), lambda i, t, j: te.sum(term(i, t, j), axis=[rc, rw]), name="matmul")
    return _cast(acc, out_dtype)


def decode_gemv_func(n: int, k: int, scheme: str, act_dtype: str | None = None,
                     form: str = "plain"):
    """The decode step's linear for an (n, k) weight as a PrimFunc, exactly as the model
    writes it (one TE op, dequantize inside the sum): ``x (1, 1, k) -> y (1, 1, n)``. What
    notebooks and benchmarks schedule and time on its own (``form``: see :func:`te_linear`)."""
    from tvm import te

    act_dtype = act_dtype or get_scheme(scheme).float_dtype
    x = te.placeholder((1, 1, k), act_dtype, name="x")
    w = [te.placeholder(s, d, name=nm) for nm, (s, d) in weight_arrays_shapes(n, k, scheme).items()]
    return te.create_prim_func([x, *w, te_linear(x, w, scheme, act_dtype, form=form)])


def te_embedding(ids, weights, name: str, out_dtype: str):
    """Gather rows ``ids`` (b, s) of an embedding stored in scheme ``name``, dequantized."""
    from tvm import te

    elem = te_weight_element(name, *weights)
    b, s = ids.shape
    n, kw = weights[0].shape
    h = kw if not get_scheme(name).quantized else kw * ELEMS_PER_WORD
    return te.compute((b, s, h), lambda i, t, j: elem(ids[i, t], j).astype(out_dtype), name="embedding")


def build_dequantize_cpu(shape: tuple[int, int], name: str):
    """Compile the TE dequantize for this CPU; returns a callable on NumPy arrays.

    The first use of TVM in the course: a TE compute, turned into a PrimFunc and compiled
    with ``tvm.compile`` for the host CPU.
    """
    import tvm
    from tvm import te

    scheme = get_scheme(name)
    if not scheme.quantized:
        raise ValueError(f"{scheme.name} has nothing to dequantize")
    n, k = shape
    qw = te.placeholder((n, k // ELEMS_PER_WORD), "uint32", name="q_weight")
    sshape = (n, k // scheme.group_size) + (() if scheme.symmetric else (2,))
    qs = te.placeholder(sshape, scheme.float_dtype, name="q_scale")
    out = te_dequantize(qw, qs, name)
    func = te.create_prim_func([qw, qs, out])
    from .compile import cpu_target

    lib = tvm.compile(tvm.IRModule({"main": func}), target=cpu_target())
    dev = tvm.cpu()

    def run(q_weight: np.ndarray, q_scale: np.ndarray) -> np.ndarray:
        res = tvm.runtime.empty((n, k), "float32", dev)
        lib["main"](tvm.runtime.tensor(q_weight, dev), tvm.runtime.tensor(q_scale, dev), res)
        return res.numpy()

    run.lib = lib
    run.prim_func = func
    return run


def weight_arrays_shapes(out_features: int, in_features: int, scheme_name: str) -> dict[str, tuple]:
    """Name -> (shape, dtype) of the arrays that store one (out, in) weight in a scheme."""
    s = get_scheme(scheme_name)
    if not s.quantized:
        return {"weight": ((out_features, in_features), s.float_dtype)}
    groups = in_features // s.group_size
    scale_shape = (out_features, groups) if s.symmetric else (out_features, groups, 2)
    return {"q_weight": ((out_features, in_features // ELEMS_PER_WORD), "uint32"),
            "q_scale": (scale_shape, s.float_dtype)}
