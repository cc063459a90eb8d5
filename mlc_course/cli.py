"""``python -m mlc_course``: the course's command line.

Commands: ``fetch`` (the course model), ``generate``, ``chat``, ``bench``, ``perplexity``,
``grade`` (lab notebooks), ``demo`` (the main job of ``make demo``), ``cache`` (show or clear the cache).
Results go to stdout; progress and logs to stderr. User errors exit with status 2 and one
line that says what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="preset (smollm2-135m, tiny), local HF folder or HF repo id")
    p.add_argument("--quantization", default=None,
                   help="q4f32_1 (CPU default), q4f16_1 (GPU default), q0f32, q0f16, q4f32_asym, q4f16_asym")
    p.add_argument("--shards", type=int, default=1, help="tensor-parallel workers")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--session", default="process", choices=["process", "thread"],
                   help="disco session kind for --shards > 1")


def cmd_fetch(args) -> int:
    from .weights import course_model_path

    print(course_model_path())
    return 0


def cmd_generate(args) -> int:
    from .engine import Engine

    with Engine(args.model, args.quantization, args.shards, args.device, args.session,
                quiet=args.json and args.quiet) as eng:
        ids = eng.encode_prompt(args.prompt, args.chat)
        if args.json:
            res = eng.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed)
            print(json.dumps({
                "model": args.model, "quantization": eng.scheme, "shards": args.shards,
                "device": args.device, "prompt_ids": ids, "output_ids": res.output_ids,
                "text": res.text, "prefill_tok_per_s": round(res.prefill_tok_per_s, 3),
                "decode_tok_per_s": round(res.decode_tok_per_s, 3)}))
            return 0
        from .engine import GenerationResult

        res = GenerationResult(ids)
        dec = eng.tokenizer.stream_decoder()
        for tok in eng.stream(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, result=res):
            sys.stdout.write(dec.put(tok))
            sys.stdout.flush()
        sys.stdout.write(dec.flush() + "\n")
        print(f"[prefill {res.prefill_tok_per_s:.1f} tok/s, decode {res.decode_tok_per_s:.1f} tok/s, "
              f"{len(res.output_ids)} tokens]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .engine import Engine, EngineError

    with Engine(args.model, args.quantization, args.shards, args.device, args.session) as eng:
        tok = eng.tokenizer
        history: list[dict] = []
        print("chat with the model; /reset clears the conversation, /exit leaves", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if line.strip() == "/exit":
                return 0
            if line.strip() == "/reset":
                history = []
                print("(conversation cleared)", file=sys.stderr)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            ids = tok.encode_chat(history)
            dec, reply = tok.stream_decoder(), []
            sys.stdout.write("bot> ")
            try:
                for t in eng.stream(ids, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p, seed=args.seed):
                    reply.append(t)
                    sys.stdout.write(dec.put(t))
                    sys.stdout.flush()
            except KeyboardInterrupt:
                sys.stdout.write(" [stopped]")
            except EngineError as e:
                print(f"\n(error: {e}; try /reset)", file=sys.stderr)
                history.pop()
                continue
            sys.stdout.write(dec.flush() + "\n")
            history.append({"role": "assistant", "content": tok.decode(reply)})


def cmd_bench(args) -> int:
    if args.predict:
        from . import perf_model

        return perf_model.predict_cli(args)
    from . import bench

    if args.threads:
        import os

        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts
    result = bench.run_cpu_bench(model=args.model,
                                 schemes=args.quantization or ["q0f32", "q4f32_1", "q4f32_asym"],
                                 new_tokens=args.new_tokens, out=args.out, threads=args.threads,
                                 repeats=args.repeats)
    print(json.dumps(result, indent=1))
    return 0


def cmd_perplexity(args) -> int:
    from .perplexity import perplexity_table

    rows = perplexity_table(args.model, args.quantization or None, text_file=args.text)
    print(json.dumps(rows, indent=1))
    return 0


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def cmd_cache(args) -> int:
    import shutil

    from .weights import cache_dir

    d = cache_dir()
    for sub in ("lib", "params", "ccl"):
        p = d / sub
        if args.clear and p.exists():
            shutil.rmtree(p)
            print(f"removed {p}")
        elif p.exists():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            print(f"{p}: {size / 1e6:.1f} MB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mlc_course", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    from .grading import add_parser as add_grade_parser

    add_grade_parser(sub)  # grade PATH...: run students' lab notebooks headless, score them

    sub.add_parser("fetch", help="download and verify the course model").set_defaults(fn=cmd_fetch)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    g.add_argument("--quiet", action="store_true", help="with --json: no progress on stderr")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat")
    _add_model_args(c)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(fn=cmd_chat)

    b = sub.add_parser("bench", help="decode benchmark (CPU), or --predict a GPU setup")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--quantization", action="append", help="scheme(s) to run (repeatable)")
    b.add_argument("--device", default="cpu", choices=["cpu"])
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=5, help="timed rounds over all engines (medians)")
    b.add_argument("--threads", type=int, default=None,
                   help="CPU threads for TVM's kernels and llama.cpp (default: every usable core)")
    b.add_argument("--out", default="data/results/cpu_bench.json")
    b.add_argument("--predict", action="store_true", help="print the performance model's prediction")
    b.add_argument("--gpu", default="H100-SXM")
    b.add_argument("--num-gpus", type=int, default=1)
    b.add_argument("--link", choices=["nvlink", "pcie"], default=None, help="with --predict")
    b.add_argument("--engine", choices=["mlc-2023", "course"], default=None, help="with --predict")
    b.add_argument("--eager", action="store_true", help="with --predict: no CUDA graphs")
    b.set_defaults(fn=cmd_bench)

    p = sub.add_parser("perplexity", help="perplexity of the course model per quantization scheme")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", action="append")
    p.add_argument("--text", default=None, help="text file (default: the course's held-out text)")
    p.set_defaults(fn=cmd_perplexity)

    d = sub.add_parser("demo", help="the course's main job (make demo)")
    d.add_argument("--shards", type=int, default=3)
    d.set_defaults(fn=cmd_demo)

    k = sub.add_parser("cache", help="show or clear compiled libraries and converted weights")
    k.add_argument("--clear", action="store_true")
    k.set_defaults(fn=cmd_cache)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .engine import EngineError
    from .weights import WeightsError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (EngineError, WeightsError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
