"""The command line's error boundary and the numeric options it refuses, through CliRunner.

A user's mistake (an SceError) or an OS error about the user's files prints one line and
exits 1; any other exception is a bug: one line that says so (exit 70), and `sce --debug`
shows the traceback. Out-of-range numbers are refused by the library layer with one line.
"""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from conftest import ToyEncoder, make_image, write_csv
from typer.testing import CliRunner

import indexing
from indexing.collection import Collection
from indexing.correction_store import list_corrections
from ui.cli import app
from ui.cli_index import BUG_EXIT, USER_ERROR_EXIT

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def assert_one_line(result, *fragments: str, exit_code: int = USER_ERROR_EXIT) -> str:
    lines = error_lines(result)
    assert result.exit_code == exit_code, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output
    return lines[0]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """24 indexed images, a concept set of 9 pairs over 3 prompts (centred: 2 directions)."""
    monkeypatch.setattr(indexing, "load_encoder", lambda spec, device=None: ToyEncoder(), raising=False)
    rows = []
    for i in range(24):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i)
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"item {i}", "tone": "dark" if i % 3 == 0 else ""})
    write_csv(tmp_path / "list.csv", rows, ["file", "caption", "tone"])
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(9)))
    coll = tmp_path / "coll"
    result = invoke("index", "build", tmp_path / "list.csv", "-c", coll, "-q")
    assert result.exit_code == 0, result.output
    return tmp_path, coll, concept


def fit(coll, concept, *options, name="c1"):
    return invoke("correct", "fit", "--concept", concept, "--name", name, "-c", coll, "-q", *options)


# ------------------------------------------------------------------------------ the boundary
def test_a_users_mistake_prints_one_line(setup):
    tmp, coll, _ = setup
    assert_one_line(invoke("search", "-c", coll), "give a text query or --image PATH")
    assert_one_line(invoke("search", "--image", tmp / "nope.png", "-c", coll), "nope.png")
    assert_one_line(invoke("index", "info", "-c", tmp / "nowhere"), "no collection")


def test_an_os_error_about_the_users_files_prints_one_line(setup, monkeypatch):
    tmp, coll, _ = setup

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(coll / "catalog.sqlite"))

    monkeypatch.setattr(Collection, "open", denied)
    line = assert_one_line(invoke("index", "info", "-c", coll))
    assert line == f"error: Permission denied: {coll / 'catalog.sqlite'}"


def test_a_bug_says_so_in_one_line_and_debug_shows_the_traceback(setup, monkeypatch):
    import retrieval.search

    _, coll, _ = setup

    levels = []

    def broken(self, *args, **kwargs):
        levels.append(logging.getLogger("retrieval.search").getEffectiveLevel())
        return 1 / 0

    monkeypatch.setattr(retrieval.search.Retriever, "search", broken)
    line = assert_one_line(invoke("search", "a query", "-c", coll), exit_code=BUG_EXIT)
    assert "internal error (a bug" in line and "ZeroDivisionError: division by zero" in line
    assert "--debug" in line

    debug = invoke("--debug", "search", "a query", "-c", coll)
    assert debug.exit_code == BUG_EXIT
    assert levels[0] > logging.DEBUG and levels[1] == logging.DEBUG  # --debug logs at DEBUG
    assert invoke("search", "a query", "-c", coll).exit_code == BUG_EXIT
    assert levels[2] == levels[0]  # the next command without --debug logs as before
    assert "Traceback (most recent call last)" in debug.output
    assert "return 1 / 0" in debug.output  # the failing line of the traceback
    assert debug.output.strip().splitlines()[-1].startswith("error: internal error (a bug")


def test_debug_shows_the_traceback_of_a_users_mistake_too(setup):
    _, coll, _ = setup
    plain = invoke("search", "-c", coll)
    debug = invoke("--debug", "search", "-c", coll)
    assert plain.exit_code == debug.exit_code == USER_ERROR_EXIT
    assert "Traceback" in debug.output and "InputError" in debug.output
    assert debug.output.strip().splitlines()[-1] == error_lines(plain)[0]


def test_keyboard_interrupt_exits_130(setup, monkeypatch):
    _, coll, _ = setup

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Collection, "open", interrupted)
    result = invoke("index", "info", "-c", coll)
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------- numeric options out of range
@pytest.mark.parametrize("strength", ["1e308", "-1e300", "inf", "-inf", "nan"])
def test_a_strength_that_overflows_or_is_not_a_number_is_refused(setup, strength):
    _, coll, concept = setup
    assert_one_line(fit(coll, concept, "--strength", strength), "strength")
    with Collection.open(coll) as opened:
        assert list_corrections(opened) == []


@pytest.mark.parametrize("ridge", ["inf", "1e308"])
def test_a_ridge_that_is_infinite_or_swamps_everything_is_refused(setup, ridge):
    _, coll, concept = setup
    assert_one_line(fit(coll, concept, "--ridge", ridge), "ridge must be a number between 0 and 1e+100")
    with Collection.open(coll) as opened:
        assert list_corrections(opened) == []


def test_a_large_but_usable_strength_is_accepted(setup):
    _, coll, concept = setup
    result = fit(coll, concept, "--strength", "1000")
    assert result.exit_code == 0, result.output


def test_more_components_than_the_concept_has_directions_is_refused(setup):
    _, coll, concept = setup
    # 3 distinct prompts, centred: the concept has 2 directions in the 16-d space.
    for components in ("3", "16"):
        line = assert_one_line(fit(coll, concept, "--components", components), "n_components")
        assert "between 1 and 2" in line and "2 direction(s)" in line
    with Collection.open(coll) as opened:
        assert list_corrections(opened) == []
    assert fit(coll, concept, "--components", "2").exit_code == 0


def test_energy_with_components_is_refused(setup):
    _, coll, concept = setup
    assert_one_line(fit(coll, concept, "--components", "1", "--energy", "0.5"), "--components", "--energy", "not both")
    with Collection.open(coll) as opened:
        assert list_corrections(opened) == []


@pytest.mark.parametrize("option", ["--ridge", "--energy"])
def test_nan_for_a_ranged_fit_option_is_a_usage_error(setup, option):
    _, coll, concept = setup
    result = fit(coll, concept, option, "nan")  # typer's range check refuses NaN before any work
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert "Traceback" not in result.output
    with Collection.open(coll) as opened:
        assert list_corrections(opened) == []


@pytest.mark.parametrize("parameter", ["ridge", "energy", "strength"])
def test_nan_for_a_fit_parameter_is_refused_by_the_library(setup, parameter):
    from retrieval.concepts import load_concept_set
    from retrieval.corrections import fit_concept_correction
    from sce_correct import InputError

    _, coll, concept = setup
    with Collection.open(coll) as opened:
        with pytest.raises(InputError, match=parameter):
            fit_concept_correction(opened, ToyEncoder(), load_concept_set(concept), name="c1",
                                   **{parameter: float("nan")})
        assert list_corrections(opened) == []


def test_nan_negative_weight_is_refused(setup):
    _, coll, concept = setup
    assert fit(coll, concept, "--components", "2").exit_code == 0
    for extra in (["--correction", "c1"], ["--ab", "c1"]):
        result = invoke("search", "item 3", *extra, "--strategy", "negative", "--negative-weight", "nan", "-c", coll)
        assert_one_line(result, "weight", "finite")


def test_a_report_with_nan_sigma_is_refused(setup):
    tmp, coll, _ = setup
    result = invoke("report", "--where", "tone=dark", "--kernel", "gaussian", "--sigma", "nan",
                    "--out", tmp / "rep", "-c", coll, "-q")
    assert_one_line(result, "sigma")
    assert not (tmp / "rep" / "report.json").exists()


@pytest.mark.parametrize("ab", [False, True])
def test_a_k_too_large_to_allocate_returns_the_whole_index(setup, ab):
    _, coll, concept = setup
    assert fit(coll, concept, "--components", "2").exit_code == 0
    huge = str(10**30)  # k floats of scores would not fit in any memory
    extra = ["--ab", "c1"] if ab else ["--correction", "c1", "--strategy", "query"]
    result = invoke("search", "item 3", "-k", huge, *extra, "--json", "-c", coll)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    if ab:
        assert len(data["original"]) == len(data["corrected"]) == 24
        assert data["k"] == 24 and math.isclose(data["overlap_at_k"], 1.0)  # the same 24 items, re-ranked
    else:
        assert len(data["hits"]) == 24 and sorted(h["id"] for h in data["hits"]) == list(range(1, 25))
    plain = json.loads(invoke("search", "item 3", "-k", huge, "--json", "-c", coll).output)["hits"]
    scores = [h["score"] for h in plain]
    assert len(plain) == 24 and scores == sorted(scores, reverse=True) and np.isfinite(scores).all()


def test_an_output_folder_under_a_file_is_one_line(setup):
    tmp, coll, _ = setup
    (tmp / "a-file").write_text("not a folder")
    result = invoke("report", "--where", "tone=dark", "--out", tmp / "a-file" / "rep", "-c", coll, "-q")
    line = assert_one_line(result, "a-file")
    assert line == f"error: --out {tmp / 'a-file' / 'rep'}: {tmp / 'a-file'} is a file, not a folder", line


def test_report_limit_with_prompts_is_one_line(setup):
    tmp, coll, _ = setup
    pairs = tmp / "pairs.csv"
    pairs.write_text("image,prompt\n" + "".join(f"imgs/{i:03d}.png,item {i}\n" for i in range(3)))
    result = invoke("report", "--prompts", pairs, "--limit", "2", "--out", tmp / "rep", "-q")
    assert_one_line(result, "3 pairs but --limit 2")
    assert not (tmp / "rep").exists()
