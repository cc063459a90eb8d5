#!/usr/bin/env python3
"""SmolLM2 on the GPU: greedy tokens from CUDA against the same tokens on this CPU.

The course model's GGUF (93 MB) is larger than what one call to the GPU machine may carry
(64 MiB with everything else), so ``.carry`` and the file's two parts travel in three
back-to-back calls (a warm machine keeps ignored folders between calls) and it is put together there; the weights are converted there, as on the CPU.

Here (CPU)::

    python scripts/build_carry.py --models smollm2-135m:q0f32:static,smollm2-135m:q4f16_1:static,smollm2-135m:q0f16:static
    python scripts/smollm2_gpu_check.py prepare --schemes q0f32,q4f16_1,q0f16   # expected tokens + GGUF parts

then three calls of the ``run`` tool within the warm machine's idle time, carrying ``.carry``,
``.gguf/part0`` and ``.gguf/part1`` in turn, the last one running the check (the final run,
2026-11-26, one H100: about 50 s of machine time in all).

There (after ``.carry`` from build_carry.py with the smollm2 libraries, and the parts)::

    python3 scripts/smollm2_gpu_check.py run --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [("What is the capital of France?", True), ("Write a haiku about the sea.", True),
           ("The three primary colors are", False)]
NEW_TOKENS = 16
PART_SIZE = 47 << 20  # two parts: each fits one call beside the working tree


def prepare(schemes: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from mlc_course.engine import Engine
    from mlc_course.weights import course_model_path

    expected = {"new_tokens": NEW_TOKENS, "cases": []}
    for scheme in schemes:
        with Engine("smollm2-135m", scheme, quiet=True) as eng:
            for prompt, chat in PROMPTS:
                ids = eng.encode_prompt(prompt, chat)
                out = eng.generate(ids, max_new_tokens=NEW_TOKENS).output_ids
                expected["cases"].append({"scheme": scheme, "prompt": prompt, "chat": chat,
                                          "prompt_ids": ids, "cpu_output_ids": out,
                                          "eos": eng.tokenizer.eos_token_id})
    out_dir = ROOT / ".gguf"
    out_dir.mkdir(exist_ok=True)
    (ROOT / ".carry" / "smollm2_expected.json").write_text(json.dumps(expected, indent=1))
    data = course_model_path().read_bytes()
    for i in range(0, len(data), PART_SIZE):
        (out_dir / f"part{i // PART_SIZE}").mkdir(exist_ok=True)
        (out_dir / f"part{i // PART_SIZE}" / "gguf.bin").write_bytes(data[i:i + PART_SIZE])
    print("expected tokens in .carry/smollm2_expected.json; GGUF parts in .gguf/part*")


def run(out: Path) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_run  # the runtime-only TVM setup

    import numpy as np

    carry = ROOT / ".carry"
    gpu_run.setup_runtime(carry)
    from mlc_course.config import config_from_gguf_metadata
    from mlc_course.engine import Engine
    from mlc_course.weights import convert_params, load_gguf

    gguf = Path("/tmp/smollm2.gguf")
    with open(gguf, "wb") as f:
        for part in sorted((ROOT / ".gguf").glob("part*")):
            f.write((part / "gguf.bin").read_bytes())
    hf, meta = load_gguf(gguf)
    cfg = config_from_gguf_metadata(meta, "smollm2-135m", tie_embeddings="lm_head.weight" not in hf)
    manifest = json.loads((carry / "lib" / "manifest.json").read_text())
    expected = json.loads((carry / "smollm2_expected.json").read_text())
    info = gpu_run.gpu_info()
    doc = {"machine": info, "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "command": "python3 scripts/smollm2_gpu_check.py run", "cases": []}
    for lib, m in manifest["libraries"].items():
        if m["model"] != "smollm2-135m" or m.get("graph_kind") == "relax":
            continue
        scheme, kv = m["quantization"], m.get("kv", "dynamic")
        conv = convert_params(hf, cfg, scheme)
        arrays = [conv[name] for name, _, _ in m["params"]]
        # the static-KV libraries run as the engine runs them on GPUs: each step one CUDA graph
        eng = Engine.from_compiled(carry / "lib" / lib, cfg, arrays, scheme, "cuda", quiet=True,
                                   kv=kv, graph=kv == "static")
        for case in (c for c in expected["cases"] if c["scheme"] == scheme):
            res = eng.generate(case["prompt_ids"], max_new_tokens=expected["new_tokens"], stop_ids=(case["eos"],))
            cpu = case["cpu_output_ids"]
            agree = sum(1 for a, b in zip(res.output_ids, cpu) if a == b)
            first_diff = next((i for i, (a, b) in enumerate(zip(res.output_ids, cpu)) if a != b), None)
            doc["cases"].append({"scheme": scheme, "kv": kv, "prompt": case["prompt"], "chat": case["chat"],
                                 "cpu_output_ids": cpu, "gpu_output_ids": res.output_ids,
                                 "identical": res.output_ids == cpu, "agreeing_positions": agree,
                                 "first_difference": first_diff, "gpu": info["gpu"],
                                 "decode_tok_per_s": round(res.decode_tok_per_s, 1)})
            print(f"{scheme:8s} identical={res.output_ids == cpu} agree={agree}/{len(cpu)} {case['prompt']!r}")
        eng.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_smollm2.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["prepare", "run"])
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("--schemes", default="q0f32,q4f16_1", help="with prepare: the schemes compiled in .carry")
    a = ap.parse_args()
    sys.exit(prepare(a.schemes.split(",")) if a.mode == "prepare" else run(Path(a.out)))
