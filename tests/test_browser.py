"""The website as a reader meets it: every page opened in headless Chromium, offline.

The built site (the ``site`` fixture of ``conftest.py``; ``--build-book`` builds it) is
served from ``127.0.0.1`` and opened in one headless Chromium whose network is blocked
(every host name resolves to nothing, and a proxy on a dead port catches the rest). The
browser is driven through the Chrome DevTools Protocol over a websocket (tornado's
client, already installed with Jupyter), which also records every request the pages
make. Each page is loaded once; the tests below then check what was recorded:

* no console error, uncaught exception or failed load on any page;
* every formula typeset by MathJax (no raw ``$$``, ``\\(`` or ``\\[`` left, no MathJax
  error);
* every image loaded;
* no request left the local server;
* every internal link resolves (pages, anchors, downloads);
* the search page finds "attention";
* each notebook page offers its ``.ipynb`` download, and the file is served;
* launch buttons (Binder, Colab) are off until the project has a public repository.

Screenshots of a few pages are saved under ``_build/screenshots/`` for people to look
at. The tests skip, saying why, where no Chromium is installed (``.ci/run`` installs
Debian's ``chromium``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urldefrag, urlparse

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "_build" / "screenshots"
SCREENSHOT_PAGES = (
    "book/preface.html",
    "book/attention_math.html",
    "book/api.html",
    "search.html",
    # The Chinese edition (issue 17): fonts-noto-cjk makes these show characters.
    "zh/book/attention_math.html",
    "zh/search.html",
)
PAGE_TIMEOUT = 30.0  # seconds for one page to load and typeset
SEARCH_TIMEOUT = 20.0
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Text a browser shows where MathJax did not typeset a formula.
RAW_TEX = ("$$", "\\(", "\\)", "\\[", "\\]")

# Runs in each page once it has loaded: waits for MathJax, then reports what the tests
# check.
PAGE_REPORT_JS = r"""
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  const images = Array.from(document.images);
  images.forEach(img => { if (img.loading === 'lazy') img.loading = 'eager'; });
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  // Text a reader sees outside code: raw TeX there means a formula was not typeset.
  const main = (document.querySelector('main') || document.body).cloneNode(true);
  main.querySelectorAll(
      'pre, code, script, style, textarea, .highlight, mjx-container, .MathJax')
      .forEach(e => e.remove());
  return {
    title: document.title,
    text: main.innerText,
    untypeset: Array.from(document.querySelectorAll('.math'))
      .filter(e => !e.querySelector('mjx-container') && !e.closest('mjx-container'))
      .map(e => e.textContent.trim().slice(0, 80)),
    typeset: document.querySelectorAll('mjx-container').length,
    mathjax_errors: Array.from(document.querySelectorAll('mjx-merror'))
      .map(e => e.getAttribute('data-mjx-error') || e.textContent.slice(0, 80)),
    broken_images: images.filter(img => !(img.complete && img.naturalWidth > 0))
      .map(img => img.currentSrc || img.src),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    ids: Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id ||
    e.name),
  };
})()
"""


def _find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (the stdlib's name)
        pass


@dataclass
class PageVisit:
    path: str
    report: dict
    console_errors: list[str] = field(default_factory=list)


@dataclass
class Crawl:
    site: Path
    origin: str
    visits: dict[str, PageVisit]
    requests: list[str]
    search_results: list[str]
    search_error: str | None
    zh_search_results: list[str] = field(default_factory=list)
    zh_search_error: str | None = None


class DevTools:
    """A minimal Chrome DevTools Protocol client: commands in, events collected."""

    def __init__(self, connection):
        self.connection = connection
        self.next_id = 0
        self.events: list[dict] = []

    async def _receive(self, timeout: float) -> dict:
        message = await asyncio.wait_for(self.connection.read_message(), timeout)
        if message is None:
            raise ConnectionError("Chromium closed the DevTools connection")
        return json.loads(message)

    async def send(self, method: str, timeout: float = PAGE_TIMEOUT, **params) -> dict:
        self.next_id += 1
        command_id = self.next_id
        await self.connection.write_message(
            json.dumps({"id": command_id, "method": method, "params": params})
        )
        deadline = time.monotonic() + timeout
        while True:
            data = await self._receive(max(deadline - time.monotonic(), 0.01))
            if data.get("id") == command_id:
                if "error" in data:
                    raise RuntimeError(f"{method} failed: {data['error']}")
                return data.get("result", {})
            if "method" in data:
                self.events.append(data)

    async def wait_for_event(self, method: str, timeout: float = PAGE_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(i)
            data = await self._receive(max(deadline - time.monotonic(), 0.01))
            if "method" in data:
                self.events.append(data)

    async def evaluate(self, expression: str, timeout: float = PAGE_TIMEOUT):
        result = await self.send(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")


def _console_errors(events: list[dict]) -> list[str]:
    """The errors a reader would see in the browser's console, from the collected
    events."""
    errors = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in (
            "error",
            "assert",
        ):
            errors.append(
                "console: "
                + " ".join(
                    str(a.get("value", a.get("description", "")))
                    for a in params.get("args", [])
                )
            )
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(
                "exception: "
                + details.get("exception", {}).get(
                    "description", details.get("text", "")
                )
            )
        elif (
            method == "Log.entryAdded"
            and params.get("entry", {}).get("level") == "error"
        ):
            entry = params["entry"]
            errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            errors.append(
                f"load failed: {params.get('errorText')} ({params.get('requestId')})"
            )
    return errors


async def _crawl(browser: str, site: Path, origin: str, pages: list[str]) -> Crawl:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    profile = tempfile.mkdtemp(prefix="companion-chromium-")
    process = subprocess.Popen(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--mute-audio",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            "--window-size=1280,900",
            # No network: every name resolves to nothing, and anything else goes to a
            # dead proxy.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9",
            "--proxy-bypass-list=127.0.0.1",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Chromium did not start (exit code {process.poll()})"
                )
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=10
        ) as response:
            targets = json.load(response)
        page_target = next(t for t in targets if t.get("type") == "page")
        connection = await websocket_connect(
            HTTPRequest(page_target["webSocketDebuggerUrl"]),
            max_message_size=256 * 1024 * 1024,
        )
        try:
            return await _visit_all(DevTools(connection), site, origin, pages)
        finally:
            connection.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _visit_all(
    devtools: DevTools, site: Path, origin: str, pages: list[str]
) -> Crawl:
    for domain in ("Page", "Runtime", "Log", "Network"):
        await devtools.send(f"{domain}.enable")
    await devtools.send("Network.setCacheDisabled", cacheDisabled=True)
    requests: list[str] = []

    async def load(url: str) -> list[dict]:
        devtools.events.clear()
        await devtools.send("Page.navigate", url=url)
        await devtools.wait_for_event("Page.loadEventFired")
        return devtools.events

    def take(events: list[dict]) -> list[dict]:
        taken = list(events)
        requests.extend(
            e["params"]["request"]["url"]
            for e in taken
            if e["method"] == "Network.requestWillBeSent"
        )
        events.clear()
        return taken

    visits: dict[str, PageVisit] = {}
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for path in pages:
        events = await load(f"{origin}/{path}")
        report = await devtools.evaluate(PAGE_REPORT_JS)
        visits[path] = PageVisit(path, report, _console_errors(take(events)))
        if path in SCREENSHOT_PAGES and not path.endswith("search.html"):
            shot = await devtools.send("Page.captureScreenshot", format="png")
            (SCREENSHOTS / path.replace("/", "_").replace(".html", ".png")).write_bytes(
                base64.b64decode(shot["data"])
            )

    search_results, search_error = await _search(
        devtools, load, take, f"{origin}/search.html?q=attention", "search.png"
    )
    zh_search_results, zh_search_error = [], None
    if (site / "zh" / "search.html").is_file():
        zh_search_results, zh_search_error = await _search(
            devtools,
            load,
            take,
            f"{origin}/zh/search.html?q=" + quote("注意力"),
            "zh_search.png",
        )
    return Crawl(
        site,
        origin,
        visits,
        requests,
        search_results,
        search_error,
        zh_search_results,
        zh_search_error,
    )


async def _search(devtools, load, take, url: str, screenshot: str):
    """Open a search page and wait for its results (filled from searchindex.js)."""
    search_results: list[str] = []
    search_error = None
    events = await load(url)
    # Results appear one by one; the search is done when the summary line is written.
    deadline = time.monotonic() + SEARCH_TIMEOUT
    while time.monotonic() < deadline:
        state = await devtools.evaluate(
            "({done: !!(document.querySelector('#search-results .search-summary')"
            " || {}).textContent,"
            " links: Array.from(document.querySelectorAll('#search-results li a'))"
            ".map(a => a.href)})"
        )
        search_results = state["links"]
        if state["done"]:
            break
        await asyncio.sleep(0.25)
    errors = _console_errors(take(events))
    if errors:
        search_error = "; ".join(errors)
    shot = await devtools.send("Page.captureScreenshot", format="png")
    (SCREENSHOTS / screenshot).write_bytes(base64.b64decode(shot["data"]))
    return search_results, search_error


@pytest.fixture(scope="module")
def origin(site):
    """The built site served from 127.0.0.1 for the module's tests (links are fetched
    too)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def crawl(site, origin) -> Crawl:
    browser = _find_browser()
    if browser is None:
        pytest.skip(
            "no Chromium found (tried: " + ", ".join(BROWSERS) + "); "
            "install Debian's `chromium` (`.ci/run` does) to run the browser tests"
        )
    pages = sorted(
        p.relative_to(site).as_posix()
        for p in site.rglob("*.html")
        if "_static" not in p.parts and not _is_redirect(p)
    )
    return asyncio.run(_crawl(browser, site, origin, pages))


def _is_redirect(page: Path) -> bool:
    """``index.html`` only sends the browser on to the preface (the site test checks
    where)."""
    return 'http-equiv="refresh"' in page.read_text(encoding="utf-8")[:500].lower()


def _http_status(url: str) -> int:
    request = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_every_page_was_opened(crawl):
    assert len(crawl.visits) >= 10, f"only {len(crawl.visits)} pages found in the site"
    assert "book/preface.html" in crawl.visits and "book/api.html" in crawl.visits


def test_no_console_errors(crawl):
    errors = [f"{v.path}: {e}" for v in crawl.visits.values() for e in v.console_errors]
    assert not errors, "errors in the browser console:\n" + "\n".join(errors[:40])


def test_every_formula_is_typeset(crawl):
    problems = []
    for visit in crawl.visits.values():
        report = visit.report
        raw = [tex for tex in RAW_TEX if tex in report["text"]]
        if raw:
            i = min(report["text"].find(t) for t in raw)
            problems.append(
                f"{visit.path}: raw TeX {raw} left in the text: "
                f"...{report['text'][max(i - 60, 0) : i + 60]!r}"
            )
        if report["untypeset"]:
            problems.append(
                f"{visit.path}: formulas not typeset: {report['untypeset'][:3]}"
            )
        if report["mathjax_errors"]:
            problems.append(
                f"{visit.path}: MathJax errors: {report['mathjax_errors'][:3]}"
            )
    assert not problems, "\n".join(problems)
    typeset = {
        v.path: v.report["typeset"]
        for v in crawl.visits.values()
        if v.report["typeset"]
    }
    assert "book/attention_math.html" in typeset, (
        "MathJax typeset nothing in the attention chapter; pages with math: "
        f"{sorted(typeset)}"
    )


def test_every_image_loaded(crawl):
    broken = [
        f"{v.path}: {src}"
        for v in crawl.visits.values()
        for src in v.report["broken_images"]
    ]
    assert not broken, "images that did not load:\n" + "\n".join(broken[:40])


def test_no_request_leaves_the_local_server(crawl):
    assert crawl.requests, "no request was recorded: the check would prove nothing"
    outside = sorted(
        {
            url
            for url in crawl.requests
            if not url.startswith(crawl.origin + "/")
            and urlparse(url).scheme not in ("data", "blob", "about")
        }
    )
    assert not outside, "requests to other hosts:\n" + "\n".join(outside[:40])


def test_internal_links_resolve(crawl):
    ids = {path: set(v.report["ids"]) for path, v in crawl.visits.items()}
    broken, fetched = [], {}
    for visit in crawl.visits.values():
        for link in visit.report["links"]:
            if not link.startswith(crawl.origin + "/"):
                continue
            url, fragment = urldefrag(link)
            path = urlparse(url).path.lstrip("/") or "index.html"
            if path.endswith("/"):
                path += "index.html"
            if path in ids:
                if fragment and fragment not in ids[path]:
                    broken.append(
                        f"{visit.path}: {link} (no element with id {fragment!r})"
                    )
                continue
            if url not in fetched:
                fetched[url] = _http_status(url)
            if fetched[url] != 200:
                broken.append(f"{visit.path}: {link} (HTTP {fetched[url]})")
    assert not broken, "internal links that do not resolve:\n" + "\n".join(
        sorted(set(broken))[:40]
    )


def test_search_finds_attention(crawl):
    assert crawl.search_error is None, (
        f"the search page logged errors: {crawl.search_error}"
    )
    assert crawl.search_results, "search.html?q=attention listed no result"
    pages = {urlparse(u).path for u in crawl.search_results}
    assert "/book/attention_math.html" in pages, (
        f"the attention chapter is not among the results: {sorted(pages)}"
    )


def test_zh_edition_pages_were_opened(crawl):
    if not (crawl.site / "zh" / "index.html").is_file():
        pytest.skip("no Chinese edition in _build/html/zh: run `make book`")
    english = {p for p in crawl.visits if not p.startswith("zh/")}
    chinese = {p[3:] for p in crawl.visits if p.startswith("zh/")}
    assert english == chinese, (
        f"pages only in English: {sorted(english - chinese)}; "
        f"only in Chinese: {sorted(chinese - english)}"
    )


def test_zh_search_finds_attention(crawl):
    if not (crawl.site / "zh" / "search.html").is_file():
        pytest.skip("no Chinese edition in _build/html/zh: run `make book`")
    assert crawl.zh_search_error is None, (
        f"the zh search page logged errors: {crawl.zh_search_error}"
    )
    pages = {urlparse(u).path for u in crawl.zh_search_results}
    assert pages, "zh/search.html?q=注意力 listed no result"
    assert "/zh/book/attention_math.html" in pages, (
        f"the zh attention chapter is not among the results: {sorted(pages)}"
    )


def test_notebooks_offer_their_ipynb_download(crawl):
    notebooks = sorted(
        p.relative_to(crawl.site).with_suffix(".ipynb").as_posix()
        for p in (crawl.site / "_sources").rglob("*.ipynb")
    )
    assert notebooks, (
        "no .ipynb under _sources: the download buttons would have nothing to offer"
    )
    for path in ("book/attention_math.html", "book/api.html"):
        downloads = [
            link
            for link in crawl.visits[path].report["links"]
            if link.endswith(".ipynb")
        ]
        expected = f"{crawl.origin}/_sources/{path.replace('.html', '.ipynb')}"
        assert expected in downloads, (
            f"{path} offers no download of its notebook; .ipynb links: {downloads}"
        )
        assert (crawl.site / "_sources" / path.replace(".html", ".ipynb")).is_file()


def test_launch_buttons_are_off(crawl):
    launch = [
        f"{v.path}: {link}"
        for v in crawl.visits.values()
        for link in v.report["links"]
        if "colab.research.google.com" in link
        or "mybinder" in link
        or "binder/v2" in link
    ]
    assert not launch, (
        "launch buttons are on, but the project has no public repository yet:\n"
        + "\n".join(launch[:5])
    )


def test_screenshots_are_saved(crawl):
    for path in SCREENSHOT_PAGES:
        if path.startswith("zh/") and not (crawl.site / "zh").is_dir():
            continue
        shot = SCREENSHOTS / path.replace("/", "_").replace(".html", ".png")
        assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", (
            f"no screenshot {shot}"
        )
        assert shot.stat().st_size > 5000, (
            f"{shot} is almost empty: the page probably did not render"
        )
