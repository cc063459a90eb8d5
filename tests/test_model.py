"""The compiled model against the independent NumPy reference."""
import numpy as np
import pytest

from mlc_course.engine import Engine
from mlc_course.quantization import dequantize, get_scheme, quantize
from mlc_course.reference import ReferenceLlama


def _dequantized(params, scheme):
    return {k: dequantize(*quantize(v, scheme), scheme) if v.ndim == 2 and get_scheme(scheme).quantized else v
            for k, v in params.items()}


def _compare(eng, ref, prompt, steps=20):
    eng.reset()
    ref.reset()
    b = ref.prefill(prompt)
    diffs = [np.abs(eng.prefill(prompt) - b).max()]
    for _ in range(steps):  # follow the reference's greedy path
        tok = int(np.argmax(b))
        a, b = eng.decode(tok), ref.decode(tok)
    diffs.append(np.abs(a - b).max())
    return diffs


@pytest.mark.parametrize("scheme", ["q0f32", "q4f32_1", "q4f32_asym"])
def test_tiny_logits_match_reference(scheme):
    with Engine("tiny", scheme, quiet=True) as eng:
        ref = ReferenceLlama(eng.config, _dequantized(eng.source.load_params(), scheme))
        d_prefill, d_decode = _compare(eng, ref, [3, 17, 99, 5, 200])
    assert d_prefill < 1e-4 and d_decode < 1e-4


@pytest.fixture(scope="module")
def smollm_q0():
    with Engine("smollm2-135m", "q0f32", quiet=True) as eng:
        yield eng


def test_smollm2_logits_match_reference_after_prefill_and_20_decodes(smollm_q0):
    ref = ReferenceLlama(smollm_q0.config, smollm_q0.source.load_params())
    prompt = smollm_q0.encode_prompt("The history of the printing press", chat=False)
    d_prefill, d_decode = _compare(smollm_q0, ref, prompt)
    assert d_prefill <= 1e-3, d_prefill
    assert d_decode <= 1e-3, d_decode


def test_smollm2_greedy_tokens_equal_reference(smollm_q0):
    ref = ReferenceLlama(smollm_q0.config, smollm_q0.source.load_params())
    ids = smollm_q0.encode_prompt("Name three primary colors.", chat=True)
    got = smollm_q0.generate(ids, max_new_tokens=16).output_ids
    assert got == ref.generate(ids, 16, eos=smollm_q0.tokenizer.eos_token_id)


def test_smollm2_q4f32_1_first_8_tokens_equal_float32_over_dequantized_weights():
    """The compiled q4f32_1 model computes what a float32 model over the dequantized weights
    computes: the first greedy tokens agree."""
    with Engine("smollm2-135m", "q4f32_1", quiet=True) as eng:
        ref = ReferenceLlama(eng.config, _dequantized(eng.source.load_params(), "q4f32_1"))
        for prompt, chat in [("Why is the sky blue?", True), ("The three laws of motion are", False)]:
            ids = eng.encode_prompt(prompt, chat)
            got = eng.generate(ids, max_new_tokens=8).output_ids
            assert got == ref.generate(ids, 8, eos=eng.tokenizer.eos_token_id), prompt
