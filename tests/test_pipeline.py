"""The indexing pipeline: readers, build/add/delete, bad files, resume after SIGKILL."""
from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ToyEncoder, make_image, make_png_header_only, write_csv

from indexing.collection import Collection, EncoderMismatchError
from indexing.pipeline import add_to_collection, build_collection
from indexing.readers import file_uri, read_source
from indexing.vector_index import unit_rows
from sce_correct.errors import InputError, NotFoundError

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CSV = REPO / "data" / "sample" / "captions.csv"


def assert_catalog_matches_index(
    collection: Collection, encoder: ToyEncoder | None = None, compare_vectors: bool = True
) -> None:
    """Catalog, stored embeddings and the current index hold the same items, vector for vector."""
    item_ids = collection.item_ids()
    assert np.array_equal(collection.embeddings.ids("image"), item_ids)
    info, index = collection.open_index()
    assert info.count == index.count == len(item_ids)
    assert np.array_equal(np.sort(index.ids()), item_ids)
    if not len(item_ids) or not compare_vectors:
        return
    stored = collection.embeddings.get("image", item_ids)
    in_index = np.stack([index.index.reconstruct(int(item_id)) for item_id in item_ids])
    np.testing.assert_allclose(in_index, unit_rows(stored), atol=1e-6)
    if encoder is not None:  # every stored vector is the encoding of its own item's file
        records = collection.items(item_ids)
        fresh = encoder.encode_images([records[int(i)].uri for i in item_ids])
        np.testing.assert_allclose(stored, fresh, rtol=1e-5, atol=1e-5)


# -- readers -------------------------------------------------------------------------------
def test_folder_reader_is_recursive_sorted_and_filters_extensions(image_folder: Path):
    records = list(read_source(image_folder))
    names = [Path(record.uri).name for record in records]
    assert len(records) == 12 and "notes.txt" not in names
    assert "smiley 😀 ñ.png" in names
    assert all(Path(record.uri).is_absolute() for record in records)
    assert records == list(read_source(image_folder))  # deterministic order


def _write_rows_csv(path: Path, rows: list[dict]) -> None:
    write_csv(path, rows)


def _table_rows(image_folder: Path, base: Path) -> list[dict]:
    return [
        {"file": os.path.relpath(image_folder / "img_00.png", base), "caption": "first", "tone": "light"},
        {"file": str(image_folder / "sub" / "img_01.png"), "caption": "second", "tone": ""},
        {"file": "does/not/exist.png", "caption": "gone", "tone": "dark"},
    ]


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_table_readers_resolve_relative_paths_and_keep_metadata(tmp_path, image_folder, kind):
    rows = _table_rows(image_folder, tmp_path / "lists")
    path = tmp_path / "lists" / f"images.{kind}"
    path.parent.mkdir()
    if kind == "csv":
        _write_rows_csv(path, rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n", encoding="utf-8")
    else:
        pa = pytest.importorskip("pyarrow", reason="parquet lists need pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    records = list(read_source(path))
    assert [record.uri for record in records] == [
        file_uri(image_folder / "img_00.png"),
        file_uri(image_folder / "sub" / "img_01.png"),
        file_uri(path.parent / "does/not/exist.png"),
    ]
    assert [record.caption for record in records] == ["first", "second", "gone"]
    assert records[0].metadata == {"tone": "light"} and records[1].metadata == {"tone": None}


def test_table_without_path_column_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.csv"
    _write_rows_csv(path, [{"name": "x", "caption": "y"}])
    with pytest.raises(ValueError, match="no image path column.*found name, caption"):
        list(read_source(path))


def test_unknown_source_type_is_a_clear_error(tmp_path):
    (tmp_path / "list.xlsx").write_text("x")
    with pytest.raises(ValueError, match="cannot read"):
        read_source(tmp_path / "list.xlsx")
    with pytest.raises(NotFoundError, match="missing.csv does not exist"):
        read_source(tmp_path / "missing.csv")


# -- build, add, delete ----------------------------------------------------------------------
def test_build_indexes_folder_and_catalog_matches_index(tmp_path, image_folder, toy_encoder):
    report = build_collection(image_folder, tmp_path / "coll", encoder=toy_encoder,
                              progress=False, batch_size=5, shard_size=4)
    assert report.added == 12 and not report.rejected
    with Collection.open(tmp_path / "coll") as collection:
        assert_catalog_matches_index(collection, toy_encoder)
        assert collection.encoder_name == toy_encoder.name
        record = next(r for r in collection.items(collection.item_ids()).values()
                      if r.uri.endswith("smiley 😀 ñ.png"))
        assert (record.width, record.height) == (24, 24) and len(record.sha256) == 64
        # a stored vector finds its own item first
        query = collection.embeddings.get("image", [record.id])
        assert collection.search(query, k=1)[0][0].item_id == record.id


def test_search_matches_numpy_brute_force(tmp_path, image_folder, toy_encoder):
    build_collection(image_folder, tmp_path / "coll", encoder=toy_encoder, progress=False)
    with Collection.open(tmp_path / "coll") as collection:
        ids = collection.item_ids()
        stored = collection.embeddings.get("image", ids)
        queries = toy_encoder.encode_texts(["a", "b", "c", "d"])
        scores = unit_rows(queries) @ unit_rows(stored).T
        expected = ids[np.argsort(-scores, axis=1)[:, :5]]
        hits = collection.search(queries, k=5)
        assert [[hit.item_id for hit in row] for row in hits] == expected.tolist()
        assert [hit.rank for hit in hits[0]] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([h.score for h in hits[0]], np.sort(scores[0])[::-1][:5], atol=1e-5)


def test_add_dedups_by_content_and_skips_known_files(tmp_path, image_folder, toy_encoder):
    build_collection(image_folder, tmp_path / "coll", encoder=toy_encoder, progress=False)
    more = tmp_path / "more"
    make_image(more / "new_a.png", seed=200)
    make_image(more / "new_b.png", seed=201)
    make_image(more / "copy_of_img_03.png", seed=3)   # same bytes as an indexed file
    make_image(more / "copy_of_new_a.png", seed=200)  # same bytes as a file of this run
    encoder = ToyEncoder()
    report = add_to_collection(more, tmp_path / "coll", encoder=encoder, progress=False)
    assert report.added == 2 and report.rejected == {"duplicate": 2}
    assert encoder.images_seen == 2  # duplicates are dropped before encoding
    report = add_to_collection(more, tmp_path / "coll", encoder=encoder, progress=False)
    assert report.added == 0 and report.already_known == 4 and encoder.images_seen == 2
    with Collection.open(tmp_path / "coll") as collection:
        assert_catalog_matches_index(collection, encoder)
        duplicates = {f.uri: f for f in collection.failures(reason="duplicate")}
        indexed_copy = duplicates[file_uri(more / "copy_of_img_03.png")]
        assert indexed_copy.duplicate_of is not None
        assert collection.items([indexed_copy.duplicate_of])[indexed_copy.duplicate_of].uri.endswith("img_03.png")
        # folders are read in sorted order: the copy comes first and the original is the duplicate
        assert "copy_of_new_a.png" in duplicates[file_uri(more / "new_a.png")].detail


def test_add_with_another_encoder_is_refused_and_changes_nothing(tmp_path, image_folder, toy_encoder):
    build_collection(image_folder, tmp_path / "coll", encoder=toy_encoder, progress=False)
    other = ToyEncoder(dim=8)
    make_image(tmp_path / "more" / "x.png", seed=300)
    with pytest.raises(EncoderMismatchError, match=f"{toy_encoder.name}.*{other.name}"):
        add_to_collection(tmp_path / "more", tmp_path / "coll", encoder=other, progress=False)
    assert other.images_seen == 0
    with Collection.open(tmp_path / "coll") as collection:
        assert len(collection.item_ids()) == 12


def test_delete_by_id_and_path_updates_catalog_and_every_version(tmp_path, image_folder, toy_encoder):
    build_collection(image_folder, tmp_path / "coll", encoder=toy_encoder, progress=False)
    with Collection.open(tmp_path / "coll") as collection:
        with collection.new_index_version(correction="negated") as writer:
            for ids, raw in collection.embeddings.iter_chunks("image"):
                writer.add(ids, -raw)
        target_uri = file_uri(image_folder / "café" / "smiley 😀 ñ.png")
        result = collection.delete(ids=[1, 999], uris=[target_uri])
        assert len(result.deleted) == 2 and 1 in result.deleted and result.not_found == [999]
        assert_catalog_matches_index(collection, toy_encoder)
        assert target_uri not in {r.uri for r in collection.items(collection.item_ids()).values()}
        _, corrected = collection.open_index(correction="negated")
        assert np.array_equal(np.sort(corrected.ids()), collection.item_ids())


def test_build_with_ivf_factory(tmp_path, toy_encoder):
    folder = tmp_path / "many"
    for seed in range(80):
        make_image(folder / f"{seed:03d}.png", seed=seed, size=(8, 8))
    report = build_collection(folder, tmp_path / "coll", encoder=toy_encoder, progress=False,
                              factory="IVF4,Flat")
    assert report.index_version.factory == "IVF4,Flat" and report.index_version.count == 80
    with Collection.open(tmp_path / "coll") as collection:
        assert_catalog_matches_index(collection, compare_vectors=False)  # IVF cannot reconstruct
        stored = collection.embeddings.get("image", [17])
        assert collection.search(stored, k=1, nprobe=4)[0][0].item_id == 17
        # switching factory later builds a new version and retires the old one
        new = collection.sync_index(factory="Flat")
        assert new.factory == "Flat" and new.count == 80
        assert [v.state for v in collection.versions(include_retired=True)] == ["retired", "ready"]


# -- bad input -----------------------------------------------------------------------------
def test_each_bad_file_is_recorded_with_its_reason(tmp_path, toy_encoder):
    folder = tmp_path / "bad"
    make_image(folder / "good.png", seed=1)
    make_image(folder / "z_copy_of_good.png", seed=1)
    (folder / "empty.png").write_bytes(b"")
    full = make_image(tmp_path / "full.jpg", seed=2, size=(64, 64)).read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "text.png").write_text("this is not a png")
    make_png_header_only(folder / "bomb.png", 30000, 30000)     # PIL's own bomb check
    make_image(folder / "big.png", seed=3, size=(300, 300))     # over our pixel limit
    (folder / "dir.png").mkdir()  # not listed by the folder reader; named by the CSV
    rows = [{"path": "bad/good.png", "caption": "ok"},
            {"path": "bad/missing.png", "caption": "gone"},
            {"path": "bad/dir.png", "caption": "a folder named like an image"},
            {"path": "", "caption": "no file"}]
    _write_rows_csv(tmp_path / "list.csv", rows)

    report = build_collection(folder, tmp_path / "coll", encoder=toy_encoder, progress=False,
                              max_pixels=200 * 200, workers=2, batch_size=3)
    assert report.added == 1
    report = add_to_collection(tmp_path / "list.csv", tmp_path / "coll", encoder=toy_encoder,
                               progress=False)
    assert report.already_known == 1
    with Collection.open(tmp_path / "coll") as collection:
        reasons = {Path(f.uri).name: f.reason for f in collection.failures()}
        details = {Path(f.uri).name: f.detail for f in collection.failures()}
        assert_catalog_matches_index(collection)
    assert reasons == {
        "z_copy_of_good.png": "duplicate",
        "empty.png": "empty",
        "truncated.jpg": "truncated",
        "text.png": "not_an_image",
        "bomb.png": "decompression_bomb",
        "big.png": "decompression_bomb",
        "dir.png": "unreadable",
        "missing.png": "missing",
        "list.csv#row=4": "missing",
    }
    assert "90000 pixels exceeds the limit of 40000" in details["big.png"]


def test_pil_bomb_warning_is_a_rejection_even_above_our_limit(tmp_path, toy_encoder):
    from PIL import Image

    folder = tmp_path / "imgs"
    make_image(folder / "ok.png", seed=1)
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)  # between PIL's warning and error sizes
    make_png_header_only(folder / "warned.png", side, side)
    report = build_collection(folder, tmp_path / "coll", encoder=toy_encoder, progress=False,
                              max_pixels=10**12)
    assert report.added == 1 and report.rejected == {"decompression_bomb": 1}


def test_retry_failed_indexes_a_fixed_file(tmp_path, toy_encoder):
    folder = tmp_path / "imgs"
    make_image(folder / "a.png", seed=1)
    (folder / "b.png").write_bytes(b"")
    build_collection(folder, tmp_path / "coll", encoder=toy_encoder, progress=False)
    make_image(folder / "b.png", seed=2)
    assert add_to_collection(folder, tmp_path / "coll", encoder=toy_encoder, progress=False).added == 0
    assert add_to_collection(folder, tmp_path / "coll", encoder=toy_encoder, progress=False,
                             retry_failed=True).added == 1
    with Collection.open(tmp_path / "coll") as collection:
        assert collection.failures() == []
        assert_catalog_matches_index(collection)


def test_collection_write_lock_refuses_a_second_writer(tmp_path, toy_encoder):
    from indexing.collection import CollectionBusyError

    with Collection.open(tmp_path / "coll", create=True) as first, first.writing():
        with Collection.open(tmp_path / "coll") as second, pytest.raises(CollectionBusyError):
            with second.writing():
                pass


# -- resume after SIGKILL ------------------------------------------------------------------
KILLED_BUILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import ToyEncoder
    from indexing.pipeline import build_collection
    build_collection({folder!r}, {collection!r}, encoder=ToyEncoder(delay=0.25),
                     progress=False, batch_size=4, shard_size=4, workers=1)
    """
)


def _committed_items(catalog: Path) -> int:
    if not catalog.exists():
        return 0
    try:
        with sqlite3.connect(catalog, timeout=1) as connection:
            return connection.execute("SELECT count(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def test_build_killed_with_sigkill_resumes_without_reencoding(tmp_path):
    folder = tmp_path / "imgs"
    total = 40
    for seed in range(total):
        make_image(folder / f"{seed:03d}.png", seed=seed, size=(8, 8))
    collection_dir = tmp_path / "coll"
    script = KILLED_BUILD.format(tests=str(Path(__file__).parent), folder=str(folder),
                                 collection=str(collection_dir))
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _committed_items(collection_dir / "catalog.sqlite") < 8:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the build never committed a shard"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    committed = _committed_items(collection_dir / "catalog.sqlite")
    assert 8 <= committed < total, "the kill must land part way through"

    encoder = ToyEncoder()
    report = build_collection(folder, collection_dir, encoder=encoder, progress=False)
    assert report.already_known == committed
    assert report.added == encoder.images_seen == total - committed  # nothing re-encoded
    with Collection.open(collection_dir) as collection:
        assert len(collection.item_ids()) == total
        assert_catalog_matches_index(collection, encoder)
        shard_files = {p.relative_to(collection.embeddings.directory).as_posix()
                       for p in collection.embeddings.directory.rglob("*.npy")}
        from sqlalchemy import select

        from indexing.catalog import EmbeddingShard
        with collection.catalog.session() as session:
            assert shard_files == set(session.scalars(select(EmbeddingShard.file)))


# -- end to end with the real default encoder -------------------------------------------------
def test_default_encoder_end_to_end_on_sample_images(tmp_path):
    try:
        from indexing.encoders import load_encoder
    except ImportError as error:
        pytest.skip(f"indexing.encoders is not available yet: {error}")
    if not SAMPLE_CSV.exists():
        pytest.skip("the sample corpus (data/sample/captions.csv) is not built")
    with SAMPLE_CSV.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:20]
    subset = tmp_path / "subset.csv"
    for row in rows:
        row["file"] = str(SAMPLE_CSV.parent / row["file"])
    _write_rows_csv(subset, rows)
    try:
        encoder = load_encoder("default")
        encoder.encode_texts(["warm-up"])
        encoder.encode_images([rows[0]["file"]], num_workers=0)
    except Exception as error:  # weights or their packages are not on this machine yet
        pytest.skip(f"the default encoder cannot load here: {type(error).__name__}: {error}")
    report = build_collection(subset, tmp_path / "coll", encoder=encoder, progress=False)
    assert report.added == 20 and not report.rejected
    with Collection.open(tmp_path / "coll") as collection:
        assert collection.encoder_name == encoder.name and collection.dim == encoder.dim
        assert_catalog_matches_index(collection)
        query = encoder.encode_texts([rows[0]["caption"]])
        hits = collection.search(query, k=20)[0]
        assert len(hits) == 20
        assert rows[0]["caption"] in [hit.caption for hit in hits[:10]]
