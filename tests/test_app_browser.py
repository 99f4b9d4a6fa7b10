"""The web UI in a real browser: Playwright driving Debian's headless Chromium.

Playwright (PyPI ``playwright``, in the ``dev`` extra) drives the system's Chromium through
``executable_path``; ``playwright install`` (which downloads browsers) is never needed. Where
playwright or Chromium is missing the tests are skipped with a message saying how to get it.

Screenshots go to a temporary folder, or to ``$SCE_SCREENSHOTS`` (relative to the repository):
``SCE_SCREENSHOTS=docs python -m pytest tests/test_app_browser.py`` rewrites the README's
``docs/web-ui-search.png`` and ``docs/web-ui-clusters.png`` (from the slow test, which indexes
260 hand emoji of the sample corpus with the default encoder).
"""
from __future__ import annotations

import csv
import os
import shutil
import socket
from pathlib import Path

import pytest
from conftest import ToyEncoder, make_image

pytest.importorskip("gradio")
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright is not installed: pip install playwright (or pip install -e '.[dev]'); the tests use "
           "the system's Chromium, so never run `playwright install`")
# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:gradio\..*")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--mute-audio",
]
VIEWPORT = {"width": 1400, "height": 1000}
TIMEOUT_MS = 90_000
#: The README's screenshots (docs/): an A/B search whose original results all show one skin tone.
AB_QUERY = "raised fist dark skin tone"
HAND_SUBCATEGORIES = {"hand-fingers-open", "hand-fingers-partial", "hand-single-finger", "hand-fingers-closed",
                      "hands"}
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")


def find_chromium() -> str | None:
    for candidate in (os.environ.get("SCE_CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium not found (/usr/bin/chromium): run .ci/install-chromium (Debian: apt-get install "
                    "chromium), or point SCE_CHROMIUM at a Chromium binary, to run the browser tests")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_app(browser, url: str):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#search-button")
    return page


def screenshot_folder(tmp: Path) -> Path:
    """``$SCE_SCREENSHOTS`` (relative paths from the repository root), else ``tmp``."""
    chosen = os.environ.get("SCE_SCREENSHOTS")
    folder = (REPO / chosen) if chosen else tmp
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for_images(page, selector: str, at_least: int) -> int:
    """Wait until ``selector`` holds at least ``at_least`` images, all loaded; returns how many."""
    page.wait_for_function(
        "([selector, n]) => { const imgs = [...document.querySelectorAll(selector + ' img')];"
        " return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        arg=[selector, at_least])
    return page.locator(f"{selector} img").count()


def click_tab(page, label: str) -> None:
    page.get_by_role("tab", name=label, exact=True).click()


def assert_not_blank(shot: Path) -> None:
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").resize((200, 200)).getcolors(maxcolors=200 * 200)
    assert colours is not None and len(colours) > 50, f"{shot} looks blank"


# ------------------------------------------------------------------ the toy collection: behaviour
@pytest.fixture(scope="module")
def served(tmp_path_factory, browser):
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
    url = launch_app(app, port=free_port(), block=False, quiet=True)
    page = open_app(browser, url)
    try:
        yield {"page": page, "root": root}
    finally:
        page.close()
        close_app(app)


def test_search_renders_both_galleries(served):
    page, root = served["page"], served["root"]
    page.locator("#query-text textarea, #query-text input").first.fill("item 4")
    page.click("#search-button")
    sync_api.expect(page.locator("#search-summary")).to_contain_text("overlap@12", timeout=TIMEOUT_MS)
    for gallery in ("#original-gallery", "#corrected-gallery"):
        assert wait_for_images(page, gallery, 12) >= 12
        # Served from the app's cache, not from the collection's image folder.
        sources = page.locator(f"{gallery} img").evaluate_all("imgs => imgs.map(i => i.src)")
        assert all("/gradio_api/file=" in src and str(root / "imgs") not in src for src in sources), sources
    assert "no-tone" in page.inner_text("#search-summary")
    assert "Traceback" not in page.content()
    moves = page.inner_text("#moves-table")
    assert "corrected rank" in moves and "item " in moves
    page.screenshot(path=root / "1-search.png", full_page=True)
    assert_not_blank(root / "1-search.png")


def test_an_error_is_a_message_not_a_traceback(served):
    page = served["page"]
    page.locator("#query-text textarea, #query-text input").first.fill("")
    page.click("#search-button")
    message = page.get_by_text("type a text query or upload an image")
    sync_api.expect(message.first).to_be_visible(timeout=TIMEOUT_MS)
    assert "Traceback" not in page.inner_text("body")


def test_other_tabs_render_their_results(served):
    page, root = served["page"], served["root"]
    click_tab(page, "Corrections")
    page.click("#concept-report-button")
    sync_api.expect(page.locator("#concept-report")).to_contain_text("SCE score", timeout=TIMEOUT_MS)
    table = page.inner_text("#corrections-table")
    assert "no-tone" in table and "image index" in table

    click_tab(page, "Clusters")
    page.click("#clusters-button")
    sync_api.expect(page.locator("#clusters-summary")).to_contain_text("pairs", timeout=TIMEOUT_MS)
    assert wait_for_images(page, ".mode-gallery", 12 * 3) >= 12 * 3
    page.screenshot(path=root / "3-clusters.png", full_page=True)
    assert_not_blank(root / "3-clusters.png")

    click_tab(page, "Report")
    page.click("#report-button")
    sync_api.expect(page.locator("#report-score")).to_contain_text("SCE score", timeout=TIMEOUT_MS)
    page.wait_for_function("[...document.querySelectorAll('img')].filter(i => (i.src.includes('spectra')"
                           " || i.src.includes('modes')) && i.naturalWidth > 0).length >= 2")


# ------------------------------------------------ the sample corpus' hands: the README's screenshots
@pytest.fixture(scope="module")
def hands(tmp_path_factory, browser):
    """The 260 hand emoji of the sample corpus with the default encoder, corrected by no-skin-tone
    (fitted from the five tones of 40 of them, a subset of data/concepts/skin_tone_large.csv)."""
    from ui.app import build_app, close_app, launch_app

    from indexing.collection import Collection
    from indexing.pipeline import build_collection
    from retrieval.concepts import load_concept_set
    from retrieval.corrections import fit_concept_correction

    sample = REPO / "data" / "sample"
    root = tmp_path_factory.mktemp("hands")
    captions = {row["file"]: row for row in csv.DictReader((sample / "captions.csv").open(encoding="utf-8"))}
    chosen = [row for row in captions.values() if row["subcategory"] in HAND_SUBCATEGORIES]
    with (root / "hands.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "caption", "skin_tone", "subcategory"])
        writer.writerows([str(sample / row["file"]), row["caption"], row["skin_tone"], row["subcategory"]]
                         for row in chosen)
    concepts = root / "concepts"
    concepts.mkdir()
    with (concepts / "hand_tones.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "image"])
        for row in csv.DictReader((REPO / "data" / "concepts" / "skin_tone_large.csv").open(encoding="utf-8")):
            image = row["image"].removeprefix("../sample/")
            if captions[image]["subcategory"] in HAND_SUBCATEGORIES:
                writer.writerow([row["prompt"], str(sample / image)])
    build_collection(root / "hands.csv", root / "coll", encoder="default", progress=False)
    with Collection.open(root / "coll") as coll:
        fit_concept_correction(coll, coll.load_encoder(), load_concept_set(concepts / "hand_tones.csv"),
                               name="no-skin-tone")
    app = build_app(root / "coll", concepts_dir=concepts)
    url = launch_app(app, port=free_port(), block=False, quiet=True)
    page = open_app(browser, url)
    try:
        yield {"page": page, "root": root, "count": len(chosen)}
    finally:
        page.close()
        close_app(app)


def tones_of(page, gallery: str) -> list[str]:
    """The skin tone named in each result caption of ``gallery`` ("" for the default yellow)."""
    captions = page.locator(f"{gallery} .caption-label").all_inner_texts()
    found = []
    for caption in captions:
        named = [tone for tone in TONES if f"{tone} skin tone" in caption]
        found.append(max(named, key=len) if named else "")
    return found


@pytest.mark.slow
def test_screenshots_of_the_ab_search_and_the_clusters(hands, tmp_path):
    page, folder = hands["page"], screenshot_folder(tmp_path)
    page.locator("#query-text textarea, #query-text input").first.fill(AB_QUERY)
    page.click("#search-button")
    sync_api.expect(page.locator("#search-summary")).to_contain_text("overlap@12", timeout=TIMEOUT_MS)
    for gallery in ("#original-gallery", "#corrected-gallery"):
        assert wait_for_images(page, gallery, 12) == 12
    # The original results all show the dark skin tone; the corrected ones show the fist in every tone.
    assert tones_of(page, "#original-gallery") == ["dark"] * 12
    corrected = tones_of(page, "#corrected-gallery")
    assert set(TONES) <= set(corrected), corrected
    assert "no-skin-tone" in page.inner_text("#search-summary")
    shot = folder / "web-ui-search.png"
    page.locator(".tabs").first.screenshot(path=shot)
    assert_not_blank(shot)

    click_tab(page, "Clusters")
    page.get_by_label("a concept set").check()
    page.click("#clusters-button")
    sync_api.expect(page.locator("#clusters-summary")).to_contain_text("200 pairs", timeout=TIMEOUT_MS)
    assert wait_for_images(page, ".mode-gallery", 12 * 8) >= 12 * 8
    shot = folder / "web-ui-clusters.png"
    page.locator(".tabs").first.screenshot(path=shot)
    assert_not_blank(shot)
