"""The SQL catalog, its schema versioning, the embedding store and collection bookkeeping."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import indexing.catalog as catalog_module
from indexing.catalog import (
    SCHEMA_VERSION,
    CatalogInfo,
    Correction,
    Failure,
    Item,
    open_catalog,
)
from indexing.collection import (
    Collection,
    CollectionNotFoundError,
    EncoderMismatchError,
    NewItem,
)


def test_open_catalog_creates_tables_and_version(tmp_path: Path):
    catalog = open_catalog(tmp_path / "sub" / "catalog.sqlite")
    tables = set(inspect(catalog.engine).get_table_names())
    assert {"items", "index_versions", "corrections", "failures", "embeddings",
            "embedding_shards", "catalog_info"} <= tables
    assert catalog.get_info("schema_version") == str(SCHEMA_VERSION)
    catalog.dispose()


def test_open_catalog_url_creates_tables_and_version(catalog_url: str):
    catalog = open_catalog(catalog_url)
    tables = set(inspect(catalog.engine).get_table_names())
    assert {"items", "index_versions", "corrections", "failures", "embeddings",
            "embedding_shards", "catalog_info"} <= tables
    assert catalog.get_info("schema_version") == str(SCHEMA_VERSION)
    catalog.dispose()


def test_models_round_trip_json_and_unique_uri(catalog_url: str):
    catalog = open_catalog(catalog_url)
    with catalog.sessions.begin() as session:
        session.add(Item(uri="/a.png", sha256="0" * 64, width=3, height=4,
                         caption="a cat", metadata_={"tone": None, "n": 2}))
        session.add(Correction(name="no-tone", direction="t2i", kernel="cosine",
                               parameters={"eps": 0.01}, report={"image_diversity": 1.5}))
    with catalog.session() as session:
        item = session.scalars(select(Item)).one()
        assert item.id == 1 and item.metadata_ == {"tone": None, "n": 2}
        assert item.added_at is not None
        assert session.scalars(select(Correction)).one().report == {"image_diversity": 1.5}
    with pytest.raises(IntegrityError, match="(?i)unique"):
        with catalog.sessions.begin() as session:
            session.add(Item(uri="/a.png", sha256="1" * 64, width=1, height=1))
    catalog.dispose()


def test_nan_and_infinity_in_json_are_stored_as_null(tmp_path: Path, catalog_url: str):
    """JSON cannot hold them: PostgreSQL refuses them and SQLite's JSON functions would fail on
    every later filter; a parquet listing's NaN is a missing value, and so is it here."""
    nan, inf = float("nan"), float("inf")
    with Collection.open(tmp_path / "coll", db=catalog_url, create=True) as collection:
        collection.bind_encoder("toy", 2)
        collection.add_items([NewItem("/a", "a", 1, 1, metadata={"score": nan, "deep": {"x": [1.5, -inf]}}),
                              NewItem("/b", "b", 1, 1, metadata={"score": 2.5})], np.ones((2, 2), np.float32))
        assert collection.items([1])[1].metadata == {"score": None, "deep": {"x": [1.5, None]}}
        assert collection.item_ids({"score": ""}).tolist() == [1]
        assert collection.item_ids({"score": "2.5"}).tolist() == [2]
        with collection.catalog.sessions.begin() as session:
            session.add(Correction(name="c", direction="t2i", kernel="cosine", report={"ratio": inf}))
        with collection.catalog.session() as session:
            assert session.scalars(select(Correction.report)).one() == {"ratio": None}


def test_long_encoder_specs_and_index_paths_are_stored(tmp_path: Path, catalog_url: str):
    """An encoder spec naming a deep checkpoint path and an index folder deep in the file
    system: longer than the VARCHARs, which PostgreSQL (unlike SQLite) would enforce."""
    spec = "open_clip:ViT-B-32:" + "/".join(["d" * 200] * 4) + "/model.pt"  # 800+ characters
    index_dir = tmp_path.joinpath(*(["i" * 200] * 6))  # 1200+ characters
    with Collection.open(tmp_path / "coll", db=catalog_url, create=True, index_dir=index_dir) as collection:
        collection.bind_encoder(spec, 2)
        collection.add_items([NewItem("/a", "a", 1, 1)], np.ones((1, 2), np.float32))
        info = collection.sync_index()
        assert info.encoder == spec and info.file.parent == index_dir and len(str(info.file)) > 1200
        assert collection.search(np.ones((1, 2), np.float32), k=1)[0][0].item_id == 1


def test_deleted_item_ids_are_never_reused(catalog_url: str):
    catalog = open_catalog(catalog_url)
    with catalog.sessions.begin() as session:
        session.add_all([Item(uri=f"/{n}", sha256=str(n), width=1, height=1) for n in range(3)])
    with catalog.sessions.begin() as session:
        session.delete(session.get(Item, 3))
    with catalog.sessions.begin() as session:
        session.add(Item(uri="/new", sha256="x", width=1, height=1))
    with catalog.session() as session:
        assert session.scalar(select(Item.id).where(Item.uri == "/new")) == 4
    catalog.dispose()


def test_set_info_inserts_then_replaces(catalog_url: str):
    catalog = open_catalog(catalog_url)
    for value in ("/first", "/second"):
        with catalog.sessions.begin() as session:
            catalog.set_info(session, "index_dir", value)
        assert catalog.get_info("index_dir") == value
    with catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(CatalogInfo)) == 2  # and schema_version
    catalog.dispose()


def test_newer_schema_is_refused(catalog_url: str):
    path = catalog_url
    catalog = open_catalog(path)
    with catalog.sessions.begin() as session:
        session.get(CatalogInfo, "schema_version").value = str(SCHEMA_VERSION + 1)
    catalog.dispose()
    with pytest.raises(ValueError, match="newer"):
        open_catalog(path)


def test_migration_runs_once_on_open(catalog_url: str, monkeypatch):
    path = catalog_url
    open_catalog(path).dispose()
    calls = []

    def add_column(connection):
        calls.append(1)
        connection.execute(text("ALTER TABLE items ADD COLUMN rating INTEGER"))

    monkeypatch.setattr(catalog_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(catalog_module.MIGRATIONS, SCHEMA_VERSION, add_column)
    catalog = open_catalog(path)
    assert "rating" in {column["name"] for column in inspect(catalog.engine).get_columns("items")}
    assert catalog.get_info("schema_version") == str(SCHEMA_VERSION + 1)
    catalog.dispose()
    open_catalog(path).dispose()
    assert calls == [1]


def test_foreign_database_is_refused(catalog_url: str):
    path = catalog_url
    engine = create_engine(path)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(ValueError, match="not written by sce"):
        open_catalog(path)


def test_missing_collection_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CollectionNotFoundError, match="no collection"):
        Collection.open(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_collection_accepts_an_sqlalchemy_url(tmp_path: Path, catalog_url: str):
    with Collection.open(tmp_path / "coll", db=catalog_url, create=True) as collection:
        collection.bind_encoder("toy", 4)
    with Collection.open(tmp_path / "coll", db=catalog_url) as collection:
        assert collection.encoder_name == "toy" and collection.dim == 4
        assert collection.catalog.engine.dialect.name == catalog_url.split(":")[0].split("+")[0]
    assert not (tmp_path / "coll" / "catalog.sqlite").exists()  # the catalog is elsewhere


def _collection_with_items(tmp_path: Path, db: str, count: int = 6, dim: int = 4) -> tuple[Collection, np.ndarray]:
    collection = Collection.open(tmp_path / "coll", db=db, create=True)
    collection.bind_encoder("toy", dim)
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    items = [NewItem(uri=f"/img/{n}.png", sha256=f"{n:064d}", width=2, height=2) for n in range(count)]
    half = count // 2
    collection.add_items(items[:half], vectors[:half])
    collection.add_items(items[half:], vectors[half:])
    return collection, vectors


def test_embedding_store_get_iter_and_sample(tmp_path: Path, catalog_url: str):
    collection, vectors = _collection_with_items(tmp_path, catalog_url)
    store = collection.embeddings
    ids = collection.item_ids()
    assert ids.tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(store.get("image", [5, 1, 3]), vectors[[4, 0, 2]])
    chunks = list(store.iter_chunks("image", chunk_size=4))
    assert [len(chunk_ids) for chunk_ids, _ in chunks] == [4, 2]  # chunks span shards
    all_ids = np.concatenate([chunk_ids for chunk_ids, _ in chunks])
    np.testing.assert_array_equal(np.concatenate([v for _, v in chunks]), vectors[all_ids - 1])
    sample_ids, sample = store.sample("image", 3, seed=1)
    np.testing.assert_array_equal(sample, vectors[sample_ids - 1])
    with pytest.raises(KeyError, match=r"\[99\]"):
        store.get("image", [1, 99])
    subset = list(store.iter_chunks("image", ids=[6, 2]))
    assert sorted(subset[0][0].tolist()) == [2, 6]
    collection.close()


def test_caption_embeddings_are_keyed_by_kind(tmp_path: Path, catalog_url: str):
    collection, vectors = _collection_with_items(tmp_path, catalog_url)
    captions = np.full((2, 4), 7.0, np.float32)
    collection.store_embeddings("caption", [2, 4], captions)
    assert collection.embeddings.ids("caption").tolist() == [2, 4]
    np.testing.assert_array_equal(collection.embeddings.get("caption", [4]), captions[:1])
    np.testing.assert_array_equal(collection.embeddings.get("image", [4]), vectors[3:4])
    collection.delete(ids=[2])
    assert collection.embeddings.ids("caption").tolist() == [4]
    collection.close()


def test_float16_store_reads_back_as_float32(tmp_path: Path, catalog_url: str):
    collection = Collection.open(tmp_path / "coll", db=catalog_url, create=True)
    collection.bind_encoder("toy", 3)
    vectors = np.array([[1.0, 2.0, 3.0]], np.float32)
    collection.add_items([NewItem("/x", "x", 1, 1)], vectors, dtype="float16")
    stored = collection.embeddings.get("image", [1])
    assert stored.dtype == np.float32
    np.testing.assert_allclose(stored, vectors, rtol=1e-3)
    collection.close()


def test_orphan_shard_files_are_removed(tmp_path: Path, catalog_url: str):
    collection, _ = _collection_with_items(tmp_path, catalog_url)
    orphan = collection.embeddings.directory / "image" / "orphan.npy"
    np.save(orphan, np.zeros((2, 4), np.float32))
    kept = sorted(collection.embeddings.directory.rglob("*.npy"))
    assert collection.embeddings.remove_unreferenced_files() == 1
    assert not orphan.exists()
    assert sorted(collection.embeddings.directory.rglob("*.npy")) == [p for p in kept if p != orphan]
    collection.close()


def test_encoder_mismatch_names_both(tmp_path: Path, catalog_url: str):
    collection, _ = _collection_with_items(tmp_path, catalog_url)
    collection.sync_index()
    with pytest.raises(EncoderMismatchError, match=r"'toy'.*'other'"):
        collection.bind_encoder("other", 4)
    with pytest.raises(ValueError, match=r"built with encoder 'toy'.*'open_clip:ViT-B-32'"):
        collection.open_index(encoder="open_clip:ViT-B-32")
    info, index = collection.open_index(encoder="toy")
    assert index.count == info.count == 6
    collection.close()


def test_new_version_is_published_atomically_and_old_retired(tmp_path: Path, catalog_url: str):
    collection, vectors = _collection_with_items(tmp_path, catalog_url)
    original = collection.sync_index()
    with collection.new_index_version(correction="flip") as writer:
        for ids, raw in collection.embeddings.iter_chunks("image"):
            writer.add(ids, -raw)
        # while building, the corrected version is not current and search is unchanged
        assert collection.current_version(correction="flip") is None
    first = collection.current_version(correction="flip")
    assert first is not None and first.count == 6 and first.state == "ready"
    hits = collection.search(vectors[:1], k=1, correction="flip")[0]
    assert hits[0].item_id != 1  # the flipped index ranks item 1 last for its own vector
    assert collection.search(vectors[:1], k=1)[0][0].item_id == 1
    with collection.new_index_version(correction="flip") as writer:
        writer.add(*next(collection.embeddings.iter_chunks("image")))
    states = {v.name: v.state for v in collection.versions(include_retired=True)}
    assert states[first.name] == "retired" and states[original.name] == "ready"
    collection.close()


def test_failed_version_is_resumed_from_its_checkpoint(tmp_path: Path, catalog_url: str):
    collection, _ = _collection_with_items(tmp_path, catalog_url)
    with pytest.raises(RuntimeError, match="boom"):
        with collection.new_index_version(correction="c", checkpoint_every=3) as writer:
            ids, raw = next(collection.embeddings.iter_chunks("image"))
            writer.add(ids[:3], raw[:3])  # reaches the checkpoint
            raise RuntimeError("boom")
    assert [v.state for v in collection.versions() if v.correction == "c"] == ["failed"]
    with collection.new_index_version(correction="c") as writer:
        assert sorted(writer.done_ids.tolist()) == [1, 2, 3]
        for ids, raw in collection.embeddings.iter_chunks("image", ids=[4, 5, 6]):
            writer.add(ids, raw)
    versions = [v for v in collection.versions() if v.correction == "c"]
    assert len(versions) == 1 and versions[0].state == "ready" and versions[0].count == 6
    collection.close()


def test_failure_rows_record_reason(tmp_path: Path, catalog_url: str):
    from indexing.catalog import RejectReason
    from indexing.collection import Rejection

    collection = Collection.open(tmp_path / "coll", db=catalog_url, create=True)
    collection.add_items([], None, [Rejection("/bad.png", RejectReason.EMPTY, "0 bytes")])
    collection.add_items([], None, [Rejection("/bad.png", RejectReason.TRUNCATED, "cut")])
    assert [(f.uri, f.reason) for f in collection.failures()] == [("/bad.png", "truncated")]
    with Session(collection.catalog.engine) as session:
        assert session.scalar(select(Failure.detail)) == "cut"
    collection.close()
