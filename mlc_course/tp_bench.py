"""Tensor parallelism on GPUs, measured: the ``tiny`` model's logits and greedy tokens at TP=2
against TP=1, and the decode speed of Llama-shaped models with random weights at TP = 1, 2, 4.

The pieces are shared: ``scripts/gpu_run.py`` runs them on lent GPUs with libraries compiled
elsewhere (:func:`random_weight_engine`, :func:`time_decode`, :func:`decode_record`,
:func:`compare_tp`); notebook 07 calls :func:`tp_study`, which measures live where this machine
has two or more CUDA GPUs and a TVM that compiles, and otherwise returns the committed run,
saying which it shows.

Random weights: speed does not depend on the values, and a 70B model's 35 GB of weights made
on the host would take longer than the benchmark, so every layer gets the same random arrays
(:func:`random_params`), and each disco worker makes its own shard on its own GPU
(``mlc_course.random_worker_params``, registered by :mod:`mlc_course.disco_worker`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results"
COMMITTED = "gpu_h200x4_tp4.json"  # the final multi-GPU run: TP = 1, 2, 4
LIVE_MODELS = ("llama2-7b", "codellama-34b", "llama2-70b")
TINY_PROMPT = [1, 17, 42, 99, 200, 3, 64, 128]


def random_params(params: list, seed: int = 0):
    """Random arrays for ``params`` (``[name, shape, dtype]`` each, in the model's order):
    4-bit words uniform over all nibbles, float16 scales in [0.002, 0.004] (weights of std
    ~0.014), norms 1, other float arrays N(0, 0.014). Yielded one at a time; arrays of the same
    name pattern and shape are made once and reused (every layer gets the same random layer)."""
    rng = np.random.default_rng(seed)
    made: dict = {}
    for name, shape, dtype in params:
        key = (re.sub(r"\d+", "#", name), tuple(shape), dtype)
        if key in made:
            yield made[key]
            continue
        n = int(np.prod(shape))
        if dtype == "uint32":
            a = np.frombuffer(rng.bytes(4 * n), dtype=np.uint32).reshape(shape)
        elif name.endswith("q_scale"):
            a = rng.uniform(0.002, 0.004, size=shape).astype(dtype)
        elif "norm" in name:
            a = np.ones(shape, dtype=dtype)
        else:
            a = (0.014 * rng.standard_normal(size=shape)).astype(dtype)
        made[key] = a
        yield a


def specs_of(named) -> list:
    """``[name, shape, dtype]`` (JSON-ready) of each ``(name, spec)`` :func:`mlc_course.model.export` returns."""
    return [[n, [int(d) for d in spec.shape], str(spec.dtype)] for n, spec in named]


def param_specs(cfg, scheme: str, shards: int) -> list:
    """``[name, shape, dtype]`` of one worker's parameters of the GPU model (static KV)."""
    from .model import export

    return specs_of(export(cfg, scheme, shards, kv="static", gpu=True, form="half2")[1])


def random_weight_engine(lib_path, cfg, scheme: str, shards: int, params: list, *, kv: str = "static",
                         graph: bool = True, entrypoint: str = "mlc_course.disco_worker"):
    """An :class:`~mlc_course.engine.Engine` over the compiled library ``lib_path`` with random
    weights made on the GPUs: one worker in this process, or ``shards`` disco workers (NCCL),
    each making its own shard on its own GPU. Checks first that the shard fits."""
    from .engine import DiscoRunner, Engine, check_fits

    graph = graph and kv == "static"
    if shards == 1:
        return Engine.from_compiled(lib_path, cfg, random_params(params), scheme, "cuda", quiet=True,
                                    kv=kv, graph=graph)
    check_fits(cfg, scheme, shards, kv)
    runner = DiscoRunner(Path(lib_path), None, [], "cuda", shards, kv=kv, graph=graph, entrypoint=entrypoint,
                         params=lambda sess: sess.get_global_func("mlc_course.random_worker_params")(
                             json.dumps(params)))
    return Engine.from_runner(runner, cfg, scheme, "cuda", quiet=True, kv=kv, shards=shards)


def time_decode(eng, prompt_len: int = 128, new_tokens: int = 256, runs: int = 2,
                deadline: float | None = None, log=lambda m: None) -> tuple[list, list[int]]:
    """Greedy generation of ``new_tokens`` after a random ``prompt_len``-token prompt, ``runs``
    times after a short warm-up (kernels loaded, graphs captured); stops early past
    ``deadline``. Returns the :class:`~mlc_course.engine.GenerationResult` of each run and the
    prompt."""
    prompt = [int(x) for x in np.random.default_rng(1).integers(0, eng.config.vocab_size, prompt_len)]
    t0 = time.time()
    eng.generate(prompt, max_new_tokens=4, stop_ids=())
    log(f"  warm-up {time.time() - t0:.1f} s")
    results = []
    for r in range(runs):
        res = eng.generate(prompt, max_new_tokens=new_tokens + 1, stop_ids=())
        results.append(res)
        log(f"  run {r}: prefill {res.prefill_tok_per_s:.1f} tok/s, decode {res.decode_tok_per_s:.2f} tok/s")
        if deadline is not None and time.time() > deadline:
            break
    return results, prompt


def decode_record(eng, results: list, bandwidth: float | None, prompt_len: int, new_tokens: int,
                  gemv: str = "course", pdl: bool = False, graph: bool = True, gpu: str | None = None) -> dict:
    """One decode measurement as the results files hold it: the median run's tok/s, the bytes
    a token reads, and the ceiling those bytes set at the measured copy ``bandwidth`` (each of
    N GPUs reads 1/N of the weights, in parallel: the ceiling scales with N)."""
    cfg, scheme, shards, kv = eng.config, eng.scheme, eng.shards, eng.kv
    decode = sorted(x.decode_tok_per_s for x in results)[len(results) // 2]
    on_device = bool(getattr(eng.runner, "can_greedy", lambda: False)())
    bpt = cfg.bytes_per_token(scheme)
    ceiling = shards * bandwidth * 1e9 / bpt if bandwidth else None
    detail = {("static", True): "static KV cache, whole decode step replayed as one CUDA graph",
              ("static", False): "static KV cache, no CUDA graph",
              ("dynamic", True): "dynamic KV cache (nn.KVCache), Relax RewriteCUDAGraph",
              ("dynamic", False): "dynamic KV cache (nn.KVCache), no CUDA graph"}[kv, graph]
    return {
        "model": cfg.name, "weights": "random (generated on the GPU machine)",
        "quantization": scheme, "shards": shards, "gemv": gemv, **({"gpu": gpu} if gpu else {}),
        "decode_tok_per_s": round(decode, 2), "decode_tok_per_s_runs": [round(x.decode_tok_per_s, 2) for x in results],
        "prefill_tok_per_s": round(results[0].prefill_tok_per_s, 1), "prompt_tokens": prompt_len,
        "new_tokens": new_tokens, "bytes_per_token": bpt,
        "kv_bytes_per_token_mean": cfg.kv_bytes_per_token(int(prompt_len + new_tokens / 2)),
        "bandwidth_GBps": round(bandwidth, 1) if bandwidth else None,
        "ceiling_tok_per_s": round(ceiling, 1) if ceiling else None,
        "fraction_of_ceiling": round(decode / ceiling, 4) if ceiling else None,
        "kv": kv, "cuda_graph": graph, "pdl": pdl,
        "sampling": "argmax on the GPU, in the graph" if on_device else "argmax on the host",
        "engine": "mlc_course",
        "engine_detail": f"TVM 0.27 runtime, {gemv} GEMV schedule, {detail}"
                         + (", programmatic dependent launch" if pdl else "")
                         + (", greedy token chosen on the GPU" if on_device else "")
                         + (f", {shards} GPUs (disco + NCCL)" if shards > 1 else "")}


def allreduce_info(sess) -> dict:
    """``allreduce`` (the path the workers' sum all-reduces take: ``oneshot``, the NCCL
    plugin's kernel over peer memory, or ``nccl``) and ``allreduce_detail`` (why, how) of a
    disco session on GPUs (:func:`mlc_course.ccl.allreduce_path`)."""
    from . import ccl

    try:
        info = ccl.allreduce_path(sess)
    except Exception as e:  # noqa: BLE001  (a plugin without the one-shot path)
        return {"allreduce": "nccl", "allreduce_detail": {"reason": f"no path report: {str(e)[:200]}"}}
    return {"allreduce": info.get("path", "nccl"),
            "allreduce_detail": {k: info.get(k) for k in ("reason", "kernel", "peers", "max_bytes", "pdl",
                                                          "pdl_note", "error")}}


def compare_tp(e1, e2, steps: int = 16, prompt: list[int] = TINY_PROMPT) -> dict:
    """The same model on one worker (``e1``) and on N (``e2``): both follow ``e1``'s greedy
    tokens for ``steps`` steps after ``prompt``; the largest logit difference (absolute and
    relative to the largest logit), the tokens each would pick, and ``e2``'s tokens when the
    argmax is taken on the GPUs. ``ok``: within the scheme's tolerance, same tokens."""
    scheme = e1.scheme
    l1, l2 = e1.prefill(prompt), e2.prefill(prompt)
    diffs, scale, tok1, tok2 = [float(np.abs(l1 - l2).max())], [float(np.abs(l1).max())], [], []
    for _ in range(steps):
        t = int(np.argmax(l1))
        tok1.append(t)
        tok2.append(int(np.argmax(l2)))
        l1, l2 = e1.decode(t), e2.decode(t)  # both follow the 1-GPU tokens
        diffs.append(float(np.abs(l1 - l2).max()))
        scale.append(float(np.abs(l1).max()))
    tol = 1e-4 if scheme in ("q0f32", "q4f32_1") else 2e-2
    rel = max(d / max(sc, 1e-6) for d, sc in zip(diffs, scale))
    e2.reset()
    dev2 = list(e2.generate(prompt, max_new_tokens=steps, stop_ids=()).output_ids)
    sess = getattr(e2.runner, "sess", None)
    path = allreduce_info(sess) if sess is not None and e2.device == "cuda" else {}
    return {**path, "model": e1.config.name, "quantization": scheme, "kv": e2.kv, "shards": e2.shards,
            "cuda_graph": bool(getattr(e2.runner, "graph", False)), "steps": steps,
            "max_abs_diff": max(diffs), "max_rel_diff": rel, "tolerance_rel": tol,
            "tokens_tp1": tok1, "tokens_tp2": tok2, "same_tokens": tok1 == tok2,
            "greedy_on_device": bool(getattr(e2.runner, "can_greedy", lambda: False)()),
            "tokens_tp2_device_greedy": dev2, "ok": bool(rel <= tol and tok1 == tok2 and dev2 == tok2)}


def _fits(cfg, scheme: str, shards: int) -> bool:
    from .engine import EngineError, check_fits

    try:
        check_fits(cfg, scheme, shards, "static")
        return True
    except EngineError:
        return False


def committed_study() -> dict:
    """The committed multi-GPU run, in :func:`tp_study`'s form."""
    doc = json.loads((RESULTS / COMMITTED).read_text())
    m = doc["machine"]
    records = [r for r in doc["records"] if r["engine"] == "mlc_course" and r.get("kv") == "static"
               and r["gemv"] == "course" and r["cuda_graph"] and r.get("pdl", True)
               and r.get("allreduce", "oneshot") == "oneshot" and not r.get("prefetch")]  # the engine's defaults
    return {"gpu": m["gpu"], "gpus": m["gpus"], "bandwidth_GBps": doc.get("bandwidth_GBps"),
            "tp_correctness": doc["tp_correctness"], "records": records, "live": False,
            "source": f"the committed run on {m['gpus']}x {m['gpu']} (data/results/{COMMITTED}, "
                      f"{records[0].get('date', '')}); this machine has fewer than two CUDA GPUs"}


def tp_study(live: bool | None = None, models=LIVE_MODELS, scheme: str = "q4f16_1", prompt_len: int = 128,
             new_tokens: int = 256, runs: int = 1, budget_s: float = 900, log=lambda m: None) -> dict:
    """Tensor parallelism on this machine's GPUs, or the committed run.

    Live (default: where there are two or more CUDA GPUs): ``tiny`` at TP=2 against TP=1 in
    q0f32 and q4f16_1 (:func:`compare_tp`); then each of ``models`` in ``scheme`` at TP = 1, 2,
    4 (as many GPUs as there are, and where one shard fits in a GPU's free memory), compiled for
    this GPU (cached), random weights, ``runs`` timed generations each, skipping what is left
    past ``budget_s``. Returns ``tp_correctness``, ``records`` (as the results files hold
    them), ``gpu``, ``gpus``, ``source`` (which it shows) and ``live``."""
    from .gpu import cuda_device_count

    n = cuda_device_count()
    if live is None:
        live = n >= 2
    if not live:
        return committed_study()
    if n < 2:
        raise RuntimeError(f"a live tensor-parallel study needs two or more CUDA GPUs; this machine has {n}. "
                           "Call tp_study() for the committed run")
    from .compile import build_model, get_target
    from .config import get_preset
    from .cuda_device import supports_pdl
    from .engine import Engine
    from .gemv_bench import copy_bandwidth, gpu_here

    t_end = time.time() + budget_s
    gpu = gpu_here() or "CUDA GPU"
    pdl = supports_pdl(get_target("cuda"))  # (the libraries build_model compiles for this GPU)
    correctness = []
    for sch in ("q0f32", "q4f16_1"):
        with Engine("tiny", sch, 1, "cuda", quiet=True) as e1, Engine("tiny", sch, 2, "cuda", quiet=True) as e2:
            correctness.append(compare_tp(e1, e2))
        log(f"tiny {sch}: TP=2 against TP=1 ok={correctness[-1]['ok']}")
    bandwidth = copy_bandwidth()
    records, skipped = [], []
    for model in models:
        cfg = get_preset(model)
        for shards in (1, 2, 4):
            if shards > n or cfg.num_kv_heads % shards or not _fits(cfg, scheme, shards):
                continue
            if time.time() > t_end:
                skipped.append(f"{model} TP={shards}")
                continue
            lib = build_model(cfg, scheme, shards, "cuda", quiet=True, kv="static")
            eng = random_weight_engine(lib, cfg, scheme, shards, param_specs(cfg, scheme, shards))
            try:
                results, _ = time_decode(eng, prompt_len, new_tokens, runs, t_end, log)
                records.append(decode_record(eng, results, bandwidth, prompt_len, new_tokens, pdl=pdl, gpu=gpu))
                if shards > 1:
                    records[-1].update(allreduce_info(eng.runner.sess))
            finally:
                eng.close()
            log(f"{model} TP={shards}: {records[-1]['decode_tok_per_s']} tok/s")
    return {"gpu": gpu, "gpus": n, "bandwidth_GBps": round(bandwidth, 1), "tp_correctness": correctness,
            "records": records, "skipped": skipped, "live": True,
            "source": f"measured live on this machine's {n}x {gpu}" + (f"; skipped for time: {', '.join(skipped)}"
                                                                        if skipped else "")}
