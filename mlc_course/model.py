"""A Llama-family decoder in TVM's ``relax.frontend.nn``, quantization- and shard-aware.

One model description serves every configuration of the course:

* any weight scheme of :mod:`mlc_course.quantization` (linear layers are single TE ops with
  the dequantize inside the reduction);
* ``shards = N`` tensor-parallel workers: each worker's module holds 1/N of the attention
  heads and of the MLP, and calls an all-reduce after the attention output projection and
  after the MLP down projection (Megatron-style), input ids broadcast from worker 0. With
  ``shards = 1`` no collective is emitted, so the same module runs without disco.

Two entry points are exported: ``prefill`` (any number of new tokens) and ``decode``
(exactly one token, a static shape, so dlight's GEMV rule schedules its matmuls). Both take
``total_seq_len`` (tokens in the cache after this call) and return float32 logits of the
last position. The KV cache is ``nn.KVCache``: one growable buffer per layer for K and one
for V, appended in place by the runtime and viewed without a copy; this is how MLC LLM's
Llama ran in 2023, the period of the article the course reproduces.

``kv="static"`` swaps that cache for one fixed ``(max_len, kv_heads, head_dim)`` buffer per
layer, written in place at a position read from a device tensor, with attention masked to
the filled length. Then both entry points take ``pos`` (a ``(1,)`` int32 tensor: the index of
the first new token) instead of ``total_seq_len``, and every shape of ``decode`` is static:
a whole decode step can be captured once as a CUDA graph and replayed for every token
(:class:`mlc_course.engine.CudaGraphDecoder`), removing the host from the loop.
"""

from __future__ import annotations

import math

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .config import STATIC_MAX_LEN, LlamaConfig
from .quantization import get_scheme, te_embedding, te_linear, weight_arrays_shapes  # noqa: F401

# -------------------------------------------------------------------------- weight layers


class QuantizedWeight(nn.Module):
    """Holds the stored arrays of one weight matrix (float, or 4-bit words + scales)."""

    def __init__(self, out_features: int, in_features: int, scheme: str):
        self.scheme = scheme
        self.out_features, self.in_features = out_features, in_features
        for name, (shape, dtype) in weight_arrays_shapes(out_features, in_features, scheme).items():
            setattr(self, name, nn.Parameter(shape, dtype))

    def arrays(self) -> list[nn.Tensor]:
        if get_scheme(self.scheme).quantized:
            return [self.q_weight, self.q_scale]
        return [self.weight]


class Linear(QuantizedWeight):
    """``y = x @ W.T`` as one TE op (see :func:`mlc_course.quantization.te_linear`).

    ``form``: how a one-token input (the decode step) writes the sum, for its schedule:
    ``"plain"``, ``"group"`` or ``"half2"`` (the course's CUDA GEMV, float32 or float16 pairs)
    or ``"word"`` (the course's CPU GEMV);
    see :func:`mlc_course.quantization.te_linear`. Longer inputs (prefill) stay plain."""

    def __init__(self, out_features: int, in_features: int, scheme: str, form: str = "plain"):
        super().__init__(out_features, in_features, scheme)
        self.form = form

    def forward(self, x: nn.Tensor, out_dtype: str | None = None) -> nn.Tensor:
        out_dtype = out_dtype or x.dtype
        return op.tensor_expr_op(
            lambda xx, *w: te_linear(xx, w, self.scheme, out_dtype, form=_decode_form(xx, self.form)),
            "linear", [x, *self.arrays()])


def _decode_form(x, form: str) -> str:
    """``form`` for a TE input ``(b, s, k)`` with a static ``s == 1`` (the decode step),
    ``"plain"`` for any other."""
    s = x.shape[1]
    one = isinstance(s, tirx.IntImm) and int(s) == 1 or isinstance(s, int) and s == 1
    return form if one else "plain"


class Embedding(QuantizedWeight):
    def forward(self, ids: nn.Tensor, out_dtype: str) -> nn.Tensor:
        return op.tensor_expr_op(
            lambda ii, *w: te_embedding(ii, w, self.scheme, out_dtype),
            "embedding", [ids, *self.arrays()])


# ------------------------------------------------------------------------- small TE ops


def _rms_norm(x: nn.Tensor, weight: nn.Parameter, eps: float, gpu: bool = False) -> nn.Tensor:
    """RMSNorm computed in float32 whatever the activation dtype.

    float32 activations use Relax's ``rms_norm`` operator (notebook 06 follows it through
    legalization); float16 ones one TE kernel that reads float16 and computes in float32:
    as operators, the two casts (of the activation and of the weight) would be kernels of
    their own at every call, 4 extra launches per layer in a GPU's decode step. A GPU's
    decode step (one row) uses :func:`rms_norm_row_func` instead."""
    if x.dtype == "float32":
        return op.rms_norm(x, weight, axes=[-1], epsilon=eps)
    s, h = x.shape[1], x.shape[2]
    if gpu and isinstance(s, int) and s == 1 and isinstance(h, int) and rms_norm_row_fits(h):
        return op.tensor_ir_op(rms_norm_row_func(h, eps, x.dtype), "rms_norm_row", [x, weight],
                               nn.Tensor.placeholder([1, 1, h], x.dtype))
    return op.tensor_expr_op(lambda xx, ww: _te_rms_norm(xx, ww, eps), "rms_norm", [x, weight])


def _block_sum_macro():
    """A TVMScript macro, ``block_sum(acc, out, red, tx, warps)``: ``out[0]`` = the sum of
    every thread's ``acc[0]`` in the block, for every thread (warp shuffles, then one exchange
    through the shared ``red``, one slot per warp). The GPU decode step's hand-written kernels
    share it (``acc`` is left holding its warp's sum)."""
    from tvm.script import tirx as T

    @T.macro
    def block_sum(acc, out, red, tx, warps):
        for st in T.unroll(5):
            acc[0] = acc[0] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), acc[0], 1 << st, 32, 32)
        if tx % 32 == 0:
            red[tx // 32] = acc[0]
        T.tvm_storage_sync("shared")
        out[0] = T.float32(0)
        for w in T.unroll(warps):
            out[0] = out[0] + red[w]

    return block_sum


RMS_LANES = 8  # elements per thread in the one-row RMSNorm: one 16-byte load of float16


def rms_norm_row_fits(h: int) -> bool:
    """Whether :func:`rms_norm_row_func` takes rows of ``h`` elements (one block)."""
    return h % RMS_LANES == 0 and h // RMS_LANES <= 1024


def rms_norm_row_func(h: int, eps: float, dtype: str, residual: bool = False) -> tirx.PrimFunc:
    """RMSNorm of one row on a GPU, as plain TIR: one block, eight elements per thread. Each
    thread loads its eight activations and eight weights in one vector load each (both in
    flight together), keeps them in registers, adds its squares; the block's sum comes from
    warp shuffles and one exchange through shared memory; each thread then writes its eight
    outputs. One round trip to memory, where dlight's reduction schedule of the TE version
    (:func:`_te_rms_norm`) read the row twice (1.95 µs a call for 4096 elements on an H100,
    65 calls per 7B token).

    ``residual``: the function takes a second row ``r`` and first forms ``x + r`` (the
    residual stream after a sublayer, in the activation dtype, as the separate add would),
    writes it as a second output and normalises it (:func:`add_rms_norm`)."""
    from tvm.script import tirx as T

    lanes = RMS_LANES
    block_sum = _block_sum_macro()
    threads = -(-(h // lanes) // 32) * 32  # whole warps; threads past the row hold zeros
    warps = threads // 32
    inv_h = 1.0 / h

    @T.macro
    def body(x, r, w, y, s_out):
        with T.launch_thread("blockIdx.x", 1):
            tx = T.launch_thread("threadIdx.x", threads)
            xv = T.alloc_buffer((lanes,), dtype, scope="local")
            rv = T.alloc_buffer((lanes,), dtype, scope="local")
            wv = T.alloc_buffer((lanes,), dtype, scope="local")
            acc = T.alloc_buffer((1,), "float32", scope="local")
            red = T.alloc_buffer((warps,), "float32", scope="shared")
            for e in T.vectorized(lanes):
                xv[e] = T.if_then_else(tx * lanes < h, x[0, 0, T.min(tx * lanes, h - lanes) + e], T.Cast(dtype, 0))
            if r is not None:
                for e in T.vectorized(lanes):
                    rv[e] = T.if_then_else(tx * lanes < h, r[0, 0, T.min(tx * lanes, h - lanes) + e],
                                           T.Cast(dtype, 0))
                for e in T.unroll(lanes):
                    xv[e] = xv[e] + rv[e]
                if tx * lanes < h:
                    for e in T.vectorized(lanes):
                        s_out[0, 0, tx * lanes + e] = xv[e]
            for e in T.vectorized(lanes):
                wv[e] = w[T.min(tx * lanes, h - lanes) + e]
            acc[0] = T.float32(0)
            for e in T.unroll(lanes):
                acc[0] = acc[0] + T.Cast("float32", xv[e]) * T.Cast("float32", xv[e])
            block_sum(acc, acc, red, tx, warps)
            acc[0] = T.rsqrt(acc[0] * T.float32(inv_h) + T.float32(eps))
            for e in T.unroll(lanes):  # (scalar math: TVM 0.27 prints float32x8 wrongly)
                xv[e] = T.Cast(dtype, T.Cast("float32", xv[e]) * acc[0] * T.Cast("float32", wv[e]))
            if tx * lanes < h:
                for e in T.vectorized(lanes):
                    y[0, 0, tx * lanes + e] = xv[e]

    if residual:
        @T.prim_func(private=True)
        def add_rms_norm_row(x: T.Buffer((1, 1, h), dtype), r: T.Buffer((1, 1, h), dtype),
                             w: T.Buffer((h,), dtype), s_out: T.Buffer((1, 1, h), dtype),
                             y: T.Buffer((1, 1, h), dtype)):
            T.func_attr({"tirx.noalias": True})
            body(x, r, w, y, s_out)

        return add_rms_norm_row.with_attrs({"tirx.is_scheduled": True})

    @T.prim_func(private=True)
    def rms_norm_row(x: T.Buffer((1, 1, h), dtype), w: T.Buffer((h,), dtype), y: T.Buffer((1, 1, h), dtype)):
        T.func_attr({"tirx.noalias": True})
        body(x, None, w, y, None)

    return rms_norm_row.with_attrs({"tirx.is_scheduled": True})


def add_rms_norm(x: nn.Tensor, delta: nn.Tensor, weight: nn.Parameter, eps: float) -> tuple[nn.Tensor, nn.Tensor]:
    """``(x + delta, rms_norm(x + delta))`` in one kernel (:func:`rms_norm_row_func` with the
    residual): in a sharded decode step the residual add cannot join the GEMV before it (an
    all-reduce sits between them), so it joins the norm after it instead."""
    h = int(x.shape[2])
    return op.tensor_ir_op(rms_norm_row_func(h, eps, x.dtype, residual=True), "add_rms_norm_row",
                           [x, delta, weight],
                           [nn.Tensor.placeholder([1, 1, h], x.dtype), nn.Tensor.placeholder([1, 1, h], x.dtype)])


def _te_rms_norm(x, w, eps: float):
    """``y = x / sqrt(mean(x^2) + eps) * w`` over the last axis, float32 inside."""
    b, s, h = x.shape
    k = te.reduce_axis((0, h), name="k")
    sq = te.compute((b, s), lambda i, t: te.sum(x[i, t, k].astype("float32") * x[i, t, k].astype("float32"),
                                                 axis=k), name="sum_sq")
    inv_h = tirx.const(1.0 / int(h), "float32")
    return te.compute((b, s, h), lambda i, t, j: (
        x[i, t, j].astype("float32") * tirx.rsqrt(sq[i, t] * inv_h + tirx.const(eps, "float32"))
        * w[j].astype("float32")).astype(x.dtype), name="rms_norm")


def _te_rope(x, pos0, theta: float, head_dim: int):
    """Rotary embedding, Hugging Face convention: pairs (i, i + d/2), position pos0 + t.

    Written in TE because ``relax.frontend.nn.llm``'s RoPE helper fails in TVM 0.27.
    Angles are computed in float32 as ``pos * theta ** (-2i/d)``.
    """
    half = head_dim // 2

    def f(b, t, h, d):
        i = tirx.floormod(d, half)
        inv_freq = tirx.exp(tirx.const(-2.0 * math.log(theta) / head_dim, "float32")
                            * i.astype("float32"))
        ang = (pos0 + t).astype("float32") * inv_freq
        xf = x[b, t, h, d].astype("float32")
        rot = tirx.if_then_else(d < half, -x[b, t, h, d + half].astype("float32"),
                                x[b, t, h, d - half].astype("float32"))
        return (xf * tirx.cos(ang) + rot * tirx.sin(ang)).astype(x.dtype)

    return te.compute(x.shape, f, name="rope")


def _te_qkv_rope(qkv, pos, hq: int, hkv: int, theta: float, head_dim: int):
    """One kernel for what the dynamic path does in three (reshape + split, RoPE on q, RoPE
    on k): from the fused projection ``qkv (1, s, (hq + 2 hkv) * d)`` and the position
    tensor, the heads ``(s, hq + 2 hkv, d)``: q's ``hq`` heads and k's ``hkv`` rotated,
    then v's as they are. One output, so one kernel (three outputs made three); the cache
    write and attention read their heads from it."""
    _, s, _ = qkv.shape
    d, half = head_dim, head_dim // 2
    pos0 = pos[0].astype("int64")

    def rotated(t, col, e):  # head starting at column col, element e
        i = tirx.floormod(e, half)
        inv_freq = tirx.exp(tirx.const(-2.0 * math.log(theta) / d, "float32") * i.astype("float32"))
        ang = (pos0 + t).astype("float32") * inv_freq
        xf = qkv[0, t, col + e].astype("float32")
        rot = tirx.if_then_else(e < half, -qkv[0, t, col + e + half].astype("float32"),
                                qkv[0, t, col + e - half].astype("float32"))
        return (xf * tirx.cos(ang) + rot * tirx.sin(ang)).astype(qkv.dtype)

    return te.compute((s, hq + 2 * hkv, d), lambda t, h, e: tirx.if_then_else(
        h < hq + hkv, rotated(t, h * d, e), qkv[0, t, h * d + e]), name="qkv_heads")


def _te_attention_scores(q, k, first, scale: float, skip_masked: bool = False, num_q_heads: int | None = None):
    """scores[h, t, j] = q[t, h] . k[j, h // group] * scale, causal-masked, float32.

    Query row ``t`` is the token at position ``first + t``: it sees keys ``j <= first + t``.
    ``skip_masked`` (the static cache, whose ``k`` has ``max_len`` rows): rows past that are
    never loaded from memory: their dot product reads the row of the query's own position
    again (a cache hit) and is masked like any other, so no condition sits inside the sum.
    ``num_q_heads``: q holds more heads than that (the rotated heads of
    :func:`_te_qkv_rope`); the first ones are the queries. (The GPU decode step uses
    :func:`decode_attention_funcs` instead.)"""
    s, hq, d = q.shape
    hq = num_q_heads or hq
    n, hkv = k.shape[0], k.shape[1]
    group = hq // hkv
    r = te.reduce_axis((0, d), name="d")

    def dot(h, t, j):
        if skip_masked:  # a masked row reads the query's own row instead (cached), then is masked
            return te.sum(q[t, h, r].astype("float32") * k[tirx.min(j, first + t), h // group, r].astype("float32"),
                          axis=r)
        return te.sum(q[t, h, r].astype("float32") * k[j, h // group, r].astype("float32"), axis=r)

    raw = te.compute((hq, s, n), dot, name="qk")
    neg = tirx.const(-3.0e38, "float32")
    return te.compute((hq, s, n), lambda h, t, j: tirx.if_then_else(
        j <= first + t, raw[h, t, j] * tirx.const(scale, "float32"), neg), name="masked_scores")


def _te_attention_output(p, v, out_dtype: str, first=None):
    """out[t, h, d] = sum_j p[h, t, j] v[j, h // group, d] (``first``: rows past
    ``first + t`` have zero probability and are skipped, as in the scores)."""
    hq, s, total = p.shape
    hkv, d = v.shape[1], v.shape[2]
    group = hq // hkv
    j = te.reduce_axis((0, total), name="j")
    if first is None:
        acc = te.compute((s, hq, d), lambda t, h, dd: te.sum(
            p[h, t, j] * v[j, h // group, dd].astype("float32"), axis=j), name="pv")
    else:
        zero = tirx.const(0.0, "float32")
        acc = te.compute((s, hq, d), lambda t, h, dd: te.sum(tirx.if_then_else(
            j <= first + t, p[h, t, j] * v[j, h // group, dd].astype("float32"), zero), axis=j),
            name="pv")
    if out_dtype == "float32":
        return acc
    return te.compute(acc.shape, lambda *i: acc(*i).astype(out_dtype), name="cast")


# ---------------------------------------------------------------- static KV cache


def kv_write_func(max_len: int, num_kv_heads: int, head_dim: int, dtype: str, gpu: bool,
                  src_heads: int, src_offsets: list[int]) -> tirx.PrimFunc:
    """``cache_i[pos + t] = new[t, src_offsets[i]:...]`` for the ``s`` new rows of
    ``len(src_offsets)`` caches (K and V), *in place* (``call_tir_inplace``): one source
    ``(s, src_heads, d)`` holds all the new rows, cache ``i``'s heads from head
    ``src_offsets[i]`` on (the output of :func:`_te_qkv_rope`).

    Written as plain TIR (no schedulable block): one loop over the ``s * heads * dim``
    elements, split over CUDA blocks and threads on GPUs, storing into every cache. The
    position is read from a device tensor, never from the host: with every shape static, a
    decode step is the same sequence of kernels each time, so it can be replayed as one CUDA
    graph (see :class:`mlc_course.cuda_graph.CudaGraphDecoder`).
    """
    from tvm import te as _te

    s = tirx.Var("s", "int64")
    caches = [tirx.decl_buffer((max_len, num_kv_heads, head_dim), dtype, f"cache{i}")
              for i in range(len(src_offsets))]
    new = tirx.decl_buffer((s, src_heads, head_dim), dtype, "new")
    pos = tirx.decl_buffer((1,), "int32", "pos")
    unit = num_kv_heads * head_dim
    total = s * unit

    def store(i):
        t, r = tirx.floordiv(i, unit), tirx.floormod(i, unit)
        h, e = tirx.floordiv(r, head_dim), tirx.floormod(r, head_dim)
        row = tirx.Cast("int64", tirx.BufferLoad(pos, [tirx.const(0, "int64")])) + t
        stores = [tirx.BufferStore(c, tirx.BufferLoad(new, [t, h + off, e]), [row, h, e])
                  for c, off in zip(caches, src_offsets)]
        return tirx.SeqStmt(stores) if len(stores) > 1 else stores[0]

    if gpu:
        threads = 256
        bx, tx = _te.thread_axis("blockIdx.x"), _te.thread_axis("threadIdx.x")
        i = bx.var.astype("int64") * threads + tx.var.astype("int64")
        body = tirx.IfThenElse(i < total, store(i), None)
        body = tirx.AttrStmt(tx, "thread_extent", tirx.const(threads, "int32"), body)
        nblocks = tirx.Cast("int32", tirx.floordiv(total + threads - 1, threads))
        body = tirx.AttrStmt(bx, "thread_extent", nblocks, body)
    else:
        i = tirx.Var("i", "int64")
        body = tirx.For(i, tirx.const(0, "int64"), total, tirx.ForKind.SERIAL, store(i))
    func = tirx.PrimFunc([*caches, new, pos], body)
    # op_pattern 8 = opaque: FuseOps must not merge producers into an in-place write
    return func.with_attrs({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})


def qkv_rope_write_func(max_len: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                        theta: float, dtype: str) -> tirx.PrimFunc:
    """The GPU decode step's :func:`_te_qkv_rope` and :func:`kv_write_func` as one kernel:
    from the fused projection ``qkv (1, 1, (hq + 2 hkv) d)`` and the position, the rotated
    query heads ``q (1, hq, d)`` (a new tensor) and the rotated key and the value of the new
    token written into row ``pos`` of both caches, *in place*. A block per head, a thread
    per dimension; the same float32 arithmetic as the TE version, so the same results. One
    kernel instead of two (the copy into the caches was a kernel of its own)."""
    from tvm.script import tirx as T

    hq, hkv, d, L = num_q_heads, num_kv_heads, head_dim, max_len
    nh, half = hq + 2 * hkv, head_dim // 2
    k_freq = -2.0 * math.log(theta) / d

    @T.prim_func(private=True)
    def qkv_rope_write(kc: T.Buffer((L, hkv, d), dtype), vc: T.Buffer((L, hkv, d), dtype),
                       qkv: T.Buffer((1, 1, nh * d), dtype), pos: T.Buffer((1,), "int32"),
                       q: T.Buffer((1, hq, d), dtype)):
        T.func_attr({"tirx.noalias": True})
        with T.launch_thread("blockIdx.x", nh) as h:
            e = T.launch_thread("threadIdx.x", d)
            val = T.alloc_buffer((1,), dtype, scope="local")
            p = pos[0]
            ang = T.Cast("float32", T.Cast("int64", p)) * T.exp(T.float32(k_freq) * T.Cast("float32", e % half))
            rot = T.if_then_else(e < half, -T.Cast("float32", qkv[0, 0, h * d + e + half]),
                                 T.Cast("float32", qkv[0, 0, h * d + e - half]))
            if h < hq + hkv:
                val[0] = T.Cast(dtype, T.Cast("float32", qkv[0, 0, h * d + e]) * T.cos(ang) + rot * T.sin(ang))
            else:
                val[0] = qkv[0, 0, h * d + e]
            if h < hq:
                q[0, h, e] = val[0]
            elif h < hq + hkv:
                kc[p, h - hq, e] = val[0]
            else:
                vc[p, h - hq - hkv, e] = val[0]

    return qkv_rope_write.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


#: Cache rows per block of the GPU decode attention. Short chunks: a block's work is one
#: round trip to memory for its rows, and the blocks of chunks wholly past the position
#: return at once, so the kernel's time follows the context, not the cache's length.
DECODE_ATTENTION_CHUNK_ROWS = 32


def decode_attention_chunks(max_len: int) -> int:
    """How many chunks of cache rows the GPU decode attention splits each head into: chunks
    of :data:`DECODE_ATTENTION_CHUNK_ROWS` rows where the cache's length splits into them,
    else the fewest chunks of at least that many rows that split it evenly."""
    chunks = max(1, max_len // DECODE_ATTENTION_CHUNK_ROWS)
    while chunks > 1 and max_len % chunks:
        chunks -= 1
    return chunks


def decode_attention_funcs(max_len: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           dtype: str) -> tuple[tirx.PrimFunc, tirx.PrimFunc, int]:
    """The decode step's whole attention on a GPU (the static cache, one query row) as two
    kernels, in the manner of flash-decoding: scores, softmax and the weighted sum of the
    value rows for rows ``0 .. pos``, the rows split into chunks so that every SM has work.

    Written as plain TIR (like :func:`kv_write_func`). ``partial`` runs a CUDA block per
    (query head, chunk of rows); its threads

    1. compute one score per row of the chunk into shared memory: a team of ``head_dim / 4``
       threads reads a key row in one coalesced access, four dimensions each; each thread
       loads all of its team's key rows *and value rows* first (one round trip to memory
       for the block), then the team adds the products of every row with warp shuffles; and
       the block's maximum ``m`` (a tree in shared memory);
    2. ``p = exp(score - m)`` per row, and the block's sum ``l`` of them;
    3. ``o = sum p v`` over the chunk's value rows (already in registers), the rows split
       over groups of threads and the head's dimensions over the threads of a group (four
       each), the groups' partial sums added through shared memory;

    and writes ``o``, ``m`` and ``l``; a block whose chunk lies wholly past the position does
    nothing. ``combine`` (a block per head) rescales the chunks up to the position to their
    common maximum: ``out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c``. Rows past the
    position are never loaded.

    This replaces three kernels (the TE scores, softmax and output of
    :func:`_te_attention_scores` / :func:`_te_attention_output`, which prefill and the CPU
    still use) and the score matrices they passed through global memory. Returns
    ``(partial, combine, chunks)``."""
    from tvm.script import tirx as T

    hq, hkv, d, L = num_q_heads, num_kv_heads, head_dim, max_len
    group, lanes = hq // hkv, 4
    C = decode_attention_chunks(L)
    Lc = L // C
    threads = max(min(256, Lc), d, 32)
    if d % lanes or threads % (d // lanes) or threads & (threads - 1) or L % C:
        raise ValueError(f"head_dim {d}, {L} rows do not fit the decode attention kernel")
    dl_n = d // lanes  # threads over one row's dimensions in step 3
    jg_n = threads // dl_n  # row groups in step 3
    rows1 = -(-Lc // threads)
    rows3 = -(-Lc // jg_n)
    warps = threads // 32
    if Lc % jg_n or dl_n > 32:
        raise ValueError(f"{Lc} rows per chunk do not split into {jg_n} row groups of <= 32 threads")
    team_steps = dl_n.bit_length() - 1
    block_sum = _block_sum_macro()
    scale = 1.0 / math.sqrt(d)
    neg = -3.0e38

    @T.prim_func(private=True)
    def partial(heads: T.Buffer((1, hq, d), dtype), kc: T.Buffer((L, hkv, d), dtype),
                vc: T.Buffer((L, hkv, d), dtype), pos: T.Buffer((1,), "int32"),
                o_part: T.Buffer((hq, C, d), "float32"), ml: T.Buffer((hq, C, 2), "float32")):
        T.func_attr({"tirx.noalias": True})
        with T.launch_thread("blockIdx.x", hq * C) as b:
            tx = T.launch_thread("threadIdx.x", threads)
            score = T.alloc_buffer((Lc,), "float32", scope="shared")
            prob = T.alloc_buffer((Lc,), "float32", scope="shared")
            red = T.alloc_buffer((threads,), "float32", scope="shared")
            red4 = T.alloc_buffer((jg_n, d), "float32", scope="shared")
            part = T.alloc_buffer((lanes,), "float32", scope="local")
            qv = T.alloc_buffer((lanes,), "float32", scope="local")
            dots = T.alloc_buffer((rows3,), "float32", scope="local")
            acc = T.alloc_buffer((1,), "float32", scope="local")
            val = T.alloc_buffer((1,), "float32", scope="local")
            kr = T.alloc_buffer((rows3, lanes), dtype, scope="local")
            vr = T.alloc_buffer((rows3, lanes), dtype, scope="local")
            h = b // C
            j0 = b % C * Lc
            n = pos[0] + 1
            kvh = h // group
            # the chunk's work, done once if it holds a row up to the position (a loop, not an
            # if: TVM inserts no barriers inside a condition); combine reads no other chunk
            for _live in range(T.Cast("int32", j0 < n)):
                # 1. scores and their maximum. A team of dl_n threads reads a key row in one
                #    coalesced access (four dimensions each): every team's key and value rows
                #    are loaded first (no branch: a row past the position reads the position's
                #    row again, cached), then the teams add their products for all rows with
                #    warp shuffles.
                for e in T.vectorized(lanes):
                    qv[e] = T.Cast("float32", heads[0, h, tx % dl_n * lanes + e])
                for i in T.unroll(rows3):
                    for e in T.vectorized(lanes):
                        kr[i, e] = kc[T.min(j0 + tx // dl_n + i * jg_n, n - 1), kvh, tx % dl_n * lanes + e]
                    for e in T.vectorized(lanes):
                        vr[i, e] = vc[T.min(j0 + tx // dl_n + i * jg_n, n - 1), kvh, tx % dl_n * lanes + e]
                for i in T.unroll(rows3):
                    for e in T.vectorized(lanes):
                        part[e] = qv[e] * T.Cast("float32", kr[i, e])
                    dots[i] = part[0] + part[1] + part[2] + part[3]
                for st in T.unroll(team_steps):
                    for i in T.unroll(rows3):
                        dots[i] = dots[i] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), dots[i], 1 << st, dl_n, 32)
                acc[0] = T.float32(neg)
                for i in T.unroll(rows3):
                    r = tx // dl_n + i * jg_n
                    if j0 + r < n:
                        acc[0] = T.max(acc[0], dots[i] * T.float32(scale))
                        if tx % dl_n == 0:
                            score[r] = dots[i] * T.float32(scale)
                for st in T.unroll(5):  # the block's maximum: within each warp, then across warps
                    acc[0] = T.max(acc[0], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), acc[0], 1 << st, 32, 32))
                if tx % 32 == 0:
                    red[tx // 32] = acc[0]
                T.tvm_storage_sync("shared")
                for w in T.unroll(warps):
                    acc[0] = T.max(acc[0], red[w])
                T.tvm_storage_sync("shared")
                # 2. p = exp(score - m) and their sum l (p = 0 for rows past the position)
                for i in T.unroll(rows1):
                    r = tx + i * threads
                    if r < Lc:
                        prob[r] = T.if_then_else(j0 + r < n, T.exp(score[r] - acc[0]), T.float32(0))
                if tx == 0:
                    ml[h, b % C, 0] = acc[0]
                acc[0] = T.float32(0)
                for i in T.unroll(rows1):
                    r = tx + i * threads
                    if r < Lc and j0 + r < n:
                        acc[0] = acc[0] + prob[r]
                T.tvm_storage_sync("shared")
                block_sum(acc, val, red, tx, warps)  # the block's sum
                # 3. o = sum p v over the chunk's rows (their values loaded in step 1; a row
                #    past the position has p = 0), summed over the row groups.
                for e in T.vectorized(lanes):
                    part[e] = T.float32(0)
                for i in T.unroll(rows3):
                    r = tx // dl_n + i * jg_n
                    for e in T.vectorized(lanes):
                        part[e] = part[e] + prob[r] * T.Cast("float32", vr[i, e])
                for e in T.vectorized(lanes):
                    red4[tx // dl_n, tx % dl_n * lanes + e] = part[e]
                T.tvm_storage_sync("shared")
                if tx < d:
                    acc[0] = T.float32(0)
                    for g in T.unroll(jg_n):
                        acc[0] = acc[0] + red4[g, tx]
                    o_part[h, b % C, tx] = acc[0]
                if tx == 0:
                    ml[h, b % C, 1] = val[0]

    @T.prim_func(private=True)
    def combine(o_part: T.Buffer((hq, C, d), "float32"), ml: T.Buffer((hq, C, 2), "float32"),
                pos: T.Buffer((1,), "int32"), out: T.Buffer((1, hq, d), dtype)):
        T.func_attr({"tirx.noalias": True})
        with T.launch_thread("blockIdx.x", hq) as h:
            tx = T.launch_thread("threadIdx.x", d)
            m = T.alloc_buffer((1,), "float32", scope="local")
            num = T.alloc_buffer((1,), "float32", scope="local")
            den = T.alloc_buffer((1,), "float32", scope="local")
            val = T.alloc_buffer((1,), "float32", scope="local")
            live = pos[0] // Lc + 1  # the chunks holding rows 0 .. pos
            # unrolled and branch-free, so that all loads are in flight at once: a chunk past
            # the position (never written) reads the last live one again and weighs 0
            m[0] = T.float32(neg)
            for c in T.unroll(C):
                m[0] = T.max(m[0], ml[h, T.min(c, live - 1), 0])
            num[0] = T.float32(0)
            den[0] = T.float32(0)
            for c in T.unroll(C):
                val[0] = T.Cast("float32", c < live) * T.exp(ml[h, T.min(c, live - 1), 0] - m[0])
                num[0] = num[0] + val[0] * o_part[h, T.min(c, live - 1), tx]
                den[0] = den[0] + val[0] * ml[h, T.min(c, live - 1), 1]
            out[0, h, tx] = T.Cast(dtype, num[0] / den[0])

    attrs = {"tirx.is_scheduled": True, "op_pattern": 8}
    return partial.with_attrs(attrs), combine.with_attrs(attrs), C


def greedy_next_func(vocab: int, threads: int = 1024) -> tirx.PrimFunc:
    """The greedy step on the GPU: ``ids[0, 0] = argmax(logits)`` (the first index of the
    largest, like ``numpy.argmax``) and ``pos[0] += 1``, in place: one block whose threads
    scan the logits in coalesced strides (all loads in flight at once), then reduce
    (value, index) pairs with warp shuffles, twice. Captured in the decode step's CUDA graph
    after the step itself, it feeds the next replay without the host: the host reads four
    bytes per token instead of the logits (:class:`mlc_course.cuda_graph.CudaGraphDecoder`)."""
    from tvm.script import tirx as T

    per = -(-vocab // threads)
    warps = threads // 32

    @T.prim_func(private=True)
    def greedy_next(logits: T.Buffer((1, 1, vocab), "float32"), ids: T.Buffer((1, 1), "int32"),
                    pos: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True})
        with T.launch_thread("blockIdx.x", 1):
            tx = T.launch_thread("threadIdx.x", threads)
            best = T.alloc_buffer((1,), "float32", scope="local")
            arg = T.alloc_buffer((1,), "int32", scope="local")
            ov = T.alloc_buffer((1,), "float32", scope="local")
            oi = T.alloc_buffer((1,), "int32", scope="local")
            red_v = T.alloc_buffer((warps,), "float32", scope="shared")
            red_i = T.alloc_buffer((warps,), "int32", scope="shared")
            best[0] = T.float32(-3.0e38)
            arg[0] = vocab
            for i in T.unroll(per):
                if i * threads + tx < vocab:
                    if logits[0, 0, i * threads + tx] > best[0]:  # strictly: the first index wins
                        best[0] = logits[0, 0, i * threads + tx]
                        arg[0] = i * threads + tx
            for level in T.unroll(2):  # within each warp, then across the warps' winners
                if level == 1:
                    if tx % 32 == 0:
                        red_v[tx // 32] = best[0]
                        red_i[tx // 32] = arg[0]
                    T.tvm_storage_sync("shared")
                    best[0] = T.if_then_else(tx % 32 < warps, red_v[tx % 32 % warps], T.float32(-3.0e38))
                    arg[0] = T.if_then_else(tx % 32 < warps, red_i[tx % 32 % warps], vocab)
                for st in T.unroll(5):
                    ov[0] = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), best[0], 1 << st, 32, 32)
                    oi[0] = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), arg[0], 1 << st, 32, 32)
                    if ov[0] > best[0] or (ov[0] == best[0] and oi[0] < arg[0]):
                        best[0] = ov[0]
                        arg[0] = oi[0]
            if tx == 0:
                ids[0, 0] = arg[0]
                pos[0] = pos[0] + 1

    return greedy_next.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})


def write_kv(k_cache: "StaticKVCache", v_cache: "StaticKVCache", heads: nn.Tensor, k_head: int,
             pos: nn.Tensor) -> None:
    """Rows ``pos .. pos + s - 1`` of both caches become the K and V heads of ``heads``
    (``(s, heads, d)``, K's from head ``k_head`` on, V's right after): one kernel."""
    hkv = k_cache.unit_shape[0]
    func = kv_write_func(k_cache.max_len, *k_cache.unit_shape, k_cache.dtype, k_cache.gpu,
                         src_heads=int(heads.shape[1]), src_offsets=[k_head, k_head + hkv])
    ks, vs = op.tensor_ir_inplace_op(
        func, "kv_write", [nn.Tensor(_expr=k_cache.cache), nn.Tensor(_expr=v_cache.cache), heads, pos], [0, 1],
        [nn.Tensor.placeholder(k_cache.shape, k_cache.dtype), nn.Tensor.placeholder(v_cache.shape, v_cache.dtype)])
    k_cache.cache, v_cache.cache = ks._expr, vs._expr


class StaticKVCache(nn.Effect):
    """A fixed ``(max_len, *unit_shape)`` buffer, zero-initialised by ``_initialize_effect``,
    written in place (:func:`write_kv`) and read whole (attention masks the rows past
    the filled length). Compare ``nn.KVCache``, whose appends and views are runtime calls
    that change shapes from token to token."""

    def __init__(self, max_len: int, unit_shape: list[int], dtype: str, gpu: bool):
        self.max_len, self.unit_shape, self.dtype, self.gpu = max_len, list(unit_shape), dtype, gpu
        self.cache = None

    @property
    def shape(self) -> list[int]:
        return [self.max_len, *self.unit_shape]

    def emit_init(self, name_hint: str, bb: rx.BlockBuilder):
        return [bb.emit(rx.op.zeros(rx.ShapeExpr(self.shape), self.dtype), name_hint=name_hint)]

    def create(self, name_hint: str) -> list[rx.Var]:
        return [rx.Var(name_hint, ty=rx.TensorType(self.shape, self.dtype))]

    def set_state(self, state_vars: list[rx.Var]) -> None:
        (self.cache,) = state_vars

    def finalize(self) -> list[rx.Var]:
        result, self.cache = self.cache, None
        return [result]

    def to(self, dtype: str | None = None) -> None:
        if dtype is not None:
            self.dtype = dtype

    def full(self) -> nn.Tensor:
        return nn.Tensor(_expr=self.cache)


# ------------------------------------------------------------------------------ layers


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: str, shards: int, act_dtype: str,
                 kv: str = "dynamic", gpu: bool = False, static_max_len: int = STATIC_MAX_LEN,
                 form: str = "plain"):
        self.num_heads = cfg.num_heads // shards
        self.num_kv_heads = cfg.num_kv_heads // shards
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.shards = shards
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * cfg.head_dim
        self.qkv_proj = Linear(qkv_out, cfg.hidden_size, scheme, form)
        self.o_proj = Linear(cfg.hidden_size, self.num_heads * cfg.head_dim, scheme, form)
        unit = [self.num_kv_heads, cfg.head_dim]
        self.static = kv == "static"
        if self.static:
            max_len = min(cfg.context_length, static_max_len)
            self.k_cache = StaticKVCache(max_len, unit, act_dtype, gpu)
            self.v_cache = StaticKVCache(max_len, unit, act_dtype, gpu)
        else:
            max_len = min(cfg.context_length, 1024)  # initial capacity; the runtime grows it
            self.k_cache = nn.KVCache(max_len, unit, act_dtype)
            self.v_cache = nn.KVCache(max_len, unit, act_dtype)

    def forward(self, x: nn.Tensor, total_seq_len: tirx.Var) -> nn.Tensor:
        if self.static:  # kv="static": the position comes as a device tensor (notebook 06)
            return self._forward_static(x, total_seq_len)
        b, s, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = op.reshape(self.qkv_proj(x), (b, s, hq + 2 * hkv, d))
        q, k, v = op.split(qkv, [hq, hq + hkv], axis=2)
        rope = lambda t, total: _te_rope(t, total - t.shape[1], self.rope_theta, d)  # noqa: E731
        q = op.tensor_expr_op(rope, "rope", [q, total_seq_len])
        k = op.tensor_expr_op(rope, "rope", [k, total_seq_len])
        self.k_cache.append(op.squeeze(k, axis=0))
        self.v_cache.append(op.squeeze(v, axis=0))
        keys = self.k_cache.view(total_seq_len)
        values = self.v_cache.view(total_seq_len)
        q0 = op.squeeze(q, axis=0)
        scores = op.tensor_expr_op(
            lambda qq, kk: _te_attention_scores(qq, kk, kk.shape[0] - qq.shape[0], 1.0 / math.sqrt(d)),
            "attention_scores", [q0, keys])
        probs = op.softmax(scores, axis=-1)
        out = op.tensor_expr_op(lambda pp, vv: _te_attention_output(pp, vv, x.dtype),
                                "attention_output", [probs, values])
        return self._project(out)

    def _forward_static(self, x: nn.Tensor, pos: nn.Tensor) -> nn.Tensor:
        """The same layer over the static cache: ``pos`` is the ``(1,)`` int32 tensor of the
        first new token's position; q/k/v split + RoPE and the two cache writes are one kernel
        each; attention masks (and never loads) the rows past the position."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        first = lambda p: p[0].astype("int64")  # noqa: E731  (read on the device)
        if self.k_cache.gpu and isinstance(x.shape[1], int) and x.shape[1] == 1:  # the GPU decode step
            kc, vc = self.k_cache, self.v_cache
            keys, values, q = op.tensor_ir_inplace_op(
                qkv_rope_write_func(kc.max_len, hq, hkv, d, self.rope_theta, kc.dtype), "qkv_rope_write",
                [nn.Tensor(_expr=kc.cache), nn.Tensor(_expr=vc.cache), self.qkv_proj(x), pos], [0, 1, -1],
                [nn.Tensor.placeholder(kc.shape, kc.dtype), nn.Tensor.placeholder(vc.shape, vc.dtype),
                 nn.Tensor.placeholder([1, hq, d], x.dtype)])
            kc.cache, vc.cache = keys._expr, values._expr
            partial, combine, chunks = decode_attention_funcs(self.k_cache.max_len, hq, hkv, d, x.dtype)
            o_part, ml = op.tensor_ir_op(partial, "decode_attention", [q, keys, values, pos],
                                         [nn.Tensor.placeholder([hq, chunks, d], "float32"),
                                          nn.Tensor.placeholder([hq, chunks, 2], "float32")])
            out = op.tensor_ir_op(combine, "decode_attention_combine", [o_part, ml, pos],
                                  nn.Tensor.placeholder([1, hq, d], x.dtype))
            return self._project(out)
        heads = op.tensor_expr_op(lambda t, p: _te_qkv_rope(t, p, hq, hkv, self.rope_theta, d),
                                  "qkv_rope", [self.qkv_proj(x), pos])
        write_kv(self.k_cache, self.v_cache, heads, hq, pos)
        keys, values = self.k_cache.full(), self.v_cache.full()
        scores = op.tensor_expr_op(
            lambda qq, kk, p: _te_attention_scores(qq, kk, first(p), 1.0 / math.sqrt(d), skip_masked=True,
                                                   num_q_heads=hq),
            "attention_scores", [heads, keys, pos])
        probs = op.softmax(scores, axis=-1)
        out = op.tensor_expr_op(lambda pp, vv, p: _te_attention_output(pp, vv, x.dtype, first(p)),
                                "attention_output", [probs, values, pos])
        return self._project(out)

    def _project(self, out: nn.Tensor) -> nn.Tensor:
        """Output projection of the heads ``(s, heads, d)``, summed over workers when sharded."""
        s = out.shape[0]
        out = self.o_proj(op.reshape(out, (1, s, self.num_heads * self.head_dim)))
        if self.shards > 1:
            out = op.ccl_allreduce(out, "sum")
        return out


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: str, shards: int, form: str = "plain"):
        self.inter = cfg.intermediate_size // shards
        self.shards = shards
        self.gate_up_proj = Linear(2 * self.inter, cfg.hidden_size, scheme, form)
        self.down_proj = Linear(cfg.hidden_size, self.inter, scheme, form)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        out = self.down_proj(op.silu(gate) * up)
        if self.shards > 1:
            out = op.ccl_allreduce(out, "sum")
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: str, shards: int, act_dtype: str, **kv_opts):
        self.input_layernorm = nn.Parameter((cfg.hidden_size,), act_dtype)
        self.post_attention_layernorm = nn.Parameter((cfg.hidden_size,), act_dtype)
        self.self_attn = Attention(cfg, scheme, shards, act_dtype, **kv_opts)
        self.mlp = MLP(cfg, scheme, shards, kv_opts.get("form", "plain"))
        self.eps, self.gpu = cfg.rms_norm_eps, kv_opts.get("gpu", False)

    def forward(self, x: nn.Tensor, total_seq_len: tirx.Var) -> nn.Tensor:
        x = x + self.self_attn(_rms_norm(x, self.input_layernorm, self.eps, self.gpu), total_seq_len)
        return x + self.mlp(_rms_norm(x, self.post_attention_layernorm, self.eps, self.gpu))

    def forward_deferred(self, x: nn.Tensor, delta: nn.Tensor | None, pos: nn.Tensor):
        """The same layer with its residual adds joined to the norms after them (a sharded
        GPU decode step: :func:`add_rms_norm`). Takes the residual stream ``x`` and the
        previous layer's MLP output ``delta`` not yet added to it (None for the first layer);
        returns this layer's pair."""
        if delta is None:
            n1 = _rms_norm(x, self.input_layernorm, self.eps, self.gpu)
        else:
            x, n1 = add_rms_norm(x, delta, self.input_layernorm, self.eps)
        x, n2 = add_rms_norm(x, self.self_attn(n1, pos), self.post_attention_layernorm, self.eps)
        return x, self.mlp(n2)


class LlamaForCausalLM(nn.Module):
    """The whole decoder for one tensor-parallel worker (all of it when ``shards == 1``)."""

    def __init__(self, cfg: LlamaConfig, scheme: str, shards: int = 1, kv: str = "dynamic",
                 gpu: bool = False, static_max_len: int = STATIC_MAX_LEN, form: str | None = None):
        from .sharding import validate_shards

        validate_shards(cfg, shards, scheme)
        if kv not in KV_CHOICES:
            raise ValueError(f"kv must be one of {KV_CHOICES}, got {kv!r}")
        self.config, self.scheme_name, self.shards, self.kv, self.gpu = cfg, scheme, shards, kv, gpu
        self.act_dtype = get_scheme(scheme).float_dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, scheme)
        # the decode GEMVs' form: by default the course's CUDA GEMV's on GPUs; build_model
        # asks for the CPU GEMV's ("word") on CPUs
        self.form = form or ("half2" if gpu else "plain")
        kv_opts = {"kv": kv, "gpu": gpu, "static_max_len": static_max_len, "form": self.form}
        self.layers = nn.ModuleList([DecoderLayer(cfg, scheme, shards, self.act_dtype, **kv_opts)
                                     for _ in range(cfg.num_layers)])
        self.norm = nn.Parameter((cfg.hidden_size,), self.act_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.vocab_size, cfg.hidden_size, scheme, self.form)
        if kv == "static":  # the entry points take the position tensor instead
            self.prefill, self.decode = self._prefill_static, self._decode_static

    def _logits(self, h: nn.Tensor) -> nn.Tensor:
        head = self.embed_tokens if self.config.tie_embeddings else self.lm_head
        return op.tensor_expr_op(
            lambda xx, *w: te_linear(xx, w, self.scheme_name, "float32",
                                     form=_decode_form(xx, self.form)),
            "lm_head", [h, *head.arrays()])

    def forward(self, input_ids: nn.Tensor, position) -> nn.Tensor:
        if self.shards > 1:
            input_ids = op.ccl_broadcast_from_worker0(input_ids)
            if self.kv == "static":
                position = op.ccl_broadcast_from_worker0(position)
        h = self.embed_tokens(input_ids, self.act_dtype)
        s, width = h.shape[1], h.shape[2]
        if (self.gpu and self.shards > 1 and isinstance(s, int) and s == 1 and h.dtype == "float16"
                and isinstance(width, int) and rms_norm_row_fits(width)):
            # a sharded GPU decode step: each residual add joins the norm after it (an
            # all-reduce separates it from the GEMV it would otherwise join)
            delta = None
            for layer in self.layers:
                h, delta = layer.forward_deferred(h, delta, position)
            h = add_rms_norm(h, delta, self.norm, self.config.rms_norm_eps)[1]
        else:
            for layer in self.layers:
                h = layer(h, position)
            h = _rms_norm(h, self.norm, self.config.rms_norm_eps, self.gpu)
        s = h.shape[1]
        if not (isinstance(s, int) and s == 1):
            h = op.tensor_expr_op(  # logits of the last position only
                lambda x: te.compute((x.shape[0], 1, x.shape[2]),
                                     lambda b, t, j: x[b, x.shape[1] - 1, j], name="last"),
                "take_last", [h])
        return self._logits(h)

    def prefill(self, input_ids: nn.Tensor, total_seq_len: tirx.Var) -> nn.Tensor:
        return self.forward(input_ids, total_seq_len)

    def decode(self, input_ids: nn.Tensor, total_seq_len: tirx.Var) -> nn.Tensor:
        return self.forward(input_ids, total_seq_len)

    def _prefill_static(self, input_ids: nn.Tensor, pos: nn.Tensor) -> nn.Tensor:
        return self.forward(input_ids, pos)

    def _decode_static(self, input_ids: nn.Tensor, pos: nn.Tensor) -> nn.Tensor:
        return self.forward(input_ids, pos)

    def greedy_next(self, logits: nn.Tensor, input_ids: nn.Tensor, pos: nn.Tensor):
        """Static cache on a GPU: the decode step's next input on the device (see
        :func:`greedy_next_func`); ``input_ids`` and ``pos`` are updated in place."""
        ids, new_pos = op.tensor_ir_inplace_op(
            greedy_next_func(self.config.vocab_size), "greedy_next", [logits, input_ids, pos], [1, 2],
            [nn.Tensor.placeholder([1, 1], "int32"), nn.Tensor.placeholder([1], "int32")])
        return ids, new_pos

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        mode = {"param_mode": "packed", "effect_mode": "packed"}
        if self.kv == "static":
            where = {"pos": nn.spec.Tensor([1], "int32")}
        else:
            where = {"total_seq_len": int}
        spec = {
            "prefill": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), **where, "$": mode},
            "decode": {"input_ids": nn.spec.Tensor([1, 1], "int32"), **where, "$": mode},
        }
        if self.kv == "static" and self.gpu:
            spec["greedy_next"] = {"logits": nn.spec.Tensor([1, 1, self.config.vocab_size], "float32"),
                                   "input_ids": nn.spec.Tensor([1, 1], "int32"),
                                   "pos": nn.spec.Tensor([1], "int32"),
                                   "$": {"param_mode": "none", "effect_mode": "none"}}
        return nn.spec.ModuleSpec.from_raw(spec, self)


KV_CHOICES = ("dynamic", "static")


def export(cfg: LlamaConfig, scheme: str, shards: int = 1, kv: str = "dynamic", gpu: bool = False,
           static_max_len: int = STATIC_MAX_LEN, form: str | None = None):
    """Build the Relax IRModule and the ordered list of (parameter name, spec).

    ``kv="static"`` (see the module doc) needs ``gpu`` to say whether the in-place cache
    write is generated for a GPU (thread-bound) or a CPU (a loop); ``static_max_len`` caps
    the cache rows (the context window caps it too). ``form`` writes the decode step's 4-bit
    linears for a schedule (:func:`mlc_course.quantization.te_linear`): by default
    ``"half2"`` (the course's CUDA GEMV) with ``gpu``, else ``"plain"``; dlight's GEMV rule
    wants ``"plain"``; :func:`mlc_course.compile.build_model` asks for ``"word"`` (the
    course's CPU GEMV) on CPU targets."""
    model = LlamaForCausalLM(cfg, scheme, shards, kv=kv, gpu=gpu, static_max_len=static_max_len,
                             form=form)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    return mod, named_params


from .weights import convert_params  # noqa: E402,F401  (lives with the weights: no TVM needed)
