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
"""

from __future__ import annotations

import math

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from .config import LlamaConfig
from .quantization import ELEMS_PER_WORD, get_scheme, te_embedding, te_linear

# -------------------------------------------------------------------------- weight layers


def weight_arrays_shapes(out_features: int, in_features: int, scheme_name: str) -> dict[str, tuple]:
    """Name -> (shape, dtype) of the arrays that store one (out, in) weight in a scheme."""
    s = get_scheme(scheme_name)
    if not s.quantized:
        return {"weight": ((out_features, in_features), s.float_dtype)}
    groups = in_features // s.group_size
    scale_shape = (out_features, groups) if s.symmetric else (out_features, groups, 2)
    return {"q_weight": ((out_features, in_features // ELEMS_PER_WORD), "uint32"),
            "q_scale": (scale_shape, s.float_dtype)}


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
    """``y = x @ W.T`` as one TE op (see :func:`mlc_course.quantization.te_linear`)."""

    def forward(self, x: nn.Tensor, out_dtype: str | None = None) -> nn.Tensor:
        out_dtype = out_dtype or x.dtype
        return op.tensor_expr_op(
            lambda xx, *w: te_linear(xx, w, self.scheme, out_dtype),
            "linear", [x, *self.arrays()])


class Embedding(QuantizedWeight):
    def forward(self, ids: nn.Tensor, out_dtype: str) -> nn.Tensor:
        return op.tensor_expr_op(
            lambda ii, *w: te_embedding(ii, w, self.scheme, out_dtype),
            "embedding", [ids, *self.arrays()])


# ------------------------------------------------------------------------- small TE ops


def _rms_norm(x: nn.Tensor, weight: nn.Parameter, eps: float) -> nn.Tensor:
    """RMSNorm computed in float32 whatever the activation dtype."""
    dtype = x.dtype
    if dtype != "float32":
        x, weight = x.astype("float32"), weight.astype("float32")
    y = op.rms_norm(x, weight, axes=[-1], epsilon=eps)
    return y.astype(dtype) if dtype != "float32" else y


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


def _te_attention_scores(q, k, total, scale: float):
    """scores[h, t, j] = q[t, h] . k[j, h // group] * scale, causal-masked, float32."""
    s, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    r = te.reduce_axis((0, d), name="d")
    raw = te.compute((hq, s, total), lambda h, t, j: te.sum(
        q[t, h, r].astype("float32") * k[j, h // group, r].astype("float32"), axis=r), name="qk")
    neg = tirx.const(-3.0e38, "float32")
    return te.compute((hq, s, total), lambda h, t, j: tirx.if_then_else(
        j <= total - s + t, raw[h, t, j] * tirx.const(scale, "float32"), neg), name="masked_scores")


def _te_attention_output(p, v, out_dtype: str):
    """out[t, h, d] = sum_j p[h, t, j] v[j, h // group, d]."""
    hq, s, total = p.shape
    hkv, d = v.shape[1], v.shape[2]
    group = hq // hkv
    j = te.reduce_axis((0, total), name="j")
    acc = te.compute((s, hq, d), lambda t, h, dd: te.sum(
        p[h, t, j] * v[j, h // group, dd].astype("float32"), axis=j), name="pv")
    if out_dtype == "float32":
        return acc
    return te.compute(acc.shape, lambda *i: acc(*i).astype(out_dtype), name="cast")


# ------------------------------------------------------------------------------ layers


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: str, shards: int, act_dtype: str):
        self.num_heads = cfg.num_heads // shards
        self.num_kv_heads = cfg.num_kv_heads // shards
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.shards = shards
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * cfg.head_dim
        self.qkv_proj = Linear(qkv_out, cfg.hidden_size, scheme)
        self.o_proj = Linear(cfg.hidden_size, self.num_heads * cfg.head_dim, scheme)
        max_len = min(cfg.context_length, 1024)
        self.k_cache = nn.KVCache(max_len, [self.num_kv_heads, cfg.head_dim], act_dtype)
        self.v_cache = nn.KVCache(max_len, [self.num_kv_heads, cfg.head_dim], act_dtype)

    def forward(self, x: nn.Tensor, total_seq_len: tirx.Var) -> nn.Tensor:
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
            lambda qq, kk: _te_attention_scores(qq, kk, total_seq_len, 1.0 / math.sqrt(d)),
            "attention_scores", [q0, keys])
        probs = op.softmax(scores, axis=-1)
        out = op.tensor_expr_op(lambda pp, vv: _te_attention_output(pp, vv, x.dtype),
                                "attention_output", [probs, values])
        out = self.o_proj(op.reshape(out, (b, s, hq * d)))
        if self.shards > 1:
            out = op.ccl_allreduce(out, "sum")
        return out


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: str, shards: int):
        self.inter = cfg.intermediate_size // shards
        self.shards = shards
        self.gate_up_proj = Linear(2 * self.inter, cfg.hidden_size, scheme)
        self.down_proj = Linear(cfg.hidden_size, self.inter, scheme)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        out = self.down_proj(op.silu(gate) * up)
        if self.shards > 1:
            out = op.ccl_allreduce(out, "sum")
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, scheme: str, shards: int, act_dtype: str):
        self.input_layernorm = nn.Parameter((cfg.hidden_size,), act_dtype)
        self.post_attention_layernorm = nn.Parameter((cfg.hidden_size,), act_dtype)
        self.self_attn = Attention(cfg, scheme, shards, act_dtype)
        self.mlp = MLP(cfg, scheme, shards)
        self.eps = cfg.rms_norm_eps

    def forward(self, x: nn.Tensor, total_seq_len: tirx.Var) -> nn.Tensor:
        x = x + self.self_attn(_rms_norm(x, self.input_layernorm, self.eps), total_seq_len)
        return x + self.mlp(_rms_norm(x, self.post_attention_layernorm, self.eps))


class LlamaForCausalLM(nn.Module):
    """The whole decoder for one tensor-parallel worker (all of it when ``shards == 1``)."""

    def __init__(self, cfg: LlamaConfig, scheme: str, shards: int = 1):
        from .sharding import validate_shards

        validate_shards(cfg, shards, scheme)
        self.config, self.scheme_name, self.shards = cfg, scheme, shards
        self.act_dtype = get_scheme(scheme).float_dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, scheme)
        self.layers = nn.ModuleList([DecoderLayer(cfg, scheme, shards, self.act_dtype)
                                     for _ in range(cfg.num_layers)])
        self.norm = nn.Parameter((cfg.hidden_size,), self.act_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.vocab_size, cfg.hidden_size, scheme)

    def _logits(self, h: nn.Tensor) -> nn.Tensor:
        head = self.embed_tokens if self.config.tie_embeddings else self.lm_head
        return op.tensor_expr_op(
            lambda xx, *w: te_linear(xx, w, self.scheme_name, "float32"),
            "lm_head", [h, *head.arrays()])

    def forward(self, input_ids: nn.Tensor, total_seq_len: tirx.Var) -> nn.Tensor:
        if self.shards > 1:
            input_ids = op.ccl_broadcast_from_worker0(input_ids)
        h = self.embed_tokens(input_ids, self.act_dtype)
        for layer in self.layers:
            h = layer(h, total_seq_len)
        h = _rms_norm(h, self.norm, self.config.rms_norm_eps)
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

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        mode = {"param_mode": "packed", "effect_mode": "packed"}
        return nn.spec.ModuleSpec.from_raw({
            "prefill": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"),
                        "total_seq_len": int, "$": mode},
            "decode": {"input_ids": nn.spec.Tensor([1, 1], "int32"),
                       "total_seq_len": int, "$": mode},
        }, self)


def export(cfg: LlamaConfig, scheme: str, shards: int = 1):
    """Build the Relax IRModule and the ordered list of (parameter name, spec)."""
    model = LlamaForCausalLM(cfg, scheme, shards)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    return mod, named_params


from .weights import convert_params  # noqa: E402,F401  (lives with the weights: no TVM needed)
