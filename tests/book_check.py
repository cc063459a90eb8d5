"""Check a built book (scripts/build_book.py) the way a reader's browser sees it.

``check_site(site, browser, required=...)`` serves ``site`` on 127.0.0.1, opens index.html in
headless Chromium and follows every link to another page of the site. On each page it records
as a problem:

* a console error, an uncaught JavaScript error, a request that failed, an HTTP status >= 400
  (a page or file that is missing) or a request that leaves the site (a CDN: the book must
  read offline);
* an ``<img>`` that did not load (``naturalWidth == 0``);
* a link to a file of the site (a notebook download) that is not there;
* in a notebook's outputs, an absolute path of the machine that executed it, a warning on
  stderr, or math left as ``$…$`` TeX in the rendered markdown.

After the crawl, every page of ``required`` that no link led to is a problem too. The
checker knows nothing of how the builder works; tests/test_book.py shows that it fails on
sites broken on purpose.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

ROOT = Path(__file__).resolve().parent.parent


def load_builder() -> Any:
    """scripts/build_book.py as a module (scripts/ is not a package)."""
    if "build_book" not in sys.modules:
        spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["build_book"] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules["build_book"]


# An absolute path from the machine that ran a notebook: a home folder, a temporary folder,
# this repository, or an installed package's folder.
MACHINE_PATH = re.compile(
    r"(?<![\w.~$/-])(?:/root|/home/[^/\s]+|/Users/[^/\s]+|/tmp|/private/var|/var/folders"
    + "|" + re.escape(str(ROOT)) + r")(?=/)"
    + r"|(?<![\w.~$/-])/\S*/(?:site|dist)-packages/"
)
WARNING = re.compile(r"\b(?:[A-Z]\w*)?Warning\b:|^\s*WARNING\b", re.M)
RAW_TEX = re.compile(r"\$\$.+?\$\$|(?<![\w$])\$[^$\s][^$\n]*\\[a-zA-Z]+[^$\n]*\$", re.S)

# What the page tells about itself once loaded.
PAGE_FACTS_JS = """() => ({
  images: Array.from(document.images).map(img => ({
      src: img.getAttribute('src') || '', loaded: img.complete && img.naturalWidth > 0})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  next: (document.querySelector('a[rel~=next]') || {}).href || null,
  outputs: Array.from(document.querySelectorAll('.jp-OutputArea')).map(e => e.textContent).join('\\n'),
  stderr: Array.from(document.querySelectorAll(
      '[data-mime-type="application/vnd.jupyter.stderr"]')).map(e => e.textContent).join('\\n'),
  markdown: Array.from(document.querySelectorAll('.jp-RenderedMarkdown')).map(e => {
      const copy = e.cloneNode(true);
      copy.querySelectorAll('code, pre').forEach(c => c.remove());
      return copy.textContent; }).join('\\n'),
})"""


@dataclass
class SiteReport:
    """What ``check_site`` found: the pages it opened, in order, and what is wrong."""

    visited: list[str] = field(default_factory=list)  # paths in the site, "index.html" first
    problems: list[str] = field(default_factory=list)
    links: dict[str, list[str]] = field(default_factory=dict)  # page -> same-site links (paths)
    next_page: dict[str, str | None] = field(default_factory=dict)  # page -> its rel="next" link

    @property
    def ok(self) -> bool:
        return not self.problems


def _site_path(url: str, base: str) -> str | None:
    """The path in the site that ``url`` points at, or None for a URL outside the site."""
    url = urldefrag(url).url
    if not url.startswith(base):
        return None
    path = unquote(url[len(base):].split("?")[0])
    return path + "index.html" if path == "" or path.endswith("/") else path


def _file_exists(url: str) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            return r.status < 400
    except urllib.error.URLError:
        return False


def check_page(tab: Any, base: str, path: str) -> tuple[list[str], dict[str, Any] | None]:
    """Open ``path`` in ``tab`` (a fresh Playwright page); return its problems and facts."""
    problems: list[str] = []
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(base))
    tab.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    tab.on("pageerror", lambda e: problems.append(f"JavaScript error: {e}"))
    tab.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} ({r.failure})"))
    tab.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    tab.on("request", lambda r: not r.url.startswith((origin, "data:", "about:"))
           and problems.append(f"request leaves the site: {r.url}"))
    try:
        response = tab.goto(base + path, wait_until="load")
    except Exception as exc:  # noqa: BLE001 - a page that can't be opened is a problem, not a crash
        return [f"cannot open: {exc}"], None
    if response is None or response.status >= 400:
        return problems or [f"missing page (HTTP {response and response.status})"], None
    facts = tab.evaluate(PAGE_FACTS_JS)
    for image in facts["images"]:
        if not image["loaded"]:
            problems.append(f"broken image: {image['src'][:80]}")
    for match in MACHINE_PATH.finditer(facts["outputs"]):
        context = facts["outputs"][max(0, match.start() - 30):match.end() + 30].replace("\n", " ")
        problems.append(f"absolute path in an output: …{context}…")
    for match in WARNING.finditer(facts["stderr"]):
        problems.append(f"warning in an output: {facts['stderr'][match.start():match.start() + 80]}")
    for match in RAW_TEX.finditer(facts["markdown"]):
        problems.append(f"unrendered math: {match.group(0)[:60]}")
    return problems, facts


def check_site(site: Path, browser: Any, required: Iterable[str] = (),
               start: str = "index.html", max_pages: int = 1000) -> SiteReport:
    """Serve ``site``, crawl it from ``start`` in ``browser`` (a Playwright Chromium) and
    report every problem; ``required`` are paths in the site that must be reached."""
    builder = load_builder()
    report = SiteReport()
    with builder.serve_directory(site) as base:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        context.set_default_timeout(20_000)
        queue, seen, linked_from = [start], {start}, {start: "(start)"}
        checked_files: set[str] = set()
        try:
            while queue and len(report.visited) < max_pages:
                path = queue.pop(0)
                tab = context.new_page()
                try:
                    problems, facts = check_page(tab, base, path)
                finally:
                    tab.close()
                report.visited.append(path)
                report.problems += [f"{path} (linked from {linked_from[path]}): {p}" for p in problems]
                if facts is None:
                    continue
                links = [p for p in (_site_path(url, base) for url in facts["links"]) if p]
                report.links[path] = links
                report.next_page[path] = facts["next"] and _site_path(facts["next"], base)
                for link in links:
                    if link.endswith(".html"):
                        if link not in seen:
                            seen.add(link)
                            linked_from[link] = path
                            queue.append(link)
                    elif link not in checked_files:
                        checked_files.add(link)
                        if not _file_exists(urljoin(base, link)):
                            report.problems.append(f"{path}: dead link to {link}")
        finally:
            context.close()
    for page in required:
        if page not in seen:
            report.problems.append(f"{page}: no link from {start} leads here")
    return report
