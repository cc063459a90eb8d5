"""Write the classroom labs: notebooks/labs/labN_*.ipynb (students: stubs that raise
NotImplementedError) and notebooks/labs/solutions/labN_*.ipynb (the same notebooks, stubs
filled in), from the one description below, so that the two versions cannot drift apart.

    python scripts/build_labs.py            # write both versions (outputs cleared)
    python scripts/build_labs.py --execute  # ... and execute them in place (as committed)

A cell is markdown, code, a stub (tag ``lab-stub``: the student's version and the solution),
or the check cell (tag ``lab-check``: the grader replaces it with its own). Each notebook
carries ``metadata["mlc_course"] = {"lab": "labN", "version": "student"|"solution"}``,
which is how ``python -m mlc_course grade`` tells the labs apart.
tests/test_labs.py checks that the committed notebooks match this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB_DIR = ROOT / "notebooks" / "labs"
SOL_DIR = LAB_DIR / "solutions"

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python", "codemirror_mode": {"name": "ipython", "version": 3},
                 "file_extension": ".py", "mimetype": "text/x-python",
                 "nbconvert_exporter": "python", "pygments_lexer": "ipython3"}


def md(text):
    return ("markdown", text.strip("\n"))


def code(src):
    return ("code", src.strip("\n"))


def stub(student, solution):
    return ("stub", student.strip("\n"), solution.strip("\n"))


def check(src):
    return ("check", src.strip("\n"))


CHECK_INTRO = md("""
## Check your work

Run the cell below. It runs your functions on random and edge cases, compares them with the
course's reference and tells you, check by check, what is right and what is not. Fix what it
reports and run it again; when every check passes it prints the report instead of an error.
""")

# ============================================================================ lab 1
LAB1 = [
    md("""
# Lab 1 · Pack 4-bit weights in MLC's q4f16_1 format

Notebook 02 took the format apart; now you build it. Your `quantize_q4` must produce exactly
the bits MLC LLM stores (the compiled kernels read them as they are), and `dequantize_q4` must
turn them back into floats. *Time: about 30 minutes.*

**The format.** A weight `W` of shape (N out, K in), float32:

1. Each row is cut into **groups of 32 consecutive weights**. A group's
   `scale = max|w| / 7`, computed in float32 and **stored as float16**.
2. Each weight becomes `q = clip(round(w / scale) + 7, 0, 14)`: divide in float32 by the
   *stored* scale, round half to even (`np.round`). An all-zero group has scale 0 and q = 7.
3. **Eight q values per `uint32`**: element j of each run of eight sits at bits 4j..4j+3,
   element 0 in the lowest nibble.
4. Dequantized: `w = (q − 7) × scale`, in float32.

Shapes: `q_weight` (N, K/8) `uint32`, `q_scale` (N, K/32) `float16`.
"""),
    code("""
import numpy as np

from mlc_course.labs import check_lab1

# One word by hand: the values 0..7, element 0 in the lowest nibble (the last hex digit).
q = np.arange(8, dtype=np.uint32)
word = np.bitwise_or.reduce(q << (4 * np.arange(8, dtype=np.uint32)))
print(hex(word), "-> element 5 is", (word >> np.uint32(4 * 5)) & np.uint32(0xF))
"""),
    md("""
## Your turn

Write the two functions. Hints: `w.reshape(N, K // 32, 32)` gives the groups;
`np.round` rounds half to even; `0 / 0` is NaN, so treat all-zero groups on their own
(`np.where`); build the words with `<<` and `|` on `np.uint32` values.
"""),
    stub('''
def quantize_q4(w):
    """w: float32 (N, K), K a multiple of 32 -> (q_weight uint32 (N, K/8), q_scale float16 (N, K/32))."""
    # YOUR CODE HERE
    raise NotImplementedError("quantize_q4")
''', '''
def quantize_q4(w):
    """w: float32 (N, K), K a multiple of 32 -> (q_weight uint32 (N, K/8), q_scale float16 (N, K/32))."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    groups = w.reshape(n, k // 32, 32)
    scale = (np.abs(groups).max(axis=-1) / np.float32(7)).astype(np.float16)
    s = scale.astype(np.float32)[..., None]                   # divide by the *stored* scale
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.round(groups / s) + 7, 7)      # an all-zero group: q = 7
    q = np.clip(q, 0, 14).astype(np.uint32).reshape(n, k // 8, 8)
    q_weight = np.zeros((n, k // 8), dtype=np.uint32)
    for j in range(8):                                        # element j -> bits 4j..4j+3
        q_weight |= q[..., j] << np.uint32(4 * j)
    return q_weight, scale
'''),
    stub('''
def dequantize_q4(q_weight, q_scale):
    """q_weight uint32 (N, K/8), q_scale float16 (N, K/32) -> float32 (N, K)."""
    # YOUR CODE HERE
    raise NotImplementedError("dequantize_q4")
''', '''
def dequantize_q4(q_weight, q_scale):
    """q_weight uint32 (N, K/8), q_scale float16 (N, K/32) -> float32 (N, K)."""
    n = q_weight.shape[0]
    shifts = 4 * np.arange(8, dtype=np.uint32)
    q = (q_weight[..., None] >> shifts) & np.uint32(0xF)      # (N, K/8, 8)
    q = q.reshape(n, -1, 32).astype(np.float32)               # (N, K/32, 32)
    return ((q - 7) * q_scale.astype(np.float32)[..., None]).reshape(n, -1)
'''),
    CHECK_INTRO,
    check("""
report = check_lab1(quantize_q4, dequantize_q4)
report.raise_if_failed()
"""),
    md("""
## Going further

* The edge cases the checker tries are the ones real weights hit: a group of zeros (padding),
  halves (`w / scale = 2.5`), and tiny weights whose float16 scale is a subnormal number that
  rounds *down*, so that `round(w / scale) + 7` leaves 0..14 unless clipped.
* `mlc_course.quantization.quantize(w, "q4f16_1")` is the course's reference; what changes
  for `q4f32_1`, and why does the CPU engine use it?
"""),
]

# ============================================================================ lab 2
LAB2 = [
    md("""
# Lab 2 · A tensor-parallel MLP on simulated ranks

Llama's MLP on one token is `y = W_down · (silu(W_gate x) ⊙ W_up x)`, with `W_gate`, `W_up`
of shape (F, H) and `W_down` (H, F). Megatron-style tensor parallelism (what MLC LLM does)
splits it over N ranks with **one** all-reduce. *Time: about 25 minutes.*

* `W_gate` and `W_up` are **column-parallel**: rank r keeps the rows of hidden units
  r·F/N … (r+1)·F/N − 1 and computes `silu(gate) ⊙ up` for those units only. No
  communication: each unit is finished on one rank.
* `W_down` is **row-parallel**: rank r keeps the *columns* of the same units, and
  `W_down[:, units_r] @ h_r` is a **partial sum** of y.
* One **all-reduce** adds the N partial sums; every rank ends with the whole y.

Ranks are simulated: a list with one entry per rank. The checker hands your `tp_mlp` an
`allreduce(bufs) -> list` that sums a list of per-rank arrays (the ring all-reduce of
`mlc_course.collectives`) and records where you call it.
"""),
    code("""
import numpy as np

from mlc_course.labs import check_lab2, mlp_reference, silu

rng = np.random.default_rng(0)
H, F = 8, 16
w_gate, w_up = rng.standard_normal((2, F, H)).astype(np.float32)
w_down = rng.standard_normal((H, F)).astype(np.float32)
x = rng.standard_normal(H).astype(np.float32)
print("unsharded y =", np.round(mlp_reference(x, w_gate, w_up, w_down), 3))
"""),
    md("""
## Your turn

`shard_mlp` cuts the three weights for N ranks; `tp_mlp` runs the MLP rank by rank (each
rank may only use `x` and its own shard) and returns the list of per-rank outputs.
"""),
    stub('''
def shard_mlp(w_gate, w_up, w_down, n):
    """-> a list of n dicts {"gate": (F/n, H), "up": (F/n, H), "down": (H, F/n)}."""
    # YOUR CODE HERE
    raise NotImplementedError("shard_mlp")
''', '''
def shard_mlp(w_gate, w_up, w_down, n):
    """-> a list of n dicts {"gate": (F/n, H), "up": (F/n, H), "down": (H, F/n)}."""
    b = w_gate.shape[0] // n
    return [{"gate": w_gate[r * b:(r + 1) * b],         # column-parallel: rows of my units
             "up": w_up[r * b:(r + 1) * b],
             "down": w_down[:, r * b:(r + 1) * b]}     # row-parallel: columns of my units
            for r in range(n)]
'''),
    stub('''
def tp_mlp(x, shards, allreduce):
    """Run the MLP on len(shards) simulated ranks; return a list with each rank's output.
    allreduce(list of per-rank arrays) -> list of per-rank sums."""
    # YOUR CODE HERE
    raise NotImplementedError("tp_mlp")
''', '''
def tp_mlp(x, shards, allreduce):
    """Run the MLP on len(shards) simulated ranks; return a list with each rank's output.
    allreduce(list of per-rank arrays) -> list of per-rank sums."""
    partial = []
    for s in shards:                                   # each rank on its own, no communication
        h = silu(s["gate"] @ x) * (s["up"] @ x)        # its F/n hidden units, complete
        partial.append(s["down"] @ h)                  # a partial sum of y
    return allreduce(partial)                          # the one all-reduce
'''),
    CHECK_INTRO,
    check("""
report = check_lab2(shard_mlp, tp_mlp)
report.raise_if_failed()
"""),
    md("""
## Going further

Attention splits the same way: the fused QKV projection is column-parallel by heads and
`o_proj` is row-parallel, so a Llama layer needs two all-reduces per token (lab 4 cuts the
real weights). Why would an all-reduce after the column layer be wrong even if you then
divided by N?
"""),
]

# ============================================================================ lab 3
LAB3 = [
    md("""
# Lab 3 · Ring all-reduce

The all-reduce of lab 2 is, in NCCL and in the course's CPU plugin, a **ring**: rank r only
ever sends to rank (r + 1) mod N. Each buffer is cut into N chunks
(`np.array_split(buf, N)`), then *(time: about 30 minutes)*

1. **reduce-scatter**, N − 1 steps: at step s (from 0), rank r sends chunk
   (r − s − 1) mod N to its right neighbour, which **adds** it to its own copy of that
   chunk. After N − 1 steps rank r holds chunk r summed over all ranks.
2. **all-gather**, N − 1 steps: at step s rank r sends chunk (r − s) mod N, and the
   neighbour **overwrites** its copy with it.

All ranks send at once in a step. `RingNet` is the simulated wire: `net.step(messages)`
takes a list of `(src, dst, chunk, data)`, delivers a *copy* of each, returns the delivered
messages `(src, dst, chunk, data)` and records them in `net.trace` (steps, bytes per rank).
"""),
    code("""
import numpy as np

from mlc_course.labs import RingNet, check_lab3

net = RingNet(3)
delivered = net.step([(r, (r + 1) % 3, r, np.full(2, 10 * r)) for r in range(3)], "demo")
print(delivered[0])
print(net.trace.format())
"""),
    md("""
## Your turn

Write `ring_allreduce(bufs, net)` (bufs: one 1-D array per rank; return one array per rank;
send everything through `net.step`) and `ring_allreduce_cost(n, nbytes)`: the number of steps
and the bytes each rank sends, for a buffer of `nbytes` bytes with nbytes divisible by n.
"""),
    stub('''
def ring_allreduce(bufs, net):
    """bufs: a list of N 1-D arrays (one per rank) -> a list of N arrays, each the sum."""
    # YOUR CODE HERE
    raise NotImplementedError("ring_allreduce")
''', '''
def ring_allreduce(bufs, net):
    """bufs: a list of N 1-D arrays (one per rank) -> a list of N arrays, each the sum."""
    n = len(bufs)
    chunks = [np.array_split(np.array(b, copy=True), n) for b in bufs]
    for s in range(n - 1):                                    # reduce-scatter
        msgs = [(r, (r + 1) % n, (r - s - 1) % n, chunks[r][(r - s - 1) % n]) for r in range(n)]
        for src, dst, c, data in net.step(msgs, "reduce-scatter"):
            chunks[dst][c] = chunks[dst][c] + data
    for s in range(n - 1):                                    # all-gather
        msgs = [(r, (r + 1) % n, (r - s) % n, chunks[r][(r - s) % n]) for r in range(n)]
        for src, dst, c, data in net.step(msgs, "all-gather"):
            chunks[dst][c] = data
    return [np.concatenate(ch) for ch in chunks]
'''),
    stub('''
def ring_allreduce_cost(n, nbytes):
    """-> (number of steps, bytes each rank sends) of a ring all-reduce of nbytes over n ranks."""
    # YOUR CODE HERE
    raise NotImplementedError("ring_allreduce_cost")
''', '''
def ring_allreduce_cost(n, nbytes):
    """-> (number of steps, bytes each rank sends) of a ring all-reduce of nbytes over n ranks."""
    return 2 * (n - 1), 2 * (n - 1) / n * nbytes    # one chunk of nbytes / n per step
'''),
    CHECK_INTRO,
    check("""
report = check_lab3(ring_allreduce, ring_allreduce_cost)
report.raise_if_failed()
"""),
    md("""
## Going further

Each rank sends 2(N − 1)/N of the buffer, which tends to 2× however many ranks there are:
the ring is bandwidth-optimal. But it takes 2(N − 1) steps, each paying a latency, and the
all-reduces of single-batch decoding are tiny (one hidden vector, 16 KB for Llama-2-70B).
`mlc_course.collectives.allreduce_time` puts numbers on it: compare `"ring"` with
`"one_shot"` for 16 KB on 8 GPUs.
"""),
]

# ============================================================================ lab 4
LAB4 = [
    md("""
# Lab 4 · Shard a Llama layer for N workers

The model stores each layer's projections fused, as MLC LLM does: `qkv_proj` is
[Q (num_heads·head_dim rows); K (num_kv_heads·head_dim); V (num_kv_heads·head_dim)], and
`gate_up_proj` is [gate (F rows); up (F rows)]. For N workers *(time: about 30 minutes)*:

| weight | split | worker r gets |
|---|---|---|
| `qkv_proj` | column, **each segment on its own**, by heads | its Q heads, then the K heads and V heads they use |
| `o_proj` | row (input columns) | the columns of its own Q heads |
| `gate_up_proj` | column, each segment on its own | units r·F/N … of gate, then the same units of up |
| `down_proj` | row (input columns) | the columns of its own units |
| norms | replicated | the whole vector |

With grouped-query attention, query head i uses KV head i // (num_heads / num_kv_heads), so a
worker with a contiguous block of Q heads needs the matching block of KV heads.

**Which N work?** Every dimension that gets split must divide by N (and the hidden size never
is). With 4-bit weights in groups of `group_size` along the input, each worker's slice of a
row-parallel input (o_proj: num_heads·head_dim; down_proj: F) must be whole groups too.
"""),
    code("""
import numpy as np

from mlc_course.labs import LAB4_CONFIG, check_lab4, random_layer

cfg = LAB4_CONFIG   # 8 query heads share 4 KV heads, head_dim 4, hidden 32, MLP width 48
layer = random_layer(cfg)
print(f"{cfg.num_heads} heads, {cfg.num_kv_heads} KV heads, head_dim {cfg.head_dim}")
for name, w in layer.items():
    print(f"  {name:<25} {w.shape}")
"""),
    md("""
## Your turn

`shard_layer(layer, cfg, n)` returns one dict per worker with the same keys as `layer`;
`find_shard_counts(cfg, group_size=1, max_n=64)` returns the valid N in 1..max_n, in order.
"""),
    stub('''
def shard_layer(layer, cfg, n):
    """layer: {name: array} as from random_layer -> a list of n dicts with the same keys."""
    # YOUR CODE HERE
    raise NotImplementedError("shard_layer")
''', '''
def shard_layer(layer, cfg, n):
    """layer: {name: array} as from random_layer -> a list of n dicts with the same keys."""
    d = cfg.head_dim
    segments = {"qkv_proj": [cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d],
                "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size]}
    workers = [{} for _ in range(n)]
    for name, w in layer.items():
        for r in range(n):
            if name in segments:      # column-parallel, each fused segment split on its own
                blocks = np.split(w, np.cumsum(segments[name])[:-1], axis=0)
                workers[r][name] = np.concatenate([np.split(b, n, axis=0)[r] for b in blocks])
            elif name in ("o_proj", "down_proj"):      # row-parallel: input columns
                workers[r][name] = np.split(w, n, axis=1)[r]
            else:                                      # norms: replicated
                workers[r][name] = w
    return workers
'''),
    stub('''
def find_shard_counts(cfg, group_size=1, max_n=64):
    """The N in 1..max_n that the model can be split into (group_size: quantization group)."""
    # YOUR CODE HERE
    raise NotImplementedError("find_shard_counts")
''', '''
def find_shard_counts(cfg, group_size=1, max_n=64):
    """The N in 1..max_n that the model can be split into (group_size: quantization group)."""
    q_size = cfg.num_heads * cfg.head_dim
    ok = []
    for n in range(1, max_n + 1):
        heads = cfg.num_heads % n == 0 and cfg.num_kv_heads % n == 0
        mlp = cfg.intermediate_size % n == 0
        groups = (q_size // n) % group_size == 0 and (cfg.intermediate_size // n) % group_size == 0
        if heads and mlp and groups:
            ok.append(n)
    return ok
'''),
    CHECK_INTRO,
    check("""
report = check_lab4(shard_layer, find_shard_counts)
report.raise_if_failed()
"""),
    md("""
## Going further

`mlc_course.sharding` is the course's version, used by the engine to hand each worker its
weights; `sharding.validate_shards(cfg, n, scheme)` turns your `find_shard_counts` into the
error message the CLI prints for `--shards 2` on SmolLM2 (9 heads, 3 KV heads).
"""),
]

# ============================================================================ lab 5
LAB5 = [
    md("""
# Lab 5 · Schedule the decode GEMV for the CPU

Decoding one token multiplies one activation row by every weight matrix: a GEMV,
`y = x · Wᵀ` with W stored in 4 bits. The course writes it as one TE op with the dequantize
inside the reduction (block `"matmul"`, `q4f32_1`: float32 scales, which this CPU computes
much faster than float16). Unscheduled, TVM runs it as written: one core, one element at a
time, every product added to a single float accumulator, which LLVM may not reorder and so
cannot vectorize. Your job: a schedule with TVM's schedule API. *Time: about 45 minutes.*

**Goal:** your kernel must reach **at least 40% of the speed of the course's reference
schedule** (`mlc_course.schedules.cpu_gemv_schedule`), timed in the same run, round-robin,
on a Llama-2-7B-sized gate/up projection (22016 × 4096, 56 MB). The report also shows
GB/s and the fraction of one core's measured read bandwidth: this kernel is bound by
unpacking nibbles, not yet by memory.
"""),
    code("""
import tvm

from mlc_course.labs import check_lab5, gemv_prim_func

func = gemv_prim_func(64, 256)   # N = 64 rows, K = 256
print(func.script())
sch = tvm.s_tir.Schedule(func)
print("loop extents:", [int(sch.get(lp).extent) for lp in sch.get_loops(sch.get_sblock("matmul"))])
"""),
    md("""
## Your turn

A plan that works (see the TVM docs for each primitive of `tvm.s_tir.Schedule`):

1. `split` the K loop into (K/16, 16) and `rfactor` the inner one (`factor_axis=3`): each
   of the 16 lanes gets its own partial sum, so the 16 can run as one vector;
2. on the new rfactor block: `split` the row loop j into tasks of 8 rows, `reorder` so that
   the lanes are innermost, `fuse` the outer loops and mark them `parallel`, `vectorize`
   the lanes (and try `unroll` on a split of the K/16 loop);
3. `reverse_compute_at` the original block (which now adds the 16 lanes) under the row loop,
   and `decompose_reduction` the rfactor block at its K/16 loop.

Your schedule must work for any N and for K a multiple of 32. `mlc_course/schedules.py`
holds the reference: try it yourself first.
"""),
    stub('''
def schedule_gemv(func):
    """func: the unscheduled PrimFunc from gemv_prim_func(N, K) -> a tvm.s_tir.Schedule."""
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("matmul")
    i, t, j, k = sch.get_loops(block)    # i, t: batch and sequence (extent 1); j: N rows; k: K
    # YOUR CODE HERE
    raise NotImplementedError("schedule_gemv")
    return sch
''', '''
def schedule_gemv(func):
    """func: the unscheduled PrimFunc from gemv_prim_func(N, K) -> a tvm.s_tir.Schedule."""
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("matmul")
    i, t, j, k = sch.get_loops(block)    # i, t: batch and sequence (extent 1); j: N rows; k: K
    ko, ki = sch.split(k, factors=[None, 16])
    rf = sch.rfactor(ki, factor_axis=3)                 # 16 partial sums per row
    i, t, j, ko, ki = sch.get_loops(rf)
    jo, ji = sch.split(j, factors=[None, 8])            # tasks of 8 rows
    sch.reorder(jo, ji, ko, ki)
    sch.parallel(sch.fuse(i, t, jo))                    # tasks spread over the cores
    sch.vectorize(ki)                                   # the 16 lanes: one vector
    _, ku = sch.split(ko, factors=[None, 2])
    sch.unroll(ku)
    sch.reverse_compute_at(block, ji)                   # add the lanes right after each row
    sch.decompose_reduction(rf, sch.get_loops(rf)[2])   # zero the partial sums before K
    return sch
'''),
    CHECK_INTRO,
    check("""
# NBVAL_IGNORE_OUTPUT
report = check_lab5(schedule_gemv)
report.raise_if_failed()
"""),
    md("""
## Going further

Print `schedule_gemv(gemv_prim_func(64, 256)).mod.script()` and compare it with the loop nest
above. The pipeline applies the same schedule to every decode GEMV of the model
(`mlc_course.schedules.CpuGEMV`); notebook 06 measures what it does to tokens per second.
"""),
]

LABS = {
    "lab1": ("lab1_quantization.ipynb", LAB1),
    "lab2": ("lab2_tensor_parallel_mlp.ipynb", LAB2),
    "lab3": ("lab3_ring_allreduce.ipynb", LAB3),
    "lab4": ("lab4_sharding.ipynb", LAB4),
    "lab5": ("lab5_cpu_gemv_schedule.ipynb", LAB5),
}


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    return [ln + "\n" for ln in lines[:-1]] + [lines[-1]]


def build(lab: str, version: str) -> dict:
    """The notebook (nbformat 4 dict, outputs empty) of ``lab`` for ``student``/``solution``."""
    _, cells = LABS[lab]
    out = []
    for i, cell in enumerate(cells):
        kind = cell[0]
        cid = f"{lab}-{i:02d}"
        if kind == "markdown":
            out.append({"cell_type": "markdown", "id": cid, "metadata": {}, "source": _lines(cell[1])})
            continue
        src, tags = cell[1], []
        if kind == "stub":
            src, tags = (cell[1] if version == "student" else cell[2]), ["lab-stub"]
        elif kind == "check":
            tags = ["lab-check"]
        out.append({"cell_type": "code", "id": cid, "metadata": {"tags": tags} if tags else {},
                    "execution_count": None, "outputs": [], "source": _lines(src)})
    return {"cells": out, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO,
                         "mlc_course": {"lab": lab, "version": version}}}


def path(lab: str, version: str) -> Path:
    return (LAB_DIR if version == "student" else SOL_DIR) / LABS[lab][0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--execute", action="store_true", help="execute each notebook in place")
    ap.add_argument("labs", nargs="*", default=list(LABS), help="which labs (default: all)")
    args = ap.parse_args(argv)
    for lab in args.labs:
        for version in ("solution", "student"):
            p = path(lab, version)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(build(lab, version), indent=1, ensure_ascii=False) + "\n")
            if args.execute:
                # the student version stops at the check cell's failure by design
                cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                       "--inplace", str(p)] + (["--allow-errors"] if version == "student" else [])
                subprocess.run(cmd, check=True, cwd=p.parent)
            print(p.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
