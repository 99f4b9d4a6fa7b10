"""Decompose an open_clip ViT image embedding into the sum of its heads, MLPs and stem.

DESIGN.md section 7 (Gandelsman et al., "Interpreting CLIP's image representation via
text-based decomposition"). For a ViT with class-token pooling the class row of the residual
stream just before ``ln_post`` is

    r = x0 + sum_{l,h} g1_l * c_{l,h} + sum_l g2_l * m_l

with ``x0`` the class row of ``ln_pre``'s output, ``c_{l,h}`` head ``h`` of block ``l`` at the
class row (its attention-weighted values through its slice of ``out_proj``, plus 1/H of the
``out_proj`` bias), ``m_l`` the MLP output at the class row, and ``g1``/``g2`` the blocks' layer
scales (1 without ``ls_init_value``). ``ln_post`` is not linear, but it is affine once its
deviation ``sigma`` is fixed; ``sigma`` is taken from the *actual* residual stream of each image
(the paper's linearisation), so the identity below is exact, not an approximation:

    visual(images) == heads.sum((1, 2)) + mlps.sum(1) + stem

Where ``ln_post``'s pieces go (our choice, stated here because every term depends on it):

- centring: each term is centred by its *own* mean over the width coordinates. Centring is a
  linear map, so the centred terms sum to the centred ``r``; a term therefore does not depend
  on the other terms except through the shared ``sigma``.
- scale: every term is multiplied by ``ln_post.weight / sigma`` (``sigma`` of the image).
- bias: ``ln_post.bias`` (times ``proj``) goes entirely into ``stem``.
- everything is then multiplied by ``proj`` (identity when the tower has no ``proj``), so all
  terms live in the model's output space, unnormalised.

Per token (``tokens=True``) a head's term is split over the attended tokens ``t`` as
``a(cls, t) * (v_t W_O[:, h] + b_O / H)``: the value bias rides with each value and the head's
share of the ``out_proj`` bias is spread by the attention weights, so the tokens of a head sum
to its per-head term exactly.

Only hooks are used (on ``ln_pre``, each block's ``ln_1``, ``attn`` and ``mlp``, ``ln_post`` and
the tower itself); per-head values and attention weights are recomputed from the attention
module's own parameters (``in_proj_weight`` ...) in float64. Every batch is checked against
the module's real outputs (per-head sum vs. the attention output, the rebuilt residual vs.
``ln_post``'s input, the rebuilt embedding vs. the tower's output), so a variant this code does
not know fails with :class:`UnsupportedTowerError` instead of returning wrong terms.

Supported: ``open_clip.transformer.VisionTransformer`` with ``pool_type='tok'`` and no
attentional pooler, blocks ``ResidualAttentionBlock`` (``nn.MultiheadAttention``) or a plain
``CustomResidualAttentionBlock`` (no scaled-cosine attention, head scale, inner/attention
LayerNorm or qk-norm), with or without layer scale, with or without ``proj``, either
``final_ln_after_pool`` (the same algebra for class-token pooling). torch and open_clip are
imported on first use.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

import numpy as np

from sce_correct.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


class UnsupportedTowerError(InputError):
    """The image tower is not one this decomposition handles; the message says which part."""


@dataclass(frozen=True)
class Decomposition:
    """The terms of each image's embedding (output space of the tower, before normalisation).

    ``heads``: (n, layers, heads, dim), or (n, layers, heads, tokens, dim) with ``tokens=True``
    (token 0 is the class token); ``mlps``: (n, layers, dim); ``stem``: (n, dim), the class
    embedding after ``ln_pre`` plus ``ln_post``'s bias. float64.
    """

    heads: np.ndarray
    mlps: np.ndarray
    stem: np.ndarray

    @property
    def per_token(self) -> bool:
        return self.heads.ndim == 5

    def head_terms(self) -> np.ndarray:
        """Per-head terms (n, layers, heads, dim), summing tokens when the split is per token."""
        return self.heads.sum(axis=3) if self.per_token else self.heads

    def total(self) -> np.ndarray:
        """The sum of all terms, (n, dim): equal to the tower's output for these images."""
        return self.head_terms().sum(axis=(1, 2)) + self.mlps.sum(axis=1) + self.stem

    @classmethod
    def concatenate(cls, parts: "Sequence[Decomposition]") -> "Decomposition":
        """The decompositions of consecutive batches of images as one."""
        if len(parts) == 1:
            return parts[0]
        return cls(heads=np.concatenate([p.heads for p in parts]), mlps=np.concatenate([p.mlps for p in parts]),
                   stem=np.concatenate([p.stem for p in parts]))


def _refuse(message: str) -> NoReturn:
    raise UnsupportedTowerError(f"cannot decompose this image tower: {message}")


@dataclass
class _Block:
    """What the decomposition reads from one residual block (all float64 on the tower's device)."""

    heads: int
    w_q: "torch.Tensor"
    w_k: "torch.Tensor"
    w_v: "torch.Tensor"
    b_q: "torch.Tensor"
    b_k: "torch.Tensor"
    b_v: "torch.Tensor"
    w_o: "torch.Tensor"  # (width, heads, head_dim)
    b_o: "torch.Tensor"  # (width,)
    gamma_1: "torch.Tensor"  # layer scale of the attention branch, (width,) or scalar 1
    gamma_2: "torch.Tensor"
    batch_first: bool


def _layer_scale(module, width: int, name: str) -> "torch.Tensor":
    import torch
    from open_clip.transformer import LayerScale
    from torch import nn

    if isinstance(module, nn.Identity):
        return torch.ones((), dtype=torch.float64)
    gamma = getattr(module, "gamma", None)
    if not isinstance(module, LayerScale) or gamma is None or tuple(gamma.shape) != (width,):
        _refuse(f"{name} is a {type(module).__name__}, not a LayerScale or Identity")
    return gamma.detach().to(torch.float64)


def _check_tower(visual) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__
        if kind == "TimmModel":
            _refuse("timm towers (TimmModel) are not supported; use an open_clip VisionTransformer")
        if isinstance(getattr(visual, "visual", None), VisionTransformer):
            _refuse(f"got the whole {kind} model; pass its image tower (model.visual)")
        _refuse(f"{kind} is not an open_clip VisionTransformer")
    if getattr(visual, "attn_pool", None) is not None:
        _refuse("attentional pooling (attn_pool) is not supported, only class-token pooling")
    if getattr(visual, "pool_type", "tok") != "tok":
        _refuse(f"pool_type {visual.pool_type!r} is not supported, only class-token pooling ('tok')")


def _read_block(block, index: int, width: int) -> _Block:
    import torch
    from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock
    from torch import nn

    name = f"block {index}"
    f64 = torch.float64
    if hasattr(block, "ln_1_kv"):
        _refuse(f"{name} is a cross-attention block")
    attn = getattr(block, "attn", None)
    if type(block) is ResidualAttentionBlock and isinstance(attn, nn.MultiheadAttention):
        if attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
            _refuse(f"{name}: attention with bias_k/bias_v or add_zero_attn is not supported")
        if attn._qkv_same_embed_dim:
            w_q, w_k, w_v = attn.in_proj_weight.detach().to(f64).chunk(3, dim=0)
        else:
            w_q, w_k, w_v = (w.detach().to(f64) for w in
                             (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight))
        batch_first = bool(attn.batch_first)
    elif type(block) is CustomResidualAttentionBlock and type(attn) is Attention:
        changes = [what for what, on in (
            ("scaled cosine attention", attn.logit_scale is not None),
            ("head scale", attn.head_scale is not None),
            ("a LayerNorm inside attention (scale_attn_inner)", not isinstance(attn.ln_inner, nn.Identity)),
            ("qk-norm", not (isinstance(attn.ln_q, nn.Identity) and isinstance(attn.ln_k, nn.Identity))),
            ("a LayerNorm after attention (scale_attn)", not isinstance(block.ln_attn, nn.Identity)),
        ) if on]
        if changes:
            _refuse(f"{name} uses {', '.join(changes)}, which the head decomposition does not handle")
        w_q, w_k, w_v = attn.in_proj_weight.detach().to(f64).chunk(3, dim=0)
        batch_first = True
    else:
        _refuse(f"{name} is a {type(block).__name__} with {type(attn).__name__} attention, "
                "not a ResidualAttentionBlock with nn.MultiheadAttention")
    heads = int(attn.num_heads)
    if width % heads:
        _refuse(f"{name}: width {width} is not a multiple of {heads} heads")
    if attn.in_proj_bias is not None:
        b_q, b_k, b_v = attn.in_proj_bias.detach().to(f64).chunk(3)
    else:
        b_q = b_k = b_v = torch.zeros(width, dtype=f64, device=w_q.device)
    out = attn.out_proj
    w_o = out.weight.detach().to(f64).reshape(width, heads, width // heads)
    b_o = (out.bias.detach().to(f64) if out.bias is not None
           else torch.zeros(width, dtype=f64, device=w_o.device))
    return _Block(heads=heads, w_q=w_q, w_k=w_k, w_v=w_v, b_q=b_q, b_k=b_k, b_v=b_v,
                  w_o=w_o, b_o=b_o,
                  gamma_1=_layer_scale(block.ls_1, width, f"{name} ls_1").to(w_o.device),
                  gamma_2=_layer_scale(block.ls_2, width, f"{name} ls_2").to(w_o.device),
                  batch_first=batch_first)


def _head_terms(spec: _Block, x: "torch.Tensor", tokens: bool) -> "torch.Tensor":
    """Per-head outputs at the class row in width space, before layer scale.

    ``x``: the block's ``ln_1`` output, (n, T, width) float64. Returns (n, H, width), or
    (n, H, T, width) per token; either sums over heads (and tokens) to the attention output.
    """
    import torch

    n, length, width = x.shape
    h = spec.heads
    q = (x[:, 0] @ spec.w_q.T + spec.b_q).reshape(n, h, -1)
    k = (x @ spec.w_k.T + spec.b_k).reshape(n, length, h, -1)
    v = (x @ spec.w_v.T + spec.b_v).reshape(n, length, h, -1)
    weights = torch.softmax(torch.einsum("nhd,nthd->nht", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    if tokens:
        values = torch.einsum("nthd,ehd->nhte", v, spec.w_o) + spec.b_o / h
        return weights[..., None] * values
    mixed = torch.einsum("nht,nthd->nhd", weights, v)
    return torch.einsum("nhd,ehd->nhe", mixed, spec.w_o) + spec.b_o / h


def _relative_error(got: "torch.Tensor", want: "torch.Tensor") -> float:
    import torch

    scale = torch.linalg.vector_norm(want, dim=-1).clamp_min(1e-30)
    return float((torch.linalg.vector_norm(got - want, dim=-1) / scale).max())


def _as_images(images, visual) -> "torch.Tensor":
    import torch

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a float tensor (n, 3, H, W), got {type(images).__name__}")
    expected = tuple(visual.image_size)
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != expected:
        raise InputError(f"images must have shape (n, 3, {expected[0]}, {expected[1]}) for this "
                         f"tower, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputError(f"images must be a float tensor (preprocessed), got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise InputError("images is empty (n = 0)")
    if not bool(torch.isfinite(images).all()):
        raise InputError("images contains NaN or inf")
    return images


def decompose(visual, images, *, tokens: bool = False,
              batch_size: int = DEFAULT_BATCH_SIZE) -> Decomposition:
    """Split ``visual(images)`` into per-head, per-MLP and stem terms (see the module docstring).

    ``visual``: an open_clip ``VisionTransformer`` with class-token pooling (``model.visual``);
    ``images``: preprocessed float tensor (n, 3, H, W). ``tokens=True`` splits each head's term
    over the tokens it attends to. Images run in batches of ``batch_size`` under
    ``torch.no_grad`` with the tower in eval mode (its mode is restored afterwards).
    Raises :class:`UnsupportedTowerError` for a tower it cannot decompose exactly.

    The result is float64: per head it holds n * layers * heads * dim values, per token that
    times the number of tokens (ViT-B/32: 29 MB per image), so split large sets per token
    into several calls.
    """
    import torch
    from torch import nn

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_tower(visual)
    images = _as_images(images, visual)
    param = visual.conv1.weight
    width = int(param.shape[0])
    blocks = list(visual.transformer.resblocks)
    if not blocks:
        _refuse("the transformer has no blocks")
    specs = [_read_block(block, i, width) for i, block in enumerate(blocks)]
    n_heads = specs[0].heads
    if any(s.heads != n_heads for s in specs):
        _refuse("blocks have different numbers of heads")

    ln_post = visual.ln_post
    if isinstance(ln_post, nn.LayerNorm):
        if tuple(ln_post.normalized_shape) != (width,):
            _refuse(f"ln_post normalises shape {tuple(ln_post.normalized_shape)}, not ({width},)")
        ln_weight = (ln_post.weight.detach().to(torch.float64) if ln_post.weight is not None
                     else torch.ones(width, dtype=torch.float64, device=param.device))
        ln_bias = (ln_post.bias.detach().to(torch.float64) if ln_post.bias is not None
                   else torch.zeros(width, dtype=torch.float64, device=param.device))
        ln_eps = float(ln_post.eps)
    elif isinstance(ln_post, nn.Identity):
        ln_weight = ln_bias = ln_eps = None
    else:
        _refuse(f"ln_post is a {type(ln_post).__name__}, not a LayerNorm")
    proj = (visual.proj.detach().to(torch.float64) if visual.proj is not None
            else torch.eye(width, dtype=torch.float64, device=param.device))
    dim = int(proj.shape[1])

    def to_output(term: "torch.Tensor") -> "torch.Tensor":
        """Width-space term -> output space, up to the per-image 1/sigma (applied later)."""
        if ln_weight is not None:
            term = (term - term.mean(dim=-1, keepdim=True)) * ln_weight
        return term @ proj

    n = int(images.shape[0])
    n_layers = len(blocks)
    n_tokens = int(visual.positional_embedding.shape[0])
    head_shape = (n, n_layers, n_heads, n_tokens, dim) if tokens else (n, n_layers, n_heads, dim)
    heads_out = np.empty(head_shape, dtype=np.float64)
    mlps_out = np.empty((n, n_layers, dim), dtype=np.float64)
    stem_out = np.empty((n, dim), dtype=np.float64)
    tolerance = max(1e-4, 50 * float(torch.finfo(param.dtype).eps))

    seen: dict[str, Any] = {}

    def f64(t: "torch.Tensor") -> "torch.Tensor":
        return t.detach().to(torch.float64, copy=True)

    def ln_pre_hook(_module, _inputs, output):
        seen["stem"] = f64(output[:, 0])

    def make_hooks(index: int, spec: _Block):
        def ln_1_hook(_module, _inputs, output):
            x = output if spec.batch_first else output.transpose(0, 1)
            seen[("ln_1", index)] = x

        def attn_hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            out = f64(out[:, 0] if spec.batch_first else out[0])
            x = seen.pop(("ln_1", index), None)
            if x is None:
                _refuse(f"block {index}: attention ran without its ln_1 (the block's order differs)")
            terms = _head_terms(spec, f64(x), tokens)
            total = terms.sum(dim=(1, 2)) if tokens else terms.sum(dim=1)
            error = _relative_error(total, out)
            if not error <= tolerance:
                _refuse(f"block {index}: the per-head terms do not add up to the attention output "
                        f"(relative error {error:.2g}); this attention variant is not supported")
            seen[("heads", index)] = terms * spec.gamma_1

        def mlp_hook(_module, _inputs, output):
            out = output if spec.batch_first else output.transpose(0, 1)
            seen[("mlp", index)] = f64(out[:, 0]) * spec.gamma_2

        return ln_1_hook, attn_hook, mlp_hook

    def ln_post_pre_hook(_module, inputs):
        x = inputs[0]
        seen["residual"] = f64(x[:, 0] if x.ndim == 3 else x)

    def output_hook(_module, _inputs, output):
        seen["output"] = f64(output[0] if isinstance(output, tuple) else output)

    handles = [visual.ln_pre.register_forward_hook(ln_pre_hook),
               ln_post.register_forward_pre_hook(ln_post_pre_hook),
               visual.register_forward_hook(output_hook)]
    was_training = visual.training
    try:
        for index, (block, spec) in enumerate(zip(blocks, specs)):
            ln_1_hook, attn_hook, mlp_hook = make_hooks(index, spec)
            handles += [block.ln_1.register_forward_hook(ln_1_hook),
                        block.attn.register_forward_hook(attn_hook),
                        block.mlp.register_forward_hook(mlp_hook)]
        visual.eval()
        with torch.no_grad():
            for start in range(0, n, batch_size):
                seen.clear()
                batch = images[start:start + batch_size].to(device=param.device, dtype=param.dtype)
                visual(batch)
                _finish_batch(seen, specs, to_output, ln_bias, ln_eps, proj, tokens, tolerance,
                              heads_out, mlps_out, stem_out, slice(start, start + len(batch)))
    finally:
        for handle in handles:
            handle.remove()
        visual.train(was_training)
        seen.clear()
    logger.debug("decomposed %d image(s): %d layers x %d heads, dim %d", n, n_layers, n_heads, dim)
    return Decomposition(heads=heads_out, mlps=mlps_out, stem=stem_out)


def _finish_batch(seen, specs, to_output, ln_bias, ln_eps, proj, tokens, tolerance,
                  heads_out, mlps_out, stem_out, rows: slice) -> None:
    """Check one batch's captured terms against the tower and write them in output space."""
    import torch

    missing = [key for key in ("stem", "residual", "output") if key not in seen]
    missing += [f"block {i}" for i in range(len(specs))
                if ("heads", i) not in seen or ("mlp", i) not in seen]
    if missing:
        _refuse(f"the forward pass did not run the expected modules ({', '.join(missing)})")
    heads = [seen[("heads", i)] for i in range(len(specs))]
    mlps = [seen[("mlp", i)] for i in range(len(specs))]
    stem = seen["stem"]
    rebuilt = stem + sum(h.sum(dim=(1, 2)) if tokens else h.sum(dim=1) for h in heads) + sum(mlps)
    error = _relative_error(rebuilt, seen["residual"])
    if not error <= tolerance:
        _refuse(f"the stem, head and MLP terms do not add up to the residual stream before ln_post "
                f"(relative error {error:.2g}); this block variant is not supported")
    residual = seen["residual"]
    if ln_bias is not None:
        # ln_post's statistics are those of the actual residual stream of each image.
        inv_sigma = torch.rsqrt(residual.var(dim=-1, unbiased=False) + ln_eps)
        bias_term = ln_bias @ proj
    else:
        inv_sigma = torch.ones(residual.shape[0], dtype=torch.float64, device=residual.device)
        bias_term = 0.0
    scale_heads = inv_sigma.reshape(-1, 1, 1, 1, 1) if tokens else inv_sigma.reshape(-1, 1, 1, 1)
    heads_t = torch.stack([to_output(h) for h in heads], dim=1) * scale_heads
    mlps_t = torch.stack([to_output(m) for m in mlps], dim=1) * inv_sigma.reshape(-1, 1, 1)
    stem_t = to_output(stem) * inv_sigma.reshape(-1, 1) + bias_term
    total = (heads_t.sum(dim=(2, 3)) if tokens else heads_t.sum(dim=2)).sum(dim=1)
    total = total + mlps_t.sum(dim=1) + stem_t
    error = _relative_error(total, seen["output"])
    if not error <= tolerance:
        _refuse(f"the terms do not add up to the tower's output (relative error {error:.2g}); "
                "its pooling or final LayerNorm is a variant this decomposition does not handle")
    if tuple(heads_t.shape[1:]) != heads_out.shape[1:]:
        _refuse(f"the head terms have shape {tuple(heads_t.shape[1:])} per image, expected "
                f"{heads_out.shape[1:]} (token count differs from the positional embedding)")
    heads_out[rows] = heads_t.cpu().numpy()
    mlps_out[rows] = mlps_t.cpu().numpy()
    stem_out[rows] = stem_t.cpu().numpy()


__all__ = ["Decomposition", "UnsupportedTowerError", "decompose"]
