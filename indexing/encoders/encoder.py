"""The encoder contract shared by every encoder, and the image loading it relies on.

An :class:`Encoder` maps images and texts into one ``dim``-dimensional space. Subclasses
implement :meth:`Encoder.preprocess` (PIL image -> tensor, run by decoding workers),
:meth:`Encoder.encode_image_batch` (a stacked batch -> embeddings) and
:meth:`Encoder.encode_texts`; :meth:`Encoder.encode_images` is shared: it decodes and
preprocesses images in a thread pool while the model runs on the previous batch.

This module imports no torch at import time: the heavy imports happen inside methods.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import numpy as np

from sce_correct.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

ImageInput = Union["Image.Image", str, "os.PathLike[str]"]


def encode_texts_once(encoder, texts: Sequence[str]) -> np.ndarray:
    """``encoder.encode_texts(texts)``, each distinct text encoded once: concept sets repeat a
    few prompts over many rows (skin_tone_large.csv: 5 prompts, 1,550 rows)."""
    texts = list(texts)
    distinct = list(dict.fromkeys(texts))
    if len(distinct) == len(texts):
        return encoder.encode_texts(texts)
    position = {text: i for i, text in enumerate(distinct)}
    return encoder.encode_texts(distinct)[[position[text] for text in texts]]


class UnreadableImageError(InputError):
    """An image file could not be opened or decoded.

    ``path`` is the file and ``reason`` a short human-readable cause (the pipeline records
    both and goes on with the next file).
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path = path
        self.reason = reason


def open_image(item: ImageInput) -> "Image.Image":
    """Return a fully decoded PIL image for a PIL image or a file path.

    Raises :class:`UnreadableImageError` (with the path and the reason) when the file is
    missing, empty, truncated, not an image, or a decompression bomb.
    """
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if not isinstance(item, (str, os.PathLike)):
        raise TypeError(f"expected a PIL image or a path, got {type(item).__name__}")
    path = os.fspath(item)
    from indexing.images import ImageCheckError, decode_image, read_image_file  # the one image check

    try:
        return decode_image(read_image_file(path), path)
    except ImageCheckError as error:
        raise UnreadableImageError(path, error.detail) from None


def to_rgb_on_white(image: "Image.Image") -> "Image.Image":
    """Convert any PIL image to RGB, compositing transparent pixels on white.

    The sample corpus is composited on white; doing the same for every input keeps
    transparent PNGs (emoji, icons) in the distribution the encoders were trained on.
    """
    from PIL import Image

    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grey: scale to 8 bit before converting.
        arr = np.asarray(image, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 1.0
        arr = (arr / (hi if hi > 0 else 1.0) * 255.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return image.convert("RGB")


class Encoder:
    """Maps images and texts into one shared ``dim``-dimensional embedding space.

    Attributes:
        name: canonical spec of the encoder (``"default"``,
            ``"open_clip:ViT-B-32:laion2b_s34b_b79k"``, ...). The catalog stores it and
            compares it when an index is opened.
        dim: embedding dimension.
        unit_norm: whether the returned embeddings have unit L2 norm.
        weights_id: a content id of the weights that decide the image embeddings (see the
            property), which a collection records beside ``name``.

    All ``encode_*`` methods return ``float32`` arrays of shape ``(n, dim)``.
    """

    name: str
    dim: int
    unit_norm: bool = False

    @property
    def weights_id(self) -> str | None:
        """``"sha256:<16 hex>"`` of the weights file that decides the image embeddings, found
        without loading the model (:func:`weights_file_id`); None when it cannot be known.
        A collection records it when first bound and refuses writes by other weights under the
        same name (:meth:`indexing.collection.Collection.check_writer`). Default: None."""
        return None

    # -- implemented by subclasses -------------------------------------------------------
    def preprocess(self, image: "Image.Image") -> "torch.Tensor":
        """Turn one PIL image into a ``(C, H, W)`` float tensor. Thread-safe."""
        raise NotImplementedError

    def encode_image_batch(self, batch: "torch.Tensor") -> np.ndarray:
        """Embed a ``(B, C, H, W)`` batch of preprocessed images -> float32 ``(B, dim)``."""
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256,
                     progress: bool = False) -> np.ndarray:
        """Embed texts -> float32 ``(n, dim)``."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def load_and_preprocess(self, item: ImageInput) -> "torch.Tensor":
        """Open (if a path) and preprocess one image; raises :class:`UnreadableImageError`."""
        return self.preprocess(open_image(item))

    def encode_images(self, images: Iterable[ImageInput], batch_size: int = 64,
                      num_workers: int = 2, progress: bool = False) -> np.ndarray:
        """Embed PIL images or image paths -> float32 ``(n, dim)``, in input order.

        Decoding and preprocessing run in ``num_workers`` threads (0: in this thread) and
        overlap with the model working on the previous batch; at most two batches are
        decoded ahead, so memory stays bounded for long lists. An unreadable path raises
        :class:`UnreadableImageError` naming the file and the reason.
        """
        import torch

        items = list(images)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        starts = list(range(0, len(items), batch_size))
        bar = _progress_bar(len(items), progress, "encoding images")
        if num_workers <= 0:
            for s in starts:
                chunk = items[s:s + batch_size]
                batch = torch.stack([self.load_and_preprocess(it) for it in chunk])
                out[s:s + len(chunk)] = self.encode_image_batch(batch)
                bar.update(len(chunk))
            bar.close()
            return out

        executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="decode")

        def submit(s: int) -> list[Future]:
            return [executor.submit(self.load_and_preprocess, it) for it in items[s:s + batch_size]]

        pending = submit(starts[0])
        try:
            for k, s in enumerate(starts):
                current = pending
                pending = submit(starts[k + 1]) if k + 1 < len(starts) else []
                batch = torch.stack([f.result() for f in current])
                out[s:s + len(current)] = self.encode_image_batch(batch)
                bar.update(len(current))
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def weights_file_id(path: str | os.PathLike[str]) -> str | None:
    """``"sha256:<first 16 hex digits>"`` of a weights file's bytes, or None when it cannot be
    read (a missing file fails later, where the weights load, with its own message)."""
    from indexing.atomic import file_sha256

    try:
        return "sha256:" + file_sha256(path)[:16]
    except OSError:
        return None


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="item")


def resolve_device(device: str | None) -> str:
    """``device`` if given, else ``"cuda"`` when available, else ``"cpu"``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def batched(seq: Sequence, size: int):
    """Yield consecutive slices of ``seq`` of at most ``size`` items."""
    for s in range(0, len(seq), size):
        yield seq[s:s + size]
