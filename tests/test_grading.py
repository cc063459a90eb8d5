"""The grader: a solved, an unsolved, a crashing and a looping lab 1 notebook score 100%, 0%,
0% and 0%, each for its own reason, and grading exits 0."""

import copy
import json
import shutil
from pathlib import Path

import pytest

from mlc_course import grading

LABS = Path(__file__).resolve().parent.parent / "notebooks" / "labs"


def with_cell(nb: dict, source: str, where: int = 2) -> dict:
    nb = copy.deepcopy(nb)
    nb["cells"].insert(where, {"cell_type": "code", "id": "extra", "metadata": {},
                               "execution_count": None, "outputs": [], "source": source})
    return nb


@pytest.fixture(scope="module")
def submissions(tmp_path_factory):
    root = tmp_path_factory.mktemp("submissions")
    stub = json.loads((LABS / "lab1_quantization.ipynb").read_text())
    for who in ("solved", "unsolved", "crashing"):
        (root / who).mkdir()
    shutil.copy(LABS / "solutions" / "lab1_quantization.ipynb", root / "solved")
    shutil.copy(LABS / "lab1_quantization.ipynb", root / "unsolved")
    crash = with_cell(stub, "import os\nos._exit(3)")
    del crash["metadata"]["mlc_course"]  # identified by its file name instead
    (root / "crashing" / "Lab1.ipynb").write_text(json.dumps(crash))
    return root


def test_grade_solved_unsolved_crashing(submissions, tmp_path):
    out_json, out_table = tmp_path / "grades.json", tmp_path / "grades.md"
    rc = grading.main([str(submissions), "--out-json", str(out_json), "--out-table", str(out_table)])
    assert rc == 0
    results = {Path(r["path"]).parent.name: r for r in json.loads(out_json.read_text())["results"]}
    assert {k: (r["lab"], r["status"], r["score"]) for k, r in results.items()} == {
        "solved": ("lab1", "graded", 1.0), "unsolved": ("lab1", "graded", 0.0),
        "crashing": ("lab1", "crashed", 0.0)}
    assert "not implemented yet" in results["unsolved"]["checks"][0]["message"]
    assert "kernel died" in results["crashing"]["note"]
    assert len(results["crashing"]["checks"]) == len(results["solved"]["checks"]) == 8
    table = out_table.read_text()
    assert "| solved/lab1_quantization.ipynb | lab1 | graded | 100% |" in table
    assert "| crashing/Lab1.ipynb | lab1 | crashed | 0% |" in table
    assert "| shapes_and_dtypes |" in table


def test_grade_looping_notebook_times_out(submissions, tmp_path):
    stub = json.loads((LABS / "lab1_quantization.ipynb").read_text())
    looping = tmp_path / "looping_lab1.ipynb"
    looping.write_text(json.dumps(with_cell(stub, "while True:\n    pass")))
    (rec,) = grading.grade([looping], timeout_s=8)["results"]
    assert (rec["status"], rec["score"]) == ("timeout", 0.0)
    assert "time limit" in rec["note"] and rec["seconds"] < 30


def test_identify_and_prepare(tmp_path):
    nb = json.loads((LABS / "lab3_ring_allreduce.ipynb").read_text())
    assert grading.identify_lab(nb, "whatever.ipynb") == "lab3"
    bare = {"cells": [], "metadata": {}}
    assert grading.identify_lab(bare, "alice/Lab_04 sharding.ipynb") == "lab4"
    assert grading.identify_lab(bare, "notes.ipynb") is None
    ready = grading.prepare(nb, "lab3", "/tmp/r.json")
    sources = [c.source for c in ready.cells]
    assert not any("raise_if_failed" in s for s in sources)
    assert "grade_namespace" in sources[-1] and "'lab3'" in sources[-1]
    (tmp_path / "notes.ipynb").write_text(json.dumps(bare))
    (rec,) = grading.grade([tmp_path / "notes.ipynb"])["results"]
    assert rec["status"] == "not-a-lab" and rec["score"] is None
