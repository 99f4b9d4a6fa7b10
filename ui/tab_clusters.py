"""The Clusters and Report tabs: the modes and the SCE report of a prompt/image set.

Both tabs choose their set the same way (:func:`source_controls`: collection items, a concept
set, or an upload). :func:`build_clusters_tab` and :func:`build_report_tab` lay them out and
wire :class:`PairedSetActions` to them (API endpoints ``/clusters`` and ``/report``).
Imported only when the app is built.
"""
from __future__ import annotations

import html
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr

from indexing.items import parse_where
from sce_correct.errors import InputError
from ui.app_errors import bind
from ui.app_state import UPLOAD_CHOICE, AppState, score_markdown, uploaded_files

MAX_MODES = 6


class PairedSetActions:
    """What the Clusters and Report tabs' buttons do."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def _paired_report(self, source: str, where: str | None, limit: float | None, concept: str | None,
                       table: Any, images: Any, n_modes: int, top: int):
        from retrieval.pairs import PairedSet, load_pairs
        from retrieval.report import report_for_collection, report_for_pairs

        state = self.state
        kwargs = {"n_modes": n_modes, "top": top}
        if source == "collection":
            limit = int(limit) if limit else None
            return report_for_collection(state.collection, state.encoder, where=parse_where(where), limit=limit,
                                         **kwargs)
        if source == "concept":
            concept_set = state.concept_set(concept, None, None)
            if concept_set.images is None:
                raise InputError(f"{concept_set.source.name} pairs texts; clusters need prompt/image pairs")
            # Named by its file name: the page does not show the server's folders.
            pairs = PairedSet(concept_set.prompts, list(concept_set.images), f"concept set {concept_set.source.name}")
            return report_for_pairs(state.encoder, pairs, **kwargs)
        if source == UPLOAD_CHOICE:
            staged, images_dir = state.stage_upload(
                table, images, "pairs", "upload a prompts file (CSV/JSONL with image and prompt columns, or a text "
                                        "file with one prompt a line) and its images")
            pairs = load_pairs(staged, images_dir if staged.suffix.lower() == ".txt" else None)
            pairs = replace(pairs, source=f"uploaded {Path(uploaded_files(table)[0]).name}")
            return report_for_pairs(state.encoder, pairs, **kwargs)
        raise InputError(f"unknown report source {source!r}")

    def clusters(self, source: str, where: str | None, limit: float | None, concept: str | None, table: Any,
                 images: Any, top: float, progress=gr.Progress()):
        """Original modes beside Schur modes. Returns (summary, spectra plot, 6 + 6 mode galleries)."""
        from retrieval.report import plot_spectra

        progress(0.1, desc="computing the modes")
        report = self._paired_report(source, where, limit, concept, table, images, MAX_MODES, int(top))
        plot = plot_spectra(report, self.state.scratch("clusters") / "spectra.png")
        s = report.score
        summary = (f"**{s.n} pairs** ({html.escape(report.source, quote=False)}) | SCE score {s.image_diversity:.3f} | "
                   f"{s.image_share:.0%} of the image variety is the images' own, {s.text_share:.0%} follows the "
                   "prompts. Left: modes of all image variety; right: modes of what the prompts leave unexplained.")
        galleries = []
        for modes in (report.original_modes, report.schur_modes):
            for slot in range(MAX_MODES):
                if slot < len(modes):
                    mode = modes[slot]
                    items = self.state.gallery([(item.uri, f"{item.prompt} | {item.score:.2f}") for item in mode.items])
                    label = (f"{mode.kind} mode {mode.rank}: eigenvalue {mode.eigenvalue:.4f}, "
                             f"{mode.share:.1%} of the variety")
                    galleries.append(gr.update(value=items, label=label, visible=True, columns=int(top)))
                else:
                    galleries.append(gr.update(value=[], visible=False))
        return (summary, str(plot), *galleries)

    def report(self, source: str, where: str | None, limit: float | None, concept: str | None, table: Any,
               images: Any, progress=gr.Progress()):
        """The SCE report with plots. Returns (report, spectra plot, modes grid, report.json)."""
        from retrieval.report import write_report

        progress(0.1, desc="computing the SCE report")
        report = self._paired_report(source, where, limit, concept, table, images, MAX_MODES, 8)
        paths = write_report(report, self.state.scratch("report"))
        title = f"SCE report: {report.source}"
        return (score_markdown(report.score, html.escape(title, quote=False)), str(paths["spectra"]),
                str(paths["modes"]), str(paths["json"]))


def source_controls(state: AppState, prefix: str) -> tuple:
    """The inputs that choose a prompt/image set: the collection, a concept set, or an upload."""
    source = gr.Radio(
        [("collection items, their captions as prompts", "collection"),
         ("a concept set", "concept"),
         ("an uploaded prompts file and its images", UPLOAD_CHOICE)],
        value="collection", label="Prompt/image pairs", elem_id=f"{prefix}-source",
    )
    with gr.Row() as collection_row:
        where = gr.Textbox(
            label="Collection filter (key=value, one a line; empty: all captioned items)", lines=1, scale=3,
            placeholder="category=people & body", elem_id=f"{prefix}-where",
            info="Metadata fields: " + (", ".join(state.metadata_fields()[:12]) or "none"),
        )
        limit = gr.Number(label="At most this many items (random sample)", value=2000, precision=0,
                          minimum=2, scale=1)
    concepts = [choice for choice in state.concept_choices() if choice[1] != UPLOAD_CHOICE]
    concept = gr.Dropdown(concepts, value=concepts[0][1] if concepts else None, allow_custom_value=True,
                          label="Concept set", visible=False)
    with gr.Column(visible=False) as upload_column:
        gr.Markdown("A CSV or JSONL file with an `image` and a `prompt` column, or a text file with one prompt "
                    "a line whose images are named `<line number>.png`. Images are matched by file name.")
        with gr.Row():
            table = gr.File(label="Prompts file", file_types=[".csv", ".jsonl", ".txt"])
            images = gr.File(label="Images", file_count="multiple", file_types=["image"])
    source.change(
        lambda chosen: (gr.update(visible=chosen == "collection"), gr.update(visible=chosen == "concept"),
                        gr.update(visible=chosen == UPLOAD_CHOICE)),
        source, [collection_row, concept, upload_column], api_visibility="private", show_progress="hidden")
    return source, where, limit, concept, table, images


def build_clusters_tab(state: AppState) -> None:
    """The Clusters tab's components (inside a ``gr.Tab``)."""
    act = bind(PairedSetActions(state), ["clusters"])
    gr.Markdown("Each row is one mode (cluster) of the images, its top images left to right. **Original modes** "
                "follow all the variety of the images; **Schur modes** follow only what the prompts do not "
                "explain, so they group images by what the prompts leave out.")
    inputs = source_controls(state, "clusters")
    with gr.Row():
        top = gr.Slider(3, 12, value=8, step=1, label="Images per mode", scale=3)
        button = gr.Button("Show the clusters", variant="primary", scale=1, elem_id="clusters-button")
    summary = gr.Markdown(elem_id="clusters-summary")
    mode_galleries = []
    with gr.Row():
        for title in ("#### Original modes (all image variety)",
                      "#### Schur modes (what the prompts leave unexplained)"):
            with gr.Column():
                gr.Markdown(title)
                for slot in range(MAX_MODES):
                    mode_galleries.append(gr.Gallery(
                        label=f"mode {slot + 1}", columns=8, rows=1, height="auto", object_fit="contain",
                        fit_columns=False, visible=False, elem_classes="mode-gallery"))
    plot = gr.Image(label="Eigenvalue spectra: all image variety, the prompts' part, the images' own part",
                    interactive=False, height=380)
    button.click(act["clusters"], [*inputs, top], [summary, plot, *mode_galleries], api_name="clusters",
                 concurrency_id="read")


def build_report_tab(state: AppState) -> None:
    """The Report tab's SCE report part (inside a ``gr.Tab``; `ui.tab_evaluate` adds the rest)."""
    act = bind(PairedSetActions(state), ["report"])
    gr.Markdown("The SCE report of a prompt/image set: how much of the images' variety the prompts explain, and "
                "how much is the images' own (the SCE score), with the eigenvalue spectra and the modes before and "
                "after the prompts' part is removed.")
    inputs = source_controls(state, "report")
    button = gr.Button("Build the report", variant="primary", elem_id="report-button")
    score = gr.Markdown(elem_id="report-score")
    with gr.Row():
        spectra = gr.Image(label="Eigenvalue spectra", interactive=False)
        modes = gr.Image(label="Original modes (top rows) and Schur modes (bottom rows)", interactive=False)
    report_json = gr.File(label="report.json", interactive=False)
    button.click(act["report"], list(inputs), [score, spectra, modes, report_json], api_name="report",
                 concurrency_id="read")
