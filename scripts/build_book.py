#!/usr/bin/env python3
"""Build the course as a static website in build/book/ (``make book``).

    python scripts/build_book.py                       # render the committed, executed notebooks
    python scripts/build_book.py --execute             # run copies of them first (after `make demo`)
    python scripts/build_book.py --out DIR             # write somewhere else (default build/book)
    python scripts/build_book.py --screenshots docs/   # also docs/book_notebook.png, docs/book_lab.png

The site is plain HTML and CSS that reads offline, from ``file://`` or any static server
(``python -m http.server -d build/book``): no script, no CDN, no web font. Its pages, in
course order with a sidebar and previous/next links, are README.md (the getting-started page,
``index.html``), notebooks/00_… to 08_…, the labs as students get them (their check cell fails
by design) and the labs' solutions. The site mirrors the repository's layout, so a page sits
next to a copy of its notebook (``notebooks/01_x.html`` links to ``notebooks/01_x.ipynb``).

A notebook is rendered by nbconvert with JupyterLab's look (its CSS written once to
``_static/``); plots stay embedded PNGs; math becomes MathML at build time (latex2mathml,
which browsers render natively). What a page shows differs from its notebook on purpose:

* absolute paths of the machine that executed the notebook become relative to the repository,
  ``~/…`` or ``$TMPDIR/…`` (outputs only; the code is shown as written);
* warnings on stderr are dropped;
* a text output longer than ``FOLD_OVER`` lines shows its first ``FOLD_KEEP`` lines and folds
  the rest into a ``<details>``;
* nbval markers (``# NBVAL_IGNORE_OUTPUT`` …) are left out of the code shown.

tests/test_book.py builds the site into a temporary folder, serves it and opens every page in
headless Chromium (tests/book_check.py); ``serve_directory`` and ``launch_chromium`` below are
shared with it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import html
import os
import posixpath
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
import nbformat
from latex2mathml.converter import convert as latex_to_mathml
from markupsafe import Markup
from nbconvert import HTMLExporter
from nbconvert.filters import ansi2html
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath
from pygments.formatters import HtmlFormatter

ROOT = Path(__file__).resolve().parent.parent
BOOK_TITLE = "mlc-course"
BOOK_SUBTITLE = "multi-GPU 4-bit Llama inference, rebuilt with Apache TVM"

FOLD_OVER = 30  # text outputs longer than this many lines are folded ...
FOLD_KEEP = 20  # ... after this many lines

# Chromium flags that work on a closed network (without the background-networking ones its
# own connections are refused and logged); Playwright adds a fresh --user-data-dir itself.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# ----------------------------------------------------------------------------- the pages

@dataclass(frozen=True)
class Page:
    """One page of the book: README.md (the index) or a notebook."""

    source: str  # path in the repository, POSIX style: "README.md", "notebooks/01_x.ipynb"
    section: str  # sidebar heading: "Getting started", "Notebooks", "Labs", "Lab solutions"
    title: str

    @property
    def url(self) -> str:
        """The page's path in the site."""
        if self.source == "README.md":
            return "index.html"
        return str(PurePosixPath(self.source).with_suffix(".html"))

    @property
    def label(self) -> str:
        """The title, marked when the page is a lab's solution (its title is the lab's)."""
        return f"{self.title} (solution)" if self.lab_version == "solution" else self.title

    @property
    def is_notebook(self) -> bool:
        return self.source.endswith(".ipynb")

    @property
    def lab_version(self) -> str | None:
        """The lab version a page shows, "student" or "solution"; None for other pages."""
        if self.section == "Labs":
            return "student"
        if self.section == "Lab solutions":
            return "solution"
        return None


def notebook_title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The text of the notebook's first markdown heading, else ``fallback``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", cell.source, re.M)
            if match:
                return match.group(1).replace("`", "")
    return fallback


def book_pages(root: Path = ROOT) -> list[Page]:
    """Every page in course order: README, notebooks/*.ipynb, labs, their solutions, then any
    other notebook under notebooks/ (so that no notebook is left out of the book)."""
    sections = [("Notebooks", "notebooks/*.ipynb"), ("Labs", "notebooks/labs/*.ipynb"),
                ("Lab solutions", "notebooks/labs/solutions/*.ipynb"),
                ("More notebooks", "notebooks/**/*.ipynb")]
    pages = [Page("README.md", "Getting started", "Getting started")]
    seen: set[Path] = set()
    for section, pattern in sections:
        for path in sorted(root.glob(pattern)):
            if path in seen or ".ipynb_checkpoints" in path.parts:
                continue
            seen.add(path)
            nb = nbformat.read(path, as_version=4)
            pages.append(Page(path.relative_to(root).as_posix(), section,
                              notebook_title(nb, path.stem)))
    return pages


# ------------------------------------------------------------- what a page shows of a notebook

def path_rules(root: Path = ROOT) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, replacement) pairs that turn this machine's absolute paths into portable ones.

    Order matters: site-packages before the repository (.venv lives in it), the repository
    before the home folder (it may live in it)."""
    start = r"(?<![\w.~$/-])"  # an absolute path starts here, not inside a word, URL or path
    home = re.escape(str(Path.home()))
    return [
        (re.compile(start + r"(?:/[^\s/'\"<>]+)+/(?:site|dist)-packages/"), "site-packages/"),
        (re.compile(start + re.escape(str(root)) + "/"), ""),
        (re.compile(start + re.escape(str(root)) + r"(?![\w.-])"), "."),
        (re.compile(start + r"(?:" + home + r"|/root|/home/[^\s/'\"<>]+)(?=/|\b)"), "~"),
        (re.compile(start + r"(?:/private)?(?:/tmp|/var/folders/[^\s/]+/[^\s/]+/T)(?=/|\b)"),
         "$TMPDIR"),
    ]


def scrub_paths(text: str, rules: Sequence[tuple[re.Pattern[str], str]]) -> str:
    """``text`` with every absolute path of this machine made relative, ``~/`` or ``$TMPDIR/``."""
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


WARNING_LINE = re.compile(r"\b(?:[A-Z]\w*)?Warning\b:|^\s*WARNING\b|\bwarnings\.warn\(")


def strip_warnings(text: str) -> str:
    """``text`` (a stderr stream) without its warnings: a line that names a ``…Warning:`` or
    starts with ``WARNING``, and the indented source line Python prints after a warning."""
    kept: list[str] = []
    skip_indented = False
    for line in text.splitlines(keepends=True):
        if WARNING_LINE.search(line):
            skip_indented = True
            continue
        if skip_indented and line[:1] in (" ", "\t"):
            continue
        skip_indented = False
        kept.append(line)
    return "".join(kept)


NBVAL_MARKER = re.compile(r"^[ \t]*#[ \t]*NBVAL_\w+[ \t]*\n?", re.M)


def clean_notebook(nb: nbformat.NotebookNode, root: Path = ROOT) -> nbformat.NotebookNode:
    """A copy of ``nb`` as the book shows it: outputs without machine paths or stderr
    warnings, code without nbval markers."""
    nb = copy.deepcopy(nb)
    rules = path_rules(root)
    scrub = functools.partial(scrub_paths, rules=rules)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.source = NBVAL_MARKER.sub("", cell.source)
        outputs = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                if out.name == "stderr":
                    out.text = strip_warnings(out.text)
                    if not out.text.strip():
                        continue
                out.text = scrub(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                for mime, value in out.data.items():
                    if mime.startswith("text/") and isinstance(value, str):
                        out.data[mime] = scrub(value)
            elif out.output_type == "error":
                out.traceback = [scrub(line) for line in out.traceback]
                out.evalue = scrub(out.evalue)
            outputs.append(out)
        cell.outputs = outputs
    return nb


def fold_text(text: str, over: int = FOLD_OVER, keep: int = FOLD_KEEP) -> Markup:
    """``text`` (ANSI colours allowed) as ``<pre>``; past ``over`` lines, the lines after the
    first ``keep`` go into a ``<details>`` that says how many they are."""
    lines = text.splitlines(keepends=True)
    if len(lines) <= over:
        return Markup(f"<pre>{ansi2html(text)}</pre>")
    head, tail = "".join(lines[:keep]), "".join(lines[keep:])
    return Markup(f"<pre>{ansi2html(head)}</pre>"
                  f'<details class="book-fold"><summary>{len(lines) - keep} more lines '
                  f"of output</summary><pre>{ansi2html(tail)}</pre></details>")


# ------------------------------------------------------------------------ notebook to HTML

def tex_to_mathml(tex: str, display: bool) -> str:
    """MathML for ``tex``; TeX that latex2mathml can't read is shown as code."""
    try:
        mathml = latex_to_mathml(tex.strip(), display="block" if display else "inline")
    except Exception:  # noqa: BLE001 - any parse failure: show the TeX itself
        return f'<code class="book-tex">{html.escape(tex)}</code>'
    # Plain HTML needs no namespace (and nbconvert re-serialises headings with ElementTree,
    # which would turn a namespaced <math> into <ns0:math>).
    mathml = mathml.replace(' xmlns="http://www.w3.org/1998/Math/MathML"', "")
    # A slash is an ordinary symbol in TeX (no space around it), an infix operator in MathML.
    return mathml.replace("<mo>&#x0002F;</mo>", '<mo lspace="0" rspace="0">/</mo>')


class MathMLRenderer(IPythonRenderer):
    """nbconvert's markdown renderer with $…$ and $$…$$ turned into MathML, not left for
    MathJax (which the site would have to load from somewhere)."""

    def block_math(self, body: str) -> str:
        return tex_to_mathml(body, display=True)

    def inline_math(self, body: str) -> str:
        return tex_to_mathml(body, display=False)

    def latex_environment(self, name: str, body: str) -> str:
        return tex_to_mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", display=True)


def markdown_to_html(source: str) -> str:
    """Markdown (tables, fenced code, math) to HTML, as notebook cells are rendered."""
    return MarkdownWithMath(renderer=MathMLRenderer(escape=False)).render(source)


# The cells of a notebook in JupyterLab's markup, without nbconvert's page around them (the
# book's own page, PAGE_TEMPLATE, holds them). Long text outputs fold; a student lab's check
# cell says that its failure is expected.
CELLS_TEMPLATE = r"""
{%- extends 'base.html.j2' -%}
{%- block header -%}{%- endblock header -%}
{%- block footer -%}{%- endblock footer -%}

{% block codecell %}
{%- if resources.book_lab_version == 'student' and 'lab-check' in cell.metadata.get('tags', []) -%}
<div class="book-callout book-callout-exercise"><strong>The exercise.</strong> This check cell
fails until the cells marked <code>YOUR CODE HERE</code> are written: below is what a student
sees at first. Run it again after each change; when every check passes it prints the report.</div>
{%- endif -%}
{{ super() }}
{%- endblock codecell %}

{% block stream_stdout -%}
<div class="jp-RenderedText jp-OutputArea-output" data-mime-type="text/plain">
{{- output.text | fold_text -}}
</div>
{%- endblock stream_stdout %}

{% block stream_stderr -%}
<div class="jp-RenderedText jp-OutputArea-output" data-mime-type="application/vnd.jupyter.stderr">
{{- output.text | fold_text -}}
</div>
{%- endblock stream_stderr %}

{% block error -%}
<div class="jp-RenderedText jp-OutputArea-output" data-mime-type="application/vnd.jupyter.stderr">
{{- output.traceback | join('\n') | fold_text -}}
</div>
{%- endblock error %}

{%- block data_text scoped %}
<div class="jp-RenderedText jp-OutputArea-output {{ extra_class }}" data-mime-type="text/plain">
{{- output.data['text/plain'] | fold_text -}}
</div>
{%- endblock -%}
"""


class BookExporter(HTMLExporter):
    """nbconvert's JupyterLab HTML exporter, cells only, math as MathML, long text folded."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(template_name="lab",
                         extra_loaders=[jinja2.DictLoader({"book_cells.html.j2": CELLS_TEMPLATE})],
                         **kwargs)
        self.template_file = "book_cells.html.j2"

    @jinja2.pass_context
    def markdown2html(self, context: jinja2.runtime.Context, source: str) -> str:
        cell = context.get("cell", {})
        renderer = MathMLRenderer(escape=False, attachments=cell.get("attachments", {}),
                                  anchor_link_text="¶", **self.lexer_options)
        return MarkdownWithMath(renderer=renderer).render(source)

    def default_filters(self) -> Iterator[tuple[str, Any]]:
        yield from super().default_filters()
        yield ("markdown2html", self.markdown2html)
        yield ("fold_text", fold_text)


def execute_notebook(nb: nbformat.NotebookNode, path: Path, allow_errors: bool,
                     timeout_s: int = 1800) -> nbformat.NotebookNode:
    """``nb`` run top to bottom in a fresh kernel, in the notebook's folder (in memory: the
    committed notebook is not touched)."""
    from nbconvert.preprocessors import ExecutePreprocessor

    runner = ExecutePreprocessor(timeout=timeout_s, kernel_name="python3", allow_errors=allow_errors)
    nb = copy.deepcopy(nb)
    runner.preprocess(nb, {"metadata": {"path": str(path.parent)}})
    return nb


# ----------------------------------------------------------------------------- page shell

PAGE_TEMPLATE = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string(r"""
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} · {{ book_title }}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{{ static }}/jupyter.css">
<link rel="stylesheet" href="{{ static }}/book.css">
</head>
<body data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<header class="book-header">
  <a class="book-brand" href="{{ home }}">{{ book_title }}</a>
  <span class="book-subtitle">{{ book_subtitle }}</span>
</header>
<div class="book-layout">
<nav class="book-sidebar" aria-label="Table of contents">
{% for section, entries in toc %}
  <p class="book-toc-section">{{ section }}</p>
  <ul class="book-toc">
  {% for entry in entries %}
    <li{% if entry.current %} class="book-current"{% endif %}><a href="{{ entry.href }}">{{ entry.title }}</a>
    {% if entry.current and headings %}
      <ul class="book-toc-local">
      {% for id, text in headings %}
        <li><a href="#{{ id }}">{{ text }}</a></li>
      {% endfor %}
      </ul>
    {% endif %}
    </li>
  {% endfor %}
  </ul>
{% endfor %}
</nav>
<main class="book-main">
{% if source %}
<aside class="book-callout book-source">
  {% if lab_version == 'solution' %}<p><strong>Solution.</strong> The lab with its stubs filled in;
  the exercise itself is <a href="{{ exercise_href }}">{{ exercise_title }}</a>.</p>{% endif %}
  {% if lab_version == 'student' %}<p><strong>A lab.</strong> This is the notebook as a student gets it:
  its functions raise <code>NotImplementedError</code> and its check cell fails until they are written
  (<a href="{{ solution_href }}">the solution</a>).</p>{% endif %}
  <p>Notebook: <a href="{{ source_href }}" download><code>{{ source }}</code></a>
  (download; the same path in the repository).
  Run it yourself: {{ run_hint }}</p>
</aside>
{% endif %}
<article class="jp-Notebook book-article">
{{ body }}
</article>
{% if source == none %}
<section class="book-contents">
  <h2 id="contents">Contents of the book</h2>
  {% for section, entries in toc if section != 'Getting started' %}
  <h3>{{ section }}</h3>
  <ol>
  {% for entry in entries %}<li><a href="{{ entry.href }}">{{ entry.title }}</a></li>
  {% endfor %}
  </ol>
  {% endfor %}
</section>
{% endif %}
<nav class="book-pager" aria-label="Previous and next page">
  {% if prev %}<a class="book-prev" href="{{ prev.href }}" rel="prev">← {{ prev.title }}</a>{% else %}<span></span>{% endif %}
  {% if next %}<a class="book-next" href="{{ next.href }}" rel="next">{{ next.title }} →</a>{% endif %}
</nav>
</main>
</div>
</body>
</html>
""".lstrip())

RUN_HINTS = {
    None: Markup("<code>make demo</code> once (it sets up <code>.venv</code> and fetches the "
                 "course model), then <code>make lab</code> and open this notebook in JupyterLab."),
    "student": Markup("<code>make install</code> once (or <code>make demo</code>), then "
                      "<code>make lab</code> and open this notebook in JupyterLab."),
}
RUN_HINTS["solution"] = RUN_HINTS["student"]

BOOK_CSS = """
:root { --book-accent: #1a5fb4; --book-sidebar: 18rem; }
html, body { margin: 0; padding: 0; background: #fff; }
body { font-family: var(--jp-content-font-family); font-size: 15px; color: #1f2328; }
a { color: var(--book-accent); }
.book-article a, .book-source a, .book-contents a, .book-pager a { text-decoration: underline; }
.book-header { position: sticky; top: 0; z-index: 10; display: flex; gap: 1rem; align-items: baseline;
  padding: .6rem 1.2rem; background: #24292f; color: #d0d7de; }
.book-brand { color: #fff; font-weight: 600; font-size: 1.1rem; text-decoration: none; }
.book-subtitle { font-size: .9rem; }
.book-layout { display: flex; align-items: flex-start; }
.book-sidebar { position: sticky; top: 2.6rem; flex: 0 0 var(--book-sidebar); box-sizing: border-box;
  max-height: calc(100vh - 2.6rem); overflow-y: auto;
  padding: .8rem 1rem 2rem; border-right: 1px solid #d0d7de; background: #f6f8fa; font-size: .88rem; }
.book-toc-section { margin: 1rem 0 .3rem; font-weight: 600; color: #57606a; text-transform: uppercase;
  font-size: .75rem; letter-spacing: .05em; }
.book-toc, .book-toc-local { list-style: none; margin: 0; padding: 0; }
.book-toc > li { margin: .15rem 0; }
.book-toc a { display: block; padding: .15rem .4rem; border-radius: 4px; color: #24292f; text-decoration: none; }
.book-toc a:hover { background: #eaeef2; }
.book-current > a { background: #ddf4ff; color: var(--book-accent); font-weight: 600; }
.book-toc-local { margin: .1rem 0 .4rem .8rem; border-left: 2px solid #d0d7de; }
.book-toc-local a { font-size: .82rem; color: #57606a; }
.book-main { flex: 1 1 auto; min-width: 0; max-width: 60rem; padding: 1rem 2rem 3rem; box-sizing: border-box; }
.book-callout { margin: .8rem 0 1rem; padding: .6rem .9rem; border-left: 4px solid var(--book-accent);
  background: #f0f6ff; border-radius: 4px; font-size: .92rem; line-height: 1.45; }
.book-callout p { margin: .25rem 0; }
.book-callout-exercise { border-left-color: #bf8700; background: #fff8e5; }
.book-article { padding: 0; overflow: visible; }
.book-article .jp-Cell { padding: .25rem 0; }
.book-article .jp-InputPrompt, .book-article .jp-OutputPrompt { display: none; }
.book-article .jp-RenderedMarkdown.jp-MarkdownOutput { font-size: 15px; line-height: 1.55; }
.book-article .jp-RenderedHTMLCommon h1 { font-size: 1.9rem; margin-top: .6rem; }
.book-article .jp-RenderedHTMLCommon h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
.book-article a.anchor-link { display: none; margin-left: .3rem; text-decoration: none; color: #8c959f; }
.book-article :is(h1, h2, h3, h4):hover > a.anchor-link { display: inline; }
.book-article .jp-InputArea-editor { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 4px;
  overflow-x: auto; }
.book-article .jp-RenderedMarkdown pre { background: #f6f8fa; padding: .6rem .8rem; border-radius: 4px;
  margin: .6rem 0 1rem; overflow-x: auto; white-space: pre; }
.book-article .jp-OutputArea-output pre { white-space: pre-wrap; overflow-wrap: anywhere; }
.book-article .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"] { background: #fff5f5; }
.book-article .jp-RenderedImage img { max-width: 100%; height: auto; }
.book-article .jp-RenderedHTMLCommon table { margin: .4rem 0 1rem; font-size: .88rem; table-layout: auto; }
.book-article .jp-RenderedHTMLCommon td, .book-article .jp-RenderedHTMLCommon th { text-align: left; }
.book-article .celltag_lab-stub .jp-InputArea-editor { border-left: 4px solid #bf8700; }
.book-fold { margin: 0 0 .4rem; }
.book-fold > summary { cursor: pointer; color: var(--book-accent); font-size: .85rem; padding: .1rem 0; }
math { font-family: "STIX Two Math", "Latin Modern Math", "Cambria Math", "DejaVu Math TeX Gyre", math; font-size: 1.08em; }
math[display="block"] { margin: .8rem 0; overflow-x: auto; }
.book-tex { color: #cf222e; }
.book-contents h3 { margin-bottom: .2rem; }
.book-pager { display: flex; justify-content: space-between; gap: 1rem; margin-top: 2.5rem;
  padding-top: 1rem; border-top: 1px solid #d0d7de; }
.book-next { margin-left: auto; text-align: right; }
@media (max-width: 900px) {
  .book-layout { display: block; }
  .book-sidebar { position: static; max-height: none; border-right: 0; border-bottom: 1px solid #d0d7de; }
  .book-main { padding: 1rem; }
}
"""


def jupyter_css() -> str:
    """JupyterLab's light theme as nbconvert's lab template inlines it, plus the code colours."""
    static = None
    for base in HTMLExporter(template_name="lab").template_paths:
        candidate = Path(base) / "static"
        if (candidate / "index.css").is_file() and (candidate / "theme-light.css").is_file():
            static = candidate
            break
    if static is None:
        raise FileNotFoundError("nbconvert's lab template CSS (static/index.css) not found")
    from jupyterlab_pygments import JupyterStyle

    pygments = HtmlFormatter(style=JupyterStyle).get_style_defs(".highlight")
    return "\n".join([(static / "index.css").read_text(encoding="utf-8"),
                      (static / "theme-light.css").read_text(encoding="utf-8"), pygments])


HEADING = re.compile(r'<h2 id="([^"]+)">(.*?)<a class="anchor-link"', re.S)
LOCAL_LINK = re.compile(r'(?P<attr>\b(?:href|src))="(?P<target>[^"#:?]+)(?P<rest>[#?][^"]*)?"')


def relative(url: str, from_url: str) -> str:
    """The link from the page ``from_url`` to ``url`` (both paths in the site)."""
    return posixpath.relpath(url, posixpath.dirname(from_url) or ".")


def plain_text(fragment: str) -> str:
    """The text of an HTML fragment (a heading)."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


@dataclass
class Book:
    """Writes the site: ``Book(out).build()``."""

    out: Path
    root: Path = ROOT
    execute: bool = False
    pages: list[Page] = field(default_factory=list)
    log: Any = print

    def __post_init__(self) -> None:
        self.pages = self.pages or book_pages(self.root)
        self.by_source = {page.source: page for page in self.pages}
        self.exporter = BookExporter()

    def build(self) -> list[Path]:
        """Write every page (and its assets) under ``out``; return the pages written."""
        if self.out.exists() and any(self.out.iterdir()):
            if not (self.out / "_static" / "book.css").is_file():  # never wipe a folder we didn't write
                raise FileExistsError(f"{self.out} is not empty and holds no book: pick another --out")
            shutil.rmtree(self.out)
        (self.out / "_static").mkdir(parents=True)
        (self.out / "_static" / "jupyter.css").write_text(jupyter_css(), encoding="utf-8")
        (self.out / "_static" / "book.css").write_text(BOOK_CSS.lstrip(), encoding="utf-8")
        written = []
        for index, page in enumerate(self.pages):
            start = time.perf_counter()
            body = self.render_notebook(page) if page.is_notebook else self.render_readme()
            body = self.link_local_files(body, page)
            target = self.out / page.url
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(self.page_html(index, body), encoding="utf-8")
            written.append(target)
            self.log(f"  {page.url:<55} {time.perf_counter() - start:5.1f} s")
        return written

    def render_readme(self) -> str:
        readme = (self.root / "README.md").read_text(encoding="utf-8")
        return f'<div class="jp-RenderedHTMLCommon jp-RenderedMarkdown">{markdown_to_html(readme)}</div>'

    def render_notebook(self, page: Page) -> str:
        path = self.root / page.source
        nb = nbformat.read(path, as_version=4)
        if self.execute:
            nb = execute_notebook(nb, path, allow_errors=page.lab_version == "student")
        download = self.out / page.source
        download.parent.mkdir(parents=True, exist_ok=True)
        if self.execute:
            nbformat.write(nb, download)
        else:
            shutil.copyfile(path, download)
        resources = {"metadata": {"name": path.stem, "path": str(path.parent)},
                     "book_lab_version": page.lab_version}
        body, _ = self.exporter.from_notebook_node(clean_notebook(nb, self.root), resources=resources)
        return body

    def link_local_files(self, body: str, page: Page) -> str:
        """Make relative links work on the site: a link to a notebook of the book goes to its
        page; any other file of the repository it points at is copied next to it."""
        here = PurePosixPath(page.source).parent

        def fix(match: re.Match[str]) -> str:
            target = posixpath.normpath((here / match["target"]).as_posix())
            rest = match["rest"] or ""
            if target in self.by_source:
                url = relative(self.by_source[target].url, page.url)
                return f'{match["attr"]}="{url}{rest}"'
            source = self.root / target
            if not target.startswith("..") and source.is_file():
                (self.out / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, self.out / target)
            return match[0]

        return LOCAL_LINK.sub(fix, body)

    def page_html(self, index: int, body: str) -> str:
        page = self.pages[index]
        link = functools.partial(relative, from_url=page.url)
        toc: dict[str, list[dict[str, Any]]] = {}
        for other in self.pages:
            toc.setdefault(other.section, []).append(
                {"href": link(other.url), "title": other.title, "current": other is page})
        neighbours = {name: self.pages[i] for name, i in (("prev", index - 1), ("next", index + 1))
                      if 0 <= i < len(self.pages)}
        partner = self.lab_partner(page)
        return PAGE_TEMPLATE.render(
            title=page.label, book_title=BOOK_TITLE, book_subtitle=BOOK_SUBTITLE,
            static=link("_static"), home=link("index.html"),
            toc=list(toc.items()), body=Markup(body),
            headings=[(id_, plain_text(text)) for id_, text in HEADING.findall(body)],
            source=page.source if page.is_notebook else None,
            source_href=link(page.source), lab_version=page.lab_version,
            run_hint=RUN_HINTS[page.lab_version],
            solution_href=partner and link(partner.url), exercise_href=partner and link(partner.url),
            exercise_title=partner and partner.title,
            **{name: {"href": link(p.url), "title": p.label} for name, p in neighbours.items()},
        )

    def lab_partner(self, page: Page) -> Page | None:
        """The solution of a student lab, or the student lab of a solution."""
        path = PurePosixPath(page.source)
        if page.lab_version == "student":
            partner = path.parent / "solutions" / path.name
        elif page.lab_version == "solution":
            partner = path.parent.parent / path.name
        else:
            return None
        return self.by_source.get(partner.as_posix())


def build_book(out: Path, *, root: Path = ROOT, execute: bool = False, log: Any = print) -> list[Path]:
    """Build the site into ``out`` (replacing it); return the HTML pages written."""
    return Book(out=out, root=root, execute=execute, log=log).build()


# ----------------------------------------------------------- serving and looking at the site

@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""

    class QuietHandler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def find_chromium() -> str | None:
    """A Chromium (or Chrome) executable: $BOOK_CHROMIUM, then the usual names on PATH."""
    candidates = [os.environ.get("BOOK_CHROMIUM", "")]
    candidates += [shutil.which(name) or "" for name in CHROMIUM_NAMES] + ["/usr/bin/chromium"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def launch_chromium(playwright: Any, executable: str | None = None) -> Any:
    """A headless Chromium browser, through Playwright, from the system's own Chromium (no
    browser download)."""
    executable = executable or find_chromium()
    if executable is None:
        raise FileNotFoundError("no Chromium found: apt-get install chromium (or set BOOK_CHROMIUM)")
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)


SCREENSHOTS = {  # file name: (page, CSS selector of what to scroll to the middle, or None)
    "book_notebook.png": ("notebooks/01_decode_is_memory_bound.html", ".jp-RenderedImage img"),
    "book_lab.png": ("notebooks/labs/lab1_quantization.html", ".book-callout-exercise"),
}


def take_screenshots(site: Path, out_dir: Path, max_bytes: int = 300_000) -> list[Path]:
    """PNG screenshots (1200x900) of a notebook page scrolled to its first plot and of a lab
    page scrolled to its failing check, into ``out_dir``; a PNG over ``max_bytes`` is reduced
    to 256 colours."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with serve_directory(site) as base, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 900})
            for name, (url, selector) in SCREENSHOTS.items():
                tab.goto(base + url, wait_until="load")
                if selector:
                    tab.eval_on_selector(selector, "e => e.scrollIntoView({block: 'center'})")
                path = out_dir / name
                tab.screenshot(path=str(path))
                if path.stat().st_size > max_bytes:
                    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
                written.append(path)
        finally:
            browser.close()
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "book",
                        help="folder to write the site to (replaced); default build/book")
    parser.add_argument("--execute", action="store_true",
                        help="execute every notebook (copies, in memory) before rendering it")
    parser.add_argument("--screenshots", type=Path, metavar="DIR",
                        help="also write PNG screenshots of two pages to DIR (needs Chromium)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    shown = os.path.relpath(args.out)
    print(f"building the book into {shown}" + (" (executing every notebook)" if args.execute else ""))
    pages = build_book(args.out, execute=args.execute)
    print(f"{len(pages)} pages in {time.perf_counter() - start:.1f} s: open "
          f"{os.path.join(shown, 'index.html')} or run: python -m http.server -d {shown}")
    if args.screenshots:
        for path in take_screenshots(args.out, args.screenshots):
            print(f"screenshot {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
