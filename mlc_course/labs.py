"""Checkers for the classroom labs in ``notebooks/labs/``.

Each lab asks the student to write one or two functions; ``check_labN(...)`` runs them on
random and edge cases, compares with the package's reference (``quantization``,
``collectives``, ``sharding``, ``schedules``) and returns a :class:`LabReport`: one
:class:`Check` per thing a correct answer must get right, each with a message written for the
student ("element 0 must be in the lowest nibble; yours landed in bits 28-31"), and a score.

The check cell of a lab notebook is::

    report = check_lab1(quantize_q4, dequantize_q4)
    report.raise_if_failed()

``raise_if_failed`` prints the report when every check passes and otherwise raises
:class:`LabCheckFailed` (an ``AssertionError``) that shows the same report, without a
Python traceback, in Jupyter.

Every lab has a fixed list of checks, so that a grade table has the same columns for every
student: an unfinished stub (``NotImplementedError``) fails each check with "not implemented
yet" and scores 0. :func:`grade_namespace` is what the grader (:mod:`mlc_course.grading`)
runs inside an executed notebook.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import collectives as C
from . import quantization as Q
from . import sharding as S
from .config import LlamaConfig, get_preset

__all__ = [
    "Check", "LabReport", "LabCheckFailed", "LABS", "LabSpec", "grade_namespace",
    "check_lab1", "check_lab2", "check_lab3", "check_lab4", "check_lab5",
    "silu", "mlp_reference", "RingNet", "LAB4_CONFIG", "random_layer",
    "gemv_prim_func", "time_kernels",
]


# =============================================================================================
# Reports
# =============================================================================================

@dataclass
class Check:
    """One thing the student's answer must get right."""

    name: str
    passed: bool
    message: str
    weight: float = 1.0


class LabCheckFailed(AssertionError):
    """Raised by :meth:`LabReport.raise_if_failed`; Jupyter shows only the report."""

    def __init__(self, report: "LabReport"):
        self.report = report
        super().__init__(report.format() + "\nFix the checks marked ✗ and run this cell again.")

    def _render_traceback_(self) -> list[str]:  # IPython: show this instead of a traceback
        return ["LabCheckFailed: " + line if i == 0 else line
                for i, line in enumerate(str(self).splitlines())]


@dataclass(repr=False)
class LabReport:
    """The result of one lab's checker: per-check pass/fail with messages, and a score."""

    lab: str
    title: str
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, passed: bool, message: str, weight: float = 1.0) -> None:
        self.checks.append(Check(name, bool(passed), message, weight))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def score(self) -> float:
        """Weighted fraction of the checks that passed, 0..1."""
        total = sum(c.weight for c in self.checks)
        return sum(c.weight for c in self.checks if c.passed) / total if total else 0.0

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def format(self, width: int = 100) -> str:
        n_ok = sum(c.passed for c in self.checks)
        lines = [f"{self.lab} · {self.title}: {n_ok}/{len(self.checks)} checks passed, "
                 f"score {self.score:.0%}"]
        name_w = max((len(c.name) for c in self.checks), default=0)
        prev = None
        for c in self.checks:
            head = f"  {'✓' if c.passed else '✗'} {c.name:<{name_w}}  "
            same = c.message == prev and not c.passed
            prev = c.message
            body = ["(same as above)"] if same else textwrap.wrap(c.message, width - len(head)) or [""]
            lines.append(head + body[0])
            lines += [" " * len(head) + b for b in body[1:]]
        return "\n".join(lines)

    __str__ = format

    def __repr__(self) -> str:
        return self.format()

    def raise_if_failed(self) -> None:
        """Print the report if every check passed, else raise :class:`LabCheckFailed`."""
        if not self.passed:
            raise LabCheckFailed(self)
        print(self.format())

    def to_dict(self) -> dict:
        return {"lab": self.lab, "title": self.title, "score": self.score,
                "passed": self.passed, "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, d: dict) -> "LabReport":
        return cls(d["lab"], d["title"], [Check(**c) for c in d["checks"]])


# =============================================================================================
# Running student code
# =============================================================================================

class _NotImplemented(Exception):
    def __init__(self, fn_name: str):
        super().__init__(fn_name)
        self.fn_name = fn_name


class _StudentError(Exception):
    """A problem with what the student's code did; the message is for the student."""


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", "your function")


def _call(fn: Callable, *args, **kwargs):
    """Run student code: NotImplementedError and crashes become messages, warnings are
    silenced (so a NumPy 'invalid value in divide' does not clutter the check cell)."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except NotImplementedError:
        raise _NotImplemented(_name(fn)) from None
    except Exception as e:  # noqa: BLE001 - anything the student's code raises
        raise _StudentError(f"{_name(fn)} raised {type(e).__name__}: {_error_text(e)}") from None


def _error_text(e: Exception) -> str:
    """The line of an exception worth showing: TVM's schedule errors put the IR first and the
    reason on a line of its own."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Error message:"):
            return ln[len("Error message:"):].strip()[:400]
    return lines[0][:300] if lines else ""


def _run_checks(lab: str, fns: dict[str, Callable[[], tuple[bool, str]]]) -> LabReport:
    """Run the checks of ``lab`` (names and order from :data:`LAB_CHECKS`)."""
    assert set(fns) == set(LAB_CHECKS[lab]), "checker and LAB_CHECKS disagree"
    report = LabReport(lab, LABS[lab].title)
    for name in LAB_CHECKS[lab]:
        try:
            ok, msg = fns[name]()
        except _NotImplemented as e:
            ok, msg = False, (f"{e.fn_name} is not implemented yet (it raises NotImplementedError): "
                              f"write it in the cell marked YOUR CODE HERE, run that cell, then "
                              f"this one.")
        except _StudentError as e:
            ok, msg = False, str(e)
        except Exception as e:  # noqa: BLE001 - a value the checker could not even look at
            ok, msg = False, f"could not check this: {type(e).__name__}: {str(e)[:300]}"
        report.add(name, ok, msg, _weight(lab, name))
    return report


def _ranges(idx: Sequence[int]) -> str:
    """[0, 1, 2, 3, 8, 9] -> '0–3, 8–9'."""
    idx = list(idx)
    if not idx:
        return "none"
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}–{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def _array(x, what: str) -> np.ndarray:
    if x is None:
        raise _StudentError(f"{what} is None: did you forget a return statement?")
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001
        raise _StudentError(f"{what} is a {type(x).__name__}, not an array") from None


def _same_shape(a: np.ndarray, shape: tuple, what: str) -> None:
    if tuple(a.shape) != tuple(shape):
        raise _StudentError(f"{what} has shape {tuple(a.shape)}, expected {tuple(shape)}")


# =============================================================================================
# Lab 1: q4f16_1 quantization
# =============================================================================================

LAB1_SCHEME = "q4f16_1"
_SHIFTS = 4 * np.arange(8, dtype=np.uint32)


def _lab1_weights(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Normal weights whose groups differ in magnitude, with a negative outlier in some
    groups (so that max(w) and max|w| differ)."""
    rng = np.random.default_rng(seed)
    n, k = shape
    w = rng.standard_normal((n, k)).astype(np.float32)
    w *= (10.0 ** rng.uniform(-3, 1, size=(n, k // 32, 1))).repeat(32, axis=2).reshape(n, k).astype(np.float32)
    g = w.reshape(n, k // 32, 32)
    g[:, ::2, 5] = -3 * np.abs(g[:, ::2]).max(axis=-1)  # a negative extreme in every other group
    return w


def _unpack(words: np.ndarray, perm: Sequence[int] | None = None) -> np.ndarray:
    """Unpack uint32 words; element j read from nibble ``perm[j]`` (default: nibble j)."""
    shifts = _SHIFTS if perm is None else 4 * np.asarray(perm, dtype=np.uint32)
    w = np.asarray(words).astype(np.uint32)
    return ((w[..., None] >> shifts) & np.uint32(0xF)).reshape(*w.shape[:-1], -1).astype(np.int64)


def _q_values(w: np.ndarray, rounding=np.round, offset: int = 7, clip: bool = True,
              scale32: bool = False, round_after_offset: bool = False) -> np.ndarray:
    """q of MLC's formula, or a variant of it (to recognise typical mistakes)."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32).astype(np.float32)
    s = (np.abs(g).max(-1) / np.float32(7)).astype(np.float32)
    if not scale32:
        s = s.astype(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        r = g / s[..., None]
        q = rounding(r + offset) if round_after_offset else rounding(r) + offset
        q = np.where(s[..., None] > 0, q, offset)
    if clip:
        q = np.clip(q, 0, 14)
    return q.reshape(n, k).astype(np.int64)


def _scales_match(qs: np.ndarray, w: np.ndarray) -> bool:
    """The student's scales equal the reference once cast to float16 (the dtype is checked
    elsewhere)."""
    ref = Q.quantize(w, LAB1_SCHEME)[1].astype(np.float32)
    return np.array_equal(np.asarray(qs).astype(np.float16).astype(np.float32), ref)


def _quantize(fn, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = _call(fn, w.copy())
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise _StudentError(f"{_name(fn)} must return a pair (q_weight, q_scale); "
                            f"it returned {type(out).__name__}")
    qw, qs = _array(out[0], "q_weight"), _array(out[1], "q_scale")
    n, k = w.shape
    _same_shape(qw, (n, k // 8), "q_weight")
    _same_shape(qs, (n, k // 32), "q_scale")
    if not np.issubdtype(qw.dtype, np.integer):
        raise _StudentError(f"q_weight holds {qw.dtype} values; it must hold uint32 words")
    return qw.astype(np.uint32), qs


def _nibble_case() -> tuple[np.ndarray, np.ndarray]:
    """A weight whose eight values in each word are distinct q values (scale exactly 1/8),
    so where each element landed can be read off the student's words."""
    n, k = 2, 64
    t = np.arange(k // 8)[None, :, None] + 5 * np.arange(n)[:, None, None]
    q = ((3 * t + np.arange(8)[None, None, :]) % 15).reshape(n, k)
    for row in q:  # every group of 32 needs a ±7 (q = 0 or 14) so that scale = 1/8 exactly
        for g in range(k // 32):
            if not np.isin(row[32 * g:32 * g + 32], (0, 14)).any():
                row[32 * g] = 14
    w = ((q - 7) * 0.125).astype(np.float32)
    return w, q


def _find_perm(words: np.ndarray, q: np.ndarray) -> list[int] | None:
    """Nibble position of each element j (same for all words), or None if there is none."""
    nib = _unpack(words).reshape(-1, 8)   # nib[word, position]
    want = q.reshape(-1, 8)               # want[word, element]
    perm = []
    for j in range(8):
        pos = [p for p in range(8) if np.array_equal(nib[:, p], want[:, j])]
        if not pos:
            return None
        perm.append(pos[0])
    return perm if len(set(perm)) == 8 else None


def _student_perm(fn) -> list[int] | None:
    """Where the student's quantize puts element j (None when it can't be told)."""
    try:
        w, q = _nibble_case()
        qw, _ = _quantize(fn, w)
        return _find_perm(qw, q)
    except (_StudentError, _NotImplemented):
        return None


def check_lab1(quantize_q4: Callable, dequantize_q4: Callable) -> LabReport:
    """Lab 1: ``quantize_q4(w) -> (q_weight, q_scale)`` and ``dequantize_q4(q_weight,
    q_scale) -> w`` in MLC's exact q4f16_1 format."""

    def shapes_and_dtypes():
        for shape in [(1, 32), (5, 96), (4, 256)]:
            w = _lab1_weights(shape, seed=1)
            out = _call(quantize_q4, w.copy())
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                return False, (f"quantize_q4 must return a pair (q_weight, q_scale); it returned "
                               f"{type(out).__name__}")
            qw, qs = _array(out[0], "q_weight"), _array(out[1], "q_scale")
            n, k = shape
            if qw.shape != (n, k // 8):
                return False, (f"for w of shape {shape}, q_weight has shape {qw.shape}; it must "
                               f"be (N, K/8) = {(n, k // 8)}: eight 4-bit values per uint32 word")
            if qw.dtype != np.uint32:
                return False, (f"q_weight is {qw.dtype}; it must be uint32 (np.uint32), one "
                               f"32-bit word per eight weights")
            if qs.shape != (n, k // 32):
                return False, (f"for w of shape {shape}, q_scale has shape {qs.shape}; it must be "
                               f"(N, K/32) = {(n, k // 32)}: one scale per group of 32 consecutive "
                               f"weights of a row")
            if qs.dtype != np.float16:
                return False, (f"q_scale is {qs.dtype}; q4f16_1 stores scales as float16: compute "
                               f"max|w|/7 in float32, then .astype(np.float16)")
            wd = _array(_call(dequantize_q4, qw, qs), "dequantize_q4's result")
            if wd.shape != shape or wd.dtype != np.float32:
                return False, (f"dequantize_q4 returned {wd.dtype}{list(wd.shape)}; it must return "
                               f"float32 of the weight's shape {shape}")
        return True, ("q_weight (N, K/8) uint32, q_scale (N, K/32) float16 and a float32 (N, K) "
                      "dequantized weight, for shapes (1, 32), (5, 96), (4, 256)")

    def scales():
        w = _lab1_weights((6, 256), seed=2)
        _, qs = _quantize(quantize_q4, w)
        got = qs.astype(np.float16).astype(np.float32)
        ref = Q.quantize(w, LAB1_SCHEME)[1].astype(np.float32)
        if np.array_equal(got, ref):
            return True, "scale = max|w| / 7 per group of 32, stored as float16"
        g = w.reshape(6, 8, 32)
        f16 = lambda a: a.astype(np.float32).astype(np.float16).astype(np.float32)  # noqa: E731
        alts = {
            "no_abs": (f16(g.max(-1) / 7), "a scale must use the largest *magnitude*, max|w|: in "
                       "every other group the extreme weight is negative, and your scale comes "
                       "from max(w). Use np.abs(group).max() / 7."),
            "strided": (f16(np.abs(w.reshape(6, 32, 8)).max(1) / 7),
                        "a group is 32 *consecutive* weights of a row (columns 0–31, 32–63, ...), "
                        "not every (K/32)-th column: reshape a row to (K/32, 32), not (32, K/32)."),
        }
        for div in (8, 7.5, 15, 16, 14, 1):
            alts[f"div{div}"] = (f16(np.abs(g).max(-1) / div),
                                 f"your scales are max|w| / {div:g}; the scale must be max|w| / 7, "
                                 f"so that the largest weight maps to ±7.")
        for got_alt, msg in alts.values():
            if np.allclose(got, got_alt, rtol=2e-3, atol=0):
                return False, msg
        i, gi = np.argwhere(got != ref)[0]
        return False, (f"row {i}, group {gi}: max|w| / 7 = {np.abs(g[i, gi]).max() / 7:.6g}, stored as "
                       f"float16 {ref[i, gi]:.6g}; your scale is {got[i, gi]:.6g}. Compute "
                       f"max|w| / 7 in float32 over each group of 32, then cast to float16.")

    def quantized_values():
        perm = _student_perm(quantize_q4)
        halves = np.array([1.75, -1.75] + [x * 0.25 for x in np.arange(-6.5, 7, 1.0)] + [0.0] * 16,
                          dtype=np.float32)[:32]  # scale 0.25: w/scale are exact halves
        rng = np.random.default_rng(3)
        w = np.concatenate([np.tile(halves, (2, 8)), _lab1_weights((62, 256), seed=3)], axis=0)
        w = w[rng.permutation(64)]
        qw, qs = _quantize(quantize_q4, w)
        if not _scales_match(qs, w):
            return False, "q values follow from the scales: fix the scales check first."
        got = _unpack(qw, perm)
        ref = _q_values(w)
        if np.array_equal(got, ref):
            return True, ("q = clip(round(w / scale) + 7, 0, 14), dividing by the stored float16 "
                          "scale, rounding half to even")
        no_offset = ("your q values look like round(w / scale) without the +7 offset: q must be "
                     "round(w / scale) + 7, in 0..14, so that −7..7 fits in 4 unsigned bits "
                     "(without it −3 wraps to 13, or is clipped to 0).")
        alts = [
            (_q_values(w, offset=0, clip=False) & 0xF, no_offset),
            (_q_values(w, offset=0), no_offset),
            (_q_values(w, rounding=lambda r: np.floor(r + 0.5)),
             "w / scale = 2.5 must round to 2 and 3.5 to 4 (np.round rounds half to even); you "
             "round halves up, like floor(x + 0.5). Use np.round."),
            (_q_values(w, rounding=np.trunc),
             "you truncate w / scale toward zero (e.g. with .astype(int)); it must be rounded to "
             "the nearest integer with np.round first."),
            (_q_values(w, rounding=np.floor), "you round w / scale down (floor); use np.round."),
            (_q_values(w, rounding=np.ceil), "you round w / scale up (ceil); use np.round."),
            (_q_values(w, round_after_offset=True),
             "you round after adding 7, round(w / scale + 7): halves then round the other way "
             "(2.5 + 7 = 9.5 rounds to 10, not 2 + 7 = 9). Round w / scale first, then add 7."),
            (_q_values(w, scale32=True),
             "you divide by the float32 scale; divide by the scale as *stored*, i.e. after the "
             "cast to float16 (s16 = (max|w|/7).astype(np.float16); w / s16.astype(np.float32)), "
             "or dequantizing will not give back the nearest grid point."),
        ]
        for alt, msg in alts:
            if np.array_equal(got, alt):
                return False, msg
        i, j = np.argwhere(got != ref)[0]
        s = Q.quantize(w, LAB1_SCHEME)[1][i, j // 32]
        return False, (f"row {i}, column {j}: w = {w[i, j]:.6g}, stored scale = {float(s):.6g}, "
                       f"w / scale = {w[i, j] / np.float32(s):.4f}, so q = clip(round(w / scale) + 7, "
                       f"0, 14) = {ref[i, j]}; you stored {got[i, j]}.")

    def nibble_order():
        w, q = _nibble_case()
        qw, qs = _quantize(quantize_q4, w)
        if not _scales_match(qs, w):
            return False, "this check needs scales = max|w| / 7: fix the scales check first."
        want = Q.pack_nibbles(q)
        if np.array_equal(qw, want):
            return True, "element j of each word sits in bits 4j..4j+3 (element 0 in the lowest nibble)"
        # the packing may be right around wrong values: try the values of typical mistakes too
        for values in (q, (q - 7) & 0xF, np.clip(q - 7, 0, 14), np.clip(q + 7, 0, 15)):
            perm = _find_perm(qw, values)
            if perm is not None:
                break
        if perm == list(range(8)):
            return True, ("element j of each word sits in bits 4j..4j+3 (but the values are wrong: "
                          "see quantized_values)")
        if perm is not None:
            where = ", ".join(f"element {j} → bits {4 * p}–{4 * p + 3}" for j, p in enumerate(perm))
            hint = (" (you filled the word from the top: element 0 goes in the lowest nibble, "
                    "word |= q[j] << (4 * j))" if perm == list(range(7, -1, -1)) else "")
            return False, (f"element j of a group of eight must sit in bits 4j..4j+3 (element 0 in "
                           f"the lowest nibble, element 1 in bits 4–7, ...). In your words: {where}"
                           f"{hint}.")
        i, t = np.argwhere(qw != want)[0]
        return False, (f"row {i}, word {t} holds q values {q[i, 8 * t:8 * t + 8].tolist()} (elements "
                       f"{8 * t}..{8 * t + 7}) and must be 0x{int(want[i, t]):08x}, element 0 in the "
                       f"lowest hex digit; yours is 0x{int(qw[i, t]):08x}. Word t of a row holds "
                       f"elements 8t..8t+7, element j shifted left by 4j bits.")

    def zero_group():
        w = _lab1_weights((2, 64), seed=4)
        w[0, 32:] = 0
        w[1] = 0
        qw, qs = _quantize(quantize_q4, w)
        perm = _student_perm(quantize_q4)
        got_q = _unpack(qw, perm)
        zero = np.zeros((2, 64), bool)
        zero[0, 32:] = zero[1] = True
        s = qs.astype(np.float32)
        bad_s = [float(x) for x in (s[0, 1], s[1, 0], s[1, 1]) if x != 0]
        if bad_s:
            return False, (f"an all-zero group must get scale 0; yours got {bad_s[0]:g}. (max|w| "
                           f"is 0, so max|w| / 7 is 0.)")
        if not (got_q[zero] == 7).all():
            other = sorted(set(got_q[zero].tolist()) - {7})
            return False, (f"an all-zero group must store q = 7 for every weight (so that it "
                           f"dequantizes to (7 − 7) × 0 = 0); yours stored {other[:4]}. Dividing "
                           f"by a zero scale gives NaN: use np.where(scale > 0, ..., 7) or "
                           f"divide by a safe scale."
                           + (" (q = 0: is the +7 offset missing?)" if other == [0] else ""))
        return True, "all-zero groups get scale 0 and q = 7"

    def clip():
        tiny = np.float32(2.0 ** -24)  # the smallest float16 (a subnormal)
        ramp = np.linspace(-9.8, 9.8, 32, dtype=np.float32)
        w = (np.stack([ramp, ramp[::-1]]) * tiny).astype(np.float32)
        qw, qs = _quantize(quantize_q4, w)
        if not _scales_match(qs, w):
            return False, "this check needs scales = max|w| / 7 stored as float16: fix the scales check first."
        got = _unpack(qw, _student_perm(quantize_q4))
        unclipped = _q_values(w, clip=False)
        out = (unclipped < 0) | (unclipped > 14)  # the weights that need the clip
        if np.array_equal(got, _q_values(w, scale32=True)):
            return False, ("with these tiny weights your q values come from dividing by the "
                           "float32 scale (see quantized_values); fix that first.")
        if not np.array_equal(got[~out], unclipped[~out]):
            return False, ("the weights that need no clipping already come out wrong here: fix "
                           "quantized_values first.")
        if (got[out] == np.clip(unclipped[out], 0, 14)).all() and (got <= 14).all():
            return True, "values are clipped to 0..14"
        s32 = float(np.abs(w).max() / 7)
        return False, (f"q must be clipped to 0..14. With tiny weights (max|w| = {np.abs(w).max():.3g}) "
                       f"max|w| / 7 = {s32:.3g} is a float16 subnormal and rounds *down* to "
                       f"{float(np.float16(s32)):.3g}, so w / scale reaches ±9.8 and round(w / scale) "
                       f"+ 7 gives {int(unclipped.max())} (and {int(unclipped.min())}), which does not "
                       f"fit in 4 bits: use np.clip(..., 0, 14).")

    def dequantize():
        w = _lab1_weights((8, 128), seed=5)
        w[3, :32] = 0
        qw, qs = Q.quantize(w, LAB1_SCHEME)
        got = _array(_call(dequantize_q4, qw.copy(), qs.copy()), "dequantize_q4's result")
        _same_shape(got, w.shape, "dequantize_q4's result")
        ref = Q.dequantize(qw, qs, LAB1_SCHEME)
        if got.dtype != np.float32:
            return False, f"dequantize_q4 returned {got.dtype}; it must return float32"
        if np.array_equal(got, ref):
            return True, "w = (q − 7) × scale, bit for bit"
        q = _unpack(qw).astype(np.float32)
        s = qs.astype(np.float32)
        alts = [
            (q * s.repeat(32, axis=1), "you forgot to subtract the offset: w = (q − 7) × scale."),
            ((_unpack(qw, range(7, -1, -1)) - 7) * s.repeat(32, axis=1),
             "you read the nibbles in reverse order: element j of a word is (word >> 4j) & 0xF, "
             "element 0 in the lowest nibble."),
            ((q - 7) * np.tile(s, (1, 32)),
             "the scale of column j is q_scale[:, j // 32] (np.repeat(q_scale, 32, axis=1)); "
             "np.tile repeats the whole row of scales instead."),
            ((q - 8) * s.repeat(32, axis=1), "the offset is 7, not 8: w = (q − 7) × scale."),
        ]
        for alt, msg in alts:
            if np.allclose(got, alt, rtol=1e-6, atol=0):
                return False, msg
        i, j = np.argwhere(got != ref)[0]
        return False, (f"row {i}, column {j}: q = {int(q[i, j])}, scale = {float(s[i, j // 32]):.6g}, "
                       f"so w = (q − 7) × scale = {ref[i, j]:.6g}; yours is {got[i, j]:.6g}.")

    def round_trip():
        worst = None
        for shape, seed in [((1, 32), 6), ((16, 256), 7)]:
            w = _lab1_weights(shape, seed)
            qw, qs = _quantize(quantize_q4, w)
            wd = _array(_call(dequantize_q4, qw, qs), "dequantize_q4's result")
            _same_shape(wd, shape, "dequantize_q4's result")
            s = np.abs(w.reshape(shape[0], -1, 32)).max(-1) / 7
            bound = (s * 0.5 * (1 + 2.0 ** -9)).repeat(32, axis=1) + 1e-12
            err = np.abs(wd.astype(np.float64) - w)
            if not (err <= bound).all():
                i, j = np.unravel_index(np.argmax(err / bound), err.shape)
                worst = (f"dequantize_q4(*quantize_q4(w)) should be within half a grid step "
                         f"(scale / 2 = {bound[i, j]:.3g}) of w; row {i}, column {j}: w = "
                         f"{w[i, j]:.6g}, you give back {float(wd[i, j]):.6g}.")
                break
        if worst:
            return False, worst
        return True, "every weight comes back within half a grid step (scale / 2)"

    return _run_checks("lab1", {
        "shapes_and_dtypes": shapes_and_dtypes, "scales": scales,
        "quantized_values": quantized_values, "nibble_order": nibble_order,
        "zero_group": zero_group, "clip": clip, "dequantize": dequantize, "round_trip": round_trip})


# =============================================================================================
# Lab 2: a tensor-parallel MLP on simulated ranks
# =============================================================================================

def silu(v: np.ndarray) -> np.ndarray:
    """SiLU, Llama's MLP activation: v · sigmoid(v)."""
    return v / (np.float32(1) + np.exp(-v))


def mlp_reference(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """Llama's MLP on one token: down(silu(gate x) * up x). Weights are (out, in)."""
    return w_down @ (silu(w_gate @ x) * (w_up @ x))


def _lab2_weights(h: int = 16, f: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal(s).astype(np.float32) / np.sqrt(s[1]) for s in [(f, h), (f, h), (h, f)]]
    return ws, rng.standard_normal(h).astype(np.float32)


def _ref_shard_mlp(w_gate, w_up, w_down, n):
    col, row = S.ShardSpec("column"), S.ShardSpec("row")
    parts = zip(S.shard_array(w_gate, col, n), S.shard_array(w_up, col, n), S.shard_array(w_down, row, n))
    return [{"gate": g, "up": u, "down": d} for g, u, d in parts]


class _RecordingAllReduce:
    """The all-reduce handed to the student's ``tp_mlp``: records every call."""

    def __init__(self):
        self.calls: list[list[np.ndarray]] = []

    def __call__(self, bufs):
        bufs = [np.array(b, copy=True) for b in bufs]
        self.calls.append(bufs)
        return C.ring_allreduce(bufs)


def _row_index(full: np.ndarray, part: np.ndarray) -> list[int | None]:
    """For each row of ``part``, the row of ``full`` it equals (None if none)."""
    lookup = {full[i].tobytes(): i for i in range(full.shape[0])}
    part = np.ascontiguousarray(np.asarray(part, dtype=full.dtype))
    return [lookup.get(part[i].tobytes()) for i in range(part.shape[0])]


def check_lab2(shard_mlp: Callable, tp_mlp: Callable) -> LabReport:
    """Lab 2: ``shard_mlp(w_gate, w_up, w_down, n) -> [ {"gate", "up", "down"} per rank ]``
    and ``tp_mlp(x, shards, allreduce) -> [output per rank]``."""
    h, f = 16, 32
    (wg, wu, wd), x = _lab2_weights(h, f)

    def student_shards(n):
        out = _call(shard_mlp, wg.copy(), wu.copy(), wd.copy(), n)
        if not isinstance(out, (list, tuple)) or len(out) != n:
            raise _StudentError(f"shard_mlp(..., n={n}) must return a list of {n} dicts, one per "
                                f"rank; got {type(out).__name__}"
                                + (f" of length {len(out)}" if hasattr(out, "__len__") else ""))
        for r, d in enumerate(out):
            if not isinstance(d, dict) or not {"gate", "up", "down"} <= set(d):
                raise _StudentError(f"rank {r}'s shard must be a dict with keys 'gate', 'up', 'down'")
        return [{k: _array(d[k], f"rank {r}'s {k}") for k in ("gate", "up", "down")}
                for r, d in enumerate(out)]

    def run(n, seed=0):
        shards = _ref_shard_mlp(wg, wu, wd, n)
        ar = _RecordingAllReduce()
        out = _call(tp_mlp, x.copy(), [dict(s) for s in shards], ar)
        if not isinstance(out, (list, tuple)) or len(out) != n:
            raise _StudentError(f"tp_mlp must return a list with one output per rank ({n}); got "
                                f"{type(out).__name__}")
        return [_array(o, f"rank {r}'s output") for r, o in enumerate(out)], ar, shards

    def shard_shapes():
        for n in (2, 4):
            shards = student_shards(n)
            b = f // n
            for r, s in enumerate(shards):
                if s["gate"].shape != (b, h) or s["up"].shape != (b, h):
                    bad = "gate" if s["gate"].shape != (b, h) else "up"
                    hint = (" You split the input dimension: gate and up are column-parallel, "
                            "split their output rows (axis 0)." if s[bad].shape == (f, h // n) else "")
                    return False, (f"n={n}: rank {r}'s {bad} has shape {s[bad].shape}; it must be "
                                   f"(F/n, H) = {(b, h)}.{hint}")
                if s["down"].shape != (h, b):
                    hint = (" You split down_proj's output rows: it is row-parallel, split its "
                            "input dimension (axis 1, the F hidden units) so that each rank only "
                            "needs its own hidden units." if s["down"].shape == (h // n, f) else "")
                    return False, (f"n={n}: rank {r}'s down has shape {s['down'].shape}; it must be "
                                   f"(H, F/n) = {(h, b)}.{hint}")
        return True, "gate/up (F/n, H) and down (H, F/n) on each rank"

    def shard_contents():
        for n in (2, 4):
            shards = student_shards(n)
            b = f // n
            if any(s["gate"].shape != (b, h) or s["up"].shape != (b, h) or s["down"].shape != (h, b)
                   for s in shards):
                return False, "the shards have the wrong shapes: fix shard_shapes first."
            for r, s in enumerate(shards):
                want = list(range(r * b, (r + 1) * b))
                units = {"gate": _row_index(wg, s["gate"]), "up": _row_index(wu, s["up"]),
                         "down": _row_index(wd.T.copy(), np.asarray(s["down"]).T)}
                if all(u == want for u in units.values()):
                    continue
                desc = "; ".join(f"{k}: {_ranges([i for i in u if i is not None])}"
                                 + (" (+ rows not in the weight)" if None in u else "")
                                 for k, u in units.items())
                return False, (f"n={n}: rank {r} must own hidden units {_ranges(want)} in gate, up "
                               f"(rows) and down (columns) alike, so that it can finish "
                               f"silu(gate x) * up x for those units and feed them to its slice of "
                               f"down; yours holds {desc}.")
        return True, "rank r owns hidden units r·F/n..(r+1)·F/n in gate, up and down"

    def allreduce_count():
        for n in (2, 4):
            _, ar, _ = run(n)
            if len(ar.calls) == 1:
                continue
            if not ar.calls:
                return False, (f"n={n}: tp_mlp never calls allreduce. After the row-parallel down "
                               f"projection each rank holds only a partial sum (over its F/n hidden "
                               f"units) of the output; the ranks must add them up with one "
                               f"all-reduce.")
            return False, (f"n={n}: tp_mlp calls allreduce {len(ar.calls)} times per forward pass; "
                           f"a column-then-row parallel MLP needs exactly one, after the down "
                           f"projection.")
        return True, "one all-reduce per forward pass"

    def allreduce_placement():
        n = 4
        _, ar, shards = run(n)
        if not ar.calls:
            return False, "no all-reduce to look at (see allreduce_count)"
        partials = [s["down"] @ (silu(s["gate"] @ x) * (s["up"] @ x)) for s in shards]
        for bufs in ar.calls:
            shapes = {np.shape(b) for b in bufs}
            if shapes == {(f // n,)}:
                return False, (f"you all-reduce the output of the column-parallel layer (shape "
                               f"{(f // n,)}): those are *different* hidden units on each rank, "
                               f"not partial sums, and adding them mixes unrelated units. "
                               f"Column-parallel needs no communication: apply silu and the "
                               f"product locally, and all-reduce after the down projection.")
            if len(bufs) == n and all(np.array_equal(bufs[0], b) for b in bufs[1:]):
                return False, ("you all-reduce a value that every rank already holds in full "
                               "(all ranks passed the same buffer): that only multiplies it by N. "
                               "All-reduce the partial outputs of the down projection.")
        bufs = ar.calls[-1]
        if len(bufs) == n and all(np.shape(b) == (h,) and np.allclose(b, p, rtol=1e-5, atol=1e-6)
                                  for b, p in zip(bufs, partials)):
            return True, "the all-reduce sums the partial outputs of the row-parallel down projection"
        return False, (f"the all-reduce should receive each rank's partial output "
                       f"down_r @ (silu(gate_r @ x) * (up_r @ x)), shape {(h,)}; it received "
                       f"{[np.shape(b) for b in bufs]} that are not those partials.")

    def output():
        ref = mlp_reference(x, wg, wu, wd)
        for n in (1, 2, 4):
            outs, ar, shards = run(n)
            for r, o in enumerate(outs):
                if o.shape != ref.shape:
                    return False, f"n={n}: rank {r} returned shape {o.shape}, expected {ref.shape}"
                if np.allclose(o, ref, rtol=1e-5, atol=1e-5):
                    continue
                msg = (f"n={n}: rank {r}'s output differs from the unsharded MLP by up to "
                       f"{np.abs(o - ref).max():.3g}.")
                part = shards[r]["down"] @ (silu(shards[r]["gate"] @ x) * (shards[r]["up"] @ x))
                if n > 1 and np.allclose(o, part, rtol=1e-5, atol=1e-5):
                    msg += (" It equals that rank's own partial sum: return the all-reduced "
                            "result, not the partial.")
                elif np.allclose(o, n * ref, rtol=1e-5, atol=1e-5):
                    msg += f" It is {n} times the right answer: something replicated got summed."
                return False, msg
        return True, "every rank's output equals the unsharded MLP for n = 1, 2, 4"

    def ranks_agree():
        outs, _, _ = run(4)
        if all(o.tobytes() == outs[0].tobytes() for o in outs[1:]):
            return True, "all ranks hold bitwise the same output"
        close = all(np.allclose(o, outs[0], rtol=1e-5, atol=1e-6) for o in outs[1:])
        return False, (("ranks' outputs differ in the last bits" if close else
                        "ranks return different outputs")
                       + ": every rank must end with exactly the same numbers (take them from the "
                         "all-reduce), or greedy decoding on the ranks can diverge.")

    return _run_checks("lab2", {
        "shard_shapes": shard_shapes, "shard_contents": shard_contents,
        "allreduce_count": allreduce_count, "allreduce_placement": allreduce_placement,
        "output": output, "ranks_agree": ranks_agree})


# =============================================================================================
# Lab 3: ring all-reduce
# =============================================================================================

class RingNet:
    """A simulated network of ``n`` ranks that records every message.

    ``net.step(messages)`` is one time step of the collective: every message
    ``(src, dst, chunk, data)`` is sent at the same time and delivered as a *copy*; it returns
    the delivered messages ``(src, dst, chunk, data_copy)`` in the same order. ``chunk`` is the
    index of the piece of the buffer being sent (bookkeeping, so that the trace is readable).
    ``net.trace`` is a :class:`mlc_course.collectives.CommStats`: ``num_steps``,
    ``bytes_sent_per_rank``, ``format()``.
    """

    def __init__(self, n: int):
        self.n = n
        self.trace = C.CommStats(n=n)

    def step(self, messages, phase: str = "step"):
        delivered, sends = [], []
        for m in messages:
            if len(m) != 4:
                raise ValueError("a message is (src, dst, chunk, data)")
            src, dst, chunk, data = m
            src, dst, chunk = int(src), int(dst), int(chunk)
            if not (0 <= src < self.n and 0 <= dst < self.n):
                raise ValueError(f"rank {src} -> {dst}: ranks are 0..{self.n - 1}")
            data = np.array(data, copy=True)
            sends.append(C.Send(src, dst, chunk, int(data.nbytes)))
            delivered.append((src, dst, chunk, data))
        self.trace.record(phase, sends)
        return delivered


def _ring_ref_chunk(r: int, s: int, n: int, direction: int) -> int:
    """Chunk rank r sends at global step s of the course's ring (``direction`` +1 = right)."""
    if s < n - 1:   # reduce-scatter
        return (r - s - 1) % n if direction == 1 else (r + s + 1) % n
    s -= n - 1      # all-gather
    return (r - s) % n if direction == 1 else (r + s) % n


def check_lab3(ring_allreduce: Callable, ring_allreduce_cost: Callable) -> LabReport:
    """Lab 3: ``ring_allreduce(bufs, net) -> [result per rank]`` (``net`` a :class:`RingNet`)
    and ``ring_allreduce_cost(n, nbytes) -> (num_steps, bytes_sent_per_rank)``."""

    def run(n, length, dtype=np.int64, seed=0):
        rng = np.random.default_rng(seed + 31 * n + length)
        bufs = [(rng.integers(-100, 100, length) if dtype == np.int64
                 else rng.standard_normal(length)).astype(dtype) for _ in range(n)]
        net = RingNet(n)
        out = _call(ring_allreduce, [b.copy() for b in bufs], net)
        if not isinstance(out, (list, tuple)) or len(out) != n:
            raise _StudentError(f"ring_allreduce must return a list with one array per rank ({n}); "
                                f"got {type(out).__name__}")
        return bufs, [_array(o, f"rank {r}'s result") for r, o in enumerate(out)], net

    def direction(net) -> int:
        dsts = [(s.dst - s.src) % net.n for step in net.trace.steps for s in step]
        return -1 if dsts and all(d == net.n - 1 for d in dsts) and net.n > 2 else 1

    def wrong_neighbour(net) -> str | None:
        d = direction(net)
        for i, step in enumerate(net.trace.steps):
            for m in step:
                if m.dst != (m.src + d) % net.n:
                    return (f"with N={net.n}, at step {i + 1} rank {m.src} sent to rank {m.dst}; "
                            f"in a ring each rank sends only to its right neighbour (r + 1) % N = "
                            f"{(m.src + 1) % net.n}.")
        return None

    def first_deviation(net) -> str | None:
        n, d = net.n, direction(net)
        for i, step in enumerate(net.trace.steps[:2 * (n - 1)]):
            phase, s = ("reduce-scatter", i) if i < n - 1 else ("all-gather", i - n + 1)
            for m in step:
                want = _ring_ref_chunk(m.src, i, n, d)
                if m.chunk != want:
                    formula = ("(r − s − 1) mod N" if phase == "reduce-scatter" else "(r − s) mod N")
                    if d == -1:
                        formula = formula.replace("−", "+")
                    why = ("the partial sum it received in the previous step, plus its own part"
                           if phase == "reduce-scatter" else "the finished chunk it received last")
                    left = (" — or keep your chunk order and send to the right neighbour "
                            "(r + 1) % N, as the course's ring does" if d == -1 else "")
                    return (f"with N={n}, {phase} step {s + 1} (s = {s}): rank {m.src} must send "
                            f"chunk {formula} = {want} ({why}); you sent chunk {m.chunk}{left}.")
        return None

    def result():
        for n, length in [(4, 12), (2, 8), (3, 7), (4, 10), (5, 3), (6, 30), (1, 5)]:
            bufs, out, net = run(n, length)
            want = np.sum(bufs, axis=0)
            for r, o in enumerate(out):
                if o.shape != want.shape or not np.array_equal(o, want):
                    bad = (np.flatnonzero(o != want) if o.shape == want.shape else [])
                    where = f" at elements {_ranges(list(bad))}" if len(bad) else f" (shape {o.shape})"
                    msg = (f"with N={n} rank{'s' if n > 1 else ''} and {length} elements, rank "
                           f"{r}'s result differs from the sum{where}.")
                    dev, nb = first_deviation(net), wrong_neighbour(net)
                    if net.trace.num_steps != 2 * (n - 1):
                        msg += f" You took {net.trace.num_steps} step(s) (see num_steps)."
                    elif nb:
                        msg += " " + nb
                    elif dev:
                        msg += " " + dev
                    return False, msg
        return True, "every rank ends with the elementwise sum (N = 1..6, lengths divisible by N or not)"

    def same_on_every_rank():
        _, out, _ = run(4, 1000, np.float32)
        if all(o.tobytes() == out[0].tobytes() for o in out[1:]):
            return True, "float results are bitwise identical on every rank"
        if not all(o.shape == out[0].shape and np.allclose(o, out[0], rtol=1e-4, atol=1e-4)
                   for o in out[1:]):
            return False, "the ranks end with different results (see result)."
        return False, ("the ranks' float results differ in the last bits: each chunk must be "
                       "added up once, on one rank, and then copied to the others (all-gather), "
                       "never re-summed in another order.")

    def num_steps():
        for n in (2, 3, 4, 5):
            _, _, net = run(n, 4 * n)
            k = net.trace.num_steps
            if k == 2 * (n - 1):
                continue
            if k == 2 * n:
                return False, (f"with N={n} you took {k} steps = N per phase; each phase needs "
                               f"N − 1 steps: after N − 1 hops a chunk has visited all N ranks "
                               f"(one more step adds a rank's part twice).")
            if k == n - 1:
                return False, (f"with N={n} you took only N − 1 = {k} step(s): a ring all-reduce is "
                               f"a reduce-scatter (N − 1 steps) followed by an all-gather (N − 1 "
                               f"steps).")
            return False, f"with N={n} a ring all-reduce takes 2(N − 1) = {2 * (n - 1)} steps; you took {k}."
        return True, "2(N − 1) steps: N − 1 of reduce-scatter, N − 1 of all-gather"

    def neighbours():
        for n in (3, 4, 5):
            _, _, net = run(n, 4 * n)
            for i, step in enumerate(net.trace.steps):
                senders = [m.src for m in step]
                for r in set(senders):
                    if senders.count(r) > 1:
                        return False, (f"with N={n}, at step {i + 1} rank {r} sent "
                                       f"{senders.count(r)} messages; in a ring step every rank "
                                       f"sends exactly one chunk, to its neighbour.")
                if sorted(senders) != list(range(n)):
                    return False, (f"with N={n}, at step {i + 1} only ranks {sorted(set(senders))} "
                                   f"sent; in every ring step all N ranks send at once.")
            nb = wrong_neighbour(net)
            if nb:
                return False, nb
        return True, "each step, every rank sends one chunk to its ring neighbour"

    def chunk_schedule():
        bad = []
        for n, length in [(3, 9), (4, 12), (5, 15)]:
            bufs, out, net = run(n, length)
            dev = first_deviation(net)
            ok = all(np.array_equal(o, np.sum(bufs, axis=0)) for o in out)
            if dev and not ok:
                return False, dev
            if dev:
                bad.append(n)
        if bad:
            return True, ("your chunk order differs from the course's (r − s − 1, then r − s) "
                          "but your ring is correct")
        return True, "reduce-scatter sends chunk (r − s − 1) mod N, all-gather chunk (r − s) mod N"

    def bytes_sent():
        # lengths divisible by N: every chunk has the same size, so every rank of any correct
        # ring sends the same bytes; otherwise only the total is fixed (which rank sends the
        # short chunks depends on the chunk order)
        for n, length in [(4, 12), (3, 9), (5, 10), (4, 10), (3, 7)]:
            bufs, _, net = run(n, length)
            ref = C.CommStats()
            C.ring_allreduce(bufs, ref)
            got, want = net.trace.bytes_sent_per_rank, ref.bytes_sent_per_rank
            if got == want or (length % n and sum(got) == sum(want)):
                continue
            nb = bufs[0].nbytes
            r = int(np.argmax(np.array(got) != np.array(want)))
            msg = (f"with N={n} and a {nb} B buffer, rank {r} sent {got[r]} B; a ring all-reduce "
                   f"sends each chunk (about nbytes / N) once per step, "
                   f"2(N − 1)/N × {nb} ≈ {want[r]} B per rank.")
            sizes = {m.nbytes for step in net.trace.steps for m in step}
            if nb in sizes:
                msg += f" Some of your messages carry the whole {nb} B buffer: send one chunk per step."
            elif sum(got) == sum(want) and length % n:
                msg += (" The total is right, so your chunks are cut differently: cut every buffer "
                        "with np.array_split(buf, N), as collectives.chunk_bounds does.")
            return False, msg
        return True, "each rank sends 2(N − 1)/N of the buffer, one chunk per step"

    def cost_formula():
        for n in (4, 2, 3, 5, 6, 7, 8, 1):
            nbytes = 1024 * n
            out = _call(ring_allreduce_cost, n, nbytes)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                return False, "ring_allreduce_cost must return a pair (num_steps, bytes_sent_per_rank)"
            steps, sent = out
            want_steps, want_sent = 2 * (n - 1), 2 * (n - 1) / n * nbytes
            if steps != want_steps:
                hint = {2 * n: " (N per phase: each phase needs N − 1 steps)",
                        n - 1: " (that is only the reduce-scatter; the all-gather takes N − 1 more)",
                        n: " (one phase of N steps?)"}.get(steps, "")
                return False, (f"N={n}: a ring all-reduce takes 2(N − 1) = {want_steps} steps; your "
                               f"formula says {steps}{hint}.")
            if not np.isclose(float(sent), want_sent, rtol=1e-9):
                alts = {2 * nbytes: "2 × nbytes: the chunks are nbytes / N each, and there are "
                                    "2(N − 1) of them, not 2",
                        (n - 1) * nbytes: "(N − 1) × nbytes: that is whole buffers, once per "
                                          "step of one phase",
                        2 * (n - 1) * nbytes: "2(N − 1) × nbytes: each step sends one chunk "
                                              "(nbytes / N), not the whole buffer",
                        (n - 1) / n * nbytes: "(N − 1)/N × nbytes: that is only the "
                                              "reduce-scatter; the all-gather sends as much again"}
                hint = next((v for k, v in alts.items() if np.isclose(float(sent), k)), "")
                return False, (f"N={n}, nbytes={nbytes}: each rank sends 2(N − 1)/N × nbytes = "
                               f"{want_sent:g} B; your formula says {float(sent):g}"
                               + (f" = {hint}." if hint else "."))
        return True, "num_steps = 2(N − 1), bytes per rank = 2(N − 1)/N × nbytes (N = 1..8)"

    return _run_checks("lab3", {
        "result": result, "same_on_every_rank": same_on_every_rank, "num_steps": num_steps,
        "neighbours": neighbours, "chunk_schedule": chunk_schedule, "bytes_sent": bytes_sent,
        "cost_formula": cost_formula})


# =============================================================================================
# Lab 4: sharding a Llama layer
# =============================================================================================

#: A small GQA layer for lab 4: 8 query heads share 4 KV heads (2 query heads per KV head).
LAB4_CONFIG = LlamaConfig("lab4-gqa", vocab_size=64, hidden_size=32, intermediate_size=48,
                          num_layers=1, num_heads=8, num_kv_heads=4, head_dim=4)
LAB4_KEYS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj",
             "input_layernorm", "post_attention_layernorm")


def random_layer(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """One layer's weights (fused, as the model stores them), random float32, (out, in)."""
    rng = np.random.default_rng(seed)
    shapes = dict(cfg.linear_shapes_per_layer())
    shapes["input_layernorm"] = shapes["post_attention_layernorm"] = (cfg.hidden_size,)
    return {k: rng.standard_normal(shapes[k]).astype(np.float32) for k in LAB4_KEYS}


def _ref_shard_layer(layer, cfg, n):
    out = [{} for _ in range(n)]
    for k, a in layer.items():
        for r, part in enumerate(S.shard_array(a, S.shard_spec(f"layers.0.{k}.weight", cfg), n)):
            out[r][k] = part
    return out


def check_lab4(shard_layer: Callable, find_shard_counts: Callable) -> LabReport:
    """Lab 4: ``shard_layer(layer, cfg, n) -> [dict per worker]`` (keys as
    :func:`random_layer`) and ``find_shard_counts(cfg, group_size=1, max_n=64) -> [n, ...]``."""
    cases = [(LAB4_CONFIG, n) for n in (1, 2, 4)]
    cases += [(LAB4_CONFIG.with_(name="lab4-gqa-2kv", num_kv_heads=2), 2)]  # 4 Q heads per KV head

    def student(cfg, n):
        layer = random_layer(cfg, seed=n)
        out = _call(shard_layer, {k: v.copy() for k, v in layer.items()}, cfg, n)
        if not isinstance(out, (list, tuple)) or len(out) != n:
            raise _StudentError(f"shard_layer(..., n={n}) must return a list of {n} dicts, one per "
                                f"worker; got {type(out).__name__}")
        for r, d in enumerate(out):
            missing = [k for k in LAB4_KEYS if not isinstance(d, dict) or k not in d]
            if missing:
                raise _StudentError(f"worker {r}'s dict lacks {missing}")
        return layer, [{k: _array(d[k], f"worker {r}'s {k}") for k in LAB4_KEYS}
                       for r, d in enumerate(out)]

    def shapes():
        for cfg, n in cases:
            layer, got = student(cfg, n)
            ref = _ref_shard_layer(layer, cfg, n)
            for r in range(n):
                for k in LAB4_KEYS:
                    if got[r][k].shape != ref[r][k].shape:
                        kind = S.shard_spec(f"layers.0.{k}.weight", cfg).kind
                        why = {"column": "column-parallel: split the output rows (axis 0)",
                               "row": "row-parallel: split the input columns (axis 1)",
                               "replicated": "replicated: every worker keeps the whole vector"}[kind]
                        return False, (f"{cfg.name}, n={n}: worker {r}'s {k} has shape "
                                       f"{got[r][k].shape}, expected {ref[r][k].shape} ({k} is {why}).")
        return True, "every worker's weights have the right shapes"

    def describe_qkv(cfg, rows):
        d, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        seg = []
        for i in rows:
            if i is None:
                seg.append(("?", -1))
            elif i < h * d:
                seg.append(("Q", i // d))
            elif i < (h + kv) * d:
                seg.append(("K", (i - h * d) // d))
            else:
                seg.append(("V", (i - (h + kv) * d) // d))
        parts, cur = [], None
        for s, hd in seg:
            if cur and cur[0] == s:
                if hd not in cur[1]:
                    cur[1].append(hd)
            else:
                cur = (s, [hd])
                parts.append(cur)
        return ", then ".join("rows that are not in the weight" if s == "?"
                              else f"{s} head{'s' if len(hs) > 1 else ''} {_ranges(hs)}"
                              for s, hs in parts)

    def first_wrong(key):
        """The first case where a worker's ``key`` differs from the reference sharding:
        (cfg, n, worker, the unsharded layer, the student's shards, the reference shards)."""
        for cfg, n in cases:
            layer, got = student(cfg, n)
            ref = _ref_shard_layer(layer, cfg, n)
            for r in range(n):
                g = got[r][key]
                if not (g.shape == ref[r][key].shape and np.array_equal(g, ref[r][key])):
                    return cfg, n, r, layer, got, ref
        return None

    def first_wrong_rows(key):
        """For a fused, row-split weight: (cfg, n, worker, the rows it must hold, the rows it
        holds, whether the student cut the fused weight as one block), or None."""
        wrong = first_wrong(key)
        if wrong is None:
            return None
        cfg, n, r, layer, got, ref = wrong
        full = layer[key]
        blocks = np.split(full, n, axis=0)
        one_block = all(np.array_equal(got[q][key], blocks[q]) for q in range(n))
        return cfg, n, r, _row_index(full, ref[r][key]), _row_index(full, got[r][key]), one_block

    def qkv_by_head_groups():
        wrong = first_wrong_rows("qkv_proj")
        if wrong is None:
            return True, "fused QKV split per segment by head groups: worker r has its Q heads and their KV heads"
        cfg, n, r, want, have, one_block = wrong
        per = cfg.num_heads // cfg.num_kv_heads
        msg = (f"{cfg.name}, n={n}: worker {r} must hold {describe_qkv(cfg, want)}, in this order (query head "
               f"i attends with KV head i // {per}, so a worker's KV heads are those of its "
               f"query heads); yours holds {describe_qkv(cfg, have)}.")
        if one_block:
            msg += (" You cut the fused [Q; K; V] weight as one block: split each of the "
                    "three segments (Q, K, V) n ways and stack worker r's pieces.")
        return False, msg

    def columns_check(key, what):
        def check():
            wrong = first_wrong(key)
            if wrong is None:
                return True, f"{key} split by input columns, matching {what}"
            cfg, n, r, layer, got, ref = wrong
            g = got[r][key]
            if g.shape != ref[r][key].shape:
                return False, (f"{cfg.name}, n={n}: worker {r}'s {key} has shape {g.shape}, "
                               f"expected {ref[r][key].shape}: {key} is row-parallel, so it "
                               f"keeps all output rows and splits its input columns (axis 1).")
            full = layer[key]
            cols = _row_index(full.T.copy(), g.T) if g.ndim == 2 and g.shape[0] == full.shape[0] else None
            unit = cfg.head_dim if key == "o_proj" else 1
            name = "Q heads" if key == "o_proj" else "MLP units"
            want = _ranges(sorted({i // unit for i in _row_index(full.T.copy(), ref[r][key].T)}))
            have = ("columns that are not columns of the weight" if cols is None or None in cols
                    else f"the columns of {name} {_ranges(sorted({i // unit for i in cols}))}")
            return False, (f"{cfg.name}, n={n}: {key} is row-parallel: worker r keeps all "
                           f"output rows and the input columns of {what} — worker {r}: "
                           f"{name} {want}; yours has {have}.")
        return check

    def describe_gate_up(cfg, rows):
        f = cfg.intermediate_size
        gate = [i for i in rows if i is not None and i < f]
        up = [i - f for i in rows if i is not None and i >= f]
        return f"gate units {_ranges(gate)} and up units {_ranges(up)}"

    def gate_up_segments():
        wrong = first_wrong_rows("gate_up_proj")
        if wrong is None:
            return True, "fused gate/up split per segment: worker r has the same units of gate and up"
        cfg, n, r, want, have, one_block = wrong
        msg = (f"{cfg.name}, n={n}: worker {r} must hold {describe_gate_up(cfg, want)} (gate rows first, "
               f"then the same units of up: silu(gate) * up pairs them unit by unit); yours holds "
               f"{describe_gate_up(cfg, have)}.")
        if one_block:
            msg += (" You cut the fused [gate; up] weight as one block: split each of the "
                    "two segments n ways.")
        return False, msg

    def replicated_norms():
        for cfg, n in cases:
            layer, got = student(cfg, n)
            for r in range(n):
                for k in ("input_layernorm", "post_attention_layernorm"):
                    if not np.array_equal(got[r][k], layer[k]):
                        return False, (f"{cfg.name}, n={n}: worker {r}'s {k} must be the whole "
                                       f"vector (norms are replicated: each worker normalises the "
                                       f"full hidden state).")
        return True, "norm weights replicated on every worker"

    def shard_counts():
        cfgs = [get_preset(p) for p in ("tiny", "smollm2-135m", "llama2-70b", "codellama-34b")]
        cfgs += [LAB4_CONFIG, LlamaConfig("narrow-mlp", 100, 64, 96, 1, 16, 16, 16)]
        # MLP width 36 and hidden size 30 (not a multiple of 4): unquantized only
        odd = LlamaConfig("odd-sizes", 30, 30, 36, 1, 8, 8, 4)
        for group in (1, 32):
            scheme = "q4f16_1" if group == 32 else None
            for cfg in cfgs + ([odd] if group == 1 else []):
                want = S.valid_shard_counts(cfg, scheme, limit=64)
                got = _call(find_shard_counts, cfg, group_size=group, max_n=64)
                try:
                    got = sorted({int(v) for v in got})
                except TypeError:
                    return False, f"find_shard_counts must return a list of ints; got {type(got).__name__}"
                if got == want:
                    continue
                label = f"{cfg.name}" + (" with 4-bit weights in groups of 32" if group > 1 else "")
                extra = [v for v in got if v not in want]
                if extra:
                    v = extra[0]
                    for what, size, unit in S.shard_constraints(cfg, scheme):
                        if v < 1 or size % v or (size // v) % unit:
                            per = (f" ({size}/{v} = {size / v:g} per worker is not a whole number "
                                   f"of {unit}-wide quantization groups)" if unit > 1 and size % v == 0
                                   else "")
                            return False, (f"{label}: n={v} is not a valid shard count: its {what} = "
                                           f"{size} does not split {v} ways{per}. Valid: {want}.")
                    return False, f"{label}: n={v} is not a valid shard count. Valid: {want}."
                v = [x for x in want if x not in got][0]
                cons = "; ".join(f"{what} = {size}" for what, size, _ in S.shard_constraints(cfg, scheme))
                return False, (f"{label}: you left out n={v}, which splits every sharded dimension "
                               f"evenly ({cons}). Only what gets split must divide: the hidden size, "
                               f"vocabulary and layer count never are. Valid: {want}.")
        return True, ("valid shard counts for tiny, smollm2-135m, llama2-70b, codellama-34b and "
                      "three small models, unquantized and in groups of 32")

    return _run_checks("lab4", {
        "shapes": shapes, "qkv_by_head_groups": qkv_by_head_groups,
        "o_proj_columns": columns_check("o_proj", "the worker's own Q heads"),
        "gate_up_segments": gate_up_segments,
        "down_proj_columns": columns_check("down_proj", "the worker's own MLP units"),
        "replicated_norms": replicated_norms, "shard_counts": shard_counts})


# =============================================================================================
# Lab 5: a CPU schedule for the decode GEMV
# =============================================================================================

LAB5_SCHEME = "q4f32_1"  # f32 scales: float16 math is slow to compile and run on this CPU
LAB5_SHAPE = (22016, 4096)  # Llama-2-7B's fused gate/up projection: 56 MB in q4f32_1


def gemv_prim_func(n: int, k: int, scheme: str = LAB5_SCHEME):
    """The decode GEMV ``y = x @ W.T`` (x: (1, 1, K) float32, W (N, K) stored in ``scheme``)
    as the course's model writes it: one TE op whose block is named ``"matmul"``, with the
    dequantize inside the reduction. Returns a ``tvm.tirx.PrimFunc`` (unscheduled)."""
    from tvm import te

    scheme_ = Q.get_scheme(scheme)
    x = te.placeholder((1, 1, k), "float32", name="x")
    qw = te.placeholder((n, k // 8), "uint32", name="q_weight")
    qs = te.placeholder((n, k // scheme_.group_size), scheme_.float_dtype, name="q_scale")
    y = Q.te_linear(x, (qw, qs), scheme, "float32")
    return te.create_prim_func([x, qw, qs, y])


def _as_module(out, what: str):
    import tvm
    from tvm import s_tir, tirx

    if isinstance(out, s_tir.Schedule):
        return out.mod
    if isinstance(out, tvm.IRModule):
        return out
    if isinstance(out, tirx.PrimFunc):
        return tvm.IRModule({"main": out})
    raise _StudentError(f"{what} must return the tvm.s_tir.Schedule it worked on (return sch); "
                        f"it returned {type(out).__name__}")


def _build(mod):
    import tvm

    from .compile import cpu_target

    try:
        return tvm.compile(mod, target=cpu_target())
    except Exception as e:  # noqa: BLE001
        raise _StudentError(f"the scheduled function does not compile: {type(e).__name__}: "
                            f"{_error_text(e)}") from None


def _gemv_data(n: int, k: int, seed: int, real: bool):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 1, k)).astype(np.float32)
    if real:
        qw, qs = Q.quantize(rng.standard_normal((n, k)).astype(np.float32), LAB5_SCHEME)
    else:  # any bits: the speed of the kernel does not depend on the values
        qw = rng.integers(0, 2 ** 32, size=(n, k // 8), dtype=np.uint32)
        qs = rng.uniform(1e-3, 1e-2, size=(n, k // 32)).astype(np.float32)
    return x, qw, qs


def _run_gemv(lib, x, qw, qs):
    import tvm

    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, qw, qs)]
    out = tvm.runtime.empty((1, 1, qw.shape[0]), "float32", dev)
    lib["main"](*args, out)
    return out.numpy(), (lambda: lib["main"](*args, out))


def time_kernels(fns: dict[str, Callable[[], object]], rounds: int = 7, calls: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (a slow spell of a shared
    machine then hits every kernel alike). Each round takes the best of ``calls`` calls (one
    call for a function slower than 50 ms: that is long enough to average the noise)."""
    n_calls = {}
    for name, fn in fns.items():  # warm up: page in the weights, start the thread pool
        t0 = time.perf_counter()
        fn()
        n_calls[name] = 1 if time.perf_counter() - t0 > 0.05 else calls
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            best = float("inf")
            for _ in range(n_calls[name]):
                t0 = time.perf_counter()
                fns[name]()
                best = min(best, time.perf_counter() - t0)
            times[name].append(best)
    return {k: float(np.median(v)) for k, v in times.items()}


#: lab 5 passes when the student's kernel runs at least this fraction of the speed of the
#: course's reference schedule (``schedules.cpu_gemv_schedule``) measured in the same run.
#: The kernel is compute-bound on the nibble unpacking, not at the memory bandwidth: on the
#: course's 2-core machine the reference reads ~5 GB/s of ~26 GB/s. Timed under load, a
#: split + rfactor + vectorize schedule without parallel or unroll reached 75-80% of the
#: reference, 8 lanes instead of 16 about 50%, the unscheduled kernel ~6-10%: 40% tells
#: the working schedules from the broken ones with room for a noisy, shared machine.
LAB5_MIN_FRACTION_OF_REFERENCE = 0.4


def check_lab5(schedule_gemv: Callable, shape: tuple[int, int] = LAB5_SHAPE, rounds: int = 5,
               min_fraction: float = LAB5_MIN_FRACTION_OF_REFERENCE, measure_bandwidth: bool = True
               ) -> LabReport:
    """Lab 5: ``schedule_gemv(func) -> tvm.s_tir.Schedule`` for the decode GEMV of
    :func:`gemv_prim_func`. Checks results on small and odd shapes, a parallel loop, and the
    speed on ``shape`` against the reference schedule timed in the same run."""
    import tvm
    import tvm_ffi

    from .schedules import cpu_gemv_schedule

    state: dict = {}

    def scheduled(n, k):
        key = (n, k)
        if key not in state:
            func = gemv_prim_func(n, k)
            state[key] = _as_module(_call(schedule_gemv, func), _name(schedule_gemv))
        return state[key]

    def returns_schedule():
        mod = scheduled(256, 512)
        base = tvm.IRModule({"main": gemv_prim_func(256, 512)})
        if tvm_ffi.structural_equal(mod, base):
            return False, ("schedule_gemv returned the function unchanged: split, rfactor, "
                           "parallel and vectorize its loops (see the hints in the lab).")
        return True, "schedule_gemv returns a transformed schedule"

    def correct():
        for n, k in [(256, 512), (100, 352)]:
            lib = _build(scheduled(n, k))
            x, qw, qs = _gemv_data(n, k, seed=n, real=True)
            y, _ = _run_gemv(lib, x, qw, qs)
            ref = x[0, 0] @ Q.dequantize(qw, qs, LAB5_SCHEME).T
            if not np.allclose(y[0, 0], ref, rtol=1e-4, atol=1e-3):
                bad = np.flatnonzero(~np.isclose(y[0, 0], ref, rtol=1e-4, atol=1e-3))
                return False, (f"N={n}, K={k}: outputs {_ranges(list(bad[:20]))}"
                               f"{'...' if len(bad) > 20 else ''} differ from x @ W.T (max error "
                               f"{np.abs(y[0, 0] - ref).max():.3g})"
                               + (" — N=100 is not a multiple of 8 or 16: does your split assume "
                                  "it is?" if n == 100 else "."))
        return True, "correct for N×K = 256×512 and 100×352 (N not a multiple of the row tile)"

    def parallel():
        text = scheduled(256, 512).script()
        if "T.parallel" in text:
            return True, "the row loop runs in parallel on all cores"
        return False, (f"no loop is marked parallel, so the kernel uses one core of "
                       f"{os.cpu_count()}: split the output-row loop and sch.parallel() the outer part.")

    def speed():
        n, k = shape
        func = gemv_prim_func(n, k)
        libs = {"unscheduled": _build(tvm.IRModule({"main": func})),
                "reference": _build(cpu_gemv_schedule(func).mod),
                "yours": _build(scheduled(n, k))}
        x, qw, qs = _gemv_data(n, k, seed=0, real=False)
        outs, fns = {}, {}
        for name, lib in libs.items():
            outs[name], fns[name] = _run_gemv(lib, x, qw, qs)
        if not np.allclose(outs["yours"], outs["reference"], rtol=1e-4, atol=1e-3):
            return False, f"N×K = {n}×{k}: your kernel's results are wrong at this size"
        t = time_kernels(fns, rounds=rounds)
        nbytes = qw.nbytes + qs.nbytes + x.nbytes + 4 * n
        frac = t["reference"] / t["yours"]
        msg = (f"N×K = {n}×{k} ({nbytes / 1e6:.0f} MB): yours {t['yours'] * 1e3:.1f} ms "
               f"({nbytes / t['yours'] / 1e9:.1f} GB/s), reference {t['reference'] * 1e3:.1f} ms, "
               f"unscheduled {t['unscheduled'] * 1e3:.1f} ms; yours runs at {frac:.0%} of the "
               f"reference's speed (needs ≥ {min_fraction:.0%}), "
               f"{t['unscheduled'] / t['yours']:.1f}× the unscheduled kernel")
        if measure_bandwidth:
            from .hardware import measure_cpu_bandwidth

            bw = measure_cpu_bandwidth(64 * 2 ** 20, repeats=5, kind="read")
            msg += (f"; {nbytes / t['yours'] / 1e9 / bw:.0%} of one core's measured read bandwidth "
                    f"({bw:.0f} GB/s)")
        msg += "."
        if frac >= min_fraction:
            return True, msg
        text = scheduled(n, k).script()
        hints = []
        if "T.parallel" not in text:
            hints.append("no parallel loop (one core only)")
        if "T.vectorized" not in text:
            hints.append("no vectorized loop: rfactor a split of K into lanes of 16 and vectorize "
                         "the lanes, so that the inner loop reads 16 consecutive weights")
        return False, msg + (" Missing: " + "; ".join(hints) + "." if hints else "")

    return _run_checks("lab5", {"returns_schedule": returns_schedule, "correct": correct,
                                "parallel": parallel, "speed": speed})


# =============================================================================================
# Registry and the grader's entry point
# =============================================================================================

@dataclass(frozen=True)
class LabSpec:
    lab: str
    title: str
    functions: tuple[str, ...]   # names the notebook must define, in the checker's order
    checker: Callable[..., LabReport]
    notebook: str                # file name under notebooks/labs/


LABS: dict[str, LabSpec] = {s.lab: s for s in [
    LabSpec("lab1", "4-bit quantization (q4f16_1)", ("quantize_q4", "dequantize_q4"), check_lab1,
            "lab1_quantization.ipynb"),
    LabSpec("lab2", "a tensor-parallel MLP", ("shard_mlp", "tp_mlp"), check_lab2,
            "lab2_tensor_parallel_mlp.ipynb"),
    LabSpec("lab3", "ring all-reduce", ("ring_allreduce", "ring_allreduce_cost"), check_lab3,
            "lab3_ring_allreduce.ipynb"),
    LabSpec("lab4", "sharding a Llama layer", ("shard_layer", "find_shard_counts"), check_lab4,
            "lab4_sharding.ipynb"),
    LabSpec("lab5", "a CPU schedule for the decode GEMV", ("schedule_gemv",), check_lab5,
            "lab5_cpu_gemv_schedule.ipynb"),
]}

#: check names per lab, in order (a grade table's columns)
LAB_CHECKS: dict[str, tuple[str, ...]] = {
    "lab1": ("shapes_and_dtypes", "scales", "quantized_values", "nibble_order", "zero_group",
             "clip", "dequantize", "round_trip"),
    "lab2": ("shard_shapes", "shard_contents", "allreduce_count", "allreduce_placement", "output",
             "ranks_agree"),
    "lab3": ("result", "same_on_every_rank", "num_steps", "neighbours", "chunk_schedule",
             "bytes_sent", "cost_formula"),
    "lab4": ("shapes", "qkv_by_head_groups", "o_proj_columns", "gate_up_segments",
             "down_proj_columns", "replicated_norms", "shard_counts"),
    "lab5": ("returns_schedule", "correct", "parallel", "speed"),
}
#: checks that count more than 1 in the score (lab 5: a correct, fast kernel is the point)
CHECK_WEIGHTS: dict[str, dict[str, float]] = {"lab5": {"correct": 2, "speed": 2}}


def _weight(lab: str, check: str) -> float:
    return CHECK_WEIGHTS.get(lab, {}).get(check, 1.0)


def failed_report(lab: str, reason: str) -> LabReport:
    """A report where every check of ``lab`` failed for one reason (crash, time-out, ...)."""
    spec = LABS[lab]
    rep = LabReport(lab, spec.title)
    for name in LAB_CHECKS[lab]:
        rep.add(name, False, reason, _weight(lab, name))
    return rep


def grade_namespace(lab: str, namespace: dict, out_path: str | os.PathLike) -> LabReport:
    """Run ``lab``'s checker on the functions defined in ``namespace`` (a notebook's
    ``globals()``) and write the report as JSON to ``out_path``. Used by the grader."""
    spec = LABS[lab]
    missing = [f for f in spec.functions if not callable(namespace.get(f))]
    if missing:
        report = failed_report(lab, f"{', '.join(missing)} is not defined: the notebook must define "
                                    f"{' and '.join(spec.functions)} (did its cell raise an error?)")
    else:
        report = spec.checker(*(namespace[f] for f in spec.functions))
    tmp = f"{out_path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(report.to_dict(), fh, indent=1)
    os.replace(tmp, out_path)
    return report
