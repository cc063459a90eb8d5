"""The course's own schedules, written with TVM's schedule API (``tvm.s_tir.Schedule``).

``cpu_gemv_schedule`` schedules a decode-shaped linear (one row of activations times a
quantized weight) for the CPU:

* the output rows are split over the cores (``parallel``);
* the reduction over K is split into ``K/lanes`` steps of ``lanes`` consecutive elements
  and *rfactored*: each lane keeps its own partial sum, so the inner loop is a vector
  multiply-add over contiguous weights (LLVM may not reorder a float sum by itself);
* the ``lanes`` partial sums are added at the end of each row.

Stock dlight's CPU GEMV rule vectorises across output rows instead, which turns every weight
load into a strided gather (and made LLVM run for minutes on this model). The rule class
:class:`CpuGEMV` applies the schedule inside the pipeline; lab 5 asks students to write it.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl


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
                      unroll: int = 2) -> s_tir.Schedule:
    """Schedule a decode-shaped ``matmul`` block (b = s = 1) for the CPU; see module doc."""
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("matmul")
    _, _, j, k = sch.get_loops(block)
    k_dim = int(sch.get(k).extent)
    lanes = lanes if k_dim % lanes == 0 else 8 if k_dim % 8 == 0 else 1
    ko, ki = sch.split(k, factors=[None, lanes])
    partial = sch.rfactor(ki, factor_axis=3)  # partial sums, one per lane
    # partial block loops: b, s, j, ko, ki  ->  parallel rows, vector lanes innermost
    b, s, pj, pko, pki = sch.get_loops(partial)
    jo, ji = sch.split(pj, factors=[None, rows_per_task])
    sch.reorder(jo, ji, pko, pki)
    sch.parallel(sch.fuse(b, s, jo))
    sch.vectorize(pki)
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


class CpuGEMV(dl.ScheduleRule):
    """dlight rule wrapper so the pipeline applies :func:`cpu_gemv_schedule`."""

    def apply(self, func, target, _tunable):  # noqa: D401
        if not isinstance(func, tirx.PrimFunc) or not _is_gemv_func(func):
            return None
        try:
            return cpu_gemv_schedule(func)
        except Exception:
            return None
