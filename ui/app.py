"""`sce serve`: the Gradio web UI over a collection (Search, Corrections, Clusters, Report, Heads).

This module composes the page and serves it. Each tab lays itself out and wires its actions
in its own module (`ui.tab_search`, `ui.tab_corrections`, `ui.tab_clusters` for Clusters and
Report, `ui.tab_evaluate`, `ui.tab_heads`); what they share is `ui.app_state.AppState`, and
`ui.app_errors` turns failures into one-line messages. Gradio is imported inside the
functions, so `import ui.app` (and `sce --help`) stays fast.

Every main action is a named API endpoint, callable with ``gradio_client``::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    summary, original, corrected, moves = client.predict(
        "raised fist dark skin tone", None, "no-skin-tone", "auto", 1.0, 12, "image", "skin_tone",
        api_name="/search")

Endpoints: /search, /concept_report, /fit_correction, /reindex, /clusters, /report, /evaluate,
/heads, /head_heatmap.
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
ENDPOINTS = ("search", "concept_report", "fit_correction", "reindex", "clusters", "report", "evaluate",
             "heads", "head_heatmap")

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
part is removed, **Report** gives the SCE score of a prompt/image set and evaluates
text-to-image outputs, and **Heads** shows what each attention head of a ViT encoder encodes."""


def build_app(collection_dir: str | Path, db: str | None = None, encoder: Any = None,
              concepts_dir: str | Path | None = None, *, max_pixels: int | None = None) -> gr.Blocks:
    """The Gradio Blocks app over a collection; ``encoder`` defaults to the collection's own.

    The app's state (open collection, encoder, scratch folder) is ``app.sce_state``; stop the
    server and close it with :func:`close_app`.
    """
    import gradio as gr

    from ui.app_errors import user_errors
    from ui.app_state import AppState
    from ui.app_uploads import DEFAULT_MAX_PIXELS
    from ui.tab_clusters import build_clusters_tab, build_report_tab
    from ui.tab_corrections import build_corrections_tab
    from ui.tab_evaluate import build_evaluate_section
    from ui.tab_heads import build_heads_tab
    from ui.tab_search import build_search_tab

    state = AppState(collection_dir, db=db, encoder=encoder, concepts_dir=concepts_dir,
                     max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    # Gradio's cache holds the copies of what the page showed and the uploads: checked daily,
    # a file unused for a day is deleted (a copy shown again counts as used), all at shutdown.
    with gr.Blocks(title="SCE retrieval", analytics_enabled=False, delete_cache=(86400, 86400)) as app:
        state.blocks = app  # galleries are served from this app's cache
        gr.Markdown(INTRO)
        header = gr.Markdown(state.collection_markdown(), elem_id="collection-info")
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                search = build_search_tab(state)
            with gr.Tab("Corrections", id="corrections"):
                corrections = build_corrections_tab(state, header, search.correction)
            with gr.Tab("Clusters", id="clusters"):
                build_clusters_tab(state)
            with gr.Tab("Report", id="report"):
                build_report_tab(state)
                build_evaluate_section(state)  # `sce evaluate` (issue 7), from the app's encoder
            with gr.Tab("Heads", id="heads"):
                build_heads_tab(state)  # issue 14: a ViT encoder's heads in words, per patch
        app.load(user_errors(state.refresh), None,
                 [header, search.correction, corrections.reindex_choice, corrections.table],
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

    No folder is served: the page fetches the images an action shows (listed by the catalog
    or a concept set) from copies in Gradio's cache, and uploads; uploads above
    ``max_upload_mb`` are refused.
    """
    state = app.sce_state
    if os.environ.get("GRADIO_ALLOWED_PATHS"):
        logger.warning("GRADIO_ALLOWED_PATHS is set: gradio also serves every file in %s",
                       os.environ["GRADIO_ALLOWED_PATHS"])
    app.queue(default_concurrency_limit=1)
    _, local_url, _ = app.launch(
        server_name=host, server_port=port, allowed_paths=[], blocked_paths=state.blocked_paths,
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
        help="Folder of concept-set CSVs offered in the UI. Default: the concept sets shipped with the package.")] = None,
) -> None:
    """Open the web UI over a collection: A/B search, corrections, clusters, SCE reports and a ViT's heads."""
    from sce_correct.errors import ConflictError
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
                    raise ConflictError(f"port {port} on {host} is in use; choose another with --port") from None
                raise
            typer.echo(f"serving {app.sce_state.collection.root} at {url} (Ctrl+C stops)")
            app.block_thread()
        finally:
            close_app(app)
