"""FAISS index files: search against numpy brute force, ids, factories, atomic saves."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from indexing.vector_index import VectorIndex, nonfinite_rows, unit_rows, write_atomically
from sce_correct.errors import InputError


def brute_force_top_k(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int):
    scores = unit_rows(queries) @ unit_rows(vectors).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


@pytest.fixture
def random_vectors():
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32) * 5.0  # raw, not unit-norm
    ids = rng.choice(10**9, size=len(vectors), replace=False).astype(np.int64)
    return ids, vectors


def test_flat_search_matches_brute_force(random_vectors):
    ids, vectors = random_vectors
    index = VectorIndex.create(32)
    index.add(ids, vectors)
    queries = np.random.default_rng(8).standard_normal((50, 32)).astype(np.float32)
    scores, found = index.search(queries, k=10)
    expected_scores, expected_ids = brute_force_top_k(queries, vectors, ids, 10)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_vectors_are_stored_unit_norm(random_vectors):
    ids, vectors = random_vectors
    index = VectorIndex.create(32)
    index.add(ids[:5], vectors[:5])
    stored = np.stack([index.index.reconstruct(int(item_id)) for item_id in ids[:5]])
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-6)


def test_remove_and_ids(random_vectors):
    ids, vectors = random_vectors
    index = VectorIndex.create(32)
    index.add(ids[:100], vectors[:100])
    assert index.remove(ids[:10]) == 10
    assert index.remove([123456789012]) == 0
    assert set(index.ids().tolist()) == set(ids[10:100].tolist())
    _, found = index.search(vectors[:10], k=5)
    assert not np.isin(found, ids[:10]).any()


def test_add_rejects_present_ids_and_wrong_shapes(random_vectors):
    ids, vectors = random_vectors
    index = VectorIndex.create(32)
    index.add(ids[:10], vectors[:10])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(ids[5:15], vectors[5:15])
    with pytest.raises(ValueError, match="dimension 16"):
        index.add([1], np.ones((1, 16), np.float32))
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        index.add([1, 2], np.ones((3, 32), np.float32))


def test_ivf_factory_is_trained_and_close_to_flat(random_vectors):
    ids, vectors = random_vectors
    index = VectorIndex.create(32, "IVF16,Flat")
    with pytest.raises(ValueError, match="trained"):
        index.add(ids, vectors)
    index.train(vectors)
    index.add(ids, vectors)
    index.set_nprobe(16)  # all lists: exact
    queries = vectors[:20]
    _, found = index.search(queries, 10)
    _, expected = brute_force_top_k(queries, vectors, ids, 10)
    np.testing.assert_array_equal(found, expected)


def test_invalid_factory_is_a_value_error():
    with pytest.raises(ValueError, match="factory"):
        VectorIndex.create(8, "NotAnIndex,42")


@pytest.mark.parametrize("factory, reason", [
    ("Nope99", "could not parse index string Nope99"),
    ("IVF0,Nope", "could not parse code description Nope in IVF0,Nope"),
    ("PQ7", "should be a multiple of the number of subquantizers"),  # valid, but not for 8-d vectors
])
def test_invalid_factory_is_one_input_error_with_faiss_short_reason(factory, reason):
    from sce_correct.errors import InputError

    with pytest.raises(InputError) as caught:
        VectorIndex.create(8, factory)
    message = str(caught.value)
    assert message.startswith(f"--factory {factory!r} is not a faiss index factory string"), message
    assert "index_factory docs" in message and reason in message, message
    assert "Error in" not in message and ".cpp" not in message and "\n" not in message, message


def test_hnsw_cannot_remove_in_place(random_vectors):
    ids, vectors = random_vectors
    index = VectorIndex.create(32, "HNSW8")
    index.add(ids[:50], vectors[:50])
    with pytest.raises(NotImplementedError, match="HNSW8"):
        index.remove(ids[:1])


def test_save_and_load_round_trip(tmp_path: Path, random_vectors):
    ids, vectors = random_vectors
    index = VectorIndex.create(32)
    index.add(ids, vectors)
    path = tmp_path / "nested" / "ünïcode.faiss"
    index.save(path)
    loaded = VectorIndex.load(path)
    assert loaded.count == len(ids)
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    assert list(tmp_path.joinpath("nested").iterdir()) == [path]  # no temporary left over


def test_a_saved_file_is_plain_faiss_and_searches_like_brute_force(tmp_path: Path, random_vectors):
    ids, vectors = random_vectors
    index = VectorIndex.create(32)
    for start in range(0, len(ids), 300):  # added in chunks, as a build does
        index.add(ids[start : start + 300], vectors[start : start + 300], check_new=False)
    index.save(tmp_path / "v.faiss")
    read = faiss.read_index(str(tmp_path / "v.faiss"))  # faiss alone, no code of ours
    assert isinstance(read, faiss.IndexIDMap2) and read.ntotal == len(ids)
    queries = unit_rows(np.random.default_rng(9).standard_normal((30, 32)).astype(np.float32))
    scores, found = read.search(queries, 10)
    expected_scores, expected_ids = brute_force_top_k(queries, vectors, ids, 10)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_nan_or_infinite_vectors_are_refused(random_vectors):
    ids, vectors = random_vectors
    index = VectorIndex.create(32)
    bad = vectors[:10].copy()
    bad[3, 4], bad[7, 0] = np.nan, -np.inf
    with pytest.raises(InputError, match="2 of 10 vectors hold NaN or infinite values"):
        index.add(ids[:10], bad, normalize=False)
    assert index.count == 0


def test_nonfinite_rows_counts_like_numpy():
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((500, 9)).astype(np.float32)
    assert nonfinite_rows(rows) == 0
    rows[rng.choice(500, 40, replace=False), rng.integers(0, 9, 40)] = rng.choice([np.nan, np.inf, -np.inf], 40)
    rows[:5] = 3e38  # finite rows whose sum overflows
    assert nonfinite_rows(rows) == int((~np.isfinite(rows).all(axis=1)).sum()) > 0
    assert nonfinite_rows(np.empty((0, 9), np.float32)) == 0


def test_failed_save_keeps_the_old_file(tmp_path: Path, random_vectors, monkeypatch):
    ids, vectors = random_vectors
    path = tmp_path / "index.faiss"
    old = VectorIndex.create(32)
    old.add(ids[:10], vectors[:10])
    old.save(path)
    before = path.read_bytes()

    new = VectorIndex.create(32)
    new.add(ids, vectors)

    def write_half_then_fail(index, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    assert path.read_bytes() == before
    assert VectorIndex.load(path).count == 10
    assert [entry.name for entry in tmp_path.iterdir()] == ["index.faiss"]


def test_write_atomically_never_exposes_a_partial_file(tmp_path: Path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")

    def fail(temporary: Path) -> None:
        temporary.write_bytes(b"new but incomplete")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomically(path, fail)
    assert path.read_bytes() == b"old"
    write_atomically(path, lambda temporary: temporary.write_bytes(b"new"))
    assert path.read_bytes() == b"new"


def test_empty_index_search_returns_empty_slots():
    scores, ids = VectorIndex.create(4).search(np.ones((2, 4), np.float32), 3)
    assert ids.shape == (2, 3) and (ids == -1).all()


def test_unnormalized_add_ranks_like_a_query_side_projection():
    rng = np.random.default_rng(3)
    vectors = unit_rows(rng.standard_normal((300, 16)).astype(np.float32))
    basis = np.linalg.qr(rng.standard_normal((16, 3)))[0]
    projection = (np.eye(16) - basis @ basis.T).astype(np.float32)  # nullify 3 directions
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    reindexed = VectorIndex.create(16)
    reindexed.add(np.arange(300), vectors @ projection.T, normalize=False)
    original = VectorIndex.create(16)
    original.add(np.arange(300), vectors)
    _, reindexed_ids = reindexed.search(queries, 10)
    _, query_side_ids = original.search(queries @ projection.T, 10)
    np.testing.assert_array_equal(reindexed_ids, query_side_ids)
    normalized = VectorIndex.create(16)
    normalized.add(np.arange(300), vectors @ projection.T)
    assert not np.array_equal(normalized.search(queries, 10)[1], query_side_ids)
