"""emoji-vit: the shipped open_clip ViT loads lazily from safetensors, embeds like an encoder,
retrieves seen emoji by caption, and its training script runs end to end. No network."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexing.encoders import load_encoder, parse_spec
from indexing.encoders import train_default_head as tdh
from indexing.encoders.emoji_vit import CONFIG_PATH, RECORD_PATH, WEIGHTS_PATH, EmojiVitEncoder

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


pytestmark = pytest.mark.usefixtures("no_network")  # conftest: a connection attempt fails the test


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("emoji-vit", device="cpu")


@pytest.fixture(scope="module")
def google():
    return tdh.read_corpus("google", SAMPLE)


def test_spec_names_the_encoder_and_loads_nothing():
    assert parse_spec("emoji-vit").kind == "emoji-vit"
    code = ("import sys, indexing; e = indexing.load_encoder('emoji-vit'); "
            "print(e.name, e.dim, e._visual is None, "
            "[m for m in ('torch', 'open_clip', 'safetensors', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["emoji-vit", "384", "True", "[]"]


def test_weights_file_is_safetensors_under_20_mb():
    data = WEIGHTS_PATH.read_bytes()
    assert len(data) < 20 * 1024 * 1024
    assert data[:1] != b"\x80" and data[:2] != b"PK"  # neither a pickle nor a torch zip
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    assert "conv1.weight" in header and "class_embedding" in header


def test_shipped_weights_give_a_class_token_vision_transformer(encoder):
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    from torch import nn

    visual = encoder.visual
    config = json.loads(CONFIG_PATH.read_text())
    assert isinstance(visual, VisionTransformer)
    assert visual.pool_type == "tok" and visual.attn_pool is None
    assert visual.output_dim == 384 and not visual.training
    blocks = list(visual.transformer.resblocks)
    assert len(blocks) == config["vision_cfg"]["layers"]
    assert all(isinstance(b, ResidualAttentionBlock) and isinstance(b.attn, nn.MultiheadAttention) for b in blocks)
    assert visual.conv1.weight.shape[0] == config["vision_cfg"]["width"]


def test_embeddings_unit_norm_deterministic_and_match_the_tower(encoder, google):
    import torch

    paths = google.paths[:5]
    a = encoder.encode_images(paths, batch_size=2)
    b = encoder.encode_images(paths, batch_size=5, num_workers=0)
    assert a.shape == (5, 384) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    batch = encoder.preprocess_batch(paths)
    size = json.loads(CONFIG_PATH.read_text())["preprocess_cfg"]["size"]
    assert tuple(batch.shape) == (5, 3, size, size)
    with torch.no_grad():
        raw = encoder.visual(batch).numpy()
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), a, atol=1e-5)
    assert not np.allclose(a[0], a[1], atol=1e-3)  # different emoji, different embeddings


def test_text_side_is_the_default_encoders(encoder):
    texts = ["grinning face", "thumbs up: dark skin tone", "red heart"]
    t = encoder.encode_texts(texts)
    assert t.shape == (3, 384)
    np.testing.assert_allclose(t, load_encoder("default").encode_texts(texts), atol=1e-6)


def test_captions_retrieve_their_own_image_among_100_seen_google_emoji(encoder, google):
    held = tdh.split_names(google.objects, 0.2, 0)  # the split the weights were trained with
    seen = [i for i, o in enumerate(google.objects) if o not in held]
    rows = sorted(np.random.default_rng(7).choice(seen, size=100, replace=False).tolist())
    img = encoder.encode_images([google.paths[i] for i in rows])
    txt = encoder.encode_texts([google.captions[i] for i in rows])
    sims = txt @ img.T
    rank = (sims > np.diag(sims)[:, None]).sum(1)
    r10 = float((rank < 10).mean())
    assert r10 > 0.8, r10  # loose: the shipped weights reach 0.98 on all 2,904 seen names in the full gallery


def test_record_describes_the_shipped_weights():
    record = EmojiVitEncoder.training_record()
    assert record["model_config"] == json.loads(CONFIG_PATH.read_text())
    assert "twitter" not in record["train_styles"]
    assert record["held_out_names"]["dev_split"] is False
    assert record["held_out_names"]["count"] == 382
    assert set(record["results"]) == {"google", "twitter"}
    assert RECORD_PATH.name == "emoji_vit_record.json"


def test_the_training_defaults_are_the_shipped_weights_config():
    # a bare `python -m indexing.encoders.train_emoji_vit` rebuilds what is shipped
    from dataclasses import asdict

    from indexing.encoders.train_emoji_vit import VitTrainConfig

    assert asdict(VitTrainConfig()) == json.loads(RECORD_PATH.read_text())["config"]


def test_training_refuses_the_twitter_style():
    from indexing.encoders import train_emoji_vit

    with pytest.raises(SystemExit, match="twitter"):
        train_emoji_vit.main(["--train-styles", "google,twitter", "--no-save"])


def test_training_script_runs_end_to_end_in_a_tiny_configuration(tmp_path):
    # ~15 s (64 images through EfficientNet for the teacher, one step of the ViT)
    from indexing.encoders import train_emoji_vit

    out = tmp_path / "w" / "emoji_vit.safetensors"
    record = train_emoji_vit.main(["--train-styles", "google", "--eval-styles", "google", "--limit", "64",
                                   "--epochs", "1", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                                   "--views", "0", "--out", str(out)])
    assert record["results"]["google"]["n_images"] == 64
    assert record["n_train_images"] == sum(o not in tdh.split_names(tdh.read_corpus("google", SAMPLE).objects,
                                                                    0.2, 0)
                                           for o in tdh.read_corpus("google", SAMPLE).objects[:64])
    saved = json.loads(out.with_name("emoji_vit_record.json").read_text())
    assert saved["config"]["epochs"] == 1
    emb = EmojiVitEncoder(device="cpu", weights_path=out).encode_images(
        [SAMPLE / "images" / "1f600.png"])
    assert emb.shape == (1, 384)
    # the teacher embeddings are cached by image sha256 beside the shared feature cache
    assert list((tmp_path / "cache" / "train_emoji_vit").glob("teacher-*.npz"))
    assert list((tmp_path / "cache" / "train_default_head").glob("image-features-*.npz"))


def test_teacher_contrastive_loss_matches_a_numpy_log_softmax():
    import torch

    from indexing.encoders.train_emoji_vit import teacher_contrastive_loss

    rng = np.random.default_rng(3)
    img = rng.normal(size=(7, 16))
    teach = rng.normal(size=(7, 16))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    teach /= np.linalg.norm(teach, axis=1, keepdims=True)
    logits = img @ teach.T / 0.05
    logits -= logits.max(1, keepdims=True)
    expected = -np.mean(np.diag(logits) - np.log(np.exp(logits).sum(1)))
    got = teacher_contrastive_loss(torch.from_numpy(img), torch.from_numpy(teach), 0.05).item()
    assert got == pytest.approx(expected, rel=1e-9)
    # its own teacher embedding as the student's: lower loss than a shuffled one
    same = teacher_contrastive_loss(torch.from_numpy(teach), torch.from_numpy(teach), 0.05).item()
    assert same < got


def test_eval_every_is_refused_without_dev():
    from indexing.encoders import train_emoji_vit

    with pytest.raises(SystemExit, match="--dev"):
        train_emoji_vit.main(["--eval-every", "1", "--no-save"])


@pytest.mark.parametrize("args", [["--views", "-1"], ["--views", "10", "--views-per-batch", "0"]])
def test_a_negative_pool_or_an_empty_share_of_views_is_refused(args):
    from indexing.encoders import train_emoji_vit

    with pytest.raises(SystemExit, match="--views must be >= 0 and --views-per-batch >= 1"):
        train_emoji_vit.main(args + ["--no-save"])


def test_dev_run_records_a_learning_curve_on_the_dev_names(tmp_path):
    # ~15 s: a --dev run holds out a further 20 % of the seen names and logs their R@k per epoch
    from indexing.encoders import train_emoji_vit

    record = train_emoji_vit.main(["--train-styles", "google", "--eval-styles", "google", "--limit", "64",
                                   "--epochs", "2", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                                   "--dev", "--eval-every", "1", "--teacher-contrast-weight", "0.5",
                                   "--views", "0", "--no-save"])
    assert [p["epoch"] for p in record["dev_curve"]] == [1, 2]
    assert record["held_out_names"]["dev_split"] is True
    assert record["config"]["teacher_contrast_weight"] == 0.5
    assert all(0.0 <= p["R@1"] <= p["R@10"] <= 1.0 for p in record["dev_curve"])
    assert not list(tmp_path.glob("**/*.safetensors"))  # --no-save writes no weights, no checkpoint


def test_distillation_views_come_only_from_names_the_run_trains_on(tmp_path):
    from indexing.encoders.train_emoji_vit import distillation_views


    class _CountingTeacher:  # mean colour as the embedding; counts how often it is run
        head_path = SAMPLE / "captions.csv"  # any file: the pool's cache key reads its sha256
        calls = 0

        def encode_images(self, images, **_):
            self.calls += 1
            x = np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in images])
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    google = tdh.read_corpus("google", SAMPLE)
    corpus = tdh.Corpus("google", SAMPLE, google.rows[:60])
    names_held = tdh.split_names(google.objects, 0.2, 0)
    run_held = names_held | set(corpus.objects[:20])  # a dev run holds out more names
    teacher = _CountingTeacher()
    views = distillation_views({"google": corpus}, ["google"], names_held, run_held, 40, 0, teacher, tmp_path)
    sources = [o for o in corpus.objects if o not in names_held]  # the pool's source list
    used = {sources[i] for i in views.sources.ravel() if i >= 0}
    assert used and not used & run_held
    assert 0 < len(views.teacher) < 40  # the views touching the dev names were dropped
    everything = distillation_views({"google": corpus}, ["google"], names_held, names_held, 40, 0, teacher,
                                    tmp_path)
    assert len(everything.teacher) == 40 and teacher.calls == 1  # one cached pool for both runs


def test_training_with_views_adds_them_to_every_step(tmp_path):
    # ~15 s: a tiny run with a pool of 12 views, 4 per step
    from indexing.encoders import train_emoji_vit

    record = train_emoji_vit.main(["--train-styles", "google", "--eval-styles", "google", "--limit", "64",
                                   "--epochs", "1", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                                   "--views", "12", "--views-per-batch", "4", "--no-save"])
    assert record["config"]["views"] == 12 and record["config"]["views_per_batch"] == 4
    assert record["n_distillation_views"] == 12  # no dev split: every view is of a trained name
    assert "12 views made from them" in record["what"]
    assert list((tmp_path / "cache" / "train_emoji_vit").glob("distill-views-*.npz"))
