"""Text <-> token ids for the course models, and the chat template.

Why this module exists: a GGUF file carries everything a tokenizer needs (the vocabulary, the
BPE merges, the token types, BOS/EOS ids and the chat template) but no ``tokenizer.json``, and
no model hub is reachable. So we rebuild the Hugging Face tokenizer from the GGUF metadata with
the ``tokenizers`` package (the same Rust code ``transformers`` runs), and render the chat
template with Jinja exactly as ``transformers``' ``apply_chat_template`` does. A prompt then
becomes the same ids as in the reference implementation, which is what lets the course compare
its generated tokens with other systems token for token.

Three pieces:

* :class:`Tokenizer` -- encode / decode / chat template / BOS, EOS and stop ids, built with
  :meth:`Tokenizer.from_gguf` (the course model) or :meth:`Tokenizer.from_hf_folder`.
* :class:`StreamDecoder` -- turns ids into text *as they are generated*, never printing half of
  a multi-byte UTF-8 character (one emoji is often 2-4 byte-level tokens).
* :func:`render_chat_template` -- the Jinja environment of ``transformers``.

For SmolLM2 (the course model): ``<|im_start|>`` (id 1) is BOS, ``<|im_end|>`` (id 2) is EOS,
``<|endoftext|>`` (id 0) is the end-of-document / unknown token, and the GGUF says
``add_bos_token = False``: plain prompts get no BOS, and the chat template writes its own
``<|im_start|>`` markers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

__all__ = [
    "Tokenizer",
    "StreamDecoder",
    "render_chat_template",
    "END_OF_TURN_TOKENS",
    "SUPPORTED_GGUF_PRE_TOKENIZERS",
]

# GGUF token types (llama.cpp's llama_token_type / gguf.TokenType).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end generation when the model emits them, whatever the EOS id says. This is
# llama.cpp's list (llama-vocab.cpp, `special_eog_ids`), the runtime that defines how a GGUF
# behaves: a chat model ends its turn with one of these, and a model continuing plain text ends
# the document with `<|endoftext|>`; going on after either produces unrelated text.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<EOT>",
)

# GPT-2's pre-tokenizer regex (ByteLevel's built-in `use_regex=True`) splits words, numbers,
# punctuation runs and whitespace runs; "llama3" is the tiktoken cl100k-style regex of Llama 3.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre values we can rebuild faithfully, and the Hugging Face pipeline of each.
#   smollm / starcoder / refact: Sequence[Digits(individual), ByteLevel(GPT-2 regex)] -- exactly
#       SmolLM2's tokenizer.json (every digit is its own token: "2024" -> 2,0,2,4).
#   gpt2 / default: ByteLevel with the GPT-2 regex. (llama.cpp's "default" is its fallback for
#       unrecognised BPE tokenizers and adds a few extra splits; GPT-2's is the honest guess.)
#   llama3 / llama-bpe / llama-v3: Split(Llama-3 regex, isolated) then ByteLevel without regex,
#       and BPE with ignore_merges (a word already in the vocabulary is one token).
SUPPORTED_GGUF_PRE_TOKENIZERS = {
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "gpt2": "gpt2", "default": "gpt2",
    "llama3": "llama3", "llama-bpe": "llama3", "llama-v3": "llama3",
}


# --------------------------------------------------------------------------------------------
# Chat template: the Jinja environment of transformers
# --------------------------------------------------------------------------------------------

def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson``: plain ``json.dumps``. Jinja's own filter HTML-escapes ``<>&'``,
    which would change what the model sees, so templates expect this one."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    """Templates call ``raise_exception('...')`` to reject conversations they cannot render
    (e.g. roles out of order); transformers turns it into a ``TemplateError``."""
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    """Some templates print today's date (Llama 3.1 does)."""
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """Compile a chat template in the same environment as transformers'
    ``_compile_jinja_template``: an immutable sandbox (templates come from model files, i.e.
    untrusted), ``trim_blocks`` and ``lstrip_blocks`` (they decide the whitespace, hence the
    tokens), the ``loopcontrols`` extension (``{% break %}``), the ``{% generation %}`` tag
    (rendered as its body; transformers only uses it to build assistant masks), and the
    ``tojson`` / ``raise_exception`` / ``strftime_now`` helpers."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore attributes, as transformers' does."""

        def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = Namespace
    return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True,
                         special_tokens: Mapping[str, str] | None = None,
                         **kwargs: Any) -> str:
    """Render ``template`` for ``messages`` as ``transformers``' ``apply_chat_template(...,
    tokenize=False)`` would.

    Like transformers, keys whose value is ``None`` are dropped from each message (many
    templates test ``'key' in message``), the named special tokens (``bos_token``,
    ``eos_token``, ``unk_token``, ``pad_token``) are visible to the template, and ``tools`` and
    ``documents`` default to ``None``. Extra ``kwargs`` reach the template (and override the
    special tokens, as in transformers).
    """
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    clean = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise TypeError(f"chat messages must be dicts, got {m!r}")
        clean.append({k: v for k, v in m.items() if v is not None})
    context: dict[str, Any] = {"tools": None, "documents": None}
    context.update(special_tokens or {})
    context.update(kwargs)
    context["messages"] = clean
    context["add_generation_prompt"] = add_generation_prompt
    return _compile_chat_template(template).render(**context)


# --------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------

class StreamDecoder:
    """Text increments from ids that arrive one at a time (token streaming).

    Why not ``decode([id])`` per token: byte-level BPE splits a multi-byte UTF-8 character
    (``"é"``, ``"中"``, an emoji) over several tokens, and decoding one of them alone gives
    ``"\\ufffd"``; some decoders also treat the first token specially (leading space). We keep
    a small window of ids (the same offsets scheme as Hugging Face's text-generation-inference
    and ``tokenizers.decoders.DecodeStream``): decode ``ids[prefix:]``, compare with the
    already printed ``ids[prefix:read]``, and print the difference only if it does not end in
    an incomplete character (``"\\ufffd"``). The window then slides to the last complete
    character, so the cost per token stays constant.

    The concatenation of all increments plus :meth:`flush` equals ``tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window: a character boundary
        self._read = 0    # ids before this index are printed
        self._pieces: list[str] = []

    def put(self, token_id: int) -> str:
        """Add one id; return the text it completes (often ``""`` mid-character)."""
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
            self._pieces.append(delta)
            return delta
        return ""

    def put_many(self, token_ids: Iterable[int]) -> str:
        """Add several ids; return the text they complete."""
        return "".join(self.put(t) for t in token_ids)

    def flush(self) -> str:
        """End of generation: return what is still held back (an incomplete character is then
        printed as ``"\\ufffd"``, as a full decode would)."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        delta = new_text[len(prefix_text):]
        self._prefix = self._read = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        """Every id received so far."""
        return list(self._ids)


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------

def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get("content")
    return str(value)


class Tokenizer:
    """A byte-level BPE tokenizer (``tokenizers``) plus what generation needs around it: BOS
    policy, EOS and stop ids, the chat template.

    Build it with :meth:`from_gguf`, :meth:`from_gguf_metadata` or :meth:`from_hf_folder`;
    the constructor takes an already built ``tokenizers.Tokenizer`` (``backend``).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *,
                 bos_token_id: int | None = None,
                 eos_token_id: int | None = None,
                 add_bos_token: bool = False,
                 chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None,
                 extra_stop_token_ids: Iterable[int] = (),
                 vocab_size: int | None = None,
                 source: str = "") -> None:
        """
        Args:
            backend: the ``tokenizers.Tokenizer`` doing the work. Its post-processor is never
                used: BOS is added here, by ``add_bos_token``, so that GGUF and HF models follow
                one rule and no EOS is ever appended to a prompt.
            bos_token_id, eos_token_id: ids of BOS / EOS (``None`` if the model has none).
            add_bos_token: whether plain-text prompts start with BOS (the model's metadata).
            chat_template: the Jinja chat template, if the model has one.
            special_tokens: named special tokens for the template (``bos_token``, ``eos_token``,
                ``unk_token``, ``pad_token``); filled from the ids when not given.
            extra_stop_token_ids: more ids that end generation (e.g. generation_config's).
            vocab_size: number of token ids (rows of the embedding); the backend's count with
                added tokens when not given.
            source: where it came from, for messages.
        """
        self.backend = backend
        self._bos = bos_token_id
        self._eos = eos_token_id
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        self.source = source
        self._vocab_size = int(vocab_size) if vocab_size is not None else \
            backend.get_vocab_size(with_added_tokens=True)
        named = dict(special_tokens or {})
        for key, tid in (("bos_token", bos_token_id), ("eos_token", eos_token_id)):
            if key not in named and tid is not None:
                text = backend.id_to_token(tid)
                if text is not None:
                    named[key] = text
        self.special_tokens = named
        self._special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        stops = set(int(i) for i in extra_stop_token_ids)
        if eos_token_id is not None:
            stops.add(int(eos_token_id))
        for text in END_OF_TURN_TOKENS:
            tid = backend.token_to_id(text)
            if tid is not None and tid in self._special_ids:
                stops.add(tid)
        self._stop = tuple(sorted(stops))

    # ---- constructors ------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer stored in a GGUF file (e.g. ``course_model_path()``)."""
        from .weights import gguf_metadata

        return cls.from_gguf_metadata(gguf_metadata(path), source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "gguf") -> Tokenizer:
        """Rebuild the Hugging Face tokenizer from GGUF key/values (``gguf_metadata(path)``).

        ``tokenizer.ggml.tokens`` is the vocabulary in id order, ``tokenizer.ggml.merges`` the
        BPE merges in priority order ("a b" strings), ``tokenizer.ggml.token_type`` marks the
        control tokens (type 3), which become *special* added tokens: they must match as a
        whole in the text (``"<|im_start|>"`` is one id, not ``<``, ``|``, ``im`` ...) and are
        dropped by ``decode(skip_special_tokens=True)``. User-defined tokens (type 4) are added
        as non-special added tokens. ``tokenizer.ggml.pre`` names the pre-tokenizer.

        Raises ValueError for tokenizer models other than byte-level BPE ('gpt2'), e.g. the
        SentencePiece 'llama' tokenizer of Llama 2, and for unknown pre-tokenizers.
        """
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model); only "
                "byte-level BPE ('gpt2') is supported. For other models load a Hugging Face "
                "folder with Tokenizer.from_hf_folder(path).")
        pre = meta.get("tokenizer.ggml.pre", "default")
        kind = SUPPORTED_GGUF_PRE_TOKENIZERS.get(pre)
        if kind is None:
            raise ValueError(
                f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
                f"{sorted(SUPPORTED_GGUF_PRE_TOKENIZERS)}")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError("GGUF BPE tokenizer has no tokenizer.ggml.merges")
        types = list(meta.get("tokenizer.ggml.token_type") or [_TT_NORMAL] * len(tokens))

        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # a duplicated text keeps its first id, as llama.cpp does
        merges = []
        for m in meta["tokenizer.ggml.merges"]:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"malformed BPE merge {m!r} in tokenizer.ggml.merges")
            merges.append((a, b))

        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                         ignore_merges=(kind == "llama3"))
        backend = tokenizers.Tokenizer(bpe)
        if kind == "digits+gpt2":
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ])
        elif kind == "gpt2":
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(
                add_prefix_space=False, trim_offsets=True, use_regex=True)
        else:  # llama3
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ])
        backend.decoder = decoders.ByteLevel()

        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _TT_CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == _TT_USER_DEFINED]
        if special:
            backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)

        def tok(key: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}")
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        named = {}
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            if (tid := tok(key)) is not None:
                named[name] = tokens[tid]
        extra = [tid for key in ("eot_token_id", "eom_token_id") if (tid := tok(key)) is not None]
        return cls(backend,
                   bos_token_id=tok("bos_token_id"),
                   eos_token_id=tok("eos_token_id"),
                   # BPE GGUFs without the key: llama.cpp adds no BOS for gpt2-style vocabularies
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"),
                   special_tokens=named,
                   extra_stop_token_ids=extra,
                   vocab_size=len(tokens),
                   source=source)

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face model folder: ``tokenizer.json`` (required), and when present
        ``tokenizer_config.json`` (bos/eos/unk/pad tokens, ``add_bos_token``,
        ``chat_template``), ``chat_template.jinja`` (where newer transformers save the
        template), ``special_tokens_map.json`` and ``generation_config.json`` (its
        ``eos_token_id``, one id or a list, are stop ids).

        Without ``add_bos_token`` in the config, BOS is added exactly when the folder's
        post-processor would add it (Llama 3's does, GPT-2's and SmolLM2's don't).
        """
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        backend = tokenizers.Tokenizer.from_file(str(tj))

        def load(name: str) -> dict[str, Any]:
            p = folder / name
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

        cfg = load("tokenizer_config.json")
        smap = load("special_tokens_map.json")
        gen = load("generation_config.json")

        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named_t = {t.get("name"): t.get("template") for t in template}
            template = named_t.get("default") or next(iter(named_t.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        named: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_content(cfg.get(key)) or _token_content(smap.get(key))
            if text is not None:
                named[key] = text
        bos_id = backend.token_to_id(named["bos_token"]) if "bos_token" in named else None
        eos_id = backend.token_to_id(named["eos_token"]) if "eos_token" in named else None

        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        gen_eos = gen.get("eos_token_id")
        extra = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        return cls(backend, bos_token_id=bos_id, eos_token_id=eos_id, add_bos_token=bool(add_bos),
                   chat_template=template, special_tokens=named, extra_stop_token_ids=extra,
                   source=str(folder))

    # ---- properties ----------------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        """BOS id (SmolLM2: 1, ``<|im_start|>``)."""
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        """EOS id (SmolLM2: 2, ``<|im_end|>``, which is also its end-of-turn token)."""
        return self._eos

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the embedding's rows for a GGUF model)."""
        return self._vocab_size

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation, sorted: EOS, the model's declared end-of-turn / extra EOS ids,
        and every special token named in :data:`END_OF_TURN_TOKENS` (llama.cpp's rule).

        SmolLM2: ``(0, 2)`` -- ``<|im_end|>`` ends an assistant turn (and is EOS), and
        ``<|endoftext|>`` ends a document, which is what the model emits when continuing plain
        text. ``transformers.generate`` with SmolLM2's generation_config stops on 2 only; use
        :attr:`eos_token_id` alone to reproduce it exactly.
        """
        return self._stop

    def is_stop(self, token_id: int) -> bool:
        """Whether generation ends after ``token_id``."""
        return int(token_id) in self._stop

    # ---- ids <-> text ------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``"<|im_start|>"``)
        become their single ids, as in transformers. BOS is prepended when ``add_bos`` says so,
        or, when it is ``None``, when the model's metadata does (``add_bos_token``); never
        twice. No EOS is ever appended."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos_token
        if add_bos:
            if self._bos is None:
                raise ValueError(f"add_bos requested but the tokenizer ({self.source}) has no BOS")
            if not ids or ids[0] != self._bos:
                ids.insert(0, self._bos)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (``<|im_end|>``...) are left out unless
        ``skip_special_tokens`` is False. Bytes that do not form a complete UTF-8 character
        come out as ``"\\ufffd"``."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry (byte-level form: a space is ``"Ġ"``), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level form), or None."""
        return self.backend.id_to_token(int(token_id))

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` for one generation."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
        """Yield non-empty text increments while ``ids`` (e.g. a generator of sampled ids) is
        consumed; the pieces join to ``decode(ids)``."""
        dec = self.stream_decoder(skip_special_tokens)
        for i in ids:
            if piece := dec.put(i):
                yield piece
        if piece := dec.flush():
            yield piece

    # ---- chat ----------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, *,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """The prompt text for a conversation (``[{"role": "user", "content": "..."}]``),
        rendered as ``transformers``' ``apply_chat_template(messages, tokenize=False,
        add_generation_prompt=...)`` does. Note the default here is
        ``add_generation_prompt=True`` (we render prompts to generate from; transformers'
        default is False). ``chat_template`` overrides the model's; ``kwargs`` reach the
        template."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(f"the tokenizer ({self.source}) has no chat template")
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, **kwargs)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Ids of the rendered conversation. Like transformers' ``apply_chat_template(...,
        tokenize=True)``, no BOS is added: the template writes every marker it wants."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_bos=False)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"bos={self._bos}, eos={self._eos}, add_bos={self.add_bos_token}, "
                f"stop={list(self._stop)})")
