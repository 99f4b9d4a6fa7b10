"""`sce serve`: the Gradio web UI over a collection (Search, Corrections, Clusters, Report).

The layout lives here; what each button does lives in `ui.app_handlers`. Gradio is imported
inside the functions, so `import ui.app` (and `sce --help`) stays fast.

Every main action is a named API endpoint, callable with ``gradio_client``::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    summary, original, corrected, moves = client.predict(
        "waving hand", None, "no-skin-tone", "auto", 1.0, 12, "image", "skin_tone", api_name="/search")

Endpoints: /search, /concept_report, /fit_correction, /reindex, /clusters, /report.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:  # pragma: no cover
    import gradio as gr

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20
ENDPOINTS = ("search", "concept_report", "fit_correction", "reindex", "clusters", "report")

# Gallery tweaks (Gradio's own class names; if they change, galleries fall back to Gradio's look):
# a mode is one row of small square thumbnails without captions (they show on click), and
# result captions wrap instead of being cut short.
CSS = """
.mode-gallery .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)) !important;
  grid-auto-rows: auto !important; }
.mode-gallery .thumbnail-item { aspect-ratio: 1 / 1; height: auto !important; }
.mode-gallery .grid-container .caption-label { display: none; }
.mode-gallery .grid-wrap { height: auto !important; min-height: 0 !important; }
.mode-gallery .grid-container { padding-top: 30px !important; }
.result-gallery .caption-label { white-space: normal !important; overflow: visible !important;
  text-overflow: clip !important; max-width: 100% !important; line-height: 1.2; }
"""

INTRO = """# SCE retrieval: concept-corrected image search
Search the collection, and see how a **concept correction** (for example one that removes skin
tone) changes the results: original on the left, corrected on the right.
**Search** compares results, **Corrections** fits a correction from a small set of prompt/image
pairs and re-indexes with it, **Clusters** shows the image modes before and after the prompts'
part is removed, and **Report** gives the SCE score of a prompt/image set and evaluates
text-to-image outputs."""


def _source_controls(gr, state, prefix: str):
    """The inputs that choose a prompt/image set: the collection, a concept set, or an upload."""
    from ui.app_handlers import UPLOAD_CHOICE

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
                          label="Concept set (data/concepts)", visible=False)
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


def build_app(collection_dir: str | Path, db: str | None = None, encoder: Any = None,
              concepts_dir: str | Path | None = None, *, max_pixels: int | None = None) -> gr.Blocks:
    """The Gradio Blocks app over a collection; ``encoder`` defaults to the collection's own.

    The app's state (open collection, encoder, scratch folder) is ``app.sce_state``; stop the
    server and close it with :func:`close_app`.
    """
    import gradio as gr

    from ui.app_handlers import (
        CORRECTIONS_HEADERS,
        DIRECTION_CHOICES,
        KERNEL_CHOICES,
        KIND_CHOICES,
        MAX_MODES,
        MODE_CHOICES,
        MOVES_HEADERS,
        NO_CORRECTION,
        SIZE_CHOICES,
        STRATEGY_CHOICES,
        UPLOAD_CHOICE,
        EVALUATION_HEADERS,
        AppState,
        bind,
    )
    from ui.app_uploads import DEFAULT_MAX_PIXELS

    state = AppState(collection_dir, db=db, encoder=encoder, concepts_dir=concepts_dir,
                     max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    act = bind(state, ["search", "preview_query_image", "default_attribute", "concept_preview", "fit", "reindex",
                       "clusters", "report", "evaluate", "refresh"])
    correction_choices = state.correction_choices()
    first_correction = correction_choices[1][1] if len(correction_choices) > 1 else NO_CORRECTION
    fields = state.metadata_fields()

    with gr.Blocks(title="SCE retrieval", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        header = gr.Markdown(state.collection_markdown(), elem_id="collection-info")
        with gr.Tabs():
            # ---------------------------------------------------------------- Search
            with gr.Tab("Search", id="search"):
                with gr.Row():
                    with gr.Column(scale=3):
                        query_text = gr.Textbox(label="Text query", placeholder="e.g. waving hand", lines=1,
                                                elem_id="query-text")
                        with gr.Row():
                            query_image = gr.File(label="...or search with an image (instead of text)",
                                                  file_types=["image"], elem_id="query-image", scale=3)
                            query_preview = gr.Image(label="Query image", interactive=False, height=140,
                                                     scale=1, buttons=[], visible=False)
                    with gr.Column(scale=2):
                        correction = gr.Dropdown(
                            correction_choices, value=first_correction, label="Correction to compare",
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
                                [("none", "")] + [(field, field) for field in fields],
                                value=state.default_attribute(first_correction) if first_correction else "",
                                allow_custom_value=True,
                                label="Metadata field that marks the concept",
                                info="The summary shows the share of results with this field set, before and after.")
                search_button = gr.Button("Search", variant="primary", elem_id="search-button")
                search_summary = gr.Markdown(elem_id="search-summary")
                with gr.Row(equal_height=True):
                    original_gallery = gr.Gallery(label="Original results (no correction)", columns=4,
                                                  height="auto", object_fit="contain", elem_id="original-gallery",
                                                  elem_classes="result-gallery")
                    corrected_gallery = gr.Gallery(label="Corrected results (caption: how far each moved)",
                                                   columns=4, height="auto", object_fit="contain",
                                                   elem_id="corrected-gallery", elem_classes="result-gallery")
                moves = gr.Dataframe(headers=MOVES_HEADERS, label="How far each item moved", interactive=False,
                                     max_height=320, elem_id="moves-table")
                gr.on([search_button.click, query_text.submit], act["search"],
                      [query_text, query_image, correction, strategy, negative_weight, k, kind, attribute],
                      [search_summary, original_gallery, corrected_gallery, moves], api_name="search",
                      concurrency_limit=2, concurrency_id="read")
                query_image.change(act["preview_query_image"], query_image, query_preview,
                                   api_visibility="private", show_progress="hidden")
                correction.change(act["default_attribute"], correction, attribute, api_visibility="private",
                                  show_progress="hidden")

            # ----------------------------------------------------------- Corrections
            with gr.Tab("Corrections", id="corrections"):
                with gr.Row():
                    with gr.Column(scale=2):
                        gr.Markdown("### 1. Preliminary concept set\nPrompts that differ only in the concept "
                                    "(\"light skin tone\", \"dark skin tone\", ...), each paired with an image "
                                    "that shows it.")
                        concept_files = state.concept_choices()
                        concept = gr.Dropdown(concept_files, value=concept_files[0][1], label="Concept set",
                                              allow_custom_value=True, elem_id="concept-choice")
                        with gr.Accordion("...or upload a concept set", open=False):
                            concept_table = gr.File(label="Concept CSV: prompt,image (or source,target)",
                                                    file_types=[".csv"])
                            concept_images = gr.File(label="Its images (matched by file name)",
                                                     file_count="multiple", file_types=["image"])
                        preview_button = gr.Button("Show the SCE report of this set", elem_id="concept-report-button")
                        gr.Markdown("### 2. Fit a correction")
                        first_set = concept_files[0][1]
                        default_stem = Path(first_set).stem if first_set != UPLOAD_CHOICE else "concept"
                        name = gr.Textbox(label="Name", value=f"no-{default_stem}".replace("_", "-"))
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
                                             info="Remove what varies with the prompts and keep what all the "
                                                  "concept images share (off: the uncentred Schur correction).")
                        fit_button = gr.Button("Fit and save the correction", variant="primary", elem_id="fit-button")
                    with gr.Column(scale=3):
                        concept_report = gr.Markdown(elem_id="concept-report")
                        concept_plot = gr.Image(label="Eigenvalue spectra of the set", interactive=False, height=320)
                        concept_gallery = gr.Gallery(label="The set's prompt/image pairs", columns=6, height=320,
                                                     object_fit="contain", elem_classes="result-gallery")
                gr.Markdown("### 3. Stored corrections and re-indexing\nA correction applies to one index (image or "
                            "caption). Re-indexing writes a corrected copy of that index from the stored embeddings "
                            "(no image is read again); searches keep using the old one until it is complete.")
                corrections_table = gr.Dataframe(headers=CORRECTIONS_HEADERS, value=state.correction_rows(),
                                                 interactive=False, label="Corrections of this collection",
                                                 elem_id="corrections-table")
                names = state.correction_names()
                with gr.Row():
                    reindex_choice = gr.Dropdown(names, value=names[-1] if names else None,
                                                 allow_custom_value=True, label="Correction to re-index with", scale=3)
                    reindex_button = gr.Button("Re-index the collection", scale=1, elem_id="reindex-button")
                reindex_status = gr.Markdown(elem_id="reindex-status")

                preview_button.click(act["concept_preview"], [concept, concept_table, concept_images],
                                     [concept_report, concept_plot, concept_gallery], api_name="concept_report",
                                     concurrency_id="read")
                fit_button.click(act["fit"], [concept, concept_table, concept_images, name, direction, kernel, mode,
                                              size_by, components, energy, strength, replace, center],
                                 [concept_report, corrections_table, correction, reindex_choice, header],
                                 api_name="fit_correction", concurrency_id="write")
                reindex_button.click(act["reindex"], reindex_choice,
                                     [reindex_status, corrections_table, correction, header],
                                     api_name="reindex", concurrency_id="write")
                concept_table.upload(lambda _: UPLOAD_CHOICE, concept_table, concept, api_visibility="private",
                                     show_progress="hidden")
                concept.change(
                    lambda choice: f"no-{Path(choice).stem}".replace("_", "-") if choice and choice != UPLOAD_CHOICE
                    else gr.update(), concept, name, api_visibility="private", show_progress="hidden")

            # -------------------------------------------------------------- Clusters
            with gr.Tab("Clusters", id="clusters"):
                gr.Markdown("Each row is one mode (cluster) of the images, its top images left to right. "
                            "**Original modes** follow all the variety of the images; **Schur modes** follow only "
                            "what the prompts do not explain, so they group images by what the prompts leave out.")
                cluster_inputs = _source_controls(gr, state, "clusters")
                with gr.Row():
                    top = gr.Slider(3, 12, value=8, step=1, label="Images per mode", scale=3)
                    clusters_button = gr.Button("Show the clusters", variant="primary", scale=1,
                                                elem_id="clusters-button")
                clusters_summary = gr.Markdown(elem_id="clusters-summary")
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
                clusters_plot = gr.Image(label="Eigenvalue spectra: all image variety, the prompts' part, "
                                               "the images' own part", interactive=False, height=380)
                clusters_button.click(act["clusters"], [*cluster_inputs, top],
                                      [clusters_summary, clusters_plot, *mode_galleries], api_name="clusters",
                                      concurrency_id="read")

            # ---------------------------------------------------------------- Report
            with gr.Tab("Report", id="report"):
                gr.Markdown("The SCE report of a prompt/image set: how much of the images' variety the prompts "
                            "explain, and how much is the images' own (the SCE score), with the eigenvalue spectra "
                            "and the modes before and after the prompts' part is removed.")
                report_inputs = _source_controls(gr, state, "report")
                report_button = gr.Button("Build the report", variant="primary", elem_id="report-button")
                report_score = gr.Markdown(elem_id="report-score")
                with gr.Row():
                    report_spectra = gr.Image(label="Eigenvalue spectra", interactive=False)
                    report_modes = gr.Image(label="Original modes (top rows) and Schur modes (bottom rows)",
                                            interactive=False)
                report_json = gr.File(label="report.json", interactive=False)
                report_button.click(act["report"], list(report_inputs),
                                    [report_score, report_spectra, report_modes, report_json], api_name="report",
                                    concurrency_id="read")
                # `sce evaluate` (issue 7): the usual text-to-image metrics, from the app's encoder.
                gr.Markdown("### Evaluate text-to-image outputs\n"
                            "CLIPScore, the SCE score, Vendi, RKE and, with reference images, the Frechet "
                            "distance, KID, CMMD and PSNR/SSIM (same-named images), all from this collection's "
                            "encoder. Upload a CSV or JSONL file with an `image` and a `prompt` column, or a text "
                            "file with one prompt a line whose images are named `<line number>.png`; images are "
                            "matched by file name.")
                with gr.Row():
                    evaluate_table = gr.File(label="Prompts file", file_types=[".csv", ".jsonl", ".txt"],
                                             elem_id="evaluate-prompts")
                    evaluate_images = gr.File(label="Generated images", file_count="multiple", file_types=["image"],
                                              elem_id="evaluate-images")
                    evaluate_reference = gr.File(label="Reference images (optional, at least 2)",
                                                 file_count="multiple", file_types=["image"],
                                                 elem_id="evaluate-reference")
                evaluate_button = gr.Button("Evaluate", variant="primary", elem_id="evaluate-button")
                evaluate_rows = gr.Dataframe(headers=EVALUATION_HEADERS, label="Evaluation", interactive=False,
                                             elem_id="evaluate-table")
                evaluate_notes = gr.Markdown(elem_id="evaluate-notes")
                evaluate_files = gr.File(label="evaluation.html and evaluation.json", file_count="multiple",
                                         interactive=False, elem_id="evaluate-files")
                evaluate_button.click(act["evaluate"], [evaluate_table, evaluate_images, evaluate_reference],
                                      [evaluate_rows, evaluate_notes, evaluate_files], api_name="evaluate",
                                      concurrency_id="read")

        app.load(act["refresh"], None, [header, correction, reindex_choice, corrections_table],
                 api_visibility="private", show_progress="hidden")
    app.sce_state = state
    return app


def close_app(app: gr.Blocks) -> None:
    """Stop the server (if running) and close the app's collection."""
    try:
        if getattr(app, "is_running", False):
            app.close()
    finally:
        state = getattr(app, "sce_state", None)
        if state is not None:
            state.close()


def launch_app(app: gr.Blocks, *, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, block: bool = True, quiet: bool = False) -> str:
    """Serve ``app`` on host:port; returns the local URL (``block=False`` returns at once).

    Only the collection's image folders (and the shipped concept sets' images) are served;
    uploads above ``max_upload_mb`` are refused.
    """
    state = app.sce_state
    app.queue(default_concurrency_limit=1)
    _, local_url, _ = app.launch(
        server_name=host, server_port=port, allowed_paths=state.allowed_paths, blocked_paths=state.blocked_paths,
        max_file_size=f"{int(max_upload_mb * 1024)}kb", prevent_thread_lock=not block, show_error=False,
        share=False, inbrowser=False, quiet=quiet, css=CSS, footer_links=["api", "gradio"], run_history=False,
        enable_monitoring=False, ssr_mode=False, mcp_server=False,
    )
    return local_url


def serve_command(
    collection: Annotated[Path, typer.Option("--collection", "-c", help="Collection directory to serve.")] = Path(
        "sce-collection"),
    db: Annotated[Optional[str], typer.Option(
        help="Catalog as an SQLAlchemy URL or a path. Default: COLLECTION/catalog.sqlite.")] = None,
    host: Annotated[str, typer.Option(
        help="Address to bind. The UI has no login: bind another address than 127.0.0.1 only on a "
             "network you trust.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = DEFAULT_PORT,
    max_upload_mb: Annotated[float, typer.Option(
        min=0.01, help="Largest upload accepted, in megabytes.")] = DEFAULT_MAX_UPLOAD_MB,
    concepts: Annotated[Optional[Path], typer.Option(
        help="Folder of concept-set CSVs offered in the UI. Default: the repository's data/concepts.")] = None,
) -> None:
    """Open the web UI over a collection: A/B search, corrections, clusters and SCE reports."""
    from ui.cli_index import configure_logging, reporting_errors

    configure_logging(quiet=False)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with reporting_errors():
        app = build_app(collection, db, concepts_dir=concepts)
        try:
            app.sce_state.encoder  # load it now: a missing model is a startup error, not a failed search
            if host not in ("127.0.0.1", "localhost", "::1"):
                logger.warning("serving on %s: anyone who can reach it can search and fit corrections", host)
            try:
                url = launch_app(app, host=host, port=port, max_upload_mb=max_upload_mb, block=False, quiet=True)
            except OSError as error:
                if "empty port" in str(error):
                    raise ValueError(f"port {port} on {host} is in use; choose another with --port") from None
                raise
            typer.echo(f"serving {app.sce_state.collection.root} at {url} (Ctrl+C stops)")
            app.block_thread()
        finally:
            close_app(app)
