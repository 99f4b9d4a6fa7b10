"""The web UI in a real browser: Debian's headless Chromium, driven over the DevTools pipe.

No browser driver is needed: Chromium's ``--remote-debugging-pipe`` speaks the DevTools
protocol (NUL-separated JSON) on file descriptors 3 and 4. Where Chromium is missing the
tests are skipped with a message (`.ci/install-chromium` installs it on Debian).
Set SCE_UI_SCREENSHOTS=<folder> to keep the screenshots.
"""
from __future__ import annotations

import csv
import json
import os
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ToyEncoder, make_image

pytest.importorskip("gradio")
# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:gradio\..*")

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--window-size=1400,1000",
)
WIDTH = 1400


def find_chromium() -> str | None:
    for candidate in (os.environ.get("SCE_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class DevTools:
    """A minimal DevTools-protocol client over Chromium's --remote-debugging-pipe."""

    def __init__(self, executable: str, profile: Path, log: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The pipe transport wants its ends as fd 3 (commands in) and fd 4 (replies out); bash
        # (unlike dash) redirects file descriptors above 9.
        wrapper = f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        with log.open("wb") as err:
            self.process = subprocess.Popen(
                [shutil.which("bash") or "/bin/bash", "-c", wrapper, executable, *CHROMIUM_FLAGS,
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
                pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5, session=False)
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply from Chromium")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (status {self.process.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, *, timeout: float = 30, session: bool = True) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open_page(self, url: str, height: int = 1000) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.resize(height)
        self.call("Page.navigate", {"url": url})

    def resize(self, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} failed in the page: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            time.sleep(0.25)

    def type_into(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text})

    def click(self, selector: str) -> None:
        assert self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                             " if (!e) return false; e.click(); return true; })()"), selector

    def click_tab(self, label: str) -> None:
        found = self.evaluate(
            "(() => { const tab = [...document.querySelectorAll('button[role=\"tab\"]')]"
            f".find(b => b.textContent.trim() === {json.dumps(label)}); if (!tab) return false; tab.click();"
            " return true; })()")
        assert found, f"no tab named {label}"

    def screenshot(self, path: Path) -> Path:
        """The whole page (the viewport grows to the content's height for the capture)."""
        height = 0
        for _ in range(3):  # a taller viewport can change the layout: measure until it settles
            measured = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)") or 1000)
            if measured == height:
                break
            height = measured
            self.resize(min(max(height, 600), 8000))
            time.sleep(0.5)
        data = self.call("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"]
        self.resize(1000)
        import base64

        path.write_bytes(base64.b64decode(data))
        return path


def gallery_state(selector: str) -> str:
    """JS: how many images the gallery shows and how many of them loaded."""
    return (f"(() => {{ const imgs = [...document.querySelectorAll('{selector} img')];"
            " return {shown: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length}; })()")


@pytest.fixture(scope="module")
def chromium() -> str:
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium not found (/usr/bin/chromium): run .ci/install-chromium (Debian: apt-get install "
                    "chromium) to run the browser tests")
    return executable


@pytest.fixture(scope="module")
def served(tmp_path_factory, chromium):
    from ui.app import build_app, close_app, launch_app

    from indexing.collection import Collection
    from indexing.pipeline import build_collection
    from retrieval.concepts import load_concept_set
    from retrieval.corrections import fit_concept_correction

    root = tmp_path_factory.mktemp("browser")
    encoder = ToyEncoder()
    with (root / "list.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "caption", "tone"])
        for i in range(30):
            make_image(root / "imgs" / f"{i:03d}.png", seed=i, size=(48, 48))
            writer.writerow([f"imgs/{i:03d}.png", f"item {i}", "dark" if i % 2 else ""])
    build_collection(root / "list.csv", root / "coll", encoder=encoder, progress=False)
    concepts = root / "concepts"
    concepts.mkdir()
    with (concepts / "tone.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "image"])
        writer.writerows([f"tone {i % 3}", f"../imgs/{i:03d}.png"] for i in range(12))
    with Collection.open(root / "coll") as coll:
        fit_concept_correction(coll, encoder, load_concept_set(concepts / "tone.csv"), name="no-tone",
                               n_components=2)
    app = build_app(root / "coll", encoder=encoder, concepts_dir=concepts)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = launch_app(app, port=port, block=False, quiet=True)
    browser = DevTools(chromium, root / "profile", root / "chromium.log")
    try:
        browser.open_page(url)
        browser.wait_for("!!document.querySelector('#search-button')", 90, "the app to load")
        yield {"browser": browser, "root": root}
    finally:
        browser.close()
        close_app(app)


def keep(shot: Path) -> None:
    folder = os.environ.get("SCE_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(folder) / shot.name)


def assert_not_blank(shot: Path) -> None:
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").resize((200, 200)).getcolors(maxcolors=200 * 200)
    assert colours is not None and len(colours) > 50, f"{shot} looks blank"


def test_search_renders_both_galleries(served):
    browser = served["browser"]
    browser.type_into("#query-text textarea, #query-text input", "item 4")
    browser.click("#search-button")
    browser.wait_for("document.querySelector('#search-summary').innerText.includes('overlap@')", 60,
                     "the search summary")
    for gallery in ("#original-gallery", "#corrected-gallery"):
        state = browser.wait_for(f"(() => {{ const s = {gallery_state(gallery)};"
                                 " return s.shown >= 12 && s.loaded === s.shown ? s : null; })()",
                                 30, f"{gallery} images to load")
        assert state["shown"] >= 12
    summary = browser.evaluate("document.querySelector('#search-summary').innerText")
    assert "overlap@12" in summary and "no-tone" in summary
    page = browser.evaluate("document.documentElement.outerHTML")
    assert "Traceback" not in page
    moves = browser.evaluate("document.querySelector('#moves-table').innerText")
    assert "corrected rank" in moves and "item " in moves
    shot = browser.screenshot(served["root"] / "1-search.png")
    assert_not_blank(shot)
    keep(shot)


def test_an_error_is_a_message_not_a_traceback(served):
    browser = served["browser"]
    browser.evaluate("(() => { const e = document.querySelector('#query-text textarea, #query-text input');"
                     " e.value = ''; e.dispatchEvent(new Event('input', {bubbles: true})); })()")
    browser.click("#search-button")
    text = browser.wait_for("(() => { const t = document.body.innerText;"
                            " return t.includes('type a text query or upload an image') ? t : null; })()",
                            30, "the error message")
    assert "Traceback" not in text


def test_other_tabs_render_their_results(served):
    browser, root = served["browser"], served["root"]
    browser.click_tab("Corrections")
    browser.click("#concept-report-button")
    browser.wait_for("document.querySelector('#concept-report').innerText.includes('SCE score')", 60,
                     "the concept set's SCE report")
    table = browser.evaluate("document.querySelector('#corrections-table').innerText")
    assert "no-tone" in table and "image index" in table
    shot = browser.screenshot(root / "2-corrections.png")
    assert_not_blank(shot)
    keep(shot)

    browser.click_tab("Clusters")
    browser.click("#clusters-button")
    browser.wait_for("document.querySelector('#clusters-summary').innerText.includes('pairs')", 60,
                     "the clusters summary")
    browser.wait_for("(() => { const imgs = [...document.querySelectorAll('.mode-gallery img')];"
                     " return imgs.length >= 12 * 3 && imgs.every(i => i.complete && i.naturalWidth > 0); })()",
                     30, "the mode galleries to load")
    shot = browser.screenshot(root / "3-clusters.png")
    assert_not_blank(shot)
    keep(shot)

    browser.click_tab("Report")
    browser.click("#report-button")
    browser.wait_for("document.querySelector('#report-score').innerText.includes('SCE score')", 60,
                     "the SCE report")
    browser.wait_for("[...document.querySelectorAll('img')].filter(i => i.src.includes('spectra')"
                     " || i.src.includes('modes')).length >= 2", 30, "the report's plots")
    shot = browser.screenshot(root / "4-report.png")
    assert_not_blank(shot)
    keep(shot)
