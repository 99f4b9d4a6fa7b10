"""Re-index staging: vectors staged to disk in segments, checkpointed in the background, resumed
from their last checkpoint, with non-finite rows counted and rows dropped segment by segment."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

import indexing.vector_index as vi
from indexing.vector_index import StagedVectors


# -- the staged vectors -------------------------------------------------------------------------
def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _staged_rows(staged: StagedVectors) -> tuple[np.ndarray, np.ndarray]:
    parts = list(staged.chunks(64))
    return np.concatenate([ids for ids, _ in parts]), np.concatenate([np.array(rows) for _, rows in parts])


@pytest.mark.parametrize("hold", [True, False], ids=["flat", "other_factory"])
@pytest.mark.parametrize("dim", [3, 1000])
def test_staged_vectors_resume_from_their_last_checkpoint(tmp_path, hold, dim):
    rng = np.random.default_rng(dim)
    total = 700
    ids = rng.permutation(100_000)[:total].astype(np.int64)
    vectors = _unit(rng, total, dim)
    progress = tmp_path / ".v.faiss.progress"
    staged = StagedVectors.create(progress, dim, hold=hold, expected=total)
    staged.append(ids[:100], vectors[:100])
    staged.checkpoint()
    staged.append(ids[100:150], vectors[100:150])
    staged.checkpoint()
    staged.append(ids[150:260], np.full((110, dim), 7.0, np.float32))  # never checkpointed
    staged.close()  # killed here
    assert {p.name for p in tmp_path.iterdir()} == staged.files()  # a record and 2 x 2 .npy files
    assert len(staged.files()) == 5

    staged = StagedVectors.open(progress, dim, hold=hold, expected=total)
    assert staged is not None and staged.count == 150 and staged.bad_rows == 0
    np.testing.assert_array_equal(staged.ids(), ids[:150])
    np.testing.assert_array_equal(_staged_rows(staged)[1], vectors[:150])
    for number, start in enumerate(range(150, total, 37)):
        staged.append(ids[start : start + 37], vectors[start : start + 37])
        if number % 3 == 0:
            staged.checkpoint()
    got_ids, got_rows = _staged_rows(staged)  # checkpointed and not
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_rows, vectors)
    if hold:  # the staged vectors are the flat index: faiss writes it, faiss reads it back
        staged.as_index().save(tmp_path / "v.faiss")
        index = faiss.read_index(str(tmp_path / "v.faiss"))
        assert isinstance(index, faiss.IndexIDMap2) and index.ntotal == total
        np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), ids)
        queries = _unit(rng, 5, dim)
        scores, found = index.search(queries, 10)
        brute = queries @ vectors.T
        order = np.argsort(-brute, axis=1)[:, :10]
        np.testing.assert_array_equal(found, ids[order])
        np.testing.assert_allclose(scores, np.take_along_axis(brute, order, axis=1), rtol=1e-5, atol=1e-5)
    staged.remove()
    assert [p.name for p in tmp_path.iterdir()] == (["v.faiss"] if hold else [])


@pytest.mark.parametrize("hold", [True, False], ids=["flat", "other_factory"])
def test_a_background_checkpoint_holds_exactly_the_rows_staged_before_it(tmp_path, monkeypatch, hold):
    rng = np.random.default_rng(11)
    ids, vectors = np.arange(90, dtype=np.int64), _unit(rng, 90, 6)
    progress = tmp_path / ".b.faiss.progress"
    staged = StagedVectors.create(progress, 6, hold=hold, expected=60)  # room for 60 rows
    staged.append(ids[:30], vectors[:30])
    staged.checkpoint(wait=False)
    staged.append(ids[30:50], vectors[30:50])  # while it is written
    staged.append(ids[50:90], vectors[50:90])  # past the room: waits for it, then grows
    staged.wait()
    assert json.loads(progress.read_text())["count"] == 30
    staged.close()
    reopened = StagedVectors.open(progress, 6, hold=hold)
    np.testing.assert_array_equal(_staged_rows(reopened)[1], vectors[:30])

    def disk_full(path, array):
        raise OSError("disk full")

    monkeypatch.setattr(vi, "_save_npy", disk_full)
    reopened.append(ids[30:40], vectors[30:40])
    reopened.checkpoint(wait=False)
    with pytest.raises(OSError, match="disk full"):
        reopened.wait()
    with pytest.raises(OSError, match="disk full"):  # and every later use: nothing is lost unnoticed
        reopened.checkpoint()
    assert json.loads(progress.read_text())["count"] == 30  # the last durable checkpoint stands


def test_staged_vectors_count_rows_with_nan_or_inf(tmp_path):
    staged = StagedVectors.create(tmp_path / ".n.faiss.progress", 4)
    rows = np.ones((6, 4), np.float32)
    rows[1, 2], rows[4, 0], rows[5, 3] = np.nan, np.inf, -np.inf
    staged.append(np.arange(6), rows)
    assert staged.bad_rows == 3
    staged.checkpoint()
    staged.append(np.arange(6, 8), np.full((2, 4), 3e38, np.float32))  # finite; their sum is not
    assert staged.bad_rows == 3
    staged.checkpoint()
    staged.close()
    reopened = StagedVectors.open(tmp_path / ".n.faiss.progress", 4)
    assert reopened.bad_rows == 3  # counted again from the segments
    reopened.keep_only(~np.isin(np.arange(8), [1, 5]))
    assert reopened.bad_rows == 1 and reopened.count == 6


@pytest.mark.parametrize("hold", [True, False], ids=["flat", "other_factory"])
def test_keep_only_rewrites_the_segments_that_lose_rows(tmp_path, hold):
    rng = np.random.default_rng(5)
    progress = tmp_path / ".k.faiss.progress"
    ids, vectors = np.arange(30, dtype=np.int64) * 10, _unit(rng, 30, 8)
    staged = StagedVectors.create(progress, 8, hold=hold)
    for start in (0, 10, 20):
        staged.append(ids[start : start + 10], vectors[start : start + 10])
        staged.checkpoint()
    before = json.loads(progress.read_text())["segments"]
    keep = np.ones(30, bool)
    keep[[12, 15]] = False
    staged.keep_only(keep)
    after = json.loads(progress.read_text())["segments"]
    assert [s["name"] for s in after][::2] == [before[0]["name"], before[2]["name"]]  # untouched
    assert after[1]["name"] != before[1]["name"] and after[1]["count"] == 8
    assert {p.name for p in tmp_path.iterdir()} == staged.files()  # the replaced files are gone
    np.testing.assert_array_equal(_staged_rows(staged)[1], vectors[keep])
    staged.close()
    reopened = StagedVectors.open(progress, 8, hold=hold)
    np.testing.assert_array_equal(reopened.ids(), ids[keep])
    np.testing.assert_array_equal(_staged_rows(reopened)[1], vectors[keep])


def test_unusable_progress_records_are_ignored(tmp_path):
    progress = tmp_path / ".x.faiss.progress"
    assert StagedVectors.open(progress, 4) is None  # none yet
    progress.write_text("{not json")
    assert StagedVectors.open(progress, 4) is None
    progress.write_text(json.dumps({"format": "sce-staged-flat-1", "file": "x", "dim": 4, "count": 3}))
    assert StagedVectors.open(progress, 4) is None  # the former hand-written layout: start again
    staged = StagedVectors.create(progress, 4)
    staged.append(np.arange(3), np.ones((3, 4), np.float32))
    staged.checkpoint()
    staged.close()
    assert StagedVectors.open(progress, 4).count == 3
    assert StagedVectors.open(progress, 5) is None  # another dimension
    rows_file = next(tmp_path.glob("*.rows.npy"))
    np.save(rows_file, np.ones((2, 4), np.float32))  # fewer rows than recorded
    assert StagedVectors.open(progress, 4) is None
    rows_file.unlink()
    assert StagedVectors.open(progress, 4) is None
    record = json.loads(progress.read_text())
    record["segments"][0]["name"] = "../elsewhere"
    progress.write_text(json.dumps(record))
    assert StagedVectors.open(progress, 4) is None
