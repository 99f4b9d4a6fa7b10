"""Encoders: the spec factory, open_clip plumbing on a tiny random model, the embedded
default encoder (offline), and image loading errors. No network: sockets are blocked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexing.encoders import UnreadableImageError, load_encoder, open_image, parse_spec, to_rgb_on_white

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
ENCODERS = REPO / "indexing" / "encoders"

# conftest: a connection attempt fails the test; tiny_model is the tiny random open_clip model
pytestmark = pytest.mark.usefixtures("no_network")


def _images(n=3):
    rng = np.random.default_rng(0)
    out = [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]
    out.append(Image.new("RGBA", (30, 30), (200, 10, 10, 128)))  # transparent: composited on white
    return out


# -- spec parsing ------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["", "clip", "open_clip", "open_clip:", "open_clip::x", "open_clip:ViT-B-32:",
                                  "default:extra", "open_clip:no-such-model-xyz",
                                  "open_clip:ViT-B-32:no-such-tag-or-file"])
def test_bad_spec_raises_value_error_naming_the_spec(spec):
    with pytest.raises(ValueError) as err:
        load_encoder(spec)
    assert repr(spec) in str(err.value)


def test_parse_spec_parts(tmp_path):
    assert parse_spec("default").kind == "default"
    p = parse_spec("open_clip:ViT-B-32:laion2b_s34b_b79k")
    assert (p.kind, p.model, p.pretrained) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert parse_spec("open_clip:ViT-B-32").pretrained is None
    assert parse_spec("open_clip:ViT-B-32:C:/weights/x.pt").pretrained == "C:/weights/x.pt"
    assert parse_spec("open_clip:hf-hub:org/repo").model == "hf-hub:org/repo"


def test_hub_tag_is_accepted_without_loading_anything():
    enc = load_encoder("open_clip:ViT-B-32:laion2b_s34b_b79k")  # network would only be used on encode
    assert enc.name == "open_clip:ViT-B-32:laion2b_s34b_b79k"
    assert enc.dim == 512
    assert enc._loaded is None


def test_import_and_load_encoder_are_lazy():
    code = ("import sys, indexing.encoders as e; enc = e.load_encoder('default'); "
            "heavy = [m for m in ('torch', 'open_clip', 'transformers', 'sentence_transformers') "
            "if m in sys.modules]; print(heavy); print(enc.name, enc.dim)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "default 384"], out.stdout + out.stderr


# -- tiny open_clip ----------------------------------------------------------------------
def test_tiny_open_clip_shapes_dtype_determinism(tiny_model):
    enc = load_encoder(f"open_clip:{tiny_model}", device="cpu")
    assert enc.name == f"open_clip:{tiny_model}" and enc.dim == 32
    imgs = _images()
    a = enc.encode_images(imgs, batch_size=2)
    t = enc.encode_texts(["a red heart", "thumbs up", "x" * 500])  # long text is truncated, not an error
    assert a.shape == (len(imgs), 32) and t.shape == (3, 32)
    assert a.dtype == np.float32 and t.dtype == np.float32
    assert np.isfinite(a).all() and np.isfinite(t).all()
    assert not np.allclose(a[0], a[1])  # different images, different vectors
    # a fresh encoder from the same spec gives the same (seeded) model
    b = load_encoder(f"open_clip:{tiny_model}", device="cpu")
    np.testing.assert_array_equal(b.encode_images(imgs, batch_size=2), a)
    # batching and threading do not change the result (beyond float rounding)
    np.testing.assert_allclose(b.encode_images(imgs, batch_size=3, num_workers=0), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.encode_texts(["a red heart"]), t[:1], rtol=1e-5, atol=1e-6)
    x = enc.preprocess(imgs[0])
    assert tuple(x.shape) == (3, 32, 32)
    np.testing.assert_allclose(enc.encode_image_batch(x[None]), a[:1], rtol=1e-5, atol=1e-6)


def test_tiny_open_clip_checkpoint_round_trip(tiny_model, tmp_path):
    import torch

    rand = load_encoder(f"open_clip:{tiny_model}", device="cpu")
    model = rand._get()[0]
    with torch.no_grad():  # make the checkpoint differ from the seeded random init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    imgs, texts = _images(2), ["a banana", "flag of france"]
    want_i, want_t = rand.encode_images(imgs), rand.encode_texts(texts)

    loaded = load_encoder(f"open_clip:{tiny_model}:{ckpt}", device="cpu")
    assert loaded.name == f"open_clip:{tiny_model}:{ckpt.resolve()}"
    assert loaded._loaded is None  # lazy until first encode
    np.testing.assert_allclose(loaded.encode_images(imgs), want_i, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.encode_texts(texts), want_t, rtol=1e-5, atol=1e-6)
    fresh = load_encoder(f"open_clip:{tiny_model}", device="cpu")
    assert not np.allclose(fresh.encode_texts(texts), want_t, atol=1e-4)


def test_missing_checkpoint_file_is_a_value_error(tiny_model, tmp_path):
    spec = f"open_clip:{tiny_model}:{tmp_path / 'nope.pt'}"
    with pytest.raises(ValueError, match="nor an existing checkpoint file"):
        load_encoder(spec)


# -- image loading ---------------------------------------------------------------------
def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    rgb = np.asarray(to_rgb_on_white(img))
    assert rgb.shape == (4, 4, 3)
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[3, 3]) == (255, 255, 255)


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated"])
def test_unreadable_files_raise_a_clear_error(tmp_path, kind):
    path = tmp_path / f"bad-{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image")
    elif kind == "truncated":
        Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UnreadableImageError) as err:
        open_image(path)
    assert err.value.path == str(path) and err.value.reason
    assert str(path) in str(err.value)


# -- the embedded default encoder --------------------------------------------------------
@pytest.fixture(scope="module")
def default_encoder():
    return load_encoder("default", device="cpu")


@pytest.fixture(scope="module")
def sample_rows():
    import csv

    with open(SAMPLE / "captions.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_shipped_head_is_small_and_loads_without_pickle():
    from indexing.encoders.head import ProjectionHead

    path = ENCODERS / "default_head.npz"
    assert path.stat().st_size < 5 * 2 ** 20
    head = ProjectionHead.load(path)  # np.load(allow_pickle=False) inside
    assert (head.in_dim, head.out_dim) == (1345, 384)
    record = json.loads((ENCODERS / "default_head.json").read_text())
    assert "twitter" not in record["train_styles"]
    held = record["results"]["google"]["held_out"]
    assert 0.0 <= held["R@1"] <= held["R@10"] <= 1.0


def test_head_numpy_and_torch_agree():
    import torch

    from indexing.encoders.head import ProjectionHead

    head = ProjectionHead.load(ENCODERS / "default_head.npz")
    x = np.random.default_rng(1).normal(size=(5, head.in_dim)).astype(np.float32)
    a = head.apply(x)
    b = head.apply(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_default_encoder_offline_dims_and_norms(default_encoder, sample_rows):
    rows = sample_rows[:4]
    imgs = default_encoder.encode_images([SAMPLE / r["file"] for r in rows], batch_size=3)
    txts = default_encoder.encode_texts([r["caption"] for r in rows])
    assert default_encoder.name == "default" and default_encoder.dim == 384
    for arr in (imgs, txts):
        assert arr.shape == (4, 384) and arr.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-4)
    assert default_encoder.encode_texts([]).shape == (0, 384)
    assert default_encoder.encode_images([]).shape == (0, 384)


def test_default_encoder_paths_equal_pil_images(default_encoder, sample_rows):
    paths = [SAMPLE / r["file"] for r in sample_rows[10:15]]
    from_paths = default_encoder.encode_images(paths, batch_size=2, num_workers=2)
    pil = [Image.open(p) for p in paths]
    from_pil = default_encoder.encode_images(pil, batch_size=5, num_workers=0)
    np.testing.assert_allclose(from_paths, from_pil, atol=1e-5)


def test_default_encoder_unreadable_path_names_the_file(default_encoder, sample_rows, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = SAMPLE / sample_rows[0]["file"]
    with pytest.raises(UnreadableImageError, match="broken.png"):
        default_encoder.encode_images([good, bad, good], batch_size=2)


def _spread(rows, n, pred):
    picked = [r for r in rows if pred(r)]
    step = len(picked) / n
    return [picked[int(i * step)] for i in range(n)]


def test_default_encoder_caption_to_image_retrieval(default_encoder, sample_rows):
    """50 emoji whose names the head never saw in training, spread over the corpus:
    caption -> image within those 50. Chance: R@1 0.02, R@10 0.2 (measured: 0.58, 0.90)."""
    from indexing.encoders.train_default_head import split_names

    record = json.loads((ENCODERS / "default_head.json").read_text())
    split = record["held_out_names"]
    held = split_names([r["object"] for r in sample_rows], split["share"], split["seed"])
    assert len(held) == split["count"]
    rows = _spread(sample_rows, 50, lambda r: not r["skin_tone"] and r["object"] in held)
    img = default_encoder.encode_images([SAMPLE / r["file"] for r in rows])
    txt = default_encoder.encode_texts([r["caption"] for r in rows])
    sims = txt @ img.T
    rank = (sims > np.diag(sims)[:, None]).sum(1)
    r10 = float((rank < 10).mean())
    r1 = float((rank < 1).mean())
    assert r10 >= 0.7, f"R@10 {r10:.2f}"
    assert r1 >= 0.35, f"R@1 {r1:.2f}"


def test_default_encoder_sees_skin_tone(default_encoder, sample_rows):
    """For 12 emoji with five tone variants, each tone caption should pick its own variant
    more often than chance (1/5)."""
    by_obj: dict[str, list[dict]] = {}
    for r in sample_rows:
        if r["skin_tone"] and "," not in r["skin_tone"]:
            by_obj.setdefault(r["object"], []).append(r)
    families = [v for v in by_obj.values() if len(v) == 5]
    families = [families[int(i * len(families) / 12)] for i in range(12)]
    rows = [r for fam in families for r in fam]
    img = default_encoder.encode_images([SAMPLE / r["file"] for r in rows], batch_size=30)
    txt = default_encoder.encode_texts([r["caption"] for r in rows])
    sims = (txt @ img.T).reshape(12, 5, 12, 5)
    within = np.stack([sims[f, :, f, :] for f in range(12)])  # (family, caption tone, image tone)
    hits = within.argmax(2) == np.arange(5)
    assert hits.mean() >= 0.4, f"tone top-1 {hits.mean():.2f} (chance 0.2)"


def test_encode_texts_once_encodes_each_distinct_text_once():
    from conftest import ToyEncoder

    from indexing.encoders.encoder import encode_texts_once

    class Counting(ToyEncoder):
        calls: list[list[str]] = []

        def encode_texts(self, texts, **kwargs):
            self.calls.append(list(texts))
            return super().encode_texts(texts, **kwargs)

    enc = Counting()
    texts = ["dark", "light", "dark", "medium", "light", "dark"]
    out = encode_texts_once(enc, texts)
    assert enc.calls == [["dark", "light", "medium"]]
    np.testing.assert_array_equal(out, ToyEncoder().encode_texts(texts))
    encode_texts_once(enc, ["a", "b"])  # nothing repeated: one plain call
    assert enc.calls[-1] == ["a", "b"]


def test_tiny_open_clip_vit_decomposes_into_its_own_embeddings(tiny_model):
    """`encoder.visual` is the open_clip ViT, so `sce decompose` takes open_clip encoders: the
    per-head, per-MLP and stem terms of preprocessed images sum to the encoder's embeddings."""
    import torch

    from indexing.encoders.decomposition import decompose

    enc = load_encoder(f"open_clip:{tiny_model}", device="cpu")
    images = _images()
    pixels = torch.stack([enc.preprocess(image) for image in images])
    parts = decompose(enc.visual, pixels)
    total = parts.heads.sum((1, 2)) + parts.mlps.sum(1) + parts.stem
    embedded = enc.encode_image_batch(pixels)
    np.testing.assert_allclose(total, embedded, rtol=1e-4, atol=1e-5 * np.abs(embedded).max())
