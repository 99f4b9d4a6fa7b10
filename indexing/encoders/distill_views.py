"""Extra distillation inputs for emoji-vit: new images made from the training images, with the
teacher's embedding of each.

A from-scratch ViT on ~8,600 emoji matches its teacher on the images it saw and much less on
unseen names. Knowledge distillation generalises better when the student sees the teacher's
function on many more inputs than the labelled set (Beyer et al., CVPR 2022, "Knowledge
distillation: A good teacher is patient and consistent": mixup and crops, teacher run on the
very image the student sees). The teacher (EfficientNet-Lite0 at 224 px) runs at ~30 images/s
on two cores here, far too slow to run per step, so a fixed pool of views is made once, seeded,
and cached with its teacher embeddings:

- ``mix``: a pixel blend of two training images of different names, weight in [0.3, 0.7];
- ``crop``: a random part (25-80 % of the area) of one image, scaled back to the full square;
- ``halves``: the left or top half of one image next to the other half of another.

Views are made only from the rows given (the training names), so held-out names never reach
the student, not even unlabelled. Each view records its source rows, so a development run can
drop the views that touch its development names.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexing.atomic import file_sha256, write_atomically

logger = logging.getLogger(__name__)

KINDS = ("mix", "crop", "halves")
VIEWS_VERSION = "v1"


@dataclass
class DistillViews:
    """``images`` uint8 (n, H, W, 3); ``sources`` (n, 2) indexes into the source list given to
    :func:`make_views` (the second is -1 for a crop); ``teacher`` (n, 384) unit embeddings."""

    images: np.ndarray
    sources: np.ndarray
    teacher: np.ndarray

    def subset(self, keep: np.ndarray) -> "DistillViews":
        return DistillViews(self.images[keep], self.sources[keep], self.teacher[keep])

    def only_sources(self, allowed: np.ndarray) -> "DistillViews":
        """The views whose every source is in ``allowed`` (a boolean mask over the sources)."""
        s = self.sources
        ok = allowed[s[:, 0]] & ((s[:, 1] < 0) | allowed[np.maximum(s[:, 1], 0)])
        return self.subset(np.flatnonzero(ok))


def make_views(source_images: np.ndarray, families: np.ndarray, n: int, seed: int):
    """``n`` seeded views of ``source_images`` (uint8 (m, H, W, 3) on white): images (n, H, W, 3)
    and sources (n, 2). The two images of a mix or halves view have different ``families``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    m, h, w, _ = source_images.shape
    out = np.empty((n, h, w, 3), np.uint8)
    sources = np.full((n, 2), -1, np.int64)
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        a = int(rng.integers(m))
        if kind == "crop":
            area = rng.uniform(0.25, 0.8) * h * w
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw = int(round(min(w, np.sqrt(area * aspect))))
            ch = int(round(min(h, np.sqrt(area / aspect))))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            part = Image.fromarray(source_images[a]).crop((x0, y0, x0 + cw, y0 + ch))
            out[i] = np.asarray(part.resize((w, h), Image.BICUBIC))
            sources[i, 0] = a
            continue
        b = int(rng.integers(m))
        while families[b] == families[a]:
            b = int(rng.integers(m))
        sources[i] = (a, b)
        if kind == "mix":
            lam = rng.uniform(0.3, 0.7)
            out[i] = np.rint(lam * source_images[a] + (1.0 - lam) * source_images[b]).astype(np.uint8)
        else:
            view = source_images[a].copy()
            if rng.random() < 0.5:
                view[:, w // 2:] = source_images[b][:, w // 2:]
            else:
                view[h // 2:] = source_images[b][h // 2:]
            out[i] = view
    return out, sources


def teacher_embed(images: np.ndarray, teacher, batch_size: int = 64) -> np.ndarray:
    """The teacher encoder's unit embeddings of uint8 images, float32 (n, d)."""
    from PIL import Image

    pil = [Image.fromarray(x) for x in images]
    return teacher.encode_images(pil, batch_size=batch_size, num_workers=2,
                                 progress=False).astype(np.float32)


def cached_views(source_paths: list[Path], families: np.ndarray, n: int, seed: int, teacher,
                 cache_dir: Path, teacher_key: str) -> DistillViews:
    """:func:`make_views` of the images at ``source_paths`` with the teacher's embeddings,
    cached in ``cache_dir`` under a key of the sources' files, ``n``, ``seed`` and the teacher."""
    from PIL import Image

    digest = hashlib.sha256()
    for p in source_paths:  # each source by its content hash (the catalog's), in order
        digest.update(file_sha256(p).encode())
    digest.update(f"{n}-{seed}-{teacher_key}-{VIEWS_VERSION}".encode())
    path = cache_dir / f"distill-views-{digest.hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return DistillViews(data["images"], data["sources"], data["teacher"])
    sources = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in source_paths])
    images, src = make_views(sources, families, n, seed)
    logger.info("encoding %d distillation views with the teacher (cached in %s)", n, path)
    emb = teacher_embed(images, teacher)
    cache_dir.mkdir(parents=True, exist_ok=True)

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as fh:
            np.savez(fh, images=images, sources=src, teacher=emb)

    write_atomically(path, write)
    return DistillViews(images, src, emb)
