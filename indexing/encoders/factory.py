"""``load_encoder(spec)``: one string names an encoder, as open_clip's factory does.

Spec grammar::

    default                                  the embedded offline encoder (384-d)
    emoji-vit                                a small open_clip ViT trained on emoji, offline,
                                             with the default's text tower (384-d)
    open_clip:<model>                        open_clip architecture, random (seeded) weights
    open_clip:<model>:<pretrained>           <pretrained> = an open_clip pretrained tag
                                             (fetched from the hub on first use) or a
                                             local checkpoint file (.pt/.bin/.safetensors)
    open_clip:hf-hub:<org/repo>              open_clip's own hub / local-dir schemas
    open_clip:local-dir:<folder>

Parsing and validation are cheap and happen here (an unknown model, an unknown tag or a
missing file is a ``ValueError`` naming the spec); weights load on first encode.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from sce_correct.errors import InputError

OPEN_CLIP_PREFIX = "open_clip:"
_OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")
EMOJI_VIT = "emoji-vit"
_EXPECTED = "expected 'default', 'emoji-vit' or 'open_clip:<model>[:<pretrained>]'"


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed spec. ``kind`` is "default", "emoji-vit" or "open_clip"."""

    kind: str
    model: str | None = None
    pretrained: str | None = None


def parse_spec(spec: str) -> EncoderSpec:
    """Split a spec string into its parts (syntax only; see :func:`load_encoder`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"invalid encoder spec {spec!r}: {_EXPECTED}")
    s = spec.strip()
    if s == "default":
        return EncoderSpec("default")
    if s == EMOJI_VIT:
        return EncoderSpec(EMOJI_VIT)
    if s.startswith(OPEN_CLIP_PREFIX):
        rest = s[len(OPEN_CLIP_PREFIX):]
        if rest.startswith(_OPEN_CLIP_SCHEMAS):
            if rest.split(":", 1)[1].strip() == "":
                raise InputError(f"invalid encoder spec {spec!r}: nothing after {rest!r}")
            return EncoderSpec("open_clip", rest, None)
        model, _, pretrained = rest.partition(":")
        model, pretrained = model.strip(), pretrained.strip()
        if not model:
            raise InputError(f"invalid encoder spec {spec!r}: no model name after 'open_clip:'")
        if _ and not pretrained:
            raise InputError(f"invalid encoder spec {spec!r}: empty pretrained tag/path after the model")
        return EncoderSpec("open_clip", model, pretrained or None)
    raise InputError(f"invalid encoder spec {spec!r}: {_EXPECTED}")


def load_encoder(spec: str, device: str | None = None):
    """Return the :class:`~indexing.encoders.Encoder` that ``spec`` names.

    ``device``: a torch device string; default CUDA when available, else CPU. No weights
    are loaded here: they load on the first ``preprocess``/``encode_*`` call.
    Raises ``ValueError`` (naming the spec) for a malformed spec, an unknown open_clip
    model, or a pretrained value that is neither a known tag nor an existing file.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "default":
        from .default_encoder import DefaultEncoder

        return DefaultEncoder(device=device)
    if parsed.kind == EMOJI_VIT:
        from .emoji_vit import EmojiVitEncoder

        return EmojiVitEncoder(device=device)
    from .open_clip_encoder import OpenClipEncoder

    return OpenClipEncoder.from_spec(parsed, spec=spec, device=device)


def list_builtin_specs() -> list[str]:
    """Specs that work offline out of the box."""
    return ["default", EMOJI_VIT]


def canonical_checkpoint(path: str) -> str:
    """Absolute, user-expanded form of a checkpoint path (how it appears in names)."""
    return os.path.abspath(os.path.expanduser(path))
