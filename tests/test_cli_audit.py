"""Bad input found by an audit of the command line: each case is one exact error line, exit 1.

Through CliRunner with the toy encoder of conftest.py (as tests/test_errors.py does), so no
model loads. Each test also checks that nothing was written where the command was refused.
"""
from __future__ import annotations

import pytest
from conftest import ToyEncoder, make_image, write_csv
from typer.testing import CliRunner

import indexing
from ui.cli import app
from ui.cli_index import USER_ERROR_EXIT

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "NO_COLOR": "1"})


def the_error(result) -> str:
    """The one line a refused command printed (exit 1, no traceback, nothing else)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == USER_ERROR_EXIT, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """12 indexed images with captions, a concept set of 9 pairs over 3 prompts, a file and a folder."""
    monkeypatch.setattr(indexing, "load_encoder", lambda spec, device=None: ToyEncoder(), raising=False)
    rows = []
    for i in range(12):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i)
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"item {i}", "tone": "dark" if i % 3 == 0 else "light"})
    write_csv(tmp_path / "list.csv", rows, ["file", "caption", "tone"])
    (tmp_path / "concept.csv").write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n"
                                                                     for i in range(9)))
    (tmp_path / "pairs.csv").write_text("image,prompt\n" + "".join(f"imgs/{i:03d}.png,item {i}\n" for i in range(4)))
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "a-folder").mkdir()
    coll = tmp_path / "coll"
    result = invoke("index", "build", tmp_path / "list.csv", "-c", coll, "-q")
    assert result.exit_code == 0, result.output
    return tmp_path, coll


# -- a folder given for a file (or a file for a folder) is not "not found" -----------------------
def test_a_concept_file_that_is_a_folder(setup):
    tmp, coll = setup
    result = invoke("correct", "fit", "--name", "x", "--concept", tmp / "a-folder", "-c", coll, "-q")
    assert the_error(result) == f"error: concept file {tmp / 'a-folder'} is a folder, not a file"


def test_a_source_texts_file_that_is_a_folder(setup):
    tmp, coll = setup
    (tmp / "t.txt").write_text("a\nb\nc\nd\n")
    result = invoke("correct", "fit", "--name", "x", "--direction", "t2t", "--source-texts", tmp / "a-folder",
                    "--target-texts", tmp / "t.txt", "-c", coll, "-q")
    assert the_error(result) == f"error: text file {tmp / 'a-folder'} is a folder, not a file"


def test_a_missing_concept_file_is_still_not_found(setup):
    tmp, coll = setup
    result = invoke("correct", "fit", "--name", "x", "--concept", tmp / "nope.csv", "-c", coll, "-q")
    assert the_error(result) == f"error: concept file not found: {tmp / 'nope.csv'}"


def test_an_evaluate_reference_that_is_a_file(setup):
    tmp, _ = setup
    result = invoke("evaluate", "--prompts", tmp / "pairs.csv", "--reference", tmp / "a-file", "--out", tmp / "ev", "-q")
    assert the_error(result) == f"error: reference folder {tmp / 'a-file'} is a file, not a folder"
    assert not (tmp / "ev").exists()


def test_prompts_that_are_a_folder_and_images_that_are_a_file(setup):
    tmp, _ = setup
    result = invoke("evaluate", "--prompts", tmp / "a-folder", "--out", tmp / "ev", "-q")
    assert the_error(result) == f"error: prompts file {tmp / 'a-folder'} is a folder, not a file"
    (tmp / "p.txt").write_text("a\nb\n")
    result = invoke("report", "--prompts", tmp / "p.txt", "--images", tmp / "a-file", "--out", tmp / "rep", "-q")
    assert the_error(result) == f"error: image folder {tmp / 'a-file'} is a file, not a folder"
    assert not (tmp / "ev").exists() and not (tmp / "rep").exists()


# -- a collection path (or --index-dir) that is a file -----------------------------------------
@pytest.mark.parametrize("command", [["index", "info"], ["search", "item 1"], ["correct", "list"],
                                     ["index", "gc", "--dry-run"]])
def test_a_collection_that_is_a_file(setup, command):
    tmp, _ = setup
    result = invoke(*command, "-c", tmp / "a-file")
    assert the_error(result) == f"error: collection {tmp / 'a-file'} is a file, not a folder"


def test_building_into_a_file_or_with_an_index_dir_that_is_a_file(setup):
    tmp, _ = setup
    result = invoke("index", "build", tmp / "list.csv", "-c", tmp / "a-file", "-q")
    assert the_error(result) == f"error: collection {tmp / 'a-file'} is a file, not a folder"
    result = invoke("index", "build", tmp / "list.csv", "-c", tmp / "new", "--index-dir", tmp / "a-file", "-q")
    assert the_error(result) == f"error: index folder {tmp / 'a-file'} is a file, not a folder"
    assert not (tmp / "new").exists()  # refused before a catalog or an embedding was written
    assert (tmp / "a-file").read_text() == "not a folder\n"


# -- an output folder that is a file: refused before the work, not after it ------------------------
def test_report_and_evaluate_out_that_is_a_file(setup):
    tmp, coll = setup
    result = invoke("report", "--where", "tone=dark", "--out", tmp / "a-file", "-c", coll, "-q")
    assert the_error(result) == f"error: --out {tmp / 'a-file'} is a file, not a folder"
    # evaluate printed its whole summary, then 'error: File exists: ...'
    result = invoke("evaluate", "--prompts", tmp / "pairs.csv", "--out", tmp / "a-file", "-q")
    assert the_error(result) == f"error: --out {tmp / 'a-file'} is a file, not a folder"
    result = invoke("evaluate", "--prompts", tmp / "pairs.csv", "--out", tmp / "a-file" / "ev", "-q")
    assert the_error(result) == f"error: --out {tmp / 'a-file' / 'ev'}: {tmp / 'a-file'} is a file, not a folder"
    assert (tmp / "a-file").read_text() == "not a folder\n"


@pytest.mark.parametrize("command", ["heads", "ablate"])
def test_decompose_out_that_is_a_file(setup, command):
    tmp, coll = setup  # refused before the encoder loads (the toy encoder has no ViT tower)
    result = invoke("decompose", command, "-c", coll, "--out", tmp / "a-file", "-q")
    assert the_error(result) == f"error: --out {tmp / 'a-file'} is a file, not a folder"


def test_export_under_a_file(setup):
    tmp, coll = setup
    result = invoke("index", "export", tmp / "a-file" / "out", "-c", coll, "-q")
    # was 'error: <tmp>/a-file does not exist'
    assert the_error(result) == (f"error: export folder {tmp / 'a-file' / 'out'}: {tmp / 'a-file'} "
                                 "is a file, not a folder")
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []


# -- search: query vectors that are not, and options that do nothing --------------------------------
def test_search_vector_that_is_not_a_npy_file(setup):
    tmp, coll = setup
    import numpy as np

    result = invoke("search", "--vector", tmp / "a-file", "-c", coll)
    # was numpy's advice on unpickling: 'This file contains pickled (object) data. If you trust the file ...'
    assert the_error(result) == f"error: --vector {tmp / 'a-file'}: not a .npy file (saved by numpy.save)"
    result = invoke("search", "--vector", tmp / "a-folder", "-c", coll)
    assert the_error(result) == f"error: --vector {tmp / 'a-folder'} is a folder, not a .npy file"
    rows = np.ones((3, 16), dtype=np.float32)
    rows[1] = 0.0
    np.save(tmp / "q.npy", rows)  # an all-zero row scored every item 0.000 and listed the first ids
    result = invoke("search", "--vector", tmp / "q.npy", "-c", coll)
    assert the_error(result) == f"error: --vector {tmp / 'q.npy'}: row 1 is all zeros (no direction to search)"


def test_an_image_root_that_is_not_a_folder_is_refused_even_with_absolute_paths(setup):
    tmp, _ = setup
    listing = tmp / "absolute.csv"
    listing.write_text("file,caption\n" + "".join(f"{tmp / 'imgs' / f'{i:03d}.png'},item {i}\n" for i in range(3)))
    result = invoke("index", "build", listing, "-c", tmp / "new-coll", "--image-root", tmp / "a-file", "-q")
    # was accepted silently: no path in the table is relative, so the root was never used
    assert the_error(result) == f"error: image root {tmp / 'a-file'} is a file, not a folder"
    result = invoke("index", "build", listing, "-c", tmp / "new-coll", "--image-root", tmp / "nowhere", "-q")
    assert the_error(result) == f"error: image root not found: {tmp / 'nowhere'}"
    assert not (tmp / "new-coll" / "catalog.sqlite").exists()


def test_search_image_that_is_a_folder(setup):
    tmp, coll = setup
    result = invoke("search", "--image", tmp / "a-folder", "-c", coll)
    # was "cannot read image '...': IsADirectoryError: [Errno 21] Is a directory: '...'"
    assert the_error(result) == f"error: cannot read image {str(tmp / 'a-folder')!r}: a folder, not an image file"


def test_search_options_that_need_a_correction_are_refused(setup):
    tmp, coll = setup
    assert invoke("correct", "fit", "--name", "c1", "--concept", tmp / "concept.csv", "--components", "1",
                  "-c", coll, "-q").exit_code == 0
    cases = {  # each printed plain results with the option ignored
        ("--strategy", "negative"): "error: --strategy negative chooses how a correction is applied: "
                                    "give --correction NAME or --ab NAME",
        ("--negative-weight", "2"): "error: --negative-weight is the a of --strategy negative (q - a * concept)",
        ("--correction", "c1", "--negative-weight", "2"):
            "error: --negative-weight is the a of --strategy negative (q - a * concept)",
        ("--attribute", "tone"): "error: --attribute measures the results of an A/B comparison: it needs --ab NAME",
        # printed 'share of results with nosuch: 0.00 -> 0.00'
        ("--ab", "c1", "--attribute", "nosuch"):
            f"error: --attribute nosuch: no item of {coll} sets this metadata field",
    }
    for options, line in cases.items():
        assert the_error(invoke("search", "item 3", *options, "-k", "3", "-c", coll)) == line, options
    ok = invoke("search", "item 3", "--ab", "c1", "--attribute", "tone", "-k", "3", "-c", coll)
    assert ok.exit_code == 0 and "share of results with tone" in ok.output, ok.output
    ok = invoke("search", "item 3", "--correction", "c1", "--strategy", "negative", "--negative-weight", "2",
                "-k", "3", "-c", coll)
    assert ok.exit_code == 0, ok.output


def test_texts_given_for_an_image_correction_name_their_file(setup):
    tmp, coll = setup
    (tmp / "s.txt").write_text("a\nb\nc\nd\n")
    (tmp / "t.txt").write_text("w\nx\ny\nz\n")
    result = invoke("correct", "fit", "--name", "x", "--direction", "t2i", "--source-texts", tmp / "s.txt",
                    "--target-texts", tmp / "t.txt", "-c", coll, "-q")
    # was 'a t2i correction needs prompt/image pairs; . pairs texts'
    assert the_error(result) == f"error: a t2i correction needs prompt/image pairs; {tmp / 's.txt'} pairs texts"

