"""`sce demo`'s set-up on a tiny stand-in for the sample corpus (default encoder, 12 images)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import make_image

from indexing.collection import Collection
from indexing.correction_store import list_corrections
from retrieval.concepts import load_concept_set
from retrieval.corrections import fit_concept_correction
from ui.cli_demo import DEMO_CORRECTIONS, ensure_demo_collection


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    data = tmp_path / "data"
    rows = []
    for i in range(12):
        make_image(data / "sample" / "images" / f"{i}.png", seed=i)
        rows.append({"file": f"images/{i}.png", "caption": f"thing {i}"})
    with (data / "sample" / "captions.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "caption"])
        w.writeheader()
        w.writerows(rows)
    (data / "concepts").mkdir()
    for _name, concept_file, _mode in DEMO_CORRECTIONS:
        with (data / "concepts" / concept_file).open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["prompt", "image"])
            w.writerows([f"value {i % 3}", f"../sample/images/{i}.png"] for i in range(9))
    return data


def test_demo_setup_fits_missing_and_stale_corrections_only(tiny_data, tmp_path):
    root = tmp_path / "demo"
    ensure_demo_collection(root, tiny_data, progress=False)
    with Collection.open(root) as coll:
        first = {c.name: c for c in list_corrections(coll)}
        assert set(first) == {name for name, *_ in DEMO_CORRECTIONS}
        assert all(c.parameters["center"] for c in first.values())
        assert coll.info().items == 12
        # An older demo's fit: uncentred. The next run must fit it again, and only it.
        name, concept_file, _ = DEMO_CORRECTIONS[0]
        encoder = coll.load_encoder()
        fit_concept_correction(coll, encoder, load_concept_set(tiny_data / "concepts" / concept_file),
                               name=name, center=False, replace=True)
    ensure_demo_collection(root, tiny_data, progress=False)
    with Collection.open(root) as coll:
        after = {c.name: c for c in list_corrections(coll)}
    assert after[name].parameters["center"] is True
    for other, *_ in DEMO_CORRECTIONS[1:]:
        assert after[other].created_at == first[other].created_at  # untouched
