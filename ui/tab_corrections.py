"""The Corrections tab: a concept set's SCE report, fitting a correction, re-indexing with it.

:func:`build_corrections_tab` lays the tab out and wires :class:`CorrectionActions` to it
(API endpoints ``/concept_report``, ``/fit_correction``, ``/reindex``). Imported only when
the app is built.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from indexing.correction_store import correction_info
from sce_correct.errors import InputError
from ui.app_errors import bind
from ui.app_state import CORRECTIONS_HEADERS, UPLOAD_CHOICE, AppState, score_markdown

DIRECTION_CHOICES = [
    ("text -> image (t2i): correct the image index", "t2i"),
    ("image -> text (i2t): correct the caption index", "i2t"),
    ("text -> text (t2t): correct the caption index", "t2t"),
]
KERNEL_CHOICES = [("cosine (projection)", "cosine"), ("gaussian (random Fourier features)", "gaussian")]
MODE_CHOICES = [("nullify: remove the concept", "nullify"), ("focus: keep only the concept", "focus")]
SIZE_CHOICES = [("share of the explained variance (energy)", "energy"), ("number of components", "components")]


def default_name(choice: str | None) -> str:
    """A correction's suggested name for a concept set: skin_tone.csv -> no-skin-tone."""
    stem = Path(choice).stem if choice and choice != UPLOAD_CHOICE else "concept"
    return f"no-{stem}".replace("_", "-")


class CorrectionActions:
    """What the Corrections tab's buttons do."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def concept_preview(self, choice: str | None, table: Any, images: Any, progress=gr.Progress()):
        """The SCE report of a preliminary set before fitting: (report, spectra plot, pairs gallery)."""
        from retrieval.pairs import PairedSet
        from retrieval.report import plot_spectra, report_for_pairs

        state = self.state
        concept = state.concept_set(choice, table, images)
        if concept.images is None:
            raise InputError(f"{concept.source.name} pairs texts (source,target); the preview needs prompt/image "
                             "pairs. Fitting a t2t correction still shows its SCE report.")
        progress(0.2, desc=f"encoding {len(concept)} pairs")
        pairs = PairedSet(prompts=concept.prompts, images=list(concept.images), source=str(concept.source))
        report = report_for_pairs(state.encoder, pairs, n_modes=1, top=1)
        plot = plot_spectra(report, state.scratch("concept-report") / "spectra.png")
        gallery = state.gallery([(str(path), prompt) for prompt, path in zip(concept.prompts, concept.images)])
        title = f"SCE report of the preliminary set {concept.name} ({len(concept)} pairs)"
        return score_markdown(report.score, title), str(plot), gallery

    def fit(self, choice: str | None, table: Any, images: Any, name: str | None, direction: str, kernel: str,
            mode: str, size_by: str, components: float | None, energy: float | None, strength: float,
            replace: bool, center: bool = True, progress=gr.Progress(track_tqdm=True)):
        """Fit and store a correction. Returns (report, table, search choices, re-index choices, header)."""
        from retrieval.corrections import fit_concept_correction

        state = self.state
        name = (name or "").strip()
        if not name:
            raise InputError("give the correction a name, e.g. no-skin-tone")
        concept = state.concept_set(choice, table, images)
        cosine = kernel == "cosine"
        n_components = int(components) if cosine and size_by == "components" and components else None
        share = float(energy) if cosine and size_by != "components" and energy else None
        progress(0.1, desc=f"encoding {len(concept)} pairs and fitting {name}")
        with state.write_lock:
            result = fit_concept_correction(
                state.collection, state.encoder, concept, name=name, direction=direction or "t2i",
                kernel=kernel or "cosine", mode=mode or "nullify", n_components=n_components, energy=share,
                strength=float(strength), center=bool(center), replace=bool(replace), progress=True,
            )
        state.forget_corrections()
        info = result.info
        lines = [f"Stored correction **{info.name}** ({info.direction}, {info.kernel}, {mode}, "
                 f"{'centred' if center else 'uncentred'}) from "
                 f"{len(concept)} pairs of `{concept.source.name}`. It applies to the **{info.target_kind} index**."]
        if result.n_components is not None:
            lines.append(f"Projection: {result.n_components} concept direction(s) holding "
                         f"{result.explained_share:.1%} of what the prompts explain.")
        next_step = ("search with it now (query-side), or re-index for the same ranking from a stored index"
                     if info.kernel == "cosine" else "re-index the collection before searching with it")
        lines.append(f"Next: {next_step}.")
        lines.append(score_markdown(result.report, "SCE report of the preliminary set"))
        return ("\n\n".join(lines), state.correction_rows(), gr.update(choices=state.correction_choices()),
                gr.update(choices=state.correction_names(), value=info.name), state.collection_markdown())

    def reindex(self, name: str | None, progress=gr.Progress(track_tqdm=True)):
        """Re-index the collection with a correction. Returns (status, table, search choices, header)."""
        from retrieval.reindex import reindex

        state = self.state
        if not name:
            raise InputError("choose a correction to re-index with (fit one first)")
        info = correction_info(state.collection, name)
        problem = state.check_correction(info)
        if problem:
            raise InputError(f"correction {name!r} cannot be used with this collection: {problem}")
        progress(0, desc=f"re-indexing the {info.target_kind} index with {name}")
        with state.write_lock:
            # a head correction re-encodes the images: with the app's encoder, not a second copy
            version = reindex(state.collection, name, progress=True,
                              encoder=state.encoder if info.kernel == "heads" else None)
        state.forget_corrections()
        status = (f"Built index version `{version.name}`: {version.count:,} {version.kind} vectors corrected by "
                  f"**{name}**. Searches with strategy auto now use it.")
        return (status, state.correction_rows(), gr.update(choices=state.correction_choices()),
                state.collection_markdown())


def build_corrections_tab(state: AppState, header: gr.Markdown, search_correction: gr.Dropdown) -> SimpleNamespace:
    """The Corrections tab's components (inside a ``gr.Tab``). A fit or re-index also updates
    the page's ``header`` and the Search tab's ``search_correction`` choices."""
    act = bind(CorrectionActions(state), ["concept_preview", "fit", "reindex"])
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown("### 1. Preliminary concept set\nPrompts that differ only in the concept "
                        "(\"light skin tone\", \"dark skin tone\", ...), each paired with an image that shows it.")
            concept_files = state.concept_choices()
            concept = gr.Dropdown(concept_files, value=concept_files[0][1], label="Concept set",
                                  allow_custom_value=True, elem_id="concept-choice")
            with gr.Accordion("...or upload a concept set", open=False):
                concept_table = gr.File(label="Concept CSV: prompt,image (or source,target)", file_types=[".csv"])
                concept_images = gr.File(label="Its images (matched by file name)", file_count="multiple",
                                         file_types=["image"])
            preview_button = gr.Button("Show the SCE report of this set", elem_id="concept-report-button")
            gr.Markdown("### 2. Fit a correction")
            name = gr.Textbox(label="Name", value=default_name(concept_files[0][1]))
            direction = gr.Radio(DIRECTION_CHOICES, value="t2i", label="Direction")
            with gr.Row():
                kernel = gr.Radio(KERNEL_CHOICES, value="cosine", label="Kernel")
                mode = gr.Radio(MODE_CHOICES, value="nullify", label="Mode")
            size_by = gr.Radio(SIZE_CHOICES, value="energy", label="Projection size (cosine kernel)")
            with gr.Row():
                energy = gr.Slider(0.5, 1.0, value=0.99, step=0.01, label="Energy share")
                components = gr.Slider(1, 64, value=2, step=1, label="Components")
            strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.1, label="Strength (gaussian kernel)",
                                 info="1 removes the concept; below 0 focuses on it.")
            replace = gr.Checkbox(label="Replace a correction of the same name", value=False)
            center = gr.Checkbox(label="Centre the features", value=True,
                                 info="Remove what varies with the prompts and keep what all the concept images "
                                      "share (off: the uncentred Schur correction).")
            fit_button = gr.Button("Fit and save the correction", variant="primary", elem_id="fit-button")
        with gr.Column(scale=3):
            concept_report = gr.Markdown(elem_id="concept-report")
            concept_plot = gr.Image(label="Eigenvalue spectra of the set", interactive=False, height=320)
            concept_gallery = gr.Gallery(label="The set's prompt/image pairs", columns=6, height=320,
                                         object_fit="contain", elem_classes="result-gallery")
    gr.Markdown("### 3. Stored corrections and re-indexing\nA correction applies to one index (image or caption). "
                "Re-indexing writes a corrected copy of that index from the stored embeddings (no image is read "
                "again); searches keep using the old one until it is complete.")
    table = gr.Dataframe(headers=CORRECTIONS_HEADERS, value=state.correction_rows(), interactive=False,
                         label="Corrections of this collection", elem_id="corrections-table")
    names = state.correction_names()
    with gr.Row():
        reindex_choice = gr.Dropdown(names, value=names[-1] if names else None, allow_custom_value=True,
                                     label="Correction to re-index with", scale=3)
        reindex_button = gr.Button("Re-index the collection", scale=1, elem_id="reindex-button")
    reindex_status = gr.Markdown(elem_id="reindex-status")

    preview_button.click(act["concept_preview"], [concept, concept_table, concept_images],
                         [concept_report, concept_plot, concept_gallery], api_name="concept_report",
                         concurrency_id="read")
    fit_button.click(act["fit"], [concept, concept_table, concept_images, name, direction, kernel, mode, size_by,
                                  components, energy, strength, replace, center],
                     [concept_report, table, search_correction, reindex_choice, header], api_name="fit_correction",
                     concurrency_id="write")
    reindex_button.click(act["reindex"], reindex_choice, [reindex_status, table, search_correction, header],
                         api_name="reindex", concurrency_id="write")
    concept_table.upload(lambda _: UPLOAD_CHOICE, concept_table, concept, api_visibility="private",
                         show_progress="hidden")
    concept.change(lambda choice: default_name(choice) if choice and choice != UPLOAD_CHOICE else gr.update(),
                   concept, name, api_visibility="private", show_progress="hidden")
    return SimpleNamespace(table=table, reindex_choice=reindex_choice)
