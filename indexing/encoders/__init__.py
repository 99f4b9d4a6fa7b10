"""Encoders: images and texts into one embedding space.

``load_encoder(spec)`` is the one entry point::

    load_encoder("default")                                   # embedded, offline
    load_encoder("open_clip:ViT-B-32:laion2b_s34b_b79k")      # open_clip hub tag
    load_encoder("open_clip:ViT-B-32:/models/vit-b-32.pt")    # local checkpoint
    load_encoder("open_clip:ViT-B-32")                        # random init (tests)

Nothing heavy (torch, open_clip, transformers) is imported until an encoder is used.
"""
from .encoder import Encoder, UnreadableImageError, open_image, to_rgb_on_white
from .factory import list_builtin_specs, load_encoder, parse_spec

__all__ = ["Encoder", "UnreadableImageError", "load_encoder", "parse_spec", "list_builtin_specs",
           "open_image", "to_rgb_on_white"]
