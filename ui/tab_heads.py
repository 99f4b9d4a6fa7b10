"""The Heads tab: what each attention head of the collection's ViT encoder encodes (issue 14).

Two actions, wired by :func:`build_heads_tab` to :class:`HeadsActions` (API endpoints
``/heads`` and ``/head_heatmap``):

- each (layer, head)'s TEXTSPAN texts with the share of the head's variance each explains,
  and its top images, from `retrieval.heads.collection_head_report` (the code path of
  `sce decompose heads`, over a seeded sample of the collection and the shipped text bank),
  computed once per (sample size, texts per head) and kept for the server's session;
- for an uploaded image, a heatmap of one head's per-patch contribution along the embedding
  of a typed text (`retrieval.heads.patch_heatmap`), blended over the image.

A collection whose encoder has no ViT image tower (the default encoder is a CNN) gets one line
saying so. Imported only when the app is built.
"""
from __future__ import annotations

import html
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from retrieval.heads import DEFAULT_IMAGES, DEFAULT_SEED, collection_head_report, patch_heatmap, vit_of
from sce_correct.errors import InputError
from ui.app_errors import bind
from ui.app_state import AppState, uploaded_files
from ui.app_uploads import check_image

TOP_IMAGES = 8
#: The largest sample the page accepts: the terms are float64, layers x heads x dim per image.
MAX_IMAGES = 2000
OVERVIEW_TEXTS = 3
HEATMAP_WIDTH = 320
#: The heatmap's strongest cell is drawn at this opacity over the image, weaker ones fainter.
HEATMAP_ALPHA = 0.7
TEXTS_HEADERS = ["rank", "text", "variance", "share of the head's variance"]
OVERVIEW_HEADERS = ["layer", "head", "total variance", f"first {OVERVIEW_TEXTS} TEXTSPAN texts (share)"]
INTRO = """### What each attention head encodes
The image embedding of a ViT is a sum of terms, one per attention head per layer (plus the MLPs
and the stem). **Compute** decomposes a seeded sample of the collection's images and names each
head with the texts of the shipped text bank that span its outputs (TEXTSPAN), with the share of
the head's variance each explains; its top images are those whose head output points most along
its first text. Below: for an uploaded image, how much each patch adds to a head's output along
a text you type."""


def not_a_vit_line(encoder: Any) -> str:
    name = getattr(encoder, "name", type(encoder).__name__)
    return (f"This collection's encoder {name!r} has no ViT image tower: the Heads tab needs a ViT image "
            "tower, e.g. a collection built with --encoder emoji-vit.")


def whole_number(value: Any, what: str, low: int, high: int | None = None) -> int:
    """``value`` (an int, an integral float or a digit string from the page) as an int in [low, high]."""
    text = value.strip() if isinstance(value, str) else value
    try:
        number = float(text)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer() or number < low or (high is not None and number > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise InputError(f"{what} must be a whole number {bounds}, got {value!r}")
    return int(number)


def heatmap_overlay(image_path: str | Path, grid: np.ndarray, width: int = HEATMAP_WIDTH):
    """The patch grid upsampled over the image (RGB PIL image): red where a patch adds along the
    text, blue where against, more opaque the stronger; zero leaves the image as it is."""
    from matplotlib import colormaps
    from PIL import Image, ImageOps

    from indexing.encoders.encoder import open_image, to_rgb_on_white

    rows, cols = grid.shape
    size = (width, max(1, round(width * rows / cols)))
    # The centre crop at the grid's aspect: what a centre-cropping encoder sees (all of a square image).
    backdrop = ImageOps.fit(to_rgb_on_white(open_image(image_path)), size, Image.Resampling.BICUBIC)
    scale = float(np.abs(grid).max()) or 1.0
    # NEAREST: each patch is drawn as its own block, so the cells of a coarse grid stay readable
    relative = np.asarray(Image.fromarray((grid / scale).astype(np.float32)).resize(size, Image.Resampling.NEAREST))
    colours = colormaps["RdBu_r"]((np.clip(relative, -1, 1) + 1) / 2)[..., :3] * 255
    alpha = HEATMAP_ALPHA * np.clip(np.abs(relative), 0, 1)[..., None]
    blended = (1 - alpha) * np.asarray(backdrop, dtype=np.float64) + alpha * colours
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), "RGB")


class HeadsActions:
    """What the Heads tab's controls do; keeps the computed head reports for the server's session."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.reports: dict[tuple[int, int], dict] = {}  # (sample size, texts per head) -> report
        self._compute_lock = threading.Lock()

    def _vit(self):
        """(encoder, its ViT tower), or the tab's one line when the encoder has none."""
        encoder = self.state.encoder
        try:
            return encoder, vit_of(encoder)
        except InputError:
            raise InputError(not_a_vit_line(encoder)) from None

    def availability(self):
        """On page load: the tower's shape and the layer/head choices, or why the tab cannot work."""
        try:
            encoder, visual = self._vit()
        except InputError as error:
            return f"**{html.escape(str(error), quote=False)}**", gr.update(), gr.update()
        blocks = list(visual.transformer.resblocks)
        heads = int(blocks[0].attn.num_heads)
        rows, cols = (int(g) for g in visual.grid_size)
        name = getattr(encoder, "name", type(encoder).__name__)
        text = (f"Encoder `{html.escape(name, quote=False)}`: {len(blocks)} layers x {heads} heads, "
                f"a {rows} x {cols} grid of patches.")
        return (text, gr.update(choices=list(range(len(blocks))), value=0),
                gr.update(choices=list(range(heads)), value=0))

    def heads(self, images: float, components: float, layer: Any, head: Any, progress=gr.Progress()):
        """Compute (once per sample size and texts per head) and show one head.

        Returns (summary, the head's texts [rank, text, variance, share], its top images,
        every head's first texts [layer, head, total variance, texts]).
        """
        encoder, _ = self._vit()
        key = (whole_number(images, "the sample size", 2, MAX_IMAGES), whole_number(components, "texts per head", 1))
        with self._compute_lock:  # a second click waits for the first and reuses its report
            if key not in self.reports:
                self.reports[key] = collection_head_report(
                    encoder, self.state.collection, images=key[0], seed=DEFAULT_SEED, components=key[1],
                    top_images=TOP_IMAGES, progress=lambda fraction, text: progress(fraction, desc=text))
        return self._show(self.reports[key], layer, head)

    def show_head(self, images: float, components: float, layer: Any, head: Any):
        """The picked head of the computed report (nothing is computed here)."""
        try:
            key = (whole_number(images, "the sample size", 2), whole_number(components, "texts per head", 1))
        except InputError:
            key = None
        report = self.reports.get(key)
        if report is None:
            return "Press **Compute head texts** to name the heads.", [], [], []
        return self._show(report, layer, head)

    def _show(self, report: dict, layer: Any, head: Any):
        n_layers, n_heads = report["layers"], report["heads"]
        layer = whole_number(layer, "layer", 0, n_layers - 1)
        head = whole_number(head, "head", 0, n_heads - 1)
        entry = report["entries"][layer * n_heads + head]
        total = entry["total_variance"] or 1.0
        texts = [[rank, c["text"], f"{c['variance']:.4g}", f"{c['variance'] / total:.1%}"]
                 for rank, c in enumerate(entry["components"], start=1)]
        gallery = self.state.gallery([(top["uri"], f"id {top['item_id']} · {top['score']:.3f}")
                                      for top in entry["top_images"]])
        overview = []
        for other in report["entries"]:
            whole = other["total_variance"] or 1.0
            picks = "; ".join(f"{c['text']} ({c['variance'] / whole:.0%})"
                              for c in other["components"][:OVERVIEW_TEXTS])
            overview.append([other["layer"], other["head"], f"{other['total_variance']:.4g}", picks])
        summary = (f"**Layer {layer}, head {head}** of {n_layers} x {n_heads}: total variance "
                   f"{entry['total_variance']:.4g} over {report['images']} sampled images (seed {report['seed']}), "
                   f"texts from `{html.escape(Path(report['bank']).name, quote=False)}` ({report['bank_texts']} "
                   f"texts). Top images by the {html.escape(report['top_images_by'], quote=False)}.")
        return summary, texts, gallery, overview

    def head_heatmap(self, image_file: Any, text: str | None, layer: Any, head: Any):
        """One head's per-patch contribution along a text, over an uploaded image.

        Returns (the blended heatmap, a summary, the grid's values [one row per patch row]).
        """
        encoder, visual = self._vit()
        files = uploaded_files(image_file)
        if not files:
            raise InputError("upload an image to map")
        text = (text or "").strip()
        if not text:
            raise InputError("type a text: the map shows how much each patch adds along its embedding")
        path = check_image(files[0], max_pixels=self.state.max_pixels)
        n_layers = len(visual.transformer.resblocks)
        layer = whole_number(layer, "layer", 0, n_layers - 1)
        head = whole_number(head, "head", 0, int(visual.transformer.resblocks[0].attn.num_heads) - 1)
        from indexing.encoders.decomposition import decompose

        pixels, direction = encoder.load_and_preprocess(path), encoder.encode_texts([text])[0]
        grid = patch_heatmap(visual, pixels, direction, layer, head)
        # The head's whole term along the text; what the patches leave is the class token's own term.
        whole = float(decompose(visual, pixels[None]).heads[0, layer, head] @ (direction / np.linalg.norm(direction)))
        summary = (f"Layer {layer}, head {head} along {html.escape(repr(text), quote=False)} on "
                   f"{html.escape(Path(files[0]).name, quote=False)}: per-patch contributions from "
                   f"{grid.min():.4g} to {grid.max():.4g}, {grid.sum():.4g} in all; the class token adds "
                   f"{whole - grid.sum():.4g} (the head's term along the text: {whole:.4g}). Red: along the text, "
                   "blue: against it; opacity: strength relative to the strongest patch.")
        table = {"headers": [f"col {c}" for c in range(grid.shape[1])],
                 "data": [[float(v) for v in row] for row in grid],  # full precision for API callers
                 "metadata": {"display_value": [[f"{v:.4g}" for v in row] for row in grid],
                              "styling": [["" for _ in row] for row in grid]}}
        return heatmap_overlay(path, grid), summary, table


def build_heads_tab(state: AppState) -> None:
    """The Heads tab's components (inside a ``gr.Tab``); the page load fills the layer/head choices."""
    act = bind(HeadsActions(state), ["availability", "heads", "show_head", "head_heatmap"])
    gr.Markdown(INTRO)
    status = gr.Markdown(elem_id="heads-status")
    with gr.Row():
        images = gr.Number(DEFAULT_IMAGES, precision=0, minimum=2, maximum=MAX_IMAGES, label="Images sampled (seeded)",
                           elem_id="heads-images")
        components = gr.Slider(1, 10, value=5, step=1, label="TEXTSPAN texts per head", elem_id="heads-components")
        layer = gr.Dropdown([0], value=0, label="Layer", allow_custom_value=True, elem_id="heads-layer")
        head = gr.Dropdown([0], value=0, label="Head", allow_custom_value=True, elem_id="heads-head")
    compute = gr.Button("Compute head texts", variant="primary", elem_id="heads-compute")
    summary = gr.Markdown(elem_id="heads-summary")
    with gr.Row(equal_height=True):
        texts = gr.Dataframe(headers=TEXTS_HEADERS, label="The head's TEXTSPAN texts", interactive=False,
                             column_widths=["12%", "48%", "18%", "22%"], wrap=True, elem_id="heads-texts", scale=1)
        top = gr.Gallery(label="Its top images", columns=4, height="auto", object_fit="contain",
                         elem_id="heads-gallery", elem_classes="result-gallery", scale=1)
    with gr.Accordion("Every head", open=False):
        overview = gr.Dataframe(headers=OVERVIEW_HEADERS, interactive=False, max_height=360, elem_id="heads-overview")
    gr.Markdown("#### A head's contribution per patch, along a text\nThe uploaded image goes through the "
                "encoder's own preprocessing; each cell is what that patch adds to the chosen head's output, "
                "dotted with the text's unit embedding.")
    with gr.Row():
        upload = gr.File(label="Image", file_types=["image"], elem_id="heads-upload")
        direction = gr.Textbox(label="Text direction", placeholder="e.g. a person with dark skin tone",
                               elem_id="heads-text")
    heatmap_button = gr.Button("Map the patches", elem_id="heads-heatmap-button")
    with gr.Row():
        heatmap = gr.Image(label="Per-patch contribution", format="png", interactive=False, buttons=[],
                           elem_id="heads-heatmap")
        with gr.Column():
            heatmap_summary = gr.Markdown(elem_id="heads-heatmap-summary")
            grid = gr.Dataframe(label="Per-patch values (rows top to bottom)", interactive=False,
                                elem_id="heads-grid")
    outputs = [summary, texts, top, overview]
    compute.click(act["heads"], [images, components, layer, head], outputs, api_name="heads", concurrency_id="read")
    gr.on([layer.input, head.input], act["show_head"], [images, components, layer, head], outputs,
          api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    gr.on([heatmap_button.click, direction.submit], act["head_heatmap"], [upload, direction, layer, head],
          [heatmap, heatmap_summary, grid], api_name="head_heatmap", concurrency_id="read")
    state.blocks.load(act["availability"], None, [status, layer, head], api_visibility="private",
                      show_progress="hidden")
