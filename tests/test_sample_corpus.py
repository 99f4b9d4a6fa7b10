"""The committed sample corpus (data/sample) and concept sets (data/concepts) are consistent.

Fast and offline: reads the committed files only.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from indexing.tables import read_table

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLE = DATA / "sample"
CONCEPTS = DATA / "concepts"
TONES = ["light", "medium-light", "medium", "medium-dark", "dark"]
REQUIRED_COLUMNS = {"file", "caption", "object", "category", "subcategory", "skin_tone",
                    "unified", "short_name", "gender", "variant", "base_unified", "sha256"}

EXPECTED_PROMPTS = {
    "skin_tone": {f"{t} skin tone" for t in TONES},
    "gender": {"a man", "a woman", "a person"},
    "colour": {"red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white"},
}


def read_csv(path: Path) -> list[dict]:
    """Rows through the product's one table reader (so a malformed committed row fails here)."""
    return [row.values for row in read_table(path).rows()]


@pytest.fixture(scope="module")
def captions() -> list[dict]:
    return read_csv(SAMPLE / "captions.csv")


@pytest.fixture(scope="module")
def by_file(captions) -> dict[str, dict]:
    return {r["file"]: r for r in captions}


def test_captions_columns_and_size(captions):
    assert REQUIRED_COLUMNS <= set(captions[0])
    assert len(captions) > 3000
    files = [r["file"] for r in captions]
    assert len(set(files)) == len(files)
    assert len({r["caption"] for r in captions}) == len(captions)


def test_every_row_is_a_64px_rgb_image_on_white(captions):
    on_disk = {p.name for p in (SAMPLE / "images").iterdir()}
    assert on_disk == {Path(r["file"]).name for r in captions}
    for r in captions:
        path = SAMPLE / r["file"]
        with Image.open(path) as im:
            assert im.format == "PNG", r["file"]
            assert im.size == (64, 64), r["file"]
            assert im.mode == "RGB", (r["file"], im.mode)  # no alpha channel left
            assert "transparency" not in im.info, r["file"]


def test_captions_are_lower_case(captions):
    for r in captions:
        assert r["caption"] and r["caption"] == r["caption"].lower(), r["caption"]
        assert r["object"] == r["object"].lower()


def test_skin_tone_rows_share_the_object_of_their_base(captions):
    base_caption = {r["unified"]: r["caption"] for r in captions if not r["variant"]}
    n_variants = 0
    for r in captions:
        if not r["variant"]:
            assert r["skin_tone"] == "" and r["object"] == r["caption"]
            continue
        n_variants += 1
        assert r["object"] == base_caption[r["base_unified"]], r["file"]
        tones = r["skin_tone"].split(", ")
        assert all(t in TONES for t in tones), r["skin_tone"]
        assert r["caption"] == r["object"] + "".join(f", {t} skin tone" for t in tones)
    assert n_variants > 1000


def test_license_notice_present():
    text = (SAMPLE / "LICENSE-NOTICE.txt").read_text(encoding="utf-8")
    assert "emoji-datasource-google@16.0.0" in text
    assert "MIT" in text and "Apache License" in text


@pytest.mark.parametrize("name", sorted(EXPECTED_PROMPTS))
def test_concept_set_parses_and_points_at_corpus_images(name, by_file):
    path = CONCEPTS / f"{name}.csv"
    rows = read_csv(path)
    assert rows and set(rows[0]) == {"prompt", "image"}
    assert {r["prompt"] for r in rows} == EXPECTED_PROMPTS[name]
    for r in rows:
        img = (path.parent / r["image"]).resolve()
        assert img.is_file(), r["image"]
        rel = img.relative_to(SAMPLE.resolve()).as_posix()
        assert rel in by_file, rel
        if name != "skin_tone":
            assert by_file[rel]["skin_tone"] == "", rel  # default images only
    assert len({r["image"] for r in rows}) == len(rows)


def test_skin_tone_set_has_every_object_in_all_five_tones(by_file):
    rows = read_csv(CONCEPTS / "skin_tone.csv")
    tones_of = defaultdict(set)
    for r in rows:
        row = by_file[(CONCEPTS / r["image"]).resolve().relative_to(SAMPLE.resolve()).as_posix()]
        assert r["prompt"] == f"{row['skin_tone']} skin tone"  # single tone matching the prompt
        tones_of[row["object"]].add(row["skin_tone"])
    assert len(tones_of) >= 30
    for obj, tones in tones_of.items():
        assert tones == set(TONES), obj


def test_gender_set_is_made_of_triples(by_file):
    rows = read_csv(CONCEPTS / "gender.csv")
    assert len(rows) % 3 == 0 and len(rows) // 3 >= 20
    for i in range(0, len(rows), 3):
        assert [r["prompt"] for r in rows[i:i + 3]] == ["a man", "a woman", "a person"]
        genders = [by_file[(CONCEPTS / r["image"]).resolve().relative_to(SAMPLE.resolve())
                           .as_posix()]["gender"] for r in rows[i:i + 3]]
        assert genders == ["man", "woman", "person"]
