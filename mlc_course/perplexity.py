"""Perplexity of the compiled model: what a quantization scheme costs in quality.

Perplexity is ``exp(mean negative log-likelihood)`` of a text's tokens, each predicted from
the ones before it: 1 for a model that is always sure and right, the vocabulary size for one
that guesses uniformly. We measure it with the *compiled* model through the engine's
low-level API. The engine's ``prefill`` returns the logits of the last position only, so the
text goes in one token at a time: ``prefill([t0])``, then for each next token ``t`` the
log-probability of ``t`` under the current logits is added up and ``decode(t)`` moves on.
Only the first ``max_tokens`` tokens are used (256 by default: a few seconds per scheme on a
laptop CPU); the first token has no context and is not scored.

What the numbers show for the course model (``python -m mlc_course perplexity``, results in
``data/results/perplexity.json``): the GGUF file SmolLM2 comes in stores its linear layers
in llama.cpp's **Q4_1** (asymmetric: a scale *and* a minimum per group of 32, 16 levels) and
its embedding -- which is also the tied lm_head -- in **Q8_0**. ``q0f32`` runs exactly the
file's values. Re-quantizing onto MLC's symmetric 15-level grid (``q4f32_1``/``q4f16_1``) rounds
every weight a second time, and a model this small feels it: perplexity rises clearly. The
asymmetric scheme ``q4f32_asym`` has Q4_1's grid, so it gives the linear layers back exactly;
what it still loses comes from squeezing the 8-bit embedding into 4 bits. The *ablation* rows
verify this split: they run the float32 model with only some weights passed through a 4-bit
scheme and back (fake quantization). One of them puts every weight through q4f16_1, MLC's
GPU format, but keeps float32 arithmetic: next to the q4f16_1 row (float16 activations too)
and the q4f32_1 row (float32 scales) it separates the three roundings.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
HELDOUT_TEXT = DATA_DIR / "heldout.txt"
RESULTS_JSON = DATA_DIR / "results" / "perplexity.json"

# q4f16_1 (MLC's GPU format: float16 scales *and* float16 activations) runs on the CPU too,
# several times slower than q4f32_1: x86 CPUs have little float16 arithmetic.
DEFAULT_SCHEMES = ("q0f32", "q4f32_1", "q4f32_asym", "q4f16_1")

# Fake-quantization experiments on the float32 model: (label, {weight group: scheme}).
# Groups: "embedding" (embed_tokens, also the tied lm_head) and "linears" (all the others).
DEFAULT_ABLATIONS = (
    ("q0f32, linears q4f32_1", {"linears": "q4f32_1"}),
    ("q0f32, linears q4f32_asym", {"linears": "q4f32_asym"}),
    ("q0f32, embedding q4f32_1", {"embedding": "q4f32_1"}),
    ("q0f32, embedding q4f32_asym", {"embedding": "q4f32_asym"}),
    # MLC's GPU format on the weights only, float32 arithmetic: compare with q4f16_1 to see
    # what float16 activations add, with q4f32_1 to see what float16 scales add
    ("q0f32, all weights q4f16_1", {"embedding": "q4f16_1", "linears": "q4f16_1"}),
)


# ---------------------------------------------------------------------------- the math


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log softmax`` in float64, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def token_nlls(engine, ids: Sequence[int], max_tokens: int | None = 256) -> np.ndarray:
    """Negative log-likelihood (nats) of ``ids[1:n]`` under the engine's model, n = max_tokens.

    Resets the engine's cache, feeds ``ids[0]`` with ``prefill`` and every next token with
    ``decode``: one compiled decode step per scored token.
    """
    ids = [int(i) for i in ids]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    engine.reset()
    logits = engine.prefill([ids[0]])
    out = np.empty(len(ids) - 1)
    for i, tok in enumerate(ids[1:]):
        out[i] = -log_softmax(logits)[tok]
        if i + 2 < len(ids):  # the last token needs no decode step
            logits = engine.decode(tok)
    return out


def perplexity(engine_or_model, ids: Sequence[int], max_tokens: int | None = 256,
               quantization: str | None = None) -> float:
    """Token-level perplexity ``exp(mean NLL)`` of ``ids`` under a compiled model.

    ``engine_or_model``: an :class:`~mlc_course.engine.Engine`, or a model name for which
    one is built (with ``quantization``) and closed afterwards.
    """
    if isinstance(engine_or_model, str):
        from .engine import Engine

        with Engine(engine_or_model, quantization, quiet=True) as eng:
            return perplexity(eng, ids, max_tokens)
    return float(math.exp(token_nlls(engine_or_model, ids, max_tokens).mean()))


# ------------------------------------------------------------------- fake quantization


def weight_group(param_name: str) -> str | None:
    """Which group a model parameter belongs to: "embedding", "linears" or None (norms)."""
    if param_name.startswith("embed_tokens.") or param_name.startswith("lm_head."):
        return "embedding"
    if param_name.endswith(".weight") and "layernorm" not in param_name:
        return "linears"
    return None


class fake_quantized:
    """Context manager: inside it, a float (q0f32) engine runs with chosen weight groups
    rounded through a 4-bit scheme and back, ``w -> dequantize(quantize(w, scheme))``.

    The compiled float32 kernels stay the same; only the values change, so the perplexity
    measured inside isolates the effect of the rounding on those weights. Works on a
    one-worker engine (it swaps the arrays the engine's Relax VM holds) and restores them on
    exit.
    """

    def __init__(self, engine, groups: dict[str, str]):
        from .quantization import get_scheme

        if engine.shards != 1 or get_scheme(engine.scheme).quantized:
            raise ValueError("fake quantization needs a float (q0) engine with shards=1, got "
                             f"{engine.scheme} with {engine.shards} shard(s)")
        unknown = set(groups) - {"embedding", "linears"}
        if unknown:
            raise ValueError(f"unknown weight groups {sorted(unknown)}; use embedding, linears")
        self.engine, self.groups = engine, dict(groups)
        self.saved: dict[int, object] = {}

    def __enter__(self):
        import tvm

        from .model import export
        from .quantization import dequantize, quantize

        eng = self.engine
        runner = eng.runner
        names = [n for n, _ in export(eng.config, eng.scheme, 1)[1]]
        for i, name in enumerate(names):
            scheme = self.groups.get(weight_group(name) or "")
            if scheme is None:
                continue
            w = runner.params[i].numpy()
            wq = dequantize(*quantize(w.astype(np.float32), scheme), scheme).astype(w.dtype)
            self.saved[i] = runner.params[i]
            runner.params[i] = tvm.runtime.tensor(wq, runner.dev)
        return eng

    def __exit__(self, *exc):
        for i, arr in self.saved.items():
            self.engine.runner.params[i] = arr
        self.saved = {}


# --------------------------------------------------------------------------- the table


def heldout_ids(tokenizer, text_file: str | Path | None = None) -> tuple[list[int], Path]:
    """Token ids of the held-out text (``data/heldout.txt`` unless ``text_file``)."""
    path = Path(text_file) if text_file else HELDOUT_TEXT
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such text file")
    return tokenizer.encode(path.read_text(encoding="utf-8")), path


def _row(model: str, label: str, scheme: str, nll: np.ndarray, seconds: float, **extra) -> dict:
    from .quantization import get_scheme

    return {"model": model, "quantization": label, "scheme": scheme,
            "bits_per_weight": get_scheme(scheme).bits_per_weight(),
            "perplexity": round(float(np.exp(nll.mean())), 4),
            "mean_nll": round(float(nll.mean()), 5), "scored_tokens": int(nll.size),
            "tok_per_s": round(nll.size / seconds, 1), **extra}


def perplexity_table(model: str = "smollm2-135m", schemes: Sequence[str] | None = None,
                     text_file: str | Path | None = None, max_tokens: int | None = 256,
                     ablations=None, out: str | Path | None = "auto",
                     log=None) -> list[dict]:
    """Perplexity of ``model`` on a text for each scheme; one dict per row.

    Defaults: :data:`DEFAULT_SCHEMES` on the course's held-out text, plus the fake
    quantization rows of :data:`DEFAULT_ABLATIONS` (only when ``schemes`` is not given).
    Rows: model, quantization (label), scheme, bits_per_weight, perplexity, mean_nll,
    scored_tokens, tok_per_s (of this run; a timing) and, for ablations, ``fake_quant``.
    With ``out`` the rows are also written there as JSON, with the text, the date and the
    command; ``"auto"`` (default) writes ``data/results/perplexity.json`` for the default
    table only (all arguments left at their defaults), so a one-scheme run from the command
    line does not overwrite the course's results.
    """
    from .engine import Engine

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    default = (model == "smollm2-135m" and schemes is None and text_file is None
               and max_tokens == 256 and ablations is None)
    command = ("python -m mlc_course perplexity" if default else
               f"perplexity_table({model!r}, {schemes!r}, text_file={text_file!r}, "
               f"max_tokens={max_tokens!r})")
    if out == "auto":
        out = RESULTS_JSON if default else None
    if ablations is None:
        ablations = DEFAULT_ABLATIONS if schemes is None else ()
    schemes = list(schemes or DEFAULT_SCHEMES)
    if ablations and "q0f32" not in schemes:
        schemes.insert(0, "q0f32")
    rows, ids, path = [], None, None
    for scheme in schemes:
        with Engine(model, scheme, quiet=True) as eng:
            if ids is None:
                if eng.tokenizer is None:
                    raise ValueError(f"{model} has no tokenizer: call perplexity() with token ids")
                ids, path = heldout_ids(eng.tokenizer, text_file)
            t0 = time.perf_counter()
            nll = token_nlls(eng, ids, max_tokens)
            rows.append(_row(model, scheme, scheme, nll, time.perf_counter() - t0))
            log(f"{scheme:<12} perplexity {rows[-1]['perplexity']:.3f}")
            if scheme == "q0f32":
                for label, groups in ablations:
                    with fake_quantized(eng, groups):
                        t0 = time.perf_counter()
                        nll = token_nlls(eng, ids, max_tokens)
                    rows.append(_row(model, label, "q0f32", nll, time.perf_counter() - t0,
                                     fake_quant=dict(groups)))
                    log(f"{label:<12} perplexity {rows[-1]['perplexity']:.3f}")
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        rel = path.relative_to(DATA_DIR.parent) if path.is_relative_to(DATA_DIR.parent) else path
        doc = {"model": model, "text": str(rel), "text_tokens": len(ids), "max_tokens": max_tokens,
               "date": _dt.date.today().isoformat(), "machine": platform.machine(),
               "command": command,
               "rows": rows}
        out.write_text(json.dumps(doc, indent=1) + "\n")
    return rows


def load_results(path: str | Path = RESULTS_JSON) -> dict:
    """The saved perplexity results (what notebooks read instead of re-running)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `python -m mlc_course perplexity`")
    return json.loads(path.read_text())
