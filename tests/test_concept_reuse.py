"""Fitting a correction reuses the stored embeddings of concept images already in the collection."""
from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ToyEncoder, make_image, write_csv
from sqlalchemy import delete
from typer.testing import CliRunner

import indexing
from indexing.catalog import Embedding
from indexing.collection import Collection
from indexing.correction_store import load_correction
from indexing.pipeline import build_collection
from retrieval.concepts import load_concept_set
from retrieval.corrections import embed_images, encode_concept_set, file_sha256, fit_concept_correction


class CountingEncoder(ToyEncoder):
    """The toy encoder, recording every image path it is asked to encode."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded_paths: list[Path] = []

    def encode_images(self, images, batch_size: int = 64, num_workers: int = 0, progress: bool = False):
        images = list(images)
        self.encoded_paths.extend(Path(image) for image in images)
        return super().encode_images(images, batch_size, num_workers, progress)


@pytest.fixture
def setup(tmp_path: Path):
    """A 16-image collection and a 12-pair concept set: 6 indexed files, 2 copies of indexed
    files under other paths, 3 new files and 1 indexed path whose content changed since."""
    rows = []
    for i in range(16):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i)
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"item {i}"})
    listing = tmp_path / "list.csv"
    write_csv(listing, rows, ["file", "caption"])
    build_collection(listing, tmp_path / "coll", encoder=ToyEncoder(), progress=False)

    shutil.copy(tmp_path / "imgs" / "006.png", tmp_path / "elsewhere-a.png")   # same content, other path
    shutil.copy(tmp_path / "imgs" / "007.png", tmp_path / "elsewhere-b.png")
    new = [make_image(tmp_path / "new" / f"n{i}.png", seed=500 + i) for i in range(3)]
    make_image(tmp_path / "imgs" / "015.png", seed=999)                          # changed after indexing
    images = ([f"imgs/{i:03d}.png" for i in range(6)] + ["elsewhere-a.png", "elsewhere-b.png"]
              + [str(p.relative_to(tmp_path)) for p in new] + ["imgs/015.png"])
    concept = tmp_path / "concept.csv"
    with concept.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "image"])
        writer.writerows([f"tone {i % 3}", image] for i, image in enumerate(images))
    expected_encoded = {p.resolve() for p in new} | {(tmp_path / "imgs" / "015.png").resolve()}
    return tmp_path / "coll", load_concept_set(concept), expected_encoded


def _corrector_arrays(coll, name):
    stored = load_correction(coll, name)
    corr = stored.corrector
    k = stored.info.parameters["n_components"]
    return {"gamma": corr.gamma_, "eigvals": corr.explained_eigvals_,
            "projection": corr.projection(n_components=k, mode=stored.info.parameters["mode"]),
            "concept_vector": np.asarray(stored.info.parameters["concept_vector"]),
            "report": np.asarray([stored.info.report[key] for key in ("image_diversity", "text_diversity",
                                                                        "image_share", "text_share")])}


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_reuse_gives_the_same_correction_and_encodes_only_new_content(setup, direction, caplog):
    coll_dir, concept, expected_encoded = setup
    with Collection.open(coll_dir) as coll:
        reusing, everything = CountingEncoder(), CountingEncoder()
        with caplog.at_level(logging.INFO, logger="retrieval.corrections"):
            res = fit_concept_correction(coll, reusing, concept, name="reused", direction=direction, n_components=2)
        fresh = fit_concept_correction(coll, everything, concept, name="fresh", direction=direction,
                                       n_components=2, reuse_stored=False)
        # (b) only the 4 files whose content is not in the collection were encoded.
        assert set(reusing.encoded_paths) == expected_encoded and len(reusing.encoded_paths) == 4
        assert (res.images_reused, res.images_encoded) == (8, 4)
        assert len(everything.encoded_paths) == 12 and (fresh.images_reused, fresh.images_encoded) == (0, 12)
        assert "8 of 12 concept images reused from the collection's stored embeddings, 4 encoded" in caplog.text
        # (a) the stored correctors agree.
        a, b = _corrector_arrays(coll, "reused"), _corrector_arrays(coll, "fresh")
        for key in a:
            assert np.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key


def test_changed_file_at_an_indexed_path_is_encoded_not_reused(setup):
    """(c) matching is by content: imgs/015.png is a catalog item's path, but its bytes changed."""
    coll_dir, concept, _ = setup
    changed = next(p for p in concept.images if p.name == "015.png")
    with Collection.open(coll_dir) as coll:
        item = next(r for r in coll.items(coll.item_ids()).values() if r.uri.endswith("015.png"))
        assert item.sha256 != file_sha256(changed)
        old_vector = coll.embeddings.get("image", [item.id])[0]
        enc = CountingEncoder()
        out = embed_images(enc, [changed], coll)
        assert (out.reused, out.encoded) == (0, 1) and enc.encoded_paths == [changed]
        assert np.allclose(out.vectors[0], ToyEncoder().encode_images([changed])[0])
        assert not np.allclose(out.vectors[0], old_vector)


def test_reused_vectors_are_what_the_encoder_gives(setup):
    coll_dir, concept, expected_encoded = setup
    with Collection.open(coll_dir) as coll:
        src, tgt = encode_concept_set(CountingEncoder(), concept, "t2i", collection=coll)
        src0, tgt0 = encode_concept_set(CountingEncoder(), concept, "t2i")
        assert tgt.dtype == np.float32 and tgt.shape == (12, 16)
        np.testing.assert_allclose(tgt, tgt0, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(src, src0)


def test_item_without_stored_vector_and_repeated_files(setup):
    """An item whose stored vector is gone is encoded; a file listed twice is encoded once."""
    coll_dir, concept, _ = setup
    with Collection.open(coll_dir) as coll:
        first = concept.images[0]
        item_id = coll.find_sha256([file_sha256(first)])[file_sha256(first)][0]
        with coll.catalog.sessions.begin() as session:
            session.execute(delete(Embedding).where(Embedding.kind == "image", Embedding.item_id == item_id))
        new = next(p for p in concept.images if p.parent.name == "new")
        enc = CountingEncoder()
        out = embed_images(enc, [first, new, new, concept.images[1]], coll)
        assert (out.reused, out.encoded) == (1, 2) and enc.encoded_paths == [first, new]
        np.testing.assert_array_equal(out.vectors[1], out.vectors[2])


def test_cli_fit_reports_reuse_and_no_reuse(setup, monkeypatch):
    coll_dir, concept, _ = setup
    monkeypatch.setattr(indexing, "load_encoder", lambda spec, device=None: ToyEncoder(), raising=False)
    from ui.cli import app

    runner = CliRunner()
    base = ["correct", "fit", "--concept", str(concept.source), "--components", "2", "-c", str(coll_dir), "-q"]
    result = runner.invoke(app, base + ["--name", "a"])
    assert result.exit_code == 0, result.output
    assert "concept images: 8 stored embeddings reused, 4 encoded" in result.output
    result = runner.invoke(app, base + ["--name", "b", "--no-reuse"])
    assert result.exit_code == 0, result.output
    assert "concept images: 0 stored embeddings reused, 12 encoded" in result.output
