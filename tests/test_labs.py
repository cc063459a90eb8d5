"""Lab checkers: the solutions pass, the stubs score 0 with 'not implemented yet', and the
typical wrong answers fail with the message that names the mistake. Also: the committed
lab notebooks match scripts/build_labs.py and are saved executed."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mlc_course import labs as L
from mlc_course.labs import silu

ROOT = Path(__file__).resolve().parent.parent
LAB_DIR = ROOT / "notebooks" / "labs"


def _builder():
    spec = importlib.util.spec_from_file_location("build_labs", ROOT / "scripts" / "build_labs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _builder()


def notebook_functions(lab: str, version: str) -> dict:
    """Run a lab notebook's code cells, except the check cell, and return its namespace."""
    nb = json.loads(BUILD.path(lab, version).read_text())
    ns: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "lab-check" not in cell["metadata"].get("tags", []):
            exec(compile("".join(cell["source"]), f"<{lab} {version}>", "exec"), ns)
    return ns


def solution(lab):
    ns = notebook_functions(lab, "solution")
    return tuple(ns[f] for f in L.LABS[lab].functions)


def messages(report, check):
    (c,) = [c for c in report.checks if c.name == check]
    assert not c.passed, f"{check} passed: {c.message}"
    return c.message


def assert_fails_saying(report, check, words):
    """``check`` failed and its message names every one of ``words``."""
    msg = messages(report, check)
    for w in words:
        assert w in msg, msg


# ----------------------------------------------------------------------------- all labs


@pytest.mark.parametrize("lab", ["lab1", "lab2", "lab3", "lab4"])
def test_solution_passes(lab):
    report = L.LABS[lab].checker(*solution(lab))
    assert report.passed, report.format()
    assert report.score == 1.0
    assert [c.name for c in report.checks] == list(L.LAB_CHECKS[lab])
    report.raise_if_failed()  # does not raise


def test_lab5_solution_passes():
    report = L.check_lab5(*solution("lab5"))
    assert report.passed, report.format()
    assert "of the reference's speed" in messages_passed(report, "speed")


def messages_passed(report, check):
    (c,) = [c for c in report.checks if c.name == check]
    assert c.passed, c.message
    return c.message


@pytest.mark.parametrize("lab", list(L.LABS))
def test_stub_scores_zero(lab):
    ns = notebook_functions(lab, "student")
    report = L.LABS[lab].checker(*(ns[f] for f in L.LABS[lab].functions))
    assert report.score == 0.0
    assert all("not implemented yet" in c.message for c in report.checks), report.format()
    with pytest.raises(AssertionError, match="not implemented yet"):
        report.raise_if_failed()


def test_report_roundtrip_and_weights():
    rep = L.failed_report("lab5", "crashed")
    assert [c.weight for c in rep.checks] == [1, 2, 1, 2]
    rep.checks[1].passed = True
    assert rep.score == pytest.approx(2 / 6)
    again = L.LabReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert again.score == rep.score and again.checks == rep.checks
    err = L.LabCheckFailed(rep)
    assert isinstance(err, AssertionError)
    assert err._render_traceback_()[0].startswith("LabCheckFailed: lab5")


def test_grade_namespace_missing_function(tmp_path):
    rep = L.grade_namespace("lab1", {"quantize_q4": lambda w: None}, tmp_path / "r.json")
    assert rep.score == 0 and "dequantize_q4 is not defined" in rep.checks[0].message
    assert json.loads((tmp_path / "r.json").read_text())["lab"] == "lab1"


# ----------------------------------------------------------------------------- lab 1


def make_quantize(reverse=False, offset=7, clip=True, rnd=np.round, f16=True, absmax=True,
                  div=7, zero_guard=True, s32div=False):
    """quantize_q4 with one typical mistake switched on."""
    def quantize_q4(w):
        w = np.asarray(w, dtype=np.float32)
        n, k = w.shape
        g = w.reshape(n, k // 32, 32)
        s32 = ((np.abs(g) if absmax else g).max(-1) / np.float32(div)).astype(np.float32)
        scale = s32.astype(np.float16) if f16 else s32
        s = (s32 if s32div else scale.astype(np.float32))[..., None]
        q = rnd(g / s) + offset
        q = np.where(s > 0, q, offset) if zero_guard else q
        q = np.clip(q, 0, 14) if clip else q
        q = np.nan_to_num(q).astype(np.int64).reshape(n, k // 8, 8) & 0xF
        qw = np.zeros((n, k // 8), np.uint32)
        for j in range(8):
            qw |= q[..., j].astype(np.uint32) << np.uint32(4 * (7 - j) if reverse else 4 * j)
        return qw, scale
    return quantize_q4


def dq_reversed(qw, qs):
    q = ((qw[..., None] >> (4 * np.arange(7, -1, -1, dtype=np.uint32))) & 0xF)
    q = q.reshape(qw.shape[0], -1, 32).astype(np.float32)
    return ((q - 7) * qs.astype(np.float32)[..., None]).reshape(qw.shape[0], -1)


def dq_no_offset(qw, qs):
    return L.Q.dequantize(qw, qs, "q4f16_1") + 7 * np.repeat(qs.astype(np.float32), 32, axis=1)


def dq_tile(qw, qs):
    q = ((qw[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).reshape(qw.shape[0], -1)
    return (q.astype(np.float32) - 7) * np.tile(qs.astype(np.float32), (1, 32))


LAB1_WRONG = [
    (dict(reverse=True), None, "nibble_order", ["element 0 → bits 28–31", "lowest nibble"]),
    (dict(offset=0), None, "quantized_values", ["without the +7 offset"]),
    (dict(offset=0, clip=False), None, "quantized_values", ["without the +7 offset"]),
    (dict(f16=False), None, "shapes_and_dtypes", ["q_scale is float32", "float16"]),
    (dict(f16=False), None, "quantized_values", ["divide by the float32 scale", "stored"]),
    (dict(s32div=True), None, "quantized_values", ["divide by the float32 scale"]),
    (dict(absmax=False), None, "scales", ["max|w|", "negative"]),
    (dict(div=8), None, "scales", ["max|w| / 8", "max|w| / 7"]),
    (dict(div=15), None, "scales", ["max|w| / 15"]),
    (dict(clip=False), None, "clip", ["clipped to 0..14", "subnormal", "17"]),
    (dict(rnd=lambda r: np.floor(r + 0.5)), None, "quantized_values", ["half to even", "2.5"]),
    (dict(rnd=np.trunc), None, "quantized_values", ["truncate"]),
    (dict(zero_guard=False), None, "zero_group", ["q = 7", "NaN"]),
    (dict(), dq_no_offset, "dequantize", ["subtract the offset", "(q − 7)"]),
    (dict(), dq_reversed, "dequantize", ["reverse order", "(word >> 4j) & 0xF"]),
    (dict(), dq_tile, "dequantize", ["np.tile"]),
]


@pytest.mark.parametrize("mistake, dequantize, check, words", LAB1_WRONG)
def test_lab1_wrong_answers(mistake, dequantize, check, words):
    _, dq = solution("lab1")
    report = L.check_lab1(make_quantize(**mistake), dequantize or dq)
    assert_fails_saying(report, check, words)
    assert report.score < 1


def test_lab1_isolates_mistakes():
    """A single mistake fails its own check, not every check."""
    q, dq = solution("lab1")
    report = L.check_lab1(make_quantize(clip=False), dq)
    assert [c.name for c in report.failures()] == ["clip"]
    report = L.check_lab1(make_quantize(rnd=lambda r: np.floor(r + 0.5)), dq)
    assert [c.name for c in report.failures()] == ["quantized_values"]
    report = L.check_lab1(make_quantize(div=8), dq)
    assert "fix the scales check first" in messages(report, "quantized_values")


# ----------------------------------------------------------------------------- lab 2


def tp_no_allreduce(x, shards, allreduce):
    return [s["down"] @ (silu(s["gate"] @ x) * (s["up"] @ x)) for s in shards]


def tp_after_column(x, shards, allreduce):
    h = allreduce([silu(s["gate"] @ x) * (s["up"] @ x) for s in shards])
    return [s["down"] @ hi for s, hi in zip(shards, h)]


def tp_twice(x, shards, allreduce):
    return allreduce(allreduce([s["down"] @ (silu(s["gate"] @ x) * (s["up"] @ x)) for s in shards]))


def shard_down_by_rows(wg, wu, wd, n):
    b, hb = wg.shape[0] // n, wd.shape[0] // n
    return [{"gate": wg[r * b:(r + 1) * b], "up": wu[r * b:(r + 1) * b], "down": wd[r * hb:(r + 1) * hb]}
            for r in range(n)]


def shard_mismatched_units(wg, wu, wd, n):
    b = wg.shape[0] // n
    return [{"gate": wg[r * b:(r + 1) * b], "up": wu[r * b:(r + 1) * b],
             "down": wd[:, (r + 1) % n * b:((r + 1) % n + 1) * b]} for r in range(n)]


LAB2_WRONG = [
    (None, tp_no_allreduce, "allreduce_count", ["never calls allreduce", "partial sum"]),
    (None, tp_no_allreduce, "output", ["own partial sum"]),
    (None, tp_after_column, "allreduce_placement", ["column-parallel", "different* hidden units"]),
    (None, tp_twice, "allreduce_count", ["2 times", "exactly one"]),
    (None, tp_twice, "output", ["2 times the right answer"]),
    (shard_down_by_rows, None, "shard_shapes", ["row-parallel", "axis 1"]),
    (shard_mismatched_units, None, "shard_contents", ["hidden units 0–15", "down: 16–31"]),
]


@pytest.mark.parametrize("shard, forward, check, words", LAB2_WRONG)
def test_lab2_wrong_answers(shard, forward, check, words):
    shard_ok, tp_ok = solution("lab2")
    report = L.check_lab2(shard or shard_ok, forward or tp_ok)
    assert_fails_saying(report, check, words)


# ----------------------------------------------------------------------------- lab 3


def make_ring(steps_per_phase=lambda n: n - 1, neighbour=1, rs_chunk=lambda r, s, n: (r - s - 1) % n,
              whole_buffers=False, all_gather=True):
    def ring_allreduce(bufs, net):
        n = len(bufs)
        chunks = [np.array_split(np.array(b, copy=True), n) for b in bufs]
        for s in range(steps_per_phase(n)):
            msgs = [(r, (r + neighbour) % n, rs_chunk(r, s, n),
                     np.concatenate(chunks[r]) if whole_buffers else chunks[r][rs_chunk(r, s, n)])
                    for r in range(n)]
            for _, dst, c, data in net.step(msgs):
                data = np.array_split(data, n)[c] if whole_buffers else data
                chunks[dst][c] = chunks[dst][c] + data
        for s in range(steps_per_phase(n) if all_gather else 0):
            msgs = [(r, (r + neighbour) % n, (r - s) % n, chunks[r][(r - s) % n]) for r in range(n)]
            for _, dst, c, data in net.step(msgs):
                chunks[dst][c] = data
        return [np.concatenate(ch) for ch in chunks]
    return ring_allreduce


def mirrored_ring(bufs, net):
    """A correct ring in the other direction, with its own chunk order: must pass."""
    n = len(bufs)
    chunks = [np.array_split(np.array(b, copy=True), n) for b in bufs]
    for s in range(n - 1):
        for _, dst, c, data in net.step([(r, (r - 1) % n, (r + s + 1) % n, chunks[r][(r + s + 1) % n])
                                         for r in range(n)]):
            chunks[dst][c] = chunks[dst][c] + data
    for s in range(n - 1):
        for _, dst, c, data in net.step([(r, (r - 1) % n, (r + s) % n, chunks[r][(r + s) % n])
                                         for r in range(n)]):
            chunks[dst][c] = data
    return [np.concatenate(ch) for ch in chunks]


LAB3_WRONG = [
    (make_ring(steps_per_phase=lambda n: n), None, "num_steps", ["N per phase", "N − 1"]),
    (make_ring(all_gather=False), None, "num_steps", ["all-gather"]),
    (make_ring(neighbour=2), None, "neighbours", ["rank 0 sent to rank 2", "(r + 1) % N"]),
    (make_ring(rs_chunk=lambda r, s, n: (r - s) % n), None, "chunk_schedule",
     ["must send chunk (r − s − 1) mod N", "you sent chunk 0"]),
    (make_ring(rs_chunk=lambda r, s, n: (r - s) % n), None, "result", ["differs from the sum"]),
    (make_ring(whole_buffers=True), None, "bytes_sent", ["whole 96 B buffer", "144 B per rank"]),
    (None, lambda n, b: (2 * n, 2 * (n - 1) / n * b), "cost_formula", ["N per phase", "6 steps"]),
    (None, lambda n, b: (2 * (n - 1), 2 * b), "cost_formula", ["2 × nbytes"]),
    (None, lambda n, b: (2 * (n - 1), (n - 1) / n * b), "cost_formula", ["only the reduce-scatter"]),
    (None, lambda n, b: (2 * (n - 1), 2 * (n - 1) * b), "cost_formula", ["not the whole buffer"]),
]


@pytest.mark.parametrize("ring, cost, check, words", LAB3_WRONG)
def test_lab3_wrong_answers(ring, cost, check, words):
    ring_ok, cost_ok = solution("lab3")
    report = L.check_lab3(ring or ring_ok, cost or cost_ok)
    assert_fails_saying(report, check, words)


def test_lab3_accepts_the_mirrored_ring():
    report = L.check_lab3(mirrored_ring, solution("lab3")[1])
    assert report.passed, report.format()


# ----------------------------------------------------------------------------- lab 4


def make_shard_layer(mistake):
    shard_ok = solution("lab4")[0]

    def shard_layer(layer, cfg, n):
        out = shard_ok(layer, cfg, n)
        d, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q, k, v = np.split(layer["qkv_proj"], [h * d, (h + kv) * d])
        for r in range(n):
            if mistake == "qkv_one_block":
                out[r]["qkv_proj"] = np.split(layer["qkv_proj"], n)[r]
            elif mistake == "kv_strided":
                pick = lambda a: a.reshape(kv, d, -1)[r::n].reshape(-1, a.shape[1])  # noqa: E731
                out[r]["qkv_proj"] = np.concatenate([np.split(q, n)[r], pick(k), pick(v)])
            elif mistake == "gate_up_one_block":
                out[r]["gate_up_proj"] = np.split(layer["gate_up_proj"], n)[r]
            elif mistake == "o_proj_other_heads":
                out[r]["o_proj"] = np.split(layer["o_proj"], n, axis=1)[(r + 1) % n]
            elif mistake == "down_by_rows":
                out[r]["down_proj"] = np.split(layer["down_proj"], n, axis=0)[r]
        return out
    return shard_layer


def make_counts(kv=True, groups=True, mlp=True, hidden=False):
    def find_shard_counts(cfg, group_size=1, max_n=64):
        q, f, out = cfg.num_heads * cfg.head_dim, cfg.intermediate_size, []
        for n in range(1, max_n + 1):
            ok = cfg.num_heads % n == 0 and (not kv or cfg.num_kv_heads % n == 0)
            ok &= (not mlp or f % n == 0) and (not hidden or cfg.hidden_size % n == 0)
            ok &= not groups or ((q // n) % group_size == 0 and (f // n) % group_size == 0)
            out += [n] if ok else []
        return out
    return find_shard_counts


LAB4_WRONG = [
    (make_shard_layer("qkv_one_block"), None, "qkv_by_head_groups",
     ["one block", "Q heads 0–3, then K heads 0–1, then V heads 0–1"]),
    (make_shard_layer("kv_strided"), None, "qkv_by_head_groups", ["K heads 0, 2", "KV head i // 2"]),
    (make_shard_layer("gate_up_one_block"), None, "gate_up_segments", ["one block", "up units none"]),
    (make_shard_layer("o_proj_other_heads"), None, "o_proj_columns", ["Q heads 0–3", "Q heads 4–7"]),
    (make_shard_layer("down_by_rows"), None, "down_proj_columns", ["row-parallel", "axis 1"]),
    (None, make_counts(kv=False), "shard_counts", ["n=16", "KV heads"]),
    (None, make_counts(groups=False), "shard_counts", ["groups of 32", "quantization groups"]),
    (None, make_counts(mlp=False), "shard_counts", ["MLP width"]),
    (None, make_counts(hidden=True), "shard_counts", ["left out n=", "hidden size"]),
]


@pytest.mark.parametrize("shard, counts, check, words", LAB4_WRONG)
def test_lab4_wrong_answers(shard, counts, check, words):
    shard_ok, counts_ok = solution("lab4")
    report = L.check_lab4(shard or shard_ok, counts or counts_ok)
    assert_fails_saying(report, check, words)


# ----------------------------------------------------------------------------- lab 5


def test_lab5_unscheduled_and_broken():
    import tvm

    fast = dict(shape=(4096, 4096), rounds=3, measure_bandwidth=False)
    report = L.check_lab5(lambda func: tvm.s_tir.Schedule(func), **fast)
    assert "unchanged" in messages(report, "returns_schedule")
    assert "one core" in messages(report, "parallel")
    msg = messages(report, "speed")
    assert "of the reference's speed (needs ≥ 40%)" in msg and "no vectorized loop" in msg
    assert report.score == pytest.approx(2 / 6)  # only 'correct' (weight 2 of 6)

    def no_return(func):
        tvm.s_tir.Schedule(func)

    assert "return sch" in messages(L.check_lab5(no_return, **fast), "correct")

    def bad(func):
        sch = tvm.s_tir.Schedule(func)
        sch.vectorize(sch.get_loops(sch.get_sblock("matmul"))[3])  # the reduction loop
        return sch

    assert "ScheduleError" in messages(L.check_lab5(bad, **fast), "correct")


# ----------------------------------------------------------------------------- notebooks


@pytest.mark.parametrize("version", ["student", "solution"])
@pytest.mark.parametrize("lab", list(L.LABS))
def test_notebooks_match_builder_and_are_executed(lab, version):
    saved = json.loads(BUILD.path(lab, version).read_text())
    built = BUILD.build(lab, version)
    assert saved["metadata"]["mlc_course"] == {"lab": lab, "version": version}
    assert len(saved["cells"]) == len(built["cells"])
    for s, b in zip(saved["cells"], built["cells"]):
        assert "".join(s["source"]) == "".join(b["source"]), "run scripts/build_labs.py --execute"
        assert s["metadata"].get("tags", []) == b["metadata"].get("tags", [])
    code = [c for c in saved["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code), "notebook saved unexecuted"
    errors = [(c["metadata"].get("tags"), o["ename"]) for c in code for o in c["outputs"]
              if o["output_type"] == "error"]
    # students see the check cell's report, as a failure, and nothing else fails
    assert errors == ([(["lab-check"], "LabCheckFailed")] if version == "student" else [])
    assert BUILD.path(lab, version).name == L.LABS[lab].notebook
