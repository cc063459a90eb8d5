"""Model configurations: presets with the exact shapes of the models the course talks about,
and readers for GGUF metadata and Hugging Face ``config.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

STATIC_MAX_LEN = 1024  # rows of the static KV cache (``kv="static"``); the context window caps it too


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a Llama-family decoder."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    context_length: int = 4096
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: {self.num_heads} heads do not group evenly over "
                             f"{self.num_kv_heads} KV heads")

    # ------------------------------------------------------------------ shapes
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face names -> shapes, weights stored (out, in)."""
        h, f = self.hidden_size, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.q_size, h),
                p + "self_attn.k_proj.weight": (self.kv_size, h),
                p + "self_attn.v_proj.weight": (self.kv_size, h),
                p + "self_attn.o_proj.weight": (h, self.q_size),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            })
        shapes["model.norm.weight"] = (h,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def num_params(self) -> int:
        total = 0
        for shape in self.param_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def linear_shapes_per_layer(self) -> dict[str, tuple[int, int]]:
        """The fused linears of one layer as the model runs them: (out, in)."""
        h, f = self.hidden_size, self.intermediate_size
        return {
            "qkv_proj": (self.q_size + 2 * self.kv_size, h),
            "o_proj": (h, self.q_size),
            "gate_up_proj": (2 * f, h),
            "down_proj": (h, f),
        }

    def bytes_per_token(self, quantization: str = "q4f16_1") -> int:
        """Weight bytes one single-batch decode step reads: every linear once, the
        lm_head once, the norms, and one embedding row (KV cache not included)."""
        from .quantization import get_scheme, nbytes

        scheme = get_scheme(quantization)
        act = 4 if scheme.float_dtype == "float32" else 2
        per_layer = sum(nbytes(s, quantization) for s in self.linear_shapes_per_layer().values())
        total = self.num_layers * (per_layer + 2 * self.hidden_size * act)
        total += nbytes((self.vocab_size, self.hidden_size), quantization)  # lm_head
        total += self.hidden_size * act  # final norm
        total += nbytes((1, self.hidden_size), quantization)  # one embedding row
        return int(total)

    def kv_bytes_per_token(self, context: int, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one decode step reads at a given context length."""
        return 2 * self.num_layers * self.kv_size * context * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **kw) -> "LlamaConfig":
        return replace(self, **kw)


PRESETS: dict[str, LlamaConfig] = {
    c.name: c
    for c in [
        LlamaConfig("smollm2-135m", 49152, 576, 1536, 30, 9, 3, 64, rope_theta=100000.0,
                    rms_norm_eps=1e-5, context_length=8192, tie_embeddings=True),
        LlamaConfig("llama2-7b", 32000, 4096, 11008, 32, 32, 32, 128, context_length=4096),
        LlamaConfig("codellama-34b", 32000, 8192, 22016, 48, 64, 8, 128,
                    rope_theta=1000000.0, context_length=16384),
        LlamaConfig("llama2-70b", 32000, 8192, 28672, 80, 64, 8, 128, context_length=4096),
        # A model small enough for unit tests: heads divide by 1, 2, 4 and 8.
        LlamaConfig("tiny", 256, 128, 256, 2, 8, 8, 16, context_length=256),
    ]
}


def get_preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}") from None


def config_from_gguf_metadata(meta: dict[str, Any], name: str = "gguf",
                              tie_embeddings: bool = True) -> LlamaConfig:
    """Build a config from GGUF key/values (``llama.*``); a GGUF without ``output.weight``
    ties the lm_head to the embedding."""
    g = lambda k, d=None: meta.get(f"llama.{k}", d)  # noqa: E731
    n_head = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    vocab = int(g("vocab_size", 0)) or len(meta.get("tokenizer.ggml.tokens", []))
    return LlamaConfig(
        name=name,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=n_head,
        num_kv_heads=int(g("attention.head_count_kv", n_head)),
        head_dim=int(g("rope.dimension_count", hidden // n_head)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(g("context_length", 4096)),
        tie_embeddings=tie_embeddings,
    )


def config_from_hf(path: str | os.PathLike, name: str | None = None) -> LlamaConfig:
    """Read a Hugging Face ``config.json`` (a file or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face model folder)")
    c = json.loads(path.read_text())
    arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
    if c.get("model_type", "llama") not in ("llama", "mistral", "qwen2") and "Llama" not in arch:
        raise ValueError(f"{path}: model_type {c.get('model_type')!r} is not Llama-family")
    n_head = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    return LlamaConfig(
        name=name or path.parent.name,
        vocab_size=int(c["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=n_head,
        num_kv_heads=int(c.get("num_key_value_heads", n_head)),
        head_dim=int(c.get("head_dim") or hidden // n_head),
        rope_theta=float(c.get("rope_theta", 10000.0)),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        context_length=int(c.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
