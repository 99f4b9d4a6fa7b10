"""open_clip models behind the :class:`~indexing.encoders.Encoder` contract.

``OpenClipEncoder`` wraps ``open_clip.create_model_and_transforms``: the model name picks
a JSON architecture config (built in, or registered with ``open_clip.add_model_config``),
``pretrained`` picks the weights: an open_clip pretrained tag (downloaded into the hub
cache on first use, so it needs network or a warm cache) or a local checkpoint file. With
no ``pretrained`` the weights are random but seeded, so the same spec always gives the
same model (tests use this with a tiny config).

Embeddings are returned as the model gives them: NOT unit-norm (the catalog normalises).
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from typing import TYPE_CHECKING, Sequence

import numpy as np

from sce_correct.errors import InputError

from .encoder import Encoder, batched, resolve_device, to_rgb_on_white, weights_file_id
from .factory import OPEN_CLIP_PREFIX, EncoderSpec, canonical_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0


class OpenClipEncoder(Encoder):
    """An open_clip CLIP model; raw (not unit-norm) image and text embeddings."""

    unit_norm = False

    def __init__(self, model: str, pretrained: str | None = None, device: str | None = None,
                 embed_dim: int | None = None):
        self.model_name = model
        self.pretrained = pretrained
        self.name = OPEN_CLIP_PREFIX + model + (f":{pretrained}" if pretrained else "")
        self._embed_dim = embed_dim
        self._device_arg = device
        self._loaded = None  # (model, transform, tokenizer, device)
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, parsed: EncoderSpec, spec: str, device: str | None = None) -> "OpenClipEncoder":
        """Validate model and pretrained against open_clip's registries (cheap, no weights)."""
        import open_clip

        model, pretrained = parsed.model, parsed.pretrained
        embed_dim = None
        if model.startswith(("hf-hub:", "local-dir:")):
            if model.startswith("local-dir:") and not os.path.isdir(model.split(":", 1)[1]):
                raise InputError(f"encoder spec {spec!r}: folder {model.split(':', 1)[1]!r} not found")
            return cls(model, None, device=device)
        cfg = open_clip.get_model_config(model)
        if cfg is None:
            known = open_clip.list_models()
            close = [m for m in known if m.lower().startswith(model.lower()[:5])][:8]
            raise InputError(f"encoder spec {spec!r}: unknown open_clip model {model!r}"
                             + (f" (similar: {', '.join(close)})" if close else ""))
        embed_dim = int(cfg["embed_dim"])
        if pretrained is not None:
            if open_clip.is_pretrained_cfg(model, pretrained):
                pass  # a hub tag, fetched on first use
            elif os.path.isfile(os.path.expanduser(pretrained)):
                pretrained = canonical_checkpoint(pretrained)
            else:
                tags = open_clip.list_pretrained_tags_by_model(model)
                raise InputError(
                    f"encoder spec {spec!r}: {pretrained!r} is neither a pretrained tag of {model!r} "
                    f"({', '.join(tags) if tags else 'it has none'}) nor an existing checkpoint file")
        return cls(model, pretrained, device=device, embed_dim=embed_dim)

    @functools.cached_property
    def weights_id(self) -> str | None:  # type: ignore[override]
        """A local checkpoint file's content id. None otherwise: a hub tag is already in the name
        and names one upstream file, which is not on disk before first use (hashing the hub
        cache would mean open_clip's download code), so repeating it would only look like a
        content check; random init is decided by the name and the seed; hf-hub:/local-dir:
        folders are not hashed."""
        pretrained = self.pretrained
        if pretrained and os.path.isabs(pretrained) and os.path.isfile(pretrained):  # canonical_checkpoint
            return weights_file_id(pretrained)
        return None

    # -- lazy loading ------------------------------------------------------------------
    @property
    def dim(self) -> int:  # type: ignore[override]
        if self._embed_dim is None:  # hub/local-dir schema: known once the model is built
            import torch

            model, _, tokenizer, device = self._get()
            with torch.inference_mode():
                self._embed_dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
        return self._embed_dim

    def _load(self):
        import open_clip
        import torch

        device = resolve_device(self._device_arg)
        kwargs = dict(device=device, pretrained_text=False)
        if self.pretrained is None:
            # Random init, seeded so the same spec always builds the same weights.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model, _, transform = open_clip.create_model_and_transforms(self.model_name, **kwargs)
            logger.info("built open_clip %s with random (seeded) weights", self.model_name)
        else:
            model, _, transform = open_clip.create_model_and_transforms(
                self.model_name, pretrained=self.pretrained, require_pretrained=True, **kwargs)
            logger.info("loaded open_clip %s weights %s", self.model_name, self.pretrained)
        model.eval().requires_grad_(False)
        tokenizer = open_clip.get_tokenizer(self.model_name)
        return model, transform, tokenizer, device

    def _get(self):
        if self._loaded is None:
            with self._lock:
                if self._loaded is None:
                    self._loaded = self._load()
        return self._loaded

    @property
    def visual(self):
        """The model's image tower (open_clip's ``model.visual``, loaded on first use): what
        `sce decompose` splits into per-head terms when it is a class-token ViT."""
        return self._get()[0].visual

    # -- the Encoder contract ----------------------------------------------------------
    def preprocess(self, image: "Image.Image") -> "torch.Tensor":
        """The model's own eval transform, after compositing transparency on white."""
        transform = self._get()[1]
        return transform(to_rgb_on_white(image))

    def encode_image_batch(self, batch: "torch.Tensor") -> np.ndarray:
        """``(B, C, H, W)`` -> float32 ``(B, dim)``, not unit-norm."""
        import torch

        model, _, _, device = self._get()
        with torch.inference_mode():
            out = model.encode_image(batch.to(device))
        return out.float().cpu().numpy()

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256,
                     progress: bool = False) -> np.ndarray:
        """Texts -> float32 ``(n, dim)``, not unit-norm."""
        import torch
        from tqdm.auto import tqdm

        if isinstance(texts, str):
            raise TypeError("encode_texts expects a sequence of strings, not one string")
        texts = [str(t) for t in texts]
        model, _, tokenizer, device = self._get()
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bar = tqdm(total=len(texts), disable=not progress, desc="encoding texts", unit="text")
        start = 0
        for chunk in batched(texts, batch_size):
            with torch.inference_mode():
                emb = model.encode_text(tokenizer(chunk).to(device))
            out[start:start + len(chunk)] = emb.float().cpu().numpy()
            start += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return out
