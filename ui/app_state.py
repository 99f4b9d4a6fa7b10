"""The web UI's shared state: the open collection, its encoder, a scratch folder, what every tab reads.

:class:`AppState` is created once per app (by `ui.app.build_app`); each tab's actions
(`ui.tab_*`) use it. It also decides what the server may show: :meth:`AppState.gallery`
copies the images an action found in the catalog or a concept set into Gradio's cache,
and the server serves nothing else of the collection's folders (`launch_app` passes no
``allowed_paths``), so an unlisted file next to the images cannot be fetched.

Only the app's modules import this one, when the app is built, so importing gradio here does
not slow the command line.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from indexing.collection import Collection
from indexing.correction_store import CorrectionInfo, list_corrections
from indexing.shipped_data import shipped_data
from sce_correct.errors import InputError, NotFoundError
from ui.app_uploads import DEFAULT_MAX_PIXELS, stage_pairs

logger = logging.getLogger(__name__)

UPLOAD_CHOICE = "upload"
NO_CORRECTION = ""
CORRECTIONS_HEADERS = ["name", "concept set", "direction", "kernel", "mode", "components",
                       "applies to", "re-indexed version", "status"]


# ------------------------------------------------------------------------------------ rendering
def fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def score_markdown(score, title: str) -> str:
    """The SCE report's numbers as a small table (sce_correct.SCEReport)."""
    rows = [
        ("SCE score: image diversity E(S)", f"{score.image_diversity:.3f}",
         "variety the prompts do not explain"),
        ("text diversity E(R)", f"{score.text_diversity:.3f}", "variety the prompts explain"),
        ("image share tr S", f"{score.image_share:.1%}", "of all image variety is the images' own"),
        ("text share tr R", f"{score.text_share:.1%}", "of all image variety follows the prompts"),
        ("Vendi score", f"{score.vendi:.2f}", "image set alone"),
        ("RKE", f"{score.rke:.2f}", "image set alone"),
    ]
    lines = [f"#### {title}", "", "| measure | value | meaning |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {meaning} |" for name, value, meaning in rows]
    lines.append(f"\n{score.n} pairs, {score.kernel} kernel.")
    return "\n".join(lines)


def uploaded_files(value: Any) -> list[str]:
    """Paths from a gr.File value (None, one path, or a list of paths / FileData dicts)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    paths = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("path")
        if item:
            paths.append(str(item))
    return paths


# ---------------------------------------------------------------------------------------- state
class AppState:
    """The open collection, its encoder, and what the tabs share (corrections, concept sets, galleries)."""

    def __init__(self, collection_dir: str | Path, db: str | None = None, encoder: Any = None,
                 concepts_dir: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.collection = Collection.open(collection_dir, db)
        if self.collection.encoder_name is None:
            self.collection.close()
            raise InputError(f"collection {self.collection.root} is empty; build it first with `sce index build`")
        if encoder is not None:
            self.collection.check_encoder(encoder.name, encoder.dim)
        self._encoder = encoder
        self._retriever = None
        self._metadata_fields: list[str] | None = None
        self.concepts_dir = Path(concepts_dir) if concepts_dir is not None else shipped_data("concepts")
        self.max_pixels = max_pixels
        self.work_dir = Path(tempfile.mkdtemp(prefix="sce-ui-"))
        self.write_lock = threading.Lock()
        self._encoder_lock = threading.Lock()
        #: The app whose cache galleries are served from (set by `ui.app.build_app`).
        self.blocks: gr.Blocks | None = None
        # Never served, even if someone widens the allowed paths: the collection's own files.
        self.blocked_paths = [str(self.collection.root)]
        catalog_file = self.collection.catalog.url.removeprefix("sqlite:///")
        if self.collection.catalog.url.startswith("sqlite:///") and Path(catalog_file).is_file():
            self.blocked_paths.append(str(Path(catalog_file).resolve()))

    def close(self) -> None:
        self.collection.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- lazily loaded ----------------------------------------------------------------------
    @property
    def encoder(self):
        with self._encoder_lock:
            if self._encoder is None:
                logger.info("loading encoder %s", self.collection.encoder_name)
                self._encoder = self.collection.load_encoder()
            return self._encoder

    @property
    def retriever(self):
        if self._retriever is None:
            from retrieval.search import Retriever

            self._retriever = Retriever(self.collection, self.encoder)
        return self._retriever

    def forget_corrections(self) -> None:
        """Drop cached correctors after a fit or re-index (a replaced correction must be re-read)."""
        self._retriever = None

    def stage_upload(self, table: Any, images: Any, what: str, missing: str) -> tuple[Path, Path]:
        """Copy an uploaded table and its images into a fresh scratch folder (``what``), checked
        as `ui.app_uploads.stage_pairs` checks them; ``missing``: the message when no table came."""
        tables = uploaded_files(table)
        if not tables:
            raise InputError(missing)
        return stage_pairs(tables[0], uploaded_files(images), self.scratch(what), max_pixels=self.max_pixels)

    def scratch(self, what: str) -> Path:
        """A new folder in the app's scratch space (plots, staged uploads, reports)."""
        path = self.work_dir / f"{what}-{uuid.uuid4().hex[:10]}"
        path.mkdir(parents=True)
        return path

    # -- what the server shows --------------------------------------------------------------
    def gallery(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Gallery items for images the catalog or a concept set lists (or the app made).

        Each file is copied into Gradio's cache, which is where the page fetches it from; the
        collection's folders themselves are not served. Missing or unreadable files are left
        out with a warning.
        """
        shown, missing = [], 0
        for path, caption in items:
            try:
                cached = self.blocks.move_resource_to_block_cache(path) if self.blocks is not None else path
            except OSError as error:
                logger.warning("cannot show %s: %s", path, error)
                cached = None
            if cached is None or not Path(cached).is_file():
                if cached is not None:
                    logger.warning("cannot show %s: no such file", path)
                missing += 1
            else:
                shown.append((cached, caption))
        if missing:
            gr.Warning(f"{missing} image(s) are missing or unreadable and not shown; the server log names them.")
        return shown

    # -- concept sets -----------------------------------------------------------------------
    def concept_files(self) -> list[Path]:
        return sorted(self.concepts_dir.glob("*.csv")) if self.concepts_dir.is_dir() else []

    def concept_choices(self) -> list[tuple[str, str]]:
        folder = self.concepts_dir.name
        choices = [(f"{path.stem} ({folder}/{path.name})", path.name) for path in self.concept_files()]
        return choices + [("an uploaded CSV and its images (below)", UPLOAD_CHOICE)]

    def concept_set(self, choice: str | None, table: Any, images: Any):
        """The chosen shipped concept set, or the uploaded one (staged: only its uploaded images)."""
        from retrieval.concepts import load_concept_set
        if choice == UPLOAD_CHOICE or (not choice and uploaded_files(table)):
            staged, _ = self.stage_upload(table, images, "concept",
                                          "upload a concept CSV (columns prompt,image or source,target), "
                                          "or pick one of the shipped concept sets")
            return load_concept_set(staged)
        if not choice:
            raise InputError("pick one of the shipped concept sets or upload one")
        known = {path.name: path for path in self.concept_files()}
        if choice not in known:
            raise NotFoundError(f"no concept set {choice!r} in {self.concepts_dir}; "
                                f"known: {', '.join(sorted(known)) or 'none'}")
        return load_concept_set(known[choice])

    # -- the collection and its corrections -------------------------------------------------
    def metadata_fields(self) -> list[str]:
        """Metadata fields set on the first 500 items; read once (the app builds its field
        choices from them, and every change of the correction asks again)."""
        if self._metadata_fields is None:
            ids = self.collection.item_ids()[:500]
            fields: set[str] = set()
            for record in self.collection.items(ids).values():
                fields.update(key for key, value in (record.metadata or {}).items() if value not in (None, ""))
            self._metadata_fields = sorted(fields)
        return self._metadata_fields

    def collection_markdown(self) -> str:
        info = self.collection.info()
        ready = [v for v in info.versions if v.state == "ready"]
        indexes = ", ".join(
            f"{v.kind}" + (f" corrected by `{v.correction}`" if v.correction else " (original)") + f": {v.count:,}"
            for v in ready
        ) or "none"
        corrections = len(list_corrections(self.collection))
        return (
            f"**Collection** `{info.root}` | {info.items:,} items | encoder `{info.encoder}` (dim {info.dim}) | "
            f"ready indexes: {indexes} | {corrections} correction(s)"
        )

    def check_correction(self, info: CorrectionInfo) -> str | None:
        """Why this correction cannot be used with the collection, or None."""
        own, dim = self.collection.encoder_name, self.collection.dim
        if info.encoder is not None and own is not None and info.encoder != own:
            return f"fitted with encoder {info.encoder!r}, the collection uses {own!r}: refit it"
        if info.dim is not None and dim is not None and info.dim != dim:
            return f"expects {info.dim}-d embeddings, the collection's are {dim}-d: refit it"
        if not info.file.exists():
            return "its file is missing"
        return None

    def correction_choices(self) -> list[tuple[str, str]]:
        choices = [("none: original results only", NO_CORRECTION)]
        for info in list_corrections(self.collection):
            mode = _mode_of(info)
            built = self.collection.current_version(info.target_kind, info.name) is not None
            label = f"{info.name} ({mode}, {info.target_kind} index{', re-indexed' if built else ''})"
            if self.check_correction(info):
                label += " - unusable, see Corrections"
            choices.append((label, info.name))
        return choices

    def correction_rows(self) -> list[list[str]]:
        rows = []
        for info in list_corrections(self.collection):
            p = info.parameters
            version = self.collection.current_version(info.target_kind, info.name)
            if version is not None:
                built = f"{version.name} ({version.count:,} vectors)"
            elif info.kernel == "cosine":
                built = "not yet (searches project the query)"
            else:
                built = "not yet (needed before searching)"
            rows.append([
                info.name, Path(info.fitted_on or "-").name, info.direction, info.kernel, _mode_of(info),
                ",".join(p["heads"]) if info.kernel == "heads" else
                "-" if p.get("n_components") is None else str(p["n_components"]),
                f"{info.target_kind} index", built, self.check_correction(info) or "ok",
            ])
        return rows

    def correction_names(self) -> list[str]:
        return [info.name for info in list_corrections(self.collection)]

    def refresh(self):
        """Values the page shows on load: (header, search choices, re-index choices, corrections table)."""
        names = self.correction_names()
        return (
            self.collection_markdown(),
            gr.update(choices=self.correction_choices()),
            gr.update(choices=names, value=names[-1] if names else None),
            self.correction_rows(),
        )


def _mode_of(info: CorrectionInfo) -> str:
    """nullify / focus for a Schur correction; a head correction mean-ablates heads."""
    return "mean-ablated heads" if info.kernel == "heads" else info.parameters.get("mode", "nullify")
