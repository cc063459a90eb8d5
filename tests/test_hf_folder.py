"""--model accepts a local Hugging Face folder: config.json, *.safetensors, tokenizer.json."""
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mlc_course.config import LlamaConfig
from mlc_course.reference import ReferenceLlama
from mlc_course.weights import synthetic_params


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    # a byte-level BPE over the 256 byte symbols plus two specials: vocab 258
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 258, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": False}
    (d / "config.json").write_text(json.dumps(cfg))
    shapes = LlamaConfig("t", 258, 64, 128, 2, 4, 2, 16, tie_embeddings=False)
    params = synthetic_params(shapes, seed=3, scale=0.2)
    save_file(params, str(d / "model.safetensors"))
    return d, shapes, params


def test_generate_from_local_hf_folder_matches_reference(folder):
    d, cfg, params = folder
    r = subprocess.run([sys.executable, "-m", "mlc_course", "generate", "--model", str(d), "--prompt", "hello",
                        "--quantization", "q0f32", "--max-new-tokens", "10", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"][0] == 256  # BOS from tokenizer_config
    ref = ReferenceLlama(cfg, params).generate(out["prompt_ids"], 10, eos=257)
    assert out["output_ids"] == ref


def test_offline_repo_id_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "mlc_course", "generate", "--model", "someone/some-llama",
                        "--prompt", "hi"], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--model PATH" in r.stderr
