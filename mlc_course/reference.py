"""An independent NumPy forward pass of a Llama-family model, for checking the compiled one.

It reads the float32 weights under Hugging Face names (what :mod:`mlc_course.weights`
returns), shares no code with :mod:`mlc_course.model`, and is written to be read: a
student can follow one token through it line by line.
"""

from __future__ import annotations

import numpy as np

from .config import LlamaConfig


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x: (seq, heads, head_dim); rotate pairs (i, i + d/2) by angle pos * theta^(-2i/d)."""
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d // 2, dtype=np.float64) * 2 / d)
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (seq, d/2)
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return (x * cos + rotated * sin).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class ReferenceLlama:
    """Float32 NumPy Llama with a KV cache: ``prefill(ids)`` then ``decode(id)`` -> logits."""

    def __init__(self, cfg: LlamaConfig, params: dict[str, np.ndarray]):
        self.cfg, self.p = cfg, params
        self.reset()

    def reset(self) -> None:
        self.k_cache = [np.zeros((0, self.cfg.num_kv_heads, self.cfg.head_dim), np.float32)
                        for _ in range(self.cfg.num_layers)]
        self.v_cache = [c.copy() for c in self.k_cache]

    @property
    def seq_len(self) -> int:
        return self.k_cache[0].shape[0]

    def _attention(self, i: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        c, p = self.cfg, f"model.layers.{i}.self_attn."
        s = x.shape[0]
        q = (x @ self.p[p + "q_proj.weight"].T).reshape(s, c.num_heads, c.head_dim)
        k = (x @ self.p[p + "k_proj.weight"].T).reshape(s, c.num_kv_heads, c.head_dim)
        v = (x @ self.p[p + "v_proj.weight"].T).reshape(s, c.num_kv_heads, c.head_dim)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        self.k_cache[i] = keys = np.concatenate([self.k_cache[i], k])
        self.v_cache[i] = values = np.concatenate([self.v_cache[i], v])
        group = c.num_heads // c.num_kv_heads
        keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
        # np.float32: a NumPy float64 scalar would turn the rest of the pass into float64
        scores = np.einsum("shd,thd->hst", q, keys) / np.float32(np.sqrt(c.head_dim))
        causal = np.arange(keys.shape[0])[None, :] <= positions[:, None]  # (s, t)
        scores = np.where(causal[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("hst,thd->shd", probs, values).reshape(s, -1)
        return out @ self.p[p + "o_proj.weight"].T

    def _mlp(self, i: int, x: np.ndarray) -> np.ndarray:
        p = f"model.layers.{i}.mlp."
        gate, up = x @ self.p[p + "gate_proj.weight"].T, x @ self.p[p + "up_proj.weight"].T
        return (silu(gate) * up) @ self.p[p + "down_proj.weight"].T

    def forward(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Run new tokens through the model; returns float32 logits of the last one."""
        c = self.cfg
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        positions = np.arange(self.seq_len, self.seq_len + len(ids))
        h = self.p["model.embed_tokens.weight"][ids].astype(np.float32)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            h = h + self._attention(i, rms_norm(h, self.p[p + "input_layernorm.weight"], c.rms_norm_eps), positions)
            h = h + self._mlp(i, rms_norm(h, self.p[p + "post_attention_layernorm.weight"], c.rms_norm_eps))
        h = rms_norm(h[-1:], self.p["model.norm.weight"], c.rms_norm_eps)
        head = self.p.get("lm_head.weight", self.p["model.embed_tokens.weight"])
        return (h @ head.T)[0].astype(np.float32)

    prefill = forward

    def decode(self, token: int) -> np.ndarray:
        return self.forward([token])

    def generate(self, ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
        """Greedy generation (the baseline the engine's greedy tokens are checked against)."""
        self.reset()
        logits, out = self.prefill(ids), []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits))
            out.append(tok)
            if tok == eos or len(out) == max_new_tokens:
                break
            logits = self.decode(tok)
        return out
