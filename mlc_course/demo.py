"""The course's main job (``make demo``): what the course builds, end to end, on this CPU.

1. Quantize the course model's weights to q4f16_1 and report memory and error.
2. Compile SmolLM2 with the course pipeline and answer a question on one worker.
3. Answer the same question with the model sharded over N CPU workers (tensor
   parallelism through disco and the course's collective library) and compare the tokens.
"""

from __future__ import annotations

import sys
import time

import numpy as np

QUESTION = "What is the capital of France? Answer in one sentence."


def quantization_report(params: dict[str, np.ndarray], scheme: str = "q4f16_1") -> dict:
    """Memory before/after and the round-trip error over every 2-D weight."""
    from .quantization import dequantize, nbytes, quantize

    f32 = f16 = q = 0
    err_sum = err_max = 0.0
    count = 0
    for name, w in params.items():
        f32 += w.size * 4
        f16 += w.size * 2
        if w.ndim != 2:
            q += w.size * 2
            continue
        q += nbytes(w.shape, scheme)
        d = dequantize(*quantize(w, scheme), scheme)
        e = np.abs(d - w)
        err_sum += float(e.sum())
        err_max = max(err_max, float(e.max()))
        count += w.size
    return {"scheme": scheme, "fp32_MB": f32 / 1e6, "fp16_MB": f16 / 1e6, "quantized_MB": q / 1e6,
            "mean_abs_error": err_sum / count, "max_abs_error": err_max}


def main(args) -> int:
    from .engine import Engine
    from .weights import resolve_model

    out = sys.stdout
    src = resolve_model("smollm2-135m")
    print(f"== 1. quantizing {src.config.name} ({src.config.num_params() / 1e6:.0f} M parameters)", file=out)
    rep = quantization_report(src.load_params())
    print(f"   fp32 {rep['fp32_MB']:.0f} MB, fp16 {rep['fp16_MB']:.0f} MB -> {rep['scheme']} "
          f"{rep['quantized_MB']:.0f} MB ({rep['fp16_MB'] / rep['quantized_MB']:.1f}x smaller than fp16); "
          f"mean |w - w_q| = {rep['mean_abs_error']:.2e}, max {rep['max_abs_error']:.2e}", file=out)

    answers = {}
    for shards in (1, args.shards):
        if shards in answers:
            continue
        print(f"== {2 if shards == 1 else 3}. generating on {shards} CPU worker(s)", file=out)
        t0 = time.time()
        with Engine("smollm2-135m", "q4f32_1", shards=shards) as eng:
            ids = eng.encode_prompt(QUESTION, chat=True)
            res = eng.generate(ids, max_new_tokens=48)
        answers[shards] = res.output_ids
        print(f"   Q: {QUESTION}\n   A: {res.text.strip()}", file=out)
        print(f"   ({len(res.output_ids)} tokens, decode {res.decode_tok_per_s:.1f} tok/s, "
              f"{time.time() - t0:.1f} s with start-up)", file=out)
    if len(answers) > 1:
        same = answers[1] == answers[args.shards]
        print(f"== TP=1 and TP={args.shards} produced {'the same' if same else 'DIFFERENT'} tokens", file=out)
        if not same:
            return 1
    return 0
