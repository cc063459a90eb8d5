"""The course's own schedules, written with TVM's schedule API (``tvm.s_tir.Schedule``).

``cpu_gemv_schedule`` schedules a decode-shaped linear (one row of activations times a
quantized weight) for the CPU:

* the output rows are split over the cores (``parallel``);
* the reduction over K is split into ``K/lanes`` steps of ``lanes`` consecutive elements
  and *rfactored*: each lane keeps its own partial sum, so the inner loop is a vector
  multiply-add over contiguous weights (LLVM may not reorder a float sum by itself);
* the ``lanes`` partial sums are added at the end of each row;
* two rows at a time walk K together, sharing each loaded chunk of activations.

Stock dlight's CPU GEMV rule vectorises across output rows instead, which turns every weight
load into a strided gather (and made LLVM run for minutes on this model). The rule class
:class:`CpuGEMV` applies the schedule inside the pipeline; lab 5 asks students to write it.

The model's decode step writes its 4-bit linears in the word-sum form
(:func:`mlc_course.quantization.te_linear_word_sums`), which the same function schedules
with the same ideas (rows in parallel, vector lanes along K, partial sums per lane) and fewer
instructions per weight: see :func:`cpu_word_sum_gemv_schedule`.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl


def has_block(func: tirx.PrimFunc, name: str) -> bool:
    """Whether ``func`` has a block called ``name`` (TE op names survive fusion)."""
    try:
        s_tir.Schedule(func).get_sblock(name)
        return True
    except Exception:
        return False


def _is_gemv_func(func: tirx.PrimFunc) -> bool:
    """A PrimFunc whose main block is our 'matmul' with one activation row (static)."""
    sch = s_tir.Schedule(func)
    try:
        block = sch.get_sblock("matmul")
    except Exception:
        return False
    loops = sch.get_loops(block)
    if len(loops) != 4:
        return False
    extents = [sch.get(lp).extent for lp in loops]
    return all(isinstance(e, tirx.IntImm) for e in extents) and int(extents[0]) * int(extents[1]) == 1


def cpu_gemv_schedule(func: tirx.PrimFunc, lanes: int = 16, rows_per_task: int = 8,
                      unroll: int = 1, row_block: int = 2) -> s_tir.Schedule:
    """Schedule a decode-shaped ``matmul`` block (b = s = 1) for the CPU; see module doc.

    ``row_block`` rows advance together through K (inside the K loop, unrolled): each chunk
    of activations, loaded into a vector register once, serves that many rows (measured on
    the course's 2-core Zen 4 VM: 2 rows make the 4-bit GEMVs 10-13% faster; the per-row
    sums, and so the results, do not change).

    A function in the word-sum form (a ``word_sum`` block, what the model's decode step
    uses) goes to :func:`cpu_word_sum_gemv_schedule` with its own defaults."""
    if has_block(func, "word_sum"):
        return cpu_word_sum_gemv_schedule(func)
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("matmul")
    _, _, j, k = sch.get_loops(block)
    k_dim = int(sch.get(k).extent)
    lanes = lanes if k_dim % lanes == 0 else 8 if k_dim % 8 == 0 else 1
    ko, ki = sch.split(k, factors=[None, lanes])
    partial = sch.rfactor(ki, factor_axis=3)  # partial sums, one per lane
    # partial block loops: b, s, j, ko, ki  ->  parallel rows, vector lanes innermost
    b, s, pj, pko, pki = sch.get_loops(partial)
    row_block = row_block if row_block > 0 and rows_per_task % row_block == 0 else 1
    jo, ji, jb = sch.split(pj, factors=[None, rows_per_task // row_block, row_block])
    sch.reorder(jo, ji, pko, jb, pki)
    sch.parallel(sch.fuse(b, s, jo))
    sch.vectorize(pki)
    if row_block > 1:
        sch.unroll(jb)
    if unroll > 1 and int(sch.get(pko).extent) % unroll == 0:
        _, pku = sch.split(pko, factors=[None, unroll])
        sch.unroll(pku)
    # the final add of the lanes stays with its row
    sch.reverse_compute_at(block, ji)
    sch.decompose_reduction(partial, sch.get_loops(partial)[2])
    # epilogues (casts, residual adds) follow the rows too
    for consumer in sch.get_consumers(block):
        try:
            sch.reverse_compute_at(consumer, ji)
        except Exception:
            pass
    return sch


def cpu_word_sum_gemv_schedule(func: tirx.PrimFunc, rows_per_task: int = 16,
                               row_block: int = 1) -> s_tir.Schedule:
    """Schedule the word-sum form of the decode GEMV
    (:func:`mlc_course.quantization.te_linear_word_sums`) for the CPU.

    * ``x_lanes`` and ``x_word_sums`` (the activations in lane order, once per token) run
      first, on one core: a few hundred vector instructions;
    * the output rows are split over the cores (``parallel``), ``rows_per_task`` per task;
    * the sum over the chunk's 8 word lanes is rfactored: each row keeps a vector of 8
      partial sums (one per lane), multiplied into it once per chunk by the lanes' scales
      (the row's 2 scales of the chunk: one small load, then shuffles);
    * per chunk a row loads its 8 words once and computes its ``word_sum`` vectors in
      registers: 8 nibbles x (AND, convert, FMA) on 8 lanes, in the form's independent
      partial sums;
    * the 8 lanes of a row are added at the end of the row, the epilogue follows the row.

    ``row_block`` rows walk K together (unrolled), sharing each loaded chunk of activations.
    Measured on the course's 2-core Zen 4 VM: with the weights in cache 8 rows at a time
    were 5-10% faster than 1, but in the model, where every weight comes from DRAM, one row
    at a time (each core reading its rows as one sequential stream) was faster, by up to
    1.6x for the 1536-wide down projection; hence the default of 1. Against the plain
    form's schedule: 1.3-1.6x faster per GEMV with the weights coming from DRAM.
    """
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("matmul")
    wsum = sch.get_sblock("word_sum")
    b, s, j, c, w = sch.get_loops(block)
    n = int(sch.get(j).extent)
    rows_per_task = max(1, min(rows_per_task, n))
    row_block = row_block if 0 < row_block <= rows_per_task and rows_per_task % row_block == 0 else 1
    partial = sch.rfactor(w, factor_axis=3)  # one partial sum per word lane
    pb, ps, pj, pc, pw = sch.get_loops(partial)
    jo, ji, jb = sch.split(pj, factors=[None, rows_per_task // row_block, row_block])
    sch.reorder(jo, ji, pc, jb, pw)
    sch.parallel(sch.fuse(pb, ps, jo))
    sch.vectorize(pw)
    sch.unroll(jb)
    # the row's word sums of the chunk, in registers: nibble loop outside, lanes inside
    depth = len(sch.get_loops(partial)) - 1  # the loops down to jb
    sch.compute_at(wsum, jb)
    *wh, ww, we = sch.get_loops(wsum)[depth:]  # (split,) lane, nibble
    sch.reorder(we, *wh, ww)
    sch.set_scope(wsum, 0, "local")
    sch.vectorize(ww)
    sch.unroll(we)
    for loop in wh:
        sch.unroll(loop)
    init = sch.decompose_reduction(wsum, we)
    sch.vectorize(sch.get_loops(init)[-1])
    # the chunk's scales (and minimums) of the row: one small vector load, then shuffles
    # (the scales are the one buffer the block reads that no block writes: a parameter)
    reads = sch.get(partial).reads
    idx = next(i for i, r in enumerate(reads)
               if not any(sch.get(p).writes[0].source.same_as(r.source) for p in sch.get_producers(partial)))
    cache = sch.cache_read(partial, idx, "local")
    sch.compute_at(cache, jb)
    inner = sch.get_loops(cache)[depth:]  # below jb
    sch.vectorize(sch.fuse(*inner) if len(inner) > 1 else inner[0])
    # the final add of the lanes and the epilogue (residual add, cast) follow their row
    sch.reverse_compute_at(block, ji)
    sch.decompose_reduction(partial, pc)
    for consumer in sch.get_consumers(block):
        try:
            sch.reverse_compute_at(consumer, ji)
        except Exception:  # noqa: BLE001
            pass
    return sch


def _is_word_sum_func(func: tirx.PrimFunc) -> bool:
    """A PrimFunc in the word-sum form (``word_sum`` + ``matmul`` blocks) of one token."""
    if not has_block(func, "word_sum"):
        return False
    sch = s_tir.Schedule(func)
    try:
        loops = sch.get_loops(sch.get_sblock("matmul"))
    except Exception:  # noqa: BLE001
        return False
    extents = [sch.get(lp).extent for lp in loops]
    return (len(loops) == 5 and all(isinstance(e, tirx.IntImm) for e in extents)
            and int(extents[0]) * int(extents[1]) == 1)


class CpuGEMV(dl.ScheduleRule):
    """dlight rule wrapper so the pipeline applies :func:`cpu_gemv_schedule` (either form)."""

    def apply(self, func, target, _tunable):  # noqa: D401
        if not isinstance(func, tirx.PrimFunc) or not (_is_word_sum_func(func) or _is_gemv_func(func)):
            return None
        try:
            return cpu_gemv_schedule(func)
        except Exception:
            return None


def cpu_parallel_schedule(func: tirx.PrimFunc, min_work: int = 16384) -> s_tir.Schedule | None:
    """Every other kernel on the CPU: each block's leading spatial loops, fused, run in
    parallel over the cores — prefill's linears (a dynamic number of rows), attention's score
    and output kernels, softmax. Blocks with less than ``min_work`` iterations in all stay on
    one core: a parallel region costs about a microsecond to start and join, more than a
    576-wide RMSNorm or RoPE of one token takes. None when no block qualifies."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    try:
        infos = normalize_prim_func(sch)
    except Exception:  # noqa: BLE001  (a layout dlight cannot normalise: leave it as written)
        return None
    if not infos:
        return None
    changed = False
    for info in infos:
        spatial = []
        for it in info.iters:
            if it.kind != "S":
                break
            spatial.append(it)
        if not spatial:
            continue
        work = 1
        for it in info.iters:
            dom = it.dom
            work = None if work is None or not isinstance(dom, int) else work * dom
        if work is not None and work < min_work:
            continue
        loops = [it.loop_rv for it in spatial]
        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
        changed = True
    return sch if changed else None


class CpuParallel(dl.ScheduleRule):
    """dlight rule wrapper for :func:`cpu_parallel_schedule` (after :class:`CpuGEMV`)."""

    def apply(self, func, target, _tunable):  # noqa: D401
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return cpu_parallel_schedule(func)
        except Exception:  # noqa: BLE001
            return None


# ----------------------------------------------------------------------------- CUDA GEMV


def _registers_at(sch: s_tir.Schedule, cache, loop) -> None:
    """Load a ``local`` cache block's data under ``loop``, in vector loads of at most 16
    bytes (a CUDA thread's widest load) where its innermost extent allows."""
    sch.compute_at(cache, loop, preserve_unit_loops=True)
    inner = sch.get_loops(cache)[-1]
    extent = int(sch.get(inner).extent)
    lanes = min(extent, max(1, 16 // (tvm.DataType(sch.get(cache).reads[0].source.dtype).bits // 8)))
    if extent > 1 and extent % lanes == 0:
        _, vec = sch.split(inner, factors=[None, lanes])
        sch.vectorize(vec)


def cuda_gemv_schedule(func: tirx.PrimFunc, rows_per_block: int = 8, threads_k: int = 32,
                       words_per_thread: int = 4, unroll: int = 4) -> s_tir.Schedule:
    """Schedule a decode-shaped quantized ``matmul`` block (b = s = 1) for CUDA.

    The weight is the stream that sets the speed, so the schedule is built around reading
    it at full width:

    * a block owns ``rows_per_block`` output rows (threadIdx.y); a warp of ``threads_k``
      threads (threadIdx.x) walks one row's K, each thread loading ``words_per_thread``
      consecutive uint32 words per step (16 bytes for 4 words: one vector load holding 32
      weights, i.e. exactly one quantization group and its one scale);
    * each thread keeps a private partial sum (rfactor), and the warp adds its partial sums
      with shuffles at the end (TVM lowers the cross-thread reduction);
    * the activation vector is read through registers from L1/L2 (every row of the block
      reuses it), the step loop is unrolled ``unroll`` times for loads in flight.
    """
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("matmul")
    _, _, j, k = sch.get_loops(block)
    k_dim = int(sch.get(k).extent)
    vec = 8 * words_per_thread
    if k_dim % (threads_k * vec):
        raise ValueError(f"K = {k_dim} is not a multiple of threads_k * 8 * words = {threads_k * vec}")
    ko, tx, kv = sch.split(k, factors=[None, threads_k, vec])
    rf = sch.rfactor(tx, factor_axis=0)  # partial[tx, ...]
    # rfactor block loops: i, t, j, ko, tx, kv  ->  bx, ty, tx | ko, kv
    i, t, rj, rko, rtx, rkv = sch.get_loops(rf)
    bx, ty = sch.split(sch.fuse(i, t, rj), factors=[None, rows_per_block])
    sch.reorder(bx, ty, rtx, rko, rkv)
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(rtx, "threadIdx.x")
    # vector loads (at most 16 bytes each) of the activations, the packed weights and the
    # group's scale into registers
    for idx in range(len(sch.get(rf).reads)):
        _registers_at(sch, sch.cache_read(rf, read_buffer_index=idx, storage_scope="local"), rko)
    sch.unroll(rkv)
    sch.decompose_reduction(rf, rko)
    if unroll > 1:
        sch.annotate(rko, "pragma_auto_unroll_max_step", unroll * vec)
        sch.annotate(rko, "pragma_unroll_explicit", 1)
    sch.set_scope(rf, buffer_index=0, storage_scope="local")
    # final cross-thread add: same bx / ty, reduction over tx bound to threadIdx.x
    sch.reverse_compute_at(block, bx, preserve_unit_loops=True)
    loops = sch.get_loops(block)  # bx, tx (reduce, from factor_axis=0), i, t, j
    ftx, spatial = loops[1], loops[2:]
    fo, fy = sch.split(sch.fuse(*spatial), factors=[None, rows_per_block])
    sch.reorder(fo, fy, ftx)
    sch.bind(fy, "threadIdx.y")
    sch.bind(ftx, "threadIdx.x")
    # the epilogue chain (cast to the activation dtype, residual add, ...) runs in the same
    # block, one row per threadIdx.y. The warp's sum is broadcast to every lane (shuffle), so
    # the row's result and the epilogue's intermediates live in registers of every lane.
    sch.set_scope(block, buffer_index=0, storage_scope="local")
    todo = list(sch.get_consumers(block))
    while todo:
        consumer = todo.pop(0)
        sch.reverse_compute_at(consumer, bx, preserve_unit_loops=True)
        cl = sch.get_loops(consumer)
        _, cy = sch.split(sch.fuse(*cl[1:]), factors=[None, rows_per_block])
        sch.bind(cy, "threadIdx.y")
        nxt = list(sch.get_consumers(consumer))
        if nxt:
            sch.set_scope(consumer, buffer_index=0, storage_scope="local")
        todo += nxt
    return sch


def _pick_threads_k(groups: int, threads_k: int | None) -> int:
    """Threads that share one row's K: the most (up to a warp) that split its groups evenly
    (the group-sum form pads the group count to a multiple of 32 when it is larger)."""
    for tk in ([threads_k] if threads_k else (32, 16, 8, 4, 2, 1)):
        if groups % tk == 0:
            return tk
    raise ValueError(f"{groups} groups do not split over {threads_k} threads")


def cuda_group_gemv_schedule(func: tirx.PrimFunc, rows_per_thread: int = 2, threads_per_block: int = 128,
                             threads_k: int | None = None, unroll: int = 4) -> s_tir.Schedule:
    """Schedule the group-sum form of the decode GEMV
    (:func:`mlc_course.quantization.te_linear_group_sums`) for CUDA.

    * ``threads_k`` threads (threadIdx.x, up to a warp) share one row's K, a group of 32
      weights at a time: one 16-byte load of four words, one scale, 32 activations;
    * each thread owns ``rows_per_thread`` rows: the 32 activations, loaded and converted
      to float32 once, serve all of them, and the rows' loads are in flight together;
    * the group's sum is a register (``group_sum`` computed where it is used), multiplied
      by its scale once per group, not once per weight; in the ``half2`` form it is one call
      of the course's CUDA device function (whose source the course's TIR pass,
      :mod:`mlc_course.cuda_device`, prints ahead of the kernel);
    * the per-thread partial sums are added across threadIdx.x with warp shuffles, and the
      epilogue (cast, residual add) follows the row.
    """
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("matmul")
    gsum = sch.get_sblock("group_sum")
    _, _, j, g = sch.get_loops(block)
    n, groups = int(sch.get(j).extent), int(sch.get(g).extent)
    tk = _pick_threads_k(groups, threads_k)
    ty = max(1, threads_per_block // tk)
    while ty > 1 and n % (ty * rows_per_thread):
        ty //= 2
    if n % (ty * rows_per_thread):
        raise ValueError(f"{n} rows do not split into blocks of {ty} x {rows_per_thread}")
    go, tx = sch.split(g, factors=[None, tk])
    rf = sch.rfactor(tx, factor_axis=0)  # partial[tx, ...]: one sum per thread of the row
    i, t, rj, rgo, rtx = sch.get_loops(rf)
    bx, by, rr = sch.split(sch.fuse(i, t, rj), factors=[None, ty, rows_per_thread])
    steps = int(sch.get(rgo).extent)
    u = max(1, min(unroll, steps))  # a last partial step is masked (its loads stay in bounds)
    rgo_o, rgo_i = sch.split(rgo, factors=[None, u])
    sch.reorder(bx, by, rtx, rgo_o, rgo_i, rr)
    sch.bind(bx, "blockIdx.x")
    sch.bind(by, "threadIdx.y")
    sch.bind(rtx, "threadIdx.x")
    sch.compute_at(gsum, rr)
    sch.set_scope(gsum, 0, "local")
    # registers: the group's activations and the rows' words (vector loads), the scales
    caches = [sch.cache_read(gsum, read_buffer_index=i, storage_scope="local")
              for i in range(len(sch.get(gsum).reads))]
    scale_idx = [i for i, r in enumerate(sch.get(rf).reads) if r.source.name == "q_scale"]
    caches += [sch.cache_read(rf, read_buffer_index=i, storage_scope="local") for i in scale_idx]
    for cache in caches:
        _registers_at(sch, cache, rgo_i)
    if len(sch.get(gsum).iter_vars) > 4:  # the group's 32 products as a reduction in TIR
        sch.decompose_reduction(gsum, sch.get_loops(gsum)[-1])
        sch.unroll(sch.get_loops(gsum)[-1])
    sch.unroll(rr)
    sch.unroll(rgo_i)
    sch.decompose_reduction(rf, rgo_o)
    sch.set_scope(rf, 0, "local")
    # the cross-thread sum, then the epilogue, one row per (threadIdx.y, row of the thread)
    sch.reverse_compute_at(block, bx, preserve_unit_loops=True)
    loops = sch.get_loops(block)  # bx, tx (reduce), i, t, j
    ftx, spatial = loops[1], loops[2:]
    _, fy, fr = sch.split(sch.fuse(*spatial), factors=[None, ty, rows_per_thread])
    sch.reorder(fy, fr, ftx)
    sch.bind(fy, "threadIdx.y")
    sch.bind(ftx, "threadIdx.x")
    todo = list(sch.get_consumers(block))
    if todo:  # (the lm_head's float32 sum is the function's output itself)
        sch.set_scope(block, 0, "local")
    while todo:
        consumer = todo.pop(0)
        sch.reverse_compute_at(consumer, fy, preserve_unit_loops=True)
        nxt = list(sch.get_consumers(consumer))
        if nxt:
            sch.set_scope(consumer, 0, "local")
        todo += nxt
    return sch


class CudaGEMV(dl.ScheduleRule):
    """dlight rule wrapper for the course's CUDA GEMVs: :func:`cuda_group_gemv_schedule`
    for the group-sum form, :func:`cuda_gemv_schedule` for the plain one (falls through when
    K does not fit)."""

    def __init__(self, plain: bool = True, **params):
        self.plain, self.params = plain, params

    def apply(self, func, target, _tunable):  # noqa: D401
        if target.kind.name != "cuda" or not isinstance(func, tirx.PrimFunc):
            return None
        if has_block(func, "group_sum"):
            params = {k: v for k, v in self.params.items()
                      if k in ("rows_per_thread", "threads_per_block", "threads_k", "unroll")}
            for r in dict.fromkeys((params.pop("rows_per_thread", 2), 2, 1)):
                try:
                    return cuda_group_gemv_schedule(func, rows_per_thread=r, **params)
                except Exception:  # noqa: BLE001
                    continue
            return None
        if not self.plain or not _is_gemv_func(func):
            return None
        words = self.params.get("words_per_thread", 4)
        threads = self.params.get("threads_k", 32)
        # narrower loads, then fewer threads per row, when K does not split evenly
        for tk in (threads, 16, 8):
            for w in (words, 2, 1):
                try:
                    return cuda_gemv_schedule(func, **{**self.params, "words_per_thread": w, "threads_k": tk})
                except Exception:
                    continue
        return None


# ------------------------------------------------------------------- the GEMV ladder

#: The decode GEMV, one idea at a time (notebook 06 shows the GPU's time for each).
#: ``course`` is the schedule the model uses (:class:`CudaGEMV`'s defaults).
CUDA_GEMV_LADDER = [
    {"name": "dlight", "form": "plain", "description": "stock dlight GEMV rule"},
    {"name": "course_plain", "form": "plain",
     "description": "course v1: a warp per row, one 16-byte load (a group) per thread per step"},
    {"name": "group_r1", "form": "group", "params": {"rows_per_thread": 1},
     "description": "group-sum form: nibbles by the magic-number trick, scale once per group"},
    {"name": "group_r2", "form": "group", "params": {"rows_per_thread": 2},
     "description": "+ two rows per thread (activations loaded once for both)"},
    {"name": "group_r4", "form": "group", "params": {"rows_per_thread": 4},
     "description": "four rows per thread (more registers, fewer threads: slower)"},
    {"name": "half2", "form": "half2", "params": {"rows_per_thread": 2},
     "description": "float16 pairs: two weights per LOP3 and HFMA2 (the course's device function)"},
    {"name": "course", "form": "half2", "params": {},
     "description": "the course's schedule as the model uses it (CudaGEMV defaults)"},
]


def schedule_gemv_variant(name: str, n: int, k: int, scheme: str, target) -> tirx.PrimFunc:
    """The decode GEMV for an (n, k) weight, scheduled as step ``name`` of
    :data:`CUDA_GEMV_LADDER`; a PrimFunc ready for ``tvm.compile``."""
    from .compile import gpu_rules
    from .quantization import decode_gemv_func

    variant = next((v for v in CUDA_GEMV_LADDER if v["name"] == name), None)
    if variant is None:
        raise ValueError(f"unknown GEMV variant {name!r}; known: {[v['name'] for v in CUDA_GEMV_LADDER]}")
    func = decode_gemv_func(n, k, scheme, form=variant["form"])
    if name == "dlight":
        rules = gpu_rules("dlight")
    elif name == "course_plain":
        rules = [CudaGEMV(plain=True)]
    else:
        rules = [CudaGEMV(**variant.get("params", {}))]
    with target:
        for rule in rules:
            sch = rule.apply(func, target, False)
            if isinstance(sch, list):
                sch = sch[0] if sch else None
            if sch is not None:
                return sch.mod["main"]
    raise ValueError(f"GEMV variant {name!r} does not apply to a {n}x{k} {scheme} weight")
