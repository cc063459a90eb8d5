"""An analytic model of single-batch decode speed on N tensor-parallel devices.

One decode step (one token, batch 1) on each of N devices costs

    t = t_weights + t_kv + t_allreduce + t_launch

* ``t_weights``: every device streams its share of the weights once. Linears are split N ways
  (``LlamaConfig.bytes_per_token(scheme)`` minus the replicated part, divided by N); the
  lm_head (and one embedding row) is replicated, as in :mod:`mlc_course.sharding`. Divided by
  the *effective* bandwidth: a GPU's base bandwidth (vendor peak, or our measurement where we
  have one) times ``eta``, the fraction that the engine's kernels reach.
* ``t_kv``: the KV cache read at the current context, split N ways (KV heads are split).
* ``t_allreduce``: ``2 L + 1`` collectives per token (an all-reduce after ``o_proj`` and after
  ``down_proj`` in each of L layers, plus the broadcast of the input id), each of
  ``hidden_size`` fp16 values. **Which all-reduce time?** Messages are 8-16 KB, so latency is
  everything. A ring pays 2(N-1) full steps (:func:`mlc_course.collectives.allreduce_time`),
  ~7.5 us each over PCIe, i.e. 105 us at N = 8: far too slow next to the seed's 8-GPU numbers.
  NCCL does not run small all-reduces that way: it picks its low-latency (LL) protocol, where
  one step is a flag-carrying 8-byte store that the next GPU polls, and its own tuner
  (``src/graph/tuning.cc``) models the cost as ``baseLat + 2(N-1) * hwLat`` with a per-hop
  ``hwLat`` of 1.0 us on PCIe and 0.47 us on NVLink. We take that form:

      t_ar(N) = alpha0 + 2(N-1) * alpha_hop + 2(N-1)/N * m / beta

  ``alpha0`` is the fixed cost of one all-reduce call (kernel launch, the engine's dispatch,
  synchronisation); ``alpha_hop`` NCCL's per-hop latency; the last term the ring's bytes. Fitted
  to the seed's table with ``alpha_hop`` free, the best value is NCCL's own 1.0 us.
* ``t_launch``: ``K`` kernels per layer (counted in the course's fused decode function) times a
  per-kernel overhead (launch gap and tail), smaller inside a CUDA graph.

Every number the model uses is in :data:`PARAMETERS` (one table, each entry with its source;
:func:`parameter_rows` for printing). Two *engines* differ in how good their kernels and
runtime are: ``mlc-2023`` (MLC LLM as the seed ran it; fitted to the seed's table) and
``course`` (this course's engine; from our H100 measurements in design.md).

``python -m mlc_course bench --predict --model llama2-70b --quantization q4f16_1 --gpu
A100-80G-PCIe --num-gpus 4`` prints one prediction (:func:`predict_cli`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "data" / "results"

# ------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class Param:
    value: float
    unit: str
    source: str


# Fitted values come from :func:`fit_seed` (run in notebook 08 and in tests/test_perf_model.py
# to check they are still the least-squares optimum). Units: seconds, bytes/s, fractions.
PARAMETERS: dict[str, Param] = {
    # --- memory: base bandwidth per GPU (GB/s) -------------------------------------------
    "bw.H100-SXM": Param(3027e9, "B/s", "measured: device-to-device copy on the lent H100 80GB HBM3 "
                         "(read+write), design.md; vendor peak 3350"),
    "bw.H200": Param(4800e9, "B/s", "vendor: NVIDIA H200 datasheet (data/gpus.csv)"),
    "bw.H100-PCIe": Param(2000e9, "B/s", "vendor: NVIDIA H100 datasheet (data/gpus.csv)"),
    "bw.A100-80G-PCIe": Param(1935e9, "B/s", "vendor: NVIDIA A100 datasheet (data/gpus.csv)"),
    "bw.A100-80G-SXM": Param(2039e9, "B/s", "vendor: NVIDIA A100 datasheet (data/gpus.csv)"),
    "bw.A10G": Param(600e9, "B/s", "vendor: A10 datasheet via AWS G5 (data/gpus.csv)"),
    "bw.RTX 4090": Param(1008e9, "B/s", "vendor: Ada whitepaper (data/gpus.csv)"),
    "bw.RX 7900 XTX": Param(960e9, "B/s", "vendor: AMD product page (data/gpus.csv)"),
    # --- engines: achieved bandwidth fraction and per-kernel overhead ----------------------
    "eta.mlc-2023": Param(0.86, "of base bw", "fitted: fit_seed() over the seed's 19 MLC LLM points "
                          "(one value for every GPU)"),
    "eta.course": Param(0.52, "of base bw", "measured: the course's q4 GEMVs move 3.7 GB in 2.37 ms "
                        "on one H100 (1.57 TB/s = 0.52 of the 3027 GB/s copy), design.md"),
    "kernels_per_layer": Param(19, "kernels", "counted: call_tir ops per layer in the course's fused "
                               "decode function (TP=1; 21 at TP>1), deploy.py / notebook 08"),
    "kernels_fixed": Param(4, "kernels", "counted: embedding, final norm, lm_head, cast"),
    "t_kernel.graph": Param(0.77e-6, "s", "measured: Llama-2-7B q4 decode step on one H100 in a CUDA "
                            "graph, 2.93 ms, minus weights and KV at 1.57 TB/s (2.46 ms), over "
                            "32 x 19 + 4 kernels, design.md"),
    "t_kernel.eager": Param(1.31e-6, "s", "measured: the same step without a CUDA graph, 3.26 ms, "
                            "design.md"),
    "t_step.mlc-2023": Param(0.0, "s", "none: MLC's per-token host work is inside the fitted "
                             "alpha0 and eta"),
    "t_layer.course.eager": Param(136.6e-6, "s", "calibrated: the course Engine's Llama-2-7B q4 decode "
                                  "on one H100 without CUDA graphs (228.7 tok/s = 4.37 ms/token over "
                                  "32 layers, data/results/gpu_h100.json). The engine is host-bound: the "
                                  "VM makes ~2850 calls per token (kernels, allocations, KV-cache "
                                  "builtins; the kernel profile in data/results/gpu_h200.json), and an "
                                  "H200 with 36% more bandwidth decodes at the same speed"),
    "t_layer.course.graph": Param(119.1e-6, "s", "calibrated: the same with CUDA graphs (262.3 tok/s = "
                                  "3.81 ms/token over 32 layers, data/results/gpu_h100.json)"),
    # --- the course engine with a static KV cache, each decode step one CUDA graph ----------
    # (fitted by calibrate_course_graph() from the CUPTI kernel traces of data/results/gpu_h100x1.json:
    # half2 GEMVs, programmatic dependent launch, the argmax on the GPU)
    "rate.course-graph.q4": Param(3.066e12, "B/s", "fitted: the course's 4-bit decode GEMVs (half2 form, "
                                  "two rows a thread) stream weights at this rate plus t_gemv.static_graph "
                                  "per GEMV: the two-point fit of the GEMV time per token of Llama-2-7B "
                                  "(1814 us) and Llama-2-70B (14104 us) on one H100 (calibrate_course_graph(), "
                                  "data/results/gpu_h100x1.json). Above the H100's read+write copy (a pure "
                                  "read); on an H200 the GEMVs are capped by min(copy, rate)"),
    "eta.course-graph": Param(1.0, "of copy bw", "assumed: below rate.course-graph.q4 the 4-bit GEMVs "
                              "read at the copy rate (the float16 ones do, eta.course-graph.q0)"),
    "t_gemv.static_graph": Param(4.66e-6, "s", "fitted: the same fit's fixed time per GEMV (launch, "
                                 "ramp-up, the warp sums, the tail of the last wave)"),
    "eta.course-graph.q0": Param(1.034, "of copy bw", "fitted: Llama-2-7B q0f16 on one H100, its float16 "
                                 "GEMVs (4896 us per token for 13.2 GB) less t_gemv.static_graph each: "
                                 "a pure read streams a little faster than the read+write copy"),
    "gemvs_per_layer.static": Param(4, "GEMVs", "counted: QKV, O (+add), gate/up, down (+add); plus "
                                    "the lm_head once per token"),
    "kernels_per_layer.static": Param(6, "kernels", "counted: the other kernels of a layer in the static "
                                      "decode function: 2 RMSNorms, RoPE + K/V write, attention, attention "
                                      "combine, SiLU*up (model.py)"),
    "kernels_fixed.static": Param(3, "kernels", "counted: embedding, final norm, greedy argmax"),
    "t_kernel.static_graph": Param(1.49e-6, "s", "fitted: Llama-2-7B q4 on one H100, 465.4 tok/s = "
                                   "2149 us per token, less its GEMVs (1814 us) and the KV cache read at "
                                   "the GEMV rate, over 6 x 32 + 3 other kernels: their run time and what "
                                   "the graph adds between them (calibrate_course_graph())"),
    # the previous static engine (group-sum float32 GEMVs, separate RoPE and cache write, the
    # argmax on the host), which made data/results/gpu_h200x4.json and gpu_h100x1_v2.json
    "rate.course-graph-v2.q4": Param(2.53e12, "B/s", "fitted: the same fit for that engine "
                                     "(calibrate_course_graph(engine='course-graph-v2'), "
                                     "data/results/gpu_h100x1_v2.json): its GEMVs were instruction-bound, "
                                     "capped by min(copy, rate) (Llama-2-70B 53.8 tok/s on an H100, 54.4 on "
                                     "an H200)"),
    "eta.course-graph-v2": Param(1.0, "of copy bw", "assumed, as eta.course-graph"),
    "t_gemv.static_graph-v2": Param(3.66e-6, "s", "fitted: that fit's fixed time per GEMV"),
    "eta.course-graph-v2.q0": Param(1.0, "of copy bw", "fitted: that engine's Llama-2-7B q0f16 point"),
    "kernels_per_layer.static-v2": Param(7, "kernels", "counted: 2 RMSNorms, q/k/v RoPE, K/V write, "
                                         "attention, attention combine, SiLU*up"),
    "kernels_fixed.static-v2": Param(2, "kernels", "counted: embedding, final norm"),
    "t_kernel.static_graph-v2": Param(3.03e-6, "s", "fitted: its Llama-2-7B q4 step on one H100, "
                                      "372.9 tok/s, less GEMVs and KV, over 7 x 32 + 2 other kernels"),
    # the first static engine (dlight GEMVs, three TE attention kernels), which made the
    # records of data/results/gpu_h200x2.json
    "eta.course-graph-v1": Param(0.411, "of copy bw", "measured: the decode GEMVs of one Llama-2-7B layer "
                                 "(dlight schedule) alone on an H200 read 113.8 MB in 66.4 us = 1.71 TB/s "
                                 "= 0.411 of the 4174 GB/s copy measured in the same run "
                                 "(data/results/gpu_h200x2.json, 'gemv')"),
    "eta.course-graph-v1.q0": Param(0.82, "of copy bw", "calibrated: Llama-2-7B q0f16 on one H200 in the "
                                    "whole-step graph, 186.8 tok/s (data/results/gpu_h200x2.json)"),
    "kernels_per_layer.static-v1": Param(12, "kernels", "counted: every kernel of a layer of that engine"),
    "kernels_fixed.static-v1": Param(3, "kernels", "counted: embedding, final norm, lm_head"),
    "t_kernel.static_graph-v1": Param(3.79e-6, "s", "calibrated: Llama-2-7B q4 on one H200, 269.5 tok/s "
                                      "= 3.711 ms/token, minus weights and KV at 0.411 x copy, over "
                                      "32 x 12 + 3 kernels (data/results/gpu_h200x2.json)"),
    # --- links: alpha0 (fixed cost of one all-reduce), alpha_hop, beta ---------------------
    "nvlink.alpha0.graph": Param(8.6e-6, "s", "measured: 2x H100 NVLink fp16 all-reduce of 4-32 KB, "
                                 "9-10 us in a CUDA graph, minus 2 hops x 0.47 us, design.md"),
    "nvlink.alpha0.eager": Param(28.6e-6, "s", "measured: same, 24-35 us launched eagerly, minus "
                                 "2 hops x 0.47 us, design.md"),
    "nvlink.alpha0.oneshot": Param(4.77e-6, "s", "measured: the course's one-shot all-reduce (mlc_nccl), "
                                   "2x H200 NVLink, fp16 16 KB, 5.71 us per call in a CUDA graph of 100, "
                                   "minus 2 hops x 0.47 us (data/results/gpu_allreduce_h200x2.json; NCCL "
                                   "there: 6.71 us)"),
    "nvlink.alpha_hop": Param(0.47e-6, "s", "NCCL tuner: hwLat NVLink ring LL (src/graph/tuning.cc)"),
    "nvlink.beta": Param(270e9, "B/s", "measured: 64 MiB all-reduce bus bandwidth, 2x H100, design.md"),
    "pcie.alpha0.graph": Param(58e-6, "s", "fitted: fit_seed() (the seed ran with --use-cuda-graph; "
                               "includes disco's dispatch and the host round trips of consumer "
                               "cards without peer-to-peer)"),
    "pcie.alpha0.eager": Param(78e-6, "s", "assumed: graph value + the 20 us eager penalty measured "
                               "on H100 NVLink"),
    "pcie.alpha_hop": Param(1.0e-6, "s", "NCCL tuner: hwLat PCI ring LL (src/graph/tuning.cc); "
                            "fit_seed() with it free also gives 1.0 us"),
    "pcie.beta": Param(25e9, "B/s", "estimate: PCIe 4.0 x16, 31.5 GB/s raw (collectives.PCIE4_X16)"),
    "ib.alpha0": Param(10e-6, "s", "assumed: one inter-node round trip over InfiniBand HDR with "
                       "GPUDirect RDMA (~5 us) on top of the intra-node call"),
    "ib.alpha_hop": Param(2.7e-6, "s", "NCCL tuner: hwLat NET ring LL (src/graph/tuning.cc)"),
    "ib.beta": Param(25e9, "B/s", "assumed: 200 Gb/s InfiniBand HDR = 25 GB/s per node"),
    # --- the workload ------------------------------------------------------------------------
    "context": Param(256, "tokens", "assumed: mid-run context of the seed's benchmark "
                     "(a short prompt + 256 decode tokens)"),
    "error_bound": Param(0.20, "relative", "stated: every seed point within 20% (fit: max 16%, "
                         "RMS 7.5%); the course's H100 points within 25%"),
}

ENGINES = ("mlc-2023", "course", "course-graph", "course-graph-v2", "course-graph-v1")
# results files made by the earlier static engines (modelled as "course-graph-v1" / "-v2")
ENGINE_V1_FILES = ("gpu_h200x2.json",)
ENGINE_V2_FILES = ("gpu_h200x4.json", "gpu_h100x1_v2.json")
LINKS = ("nvlink", "pcie")
SEED_MODELS = {"Llama-2-70B": "llama2-70b", "CodeLlama-34B": "codellama-34b"}


def param(name: str) -> float:
    return PARAMETERS[name].value


def parameter_rows() -> list[list]:
    """The parameter table as rows ``[name, value, unit, source]`` (value in readable units:
    GB/s, us)."""
    rows = []
    for name, p in PARAMETERS.items():
        v, unit = p.value, p.unit
        if unit == "B/s":
            v, unit = v / 1e9, "GB/s"
        elif unit == "s":
            v, unit = v * 1e6, "µs"
        rows.append([name, v, unit, p.source])
    return rows


def gpu_bandwidth(gpu: str) -> float:
    """Base bandwidth of a GPU (bytes/s): our measurement where we have one, else the vendor's
    peak from data/gpus.csv."""
    key = f"bw.{gpu}"
    if key in PARAMETERS:
        return param(key)
    from .hardware import load_gpus

    gpus = load_gpus()
    if gpu not in gpus:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(gpus)}")
    return gpus[gpu].bandwidth_GBps * 1e9


def default_link(gpu: str) -> str:
    """NVLink for SXM parts (and H200), PCIe for everything else (the seed's machines)."""
    from .hardware import load_gpus

    g = load_gpus().get(gpu)
    return "nvlink" if g is not None and g.form == "SXM" else "pcie"


# ------------------------------------------------------------------------------ the model


@dataclass
class Prediction:
    tok_per_s: float
    ms_per_token: float
    breakdown: dict = field(default_factory=dict)  # term -> ms per token
    info: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.tok_per_s:.1f} tok/s ({self.ms_per_token:.2f} ms/token)"


def allreduce_latency(n: int, link: str, cuda_graph: bool = True, nbytes: float = 16384,
                      nodes: int = 1, allreduce: str = "nccl") -> float:
    """Seconds for one small all-reduce over ``n`` ranks (``nodes`` nodes of n/nodes each):
    ``alpha0 + 2(n_local-1) alpha_hop + 2(nodes-1) alpha_hop_ib (+ alpha0_ib) + bytes``.
    ``allreduce="oneshot"``: the course's one-shot kernel over NVLink peer memory (in a CUDA
    graph, one node), whose fixed cost is smaller than NCCL's."""
    if n <= 1:
        return 0.0
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; choose from {LINKS}")
    if allreduce not in ("nccl", "oneshot"):
        raise ValueError(f"unknown all-reduce {allreduce!r}; choose nccl or oneshot")
    oneshot = allreduce == "oneshot" and link == "nvlink" and cuda_graph and nodes == 1
    local = n // nodes
    t = param(f"{link}.alpha0.{'oneshot' if oneshot else 'graph' if cuda_graph else 'eager'}")
    t += 2 * (local - 1) * param(f"{link}.alpha_hop")
    t += 2 * (local - 1) / n * nbytes / param(f"{link}.beta")
    if nodes > 1:
        t += param("ib.alpha0") + 2 * (nodes - 1) * param("ib.alpha_hop")
        t += 2 * (nodes - 1) / nodes * nbytes / param("ib.beta")
    return t


def _replicated_bytes(cfg, scheme: str) -> int:
    from .quantization import nbytes

    rep = nbytes((cfg.vocab_size, cfg.hidden_size), scheme)  # lm_head (tied: the embedding)
    return rep + nbytes((1, cfg.hidden_size), scheme)


def predict(model_preset, scheme: str, gpu: str, n: int, link: str | None = None,
            cuda_graph: bool = True, context: int | None = None, engine: str = "mlc-2023",
            nodes: int = 1, eta: float | None = None, bandwidth: float | None = None,
            allreduce: str | None = None) -> Prediction:
    """Predicted single-batch decode speed of ``model_preset`` (a preset name or a
    ``LlamaConfig``) in ``scheme`` on ``n`` GPUs of kind ``gpu`` (a key of data/gpus.csv)
    connected by ``link`` (``nvlink``/``pcie``; default by the GPU's form factor).

    ``engine`` picks the kernel efficiency (``eta``) — ``mlc-2023`` fitted to the seed,
    ``course`` measured on H100; ``eta``/``bandwidth`` (bytes/s) override it and the GPU's
    base bandwidth. ``nodes > 1`` splits the n GPUs over nodes joined by InfiniBand.
    ``allreduce``: ``"oneshot"`` (the current engine's default, ``course-graph``) or
    ``"nccl"`` (every other engine's). The breakdown holds ms per token for each term.
    """
    from .config import LlamaConfig, get_preset

    cfg = model_preset if isinstance(model_preset, LlamaConfig) else get_preset(model_preset)
    if n < 1 or n % nodes:
        raise ValueError(f"need n >= 1 GPUs, a multiple of nodes={nodes}; got {n}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")
    link = link or default_link(gpu)
    context = int(param("context") if context is None else context)
    if eta is None:
        eta = param(f"eta.{engine}.q0") if engine.startswith("course-graph") and scheme.startswith("q0") \
            else param(f"eta.{engine}")
    base = gpu_bandwidth(gpu) if bandwidth is None else bandwidth
    bw = base * eta
    if engine in ("course-graph", "course-graph-v2") and not scheme.startswith("q0"):
        bw = min(bw, param(f"rate.{engine}.q4"))  # the GEMVs' own limit
    total = cfg.bytes_per_token(scheme)
    rep = _replicated_bytes(cfg, scheme)
    per_device = (total - rep) / n + rep
    kv = cfg.kv_bytes_per_token(context) / n
    t_w, t_kv = per_device / bw, kv / bw
    n_coll = 2 * cfg.num_layers + 1 if n > 1 else 0
    allreduce = allreduce or ("oneshot" if engine == "course-graph" else "nccl")
    t_ar = n_coll * allreduce_latency(n, link, cuda_graph, 2 * cfg.hidden_size, nodes, allreduce)
    if engine in ("course-graph", "course-graph-v2"):
        sfx = _suffix(engine)
        gemvs = cfg.num_layers * param("gemvs_per_layer.static") + 1
        kernels = cfg.num_layers * param(f"kernels_per_layer.static{sfx}") + param(f"kernels_fixed.static{sfx}")
        t_k = gemvs * param(f"t_gemv.static_graph{sfx}") + kernels * param(f"t_kernel.static_graph{sfx}")
        kernels += gemvs
        cuda_graph = True
    elif engine == "course-graph-v1":
        kernels = cfg.num_layers * param("kernels_per_layer.static-v1") + param("kernels_fixed.static-v1")
        t_k = kernels * param("t_kernel.static_graph-v1")
        cuda_graph = True
    else:
        kernels = cfg.num_layers * param("kernels_per_layer") + param("kernels_fixed")
        t_k = kernels * param(f"t_kernel.{'graph' if cuda_graph else 'eager'}")
    t_gpu = t_w + t_kv + t_ar + t_k
    if engine == "course":
        # The host issues the step's calls while the GPU runs earlier ones: whichever is
        # slower sets the pace.
        t_host = cfg.num_layers * param(f"t_layer.course.{'graph' if cuda_graph else 'eager'}")
        t = max(t_gpu, t_host)
    else:
        # mlc-2023: MLC's per-token host work is inside its fitted alpha0 and eta;
        # course-graph: one graph launch per token, the host waits on the GPU
        t_host = 0.0
        t = t_gpu
    breakdown = {"weights": t_w * 1e3, "kv_cache": t_kv * 1e3, "allreduce": t_ar * 1e3,
                 "kernel_launch": t_k * 1e3, "host": t_host * 1e3}
    info = {"model": cfg.name, "scheme": scheme, "gpu": gpu, "n": n, "nodes": nodes, "link": link,
            "cuda_graph": cuda_graph, "engine": engine, "context": context, "eta": eta, "allreduce": allreduce,
            "effective_bandwidth_GBps": bw / 1e9, "bytes_per_device": per_device,
            "collectives_per_token": n_coll, "kernels_per_token": kernels,
            "bound": "host" if t_host > t_gpu else "gpu",
            "ceiling_tok_per_s": n * base / total}
    return Prediction(1.0 / t, t * 1e3, breakdown, info)


# ------------------------------------------------------------------------ seed and fitting


def seed_points() -> list:
    """The seed's MLC LLM results (data/seed_results.csv) that the model covers."""
    from .hardware import load_seed_results

    return [r for r in load_seed_results() if r.model in SEED_MODELS]


def seed_comparison(**overrides) -> list[dict]:
    """Each seed point next to the model's prediction (engine mlc-2023, PCIe, CUDA graph) and
    the relative error ``predicted / published - 1``."""
    rows = []
    for r in seed_points():
        p = predict(SEED_MODELS[r.model], r.precision, r.gpu, r.num_gpus, link="pcie",
                    **overrides)
        rows.append({"model": r.model, "precision": r.precision, "gpu": r.gpu, "n": r.num_gpus,
                     "published": r.tok_per_s, "predicted": p.tok_per_s,
                     "error": p.tok_per_s / r.tok_per_s - 1, "breakdown": p.breakdown})
    return rows


def fit_seed(etas=None, alpha0s=None, hops=None) -> dict:
    """Least squares (on log tok/s) over a grid of ``eta.mlc-2023``, ``pcie.alpha0.graph`` and
    ``pcie.alpha_hop``; every other parameter as in :data:`PARAMETERS`. Returns the best
    values with their RMS and max relative error. Cheap: the model is closed-form."""
    import numpy as np

    from .config import get_preset

    etas = np.arange(0.70, 0.99, 0.01) if etas is None else np.asarray(etas)
    alpha0s = np.arange(0, 80e-6, 1e-6) if alpha0s is None else np.asarray(alpha0s)
    hops = np.arange(0, 4.01e-6, 0.25e-6) if hops is None else np.asarray(hops)
    pts = seed_points()
    meas = np.array([r.tok_per_s for r in pts])
    # the parts that do not depend on the fitted parameters, per point
    wbytes, fixed, ncoll, local, mb = [], [], [], [], []
    for r in pts:
        cfg = get_preset(SEED_MODELS[r.model])
        p = predict(cfg, r.precision, r.gpu, r.num_gpus, link="pcie", eta=1.0)
        wbytes.append((p.breakdown["weights"] + p.breakdown["kv_cache"]) / 1e3)  # s at eta=1
        fixed.append(p.breakdown["kernel_launch"] / 1e3)
        ncoll.append(p.info["collectives_per_token"])
        local.append(r.num_gpus)
        mb.append(2 * (r.num_gpus - 1) / r.num_gpus * 2 * cfg.hidden_size / param("pcie.beta"))
    wbytes, fixed, ncoll, local, mb = map(np.asarray, (wbytes, fixed, ncoll, local, mb))
    E, A, H = np.meshgrid(etas, alpha0s, hops, indexing="ij")
    t = (wbytes[:, None, None, None] / E + fixed[:, None, None, None]
         + ncoll[:, None, None, None] * (A + 2 * (local[:, None, None, None] - 1) * H
                                         + mb[:, None, None, None]))
    pred = 1.0 / t
    logerr = np.log(pred / meas[:, None, None, None])
    rms = np.sqrt((logerr**2).mean(axis=0))
    i = np.unravel_index(np.argmin(rms), rms.shape)
    rel = np.abs(pred[(slice(None),) + i] / meas - 1)
    return {"eta": float(etas[i[0]]), "alpha0": float(alpha0s[i[1]]), "alpha_hop": float(hops[i[2]]),
            "rms_log_error": float(rms[i]), "max_rel_error": float(rel.max()), "points": len(pts)}


# ------------------------------------------------------------------------- GPU results


def load_gpu_results(pattern: str = "gpu_*.json", results_dir: str | Path = RESULTS_DIR) -> list[dict]:
    """Decode records from data/results/gpu_*.json (a list of records, or a dict with a
    ``results`` list); [] when there are none. Records need ``model, quantization, shards,
    gpu, decode_tok_per_s``."""
    out = []
    for path in sorted(Path(results_dir).glob(pattern)):
        doc = json.loads(path.read_text())
        recs = doc.get("results", doc.get("records", [])) if isinstance(doc, dict) else doc
        for r in recs:
            if isinstance(r, dict) and {"model", "quantization", "shards", "decode_tok_per_s"} <= r.keys():
                out.append({**r, "file": path.name})
    return out


#: The whole-step-graph engines whose parameters :func:`calibrate_course_graph` fits from the
#: CUPTI kernel traces of a one-H100 run: the file, the other kernels per layer and per token,
#: and which records (``pdl``: the programmatic-dependent-launch libraries, the default).
COURSE_GRAPH_FITS = {
    "course-graph": {"file": "gpu_h100x1.json", "kernels_per_layer": 6, "kernels_fixed": 3, "pdl": True},
    "course-graph-v2": {"file": "gpu_h100x1_v2.json", "kernels_per_layer": 7, "kernels_fixed": 2, "pdl": False},
}
CALIBRATION_FILE = COURSE_GRAPH_FITS["course-graph"]["file"]  # the run the current engine's parameters come from


def _suffix(engine: str) -> str:
    """``""`` for ``course-graph``, ``"-v2"`` for ``course-graph-v2``: the static-engine
    parameters' name suffix."""
    return engine.removeprefix("course-graph")


def calibrate_course_graph(path: str | Path | None = None, engine: str = "course-graph") -> dict:
    """Fit ``engine``'s parameters (:data:`COURSE_GRAPH_FITS`) from the CUPTI kernel traces
    of its one-H100 run: GEMV time per token = weight bytes / rate + GEMVs x t_gemv through
    the Llama-2-7B and Llama-2-70B q4 points; eta for float16 weights from the 7B q0f16
    point; t_kernel from the 7B q4 step less its GEMVs and KV read, over the other kernels.
    (Each kernel in a trace is charged its part of the GPU timeline past the previous
    kernel's end, so overlapping launches are not counted twice.)"""
    from .config import get_preset

    fit = COURSE_GRAPH_FITS[engine]
    sfx = _suffix(engine)
    doc = json.loads(Path(path or RESULTS_DIR / fit["file"]).read_text())
    bw = float(doc["bandwidth_GBps"]) * 1e9
    pts = {}
    for r in doc["records"]:
        if "gpu_kernels" not in r or r.get("gemv") != "course" or r.get("kv") != "static" \
                or bool(r.get("pdl", False)) != fit["pdl"]:
            continue
        gemv_s = sum(k["us_per_token"] for k in r["gpu_kernels"]["top"]
                     if k["kernel"].startswith(("linear", "fused_linear", "lm_head"))) * 1e-6
        pts[(r["model"], r["quantization"])] = (r, gemv_s)
    (r7, g7), (r70, g70) = pts[("llama2-7b", "q4f16_1")], pts[("llama2-70b", "q4f16_1")]
    c7, c70 = get_preset("llama2-7b"), get_preset("llama2-70b")
    n7, n70 = 4 * c7.num_layers + 1, 4 * c70.num_layers + 1
    b7, b70 = r7["bytes_per_token"], r70["bytes_per_token"]
    # g = b x s + n x t0, two points
    sec_per_byte = (g70 - g7 * n70 / n7) / (b70 - b7 * n70 / n7)
    t0 = (g7 - b7 * sec_per_byte) / n7
    rate = 1.0 / sec_per_byte
    rq, gq = pts[("llama2-7b", "q0f16")]
    eta_q0 = rq["bytes_per_token"] / ((gq - n7 * t0) * bw)
    step7 = 1.0 / float(r7["decode_tok_per_s"])
    kv7 = c7.kv_bytes_per_token(r7["prompt_tokens"] + r7["new_tokens"] // 2) * sec_per_byte
    t_kernel = (step7 - g7 - kv7) / (fit["kernels_per_layer"] * c7.num_layers + fit["kernels_fixed"])
    return {f"rate.{engine}.q4": rate, f"t_gemv.static_graph{sfx}": t0, f"eta.{engine}.q0": eta_q0,
            f"t_kernel.static_graph{sfx}": t_kernel}


def _gpu_key(name: str) -> str:
    """Map a GPU name as a results file writes it to a key of data/gpus.csv."""
    s = str(name).lower()
    if "h200" in s:
        return "H200"
    if "h100" in s:
        return "H100-PCIe" if "pcie" in s else "H100-SXM"
    if "a100" in s:
        return "A100-80G-SXM" if "sxm" in s else "A100-80G-PCIe"
    return name


def _parse_record(r: dict) -> dict | None:
    """(preset, scheme, cuda_graph) of a results record, or None if the model can't model it:
    ``"llama2-7b (random weights)"`` -> llama2-7b; ``"fp16 (q0f16)"`` -> q0f16; only the course's
    own engine (``engine`` mentions mlc_course) is modelled; "no CUDA graph" in the engine
    string (or ``cuda_graph: false``) means eager."""
    import re

    from .config import PRESETS

    preset = str(r["model"]).split()[0]
    m = re.search(r"q\d+f\d+(_\w+)?", str(r["quantization"]))
    engine = str(r.get("engine", ""))
    if preset not in PRESETS or m is None or "mlc_course" not in engine:
        return None
    graph = r.get("cuda_graph")
    if graph is None:
        graph = "cuda graph" in engine.lower() and "no cuda graph" not in engine.lower()
    kind = "course-graph" if r.get("kv") == "static" and graph else "course"
    if kind == "course-graph" and r.get("file") in ENGINE_V1_FILES:
        kind = "course-graph-v1"
    elif kind == "course-graph" and r.get("file") in ENGINE_V2_FILES:
        kind = "course-graph-v2"
    return {"preset": preset, "scheme": m.group(0), "cuda_graph": bool(graph), "engine": kind,
            "kv": r.get("kv", "dynamic")}


def is_calibration_record(k: dict, shards: int, gpu: str = "H100-SXM", graph: bool | None = False) -> bool:
    """A record the ``t_layer.course.*`` parameters were derived from: 1 H100, Llama-2-7B q4
    (``graph=False``: the eager one, ``True``: the CUDA-graph one, ``None``: either)."""
    return shards == 1 and gpu == "H100-SXM" and k["preset"] == "llama2-7b" and k["scheme"] == "q4f16_1" \
        and k.get("kv", "dynamic") == "dynamic" and (graph is None or bool(k["cuda_graph"]) == graph)


def calibrate_host_overhead(records: list[dict] | None = None) -> float | None:
    """Recompute ``t_layer.course.eager`` (seconds per layer) from the calibration record of
    the results files: its time per token over the layer count. None if there is no such
    record."""
    from .config import get_preset

    for r in load_gpu_results() if records is None else records:
        k = _parse_record(r)
        if k is None or not is_calibration_record(k, int(r["shards"]), _gpu_key(r.get("gpu", "H100"))):
            continue
        return 1.0 / float(r["decode_tok_per_s"]) / get_preset(k["preset"]).num_layers
    return None


SCOPE_MIN_WEIGHT_SHARE = 0.25
# Also out of scope: the GEMVs' L2-prefetch experiment (mlc_course.cuda_device: a slower
# variant no parameter describes), the static cache without its CUDA graph (a diagnostic run: the VM issues
# every kernel from the host, which neither course parameter set describes), and several GPUs without CUDA graphs. Each disco worker's VM then issues its
# calls and eager NCCL all-reduces from the host, and the measured steps (2x H200) are 1.5x
# longer than the one-GPU host time plus the all-reduces: no parameter here describes it.


def gpu_comparison(records: list[dict] | None = None) -> list[dict]:
    """Measured records of the course's engine on GPUs next to the ``course`` engine's
    prediction (NVLink, the record's context when it gives one). ``in_scope`` is False where
    streaming weights is under a quarter of the predicted step (toy models such as ``tiny``:
    their speed is the runtime's overhead, which the model does not claim to predict)."""
    rows = []
    for r in load_gpu_results() if records is None else records:
        k = _parse_record(r)
        if k is None:
            continue
        gpu = _gpu_key(r.get("gpu", "H100-SXM"))
        ctx = None
        if r.get("prompt_tokens") is not None and r.get("new_tokens") is not None:
            ctx = int(r["prompt_tokens"]) + int(r["new_tokens"]) // 2
        if k["engine"].startswith("course-graph"):  # efficiency relative to the copy measured in the run
            p = predict(k["preset"], k["scheme"], gpu, int(r["shards"]), link="nvlink", context=ctx,
                        engine=k["engine"], bandwidth=float(r["bandwidth_GBps"]) * 1e9,
                        # (files before the one-shot path: NCCL; oneshot-pdl: the same kernel)
                        allreduce="oneshot" if str(r.get("allreduce", "nccl")).startswith("oneshot") else "nccl")
        else:
            p = predict(k["preset"], k["scheme"], gpu, int(r["shards"]), link="nvlink",
                        cuda_graph=k["cuda_graph"], engine="course", context=ctx)
        rows.append({"model": k["preset"], "quantization": k["scheme"], "n": int(r["shards"]),
                     "gpu": gpu, "measured": float(r["decode_tok_per_s"]),
                     "predicted": p.tok_per_s,
                     "error": p.tok_per_s / float(r["decode_tok_per_s"]) - 1,
                     "cuda_graph": k["cuda_graph"], "breakdown": p.breakdown,
                     "engine": k["engine"],
                     "calibration": (k["engine"] == "course" and is_calibration_record(k, int(r["shards"]), gpu, graph=None))
                     or (k["engine"] == "course-graph-v1" and int(r["shards"]) == 1 and k["preset"] == "llama2-7b"
                         and (r.get("gemv") == "dlight" or k["scheme"] == "q0f16"))
                     or (k["engine"] in COURSE_GRAPH_FITS and r.get("file") == COURSE_GRAPH_FITS[k["engine"]]["file"]
                         and int(r["shards"]) == 1 and r.get("gemv") == "course"
                         and bool(r.get("pdl", False)) == COURSE_GRAPH_FITS[k["engine"]]["pdl"]
                         and k["preset"] in ("llama2-7b", "llama2-70b")),
                     "in_scope": p.breakdown["weights"] >= SCOPE_MIN_WEIGHT_SHARE * p.ms_per_token
                     and not (int(r["shards"]) > 1 and not k["cuda_graph"])
                     and not (k["kv"] == "static" and not k["cuda_graph"])
                     and not r.get("prefetch")})  # (the L2-prefetch experiment: cuda_device)
    return rows


# ---------------------------------------------------------------------- scaling analysis


def best_gpu_count(model_preset, scheme: str, gpu: str, link: str | None = None,
                   counts=(1, 2, 4, 8, 16, 32, 64), **kw) -> dict:
    """Where adding GPUs stops paying. With t(N) = A/N + C + D(N-1) (weights shrink as 1/N,
    the all-reduce hops grow with N) the optimum is N* = sqrt(A/D); ``crossover`` is the N
    at which the all-reduce time equals the weight-streaming time."""
    preds = {n: predict(model_preset, scheme, gpu, n, link, **kw) for n in counts}
    p1 = predict(model_preset, scheme, gpu, 1, link, **kw)
    p2 = predict(model_preset, scheme, gpu, 2, link, **kw)
    link = link or default_link(gpu)
    a = (p1.breakdown["weights"] + p1.breakdown["kv_cache"]) / 1e3  # s, all on one GPU
    hop = 2 * param(f"{link}.alpha_hop") * p2.info["collectives_per_token"]
    n_star = math.sqrt(a / hop) if hop > 0 else math.inf
    cross = next((n for n in range(2, 4097)
                  if predict(model_preset, scheme, gpu, n, link, **kw).breakdown["allreduce"]
                  >= predict(model_preset, scheme, gpu, n, link, **kw).breakdown["weights"]), None)
    best = max(preds, key=lambda n: preds[n].tok_per_s)
    return {"tok_per_s": {n: p.tok_per_s for n, p in preds.items()}, "best_of_counts": best,
            "n_star": n_star, "crossover": cross}


# ---------------------------------------------------------------------------------- CLI


def format_prediction(p: Prediction) -> str:
    i = p.info
    lines = [f"{i['model']} {i['scheme']} on {i['n']}x {i['gpu']} ({i['link']}, "
             f"{'CUDA graph' if i['cuda_graph'] else 'eager'}, engine {i['engine']}, "
             f"context {i['context']}): {p.tok_per_s:.1f} tok/s, {p.ms_per_token:.2f} ms/token "
             f"(bandwidth ceiling {i['ceiling_tok_per_s']:.1f} tok/s)"]
    for term, ms in p.breakdown.items():
        lines.append(f"  {term:<14} {ms:8.3f} ms  {ms / p.ms_per_token:6.1%}")
    lines.append(f"  per device: {i['bytes_per_device'] / 1e9:.2f} GB of weights at "
                 f"{i['effective_bandwidth_GBps']:.0f} GB/s effective; "
                 f"{i['collectives_per_token']} collectives, {i['kernels_per_token']:.0f} kernels per token")
    return "\n".join(lines)


def predict_cli(args) -> int:
    """``python -m mlc_course bench --predict``: one prediction per quantization scheme.
    Uses ``args.model``, ``args.quantization`` (list or None: q4f16_1), ``args.gpu``,
    ``args.num_gpus`` and, when present, ``args.link``, ``args.engine``, ``args.eager``."""
    import sys

    from .hardware import load_gpus, weight_bytes
    from .config import get_preset

    from .sharding import validate_shards

    cfg = get_preset(args.model)
    gpus = load_gpus()
    if args.gpu not in gpus:
        raise ValueError(f"unknown GPU {args.gpu!r}; known: {', '.join(gpus)}")
    for scheme in args.quantization or ["q4f16_1"]:
        validate_shards(cfg, args.num_gpus, scheme)  # heads and groups must split evenly
        p = predict(cfg, scheme, args.gpu, args.num_gpus, link=getattr(args, "link", None),
                    cuda_graph=not getattr(args, "eager", False),
                    engine=getattr(args, "engine", None) or "mlc-2023")
        print(format_prediction(p))
        need = weight_bytes(cfg, scheme) / args.num_gpus
        if need > gpus[args.gpu].memory_bytes:
            print(f"  warning: {need / 2**30:.1f} GiB of weights per GPU does not fit in "
                  f"{gpus[args.gpu].memory_GB:.0f} GB", file=sys.stderr)
    return 0


bench_predict_cli = predict_cli


# ------------------------------------------------------------------------ past one node


def predict_pipeline(model_preset, scheme: str, gpu: str, tp: int, pp: int,
                     link: str | None = None, **kw) -> Prediction:
    """Pipeline parallelism over ``pp`` nodes, tensor parallelism ``tp`` inside each node.

    At batch 1 the stages run one after another, so a token still passes every layer in
    turn, with ``tp`` GPUs per layer: the time is that of TP=``tp`` for the whole model plus
    ``pp - 1`` activation sends between nodes (``ib.alpha0 + hidden * 2 bytes / ib.beta``).
    Pipelining buys memory (each node holds 1/pp of the layers), not batch-1 speed.
    """
    from .config import LlamaConfig, get_preset

    cfg = model_preset if isinstance(model_preset, LlamaConfig) else get_preset(model_preset)
    p = predict(cfg, scheme, gpu, tp, link, **kw)
    send = (pp - 1) * (param("ib.alpha0") + 2 * cfg.hidden_size / param("ib.beta"))
    t = p.ms_per_token / 1e3 + send
    bd = dict(p.breakdown, pipeline_send=send * 1e3)
    info = dict(p.info, pp=pp, tp=tp, n=tp * pp, nodes=pp)
    return Prediction(1.0 / t, t * 1e3, bd, info)


# ------------------------------------------------------------------------------ figures


def plot_seed_scaling(rows: list[dict], counts=(2, 4, 8)):
    """Published tok/s (markers) and the model's prediction (lines, also where the seed has no
    number) against GPU count, one panel per model; colour = GPU, solid = 4-bit, dashed = fp16."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.2), dpi=80, layout="constrained", sharey=True)
    series = sorted({(r["model"], r["precision"], r["gpu"]) for r in rows})
    colors = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(r["gpu"] for r in rows))}
    handles = {}
    for ax, model in zip(axes, ("Llama-2-70B", "CodeLlama-34B")):
        for m, prec, gpu in series:
            if m != model:
                continue
            pts = sorted((r["n"], r["published"]) for r in rows
                         if (r["model"], r["precision"], r["gpu"]) == (m, prec, gpu))
            ns = [n for n in counts if n >= pts[0][0]]
            pred = [predict(SEED_MODELS[m], prec, gpu, n, link="pcie").tok_per_s for n in ns]
            q4 = prec.startswith("q4")
            ax.plot(ns, pred, "-x" if q4 else "--x", color=colors[gpu], lw=1, ms=4)
            h, = ax.plot(*zip(*pts), "o" if q4 else "s", color=colors[gpu], ms=4)
            handles[f"{gpu} {'q4' if q4 else 'fp16'}"] = h
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(counts), [str(c) for c in counts])
        ax.set_xlim(counts[0] / 1.2, counts[-1] * 1.2)
        ax.set_xlabel("GPUs (PCIe)")
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("decode tok/s (batch 1)")
    fig.suptitle("published (dots, squares) and the model (lines, x)", fontsize=9)
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="outside right upper")
    return fig


def plot_breakdown(preds: dict, title: str = ""):
    """Stacked bars of ms per token by term, one bar per label of ``preds`` (label ->
    Prediction)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 2.8), dpi=80, layout="constrained")
    labels = list(preds)
    bottom = [0.0] * len(labels)
    for i, term in enumerate(("weights", "kv_cache", "allreduce", "kernel_launch", "host")):
        vals = [preds[k].breakdown.get(term, 0.0) for k in labels]
        if not any(vals):
            continue
        ax.bar(labels, vals, bottom=bottom, label=term, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per token")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return fig
