"""The course as a website (scripts/build_book.py, ``make book``).

The site is built from the committed notebooks into a temporary folder, served on 127.0.0.1
and opened page by page in headless Chromium (tests/book_check.py): every page loads without
console errors or failed requests, every image loads, the table of contents reaches every
notebook and the previous/next links walk the course in order. The checker is also run on
small sites broken on purpose, to show that it catches each fault. The browser tests skip
only where no Chromium is installed (CI installs Debian's ``chromium``).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import nbformat
import pytest

from book_check import ROOT, check_site, load_builder

BOOK = load_builder()


def expected_pages() -> list[str]:
    """The site path of every page the book must have, in course order: README, then the
    notebooks of notebooks/, the labs, their solutions (file order in each folder)."""
    order = [sorted(ROOT.glob(pattern)) for pattern in
             ("notebooks/*.ipynb", "notebooks/labs/*.ipynb", "notebooks/labs/solutions/*.ipynb")]
    notebooks = [p for group in order for p in group]
    others = sorted(p for p in ROOT.glob("notebooks/**/*.ipynb")
                    if p not in notebooks and ".ipynb_checkpoints" not in p.parts)
    return ["index.html"] + [str(PurePosixPath(p.relative_to(ROOT).as_posix()).with_suffix(".html"))
                             for p in notebooks + others]


# ----------------------------------------------------------------- without a browser

def test_outputs_are_cleaned_for_the_page():
    home = str(Path.home())
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\nprint(1)", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text=(
            f"{ROOT}/mlc_course/x.py:3: DeprecationWarning: old\n  warnings.warn('old')\n")),
        nbformat.v4.new_output("stream", name="stderr", text=(
            "WARNING: noisy\n[02:10:00] src/relax/x.cc:12: Warning: tvm says\nreal message\n")),
        nbformat.v4.new_output("stream", name="stdout", text=(
            f"wrote {ROOT}/build/lib.so, {home}/.cache/mlc_course/w.bin and /tmp/tmpab12/x.so\n"
            f"see {ROOT}/.venv/lib/python3.11/site-packages/tvm/relax.py; cwd {ROOT}")),
        nbformat.v4.new_output("error", ename="E", evalue=f"in {ROOT}/notebooks",
                               traceback=[f"File {ROOT}/mlc_course/labs.py:12"]),
    ])]
    cell = BOOK.clean_notebook(nb, ROOT).cells[0]
    assert "NBVAL" not in cell.source and cell.source == "print(1)"
    assert [o.get("text") for o in cell.outputs[:1]] == ["real message\n"]  # the warning-only one is gone
    out = cell.outputs[1].text
    assert out == ("wrote build/lib.so, ~/.cache/mlc_course/w.bin and $TMPDIR/tmpab12/x.so\n"
                   "see site-packages/tvm/relax.py; cwd .")
    assert cell.outputs[2].traceback == ["File mlc_course/labs.py:12"]
    assert cell.outputs[2].evalue == "in notebooks"
    assert nb.cells[0].outputs[2].text.startswith("wrote /")  # the notebook itself is not touched


def test_long_outputs_fold_and_math_becomes_mathml():
    short = BOOK.fold_text("a\n" * BOOK.FOLD_OVER)
    assert "<details" not in short and short.count("a") == BOOK.FOLD_OVER
    long = BOOK.fold_text("".join(f"line {i}\n" for i in range(48)))
    head, tail = long.split("<details", 1)
    assert "line 19" in head and "line 20" not in head and "line 47" in tail
    assert f"{48 - BOOK.FOLD_KEEP} more lines" in tail
    html = BOOK.markdown_to_html("Cost $t = \\frac{W}{\\eta B}$.\n\n$$N^* = \\sqrt{A/D}$$\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    assert html.count("<math") == 2 and 'display="block"' in html and "$" not in html
    assert "<table>" in html and "<td>2</td>" in html


def test_every_notebook_is_a_page_in_course_order():
    assert [page.url for page in BOOK.book_pages(ROOT)] == expected_pages()


# ------------------------------------------------------------------ in Chromium

@pytest.fixture(scope="module")
def browser():
    executable = BOOK.find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set BOOK_CHROMIUM): "
                    "the book's pages are not opened in a browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = BOOK.launch_chromium(pw, executable)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("book")
    BOOK.build_book(site, log=lambda *_: None)
    return site


def test_every_page_of_the_book_works_in_chromium(book, browser):
    required = expected_pages()
    report = check_site(book, browser, required=required)
    assert report.problems == []
    assert set(required) <= set(report.visited)
    # prev/next links walk the whole course in order, from the getting-started page
    walk, page = [], "index.html"
    while page and page not in walk:
        walk.append(page)
        page = report.next_page.get(page)
    assert walk == required
    # each notebook's page offers its notebook (a download that exists: dead links are problems)
    for html_page in required[1:]:
        notebook = PurePosixPath(html_page).with_suffix(".ipynb").as_posix()
        assert notebook in report.links[html_page], f"{html_page} does not link to {notebook}"


def test_plots_tables_and_folds_are_rendered(book):
    page = (book / "notebooks" / "01_decode_is_memory_bound.html").read_text()
    nb = nbformat.read(ROOT / "notebooks" / "01_decode_is_memory_bound.ipynb", as_version=4)
    pngs = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert pngs > 0 and len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == pngs
    assert "<table>" in page
    assert "<script" not in page  # nothing to load: the book reads offline
    nb08 = (book / "notebooks" / "08_scaling_and_deployment.html").read_text()
    assert '<details class="book-fold">' in nb08 and "<math" in nb08
    lab = (book / "notebooks" / "labs" / "lab1_quantization.html").read_text()
    assert "LabCheckFailed" in lab and "The exercise." in lab


# ------------------------------------------------- the checker fails on broken sites

def tiny_site(tmp_path: Path, pages: dict[str, str]) -> Path:
    """A site of ``pages`` (path: body HTML), each page a minimal valid document."""
    for path, body in pages.items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{path}</title>'
                          f'<link rel="icon" href="data:,"></head><body>{body}</body></html>')
    return tmp_path


PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
         "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_checker_passes_a_good_site(tmp_path, browser):
    site = tiny_site(tmp_path, {
        "index.html": f'<a href="a.html">a</a> <img src="{PIXEL}"> <a href="a.ipynb">nb</a>',
        "a.html": '<a href="index.html" rel="next">home</a>',
        "a.ipynb": "{}",
    })
    report = check_site(site, browser, required=["index.html", "a.html"])
    assert report.problems == [] and report.visited == ["index.html", "a.html"]


def test_checker_reports_a_missing_page(tmp_path, browser):
    site = tiny_site(tmp_path, {"index.html": '<a href="notebooks/gone.html">gone</a>'})
    report = check_site(site, browser, required=["notebooks/gone.html"])
    assert any(p.startswith("notebooks/gone.html (linked from index.html)") and "404" in p
               for p in report.problems), report.problems


def test_checker_reports_a_broken_image(tmp_path, browser):
    site = tiny_site(tmp_path, {"index.html": '<img src="plot.png"><img src="data:image/png;base64,AAAA">'})
    problems = check_site(site, browser).problems
    assert any("broken image: plot.png" in p for p in problems), problems
    assert any("broken image: data:image/png;base64,AAAA" in p for p in problems), problems


def test_checker_reports_a_javascript_error(tmp_path, browser):
    site = tiny_site(tmp_path, {
        "index.html": '<a href="js.html">js</a>',
        "js.html": '<script>console.error("bad state"); undefinedFunction();</script>',
    })
    problems = check_site(site, browser).problems
    assert any(p.startswith("js.html") and "console error: bad state" in p for p in problems), problems
    assert any(p.startswith("js.html") and "JavaScript error" in p and "undefinedFunction" in p
               for p in problems), problems


def test_checker_reports_unreachable_pages_dead_downloads_and_leaks(tmp_path, browser):
    site = tiny_site(tmp_path, {
        "index.html": ('<a href="missing.ipynb">download</a>'
                       '<div class="jp-OutputArea">saved to /root/.cache/mlc_course/x</div>'
                       '<div data-mime-type="application/vnd.jupyter.stderr">UserWarning: old</div>'
                       '<div class="jp-RenderedMarkdown">$$\\frac{a}{b}$$</div>'),
        "orphan.html": "nobody links here",
    })
    problems = check_site(site, browser, required=["orphan.html"]).problems
    for expected in ("orphan.html: no link from index.html", "dead link to missing.ipynb",
                     "absolute path in an output", "warning in an output: UserWarning",
                     "unrendered math"):
        assert any(expected in p for p in problems), (expected, problems)
