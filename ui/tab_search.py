"""The Search tab: a text or image query, original and corrected results side by side.

:func:`build_search_tab` lays the tab out and wires :class:`SearchActions` to it (API
endpoint ``/search``). Imported only when the app is built.
"""
from __future__ import annotations

import html
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from indexing.collection import SearchHit
from indexing.correction_store import CorrectionNotFoundError, correction_info
from sce_correct.errors import InputError
from ui.app_errors import bind
from ui.app_state import NO_CORRECTION, AppState, fmt, uploaded_files
from ui.app_uploads import check_image

STRATEGY_CHOICES = [
    ("Auto: the re-indexed version when built, else the query-side projection", "auto"),
    ("Query-side projection (no re-index needed)", "query"),
    ("Re-indexed version", "reindexed"),
    ("Baseline: negative query (q - w * concept)", "negative"),
]
KIND_CHOICES = [("images", "image"), ("captions", "caption")]
MOVES_HEADERS = ["item", "caption", "original rank", "corrected rank", "moved"]


def caption(hit: SearchHit, moved: str = "") -> str:
    """Rank, movement, caption, score and id; the front survives when the grid cuts it short."""
    text = (hit.caption or Path(hit.uri).name).strip()
    return f"{hit.rank}. " + (f"{moved} · " if moved else "") + f"{text} · {hit.score:.3f} · id {hit.item_id}"


def movement(rank_original: int | None, rank_corrected: int | None) -> str:
    if rank_original is None:
        return "new"
    if rank_corrected is None:
        return "dropped out"
    delta = rank_original - rank_corrected
    return "same rank" if delta == 0 else (f"up {delta}" if delta > 0 else f"down {-delta}")


class SearchActions:
    """What the Search tab's controls do."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def preview_query_image(self, image_file: Any):
        """Show the uploaded query image (hidden while there is none); a non-image is refused."""
        files = uploaded_files(image_file)
        if not files:
            return gr.update(value=None, visible=False)
        return gr.update(value=str(check_image(files[0], max_pixels=self.state.max_pixels)), visible=True)

    def default_attribute(self, correction: str | None) -> str:
        """The metadata field named like the correction's concept file: its stem, or the
        longest "_"-separated prefix of it that is a field (skin_tone_large.csv -> skin_tone)."""
        if not correction:
            return ""
        try:
            fitted_on = correction_info(self.state.collection, correction).fitted_on
        except CorrectionNotFoundError:
            return ""
        parts = Path(fitted_on or "").stem.split("_")
        fields = self.state.metadata_fields()
        for end in range(len(parts), 0, -1):
            if "_".join(parts[:end]) in fields:
                return "_".join(parts[:end])
        return ""

    def search(self, text: str | None, image_file: Any, correction: str | None, strategy: str,
               negative_weight: float, k: float, kind: str, attribute: str | None):
        """A/B search. Returns (summary, original gallery, corrected gallery, moves table)."""
        from retrieval.compare import compare

        state = self.state
        text = (text or "").strip()
        images = uploaded_files(image_file)
        if text and images:
            raise InputError("give a text query or an image, not both (clear the image to search by text)")
        if not text and not images:
            raise InputError("type a text query or upload an image to search with")
        k = int(k)
        if not 1 <= k <= 1000:
            raise InputError(f"k must be between 1 and 1000, got {k}")
        kind = kind or "image"
        retriever = state.retriever
        if images:
            query = retriever.embed_image(check_image(images[0], max_pixels=state.max_pixels))
            label = f"image {Path(images[0]).name}"
        else:
            query = retriever.embed_text(text)
            label = repr(text)
        if not correction:
            result = retriever.search(query, k, kind=kind)
            original = [(hit.uri, caption(hit)) for hit in result.hits]
            summary = (f"Original results for {html.escape(label, quote=False)} on the {kind} index. "
                       "Choose a correction to compare it with.")
            return summary, state.gallery(original), [], [[str(h.item_id), h.caption or "", str(h.rank), "", ""]
                                                           for h in result.hits]
        ab = compare(retriever, query, label, correction, k=k, kind=kind, strategy=strategy or "auto",
                     attribute=(attribute or None), negative_weight=float(negative_weight))
        changes = {change.item_id: change for change in ab.rank_changes}
        original = [(hit.uri, caption(hit)) for hit in ab.original]
        corrected = [
            (hit.uri, caption(hit, movement(changes[hit.item_id].rank_original, hit.rank)))
            for hit in ab.corrected
        ]
        captions = {hit.item_id: hit.caption or Path(hit.uri).name for hit in ab.original + ab.corrected}
        rows = sorted(
            ab.rank_changes,
            key=lambda c: (c.rank_corrected is None, c.rank_corrected or 0, c.rank_original or 0),
        )
        table = [[str(c.item_id), captions.get(c.item_id, ""), "" if c.rank_original is None else str(c.rank_original),
                  "" if c.rank_corrected is None else str(c.rank_corrected),
                  movement(c.rank_original, c.rank_corrected)] for c in rows]
        how = {"query": "query-side projection", "reindexed": "re-indexed version",
               "negative": f"negative-query baseline (weight {float(negative_weight):g})"}.get(ab.strategy, ab.strategy)
        both = round(ab.overlap_at_k * k)
        parts = [
            f"**overlap@{k}: {ab.overlap_at_k:.0%}** ({both} of {k} results in both lists)",
            f"correction `{correction}` applied by the {how}",
        ]
        if ab.concept_strength_original is not None:
            parts.append(f"concept strength of the hits {fmt(ab.concept_strength_original)} -> "
                         f"{fmt(ab.concept_strength_corrected)}")
        if ab.attribute:
            parts.append(f"hits with `{ab.attribute}` set: {fmt(ab.attribute_share_original, '{:.0%}')} -> "
                         f"{fmt(ab.attribute_share_corrected, '{:.0%}')}")
        summary = f"Query {html.escape(label, quote=False)}: " + " | ".join(parts)
        return summary, state.gallery(original), state.gallery(corrected), table


def build_search_tab(state: AppState) -> SimpleNamespace:
    """The Search tab's components (inside a ``gr.Tab``); returns those other tabs update."""
    act = bind(SearchActions(state), ["search", "preview_query_image", "default_attribute"])
    choices = state.correction_choices()
    first_correction = choices[1][1] if len(choices) > 1 else NO_CORRECTION
    with gr.Row():
        with gr.Column(scale=3):
            query_text = gr.Textbox(label="Text query", placeholder="e.g. waving hand", lines=1, elem_id="query-text")
            with gr.Row():
                query_image = gr.File(label="...or search with an image (instead of text)", file_types=["image"],
                                      elem_id="query-image", scale=3)
                query_preview = gr.Image(label="Query image", interactive=False, height=140, scale=1, buttons=[],
                                         visible=False)
        with gr.Column(scale=2):
            correction = gr.Dropdown(choices, value=first_correction, label="Correction to compare",
                                     allow_custom_value=True, info="Fit new ones in the Corrections tab.",
                                     elem_id="search-correction")
            strategy = gr.Radio(STRATEGY_CHOICES, value="auto", label="How to apply it")
            with gr.Row():
                k = gr.Slider(1, 50, value=12, step=1, label="Results per list (k)")
                negative_weight = gr.Slider(0.0, 3.0, value=1.0, step=0.1,
                                            label="Baseline weight w (negative query only)")
            with gr.Accordion("More options", open=False):
                kind = gr.Radio(KIND_CHOICES, value="image", label="Search the index of")
                attribute = gr.Dropdown(
                    [("none", "")] + [(field, field) for field in state.metadata_fields()],
                    value=SearchActions(state).default_attribute(first_correction) if first_correction else "",
                    allow_custom_value=True, label="Metadata field that marks the concept",
                    info="The summary shows the share of results with this field set, before and after.")
    search_button = gr.Button("Search", variant="primary", elem_id="search-button")
    summary = gr.Markdown(elem_id="search-summary")
    with gr.Row(equal_height=True):
        original = gr.Gallery(label="Original results (no correction)", columns=4, height="auto",
                              object_fit="contain", elem_id="original-gallery", elem_classes="result-gallery")
        corrected = gr.Gallery(label="Corrected results (caption: how far each moved)", columns=4, height="auto",
                               object_fit="contain", elem_id="corrected-gallery", elem_classes="result-gallery")
    moves = gr.Dataframe(headers=MOVES_HEADERS, label="How far each item moved", interactive=False, max_height=320,
                         elem_id="moves-table")
    gr.on([search_button.click, query_text.submit], act["search"],
          [query_text, query_image, correction, strategy, negative_weight, k, kind, attribute],
          [summary, original, corrected, moves], api_name="search", concurrency_limit=2, concurrency_id="read")
    query_image.change(act["preview_query_image"], query_image, query_preview, api_visibility="private",
                       show_progress="hidden")
    correction.change(act["default_attribute"], correction, attribute, api_visibility="private",
                      show_progress="hidden")
    return SimpleNamespace(correction=correction)
