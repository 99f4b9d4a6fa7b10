"""`sce index build|add|delete|info` and `sce search`, through typer's CliRunner."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ToyEncoder, make_image
from typer.testing import CliRunner

import indexing
from indexing.collection import Collection
from indexing.readers import file_uri
from indexing.vector_index import unit_rows
from ui.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def toy_specs(monkeypatch):
    """Make `load_encoder` resolve any spec to a toy encoder (named by its dimension)."""
    def load(spec: str, device=None):
        return ToyEncoder(dim=8) if spec in ("toy8", ToyEncoder(dim=8).name) else ToyEncoder()

    monkeypatch.setattr(indexing, "load_encoder", load, raising=False)


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def test_build_info_search_delete(tmp_path, image_folder, toy_specs):
    collection = tmp_path / "coll"
    result = invoke("index", "build", image_folder, "--collection", collection, "--quiet")
    assert result.exit_code == 0, result.output
    assert "indexed 12 new images" in result.output
    assert "12 vectors" in result.output

    result = invoke("index", "info", "-c", collection)
    assert result.exit_code == 0, result.output
    assert "items       12" in result.output and ToyEncoder().name in result.output
    assert "ready" in result.output and "Flat" in result.output

    result = invoke("search", "a query", "-k", "3", "-c", collection)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "id"] and len(lines) == 4
    with Collection.open(collection) as opened:
        ids = opened.item_ids()
        stored = opened.embeddings.get("image", ids)
    scores = unit_rows(ToyEncoder().encode_texts(["a query"])) @ unit_rows(stored).T
    best = ids[np.argsort(-scores[0])[:3]]
    assert [int(line.split()[2]) for line in lines[1:]] == best.tolist()
    assert lines[1].split()[0] == "1"

    target = image_folder / "café" / "smiley 😀 ñ.png"
    result = invoke("index", "delete", "--path", target, "--id", "1", "-c", collection)
    assert result.exit_code == 0, result.output
    assert "deleted 2 items" in result.output
    with Collection.open(collection) as opened:
        assert len(opened.item_ids()) == 10
        assert file_uri(target) not in {r.uri for r in opened.items(opened.item_ids()).values()}
        assert opened.current_version().count == 10


def test_add_and_failures_listing(tmp_path, image_folder, toy_specs):
    collection = tmp_path / "coll"
    assert invoke("index", "build", image_folder, "-c", collection, "-q").exit_code == 0
    more = tmp_path / "more"
    make_image(more / "new.png", seed=500)
    make_image(more / "again.png", seed=0)  # the bytes of img_00.png
    (more / "broken.png").write_bytes(b"\x89PNG not really")
    result = invoke("index", "add", more, "-c", collection, "-q")
    assert result.exit_code == 0, result.output
    assert "indexed 1 new images" in result.output
    assert "duplicate 1" in result.output and "not_an_image 1" in result.output
    result = invoke("index", "info", "-c", collection, "--failures", "5")
    assert "rejected    2" in result.output
    assert "broken.png" in result.output and "same content as item" in result.output


def test_errors_are_one_line_messages_with_nonzero_exit(tmp_path, image_folder, toy_specs):
    missing = tmp_path / "nowhere"
    result = invoke("index", "info", "-c", missing)
    assert result.exit_code == 1
    assert "error: no collection" in result.output and "Traceback" not in result.output

    result = invoke("search", "x", "-c", missing)
    assert result.exit_code == 1 and "no collection" in result.output

    collection = tmp_path / "coll"
    assert invoke("index", "build", image_folder, "-c", collection, "-q").exit_code == 0
    result = invoke("index", "add", image_folder, "-c", collection, "--encoder", "toy8", "-q")
    assert result.exit_code == 1
    assert ToyEncoder().name in result.output and ToyEncoder(dim=8).name in result.output

    result = invoke("index", "delete", "-c", collection)
    assert result.exit_code == 2 and "--id or --path" in result.output

    result = invoke("index", "delete", "--id", "9999", "-c", collection)
    assert result.exit_code == 1 and "9999" in result.output

    (tmp_path / "list.xlsx").write_text("x")
    result = invoke("index", "add", tmp_path / "list.xlsx", "-c", collection, "-q")
    assert result.exit_code == 1 and "cannot read" in result.output

    result = invoke("index", "build", image_folder, "-c", tmp_path / "c2", "--factory", "Nope", "-q")
    assert result.exit_code == 1 and "factory" in result.output


def test_sce_entry_point_reports_errors_without_traceback(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "ui.cli", "index", "info", "--collection", str(tmp_path / "none")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 1
    assert "error: no collection" in completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
