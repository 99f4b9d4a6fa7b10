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
    assert [h["id"] for h in after["corrected"]] == [h["id"] for h in data["corrected"]]

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


def test_search_nprobe_reaches_every_strategy(tmp_path, monkeypatch):
    """An IVF8 collection: `--nprobe 8` is exhaustive (the library's brute-force-equal result)
    with --correction and --ab as well as plain; `--nprobe 1` gives the library's nprobe=1 result."""
    from indexing.collection import Collection
    from retrieval.compare import compare
    from retrieval.search import Retriever

    monkeypatch.setattr(indexing, "load_encoder", lambda spec, device=None: ToyEncoder(), raising=False)
    for i in range(300):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=2000 + i, size=(8, 8))
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(12)))
    coll = tmp_path / "coll"
    assert invoke("index", "build", tmp_path / "imgs", "-c", coll, "--factory", "IVF8,Flat", "-q").exit_code == 0
    r = invoke("correct", "fit", "--concept", concept, "--name", "c1", "--components", "2", "-c", coll, "-q")
    assert r.exit_code == 0, r.output

    def cli(query, nprobe, *extra):
        out = invoke("search", query, "-k", "10", "--nprobe", nprobe, "--json", *extra, "-c", coll)
        assert out.exit_code == 0, out.output
        data = json.loads(out.output)
        if "hits" in data:
            return [h["id"] for h in data["hits"]]
        return [h["id"] for h in data["original"]] + [h["id"] for h in data["corrected"]]

    differs = 0
    with Collection.open(coll) as opened:
        for query in [f"query {i}" for i in range(8)]:
            expected = {}
            for nprobe in (1, 8):
                lib = Retriever(opened, ToyEncoder(), nprobe=nprobe)
                q = lib.embed_text(query)
                cmp = compare(lib, q, query, "c1", k=10, strategy="query")
                expected[nprobe] = {
                    "plain": [h.item_id for h in lib.search(q, 10).hits],
                    "correction": [h.item_id for h in cmp.corrected],
                    "ab": [h.item_id for h in cmp.original + cmp.corrected],
                }
            for nprobe in (1, 8):
                assert cli(query, nprobe) == expected[nprobe]["plain"]
                assert cli(query, nprobe, "--correction", "c1", "--strategy", "query") == expected[nprobe]["correction"]
                assert cli(query, nprobe, "--ab", "c1", "--strategy", "query") == expected[nprobe]["ab"]
            differs += expected[1] != expected[8]
    assert differs > 0  # on this data nprobe=1 misses results, so the option visibly reached the index
