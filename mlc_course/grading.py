"""Grade students' lab notebooks: ``python -m mlc_course grade PATH...``.

For each notebook (a file, or every ``*.ipynb`` under a folder), one at a time:

1. tell which lab it is: ``metadata["mlc_course"]["lab"]`` (the lab notebooks carry it), else
   ``labN`` in the file name;
2. execute it headless in a fresh ``python3`` kernel (nbclient), in the notebook's own folder,
   **with the student's check cell replaced by the grader's**: a cell that runs the lab's
   checker from :mod:`mlc_course.labs` on the functions the notebook defined and writes the
   :class:`~mlc_course.labs.LabReport` as JSON to a temporary file. Cells that raise do not
   stop the run (a stub that raises NotImplementedError simply scores 0 on its checks);
3. a kernel that dies, or a notebook that runs past ``timeout_s`` in all (kernel start
   included), scores 0 on every check of its lab with the reason; grading goes on.

The results go to a JSON file (every check with its message) and a Markdown table (a score
per notebook, then one table per lab with a column per check); the table is also printed.
The exit status is 0 whatever the students' notebooks did.

The grader trusts the course package it runs with, not the notebook: the report comes from
the installed ``mlc_course.labs``, so editing the check cell changes nothing. It is not a
sandbox: notebooks run with the grader's permissions, as they would in Jupyter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

from .labs import LAB_CHECKS, LABS, LabReport, failed_report

GRADER_TAG = "lab-check"
_LAB_NAME = re.compile(r"lab[\s_-]*0*(\d+)", re.IGNORECASE)


# ------------------------------------------------------------------------------ which lab


def identify_lab(nb: dict, path: str | os.PathLike) -> str | None:
    """The lab a notebook is: its ``mlc_course`` metadata, else ``labN`` in its file name."""
    lab = (nb.get("metadata", {}).get("mlc_course") or {}).get("lab")
    if lab in LABS:
        return lab
    m = _LAB_NAME.search(Path(path).stem)
    if m and f"lab{int(m.group(1))}" in LABS:
        return f"lab{int(m.group(1))}"
    return None


def find_notebooks(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders searched recursively for ``*.ipynb`` (checkpoints skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        else:
            out.append(p)
    return out


# ------------------------------------------------------------------------------ running


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def prepare(nb: dict, lab: str, report_path: str) -> dict:
    """A copy of ``nb`` without its check cell(s), with the grader's cell at the end."""
    import nbformat

    nb = nbformat.reads(json.dumps(nb), as_version=4)  # a copy, sources as strings
    keep = []
    for cell in nb.cells:
        is_check = cell.get("cell_type") == "code" and (
            GRADER_TAG in cell.get("metadata", {}).get("tags", [])
            or ".raise_if_failed()" in _source(cell))
        if not is_check:
            keep.append(cell)
    grader = nbformat.v4.new_code_cell(
        "# added by the mlc-course grader\n"
        "from mlc_course.labs import grade_namespace as _mlc_grade\n"
        f"_mlc_grade({lab!r}, globals(), {report_path!r})\n")
    grader.metadata["tags"] = ["mlc-course-grader"]
    nb.cells = keep + [grader]
    return nb


def _execute(nb, cwd: Path, timeout_s: float, kernel_log: str) -> tuple[str, str, list[str]]:
    """Run ``nb`` in place. Returns (status, note, cell errors); status ``ran``, ``timeout``
    or ``crashed``. The kernel's own stdout/stderr (not the cells' outputs) go to
    ``kernel_log``."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    deadline = time.monotonic() + timeout_s
    current = {"index": -1}
    errors: list[str] = []

    def on_start(cell, cell_index):
        current["index"] = cell_index

    def on_error(cell, cell_index, execute_reply):
        c = execute_reply.get("content", {})
        errors.append(f"cell {cell_index + 1}: {c.get('ename', 'error')}: {str(c.get('evalue', ''))[:200]}")

    client = NotebookClient(
        nb, kernel_name="python3", allow_errors=True, startup_timeout=max(10, int(timeout_s)),
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(cwd)}}, on_cell_start=on_start, on_cell_error=on_error)
    try:
        with open(kernel_log, "wb") as log:
            client.execute(stdout=log, stderr=log)
    except CellTimeoutError:
        return "timeout", (f"stopped after {timeout_s:g} s (the time limit) in cell "
                           f"{current['index'] + 1}: does it loop forever?"), errors
    except DeadKernelError:
        tail = [ln for ln in Path(kernel_log).read_text(errors="replace").splitlines()
                if ln.strip() and "without encryption" not in ln][-1:]
        return "crashed", (f"the kernel died (crashed) in cell {current['index'] + 1}"
                           + (f"; its last words: {tail[0][:200]}" if tail else "")), errors
    except Exception as e:  # noqa: BLE001 - a kernel that would not start, a broken notebook
        if time.monotonic() >= deadline:
            return "timeout", f"stopped after {timeout_s:g} s (the time limit)", errors
        return "crashed", f"the notebook could not be run: {type(e).__name__}: {str(e)[:200]}", errors
    return "ran", "", errors


def grade_one(path: str | os.PathLike, timeout_s: float = 300,
              executed_dir: str | os.PathLike | None = None) -> dict:
    """Grade one notebook; returns its result record (see :func:`grade`)."""
    import nbformat

    path = Path(path)
    t0 = time.monotonic()
    rec: dict = {"path": str(path), "lab": None, "title": None, "status": None, "score": 0.0,
                 "seconds": 0.0, "note": "", "cell_errors": [], "checks": []}
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(nb, dict) or "cells" not in nb:
            raise ValueError("no cells")
    except Exception as e:  # noqa: BLE001
        rec.update(status="unreadable", note=f"not a notebook: {type(e).__name__}: {e}"[:300])
        return rec
    lab = identify_lab(nb, path)
    if lab is None:
        rec.update(status="not-a-lab", score=None,
                   note="no mlc_course lab metadata and no labN in the file name: skipped")
        return rec
    rec.update(lab=lab, title=LABS[lab].title)
    with tempfile.TemporaryDirectory(prefix="mlc-grade-") as tmp:
        report_path = os.path.join(tmp, "report.json")
        run_nb = prepare(nb, lab, report_path)
        status, note, errors = _execute(run_nb, path.resolve().parent, timeout_s,
                                        os.path.join(tmp, "kernel.log"))
        report = None
        if os.path.exists(report_path):
            report = LabReport.from_dict(json.loads(Path(report_path).read_text()))
        if executed_dir is not None:
            out = Path(executed_dir) / f"{path.parent.name}__{path.name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(run_nb, str(out))
    if report is None:
        if status == "ran":
            status, note = "crashed", "the grader's cell did not produce a report"
        report = failed_report(lab, f"not graded: {note}")
    else:
        status = "graded"
    rec.update(status=status, note=note, cell_errors=errors, score=report.score,
               checks=report.to_dict()["checks"], seconds=round(time.monotonic() - t0, 1))
    return rec


# ------------------------------------------------------------------------------ reports


def _display_names(paths: Sequence[str]) -> list[str]:
    """Paths relative to their common folder (student folders stay visible)."""
    if not paths:
        return []
    parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
    common = os.path.commonpath(parents)
    if len(set(parents)) == 1:
        common = os.path.dirname(common)
    return [os.path.relpath(os.path.abspath(p), common) for p in paths]


def format_table(results: Sequence[dict]) -> str:
    """Markdown: a score per notebook, then per lab one column per check (✓/✗)."""
    names = _display_names([r["path"] for r in results])
    lines = ["# Lab grades", "", "| notebook | lab | status | score | time (s) | note |",
             "|---|---|---|---|---|---|"]
    for name, r in zip(names, results):
        score = "–" if r["score"] is None else f"{r['score']:.0%}"
        note = (r["note"] or "").replace("|", "\\|")
        lines.append(f"| {name} | {r['lab'] or '–'} | {r['status']} | {score} | {r['seconds']} | {note} |")
    for lab, spec in LABS.items():
        rows = [(n, r) for n, r in zip(names, results) if r["lab"] == lab]
        if not rows:
            continue
        checks = LAB_CHECKS[lab]
        lines += ["", f"## {lab} · {spec.title}", "",
                  "| notebook | score | " + " | ".join(checks) + " |",
                  "|---|---|" + "---|" * len(checks)]
        for name, r in rows:
            passed = {c["name"]: c["passed"] for c in r["checks"]}
            marks = ["✓" if passed.get(c) else "✗" for c in checks]
            lines.append(f"| {name} | {r['score']:.0%} | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


def grade(paths: Iterable[str | os.PathLike], timeout_s: float = 300,
          out_json: str | os.PathLike | None = None, out_table: str | os.PathLike | None = None,
          executed_dir: str | os.PathLike | None = None, log=None) -> dict:
    """Grade notebooks one at a time; write ``out_json`` / ``out_table`` if given.

    Returns ``{"timeout_s", "results": [record, ...]}``, one record per notebook:
    ``path, lab, title, status`` (``graded``, ``crashed``, ``timeout``, ``unreadable``,
    ``not-a-lab``), ``score`` (0..1; None when not a lab), ``seconds``, ``note``,
    ``cell_errors`` (the errors the notebook's own cells raised) and ``checks`` (name,
    passed, message, weight). ``executed_dir``: also save each executed notebook there.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    results = []
    notebooks = find_notebooks(paths)
    for i, p in enumerate(notebooks):
        log(f"[{i + 1}/{len(notebooks)}] grading {p} ...")
        rec = grade_one(p, timeout_s, executed_dir)
        score = "–" if rec["score"] is None else f"{rec['score']:.0%}"
        log(f"    {rec['lab'] or '?'}: {rec['status']}, score {score} ({rec['seconds']} s)"
            + (f" — {rec['note']}" if rec["note"] else ""))
        results.append(rec)
    out = {"timeout_s": timeout_s, "results": results}
    if out_json:
        Path(out_json).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    if out_table:
        Path(out_table).write_text(format_table(results))
    return out


# ------------------------------------------------------------------------------ command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``grade`` command to a CLI's subparsers (``args.fn(args)`` runs it)."""
    p = subparsers.add_parser("grade", help="grade students' lab notebooks",
                              description=__doc__.split("\n")[0])
    _add_args(p)
    p.set_defaults(fn=cmd_grade)
    return p


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="lab notebooks, or folders to search for *.ipynb")
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds per notebook, kernel start included (default 300)")
    p.add_argument("--out-json", default="grades.json", help="results with every check's message")
    p.add_argument("--out-table", default="grades.md", help="Markdown table of scores")
    p.add_argument("--executed-dir", default=None, help="also save the executed notebooks here")


def cmd_grade(args) -> int:
    notebooks = find_notebooks(args.paths)
    if not notebooks:
        print(f"error: no notebooks found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    out = grade(notebooks, args.timeout, args.out_json, args.out_table, args.executed_dir)
    print(format_table(out["results"]), end="")
    print(f"wrote {args.out_json} and {args.out_table}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mlc_course.grading PATH... [--timeout S] [--out-json F] [--out-table F]``."""
    ap = argparse.ArgumentParser(prog="python -m mlc_course.grading",
                                 description=__doc__.split("\n")[0])
    _add_args(ap)
    return cmd_grade(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
