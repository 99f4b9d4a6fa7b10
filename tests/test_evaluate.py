"""`sce evaluate` end to end on small real files, checked against the metric functions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ToyEncoder, make_image

import sce_correct as sc
from retrieval import metrics
from retrieval.evaluate import evaluate, write_evaluation
from retrieval.pairs import load_pairs


@pytest.fixture
def t2i_outputs(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\na green tree\n")
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    for line in range(3):
        for sample in range(4):
            make_image(gen / f"{line:03d}_{sample}.png", seed=10 * line + sample, size=(16, 16))
    for i in range(10):
        make_image(ref / f"r{i}.png", seed=500 + i, size=(16, 16))
    make_image(ref / "000_0.png", seed=1, size=(16, 16))  # same name as a generated image: pixel metrics
    edits = tmp_path / "edits.csv"
    edits.write_text("source_image,edited_image,source_caption,edited_caption\n"
                     "gen/000_0.png,gen/000_1.png,a red apple,a green apple\n"
                     "gen/001_0.png,gen/001_1.png,a blue car,a red car\n")
    return prompts, gen, ref, edits


def test_evaluate_matches_metric_functions(t2i_outputs, tmp_path):
    prompts, gen, ref, edits = t2i_outputs
    enc = ToyEncoder()
    pairs = load_pairs(prompts, gen)
    assert len(pairs) == 12 and pairs.prompts[5] == "a blue car"  # 001_1.png pairs with line 1
    rep = evaluate(enc, pairs, reference=ref, edits=edits, kid_subsets=5)
    img = enc.encode_images(pairs.images)
    txt = enc.encode_texts(pairs.prompts)
    ref_emb = enc.encode_images(sorted(ref.glob("*.png")))
    assert rep.clip_score.mean == pytest.approx(metrics.clip_score(img, txt).mean)
    assert rep.sce.image_diversity == pytest.approx(sc.sce_score(txt, img).image_diversity)
    assert rep.frechet_distance == pytest.approx(metrics.frechet_distance_from_features(img, ref_emb))
    assert rep.cmmd == pytest.approx(metrics.cmmd(img, ref_emb))
    assert rep.n_reference == 11 and rep.n_pixel_pairs == 1
    assert np.isfinite(rep.psnr) and rep.psnr > 0  # gen/000_0.png (seed 0) vs ref/000_0.png (seed 1)
    assert rep.directional_similarity is not None and rep.directional_similarity.per_pair.shape == (2,)
    paths = write_evaluation(rep, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["n_images"] == 12 and "CLIPScore" in paths["html"].read_text()


def test_identical_reference_gives_perfect_pixel_scores(tmp_path):
    prompts = tmp_path / "p.csv"
    gen, ref = tmp_path / "g", tmp_path / "r"
    rows = ["image,prompt"]
    for i in range(4):
        make_image(gen / f"{i}.png", seed=i, size=(16, 16))
        make_image(ref / f"{i}.png", seed=i, size=(16, 16))
        rows.append(f"g/{i}.png,prompt {i % 2}")
    prompts.write_text("\n".join(rows) + "\n")
    rep = evaluate(ToyEncoder(), load_pairs(prompts), reference=ref, kid_subsets=3)
    assert rep.psnr == float("inf") and rep.ssim == pytest.approx(1.0)
    assert abs(rep.frechet_distance) < 1e-3  # singular 16-d covariances from 4 images: sqrtm round-off


def test_bad_input(tmp_path, t2i_outputs):
    prompts, gen, ref, _ = t2i_outputs
    make_image(gen / "cover.png", seed=99)
    with pytest.raises(ValueError, match="do not start with a prompt line number"):
        load_pairs(prompts, gen)
    (gen / "cover.png").unlink()
    make_image(gen / "007_0.png", seed=98)
    with pytest.raises(ValueError, match="no prompt there"):
        load_pairs(prompts, gen)
    with pytest.raises(ValueError, match="needs an image folder"):
        load_pairs(prompts)
    lone = tmp_path / "lone"
    make_image(lone / "x.png", seed=1)
    (gen / "007_0.png").unlink()
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(ToyEncoder(), load_pairs(prompts, gen), reference=lone)


def test_default_encoder_gives_a_named_inception_style_score(tmp_path):
    import indexing

    sample = Path(__file__).resolve().parents[1] / "data" / "sample"
    rows = ["image,prompt"] + [f"{sample}/images/{name}.png,{cap}" for name, cap in (
        ("1f600", "grinning face"), ("1f603", "smiling face"), ("1f34e", "red apple"),
        ("1f697", "automobile"), ("1f436", "dog face"), ("2764-fe0f", "red heart"))]
    prompts = tmp_path / "p.csv"
    prompts.write_text("\n".join(rows) + "\n")
    rep = evaluate(indexing.load_encoder("default"), load_pairs(prompts))
    assert rep.inception_score is not None and "EfficientNet-Lite0" in rep.inception_score.classifier
    assert 1.0 <= rep.inception_score.mean <= 6.0  # bounded by the number of images per split
    assert -1 <= rep.clip_score.mean <= 2.5 and rep.n_images == 6


def test_jsonl_pairs_and_a_bad_line(tmp_path):
    for i in range(2):
        make_image(tmp_path / f"{i}.png", seed=i)
    good = tmp_path / "p.jsonl"
    good.write_text('{"image": "0.png", "prompt": "a"}\n\n{"file": "1.png", "caption": "b"}\n')
    pairs = load_pairs(good)
    assert pairs.prompts == ["a", "b"] and pairs.images[1].name == "1.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "0.png", "prompt": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: expected a JSON object"):
        load_pairs(bad)
