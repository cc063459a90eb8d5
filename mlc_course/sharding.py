"""How each Llama weight is split across N tensor-parallel workers: the one description
used by the model, the engine, the notebooks and the labs.

MLC LLM's plan (Megatron-style):

=====================  =================  ==========================================
weight                 split              why
=====================  =================  ==========================================
fused QKV projection   column, by head    each worker owns whole attention heads and
                       groups             the KV heads they share (GQA)
O projection           row (input dim)    consumes the worker's heads; partial sums
                                          are all-reduced
fused gate/up          column, per        each worker owns a slice of the MLP's
                       segment            hidden units, for gate *and* up
down projection        row (input dim)    partial sums all-reduced
embedding, norms,      replicated         small, or needed whole on every worker
lm_head
=====================  =================  ==========================================

Quantized weights are split along the same dimension: a column split cuts rows of both
``q_weight`` and ``q_scale``; a row split cuts the packed input dimension, which needs each
worker's slice of K to be a whole number of quantization groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import LlamaConfig
from .quantization import get_scheme


@dataclass(frozen=True)
class ShardSpec:
    """How one stored array is split: ``kind`` is ``replicated``, ``column`` (dim 0, the
    output features) or ``row`` (dim 1, the input features). ``segments`` lists the sizes
    (in rows) of the fused blocks of a column weight; each block is split on its own."""

    kind: str
    segments: tuple[int, ...] = ()

    def describe(self) -> str:
        if self.kind == "column" and len(self.segments) > 1:
            return f"column, {len(self.segments)} segments {list(self.segments)} split each"
        return self.kind


def shard_spec(name: str, cfg: LlamaConfig) -> ShardSpec:
    """The split of the model parameter ``name`` (e.g. ``layers.3.self_attn.qkv_proj.q_weight``)."""
    d = cfg.head_dim
    if ".qkv_proj." in name:
        return ShardSpec("column", (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d))
    if ".gate_up_proj." in name:
        return ShardSpec("column", (cfg.intermediate_size, cfg.intermediate_size))
    if ".o_proj." in name or ".down_proj." in name:
        return ShardSpec("row")
    return ShardSpec("replicated")


def shard_constraints(cfg: LlamaConfig, scheme: str | None = None) -> list[tuple[str, int, int]]:
    """(what, size, unit): each ``size`` must split into N pieces that are multiples of ``unit``."""
    group = get_scheme(scheme).group_size if scheme and get_scheme(scheme).quantized else 1
    d = cfg.head_dim
    cons = [("attention heads (num_heads)", cfg.num_heads, 1),
            ("KV heads (num_kv_heads)", cfg.num_kv_heads, 1),
            ("MLP width (intermediate_size)", cfg.intermediate_size, 1)]
    if group > 1:
        cons += [(f"O projection input (num_heads*head_dim = {cfg.num_heads * d}) in groups of {group}",
                  cfg.num_heads * d, group),
                 (f"down projection input (intermediate_size) in groups of {group}",
                  cfg.intermediate_size, group)]
    return cons


def valid_shard_counts(cfg: LlamaConfig, scheme: str | None = None, limit: int = 64) -> list[int]:
    """Every N in 1..limit for which the model can be split N ways."""
    ok = []
    for n in range(1, limit + 1):
        if all(size % n == 0 and (size // n) % unit == 0 for _, size, unit in shard_constraints(cfg, scheme)):
            ok.append(n)
    return ok


def validate_shards(cfg: LlamaConfig, n: int, scheme: str | None = None) -> None:
    """Raise ``ValueError`` naming the dimension that does not split ``n`` ways, and the
    shard counts that would work for this model."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"shards must be a positive integer, got {n!r}")
    failing = [f"{what} = {size}" + (f" (into multiples of {unit})" if unit > 1 else "")
               for what, size, unit in shard_constraints(cfg, scheme) if size % n or (size // n) % unit]
    if failing:
        valid = valid_shard_counts(cfg, scheme)
        raise ValueError(
            f"{cfg.name} cannot be split into {n} shards: its {'; '.join(failing)} "
            f"{'does' if len(failing) == 1 else 'do'} not divide by {n}. "
            f"Shard counts that work for this model: {', '.join(map(str, valid))}")


def _split_rows(a: np.ndarray, segments: tuple[int, ...], n: int) -> list[np.ndarray]:
    blocks = np.split(a, np.cumsum(segments)[:-1], axis=0) if segments else [a]
    return [np.concatenate([np.split(b, n, axis=0)[r] for b in blocks], axis=0) for r in range(n)]


def shard_array(a: np.ndarray, spec: ShardSpec, n: int) -> list[np.ndarray]:
    """Split one stored array n ways according to ``spec``."""
    if spec.kind == "replicated" or n == 1:
        return [a] * n
    if spec.kind == "column":
        segments = spec.segments
        if segments and sum(segments) != a.shape[0]:
            raise ValueError(f"segments {segments} do not add up to {a.shape[0]} rows")
        return [np.ascontiguousarray(x) for x in _split_rows(a, segments, n)]
    if spec.kind == "row":
        return [np.ascontiguousarray(x) for x in np.split(a, n, axis=1)]
    raise ValueError(f"unknown shard kind {spec.kind!r}")


def unshard_array(parts: list[np.ndarray], spec: ShardSpec) -> np.ndarray:
    """Inverse of :func:`shard_array` (used by tests and notebooks)."""
    n = len(parts)
    if spec.kind == "replicated" or n == 1:
        return parts[0]
    if spec.kind == "row":
        return np.concatenate(parts, axis=1)
    segs = spec.segments or (sum(p.shape[0] for p in parts),)
    per = [s // n for s in segs]
    blocks = []
    for i in range(len(segs)):
        start = sum(per[:i])
        blocks.append(np.concatenate([p[start:start + per[i]] for p in parts], axis=0))
    return np.concatenate(blocks, axis=0)


def shard_params(params: dict[str, np.ndarray], cfg: LlamaConfig, n: int,
                 scheme: str | None = None) -> list[dict[str, np.ndarray]]:
    """Per-worker parameter dicts (model names, stored arrays) for ``n`` workers."""
    validate_shards(cfg, n, scheme)
    out: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for name, a in params.items():
        for r, part in enumerate(shard_array(a, shard_spec(name, cfg), n)):
            out[r][name] = part
    return out


def sharding_plan(cfg: LlamaConfig, n: int) -> list[dict]:
    """One row per kind of weight in a layer: its shape, split and per-worker shape."""
    rows = []
    for name, (o, i) in cfg.linear_shapes_per_layer().items():
        spec = shard_spec(f"layers.0.x.{name}.w", cfg)
        per = (o // n, i) if spec.kind == "column" else (o, i // n)
        rows.append({"weight": name, "shape": (o, i), "split": spec.describe(), "per_worker": per,
                     "all_reduce_after": spec.kind == "row"})
    for name, shape in [("embed_tokens", (cfg.vocab_size, cfg.hidden_size)),
                        ("norms", (cfg.hidden_size,)),
                        ("lm_head", (cfg.vocab_size, cfg.hidden_size))]:
        rows.append({"weight": name, "shape": shape, "split": "replicated", "per_worker": shape,
                     "all_reduce_after": False})
    return rows
