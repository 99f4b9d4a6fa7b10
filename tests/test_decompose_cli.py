"""`sce decompose heads|ablate` (ui/cli_decompose.py, retrieval/heads.py) on a tiny random ViT.

The encoder is a tiny random open_clip VisionTransformer (as in tests/test_decomposition.py)
behind the same interface as emoji-vit's encoder (``visual``, ``preprocess_batch``), put in
place of ``indexing.load_encoder``. Its "text tower" maps each caption of the test collection
to its own image's embedding plus noise (other texts to seeded random vectors), so captions
find their images (R@10 well above chance) and ablating the whole tower must bring R@10 down
to chance. Independent computations: numpy variances of the decomposition's head terms, and
R@10 from the encoder's own image embeddings ranked with argsort.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import indexing  # noqa: E402
from conftest import make_image, write_csv  # noqa: E402
from indexing.encoders.decomposition import decompose  # noqa: E402
from indexing.encoders.encoder import Encoder  # noqa: E402
from ui.cli import app  # noqa: E402

runner = CliRunner()
N_IMAGES = 30
LAYERS, HEADS, DIM = 2, 3, 24


class TinyVitEncoder(Encoder):
    """emoji-vit's interface over a tiny random ViT (32 px, 2 layers x 3 heads, 24-d output)."""

    name = "tiny-vit"
    dim = DIM
    unit_norm = True

    def __init__(self, captions: dict[str, str] | None = None):
        torch.manual_seed(0)
        self.visual = VisionTransformer(image_size=32, patch_size=8, width=48, layers=LAYERS, heads=HEADS,
                                        mlp_ratio=2.0, output_dim=DIM).eval()
        with torch.no_grad():
            for param in self.visual.parameters():
                param.add_(0.2 * torch.randn_like(param))
        self.captions = captions or {}  # caption -> image path whose embedding it gets

    def preprocess(self, image):
        small = image.convert("RGB").resize((32, 32))
        return torch.from_numpy(np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5)

    def preprocess_batch(self, images):
        return torch.stack([self.load_and_preprocess(item) for item in images])

    def encode_image_batch(self, batch):
        with torch.no_grad():
            out = torch.nn.functional.normalize(self.visual(batch.float()), dim=-1)
        return out.numpy()

    def encode_texts(self, texts, batch_size=256, progress=False):
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
            noise = np.random.default_rng(seed).standard_normal(DIM)
            if text in self.captions:
                image = self.encode_images([self.captions[text]], num_workers=0)[0]
                rows.append(image + 0.05 * noise / np.linalg.norm(noise))
            else:
                rows.append(noise)
        out = np.asarray(rows, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def setup(tmp_path, monkeypatch):
    rows, captions = [], {}
    for i in range(N_IMAGES):
        path = make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i, size=(32, 32))
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"picture number {i}"})
        captions[f"picture number {i}"] = str(path)
    encoder = TinyVitEncoder(captions)
    real = indexing.load_encoder
    monkeypatch.setattr(indexing, "load_encoder",
                        lambda spec, device=None: encoder if spec in ("tiny-vit", "emoji-vit") else real(spec, device))
    listing = write_csv(tmp_path / "list.csv", rows, ["file", "caption"])
    coll = tmp_path / "coll"
    result = invoke("index", "build", listing, "-c", coll, "--encoder", "tiny-vit", "-q")
    assert result.exit_code == 0, result.output
    return tmp_path, coll, encoder


def test_heads_json_png_and_variances(setup):
    tmp, coll, encoder = setup
    bank = tmp / "bank.txt"
    bank.write_text("\n".join(f"text {j}" for j in range(40)) + "\n")
    out = tmp / "out"
    r = invoke("decompose", "heads", "-c", coll, "--encoder", "tiny-vit", "--bank", bank,
               "--components", "4", "--images", "20", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "heads.json").read_text())
    assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["images"] == 20 and len(report["entries"]) == LAYERS * HEADS
    assert {(e["layer"], e["head"]) for e in report["entries"]} == {(l, h) for l in range(LAYERS) for h in range(HEADS)}
    # Independently: decompose the same 20 images (their ids are in top_images' catalog) again.
    from indexing.collection import Collection

    opened = Collection.open(coll)
    try:
        catalog_ids = set(int(i) for i in opened.item_ids())
        records = opened.items(sorted(catalog_ids))
    finally:
        opened.close()
    bank_lines = [f"text {j}" for j in range(40)]
    bank_texts = set(bank_lines)
    sample_ids = set()
    for entry in report["entries"]:
        variances = [c["variance"] for c in entry["components"]]
        assert len(variances) == 4
        # Greedy TEXTSPAN does not make the variances non-increasing (a text's deflated
        # direction can explain more than its original one); what holds is checked below.
        assert all(v >= 0 for v in variances)
        assert sum(variances) <= entry["total_variance"] * (1 + 1e-9)
        assert all(c["text"] in bank_texts for c in entry["components"])
        assert len(entry["top_images"]) == 5
        for top in entry["top_images"]:
            assert top["item_id"] in catalog_ids and records[top["item_id"]].uri == top["uri"]
            sample_ids.add(top["item_id"])
    # the head's total variance against numpy on a fresh decomposition of the sampled images
    from retrieval.heads import sample_items

    opened = Collection.open(coll)
    try:
        sample = sample_items(opened, 20, 0)
    finally:
        opened.close()
    assert sample_ids <= set(int(i) for i in sample.ids)
    heads = decompose(encoder.visual, encoder.preprocess_batch(sample.paths)).heads
    for entry in report["entries"]:
        want = heads[:, entry["layer"], entry["head"]].var(axis=0).sum()
        assert entry["total_variance"] == pytest.approx(want, rel=1e-9)
        # the first pick is the bank text whose projected direction explains the most variance
        outputs = heads[:, entry["layer"], entry["head"]]
        basis = np.linalg.svd(outputs, full_matrices=False)[2][:min(DIM, len(outputs))].T
        projected = encoder.encode_texts(bank_lines).astype(np.float64) @ basis
        directions = projected / np.linalg.norm(projected, axis=1, keepdims=True)
        explained = ((outputs - outputs.mean(axis=0)) @ basis @ directions.T).var(axis=0)
        assert entry["components"][0]["text"] == bank_lines[int(np.argmax(explained))]
        assert entry["components"][0]["variance"] == pytest.approx(explained.max(), rel=1e-9)
        first = encoder.encode_texts([entry["components"][0]["text"]])[0].astype(np.float64)
        scores = heads[:, entry["layer"], entry["head"]] @ (first / np.linalg.norm(first))
        best = int(sample.ids[int(np.argmax(scores))])
        assert entry["top_images"][0]["item_id"] == best
    assert "L0 H0 (total variance" in r.output


def plain_recall(encoder, paths, captions, k=10):
    images = encoder.encode_images(paths, num_workers=0)
    texts = encoder.encode_texts(captions)
    order = np.argsort(-(texts @ images.T), axis=1)
    return float(np.mean([i in order[i, :k] for i in range(len(paths))]))


def test_ablate_curve(setup):
    tmp, coll, encoder = setup
    out = tmp / "out"
    r = invoke("decompose", "ablate", "-c", coll, "--encoder", "tiny-vit", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "ablate.json").read_text())
    from indexing.collection import Collection
    from retrieval.heads import sample_items

    opened = Collection.open(coll)
    try:
        sample = sample_items(opened, 500, 0, captioned=True)
    finally:
        opened.close()
    assert report["images"] == N_IMAGES
    plain = plain_recall(encoder, sample.paths, sample.captions)
    assert plain > 0.9  # the captions are made to find their images
    assert report["recall"] == pytest.approx(plain, abs=1e-12)
    curve = report["cumulative_layers"]
    assert [row["layers_ablated"] for row in curve] == list(range(LAYERS + 1))
    assert curve[0]["recall"] == pytest.approx(plain, abs=1e-12)
    assert curve[-1]["recall"] < plain  # every layer ablated: only the stem's 1/sigma is left
    assert report["all_terms_recall"] == pytest.approx(10 / N_IMAGES, abs=1e-9)  # stem too: chance
    assert len(report["single_heads"]) == LAYERS * HEADS
    assert all(isinstance(row["drop"], float) and -1 <= row["drop"] <= 1 for row in report["single_heads"])
    assert "layers ablated" in r.output


def test_recall_at_k_counts_ties_as_chance():
    from retrieval.heads import recall_at_k

    same = np.ones((40, 3))
    assert recall_at_k(same, same, k=10) == pytest.approx(10 / 40)
    eye = np.eye(12)
    assert recall_at_k(eye, eye, k=1) == 1.0


@pytest.mark.parametrize("args, message", [
    (["heads", "--bank", "MISSING"], "text bank not found"),
    (["heads", "--components", "0"], "--components must be at least 1"),
    (["heads", "--encoder", "default"], "exposes no ViT image tower to decompose"),
    (["ablate", "--encoder", "default"], "exposes no ViT image tower to decompose"),
    (["ablate", "--images", "1"], "--images must be at least 2"),
])
def test_bad_inputs_one_line(setup, args, message):
    tmp, coll, _ = setup
    args = [tmp / "missing.txt" if a == "MISSING" else a for a in args]
    r = invoke("decompose", *args, "-c", coll, "-q")
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output


@pytest.mark.parametrize("command", ["heads", "ablate"])
def test_a_bad_sample_size_is_refused_before_the_encoder_loads(setup, monkeypatch, command):
    import indexing

    tmp, coll, _ = setup

    def no_loading(*args, **kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(indexing, "load_encoder", no_loading)
    r = invoke("decompose", command, "--images", "0", "-c", coll, "-q")
    assert r.exit_code == 1 and r.output.strip() == "error: --images must be at least 2, got 0", r.output


def test_shipped_bank_is_rebuilt_identically(tmp_path):
    import importlib.util
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data"
    spec = importlib.util.spec_from_file_location("build_text_banks", data / "build_text_banks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path / "general.txt")]) == 0
    shipped = (data / "text_banks" / "general.txt").read_bytes()
    assert (tmp_path / "general.txt").read_bytes() == shipped
    from retrieval.heads import read_bank

    _, texts = read_bank(data / "text_banks" / "general.txt")
    assert len(texts) == len(set(texts)) > 500
    assert any("skin tone" in t for t in texts) and any("red" in t for t in texts)


def test_default_bank_is_the_shipped_general_bank(monkeypatch):
    from pathlib import Path

    import indexing.shipped_data as shipped
    from retrieval.heads import read_bank

    checkout = Path(__file__).resolve().parents[1] / "data"
    monkeypatch.setattr(shipped, "_package_root", lambda: checkout)  # this checkout's sce_data
    path, texts = read_bank(None)
    assert path == checkout / "text_banks" / "general.txt"
    assert texts == [line for line in path.read_text(encoding="utf-8").splitlines() if line]
