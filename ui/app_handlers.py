"""What each button of the web UI does: parse the inputs, call retrieval/indexing, render.

:class:`AppState` holds the open collection, its encoder and a scratch folder; each public
method is one action of the UI (and one named API endpoint). The methods return plain
values for Gradio components (gallery lists of (image, caption), markdown, table rows) and
report every failure as a message: :func:`user_errors` turns exceptions into ``gr.Error``,
so no traceback ever reaches the page (it goes to the server log instead).

Only `ui.app` imports this module, when the app is built, so importing gradio here does not
slow the command line.
"""
from __future__ import annotations

import functools
import html
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr

from indexing.collection import Collection, CollectionBusyError, SearchHit
from indexing.correction_store import CorrectionInfo, CorrectionNotFoundError, correction_info, list_corrections
from ui.app_uploads import DEFAULT_MAX_PIXELS, check_image, stage_pairs, stage_reference

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONCEPTS_DIR = REPO_ROOT / "data" / "concepts"
STRATEGY_CHOICES = [
    ("Auto: the re-indexed version when built, else the query-side projection", "auto"),
    ("Query-side projection (no re-index needed)", "query"),
    ("Re-indexed version", "reindexed"),
    ("Baseline: negative query (q - w * concept)", "negative"),
]
DIRECTION_CHOICES = [
    ("text -> image (t2i): correct the image index", "t2i"),
    ("image -> text (i2t): correct the caption index", "i2t"),
    ("text -> text (t2t): correct the caption index", "t2t"),
]
KERNEL_CHOICES = [("cosine (projection)", "cosine"), ("gaussian (random Fourier features)", "gaussian")]
MODE_CHOICES = [("nullify: remove the concept", "nullify"), ("focus: keep only the concept", "focus")]
SIZE_CHOICES = [("share of the explained variance (energy)", "energy"), ("number of components", "components")]
KIND_CHOICES = [("images", "image"), ("captions", "caption")]
NO_CORRECTION = ""
MAX_MODES = 6
MOVES_HEADERS = ["item", "caption", "original rank", "corrected rank", "moved"]
CORRECTIONS_HEADERS = ["name", "concept set", "direction", "kernel", "mode", "components",
                       "applies to", "re-indexed version", "status"]
UPLOAD_CHOICE = "upload"
EVALUATION_HEADERS = ["metric", "value"]

#: Failures a user can cause and fix; their message is shown as it is.
EXPECTED_ERRORS = (ValueError, LookupError, FileNotFoundError, NotADirectoryError, CollectionBusyError,
                   PermissionError)


def _message(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args and not isinstance(error, CorrectionNotFoundError):
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return text


def user_errors(fn: Callable) -> Callable:
    """Wrap an action so that every failure reaches the page as a ``gr.Error`` message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except EXPECTED_ERRORS as error:
            logger.info("%s refused: %s", fn.__name__, _message(error))
            raise gr.Error(html.escape(_message(error), quote=False), print_exception=False) from None
        except Exception as error:  # the UI boundary: anything else is a bug, logged in full
            logger.exception("%s failed", fn.__name__)
            raise gr.Error(
                html.escape(f"Unexpected error ({type(error).__name__}: {_message(error)}). "
                            "The server log has the details.", quote=False),
                print_exception=False,
            ) from None

    return wrapper


# ------------------------------------------------------------------------------------ rendering
def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
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


def _caption(hit: SearchHit, moved: str = "") -> str:
    """Rank, movement, caption, score and id; the front survives when the grid cuts it short."""
    text = (hit.caption or Path(hit.uri).name).strip()
    return f"{hit.rank}. " + (f"{moved} · " if moved else "") + f"{text} · {hit.score:.3f} · id {hit.item_id}"


def _movement(rank_original: int | None, rank_corrected: int | None) -> str:
    if rank_original is None:
        return "new"
    if rank_corrected is None:
        return "dropped out"
    delta = rank_original - rank_corrected
    return "same rank" if delta == 0 else (f"up {delta}" if delta > 0 else f"down {-delta}")


def _parse_where(text: str | None) -> dict[str, str]:
    """``key=value`` clauses, one a line (or separated by ';')."""
    where: dict[str, str] = {}
    for clause in (text or "").replace(";", "\n").splitlines():
        if not clause.strip():
            continue
        key, sep, value = clause.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"a filter is written key=value (e.g. category=people & body), got {clause.strip()!r}")
        where[key.strip()] = value.strip()
    return where


def _files(value: Any) -> list[str]:
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


def fold_folders(folders) -> list[str]:
    """Distinct folders, each nested one dropped in favour of its ancestor."""
    kept: list[str] = []
    for folder in sorted({os.path.normpath(str(f)) for f in folders if f}):
        if not any(folder == k or folder.startswith(k.rstrip(os.sep) + os.sep) for k in kept):
            kept.append(folder)
    return kept


def image_folders(collection: Collection) -> list[str]:
    """The folders the collection's local image files live in."""
    return fold_folders(os.path.dirname(uri) for uri in collection.known_uris(include_failures=False)
                        if "://" not in uri)


# ---------------------------------------------------------------------------------------- state
class AppState:
    """The open collection, its encoder and the actions the UI offers on them."""

    def __init__(self, collection_dir: str | Path, db: str | None = None, encoder: Any = None,
                 concepts_dir: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.collection = Collection.open(collection_dir, db)
        if self.collection.encoder_name is None:
            self.collection.close()
            raise ValueError(f"collection {self.collection.root} is empty; build it first with `sce index build`")
        if encoder is not None:
            self.collection.check_encoder(encoder.name, encoder.dim)
        self._encoder = encoder
        self._retriever = None
        self._metadata_fields: list[str] | None = None
        self.concepts_dir = Path(concepts_dir) if concepts_dir is not None else DEFAULT_CONCEPTS_DIR
        self.max_pixels = max_pixels
        self.work_dir = Path(tempfile.mkdtemp(prefix="sce-ui-"))
        self._write_lock = threading.Lock()
        self._encoder_lock = threading.Lock()
        # Served: the folders of the collection's images and of the shipped concept sets' images.
        # Never served, even when images live next to it: the collection's own files.
        self.allowed_paths = fold_folders(image_folders(self.collection) + self._concept_image_folders())
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

    def _forget_corrections(self) -> None:
        """Drop cached correctors after a fit (a replaced correction must be re-read)."""
        self._retriever = None

    def _scratch(self, what: str) -> Path:
        path = self.work_dir / f"{what}-{uuid.uuid4().hex[:10]}"
        path.mkdir(parents=True)
        return path

    # -- what the page shows without an action ----------------------------------------------
    def concept_files(self) -> list[Path]:
        return sorted(self.concepts_dir.glob("*.csv")) if self.concepts_dir.is_dir() else []

    def concept_choices(self) -> list[tuple[str, str]]:
        choices = [(f"{path.stem} (data/concepts/{path.name})", path.name) for path in self.concept_files()]
        return choices + [("an uploaded CSV and its images (below)", UPLOAD_CHOICE)]

    def _concept_image_folders(self) -> list[str]:
        """Folders of the shipped concept sets' images, so their previews and modes can be shown."""
        from retrieval.concepts import load_concept_set

        folders: set[str] = set()
        for path in self.concept_files():
            try:
                concept = load_concept_set(path)
            except ValueError as error:
                logger.warning("skipping concept set %s: %s", path, error)
                continue
            folders.update(str(image.parent) for image in concept.images or [])
        return sorted(folders)

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

    def _check_correction(self, info: CorrectionInfo) -> str | None:
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
            mode = info.parameters.get("mode", "nullify")
            built = self.collection.current_version(info.target_kind, info.name) is not None
            label = f"{info.name} ({mode}, {info.target_kind} index{', re-indexed' if built else ''})"
            if self._check_correction(info):
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
                info.name, Path(info.fitted_on or "-").name, info.direction, info.kernel, p.get("mode", "nullify"),
                "-" if p.get("n_components") is None else str(p["n_components"]),
                f"{info.target_kind} index", built, self._check_correction(info) or "ok",
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

    # -- Search -----------------------------------------------------------------------------
    def preview_query_image(self, image_file: Any):
        """Show the uploaded query image (hidden while there is none); a non-image is refused."""
        files = _files(image_file)
        if not files:
            return gr.update(value=None, visible=False)
        return gr.update(value=str(check_image(files[0], max_pixels=self.max_pixels)), visible=True)

    def default_attribute(self, correction: str | None) -> str:
        """The metadata field named like the correction's concept file: its stem, or the
        longest "_"-separated prefix of it that is a field (skin_tone_large.csv -> skin_tone)."""
        if not correction:
            return ""
        try:
            fitted_on = correction_info(self.collection, correction).fitted_on
        except CorrectionNotFoundError:
            return ""
        parts = Path(fitted_on or "").stem.split("_")
        fields = self.metadata_fields()
        for end in range(len(parts), 0, -1):
            if "_".join(parts[:end]) in fields:
                return "_".join(parts[:end])
        return ""

    def search(self, text: str | None, image_file: Any, correction: str | None, strategy: str,
               negative_weight: float, k: float, kind: str, attribute: str | None):
        """A/B search. Returns (summary, original gallery, corrected gallery, moves table)."""
        from retrieval.compare import compare

        text = (text or "").strip()
        images = _files(image_file)
        if text and images:
            raise ValueError("give a text query or an image, not both (clear the image to search by text)")
        if not text and not images:
            raise ValueError("type a text query or upload an image to search with")
        k = int(k)
        if not 1 <= k <= 1000:
            raise ValueError(f"k must be between 1 and 1000, got {k}")
        kind = kind or "image"
        retriever = self.retriever
        if images:
            query = retriever.embed_image(check_image(images[0], max_pixels=self.max_pixels))
            label = f"image {Path(images[0]).name}"
        else:
            query = retriever.embed_text(text)
            label = repr(text)
        if not correction:
            result = retriever.search(query, k, kind=kind)
            original = [(hit.uri, _caption(hit)) for hit in result.hits]
            summary = (f"Original results for {html.escape(label, quote=False)} on the {kind} index. "
                       "Choose a correction to compare it with.")
            return summary, self._shown(original), [], [[str(h.item_id), h.caption or "", str(h.rank), "", ""]
                                                         for h in result.hits]
        ab = compare(retriever, query, label, correction, k=k, kind=kind, strategy=strategy or "auto",
                     attribute=(attribute or None), negative_weight=float(negative_weight))
        changes = {change.item_id: change for change in ab.rank_changes}
        original = [(hit.uri, _caption(hit)) for hit in ab.original]
        corrected = [
            (hit.uri, _caption(hit, _movement(changes[hit.item_id].rank_original, hit.rank)))
            for hit in ab.corrected
        ]
        captions = {hit.item_id: hit.caption or Path(hit.uri).name for hit in ab.original + ab.corrected}
        rows = sorted(
            ab.rank_changes,
            key=lambda c: (c.rank_corrected is None, c.rank_corrected or 0, c.rank_original or 0),
        )
        table = [[str(c.item_id), captions.get(c.item_id, ""), "" if c.rank_original is None else str(c.rank_original),
                  "" if c.rank_corrected is None else str(c.rank_corrected),
                  _movement(c.rank_original, c.rank_corrected)] for c in rows]
        how = {"query": "query-side projection", "reindexed": "re-indexed version",
               "negative": f"negative-query baseline (weight {float(negative_weight):g})"}.get(ab.strategy, ab.strategy)
        both = round(ab.overlap_at_k * k)
        parts = [
            f"**overlap@{k}: {ab.overlap_at_k:.0%}** ({both} of {k} results in both lists)",
            f"correction `{correction}` applied by the {how}",
        ]
        if ab.concept_strength_original is not None:
            parts.append(f"concept strength of the hits {_fmt(ab.concept_strength_original)} -> "
                         f"{_fmt(ab.concept_strength_corrected)}")
        if ab.attribute:
            parts.append(f"hits with `{ab.attribute}` set: {_fmt(ab.attribute_share_original, '{:.0%}')} -> "
                         f"{_fmt(ab.attribute_share_corrected, '{:.0%}')}")
        summary = f"Query {html.escape(label, quote=False)}: " + " | ".join(parts)
        return summary, self._shown(original), self._shown(corrected), table

    def _shown(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Gallery items whose file this server may serve; warns about the others."""
        allowed = [Path(folder) for folder in self.allowed_paths] + [self.work_dir]
        shown = [item for item in items if any(Path(item[0]).is_relative_to(folder) for folder in allowed)
                 and Path(item[0]).is_file()]
        if len(shown) < len(items):
            gr.Warning(f"{len(items) - len(shown)} result image(s) are missing or lie outside the folders this "
                       "server was started with; restart `sce serve` to show new folders.")
        return shown

    # -- Corrections ------------------------------------------------------------------------
    def _concept_set(self, choice: str | None, table: Any, images: Any):
        from retrieval.concepts import load_concept_set

        if choice == UPLOAD_CHOICE or (not choice and _files(table)):
            tables = _files(table)
            if not tables:
                raise ValueError("upload a concept CSV (columns prompt,image or source,target), "
                                 "or pick a set from data/concepts")
            staged, _ = stage_pairs(tables[0], _files(images), self._scratch("concept"), max_pixels=self.max_pixels)
            return load_concept_set(staged)
        if not choice:
            raise ValueError("pick a concept set from data/concepts or upload one")
        known = {path.name: path for path in self.concept_files()}
        if choice not in known:
            raise ValueError(f"no concept set {choice!r} in {self.concepts_dir}; "
                             f"known: {', '.join(sorted(known)) or 'none'}")
        return load_concept_set(known[choice])

    def concept_preview(self, choice: str | None, table: Any, images: Any, progress=gr.Progress()):
        """The SCE report of a preliminary set before fitting: (report, spectra plot, pairs gallery)."""
        from retrieval.pairs import PairedSet
        from retrieval.report import plot_spectra, report_for_pairs

        concept = self._concept_set(choice, table, images)
        if concept.images is None:
            raise ValueError(f"{concept.source.name} pairs texts (source,target); the preview needs prompt/image "
                             "pairs. Fitting a t2t correction still shows its SCE report.")
        progress(0.2, desc=f"encoding {len(concept)} pairs")
        pairs = PairedSet(prompts=concept.prompts, images=list(concept.images), source=str(concept.source))
        report = report_for_pairs(self.encoder, pairs, n_modes=1, top=1)
        plot = plot_spectra(report, self._scratch("concept-report") / "spectra.png")
        gallery = [(str(path), prompt) for prompt, path in zip(concept.prompts, concept.images)]
        title = f"SCE report of the preliminary set {concept.name} ({len(concept)} pairs)"
        return score_markdown(report.score, title), str(plot), gallery

    def fit(self, choice: str | None, table: Any, images: Any, name: str | None, direction: str, kernel: str,
            mode: str, size_by: str, components: float | None, energy: float | None, strength: float,
            replace: bool, center: bool = True, progress=gr.Progress(track_tqdm=True)):
        """Fit and store a correction. Returns (report, table, search choices, re-index choices, header)."""
        from retrieval.corrections import fit_concept_correction

        name = (name or "").strip()
        if not name:
            raise ValueError("give the correction a name, e.g. no-skin-tone")
        concept = self._concept_set(choice, table, images)
        cosine = kernel == "cosine"
        n_components = int(components) if cosine and size_by == "components" and components else None
        share = float(energy) if cosine and size_by != "components" and energy else None
        progress(0.1, desc=f"encoding {len(concept)} pairs and fitting {name}")
        with self._write_lock:
            result = fit_concept_correction(
                self.collection, self.encoder, concept, name=name, direction=direction or "t2i",
                kernel=kernel or "cosine", mode=mode or "nullify", n_components=n_components, energy=share,
                strength=float(strength), center=bool(center), replace=bool(replace), progress=True,
            )
        self._forget_corrections()
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
        return ("\n\n".join(lines), self.correction_rows(), gr.update(choices=self.correction_choices()),
                gr.update(choices=self.correction_names(), value=info.name), self.collection_markdown())

    def reindex(self, name: str | None, progress=gr.Progress(track_tqdm=True)):
        """Re-index the collection with a correction. Returns (status, table, search choices, header)."""
        from retrieval.reindex import reindex

        if not name:
            raise ValueError("choose a correction to re-index with (fit one first)")
        info = correction_info(self.collection, name)
        problem = self._check_correction(info)
        if problem:
            raise ValueError(f"correction {name!r} cannot be used with this collection: {problem}")
        progress(0, desc=f"re-indexing the {info.target_kind} index with {name}")
        with self._write_lock:
            version = reindex(self.collection, name, progress=True)
        self._forget_corrections()
        status = (f"Built index version `{version.name}`: {version.count:,} {version.kind} vectors corrected by "
                  f"**{name}**. Searches with strategy auto now use it.")
        return (status, self.correction_rows(), gr.update(choices=self.correction_choices()),
                self.collection_markdown())

    # -- Clusters and Report ----------------------------------------------------------------
    def _paired_report(self, source: str, where: str | None, limit: float | None, concept: str | None,
                       table: Any, images: Any, n_modes: int, top: int):
        from retrieval.pairs import PairedSet, load_pairs
        from retrieval.report import report_for_collection, report_for_pairs

        kwargs = {"n_modes": n_modes, "top": top}
        if source == "collection":
            limit = int(limit) if limit else None
            return report_for_collection(self.collection, self.encoder, where=_parse_where(where), limit=limit,
                                         **kwargs)
        if source == "concept":
            concept_set = self._concept_set(concept, None, None)
            if concept_set.images is None:
                raise ValueError(f"{concept_set.source.name} pairs texts; clusters need prompt/image pairs")
            pairs = PairedSet(concept_set.prompts, list(concept_set.images), str(concept_set.source))
            return report_for_pairs(self.encoder, pairs, **kwargs)
        if source == UPLOAD_CHOICE:
            tables = _files(table)
            if not tables:
                raise ValueError("upload a prompts file (CSV/JSONL with image and prompt columns, or a text file "
                                 "with one prompt a line) and its images")
            staged, images_dir = stage_pairs(tables[0], _files(images), self._scratch("pairs"),
                                             max_pixels=self.max_pixels)
            pairs = load_pairs(staged, images_dir if staged.suffix.lower() == ".txt" else None)
            pairs = replace(pairs, source=f"uploaded {Path(tables[0]).name}")
            return report_for_pairs(self.encoder, pairs, **kwargs)
        raise ValueError(f"unknown report source {source!r}")

    def clusters(self, source: str, where: str | None, limit: float | None, concept: str | None, table: Any,
                 images: Any, top: float, progress=gr.Progress()):
        """Original modes beside Schur modes. Returns (summary, spectra plot, 6 + 6 mode galleries)."""
        from retrieval.report import plot_spectra

        progress(0.1, desc="computing the modes")
        report = self._paired_report(source, where, limit, concept, table, images, MAX_MODES, int(top))
        plot = plot_spectra(report, self._scratch("clusters") / "spectra.png")
        s = report.score
        summary = (f"**{s.n} pairs** ({html.escape(report.source, quote=False)}) | SCE score {s.image_diversity:.3f} | "
                   f"{s.image_share:.0%} of the image variety is the images' own, {s.text_share:.0%} follows the "
                   "prompts. Left: modes of all image variety; right: modes of what the prompts leave unexplained.")
        galleries = []
        for modes in (report.original_modes, report.schur_modes):
            for slot in range(MAX_MODES):
                if slot < len(modes):
                    mode = modes[slot]
                    items = self._shown([(item.uri, f"{item.prompt} | {item.score:.2f}") for item in mode.items])
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
        paths = write_report(report, self._scratch("report"))
        title = f"SCE report: {report.source}"
        return (score_markdown(report.score, html.escape(title, quote=False)), str(paths["spectra"]),
                str(paths["modes"]), str(paths["json"]))

    # -- Report: `sce evaluate` -------------------------------------------------------------
    def evaluate(self, table: Any, images: Any, reference: Any, progress=gr.Progress()):
        """`sce evaluate` on an uploaded prompts file, its generated images and optional reference images.

        Returns (summary rows [metric, value], notes markdown, [evaluation.html, evaluation.json]).
        """
        from retrieval.evaluate import evaluate, write_evaluation
        from retrieval.pairs import load_pairs

        tables = _files(table)
        if not tables:
            raise ValueError("upload a prompts file (CSV/JSONL with image and prompt columns, or a text file "
                             "with one prompt a line) and its generated images")
        generated = _files(images)
        if not generated:
            raise ValueError("upload the generated images of the prompts file (matched by file name)")
        references = _files(reference)
        scratch = self._scratch("evaluate")
        table_name = Path(tables[0]).name
        progress(0.05, desc="checking the uploads")
        try:
            staged, images_dir = stage_pairs(tables[0], generated, scratch / "pairs", max_pixels=self.max_pixels)
            pairs = load_pairs(staged, images_dir if staged.suffix.lower() == ".txt" else None)
            reference_dir = (stage_reference(references, scratch / "reference", max_pixels=self.max_pixels)
                             if references else None)
            progress(0.2, desc=f"encoding {len(pairs)} images and prompts"
                               + (f" and {len(references)} reference images" if references else ""))
            report = evaluate(self.encoder, pairs, reference=reference_dir)
        except ValueError as error:
            # Messages name the server's scratch copies; show the user's own names instead.
            text = str(error)
            for path, name in ((scratch / "pairs" / "images", "the uploaded images"),
                               (scratch / "pairs" / table_name, table_name),
                               (scratch / "reference", "the uploaded reference images")):
                text = text.replace(str(path), name)
            raise ValueError(text.replace(str(scratch) + os.sep, "")) from None
        if reference_dir is not None:
            report.reference = f"{len(references)} uploaded reference images"
        progress(0.9, desc="writing evaluation.html and evaluation.json")
        paths = write_evaluation(report, scratch / "out")
        rows = [[metric, value] for metric, value in report.summary_rows()]
        notes = [f"**{len(pairs)} pairs** (uploaded {html.escape(table_name, quote=False)}), encoder "
                 f"`{report.encoder}`: numbers are comparable only with runs of the same encoder."]
        if reference_dir is None:
            notes.append("No reference images uploaded: no Frechet distance, KID, CMMD, PSNR or SSIM.")
        notes += [html.escape(note, quote=False) for note in report.notes]
        return rows, "\n".join(f"- {note}" for note in notes), [str(paths["html"]), str(paths["json"])]


def bind(state: AppState, names: Sequence[str]) -> dict[str, Callable]:
    """The state's actions by name, each wrapped by :func:`user_errors`."""
    return {name: user_errors(getattr(state, name)) for name in names}
