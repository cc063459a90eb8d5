"""SPMD tensor parallelism, small enough to read: simulated ranks in NumPy, the same idea as
``relax.distributed`` annotations lowered by TVM, and what a split saves in memory.

Three parts, used by notebooks 04 and 05 (and their tests):

* **Simulated ranks.** :func:`column_parallel_linear` and :func:`row_parallel_linear` run one
  linear layer on N "devices" that are just list entries; :func:`tp_mlp` chains them the
  Megatron way (column, then row) and adds the partial results with
  :func:`mlc_course.collectives.ring_allreduce`, one all-reduce per MLP. Weights are stored
  (out, in), ``y = x @ W.T``, exactly like the model (:mod:`mlc_course.model`) and
  :mod:`mlc_course.sharding`: a *column* split cuts dim 0 (output features), a *row* split
  cuts dim 1 (input features). (The names come from Megatron-LM, which writes ``Y = X A`` with
  ``A`` stored (in, out): there a column split cuts columns.)

* **relax.distributed.** :func:`mlp_global_module` writes a 2-layer MLP once, for the whole
  mesh (the *global view*), with a single sharding annotation; :func:`lower_mlp` runs the
  passes that TVM 0.27 needs, in this order: ``LegalizeOps -> PropagateSharding ->
  LowerGlobalViewToLocalView -> LegalizeRedistribute -> LowerDistIR``, and keeps the module
  after each. (Without ``LegalizeOps`` first every pass still succeeds but the all-reduce is
  silently lost; ``LowerDistIR`` before ``LowerGlobalViewToLocalView`` raises.)
  :func:`run_on_workers` compiles the per-device program and runs it on a disco session whose
  all-reduce is the course's CPU CCL. In 0.27 the lowered program takes the *whole* weights on
  worker 0 and scatters them at every call (``R.ccl.scatter_from_worker0``): fine for teaching,
  not for a model, which is why the engine shards the weights once per worker, as MLC LLM does.

* **Pictures.** :func:`plot_sharding_plan` (which worker holds which slice of a layer) and
  :func:`plot_ring_allreduce` (a ring all-reduce's progress, from its trace alone).

* **Memory.** :func:`memory_per_device` adds up what one of N workers stores: its share of the
  split weights, a full copy of the replicated ones (embedding, lm_head, norms) and its share
  of the KV cache.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .collectives import CommStats, ring_allreduce
from .config import LlamaConfig
from .sharding import ShardSpec, shard_array, shard_spec, validate_shards

__all__ = [
    "ACTIVATIONS", "column_parallel_linear", "row_parallel_linear", "mlp_reference", "tp_mlp",
    "TPResult", "mlp_global_module", "LOWERING_PASSES", "Lowering", "lower_mlp",
    "function_text", "placements", "ccl_calls", "run_on_workers", "memory_per_device", "memory_table",
    "ring_progress", "plot_ring_allreduce", "plot_sharding_plan",
]

ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda h: np.maximum(h, 0),
    "silu": lambda h: h / (1 + np.exp(-h)),
    "identity": lambda h: h,
}


# =============================================================================================
# Simulated ranks (NumPy)
# =============================================================================================

def column_parallel_linear(x: np.ndarray, w: np.ndarray, n: int) -> list[np.ndarray]:
    """``y = x @ w.T`` with ``w`` (out, in) split by output rows: rank r holds rows
    ``r*out/n ... (r+1)*out/n`` and computes those output features, from the *whole* input.
    Returns the n output slices, ``(..., out/n)`` each; concatenated they are ``y``. No
    communication: every rank has everything it needs."""
    return [x @ wr.T for wr in shard_array(w, ShardSpec("column"), n)]


def row_parallel_linear(x_parts: Sequence[np.ndarray], w: np.ndarray) -> list[np.ndarray]:
    """``y = x @ w.T`` with ``w`` (out, in) split by input columns: rank r holds columns
    ``r*in/n ... (r+1)*in/n`` and the matching slice ``x_parts[r]`` of the input. Returns the n
    *partial sums*, ``(..., out)`` each: ``y = sum(partials)``, so an all-reduce must follow."""
    n = len(x_parts)
    return [xr @ wr.T for xr, wr in zip(x_parts, shard_array(w, ShardSpec("row"), n))]


def mlp_reference(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, act: str = "relu") -> np.ndarray:
    """The unsharded 2-layer MLP ``act(x @ w1.T) @ w2.T`` (weights (out, in))."""
    return ACTIVATIONS[act](x @ w1.T) @ w2.T


@dataclass
class TPResult:
    """What :func:`tp_mlp` computed on each simulated rank, and what it cost."""

    outputs: list[np.ndarray]        # the final output on every rank (after the all-reduce)
    hidden: list[np.ndarray]         # each rank's slice of the hidden activations
    partials: list[np.ndarray]       # each rank's partial sum before the all-reduce
    num_allreduces: int
    trace: CommStats = field(default_factory=CommStats)


def tp_mlp(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, n: int, act: str = "relu") -> TPResult:
    """Megatron's MLP on n simulated ranks: ``w1`` column-parallel, the activation applied to
    each rank's own slice (it is elementwise, so no communication), ``w2`` row-parallel, then
    one ring all-reduce of the partial sums. Every message is recorded in ``result.trace``."""
    hidden = [ACTIVATIONS[act](h) for h in column_parallel_linear(x, w1, n)]
    partials = row_parallel_linear(hidden, w2)
    trace = CommStats()
    outputs = ring_allreduce(partials, trace=trace) if n > 1 else partials
    return TPResult(outputs, hidden, partials, 1 if n > 1 else 0, trace)


# =============================================================================================
# relax.distributed: annotate the global view, lower it to one program per device
# =============================================================================================

def mlp_global_module(batch: int = 4, hidden: int = 16, inter: int = 32, n: int = 2,
                      act: str = "relu", dtype: str = "float32"):
    """The MLP ``act(x @ w1) @ w2`` as a Relax module for a mesh of ``n`` devices.

    Written in Relax's own layout, ``R.matmul(x, w)`` with ``w`` stored (in, out). One
    annotation says how the *hidden activation* lives on the mesh, ``S[1]`` (split along its
    axis 1 over the mesh); :func:`lower_mlp`'s ``PropagateSharding`` infers every other
    placement from it. The module carries the mesh as global info ``"mesh"``:
    ``DeviceMesh((n,), Range(0, n))``, n devices in one dimension.
    """
    import tvm
    from tvm import relax
    from tvm.relax.distributed import DeviceMesh, Placement

    if inter % n:
        raise ValueError(f"the hidden width {inter} does not split over {n} devices")
    mesh = DeviceMesh((n,), tvm.ir.Range(0, n))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, hidden), dtype))
    w1 = relax.Var("w1", relax.TensorType((hidden, inter), dtype))
    w2 = relax.Var("w2", relax.TensorType((inter, hidden), dtype))
    activation = {"relu": relax.op.nn.relu, "silu": relax.op.nn.silu,
                  "identity": lambda v: v}[act]
    with bb.function("mlp", [x, w1, w2]):
        h = bb.emit(relax.op.matmul(x, w1))
        h = bb.emit(activation(h))
        h = bb.emit(relax.op.distributed.annotate_sharding(h, mesh, Placement.from_text("S[1]")))
        y = bb.emit(relax.op.matmul(h, w2))
        bb.emit_func_output(y)
    mod = bb.get()
    mod = mod.with_attr("device_num", n)
    mod.update_global_info("mesh", [mesh])
    return mod


def _passes():
    from tvm import relax
    from tvm.relax.distributed import transform as dt

    return [("legalize", relax.transform.LegalizeOps()),
            ("propagate", dt.PropagateSharding()),
            ("local_view", dt.LowerGlobalViewToLocalView()),
            ("redistribute", dt.LegalizeRedistribute()),
            ("lowered", dt.LowerDistIR())]


#: The pass order that works in TVM 0.27 (names of :func:`lower_mlp`'s stages).
LOWERING_PASSES = ("legalize: relax.transform.LegalizeOps",
                   "propagate: distributed.transform.PropagateSharding",
                   "local_view: distributed.transform.LowerGlobalViewToLocalView",
                   "redistribute: distributed.transform.LegalizeRedistribute",
                   "lowered: distributed.transform.LowerDistIR")


@dataclass
class Lowering:
    """The module after each stage of :func:`lower_mlp` (``"global"`` is the input)."""

    stages: dict  # name -> IRModule, in pass order
    func: str = "mlp"

    def text(self, stage: str, tir: bool = False) -> str:
        """TVMScript of the Relax function at ``stage`` (the whole module, TIR kernels
        included, if ``tir``)."""
        return function_text(self.stages[stage], None if tir else self.func)

    def prim_func_text(self, stage: str, name: str) -> str:
        """TVMScript of one TIR kernel (e.g. ``matmul2``, the per-device matmul)."""
        return function_text(self.stages[stage], name)

    @property
    def lowered(self):
        return self.stages["lowered"]


def lower_mlp(mod=None, skip: Sequence[str] = (), **kw) -> Lowering:
    """Run the distributed lowering on ``mod`` (default: :func:`mlp_global_module` with
    ``kw``) and keep the module after every pass. ``skip`` names stages to leave out, to see
    what goes wrong: without ``legalize`` the passes still succeed, but
    ``LowerGlobalViewToLocalView`` only rewrites ``call_tir``, so no all-reduce is inserted
    and every worker returns its partial sum (TVM 0.27)."""
    mod = mlp_global_module(**kw) if mod is None else mod
    unknown = set(skip) - {name for name, _ in _passes()}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}")
    stages = {"global": mod}
    for name, p in _passes():
        if name not in skip:
            mod = p(mod)
            stages[name] = mod
    func = next(gv.name_hint for gv, f in stages["global"].functions.items()
                if type(f).__name__ == "Function")
    return Lowering(stages, func)


_MESH_RE = re.compile(r"R\.device_mesh\(\((\d+),\), R\.Range\(0, \1\)\)")


def function_text(mod, func: str | None = None, short_mesh: bool = True) -> str:
    """TVMScript of one Relax function of ``mod`` (or the whole module), without the
    ``# from tvm.script import ...`` header lines. ``short_mesh`` prints the 1-D mesh
    ``R.device_mesh((n,), R.Range(0, n))`` as ``"mesh[0]"``, the name TVMScript also accepts
    for the module's first mesh."""
    text = mod[func].script() if func else mod.script()
    if short_mesh:
        text = _MESH_RE.sub('"mesh[0]"', text)
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith("# from ") and line.strip() != "").strip()


def _local_shape(shape: list[int], placement: str, mesh: list[int]) -> tuple[int, ...]:
    local = list(shape)
    for size, pl in zip(mesh, placement.split(",")):
        m = re.fullmatch(r"\s*S\[(\d+)\]\s*", pl)
        if m:
            local[int(m.group(1))] //= size
    return tuple(local)


def placements(mod, func: str = "mlp") -> list[dict]:
    """Every tensor of a sharding-propagated function (``DTensor`` types): its name, global
    shape, placement and the shape each device holds. ``"R"`` = replicated (every device has
    all of it), ``"S[i]"`` = sharded along tensor axis i over the mesh (one entry per mesh
    dimension, comma-separated, for meshes of more than one dimension)."""
    f = mod[func]
    named = [(p.name, p.ty) for p in f.params]
    for block in f.body.blocks:
        named += [(b.var.name, b.var.ty) for b in block.bindings]
    named.append(("(result)", f.ret_ty))
    rows = []
    for name, ty in named:
        if type(ty).__name__ != "DTensorType":
            continue
        shape = [int(s) for s in ty.tensor_ty.shape]
        placement = str(ty.placement).strip('"')
        mesh = [int(s) for s in ty.device_mesh.shape]
        rows.append({"tensor": name, "shape": tuple(shape), "placement": placement,
                     "per_device": _local_shape(shape, placement, mesh)})
    return rows


_CCL_RE = re.compile(r"R\.ccl\.(\w+)|\"(runtime\.disco\.\w+)\"|R\.dist\.(redistribute\w*)")


def ccl_calls(text_or_mod, func: str | None = None) -> list[str]:
    """Names of the collectives a program calls, in order: ``R.ccl.*`` ops, legalized
    ``runtime.disco.*`` builtins and ``R.dist.redistribute``."""
    text = text_or_mod if isinstance(text_or_mod, str) else function_text(text_or_mod, func)
    return [next(g for g in m.groups() if g) for m in _CCL_RE.finditer(text)]


def run_on_workers(lowered_mod, inputs: Sequence[np.ndarray], session: str = "thread",
                   func: str = "mlp") -> list[np.ndarray]:
    """Compile a per-device program (the output of ``LowerDistIR``) for this CPU and run it on
    a disco session with one worker per mesh device, all-reduces through the CPU CCL.

    Inputs are copied to worker 0 only (the program broadcasts or scatters them); the other
    workers get uninitialised buffers of the same shape. Returns each worker's output.
    """
    import tvm

    from .ccl import disco_session, init_cpu_ccl
    from .compile import cpu_target

    n = int(lowered_mod.attrs["device_num"])
    ds = disco_session()
    with tempfile.TemporaryDirectory(prefix="mlc_spmd_") as tmp:
        lib = Path(tmp) / "spmd.so"
        tvm.compile(lowered_mod, target=cpu_target()).export_library(str(lib))
        sess = ds.ThreadedSession(n) if session == "thread" else ds.ProcessSession(n)
        try:
            init_cpu_ccl(sess, n)
            mod = sess.load_vm_module(str(lib))
            args = []
            for a in inputs:
                d = sess.empty(a.shape, str(a.dtype))
                d.debug_copy_from(0, np.ascontiguousarray(a))
                args.append(d)
            out = mod[func](*args)
            return [out.debug_get_from_remote(w).numpy() for w in range(n)]
        finally:
            # drop references, never shutdown() (see mlc_course.ccl's notes on TVM 0.27)
            mod = args = out = None  # noqa: F841
            sess = None


# =============================================================================================
# Memory per device
# =============================================================================================

def memory_per_device(cfg: LlamaConfig, scheme: str, n: int, context: int = 4096,
                      batch: int = 1) -> dict[str, float]:
    """Bytes one of ``n`` tensor-parallel workers stores, by kind.

    ``sharded``: its 1/n of every split linear (QKV, O, gate/up, down) in ``scheme``, scales
    included; ``replicated``: the full embedding, lm_head (unless tied) and norms;
    ``kv_cache``: its 1/n of the KV heads for ``batch`` sequences of ``context`` tokens, in
    the activation dtype. Activations and workspace come on top (small at batch 1).
    """
    from .quantization import get_scheme, weight_arrays_shapes

    validate_shards(cfg, n, scheme)
    s = get_scheme(scheme)
    act = np.dtype(s.float_dtype).itemsize

    def stored(shape: tuple[int, int]) -> int:
        return sum(int(np.prod(sh)) * np.dtype(dt).itemsize
                   for sh, dt in weight_arrays_shapes(*shape, scheme).values())

    sharded = 0
    for name, (o, i) in cfg.linear_shapes_per_layer().items():
        kind = shard_spec(f"layers.0.x.{name}.w", cfg).kind
        sharded += stored((o // n, i) if kind == "column" else (o, i // n))
    sharded *= cfg.num_layers
    replicated = stored((cfg.vocab_size, cfg.hidden_size))  # embedding
    if not cfg.tie_embeddings:
        replicated += stored((cfg.vocab_size, cfg.hidden_size))  # lm_head
    replicated += (2 * cfg.num_layers + 1) * cfg.hidden_size * act  # norms
    kv = batch * cfg.kv_bytes_per_token(context, act) // n
    return {"sharded": float(sharded), "replicated": float(replicated),
            "weights": float(sharded + replicated), "kv_cache": float(kv),
            "total": float(sharded + replicated + kv)}


def memory_table(cfg: LlamaConfig, scheme: str, counts: Sequence[int] = (1, 2, 4, 8),
                 context: int = 4096, cards_GB: Sequence[float] = (24, 80)) -> list[dict]:
    """One row per device count: GB (1e9 bytes) per device (weights, KV cache, total) and
    whether it fits on cards of ``cards_GB`` (card memory counted as vendors quote it, binary:
    24 GB = 24 * 2**30 bytes, as :class:`mlc_course.hardware.GPU` does). A fit here is
    necessary, not sufficient: the runtime, activations and fragmentation need some more."""
    rows = []
    for n in counts:
        m = memory_per_device(cfg, scheme, n, context)
        row = {"devices": n, **{k: v / 1e9 for k, v in m.items()}}
        for c in cards_GB:
            row[f"fits {c:g} GB"] = m["total"] <= c * 2**30
        rows.append(row)
    return rows


# =============================================================================================
# Pictures
# =============================================================================================

def ring_progress(trace: CommStats) -> np.ndarray:
    """From the trace of a ring all-reduce alone: ``counts[s, r, c]`` = how many ranks'
    contributions rank r's copy of chunk c holds after step s (s = 0 is the start, where
    each rank holds only its own). Reduce-scatter steps add the sender's count to the
    receiver's; all-gather steps overwrite it. The all-reduce is done when every entry is n."""
    n = trace.n or 1
    counts = [np.ones((n, n), dtype=int)]
    for phase, step in zip(trace.phases, trace.steps):
        cur = counts[-1].copy()
        for s in step:
            if phase == "reduce-scatter":
                cur[s.dst, s.chunk] = counts[-1][s.dst, s.chunk] + counts[-1][s.src, s.chunk]
            else:
                cur[s.dst, s.chunk] = counts[-1][s.src, s.chunk]
        counts.append(cur)
    return np.stack(counts)


def plot_ring_allreduce(trace: CommStats):
    """One small panel per step: rows = ranks, columns = chunks, colour and number = how many
    ranks' data that copy of the chunk contains; the arrows of the step are listed below."""
    import matplotlib.pyplot as plt

    counts = ring_progress(trace)
    n, steps = counts.shape[1], counts.shape[0]
    fig, axes = plt.subplots(1, steps, figsize=(min(1.25 * steps, 9.0), 2.4), dpi=80,
                             layout="constrained", squeeze=False)
    for s, ax in enumerate(axes[0]):
        ax.imshow(counts[s], vmin=1, vmax=n, cmap="Blues")
        for r in range(n):
            for c in range(n):
                ax.text(c, r, str(counts[s, r, c]), ha="center", va="center", fontsize=7,
                        color="white" if counts[s, r, c] > (n + 1) / 2 else "black")
        title = "start" if s == 0 else f"{s}: " + ("RS" if trace.phases[s - 1] == "reduce-scatter"
                                                    else "AG")
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(n), [f"c{c}" for c in range(n)], fontsize=6)
        ax.set_yticks(range(n), [f"r{r}" for r in range(n)] if s == 0 else [], fontsize=6)
        if s > 0:
            ax.set_xlabel("\n".join(f"{m.src}→{m.dst} c{m.chunk}" for m in trace.steps[s - 1]),
                          fontsize=6)
    return fig


def plot_sharding_plan(cfg: LlamaConfig, n: int, title: str | None = None):
    """The four linears of one layer, stored (out, in), each slice coloured by the worker that
    holds it: QKV and gate/up cut into n pieces *per segment* along the output rows (column
    parallel), O and down cut along the input columns (row parallel)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    validate_shards(cfg, n)
    shapes = cfg.linear_shapes_per_layer()
    fig, axes = plt.subplots(1, 4, figsize=(8.0, 2.8), dpi=80, layout="constrained")
    seg_names = {"qkv_proj": ["Q", "K", "V"], "gate_up_proj": ["gate", "up"]}
    for ax, (name, (o, i)) in zip(axes, shapes.items()):
        spec = shard_spec(f"layers.0.x.{name}.w", cfg)
        if spec.kind == "column":
            top = 0
            for seg, label in zip(spec.segments, seg_names[name]):
                for r in range(n):
                    h = seg / n
                    ax.add_patch(Rectangle((0, top + r * h), i, h, facecolor=f"C{r}",
                                           edgecolor="white", lw=0.8))
                ax.text(i * 1.02, top + seg / 2, label, va="center", fontsize=7)
                ax.axhline(top, color="black", lw=0.8)
                top += seg
        else:
            for r in range(n):
                w = i / n
                ax.add_patch(Rectangle((r * w, 0), w, o, facecolor=f"C{r}", edgecolor="white",
                                       lw=0.8))
        ax.set_xlim(0, i * 1.15)
        ax.set_ylim(o, 0)
        ax.set_title(f"{name}\n({o}, {i}) {spec.kind}", fontsize=8)
        ax.set_xlabel("in", fontsize=7)
        ax.set_ylabel("out", fontsize=7)
        ax.tick_params(labelsize=6)
    handles = [Rectangle((0, 0), 1, 1, facecolor=f"C{r}") for r in range(n)]
    fig.legend(handles, [f"worker {r}" for r in range(n)], loc="outside right center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
