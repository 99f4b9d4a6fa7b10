"""The web UI's Heads tab (ui/tab_heads.py) and retrieval.heads.patch_heatmap, on a tiny random ViT.

The collection is built with tests/test_decompose_cli.py's TinyVitEncoder (a 2-layer, 3-head
open_clip VisionTransformer with random weights, 32 px, a 4 x 4 patch grid) and served; the
endpoints are driven with gradio_client, as tests/test_app.py does. Nothing is downloaded: the
text bank is this checkout's data/text_banks/general.txt, the "text tower" hashes texts to
seeded vectors. Independent computations: the decomposition's terms dotted in numpy, the
non-token decomposition for the per-token sum, numpy variances and argsort for the top images.
"""
from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
from conftest import ToyEncoder, make_image, write_csv  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from open_clip.transformer import VisionTransformer  # noqa: E402
from test_decompose_cli import HEADS, LAYERS, TinyVitEncoder  # noqa: E402

from indexing.collection import Collection  # noqa: E402
from indexing.encoders.decomposition import decompose  # noqa: E402
from indexing.pipeline import build_collection  # noqa: E402
from retrieval.heads import head_report, patch_heatmap, read_bank, sample_items  # noqa: E402

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:gradio\..*")

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 30
SAMPLE, COMPONENTS = 20, 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64) / np.linalg.norm(x)


def tiny_tower(image_size=(32, 48), layer_scale=None, seed=1) -> VisionTransformer:
    torch.manual_seed(seed)
    visual = VisionTransformer(image_size=image_size, patch_size=8, width=48, layers=2, heads=3, mlp_ratio=2.0,
                               output_dim=24, ls_init_value=layer_scale).eval()
    with torch.no_grad():
        for param in visual.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return visual


def expect_error(call, pattern: str) -> str:
    with pytest.raises(AppError) as caught:
        call()
    message = str(caught.value)
    assert re.search(pattern, message), message
    assert "Traceback" not in message and "This is a bug" not in message and "\n" not in message
    return message


# ------------------------------------------------------------------------------ patch_heatmap alone
@pytest.mark.parametrize("image_size, layer_scale", [((32, 32), None), ((32, 48), 0.5)])
def test_patch_heatmap_is_the_patch_tokens_terms_along_the_text(image_size, layer_scale):
    visual = tiny_tower(image_size, layer_scale)
    pixels = torch.randn(3, *image_size, generator=torch.Generator().manual_seed(0))
    text = np.random.default_rng(0).standard_normal(24)
    rows, cols = image_size[0] // 8, image_size[1] // 8
    per_token = decompose(visual, pixels[None], tokens=True).heads[0]  # (layers, heads, 1 + rows * cols, dim)
    per_head = decompose(visual, pixels[None]).heads[0]  # (layers, heads, dim): mixed before projecting
    for layer in range(2):
        for head in range(3):
            grid = patch_heatmap(visual, pixels, text, layer, head)
            assert grid.shape == (rows, cols)
            dots = np.array([per_token[layer, head, t] @ unit(text) for t in range(1, 1 + rows * cols)])
            np.testing.assert_allclose(grid.ravel(), dots, rtol=1e-12, atol=1e-15)
            # The patches and the class token's own term sum to the head's term along the text.
            class_term = per_token[layer, head, 0] @ unit(text)
            assert grid.sum() + class_term == pytest.approx(per_head[layer, head] @ unit(text), rel=1e-9, abs=1e-12)
            # Only the direction of the text vector counts.
            np.testing.assert_allclose(patch_heatmap(visual, pixels[None].numpy(), 7.5 * text, layer, head), grid,
                                       rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_the_patch_grid_is_rows_then_columns(layer_scale):
    """Change one patch of a 4 x 6 grid: at layer 0 only its cell changes other than by a common factor.

    A cell of layer 0 is a(cls, t) (v_t W_O + b_O / H) through ln_post's 1/sigma: the class row's
    query does not depend on the image and v_t only on patch t, so changing patch p rescales
    every other cell by one factor (the softmax's normaliser and the image's 1/sigma) and
    changes cell p by another. (The largest change is not always at p: in a random tower the
    changed patch can have a tiny attention weight while the common factor moves far from 1.)
    """
    visual = tiny_tower((32, 48), layer_scale)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 32, 48, generator=generator)
    text = np.random.default_rng(0).standard_normal(24)
    for row, col in [(0, 5), (3, 1), (2, 4), (1, 0)]:
        changed = base.clone()
        changed[:, 8 * row:8 * row + 8, 8 * col:8 * col + 8] = torch.randn(3, 8, 8, generator=generator)
        for head in range(3):
            ratio = patch_heatmap(visual, changed, text, 0, head) / patch_heatmap(visual, base, text, 0, head)
            others = np.ones(ratio.shape, dtype=bool)
            others[row, col] = False
            common = ratio[others][0]
            np.testing.assert_allclose(ratio[others], common, rtol=1e-9)
            assert abs(ratio[row, col] - common) > 1e-3 * abs(common), (row, col, head)


def test_patch_heatmap_refuses_bad_input():
    from sce_correct.errors import InputError

    visual = tiny_tower((32, 32))
    pixels = torch.zeros(3, 32, 32)
    text = np.ones(24)
    with pytest.raises(InputError, match="layer must be an integer from 0 to 1"):
        patch_heatmap(visual, pixels, text, 2, 0)
    with pytest.raises(InputError, match="head must be an integer from 0 to 2"):
        patch_heatmap(visual, pixels, text, 0, True)
    with pytest.raises(InputError, match="finite non-zero 24-d vector"):
        patch_heatmap(visual, pixels, np.ones(23), 0, 0)
    with pytest.raises(InputError, match="finite non-zero 24-d vector"):
        patch_heatmap(visual, pixels, np.zeros(24), 0, 0)
    with pytest.raises(InputError, match="one preprocessed image"):
        patch_heatmap(visual, torch.zeros(2, 3, 32, 32), text, 0, 0)


# ------------------------------------------------------------------------------ the tab, served
@pytest.fixture(scope="module")
def checkout_data():
    """This checkout's data/ as the shipped data (the venv's install may be another checkout's)."""
    import indexing.shipped_data as shipped

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shipped, "_package_root", lambda: REPO / "data")
        yield


def tiny_vit_collection(root: Path) -> tuple[Path, TinyVitEncoder]:
    rows = []
    for i in range(N_ITEMS):
        make_image(root / "imgs" / f"{i:03d}.png", seed=i, size=(32, 32))
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"picture number {i}"})
    encoder = TinyVitEncoder()
    build_collection(write_csv(root / "list.csv", rows), root / "coll", encoder=encoder, progress=False)
    return root / "coll", encoder


@pytest.fixture(scope="module")
def site(tmp_path_factory, checkout_data):
    from ui.app import build_app, close_app, launch_app

    root = tmp_path_factory.mktemp("heads")
    coll, encoder = tiny_vit_collection(root)
    app = build_app(coll, encoder=encoder)
    url = launch_app(app, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(root / "downloads"))
    yield {"root": root, "coll": coll, "app": app, "url": url, "client": client, "encoder": encoder}
    close_app(app)


def independent_report(site):
    encoder = site["encoder"]
    with Collection.open(site["coll"]) as coll:
        sample = sample_items(coll, SAMPLE, 0)
    decomposition = decompose(encoder.visual, encoder.preprocess_batch(sample.paths))
    _, bank = read_bank(REPO / "data" / "text_banks" / "general.txt")
    report = head_report(decomposition, bank, encoder.encode_texts(bank), sample.ids, components=COMPONENTS,
                         top_images=8)
    return sample, decomposition.heads, bank, report


def test_heads_endpoint_shows_each_heads_texts_and_top_images(site):
    client, encoder = site["client"], site["encoder"]
    sample, heads, bank, report = independent_report(site)
    paths = dict(zip((int(i) for i in sample.ids), sample.paths))
    for layer, head in [(1, 2), (0, 0)]:
        summary, texts, gallery, overview = client.predict(SAMPLE, COMPONENTS, layer, head, api_name="/heads")
        outputs = heads[:, layer, head]
        total = outputs.var(axis=0).sum()
        assert f"**Layer {layer}, head {head}** of {LAYERS} x {HEADS}" in summary
        assert f"total variance {total:.4g} over {SAMPLE} sampled images" in summary
        assert "general.txt" in summary and str(site["root"]) not in summary
        entry = report["entries"][layer * HEADS + head]
        assert texts["headers"] == ["rank", "text", "variance", "share of the head's variance"]
        assert [row[1] for row in texts["data"]] == [c["text"] for c in entry["components"]]
        assert [row[3] for row in texts["data"]] == [f"{c['variance'] / total:.1%}" for c in entry["components"]]
        assert texts["data"][0][1] in bank
        # Top images: the sampled images whose head output points most along the first text (numpy argsort).
        first = unit(encoder.encode_texts([texts["data"][0][1]])[0])
        order = np.argsort(-(outputs @ first), kind="stable")[:8]
        want = [int(sample.ids[i]) for i in order]
        assert [int(re.search(r"\bid (\d+)\b", item["caption"]).group(1)) for item in gallery] == want
        for item, item_id in zip(gallery, want):  # the very files, served from the app's cache
            assert Path(item["image"]).read_bytes() == Path(paths[item_id]).read_bytes()
        assert [(row[0], row[1]) for row in overview["data"]] == [(l, h) for l in range(LAYERS) for h in range(HEADS)]


def test_the_report_is_computed_once_per_sample_and_texts_count(site, monkeypatch):
    import ui.tab_heads as tab

    calls = []
    real = tab.collection_head_report

    def counted(*args, **kwargs):
        calls.append(kwargs["images"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tab, "collection_head_report", counted)
    client = site["client"]
    first = client.predict(12, 3, 0, 1, api_name="/heads")
    again = client.predict(12, 3, 1, 0, api_name="/heads")
    assert calls == [12] and first[0] != again[0]  # another head of the same report
    client.predict(13, 3, 0, 1, api_name="/heads")
    assert calls == [12, 13]


def test_head_heatmap_endpoint_maps_the_uploaded_image(site):
    from PIL import Image

    client, encoder, root = site["client"], site["encoder"], site["root"]
    # A grey image: the backdrop has R = B everywhere, so the overlay's colour shows the sign.
    grey = root / "grey.png"
    noise = np.random.default_rng(7).integers(-20, 21, (32, 32, 1))
    Image.fromarray(np.repeat(128 + noise, 3, axis=2).astype(np.uint8), "RGB").save(grey)
    text = "picture number 3"
    overlay, summary, table = client.predict(handle_file(str(grey)), text, 1, 2, api_name="/head_heatmap")
    want = patch_heatmap(encoder.visual, encoder.load_and_preprocess(grey), encoder.encode_texts([text])[0], 1, 2)
    np.testing.assert_allclose(np.asarray(table["data"], dtype=np.float64), want, rtol=1e-12)
    assert table["headers"] == ["col 0", "col 1", "col 2", "col 3"]
    assert "Layer 1, head 2 along 'picture number 3' on grey.png" in summary and f"{want.sum():.4g} in all" in summary
    pixels = encoder.load_and_preprocess(grey)[None]
    direction = unit(encoder.encode_texts([text])[0])
    class_term = decompose(encoder.visual, pixels, tokens=True).heads[0, 1, 2, 0] @ direction
    assert f"the class token adds {class_term:.4g} (the head's term along the text: " in summary
    with Image.open(overlay) as shown:
        pixels = np.asarray(shown.convert("RGB"), dtype=np.int64)
    assert pixels.shape == (320, 320, 3)
    cell = 320 // 4
    strong = [(r, c) for r in range(4) for c in range(4) if abs(want[r, c]) > 0.3 * np.abs(want).max()]
    assert strong
    for r, c in strong:  # red where the patch adds along the text, blue where against
        red, _, blue = pixels[r * cell + cell // 2, c * cell + cell // 2]
        assert np.sign(red - blue) == np.sign(want[r, c]), (r, c, want[r, c])


def test_bad_heads_inputs_are_messages(site):
    client, root = site["client"], site["root"]
    image = handle_file(str(root / "imgs" / "001.png"))
    expect_error(lambda: client.predict(None, "a cat", 0, 0, api_name="/head_heatmap"), "^upload an image to map$")
    expect_error(lambda: client.predict(image, "  ", 0, 0, api_name="/head_heatmap"), "^type a text")
    expect_error(lambda: client.predict(image, "a cat", 2, 0, api_name="/head_heatmap"),
                 r"^layer must be a whole number from 0 to 1, got 2$")
    expect_error(lambda: client.predict(image, "a cat", 0, "x", api_name="/head_heatmap"),
                 r"^head must be a whole number from 0 to 2, got 'x'$")
    fake = root / "fake.png"
    fake.write_bytes(b"no png here")
    expect_error(lambda: client.predict(handle_file(str(fake)), "a cat", 0, 0, api_name="/head_heatmap"),
                 "fake.png is not an image")
    expect_error(lambda: client.predict(SAMPLE, COMPONENTS, 0, 3, api_name="/heads"),
                 r"^head must be a whole number from 0 to 2, got 3$")


def test_the_picker_shows_a_computed_head_and_computes_nothing(site):
    from ui.tab_heads import HeadsActions

    actions = HeadsActions(site["app"].sce_state)
    summary, texts, gallery, overview = actions.show_head(SAMPLE, COMPONENTS, 0, 0)
    assert "Press **Compute head texts**" in summary and texts == gallery == overview == []
    status, layers, heads = actions.availability()
    assert status == "Encoder `tiny-vit`: 2 layers x 3 heads, a 4 x 4 grid of patches."
    assert layers["choices"] == [0, 1] and heads["choices"] == [0, 1, 2]


def test_a_collection_without_a_vit_gets_one_line(tmp_path, checkout_data):
    from ui.app import build_app, close_app
    from ui.app_errors import bind
    from ui.tab_heads import HeadsActions

    rows = [{"file": str(make_image(tmp_path / f"{i}.png", seed=i)), "caption": f"item {i}"} for i in range(4)]
    encoder = ToyEncoder()
    build_collection(write_csv(tmp_path / "list.csv", rows), tmp_path / "coll", encoder=encoder, progress=False)
    app = build_app(tmp_path / "coll", encoder=encoder)
    try:
        line = ("This collection's encoder 'toy-projection-16' has no ViT image tower: the Heads tab needs a ViT "
                "image tower, e.g. a collection built with --encoder emoji-vit.")
        actions = bind(HeadsActions(app.sce_state), ["availability", "heads", "head_heatmap"])
        status, *_ = actions["availability"]()
        assert status == f"**{line}**"
        for call in (lambda: actions["heads"](SAMPLE, COMPONENTS, 0, 0),
                     lambda: actions["head_heatmap"](rows[0]["file"], "a cat", 0, 0)):
            with pytest.raises(gr.Error) as caught:
                call()
            assert caught.value.message == line
    finally:
        close_app(app)


# ------------------------------------------------------------------------------ in a real browser
@pytest.fixture(scope="module")
def heads_page(tmp_path_factory, checkout_data):
    browsing = pytest.importorskip("test_app_browser")  # skips when playwright is missing
    from ui.app import build_app, close_app, launch_app

    chromium = browsing.find_chromium()
    if chromium is None:
        pytest.skip("Chromium not found (/usr/bin/chromium): see tests/test_app_browser.py")
    coll, encoder = tiny_vit_collection(tmp_path_factory.mktemp("heads-browser"))
    app = build_app(coll, encoder=encoder)
    url = launch_app(app, port=free_port(), block=False, quiet=True)
    try:
        with browsing.sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=browsing.CHROMIUM_ARGS)
            try:
                page = browsing.open_app(browser, url)
                yield page, browsing, coll, encoder
                page.close()
            finally:
                browser.close()
    finally:
        close_app(app)


def test_the_heads_tab_renders_and_compute_fills_the_texts(heads_page):
    from retrieval.heads import collection_head_report

    page, browsing, coll, encoder = heads_page
    with Collection.open(coll) as opened:  # what the tab shows first: layer 0, head 0, 5 texts
        first_text = collection_head_report(encoder, opened, images=SAMPLE, components=5,
                                            top_images=8)["entries"][0]["components"][0]["text"]
    browsing.click_tab(page, "Heads")
    expect = browsing.sync_api.expect
    expect(page.locator("#heads-status")).to_contain_text("2 layers x 3 heads", timeout=browsing.TIMEOUT_MS)
    page.locator("#heads-images input").fill(str(SAMPLE))
    page.click("#heads-compute")
    expect(page.locator("#heads-summary")).to_contain_text("Layer 0, head 0", timeout=browsing.TIMEOUT_MS)
    expect(page.locator("#heads-texts")).to_contain_text(first_text, timeout=browsing.TIMEOUT_MS)
    assert browsing.wait_for_images(page, "#heads-gallery", 8) >= 8
    assert "Traceback" not in page.inner_text("body")
