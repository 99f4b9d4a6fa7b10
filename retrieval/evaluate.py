"""`sce evaluate`: the usual text-to-image metrics next to the SCE report, from one encoder.

Feature extraction happens here; every number comes from a pure function in
`retrieval.metrics` or `sce_correct`. All embeddings come from the same encoder (mixing
encoders is refused), so numbers are comparable only with runs of that encoder — not with
published CLIP or Inception-v3 figures.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import sce_correct as sc
from indexing.atomic import write_atomically
from indexing.encoders.encoder import encode_texts_once
from retrieval import metrics
from indexing.readers import list_image_files
from indexing.tables import read_table, require_file, require_folder
from retrieval.pairs import PairedSet
from sce_correct.errors import InputError

logger = logging.getLogger(__name__)


@dataclass
class EvaluationReport:
    encoder: str
    n_images: int
    n_prompts: int
    clip_score: metrics.ClipScoreResult
    sce: sc.SCEReport
    vendi: float
    rke: float
    reference: str | None = None
    n_reference: int | None = None
    frechet_distance: float | None = None
    kid: metrics.KIDResult | None = None
    cmmd: float | None = None
    inception_score: metrics.InceptionScoreResult | None = None
    psnr: float | None = None
    ssim: float | None = None
    n_pixel_pairs: int | None = None
    directional_similarity: metrics.DirectionalSimilarityResult | None = None
    notes: list[str] = field(default_factory=list)

    def summary_rows(self) -> list[tuple[str, str]]:
        """(metric, value) rows for a terminal table."""
        rows = [
            ("images / distinct prompts", f"{self.n_images} / {self.n_prompts}"),
            ("CLIPScore (w=2.5, mean)", f"{self.clip_score.mean:.4f}"),
            ("SCE score E(S)", f"{self.sce.image_diversity:.4f}"),
            ("text diversity E(R)", f"{self.sce.text_diversity:.4f}"),
            ("image share tr S / text share tr R", f"{self.sce.image_share:.3f} / {self.sce.text_share:.3f}"),
            ("Vendi", f"{self.vendi:.4f}"),
            ("RKE", f"{self.rke:.4f}"),
        ]
        if self.frechet_distance is not None:
            rows.append((f"Frechet distance vs reference ({self.n_reference})", f"{self.frechet_distance:.4f}"))
        if self.kid is not None:
            rows.append(("KID (mean +- std)", f"{self.kid.mean:.5f} +- {self.kid.std:.5f}"))
        if self.cmmd is not None:
            rows.append(("CMMD", f"{self.cmmd:.4f}"))
        if self.inception_score is not None:
            rows.append((f"Inception-style score ({self.inception_score.classifier})",
                         f"{self.inception_score.mean:.3f} +- {self.inception_score.std:.3f}"))
        if self.psnr is not None:
            rows.append((f"PSNR / SSIM ({self.n_pixel_pairs} pairs)", f"{self.psnr:.2f} dB / {self.ssim:.4f}"))
        if self.directional_similarity is not None:
            rows.append(("CLIP directional similarity", f"{self.directional_similarity.mean:.4f}"))
        return rows

    def to_dict(self) -> dict:
        def conv(v):
            if hasattr(v, "to_dict"):
                return v.to_dict()
            if isinstance(v, np.ndarray):
                return v.tolist()
            return v
        return {k: conv(v) for k, v in self.__dict__.items()}


def _list_images(folder: Path) -> list[Path]:
    require_folder(folder, "reference folder")
    files = list_image_files(folder, what="reference folder")
    if len(files) < 2:
        raise InputError(f"{folder} has {len(files)} image(s); a reference set needs at least 2")
    return files


def read_edit_pairs(path: str | Path) -> list[dict[str, str]]:
    """A table with source_image, edited_image, source_caption, edited_caption (paths relative to it)."""
    path = Path(path)
    require_file(path, "edit pairs file")
    need = ("source_image", "edited_image", "source_caption", "edited_caption")
    table = read_table(path)
    missing = [c for c in need if table.columns is not None and c not in table.columns]
    if missing:
        raise InputError(f"{path} lacks column(s) {', '.join(missing)}")
    rows = []
    for row in table.rows():
        values = {key: str(row.values.get(key) or "").strip() for key in need}
        for key in need:
            if not values[key]:
                raise InputError(f"{row.where}: {key} is empty")
        for key in ("source_image", "edited_image"):
            p = Path(values[key]) if Path(values[key]).is_absolute() else path.parent / values[key]
            if not p.is_file():
                raise InputError(f"{row.where}: image not found: {p}")
            values[key] = str(p)
        rows.append(values)
    if not rows:
        raise InputError(f"{path} has no edit pairs")
    return rows


def evaluate(encoder, pairs: PairedSet, *, reference: str | Path | None = None, edits: str | Path | None = None,
             kernel: str = "cosine", kid_subsets: int = 100, progress: bool = False) -> EvaluationReport:
    """Every metric that the inputs allow (reference metrics need `reference`, edit metrics `edits`)."""
    text_emb = encode_texts_once(encoder, pairs.prompts)
    image_emb = encoder.encode_images(pairs.images, progress=progress)
    distinct = len(set(pairs.prompts))
    report = EvaluationReport(
        encoder=encoder.name, n_images=len(pairs), n_prompts=distinct,
        clip_score=metrics.clip_score(image_emb, text_emb),
        sce=sc.sce_score(text_emb, image_emb, kernel=kernel),
        vendi=metrics.vendi_score_from_features(image_emb), rke=metrics.rke_from_features(image_emb),
    )
    probs_fn = getattr(encoder, "image_class_probabilities", None)
    if probs_fn is not None:
        probs, classifier = probs_fn(pairs.images)
        report.inception_score = metrics.inception_score_from_probs(
            probs, n_splits=min(10, max(1, len(pairs) // 2)), classifier=classifier)
    else:
        report.notes.append(f"encoder {encoder.name} has no image classifier: no Inception-style score")
    if reference is not None:
        ref_files = _list_images(Path(reference))
        ref_emb = encoder.encode_images(ref_files, progress=progress)
        report.reference, report.n_reference = str(reference), len(ref_files)
        if min(len(ref_emb), len(image_emb)) <= image_emb.shape[1]:
            report.notes.append(f"fewer images than embedding dimensions ({image_emb.shape[1]}): the Frechet "
                                "distance is biased and unstable at this size")
        report.frechet_distance = metrics.frechet_distance_from_features(image_emb, ref_emb)
        report.kid = metrics.kernel_inception_distance(image_emb, ref_emb, n_subsets=kid_subsets, subset_size=1000)
        report.cmmd = metrics.cmmd(image_emb, ref_emb)
        _pixel_metrics(report, pairs, ref_files)
    if edits is not None:
        rows = read_edit_pairs(edits)
        src_img = encoder.encode_images([r["source_image"] for r in rows])
        edit_img = encoder.encode_images([r["edited_image"] for r in rows])
        src_txt = encoder.encode_texts([r["source_caption"] for r in rows])
        edit_txt = encoder.encode_texts([r["edited_caption"] for r in rows])
        report.directional_similarity = metrics.directional_similarity(src_img, edit_img, src_txt, edit_txt)
    return report


def _pixel_metrics(report: EvaluationReport, pairs: PairedSet, ref_files: list[Path]) -> None:
    """PSNR/SSIM over generated images that have a reference file of the same name and size."""
    from PIL import Image

    by_name = {p.name: p for p in ref_files}
    values_p, values_s, skipped = [], [], 0
    for img in pairs.images:
        ref = by_name.get(Path(img).name)
        if ref is None:
            continue
        with Image.open(img) as a, Image.open(ref) as b:
            if a.size != b.size:
                skipped += 1
                continue
            arr_a, arr_b = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
        if min(arr_a.shape[:2]) < 11:
            skipped += 1
            continue
        values_p.append(metrics.psnr(arr_a, arr_b))
        values_s.append(metrics.ssim(arr_a, arr_b))
    if values_p:
        finite = [v for v in values_p if np.isfinite(v)]
        report.psnr = float(np.mean(finite)) if finite else float("inf")
        report.ssim = float(np.mean(values_s))
        report.n_pixel_pairs = len(values_p)
    if skipped:
        report.notes.append(f"{skipped} same-named reference image(s) differ in size: left out of PSNR/SSIM")


# ------------------------------------------------------------------------------------ output
def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode()


def write_evaluation(report: EvaluationReport, out_dir: str | Path) -> dict[str, Path]:
    """evaluation.json and a one-page evaluation.html (table and plots), written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(report.clip_score.per_pair, bins=30, color="tab:blue")
    ax.set_xlabel("CLIPScore per image")
    ax.set_ylabel("images")
    fig.tight_layout()
    hist = _png_base64(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    shares = [report.sce.text_share, report.sce.image_share]
    ax.barh(["explained by prompts (tr R)", "images' own (tr S)"], shares, color=["tab:orange", "tab:green"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the image variety")
    fig.tight_layout()
    bars = _png_base64(fig)
    plt.close(fig)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in report.summary_rows())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>sce evaluate</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}td{{padding:4px 12px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>Text-to-image evaluation</h1>
<p>Encoder <code>{html.escape(report.encoder)}</code>. Numbers are comparable only with runs of the same encoder.</p>
<table>{rows}</table>{f'<ul>{notes}</ul>' if notes else ''}
<img alt="CLIPScore histogram" src="data:image/png;base64,{hist}">
<img alt="variety shares" src="data:image/png;base64,{bars}"></body></html>"""
    paths = {"json": out / "evaluation.json", "html": out / "evaluation.html"}
    for path, text in ((paths["json"], json.dumps(report.to_dict(), indent=2, default=float)), (paths["html"], page)):
        write_atomically(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return paths
