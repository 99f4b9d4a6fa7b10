"""SCE reports: the score, the eigenvalue spectra and original vs Schur modes with their images.

A collection's report reads the stored embeddings in chunks: pass one sums the covariances
(O(D^2) memory, D the feature dimension), pass two scores every image on the modes and keeps
each mode's top images. Only a collection smaller than D items (whose rows take less memory
than one D x D matrix) and the exact gaussian kernel (an n x n kernel matrix) are loaded whole.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import sce_correct as sc
from indexing.atomic import write_atomically
from indexing.catalog import EmbeddingKind
from indexing.encoders.encoder import encode_texts_once
from retrieval.corrections import unit
from retrieval.pairs import PairedSet
from sce_correct.errors import InputError
from sce_correct.features import median_sample_rows
from sce_correct.schur import choose_method, paired_inputs

# Items per read of the embedding store when a report streams a collection: few enough for
# the store's indexed `IN (...)` lookup (it reads its whole location table above 5,000 ids).
STREAM_ROWS = 4096

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModeItem:
    index: int  # row in the paired set
    uri: str
    prompt: str
    score: float


@dataclass(frozen=True)
class ModeView:
    kind: str  # "original" (modes of C_I) or "schur" (modes of S)
    rank: int
    eigenvalue: float
    share: float
    items: list[ModeItem]


@dataclass(frozen=True)
class PairedReport:
    """Everything `sce report` shows for one paired prompt/image set."""

    source: str
    score: sc.SCEReport
    spectrum_image: list[float]
    spectrum_explained: list[float]
    spectrum_schur: list[float]
    original_modes: list[ModeView]
    schur_modes: list[ModeView]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"] = self.score.to_dict()
        return d


def _views(kind: str, modes: list[sc.Mode], uris, prompts) -> list[ModeView]:
    """``uris`` and ``prompts``: indexable by a mode item's row (lists, or dicts of the top rows)."""
    return [
        ModeView(kind=kind, rank=m.rank + 1, eigenvalue=m.eigenvalue, share=m.share,
                 items=[ModeItem(int(i), uris[i], prompts[i], float(s)) for i, s in zip(m.top_indices, m.top_scores)])
        for m in modes
    ]


def report_from_embeddings(text_emb: np.ndarray, image_emb: np.ndarray, uris: list[str], prompts: list[str], *,
                           source: str = "", kernel: str = "cosine", sigma: float | None = None,
                           rff_dim: int = 2500, ridge: float = 1e-4, seed: int = 0, n_modes: int = 6,
                           top: int = 8, spectrum_size: int = 50) -> PairedReport:
    """The report of embeddings in memory. With at least as many pairs as feature dimensions
    it is the collection's computation with one batch (one covariance pass gives the spectra
    and both kinds of modes); fewer pairs work in the dual (n x n)."""
    # On unit rows, as corrections are fitted: a Gaussian kernel's bandwidth is then the same
    # whatever the scale of the encoder's raw outputs (open_clip's are not unit-norm).
    text, image, sigma = paired_inputs(unit(text_emb), unit(image_emb), kernel=kernel, sigma=sigma,
                                       seed=seed)
    # One feature map for the whole report: the original modes use the bandwidth the score used
    # (texts and images), so both kinds of modes live in the same feature space.
    kw = dict(kernel=kernel, sigma=sigma, rff_dim=rff_dim, seed=seed)
    features = _feature_dim(kernel, text.shape[1], rff_dim)
    if features is not None and choose_method("auto", len(text), features) == "primal":
        spectra, original, schur = sc.paired_spectra_and_modes([(text, image)], lambda: [image], n_modes=n_modes,
                                                               top=top, ridge=ridge, **kw)
    else:
        spectra = sc.schur_spectra(text, image, ridge=ridge, **kw)
        original = sc.kernel_modes(image, n_modes=n_modes, top=top, **kw)
        schur = sc.schur_modes(text, image, n_modes=n_modes, top=top, ridge=ridge, **kw)
    return _report(source, spectra, original, schur, uris, prompts, ridge=ridge, spectrum_size=spectrum_size)


def _feature_dim(kernel: str, dim: int, rff_dim) -> int | None:
    """D of the kernel's feature map; None for the exact gaussian kernel (no finite map) or a bad name."""
    return {"cosine": int(dim), "gaussian": 2 * int(rff_dim)}.get(kernel)


def _report(source: str, spectra: sc.SchurSpectra, original: list[sc.Mode], schur: list[sc.Mode], uris, prompts,
            *, ridge: float, spectrum_size: int) -> PairedReport:
    cut = slice(0, spectrum_size)
    return PairedReport(
        source=source, score=sc.report_from_spectra(spectra, ridge=ridge),
        spectrum_image=spectra.image[cut].tolist(), spectrum_explained=spectra.explained[cut].tolist(),
        spectrum_schur=spectra.schur[cut].tolist(),
        original_modes=_views("original", original, uris, prompts),
        schur_modes=_views("schur", schur, uris, prompts),
    )


def report_for_pairs(encoder, pairs: PairedSet, *, progress: bool = False, **kwargs) -> PairedReport:
    """Encode a paired set with `encoder` and report on it."""
    text_emb = encode_texts_once(encoder, pairs.prompts)
    image_emb = encoder.encode_images(pairs.images, progress=progress)
    return report_from_embeddings(text_emb, image_emb, [str(p) for p in pairs.images], pairs.prompts,
                                  source=pairs.source, **kwargs)


def report_for_collection(collection, encoder, *, where: dict[str, str] | None = None, limit: int | None = None,
                          seed: int = 0, chunk_rows: int = STREAM_ROWS, **kwargs) -> PairedReport:
    """Report on the collection's captioned items (optionally those whose metadata match `where`).

    Image embeddings come from the store; caption embeddings from the store when every item
    has one, else the captions are encoded now. With at least as many items as feature
    dimensions the store is read ``chunk_rows`` items at a time, twice (covariances, then
    mode scores), never whole; the numbers are those of `report_from_embeddings` on the
    loaded rows (up to rounding).
    """
    collection.check_encoder(encoder.name, encoder.dim)
    ids = collection.item_ids(where, captioned=True)  # filtered in SQL, not item by item here
    if limit is not None and len(ids) > limit:
        rows = np.random.default_rng(seed).choice(len(ids), size=limit, replace=False)
        ids = ids[np.sort(rows)]
    if len(ids) < 2:
        what = f" matching {where}" if where else ""
        raise InputError(f"the collection has {len(ids)} captioned item(s){what}; a report needs at least 2")
    described = "collection" + (f" where {where}" if where else "")
    features = _feature_dim(kwargs.get("kernel", "cosine"), encoder.dim, kwargs.get("rff_dim", 2500))
    if features is None or choose_method("auto", len(ids), features) == "dual":
        return _report_in_memory(collection, encoder, ids, described, seed=seed, **kwargs)
    return _report_streamed(collection, encoder, ids, described, seed=seed, chunk_rows=chunk_rows, **kwargs)


def _report_in_memory(collection, encoder, ids: np.ndarray, described: str, **kwargs) -> PairedReport:
    records = collection.items(ids)
    chosen = [records[item_id] for item_id in ids.tolist() if item_id in records]
    chosen_ids = np.array([r.id for r in chosen], dtype=np.int64)
    image_emb = collection.embeddings.get(EmbeddingKind.IMAGE, chosen_ids)
    captions = [r.caption for r in chosen]
    try:
        text_emb = collection.embeddings.get(EmbeddingKind.CAPTION, chosen_ids)
    except KeyError:
        text_emb = encode_texts_once(encoder, captions)
    return report_from_embeddings(text_emb, image_emb, [r.uri for r in chosen], captions,
                                  source=f"{described}, {len(chosen)} items", **kwargs)


def _report_streamed(collection, encoder, ids: np.ndarray, described: str, *, kernel: str = "cosine",
                     sigma: float | None = None, rff_dim: int = 2500, ridge: float = 1e-4, seed: int = 0,
                     n_modes: int = 6, top: int = 8, spectrum_size: int = 50,
                     chunk_rows: int = STREAM_ROWS) -> PairedReport:
    store = collection.embeddings
    chunk_rows = max(1, int(chunk_rows))
    stored_captions = bool(np.isin(ids, store.ids(EmbeddingKind.CAPTION)).all())

    def texts(chunk: np.ndarray, records) -> np.ndarray:  # unit rows, as report_from_embeddings uses
        if stored_captions:
            return unit(store.get(EmbeddingKind.CAPTION, chunk))
        return unit(encode_texts_once(encoder, [records[item_id].caption for item_id in chunk.tolist()]))

    def image_rows(chunk: np.ndarray) -> np.ndarray:
        return unit(store.get(EmbeddingKind.IMAGE, chunk))

    kept: list[np.ndarray] = []  # the ids reported, chunk by chunk (an item deleted meanwhile is left out)

    def pairs():
        for start in range(0, len(ids), chunk_rows):
            chunk = ids[start:start + chunk_rows]
            records = collection.items(chunk)
            chunk = np.array([item_id for item_id in chunk.tolist() if item_id in records], dtype=np.int64)
            kept.append(chunk)
            if len(chunk):
                yield texts(chunk, records), image_rows(chunk)

    def images():
        for chunk in kept:
            if len(chunk):
                yield image_rows(chunk)

    if kernel == "gaussian" and sigma is None:
        sigma = _median_sigma(collection, ids, texts, image_rows, seed)
    spectra, original, schur = sc.paired_spectra_and_modes(
        pairs(), images, n_modes=n_modes, top=top, kernel=kernel, sigma=sigma, rff_dim=rff_dim, ridge=ridge,
        seed=seed)
    reported = np.concatenate(kept)
    rows = sorted({int(i) for mode in original + schur for i in mode.top_indices})
    records = collection.items(reported[rows])
    uris = {row: records[int(reported[row])].uri for row in rows}
    prompts = {row: records[int(reported[row])].caption for row in rows}
    logger.info("streamed report of %d items in chunks of %d", len(reported), chunk_rows)
    return _report(f"{described}, {len(reported)} items", spectra, original, schur, uris, prompts,
                   ridge=ridge, spectrum_size=spectrum_size)


def _median_sigma(collection, ids: np.ndarray, texts, images, seed: int) -> float:
    """The median heuristic of the in-memory report (texts stacked above images) on just the
    rows it samples, read from the store."""
    n = len(ids)
    rows = median_sample_rows(2 * n, seed=seed)
    rows = np.arange(2 * n) if rows is None else rows
    text_rows, image_rows = rows[rows < n], rows[rows >= n] - n
    text_ids, image_ids = ids[text_rows], ids[image_rows]
    sample = np.concatenate([texts(text_ids, collection.items(text_ids)), images(image_ids)])
    return sc.median_pairwise_distance(sample, seed=seed, max_rows=len(sample))


# -------------------------------------------------------------------------------- output files
def plot_spectra(report: PairedReport, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for values, label in ((report.spectrum_image, "C_I (all image variety)"),
                          (report.spectrum_explained, "R (explained by the prompts)"),
                          (report.spectrum_schur, "S (the images' own, Schur complement)")):
        v = np.asarray(values)
        ax.plot(np.arange(1, len(v) + 1), np.where(v > 0, v, np.nan), marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue rank")
    ax.set_ylabel("eigenvalue")
    s = report.score
    ax.set_title(f"SCE {s.image_diversity:.2f} (image share {s.image_share:.0%}), "
                 f"text diversity {s.text_diversity:.2f}, Vendi {s.vendi:.1f}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def modes_grid(modes: list[ModeView], path: Path, *, thumb: int = 72, title: str = "") -> Path:
    """One row per mode: a label, then its top images."""
    from PIL import Image, ImageDraw, ImageOps

    label_w, pad, head = 190, 4, 24 if title else 0
    cols = max((len(m.items) for m in modes), default=1)
    sheet = Image.new("RGB", (label_w + cols * (thumb + pad) + pad, head + len(modes) * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 6), title, fill="black")
    for r, mode in enumerate(modes):
        y = head + pad + r * (thumb + pad)
        draw.text((pad, y + 4), f"{mode.kind} mode {mode.rank}", fill="black")
        draw.text((pad, y + 22), f"eigenvalue {mode.eigenvalue:.4f}", fill="dimgray")
        draw.text((pad, y + 38), f"{mode.share:.1%} of the variety", fill="dimgray")
        for c, item in enumerate(mode.items):
            try:
                with Image.open(item.uri) as im:
                    tile = ImageOps.pad(im.convert("RGB"), (thumb, thumb), color="white")
            except (OSError, ValueError):
                tile = Image.new("RGB", (thumb, thumb), "lightgray")
            sheet.paste(tile, (label_w + c * (thumb + pad), y))
    write_atomically(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path


def write_report(report: PairedReport, out_dir: str | Path) -> dict[str, Path]:
    """report.json, spectra.png and modes.png (original modes above Schur modes) in `out_dir`."""
    out = Path(out_dir)
    paths = {"json": out / "report.json", "spectra": out / "spectra.png", "modes": out / "modes.png"}
    text = json.dumps(report.to_dict(), indent=2)
    write_atomically(paths["json"], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    plot_spectra(report, paths["spectra"])
    modes_grid(report.original_modes + report.schur_modes, paths["modes"],
               title="original modes (image covariance) above Schur modes (what the prompts leave unexplained)")
    return paths
