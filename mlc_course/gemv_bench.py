"""The decode GEMVs timed alone on a GPU: every step of the course's GEMV ladder
(:data:`mlc_course.schedules.CUDA_GEMV_LADDER`), next to PyTorch's int4 GEMV.

One function times, :func:`time_gemv_ladder`; ``scripts/gpu_run.py`` calls it on the lent GPUs
with kernels compiled here, and notebook 06 through :func:`gemv_ladder`, which times live where
this machine has a CUDA GPU (and a TVM that compiles) and otherwise returns the committed run,
saying which it shows.

Each kernel cycles through copies of its weights that together exceed the L2 cache several
times, so every call streams its weights from memory as in the model; timed with CUDA events
(PyTorch's). GB/s = weight bytes / time.
"""

from __future__ import annotations

import json
from pathlib import Path

ROTATE_BYTES = 200e6  # weight copies cycled through per timing: 4x the 50 MB L2 of an H100/H200
RESULTS = Path(__file__).resolve().parent.parent / "data" / "results"
COMMITTED = "gpu_h100x1.json"


TIMING = f"CUDA events, weights rotated over copies > {ROTATE_BYTES / 50e6:.0f}x L2"


def ladder_variants() -> list[dict]:
    """The ladder's steps as the results files record them (name, description)."""
    from .schedules import CUDA_GEMV_LADDER

    return [{"name": v["name"], "description": v["description"]} for v in CUDA_GEMV_LADDER]


def gemv_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(n, k) of each decode GEMV of one layer of ``cfg`` and of its lm_head."""
    return {**{name: (int(n), int(k)) for name, (n, k) in cfg.linear_shapes_per_layer().items()},
            "lm_head": (cfg.vocab_size, cfg.hidden_size)}


def event_time(launch, calls: int, reps: int = 10) -> float:
    """Seconds per call of ``launch(i)`` for i in range(calls), ``reps`` times over, timed
    with CUDA events on the default stream (where TVM and PyTorch both launch)."""
    import torch

    for i in range(calls):
        launch(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        for i in range(calls):
            launch(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * calls)


def time_gemv_ladder(lib, shapes: dict[str, tuple[int, int]], variants: list[str], seed: int = 0) -> list[dict]:
    """One row per linear: each variant's kernel ``gemv_<variant>_<linear>`` of ``lib`` (a
    loaded TVM module, q4f16_1 weights) and PyTorch's int4 GEMV (``_weight_int4pack_mm``,
    the tinygemm kernel gpt-fast uses: bfloat16 activations, group size 32, scales and zeros)
    on the same (n, k): µs per call and GB/s of weights."""
    import numpy as np
    import torch
    import tvm

    dev = tvm.cuda(0)
    rng = np.random.default_rng(seed)
    rows = []
    for name, (n, k) in shapes.items():
        wbytes = n * k // 2 + n * (k // 32) * 2
        copies = int(min(32, max(2, -(-ROTATE_BYTES // wbytes))))
        x = tvm.runtime.tensor(rng.standard_normal((1, 1, k)).astype("float16"), dev)
        qw0 = np.frombuffer(rng.bytes(n * k // 2), dtype=np.uint32).reshape(n, k // 8)
        sc0 = rng.uniform(0.002, 0.004, (n, k // 32)).astype("float16")
        qws = [tvm.runtime.tensor(qw0, dev) for _ in range(copies)]
        scs = [tvm.runtime.tensor(sc0, dev) for _ in range(copies)]
        y = tvm.runtime.empty((1, 1, n), "float16", dev)
        row = {"linear": name, "n": n, "k": k, "weight_bytes": wbytes, "weight_copies": copies}
        for kind in variants:
            f = lib[f"gemv_{kind}_{name}"]
            t = event_time(lambda i: f(x, qws[i], scs[i], y), copies)
            row[f"{kind}_us"] = round(t * 1e6, 2)
            row[f"{kind}_GBps"] = round(wbytes / t / 1e9, 1)
        del qws, scs
        try:  # PyTorch's int4 GEMV on the same shape (its own layout: int4 + bf16 scale and zero)
            w = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
            packed_u8 = (w[:, 1::2] << 4 | w[:, ::2]).to(torch.uint8)
            wps = [torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8) for _ in range(copies)]
            szs = [torch.rand(k // 32, n, 2, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
            xb = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
            t = event_time(lambda i: torch.ops.aten._weight_int4pack_mm(xb, wps[i], 32, szs[i]), copies)
            tb = n * k // 2 + n * (k // 32) * 4  # int4 + bf16 scale and zero per group
            row.update(torch_int4_us=round(t * 1e6, 2), torch_int4_GBps=round(tb / t / 1e9, 1),
                       torch_weight_bytes=tb)
            del w, packed_u8, wps, szs
        except Exception as e:  # noqa: BLE001
            row["torch_int4_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    return rows


def compile_gemv_ladder(model: str = "llama2-7b", scheme: str = "q4f16_1", device: str = "cuda"):
    """Every step of the ladder for each GEMV of one layer of ``model`` (and its lm_head),
    compiled for ``device`` into one module with functions ``gemv_<variant>_<linear>``.
    Returns (module, shapes, variant names)."""
    import tvm

    from .compile import compile_kernels, get_target
    from .config import get_preset
    from .schedules import CUDA_GEMV_LADDER, schedule_gemv_variant

    target = get_target(device)
    shapes = gemv_shapes(get_preset(model))
    funcs = {}
    for variant in CUDA_GEMV_LADDER:
        for name, (n, k) in shapes.items():
            sym = f"gemv_{variant['name']}_{name}"
            funcs[sym] = schedule_gemv_variant(variant["name"], n, k, scheme, target).with_attr("global_symbol", sym)
    return compile_kernels(tvm.IRModule(funcs), target), shapes, [v["name"] for v in CUDA_GEMV_LADDER]


def copy_bandwidth(nbytes: int = 2**30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth of GPU 0 through PyTorch, GB/s counting bytes read plus
    written (the median of ``reps`` copies after three warm-up ones): the ceiling every GPU
    result of the course is measured against."""
    import torch

    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def gpu_here() -> str | None:
    """This machine's first CUDA GPU's name when TVM and PyTorch can both use it, else None."""
    try:
        import torch
        import tvm

        if torch.cuda.is_available() and tvm.cuda(0).exist:
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return None


def gemv_ladder(live: bool | None = None) -> dict:
    """The GEMV ladder's timings as ``gpu_run`` records them (``variants``, ``rows``, ...) plus
    ``source``: timed here and now when ``live`` (default: when :func:`gpu_here` finds a GPU),
    else the committed one-H100 run."""
    gpu = gpu_here() if live is None or live else None
    if live and gpu is None:
        raise RuntimeError("no CUDA GPU usable by both TVM and PyTorch here; call gemv_ladder() "
                           "for the committed run")
    if gpu is not None:
        import torch

        lib, shapes, names = compile_gemv_ladder()
        rows = time_gemv_ladder(lib, shapes, names)
        return {"model": "llama2-7b", "quantization": "q4f16_1", "torch": torch.__version__,
                "copy_bandwidth_GBps": round(copy_bandwidth(), 1),
                "timing": TIMING, "variants": ladder_variants(),
                "rows": rows, "gpu": gpu, "source": f"measured live on this machine's {gpu}"}
    doc = json.loads((RESULTS / COMMITTED).read_text())
    run = dict(doc["gemv"][0])
    run.update(gpu=doc["machine"]["gpu"],
               source=f"the committed run on an {doc['machine']['gpu']} (data/results/{COMMITTED}, "
                      f"{doc['records'][0].get('date', '')}); no GPU here")
    return run
