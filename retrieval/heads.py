"""What the heads of a collection's ViT encode, and what removing them costs (issue 14 part 4).

One decomposition pass (:func:`indexing.encoders.decomposition.decompose`) over a seeded sample
of a collection's images gives every image's embedding as a sum of terms (stem, per-layer MLPs,
per-(layer, head) attention terms), all in the encoder's output space, where its text tower's
embeddings live too. From those terms alone:

- :func:`head_report`: per head, its TEXTSPAN texts (:func:`sce_correct.textspan.textspan`)
  against a text bank, the variance each explains, the head's total variance, and its top
  images: those whose head output has the largest dot product with the (unit) embedding of the
  head's first TEXTSPAN text;
- :func:`ablation_report`: caption->image R@10 of the sample (its captions as queries against
  its images) when components are mean-ablated (replaced by their mean over the sample, then
  the terms summed and normalised): layers cumulatively from the first (a layer = its heads
  and its MLP), and each head alone. Nothing is re-encoded per ablation.

With every layer ablated an image's embedding is still not constant: the stem term (the class
embedding through ``ln_post``) is scaled by the image's own 1/sigma (the deviation of its real
residual stream, see the decomposition's docstring), so the embeddings keep a one-parameter
family and R@10 can stay above chance. ``all_terms_recall`` ablates the stem as well (every
embedding the same), which is chance exactly.

R@10 counts ties as a random tie-break would on average (a query whose image ties with g others
of which b rank above: min(1, max(0, (10 - b) / g)) ), so a fully ablated tower, whose images all
point the same way, scores chance (10 / n) rather than 1.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.corrections import unit
from sce_correct.errors import InputError
from sce_correct.textspan import textspan

logger = logging.getLogger(__name__)

DEFAULT_BANK = ("text_banks", "general.txt")
DEFAULT_IMAGES = 500
DEFAULT_SEED = 0
RECALL_K = 10
#: Images decomposed per pass of :func:`decompose_images` (a multiple of decompose's batch).
DECOMPOSE_CHUNK = 128
# Scores closer than this (relative to 1, the scores are cosines) count as tied.
_TIE = 1e-9


def vit_of(encoder):
    """The encoder's open_clip ViT image tower, or an InputError naming the encoder."""
    name = getattr(encoder, "name", type(encoder).__name__)
    if not hasattr(type(encoder), "visual") and "visual" not in vars(encoder):
        raise InputError(f"encoder {name!r} exposes no ViT image tower to decompose (emoji-vit does)")
    from open_clip.transformer import VisionTransformer

    visual = encoder.visual
    if not isinstance(visual, VisionTransformer):
        raise InputError(f"encoder {name!r} exposes no ViT image tower to decompose "
                         f"(its image tower is a {type(visual).__name__}; emoji-vit's is a ViT)")
    return visual


def read_bank(path: str | Path | None) -> tuple[Path, list[str]]:
    """(path, texts) of a text bank: one text a line, blank lines skipped; default the shipped one."""
    from indexing.shipped_data import shipped_data
    from indexing.tables import read_text_lines, require_file

    path = Path(path) if path is not None else shipped_data(*DEFAULT_BANK)
    require_file(path, "text bank")
    texts = [t for t in read_text_lines(path) if t]
    if not texts:
        raise InputError(f"text bank {path} has no texts")
    return path, texts


@dataclass(frozen=True)
class Sample:
    """The sampled items (sorted by id), their image paths and captions (None where absent)."""

    ids: np.ndarray
    paths: list[str]
    captions: list[str | None]


def check_sample_size(n: int) -> None:
    """The size of an image sample (``--images``): at least 2. Callers check it before loading
    an encoder, so a mistake is refused in a moment, not after the model loads."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InputError(f"--images must be at least 2, got {n!r}")


def sample_items(collection, n: int, seed: int = DEFAULT_SEED, *, captioned: bool = False) -> Sample:
    """A seeded sample of ``n`` items (all when there are fewer), optionally only captioned ones."""
    check_sample_size(n)
    ids = collection.item_ids(captioned=captioned)
    if len(ids) < 2:
        what = "captioned items" if captioned else "items"
        raise InputError(f"collection {collection.root} has {len(ids)} {what}; at least 2 are needed")
    if len(ids) > n:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))
    records = collection.items(ids)
    return Sample(ids=np.asarray(ids, dtype=np.int64), paths=[records[int(i)].uri for i in ids],
                  captions=[records[int(i)].caption for i in ids])


def load_pixels(encoder, paths: Sequence[str | None]):
    """(pixels, positions): the readable images of ``paths`` preprocessed by the encoder, and
    their positions in ``paths`` (None paths and unreadable files are left out)."""
    import torch

    from indexing.encoders.encoder import UnreadableImageError

    tensors, positions = [], []
    for position, path in enumerate(paths):
        if path is None:
            continue
        try:
            tensors.append(encoder.load_and_preprocess(path))
        except (UnreadableImageError, OSError) as error:
            logger.debug("skipping %s: %s", path, error)
            continue
        positions.append(position)
    pixels = torch.stack(tensors) if tensors else None
    return pixels, positions


def decompose_paths(encoder, paths: Sequence[str | None]):
    """(decomposition or None, positions) of the readable images among ``paths``, in one batch."""
    from indexing.encoders.decomposition import decompose

    pixels, positions = load_pixels(encoder, paths)
    if pixels is None:
        return None, positions
    return decompose(vit_of(encoder), pixels), positions


def decompose_images(encoder, paths: Sequence[str], *, what: str = "image", chunk: int = DECOMPOSE_CHUNK,
                     progress=None):
    """The decomposition of every image of ``paths``, ``chunk`` images at a time (the terms of a
    ViT-B/32 take ~0.6 MB an image in float64; a pass holds one chunk's activations). An
    unreadable file is an :class:`InputError` naming it (``what``: what the images are).
    ``progress(fraction, text)`` is told before each chunk."""
    from indexing.encoders.decomposition import Decomposition

    n = len(paths)
    parts = []
    for start in range(0, n, chunk):
        if progress is not None:
            progress(start / n, f"decomposing images {start + 1}-{min(n, start + chunk)} of {n}")
        batch = [str(p) for p in paths[start:start + chunk]]
        decomposition, positions = decompose_paths(encoder, batch)
        if len(positions) != len(batch):
            unread = sorted(set(range(len(batch))) - set(positions))
            raise InputError(f"{what} {batch[unread[0]]} cannot be read"
                             + (f" ({len(unread)} of images {start + 1}-{start + len(batch)})" if len(unread) > 1 else ""))
        parts.append(decomposition)
    if not parts:
        raise InputError(f"no {what}s to decompose")
    return Decomposition.concatenate(parts)


# ------------------------------------------------------------------------------ heads
def head_report(decomposition, bank_texts: list[str], bank_embeddings: np.ndarray, item_ids: np.ndarray,
                *, components: int = 5, top_images: int = 5, rank: int = 80) -> dict:
    """Per (layer, head): TEXTSPAN texts with their variance, total variance and top images."""
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise InputError(f"--components must be a positive integer, got {components!r}")
    heads = decomposition.head_terms()
    n, n_layers, n_heads, dim = heads.shape
    bank = np.asarray(bank_embeddings, dtype=np.float64)
    if bank.shape != (len(bank_texts), dim):
        raise InputError(f"text bank embeddings have shape {bank.shape}, expected ({len(bank_texts)}, {dim})")
    span_rank = min(rank, dim)
    limit = min(span_rank, n, len(bank_texts))
    if components > limit:
        raise InputError(f"--components {components} exceeds what {n} images, a {dim}-d span and "
                         f"{len(bank_texts)} texts allow (at most {limit})")
    unit_bank = unit(bank)
    entries = []
    for layer in range(n_layers):
        for head in range(n_heads):
            outputs = heads[:, layer, head]
            picks = textspan(outputs, bank, n_components=components, rank=span_rank)
            total = float(outputs.var(axis=0).sum())
            first = unit_bank[picks[0].index] if picks else np.zeros(dim)
            score = outputs @ first
            order = np.argsort(-score, kind="stable")[:top_images]
            entries.append({
                "layer": layer, "head": head, "total_variance": total,
                "components": [{"text": bank_texts[p.index], "bank_row": int(p.index), "variance": p.variance}
                               for p in picks],
                "top_images": [{"item_id": int(item_ids[i]), "score": float(score[i])} for i in order],
            })
    return {"layers": n_layers, "heads": n_heads, "images": n, "dim": dim, "rank": span_rank,
            "components": components,
            "top_images_by": "dot product of the head's output with the unit embedding of its first TEXTSPAN text",
            "entries": entries}


# ------------------------------------------------------------------------------ ablation
def recall_at_k(queries: np.ndarray, images: np.ndarray, k: int = RECALL_K) -> float:
    """Query i's relevant image is image i; cosine ranking, ties broken at random on average."""
    q, x = unit(np.asarray(queries, np.float64)), unit(np.asarray(images, np.float64))
    scores = q @ x.T
    own = np.diag(scores)[:, None]
    above = (scores > own + _TIE).sum(axis=1)
    tied = (np.abs(scores - own) <= _TIE).sum(axis=1)  # includes the image itself
    return float(np.clip((k - above) / tied, 0.0, 1.0).mean())


def _ablated(decomposition, layers: int = 0, head: tuple[int, int] | None = None,
             stem: bool = False) -> np.ndarray:
    """The embeddings with layers [0, layers) (heads and MLPs), one head and/or the stem mean-ablated."""
    heads = decomposition.head_terms()
    total = decomposition.total()
    if stem:
        total = total - decomposition.stem + decomposition.stem.mean(axis=0)
    if layers:
        for part in (heads[:, :layers].sum(axis=2), decomposition.mlps[:, :layers]):
            summed = part.sum(axis=1)
            total = total - summed + summed.mean(axis=0)
    if head is not None:
        term = heads[:, head[0], head[1]]
        total = total - term + term.mean(axis=0)
    return total


def ablation_report(decomposition, caption_embeddings: np.ndarray, k: int = RECALL_K) -> dict:
    """R@k with no ablation, layers ablated cumulatively from the first, and each head alone."""
    n, n_layers, n_heads, _ = decomposition.head_terms().shape
    if caption_embeddings.shape[0] != n:
        raise InputError(f"{caption_embeddings.shape[0]} captions for {n} images")
    base = recall_at_k(caption_embeddings, decomposition.total(), k)
    cumulative = [{"layers_ablated": count,
                   "recall": recall_at_k(caption_embeddings, _ablated(decomposition, layers=count), k)}
                  for count in range(n_layers + 1)]
    single = [{"layer": layer, "head": head,
               "drop": base - recall_at_k(caption_embeddings, _ablated(decomposition, head=(layer, head)), k)}
              for layer in range(n_layers) for head in range(n_heads)]
    everything = recall_at_k(caption_embeddings, _ablated(decomposition, layers=n_layers, stem=True), k)
    return {"k": k, "images": n, "chance": min(1.0, k / n), "recall": base,
            "cumulative_layers": cumulative, "all_terms_recall": everything, "single_heads": single}


# ------------------------------------------------------------------------------ output files
def write_json(path: str | Path, payload: dict) -> Path:
    """``payload`` as indented JSON at ``path``, written atomically."""
    import json

    from indexing.atomic import write_atomically

    path = Path(path)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8"))
    return path


def write_heads_figure(report: dict, paths_by_id: dict[int, str], path: str | Path,
                       texts: int = 3, thumbs: int = 4) -> Path:
    """A layers x heads grid: each cell the head's top images and its first TEXTSPAN texts."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from indexing.atomic import write_atomically
    from indexing.encoders.encoder import open_image, to_rgb_on_white

    rows, cols = report["layers"], report["heads"]
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    size = 48
    for entry in report["entries"]:
        ax = axes[entry["layer"]][entry["head"]]
        strip = Image.new("RGB", (size * thumbs, size), "white")
        for slot, top in enumerate(entry["top_images"][:thumbs]):
            try:
                image = to_rgb_on_white(open_image(paths_by_id[top["item_id"]]))
            except InputError:  # a file gone since it was indexed: leave its slot blank
                continue
            strip.paste(image.resize((size, size), Image.Resampling.BICUBIC), (slot * size, 0))
        ax.imshow(np.asarray(strip))
        ax.set_xticks([])
        ax.set_yticks([])
        total = entry["total_variance"] or 1.0
        lines = [f"{c['text'][:32]} ({100 * c['variance'] / total:.0f}%)" for c in entry["components"][:texts]]
        ax.set_title(f"L{entry['layer']} H{entry['head']}", fontsize=8)
        ax.set_xlabel("\n".join(lines), fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    path = Path(path)
    write_atomically(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return path


# ------------------------------------------------------------------------------ shared by the CLI and the web UI


def collection_head_report(encoder, collection, *, bank: str | Path | None = None, images: int = DEFAULT_IMAGES,
                           seed: int = DEFAULT_SEED, components: int = 5, top_images: int = 5,
                           progress=None) -> dict:
    """:func:`head_report` of a seeded sample of an open collection: `sce decompose heads` and the
    web UI's Heads tab both call this.

    The encoder is checked first (a CNN is refused before anything is read), then the bank
    (default: the shipped general bank) is read, ``images`` items are sampled (``seed``), their
    images decomposed and the bank embedded with the encoder's text tower. The report gains
    ``encoder`` (its name), ``bank`` (path), ``bank_texts`` (count) and ``seed``, and every top
    image its ``uri``. ``progress``, if given, is called as ``progress(fraction, description)``.
    """
    def step(fraction: float, text: str) -> None:
        if progress is not None:
            progress(fraction, text)

    if isinstance(top_images, bool) or not isinstance(top_images, int) or top_images < 1:
        raise InputError(f"top images must be a positive integer, got {top_images!r}")
    vit_of(encoder)
    bank_path, texts = read_bank(bank)
    sample = sample_items(collection, images, seed)
    decomposition = decompose_images(encoder, sample.paths, progress=lambda f, text: step(0.8 * f, text))
    step(0.8, f"embedding the {len(texts)} texts of {bank_path.name}")
    bank_embeddings = encoder.encode_texts(texts)
    step(0.9, "TEXTSPAN per head")
    report = head_report(decomposition, texts, bank_embeddings, sample.ids, components=components,
                         top_images=top_images)
    report.update(encoder=getattr(encoder, "name", type(encoder).__name__), bank=str(bank_path),
                  bank_texts=len(texts), seed=seed)
    paths = dict(zip((int(i) for i in sample.ids), sample.paths))
    for entry in report["entries"]:
        entry["top_images"] = [dict(top, uri=paths[top["item_id"]]) for top in entry["top_images"]]
    return report


# ------------------------------------------------------------------------------ per-patch heatmap
def patch_heatmap(visual, pixels, text_vector: np.ndarray, layer: int, head: int) -> np.ndarray:
    """One head's per-patch contribution along a text direction, as the (rows, cols) patch grid.

    ``pixels``: one preprocessed image, (3, H, W) or (1, 3, H, W); ``text_vector``: a direction
    in the tower's output space (normalised here to unit length). Cell (r, c) is the dot product
    of the direction with the head's term from the patch in row r, column c
    (``decompose(..., tokens=True)``): open_clip's VisionTransformer puts the class token first,
    then ``conv1``'s output grid flattened row by row. The cells plus the class token's own term
    sum to the head's term dotted with the direction.
    """
    import torch

    from indexing.encoders.decomposition import decompose

    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(pixels)
    if isinstance(pixels, torch.Tensor) and pixels.ndim == 3:
        pixels = pixels[None]
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[0] != 1:
        shape = tuple(pixels.shape) if hasattr(pixels, "shape") else type(pixels).__name__
        raise InputError(f"patch_heatmap takes one preprocessed image (3, H, W), got {shape}")
    # decompose refuses a tower it cannot split (not a class-token ViT) in one line.
    terms = decompose(visual, pixels, tokens=True).heads[0]  # (layers, heads, tokens, dim)
    n_layers, n_heads, n_tokens, dim = terms.shape
    for what, value, count in (("layer", layer, n_layers), ("head", head, n_heads)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < count:
            raise InputError(f"{what} must be an integer from 0 to {count - 1} (the tower has {count} "
                             f"{what}s), got {value!r}")
    direction = np.asarray(text_vector, dtype=np.float64).reshape(-1)
    if direction.shape != (dim,) or not np.isfinite(direction).all() or not np.linalg.norm(direction) > 0:
        raise InputError(f"the text direction must be a finite non-zero {dim}-d vector, got shape "
                         f"{np.shape(text_vector)}")
    rows, cols = (int(g) for g in visual.grid_size)
    if n_tokens != 1 + rows * cols:
        raise InputError(f"the tower has {n_tokens} tokens, not 1 + {rows} x {cols} patches")
    return (terms[layer, head, 1:] @ unit(direction)).reshape(rows, cols)
