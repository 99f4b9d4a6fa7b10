"""`sce demo`'s set-up and A/B examples (default encoder).

The set-up runs on a tiny stand-in for the sample corpus (12 generated images). The A/B
examples run on a slice of the real sample corpus: the emoji around the demo's queries and a
part of each concept set, copied with the same layout (``sample/``, ``concepts/``).
"""
from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_image

from indexing.collection import Collection
from indexing.correction_store import list_corrections
from indexing.shipped_data import shipped_data
from retrieval.concepts import load_concept_set
from retrieval.corrections import fit_concept_correction
from ui.cli_demo import (COLOURS, DEMO_CORRECTIONS, DEMO_METADATA_CORRECTIONS, DEMO_QUERIES, ensure_demo_collection,
                         show_ab_examples)

#: The emoji (caption without the tone) near the demo's queries: hands in every tone; people
#: dancing, running, walking, playing with a ball (default tone) of each gender; books.
HANDS = re.compile(r"thumbs (up|down) sign|pinching hand|call me hand|index pointing at the viewer|waving hand sign"
                   r"|ok hand sign")
PEOPLE = re.compile(r"dancer|(wo)?man dancing|runner|(wo)?man running|pedestrian|(wo)?man walking|handball"
                    r"|(wo)?man playing handball|person with ball|(wo)?man bouncing ball|mer(man|maid|person)")
BOOKS = re.compile(r"(green|blue|orange|closed|open) book|notebook|books")
GENDER_TRIPLES = 8  # the first triples (man, woman, person) of concepts/gender.csv


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    data = tmp_path / "data"
    rows = []
    for i in range(12):  # 4 things in 3 tones (the metadata correction pairs them)
        tone = ("light", "medium", "dark")[i % 3]
        make_image(data / "sample" / "images" / f"{i}.png", seed=i)
        rows.append({"file": f"images/{i}.png", "caption": f"thing {i // 3}, {tone} skin tone", "skin_tone": tone})
    with (data / "sample" / "captions.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "caption", "skin_tone"])
        w.writeheader()
        w.writerows(rows)
    (data / "concepts").mkdir()
    for _name, concept_file, _mode in DEMO_CORRECTIONS:
        with (data / "concepts" / concept_file).open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["prompt", "image"])
            w.writerows([f"value {i % 3}", f"../sample/images/{i}.png"] for i in range(9))
    return data


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _write(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def sample_slice(tmp_path_factory) -> Path:
    return copy_sample_slice(tmp_path_factory.mktemp("demo") / "data")


def copy_sample_slice(data: Path) -> Path:
    """A slice of the shipped sample corpus and concept sets (about 140 images), same layout."""
    source = shipped_data()
    fields, rows = _read(source / "sample" / "captions.csv")
    concepts = {name: _read(source / "concepts" / name) for _, name, _ in DEMO_CORRECTIONS}
    # and every image of the colour set, and the first triples of the gender set
    listed = {row["image"].removeprefix("../sample/")
              for row in concepts["colour.csv"][1] + concepts["gender.csv"][1][:3 * GENDER_TRIPLES]}
    chosen = [row for row in rows
              if (HANDS.fullmatch(row["object"]) and "," not in row["skin_tone"])
              or (PEOPLE.fullmatch(row["object"]) and not row["skin_tone"])
              or BOOKS.fullmatch(row["object"]) or row["file"] in listed]
    files = {row["file"] for row in chosen}
    for file in files:
        (data / "sample" / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "sample" / file, data / "sample" / file)
    _write(data / "sample" / "captions.csv", fields, chosen)
    for name, (concept_fields, concept_rows) in concepts.items():
        _write(data / "concepts" / name, concept_fields,
               [row for row in concept_rows if row["image"].removeprefix("../sample/") in files])
    return data


def test_demo_setup_fits_missing_and_stale_corrections_only(tiny_data, tmp_path):
    root = tmp_path / "demo"
    ensure_demo_collection(root, tiny_data, progress=False)
    with Collection.open(root) as coll:
        first = {c.name: c for c in list_corrections(coll)}
        assert set(first) == {name for name, *_ in DEMO_CORRECTIONS + DEMO_METADATA_CORRECTIONS}
        for name, field in DEMO_METADATA_CORRECTIONS:
            assert first[name].parameters["from_metadata"] == field and first[name].parameters["groups"] == 4
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
    for other, *_ in DEMO_CORRECTIONS[1:] + DEMO_METADATA_CORRECTIONS:
        assert after[other].created_at == first[other].created_at  # untouched


SHARES = re.compile(r"^'(?P<query>[^']+)' with (?P<correction>\S+): .* (?P<value>\S+) (?P<before>\d+)% -> "
                    r"(?P<after>\d+)% of the top (?P<k>\d+) \(overlap@(?P=k) (?P<overlap>[\d.]+)\)$", re.M)


def test_demo_examples_show_the_dominant_value_drop(sample_slice, tmp_path, capsys):
    root = tmp_path / "demo"
    ensure_demo_collection(root, sample_slice, progress=False)
    capsys.readouterr()
    with Collection.open(root) as coll:
        assert 100 < coll.info().items < 200
        show_ab_examples(coll, coll.load_encoder())
    printed = {m["correction"]: m for m in SHARES.finditer(capsys.readouterr().out)}
    assert set(printed) == {q.correction for q in DEMO_QUERIES}, printed
    expected_value = {"no-skin-tone": "dark", "no-gender": "woman", "no-colour": "green",
                      "no-skin-tone-in-context": "dark"}
    for example in DEMO_QUERIES:
        line = printed[example.correction]
        assert line["query"] == example.query
        assert line["value"] == expected_value[example.correction]  # the value the query names
        before, after = int(line["before"]), int(line["after"])
        assert before >= 50, line.group(0)  # the original results are dominated by it
        assert after <= before - 25, line.group(0)  # and the correction removes most of it
        assert float(line["overlap"]) < 1.0


def test_colour_words_are_the_colour_concept_sets_prompts():
    assert set(COLOURS) == set(load_concept_set(shipped_data("concepts", "colour.csv")).prompts)


def test_a_missing_sample_corpus_is_a_not_found_error(tmp_path):
    from sce_correct.errors import NotFoundError

    with pytest.raises(NotFoundError, match=r"the sample corpus is missing .*captions\.csv"):
        ensure_demo_collection(tmp_path / "coll", data_dir=tmp_path / "no-data", progress=False)
    assert not (tmp_path / "coll").exists()
