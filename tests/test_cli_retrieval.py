"""`sce correct`, `sce search --ab`, `sce index reindex`, `sce report`, `sce evaluate` through CliRunner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ToyEncoder, make_image, write_csv
from typer.testing import CliRunner

import indexing
from ui.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(indexing, "load_encoder", lambda spec, device=None: ToyEncoder(), raising=False)
    rows = []
    for i in range(24):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i)
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"item {i}", "tone": "dark" if i % 3 == 0 else ""})
    listing = tmp_path / "list.csv"
    write_csv(listing, rows, ["file", "caption", "tone"])
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(9)))
    coll = tmp_path / "coll"
    result = invoke("index", "build", listing, "-c", coll, "-q")
    assert result.exit_code == 0, result.output
    return tmp_path, coll, concept


def test_fit_ab_reindex_report(setup):
    tmp, coll, concept = setup
    r = invoke("correct", "fit", "--concept", concept, "--name", "no-tone", "--components", "2", "-c", coll, "-q")
    assert r.exit_code == 0, r.output
    assert "stored correction 'no-tone'" in r.output and "SCE score" in r.output and "image index" in r.output
    r = invoke("correct", "list", "-c", coll)
    assert "no-tone" in r.output and "t2i" in r.output
    r = invoke("correct", "show", "no-tone", "-c", coll)
    shown = json.loads(r.output)
    assert shown["parameters"]["n_components"] == 2 and shown["report"]["n"] == 9

    r = invoke("search", "--ab", "no-tone", "item 3", "-k", "5", "--attribute", "tone", "-c", coll)
    assert r.exit_code == 0, r.output
    assert "overlap@5" in r.output and "original" in r.output and "corrected (no-tone)" in r.output
    r = invoke("search", "--ab", "no-tone", "item 3", "-k", "5", "--json", "-c", coll)
    data = json.loads(r.output)
    assert len(data["original"]) == 5 and data["strategy"] == "query"

    r = invoke("index", "reindex", "--correction", "no-tone", "-c", coll, "-q")
    assert r.exit_code == 0, r.output
    assert "24 vectors" in r.output and "projection" in r.output
    r2 = invoke("search", "--ab", "no-tone", "item 3", "-k", "5", "--json", "-c", coll)
    after = json.loads(r2.output)
    assert after["strategy"] == "reindexed"
    assert [h["item_id"] for h in after["corrected"]] == [h["item_id"] for h in data["corrected"]]

    out = tmp / "rep"
    r = invoke("report", "--where", "tone=dark", "-c", coll, "--out", out, "--modes", "2", "--top", "3", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["score"]["n"] == 8 and len(report["schur_modes"]) == 2
    assert (out / "spectra.png").stat().st_size > 1000 and (out / "modes.png").stat().st_size > 1000


def test_clear_errors_and_nothing_changed(setup):
    tmp, coll, concept = setup
    bad = tmp / "bad.csv"
    bad.write_text("prompt,image\nred,imgs/000.png\n")
    r = invoke("correct", "fit", "--concept", bad, "--name", "x", "-c", coll)
    assert r.exit_code == 1 and "at least 4" in r.output and "Traceback" not in r.output
    r = invoke("correct", "fit", "--concept", concept, "--name", "bad name!", "-c", coll)
    assert r.exit_code == 1 and "invalid correction name" in r.output
    r = invoke("correct", "list", "-c", coll)
    assert "no corrections yet" in r.output
    r = invoke("search", "--ab", "missing", "hello", "-c", coll)
    assert r.exit_code == 1 and "no correction named 'missing'" in r.output
    r = invoke("index", "reindex", "--correction", "missing", "-c", coll)
    assert r.exit_code == 1 and "no correction named" in r.output
    r = invoke("report", "--where", "tone=none", "-c", coll)
    assert r.exit_code == 1 and "at least 2" in r.output


def test_evaluate_command(setup):
    tmp, coll, _ = setup
    prompts = tmp / "prompts.txt"
    prompts.write_text("red\nblue\n")
    gen = tmp / "gen"
    for line in range(2):
        for s in range(3):
            make_image(gen / f"{line}_{s}.png", seed=100 + 3 * line + s, size=(16, 16))
    r = invoke("evaluate", "--prompts", prompts, "--images", gen, "--reference", tmp / "imgs", "--out", tmp / "ev", "-q")
    assert r.exit_code == 0, r.output
    assert "CLIPScore" in r.output and "Frechet distance" in r.output and "KID" in r.output
    assert (tmp / "ev" / "evaluation.html").exists()
    r = invoke("evaluate", "--prompts", prompts, "--images", tmp / "imgs", "-q")
    assert r.exit_code == 1 and "refers to prompt line 2" in r.output and "Traceback" not in r.output
