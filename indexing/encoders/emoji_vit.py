"""``emoji-vit``: a small open_clip ViT image tower trained on emoji, with the default's text tower.

No pretrained ViT is available offline, so this one was trained on the CPU
(``python -m indexing.encoders.train_emoji_vit``): distilled from the default encoder's image
embeddings and aligned LiT-style with the frozen all-MiniLM-L6-v2 caption embeddings, on the
same emoji styles and the same held-out names as the default head. Its text side *is* the
default encoder's text tower, so text embeddings are the same as the default's.

Files beside this module:

- ``emoji_vit.json``: the model config in the open_clip style (``embed_dim``, ``vision_cfg``,
  ``preprocess_cfg``), built with open_clip's own ``VisionTransformer``;
- ``emoji_vit.safetensors``: the tower's weights (no pickle);
- ``emoji_vit_record.json``: how they were trained and what they measured.

The tower is exposed as :attr:`EmojiVitEncoder.visual` (an ``open_clip`` ``VisionTransformer``
with class-token pooling, plain blocks) and :meth:`EmojiVitEncoder.preprocess_batch` gives its
input tensor, so per-head decompositions can run on it. Nothing loads at import time.
"""
from __future__ import annotations

import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from sce_correct.errors import InputError

from .default_encoder import MiniLMTextSide
from .encoder import Encoder, ImageInput, weights_file_id
from .towers import IMAGENET_MEAN, IMAGENET_STD, TEXT_DIM, preprocess_imagenet

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "emoji_vit.json"
WEIGHTS_PATH = HERE / "emoji_vit.safetensors"
RECORD_PATH = HERE / "emoji_vit_record.json"
SPEC = "emoji-vit"


def read_config(path: str | Path = CONFIG_PATH) -> dict:
    """The open_clip-style model config, checked for what this encoder relies on."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the emoji-vit config {path}: {error}") from None
    vision = config.get("vision_cfg", {})
    if int(config.get("embed_dim", -1)) != TEXT_DIM:
        raise InputError(f"{path}: embed_dim must be {TEXT_DIM} (the MiniLM text space)")
    if vision.get("pool_type", "tok") != "tok" or vision.get("attentional_pool"):
        raise InputError(f"{path}: emoji-vit pools the class token (pool_type 'tok', no attentional pool)")
    return config


def build_visual(config: dict):
    """A randomly initialised open_clip ``VisionTransformer`` from the config (open_clip's
    own builder, the one its JSON model configs go through)."""
    from open_clip.model import _build_vision_tower
    from open_clip.transformer import VisionTransformer

    visual = _build_vision_tower(int(config["embed_dim"]), dict(config["vision_cfg"]))
    if not isinstance(visual, VisionTransformer):  # pragma: no cover - a config naming timm/ResNet
        raise InputError("the emoji-vit config must describe an open_clip VisionTransformer")
    return visual


def preprocess_image(image: "Image.Image", preprocess_cfg: dict) -> "torch.Tensor":
    """PIL image -> ``(3, size, size)``: composite on white, shorter side to ``size``
    (bicubic), centre crop, normalise with the config's mean/std."""
    import torch

    size = int(preprocess_cfg["size"])
    x = preprocess_imagenet(image, size=size)  # ImageNet mean/std
    mean = tuple(preprocess_cfg.get("mean", IMAGENET_MEAN))
    std = tuple(preprocess_cfg.get("std", IMAGENET_STD))
    if mean != IMAGENET_MEAN or std != IMAGENET_STD:
        def col(v):
            return torch.tensor(v, dtype=torch.float32).view(3, 1, 1)

        x = (x * col(IMAGENET_STD) + col(IMAGENET_MEAN) - col(mean)) / col(std)
    return x


class EmojiVitEncoder(MiniLMTextSide, Encoder):
    """Trained open_clip ViT (images) and all-MiniLM-L6-v2 (texts), 384-d, unit norm."""

    name = SPEC
    dim = TEXT_DIM
    unit_norm = True

    def __init__(self, device: str | None = None, weights_path: str | Path | None = None,
                 config_path: str | Path | None = None):
        self._init_text_side(device)
        self.weights_path = Path(weights_path) if weights_path is not None else WEIGHTS_PATH
        self.config_path = Path(config_path) if config_path is not None else CONFIG_PATH
        self._config: dict | None = None
        self._visual = None

    @functools.cached_property
    def weights_id(self) -> str | None:  # type: ignore[override]
        """The tower's weights file (the text side is MiniLM's, pinned by its package)."""
        return weights_file_id(self.weights_path)

    # -- lazy parts ----------------------------------------------------------------------
    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = read_config(self.config_path)
        return self._config

    @property
    def visual(self):
        """The open_clip ``VisionTransformer`` with the shipped weights (eval mode, frozen)."""
        with self._lock:
            if self._visual is None:
                self._visual = self._load_visual()
            return self._visual

    def _load_visual(self):
        from safetensors.torch import load_file

        if not self.weights_path.is_file():
            raise FileNotFoundError(f"emoji-vit weights not found at {self.weights_path}; rebuild them with "
                                    "`python -m indexing.encoders.train_emoji_vit`")
        visual = build_visual(self.config)
        state = {k: v.float() for k, v in load_file(str(self.weights_path)).items()}
        try:
            visual.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise InputError(f"{self.weights_path} does not fit {self.config_path}: {error}") from None
        visual.eval().requires_grad_(False)
        logger.info("loaded emoji-vit weights from %s", self.weights_path)
        return visual.to(self.device)

    @staticmethod
    def training_record() -> dict:
        """The JSON record of how the shipped weights were trained and what they measured."""
        return json.loads(RECORD_PATH.read_text(encoding="utf-8"))

    # -- the Encoder contract ----------------------------------------------------------
    def preprocess(self, image: "Image.Image") -> "torch.Tensor":
        """The config's preprocessing (see :func:`preprocess_image`). Thread-safe."""
        return preprocess_image(image, self.config["preprocess_cfg"])

    def preprocess_batch(self, images: Iterable[ImageInput], num_workers: int = 2) -> "torch.Tensor":
        """PIL images or paths -> the tower's input, float32 ``(n, 3, H, W)`` (decoded in
        ``num_workers`` threads; 0: in this thread)."""
        import torch

        items = list(images)
        if num_workers > 0 and len(items) > 1:
            with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="decode") as pool:
                tensors = list(pool.map(self.load_and_preprocess, items))
        else:
            tensors = [self.load_and_preprocess(item) for item in items]
        if not tensors:
            size = int(self.config["preprocess_cfg"]["size"])
            return torch.empty((0, 3, size, size))
        return torch.stack(tensors)

    def encode_image_batch(self, batch: "torch.Tensor") -> np.ndarray:
        """``(B, 3, H, W)`` -> unit-norm float32 ``(B, 384)``."""
        import torch

        visual = self.visual
        with torch.inference_mode():
            out = torch.nn.functional.normalize(visual(batch.to(self.device, torch.float32)).float(), dim=-1)
        return out.cpu().numpy()

