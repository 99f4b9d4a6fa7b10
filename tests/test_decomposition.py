"""Head decomposition of open_clip ViT towers (indexing/encoders/decomposition.py).

Tiny random towers (2-3 layers, 2-4 heads, width 32-64, 32x32 images) with every parameter
perturbed away from its initial value (biases, LayerNorm weights, layer scales), so that each
bias and scale the decomposition must route is non-zero. The identity is checked against the
tower's own forward pass; the per-head split against torch's own attention weights.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402
from torch import nn  # noqa: E402

from indexing.encoders.decomposition import Decomposition, UnsupportedTowerError, decompose  # noqa: E402
from sce_correct.errors import InputError  # noqa: E402


def tower(layers=2, heads=2, width=32, patch=8, ls=None, seed=0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    visual = VisionTransformer(image_size=32, patch_size=patch, width=width, layers=layers, heads=heads,
                               mlp_ratio=2.0, output_dim=24, ls_init_value=ls, **kwargs)
    with torch.no_grad():
        for param in visual.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return visual.eval()


def images(n=5, seed=1) -> "torch.Tensor":
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float((np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)).max())


def forward(visual, x) -> np.ndarray:
    with torch.no_grad():
        out = visual(x.to(visual.conv1.weight.dtype))
    return (out[0] if isinstance(out, tuple) else out).double().numpy()


CONFIGS = {
    "2L-2H-w32-p16": dict(layers=2, heads=2, width=32, patch=16),
    "3L-4H-w64-p8-layerscale": dict(layers=3, heads=4, width=64, patch=8, ls=0.3),
    "2L-4H-w48-p8-layerscale": dict(layers=2, heads=4, width=48, patch=8, ls=1.0),
    "3L-2H-w32-p8-final-ln-after-pool": dict(layers=3, heads=2, width=32, patch=8, final_ln_after_pool=True),
    "2L-2H-w32-p8-no-ln-pre": dict(layers=2, heads=2, width=32, patch=8, no_ln_pre=True),
    "2L-4H-w32-p8-plain-custom-block": dict(layers=2, heads=4, width=32, patch=8, ls=0.5, block_type="custom"),
    "2L-2H-w32-p8-custom-block-ln-in-mlp": dict(layers=2, heads=2, width=32, patch=8, block_type="custom",
                                                scale_fc=True),
    "2L-2H-w32-p8-output-tokens": dict(layers=2, heads=2, width=32, patch=8, output_tokens=True),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_terms_sum_to_the_tower_output(config):
    visual = tower(**config)
    x = images()
    parts = decompose(visual, x, batch_size=2)
    n, layers, heads = 5, config["layers"], config["heads"]
    assert parts.heads.shape == (n, layers, heads, 24)
    assert parts.mlps.shape == (n, layers, 24) and parts.stem.shape == (n, 24)
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1) + parts.stem
    assert relative_error(total, forward(visual, x)) < 1e-5
    # in float64 the identity is exact up to rounding: nothing is approximated
    visual64 = visual.double()
    parts64 = decompose(visual64, x.double())
    assert relative_error(parts64.total(), forward(visual64, x.double())) < 1e-12
    # every term matters: no head, MLP or stem term is identically zero
    assert (np.abs(parts64.heads).max(axis=-1) > 0).all() and (np.abs(parts64.mlps).max(axis=-1) > 0).all()


def test_tower_without_proj_decomposes_in_width_space():
    visual = tower(layers=2, heads=2, width=32).double()
    visual.proj = None
    x = images(3).double()
    parts = decompose(visual, x)
    assert parts.stem.shape == (3, 32)
    assert relative_error(parts.total(), forward(visual, x)) < 1e-12


def test_tower_without_ln_post_is_a_plain_sum_of_the_residual_stream():
    visual = tower(layers=2, heads=2, width=32).double()
    visual.ln_post = nn.Identity()
    x = images(3).double()
    parts = decompose(visual, x)
    assert relative_error(parts.total(), forward(visual, x)) < 1e-12


def test_sequence_first_layout_of_older_open_clip():
    """open_clip before batch-first blocks ran the stack as (tokens, n, width)."""
    visual = tower(layers=2, heads=2, width=32, ls=0.5).double()
    visual.transformer.batch_first = False
    for blk in visual.transformer.resblocks:
        blk.attn.batch_first = False
    x = images(3).double()
    for tokens in (False, True):
        parts = decompose(visual, x, tokens=tokens)
        assert relative_error(parts.total(), forward(visual, x)) < 1e-12


@pytest.mark.parametrize("ls", [None, 0.4])
def test_tokens_sum_to_the_head_terms(ls):
    visual = tower(layers=3, heads=4, width=32, patch=8, ls=ls).double()
    x = images(4).double()
    per_head = decompose(visual, x)
    per_token = decompose(visual, x, tokens=True, batch_size=3)
    assert per_token.heads.shape == (4, 3, 4, 17, 24)  # 16 patches + the class token
    np.testing.assert_allclose(per_token.heads.sum(axis=3), per_head.heads, rtol=0, atol=1e-12)
    np.testing.assert_allclose(per_token.mlps, per_head.mlps, rtol=0, atol=1e-12)
    np.testing.assert_allclose(per_token.stem, per_head.stem, rtol=0, atol=1e-12)
    assert per_token.per_token and not per_head.per_token
    np.testing.assert_allclose(per_token.total(), per_head.total(), rtol=0, atol=1e-12)


def test_batches_do_not_change_the_terms():
    visual = tower(layers=2, heads=2, width=32).double()
    x = images(7).double()
    one = decompose(visual, x, batch_size=1)
    all_at_once = decompose(visual, x, batch_size=64)
    for a, b in ((one.heads, all_at_once.heads), (one.mlps, all_at_once.mlps), (one.stem, all_at_once.stem)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_head_terms_match_torch_attention_weights():
    """Independent computation of every head term: attention weights from torch's own
    nn.MultiheadAttention (need_weights, per head), values from in_proj, the head's slice of
    out_proj, layer scale, then ln_post linearised at the image's own sigma, then proj."""
    visual = tower(layers=3, heads=4, width=32, patch=8, ls=0.7).double()
    x = images(3).double()
    captured: dict = {}
    hooks = [blk.ln_1.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o))
             for k, blk in enumerate(visual.transformer.resblocks)]
    hooks.append(visual.ln_post.register_forward_pre_hook(lambda m, i: captured.__setitem__("r", i[0][:, 0])))
    forward(visual, x)
    for hook in hooks:
        hook.remove()
    r = captured["r"]
    sigma = torch.sqrt(r.var(dim=-1, unbiased=False) + visual.ln_post.eps)
    w_ln, proj = visual.ln_post.weight.detach(), visual.proj.detach()
    parts = decompose(visual, x)
    width, n_heads = 32, 4
    hd = width // n_heads
    for layer, blk in enumerate(visual.transformer.resblocks):
        a = blk.attn
        z = captured[layer]
        with torch.no_grad():
            _, weights = a(z, z, z, need_weights=True, average_attn_weights=False)  # (n, H, T, T)
            v = torch.nn.functional.linear(z, a.in_proj_weight[2 * width:], a.in_proj_bias[2 * width:])
            for h in range(n_heads):
                mixed = torch.einsum("nt,ntd->nd", weights[:, h, 0], v[..., h * hd:(h + 1) * hd])
                c = mixed @ a.out_proj.weight[:, h * hd:(h + 1) * hd].T + a.out_proj.bias / n_heads
                c = c * blk.ls_1.gamma
                expected = ((c - c.mean(-1, keepdim=True)) * w_ln / sigma[:, None]) @ proj
                np.testing.assert_allclose(parts.heads[:, layer, h], expected.numpy(), rtol=0, atol=1e-12)


def test_stem_carries_the_class_embedding_and_ln_post_bias():
    visual = tower(layers=2, heads=2, width=32).double()
    x = images(2).double()
    parts = decompose(visual, x)
    with torch.no_grad():
        cls = visual.ln_pre(visual.class_embedding + visual.positional_embedding[0])
        r = visual.transformer(visual._embeds(x))[:, 0]
        sigma = torch.sqrt(r.var(dim=-1, unbiased=False) + visual.ln_post.eps)
        expected = (((cls - cls.mean()) * visual.ln_post.weight / sigma[:, None] + visual.ln_post.bias)
                    @ visual.proj)
    np.testing.assert_allclose(parts.stem, expected.numpy(), rtol=0, atol=1e-12)


def test_a_clip_model_from_a_json_config(tmp_path):
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16,
                             "ls_init_value": 0.5},
              "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "sce-decomp-tiny.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    model = open_clip.create_model("sce-decomp-tiny")
    x = images(3)
    parts = decompose(model.visual, x)
    assert parts.heads.shape == (3, 2, 4, 16)
    with torch.no_grad():
        assert relative_error(parts.total(), model.encode_image(x).double().numpy()) < 1e-5
    with pytest.raises(UnsupportedTowerError, match=r"model\.visual"):
        decompose(model, x)


def test_hooks_removed_and_mode_restored():
    visual = tower(layers=2, heads=2, width=32).train()
    decompose(visual, images(2))
    assert visual.training
    modules = list(visual.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


# -- refusals -------------------------------------------------------------------------------
REFUSED = {
    "attentional-pool": (dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2), "attn_pool"),
    "average-pool": (dict(pool_type="avg"), "pool_type 'avg'"),
    "no-pool": (dict(pool_type="none"), "pool_type 'none'"),
    "scaled-cosine": (dict(scaled_cosine_attn=True), "scaled cosine attention"),
    "head-scale": (dict(scale_heads=True), "head scale"),
    "inner-ln": (dict(scale_attn_inner=True), "LayerNorm inside attention"),
    "ln-after-attention": (dict(scale_attn=True), "LayerNorm after attention"),
    "qk-norm": (dict(qk_norm=True), "qk-norm"),
}


@pytest.mark.parametrize("kwargs,message", REFUSED.values(), ids=REFUSED.keys())
def test_unsupported_towers_are_refused_in_one_line(kwargs, message):
    visual = tower(layers=2, heads=2, width=32, **kwargs)
    with pytest.raises(UnsupportedTowerError) as err:
        decompose(visual, images(2))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, InputError)


def test_timm_tower_is_refused():
    pytest.importorskip("timm")
    from open_clip.timm_model import TimmModel

    visual = TimmModel("vit_tiny_patch16_224", embed_dim=16, image_size=32)
    with pytest.raises(UnsupportedTowerError, match="timm"):
        decompose(visual, images(1))


def test_non_vit_tower_is_refused():
    from open_clip.modified_resnet import ModifiedResNet

    visual = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=32, width=8)
    with pytest.raises(UnsupportedTowerError, match="ModifiedResNet is not an open_clip VisionTransformer"):
        decompose(visual, images(1))


def test_unknown_layer_scale_and_final_norm_are_refused():
    visual = tower(layers=2, heads=2, width=32)
    visual.transformer.resblocks[1].ls_2 = nn.Dropout(0.0)
    with pytest.raises(UnsupportedTowerError, match="block 1 ls_2 is a Dropout"):
        decompose(visual, images(1))
    visual = tower(layers=2, heads=2, width=32)
    visual.ln_post = nn.BatchNorm1d(32)
    with pytest.raises(UnsupportedTowerError, match="ln_post is a BatchNorm1d"):
        decompose(visual, images(1))


class DoubledAttention(nn.MultiheadAttention):
    """An attention variant the static checks cannot see: its output is scaled after out_proj."""

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return 2 * out, weights


def test_attention_variant_caught_by_the_per_head_check():
    visual = tower(layers=2, heads=2, width=32)
    visual.transformer.resblocks[1].attn.__class__ = DoubledAttention
    with pytest.raises(UnsupportedTowerError, match="block 1: the per-head terms do not add up"):
        decompose(visual, images(2))


def test_block_variant_caught_by_the_residual_check():
    visual = tower(layers=2, heads=2, width=32)
    # stands in for a block that adds something no hook sees (here: a constant after the MLP)
    visual.transformer.resblocks[0].register_forward_hook(lambda m, i, o: o + 1.0)
    with pytest.raises(UnsupportedTowerError, match="residual stream before ln_post"):
        decompose(visual, images(2))


@pytest.mark.parametrize("bad,message", [
    (torch.randn(2, 3, 16, 16), r"shape \(n, 3, 32, 32\)"),
    (torch.randn(2, 1, 32, 32), r"shape \(n, 3, 32, 32\)"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "float tensor"),
    (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    (torch.randn(0, 3, 32, 32), "empty"),
    ([[1.0]], "float tensor"),
])
def test_bad_images_are_input_errors(bad, message):
    with pytest.raises(InputError, match=message):
        decompose(tower(), bad)


def test_bad_batch_size_is_an_input_error():
    with pytest.raises(InputError, match="batch_size"):
        decompose(tower(), images(1), batch_size=0)


def test_decomposition_is_a_plain_record():
    parts = Decomposition(heads=np.ones((2, 1, 3, 4)), mlps=np.ones((2, 1, 4)), stem=np.zeros((2, 4)))
    np.testing.assert_array_equal(parts.total(), np.full((2, 4), 4.0))
