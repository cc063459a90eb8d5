"""Tests of mlc_course.tokenizer against the course model (SmolLM2-135M-Instruct GGUF).

The expected strings and ids in ``tests/data/smollm2_tokenizer_expected.json`` come from
``transformers`` (its real ``apply_chat_template``, its tokenizer call, and its own GGUF
tokenizer builder), plus ids that other projects published from the original Hugging Face
SmolLM2 tokenizer. The tests do not need transformers; to regenerate the fixture, in a
throwaway environment that has it (never in the project's)::

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install transformers jinja2 gguf==0.19.0
    PYTHONPATH=. /tmp/tfvenv/bin/python tests/test_tokenizer.py --regenerate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mlc_course.tokenizer import StreamDecoder, Tokenizer, render_chat_template

FIXTURE = Path(__file__).parent / "data" / "smollm2_tokenizer_expected.json"

# Text whose ids the fixture holds: unicode, digits, whitespace runs, code, special tokens.
ENCODE_TEXTS = [
    "Hello, world!",
    "Hello, how are you?",
    "The year 2024 had 366 days; pi = 3.14159, and 1,000,000 > 999.",
    "ABC123def456 v2.0.1-rc3",
    "  leading, trailing  ",
    "multiple   internal    spaces\tand\ttabs\nand\n\nnewlines\r\nCRLF",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Café naïve résumé façade Ångström",
    "你好，世界！这是一个测试。日本語のテキスト 한국어",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ (ZWJ: 👨‍👩‍👧)",
    "def foo(x: int) -> int:\n    return x ** 2  # square\n\nprint(foo(12))\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }",
    "https://example.com/path?q=1&r=two#frag",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<repo_name>mlc<file_sep>main.py",
    "",
    " ",
    "\n",
]

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "system", "content": "You are a terse assistant."},
      {"role": "user", "content": "Name three primes."}], True),
    ([{"role": "system", "content": "You answer in French."},
      {"role": "user", "content": "Hello!"},
      {"role": "assistant", "content": "Bonjour ! Comment puis-je vous aider ?"},
      {"role": "user", "content": "Quelle heure est-il ? 🕒"}], True),
    ([{"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}], False),
    ([{"role": "user", "content": "Write code:\n```python\nprint('hi')\n```"}], False),
]

# Small templates that exercise transformers' Jinja environment (whitespace control, tojson,
# loop controls, namespace, special tokens, add_generation_prompt); the fixture holds what
# transformers' apply_chat_template renders for each with TEMPLATE_MESSAGES.
TEMPLATE_MESSAGES = [{"role": "system", "content": "Use <tags> & 'quotes' — ok?"},
                     {"role": "user", "content": "héllo\n  indented"}]
TEMPLATES = [
    "{% for m in messages %}\n    <{{ m.role }}>\n    {{ m.content }}\n{% endfor %}\n"
    "{% if add_generation_prompt %}\n<assistant>\n{% endif %}",
    "{{ bos_token }}{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}{{ eos_token }}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}[{{ m.content }}]{% endfor %}",
    "{% set ns = namespace(sys='', n=0) %}{% for m in messages %}{% if m.role == 'system' %}"
    "{% set ns.sys = m.content %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }}:{{ ns.sys | trim }}:{{ unk_token }}{{ pad_token }}{{ tools is none }}",
    "{%- for m in messages -%}\n  {{- m.content | upper -}}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt %} GEN{% endif %}",
]

# Ids that other projects published from the original Hugging Face SmolLM2 tokenizer
# (tokenizer.json from the Hub, which we cannot reach): an independent check that the
# tokenizer rebuilt from the GGUF is the real one.
EXTERNAL = [
    {   # a test asserting parity with transformers' apply_chat_template + greedy generation
        "messages": [{"role": "user",
                      "content": "Quelle est la capitale de la France ? Réponds en une phrase."}],
        "ids": [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308,
                34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 65,
                2726, 290, 1264, 2618, 47765, 1121, 367, 2618, 4649, 9148, 428,
                2756, 96, 19870, 430, 16520, 8715, 30, 2, 198, 1, 520, 9531, 198],
        "answer_ids": [15319, 47765, 1121, 367, 2618, 4649, 1264, 7042, 30, 2],
        "answer": "La capitale de la France est Paris.",
    },
    {   # Hugging Face's smol-course output of tokenizer.apply_chat_template(tokenize=True)
        "text": "Hello, how are you?",
        "ids": [19556, 28, 638, 359, 346, 47],
    },
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from mlc_course.weights import course_model_path

    return Tokenizer.from_gguf(course_model_path())


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


# ---- ids and properties ---------------------------------------------------------------

def test_special_ids_and_properties(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.id_to_token(1) == "<|im_start|>"
    assert tok.eos_token_id == 2 and tok.id_to_token(2) == "<|im_end|>"
    assert tok.id_to_token(0) == "<|endoftext|>"
    assert tok.add_bos_token is False
    # <|im_end|> ends a chat turn (and is EOS); <|endoftext|> ends a document.
    assert tok.stop_token_ids == (0, 2)
    assert tok.is_stop(2) and tok.is_stop(0) and not tok.is_stop(1)
    assert tok.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}


def test_encode_matches_transformers(tok: Tokenizer, expected: dict) -> None:
    assert [e["text"] for e in expected["encode"]] == ENCODE_TEXTS
    for e in expected["encode"]:
        assert tok.encode(e["text"]) == e["ids"], e["text"]


@pytest.mark.parametrize("text", ENCODE_TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_decode_skips_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nHi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


@pytest.mark.parametrize("special", ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                     "<repo_name>", "<file_sep>", "<empty_output>"])
def test_special_tokens_are_single_ids(tok: Tokenizer, special: str) -> None:
    tid = tok.token_to_id(special)
    assert tid is not None and tid < 17
    assert tok.encode(special) == [tid]
    assert tid in tok.encode(f"a {special} b")


def test_digits_are_split(tok: Tokenizer) -> None:
    # SmolLM2's pre-tokenizer puts every digit in its own token.
    ids = tok.encode("12345")
    assert len(ids) == 5 and tok.decode(ids) == "12345"


def test_bos_behaviour(tok: Tokenizer) -> None:
    plain = tok.encode("Hello")
    assert plain[0] != tok.bos_token_id          # metadata: add_bos_token = False
    assert tok.encode("Hello", add_bos=True) == [tok.bos_token_id] + plain
    assert tok.encode("Hello", add_bos=False) == plain
    assert tok.encode("", add_bos=True) == [tok.bos_token_id]
    # never twice, even when the text starts with the BOS token itself
    assert tok.encode("<|im_start|>x", add_bos=True).count(tok.bos_token_id) == 1
    # and a tokenizer whose metadata asks for BOS adds it by default
    forced = Tokenizer(tok.backend, bos_token_id=1, eos_token_id=2, add_bos_token=True)
    assert forced.encode("Hello") == [1] + plain
    assert forced.encode("Hello", add_bos=False) == plain
    assert 2 not in forced.encode("Hello")        # EOS never appended


def test_external_reference_ids(tok: Tokenizer) -> None:
    chat, plain = EXTERNAL
    assert tok.encode_chat(chat["messages"]) == chat["ids"]
    assert tok.decode(chat["answer_ids"]) == chat["answer"]
    assert tok.encode(plain["text"]) == plain["ids"]


# ---- streaming ------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "héllo wörld — 中文字符 and emoji 😀👍🏽🇺🇸, ❤️ 👨‍👩‍👧!",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ (ZWJ: 👨‍👩‍👧)",
    "日本語のテキスト 한국어",
])
def test_stream_decode_equals_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.put(i) for i in ids]
    tail = dec.flush()
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert dec.text == text
    # no piece ever holds half a character
    assert not any("\ufffd" in p for p in pieces)
    # multi-token characters really happened in this text (otherwise the test proves little)
    assert any(p == "" for p in pieces)
    assert "".join(tok.decode_stream(ids)) == text


def test_stream_decode_skips_special_and_flushes_partial(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nbonjour 😀<|im_end|>")
    assert "".join(tok.decode_stream(ids)) == tok.decode(ids) == "assistant\nbonjour 😀"
    with_special = "".join(tok.decode_stream(ids, skip_special_tokens=False))
    assert with_special == "<|im_start|>assistant\nbonjour 😀<|im_end|>"
    # generation cut inside a character: the partial bytes come out at flush, as decode does
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) > 1
    dec = StreamDecoder(tok)
    assert dec.put_many(emoji_ids[:-1]) == ""
    assert dec.flush() == tok.decode(emoji_ids[:-1])


# ---- chat template --------------------------------------------------------------------

def test_chat_template_matches_transformers(tok: Tokenizer, expected: dict) -> None:
    assert len(expected["chat"]) == len(CONVERSATIONS)
    for case, (messages, agp) in zip(expected["chat"], CONVERSATIONS):
        assert case["messages"] == messages and case["add_generation_prompt"] == agp
        text = tok.apply_chat_template(messages, add_generation_prompt=agp)
        assert text == case["text"]
        assert tok.encode_chat(messages, add_generation_prompt=agp) == case["ids"]


def test_jinja_templates_match_transformers(tok: Tokenizer, expected: dict) -> None:
    assert [c["template"] for c in expected["templates"]] == TEMPLATES
    assert expected["special_tokens_map"] == tok.special_tokens
    for case in expected["templates"]:
        for agp, want in ((True, case["with_generation_prompt"]),
                          (False, case["without_generation_prompt"])):
            got = tok.apply_chat_template(TEMPLATE_MESSAGES, agp, chat_template=case["template"])
            assert got == want, case["template"]


def test_chat_template_shape(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # messages with None values are cleaned as transformers does, and empty chats refused
    assert tok.apply_chat_template([{"role": "user", "content": "Hi", "name": None}]) == text
    with pytest.raises(ValueError):
        tok.apply_chat_template([])


def test_jinja_environment_like_transformers() -> None:
    msgs = [{"role": "user", "content": "a<b> & 'c'"}]
    # trim_blocks / lstrip_blocks: block tags leave no newline or indentation behind
    t = "{% for m in messages %}\n    {{ m.role }}\n{% endfor %}"
    assert render_chat_template(t, msgs) == "    user\n"
    # tojson does not HTML-escape, keeps unicode
    assert render_chat_template("{{ messages[0].content | tojson }}", msgs) == '"a<b> & \'c\'"'
    assert render_chat_template("{{ 'é' | tojson }}", msgs) == '"é"'
    # loop controls, raise_exception, special tokens and generation tag
    t = "{% for m in [1,2,3] %}{% if m == 2 %}{% break %}{% endif %}{{ m }}{% endfor %}"
    assert render_chat_template(t, msgs) == "1"
    with pytest.raises(Exception, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", msgs)
    assert render_chat_template("{{ bos_token }}{% generation %}x{% endgeneration %}", msgs,
                                special_tokens={"bos_token": "<s>"}) == "<s>x"
    # namespace works, the sandbox refuses to mutate the caller's data
    t = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    assert render_chat_template(t, msgs) == "1"
    with pytest.raises(Exception):
        render_chat_template("{{ messages.append(1) }}", msgs)


# ---- other constructors and errors ----------------------------------------------------

def test_from_hf_folder(tok: Tokenizer, tmp_path: Path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
        "chat_template": tok.chat_template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    hf = Tokenizer.from_hf_folder(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.add_bos_token) == (1, 2, False)
    assert hf.stop_token_ids == (0, 2)
    for text in ENCODE_TEXTS:
        assert hf.encode(text) == tok.encode(text)
    msgs = CONVERSATIONS[2][0]
    assert hf.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_unsupported_gguf_tokenizers_are_named() -> None:
    base = {"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="'qwen2'"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.model": "gpt2",
                                      "tokenizer.ggml.pre": "qwen2"})


def test_gpt2_and_llama3_pre_tokenizers() -> None:
    # A toy byte-level vocabulary: every byte symbol plus a few merges.
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>"] + alphabet + ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "12", "123"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "1 2", "12 3"]
    types = [3] + [1] * (len(tokens) - 1)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.eos_token_id": 0}
    gpt2 = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "gpt2"})
    llama3 = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "llama3",
                                           "tokenizer.ggml.add_bos_token": True,
                                           "tokenizer.ggml.bos_token_id": 0})
    smollm = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": "smollm"})
    for t in (gpt2, llama3, smollm):
        text = "hello wo 1234<|endoftext|>"
        assert t.decode(t.encode(text, add_bos=False), skip_special_tokens=False) == text
        assert t.stop_token_ids == (0,)
    v = gpt2.token_to_id
    assert gpt2.encode("hello 1234") == [v("hello"), v("Ġ"), v("123"), v("4")]
    assert smollm.encode("1234") == [v("1"), v("2"), v("3"), v("4")]   # one token per digit
    assert llama3.encode("1234") == [0, v("123"), v("4")]               # groups of <= 3, BOS on


# ---- fixture generation (needs transformers; never run by pytest) ---------------------

def _regenerate() -> None:  # pragma: no cover
    """Write the fixture from transformers: its apply_chat_template (tokenize=False and True)
    and its tokenizer call, on a PreTrainedTokenizerFast holding our tokenizer.json plus
    SmolLM2's tokenizer_config; and, as a cross-check, the ids of transformers' own GGUF
    tokenizer builder (GPT2Tokenizer + the GGUF's control tokens), which must agree."""
    import re
    import tempfile

    import tokenizers
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    from mlc_course.weights import course_model_path, gguf_metadata

    path = course_model_path()
    meta = gguf_metadata(path)
    ours = Tokenizer.from_gguf_metadata(meta)
    with tempfile.TemporaryDirectory() as tmp:
        ours.backend.save(str(Path(tmp) / "tokenizer.json"))
        # as in HuggingFaceTB/SmolLM2-135M-Instruct's tokenizer_config.json
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
            "add_prefix_space": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 8192, "chat_template": meta["tokenizer.chat_template"]}))
        hf = PreTrainedTokenizerFast.from_pretrained(tmp)

    tdict = {name: meta[f"tokenizer.{key}"]
             for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items() if f"tokenizer.{key}" in meta}
    gguf_backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tdict)

    out: dict = {
        "about": "expected SmolLM2-135M-Instruct tokenizer outputs; see tests/test_tokenizer.py",
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "special_tokens_map": hf.special_tokens_map, "encode": [], "chat": []}
    for text in ENCODE_TEXTS:
        ids = hf(text, add_special_tokens=True)["input_ids"]
        other = gguf_backend.encode(text, add_special_tokens=False).ids
        assert ids == other, (text, ids, other)
        assert hf.decode(ids, skip_special_tokens=False) == text, text
        out["encode"].append({"text": text, "ids": ids})
    for messages, agp in CONVERSATIONS:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=agp,
                                     return_dict=False)
        assert ids == gguf_backend.encode(text, add_special_tokens=False).ids
        out["chat"].append({"messages": messages, "add_generation_prompt": agp,
                            "text": text, "ids": list(ids)})
    out["templates"] = [
        {"template": t,
         "with_generation_prompt": hf.apply_chat_template(
             TEMPLATE_MESSAGES, chat_template=t, tokenize=False, add_generation_prompt=True),
         "without_generation_prompt": hf.apply_chat_template(
             TEMPLATE_MESSAGES, chat_template=t, tokenize=False, add_generation_prompt=False)}
        for t in TEMPLATES]
    chat = EXTERNAL[0]
    assert hf.apply_chat_template(chat["messages"], add_generation_prompt=True,
                                  return_dict=False) == chat["ids"]
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(out, ensure_ascii=False, indent=1)
    # one line per id list, so that the fixture stays readable and diffs stay small
    text = re.sub(r"\[\n\s+(\d[\d,\s]*?)\n\s*\]",
                  lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    assert json.loads(text) == out
    FIXTURE.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":  # pragma: no cover
    if "--regenerate" in sys.argv:
        _regenerate()
    else:
        print(__doc__)
