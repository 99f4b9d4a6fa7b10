"""`sce index import` / `sce index export` (clip-retrieval's layout) and `sce search --vector --json`.

Embedding folders are written here with numpy and pyarrow directly, as clip-retrieval writes
them, so the reader is checked against the format, not against our own writer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ToyEncoder, make_image, write_csv
from toy_cli import toy_load_encoder
from typer.testing import CliRunner

import indexing
from indexing.collection import Collection
from indexing.embedding_import import import_embeddings
from retrieval.search import Retriever
from ui.cli import app

runner = CliRunner()
DIM = 16
TOY = "toy"  # resolved to the ToyEncoder (name toy-projection-16) by toy_load_encoder


@pytest.fixture(autouse=True)
def toy_specs(monkeypatch):
    monkeypatch.setattr(indexing, "load_encoder", toy_load_encoder(indexing.load_encoder))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_layout(root: Path, shards, *, text: bool = True, names=("img_emb_{}.npy", "text_emb_{}.npy",
                                                                   "metadata_{}.parquet")) -> Path:
    """shards: [(image vectors, text vectors or None, {column: values})], written as clip-retrieval does."""
    for number, (images, texts, columns) in enumerate(shards):
        for folder, array, name in (("img_emb", images, names[0]), ("text_emb", texts if text else None, names[1])):
            if array is not None:
                (root / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / folder / name.format(number), array)
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), root / "metadata" / names[2].format(number))
    return root


def random_shards(sizes=(30, 20), dtype="float16", seed=0, start=0):
    rng = np.random.default_rng(seed)
    shards, row = [], start
    for size in sizes:
        images = rng.standard_normal((size, DIM)).astype(dtype)
        texts = rng.standard_normal((size, DIM)).astype(dtype)
        rows = range(row, row + size)
        columns = {
            "image_path": [f"/data/img_{i:05d}.jpg" for i in rows],
            "caption": [None if i % 7 == 3 else f"caption {i}" for i in rows],
            "tone": ["dark" if i % 3 == 0 else "light" for i in rows],
            "score": [float(i) / 10 for i in rows],
        }
        shards.append((images, texts, columns))
        row += size
    return shards


def catalog_state(coll: Path):
    """Everything an import could change: the catalog's rows and the collection's files."""
    if not coll.exists():
        return None
    with Collection.open(coll) as opened:
        info = opened.info()
        ids = opened.item_ids()
        items = sorted((r.uri, r.caption, json.dumps(r.metadata, sort_keys=True)) for r in opened.items(ids).values())
        state = (info.encoder, info.dim, info.items, sorted(info.embeddings.items()),
                 sorted((v.name, v.state, v.count) for v in info.versions), items)
    files = sorted(str(p.relative_to(coll)) for p in coll.rglob("*") if p.is_file() and p.suffix != ".lock"
                   and not p.name.startswith("catalog.sqlite"))
    return state, files


# -- import ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("text", [True, False], ids=["text_emb", "no-text_emb"])
def test_import_stores_the_vectors_and_rows_as_given(tmp_path, dtype, text):
    shards = random_shards(dtype=dtype)
    emb = write_layout(tmp_path / "emb", shards, text=text)
    coll = tmp_path / "coll"
    result = invoke("index", "import", emb, "-c", coll, "--encoder", TOY, "-q")
    assert result.exit_code == 0, result.output
    assert "imported 50 items" in result.output
    images = np.concatenate([s[0] for s in shards])
    texts = np.concatenate([s[1] for s in shards])
    meta = {key: sum((s[2][key] for s in shards), []) for key in shards[0][2]}
    with Collection.open(coll) as opened:
        assert opened.encoder_name == ToyEncoder().name and opened.dim == DIM
        ids = opened.item_ids()
        records = opened.items(ids)
        by_uri = {records[i].uri: i for i in ids.tolist()}
        assert list(by_uri) == meta["image_path"]  # ids in row order
        order = np.array([by_uri[uri] for uri in meta["image_path"]])
        for row, item_id in enumerate(order.tolist()):
            record = records[item_id]
            assert record.caption == meta["caption"][row]
            assert record.metadata == {"tone": meta["tone"][row], "score": meta["score"][row]}
        stored = opened.embeddings.get("image", order)
        assert np.array_equal(stored, images.astype(np.float32))  # float16 kept as float16: exact
        captioned = np.array([c is not None for c in meta["caption"]])
        if text:
            caption_ids = opened.embeddings.ids("caption")
            assert np.array_equal(np.sort(caption_ids), np.sort(order[captioned]))
            assert np.array_equal(opened.embeddings.get("caption", order[captioned]),
                                  texts[captioned].astype(np.float32))
        else:
            assert opened.embeddings.count("caption") == 0
        # search by vector against brute force
        retriever = Retriever(opened)
        q = np.random.default_rng(5).standard_normal(DIM)
        hits = retriever.search(q, 10).hits
        brute = order[np.argsort(-(unit(images.astype(np.float32)) @ unit(q)))[:10]]
        assert [h.item_id for h in hits] == brute.tolist()
        if text:  # caption search works on the imported text embeddings
            row = int(np.flatnonzero(captioned)[4])
            top = retriever.search(texts[row].astype(np.float64), 1, kind="caption").hits[0]
            assert top.item_id == order[row] and top.score == pytest.approx(1.0, abs=1e-5)


def test_zero_padded_shard_numbers_are_read_in_number_order(tmp_path):
    shards = random_shards(sizes=(3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13))
    emb = write_layout(tmp_path / "emb", shards, names=("img_emb_{:02d}.npy", "text_emb_{:02d}.npy",
                                                        "metadata_{:02d}.parquet"))
    with Collection.open(tmp_path / "coll", create=True) as opened:
        report = import_embeddings(opened, emb, encoder_spec=TOY, progress=False)
        assert report.added == report.rows == sum(range(3, 14)) and report.shards == 11
        uris = [r.uri for r in sorted(opened.items(opened.item_ids()).values(), key=lambda r: r.id)]
    assert uris == sum((s[2]["image_path"] for s in shards), [])


def test_import_is_idempotent_and_adds_only_new_paths(tmp_path):
    shards = random_shards()
    emb = write_layout(tmp_path / "emb", shards)
    coll = tmp_path / "coll"
    assert invoke("index", "import", emb, "-c", coll, "--encoder", TOY, "-q").exit_code == 0
    before = catalog_state(coll)
    again = invoke("index", "import", emb, "-c", coll, "-q")  # the collection's encoder by default
    assert again.exit_code == 0, again.output
    assert "imported 0 items" in again.output and "50 already in the collection" in again.output
    assert catalog_state(coll)[0] == before[0]
    # a second folder: 10 known paths, 15 new ones, one of them listed twice
    more = random_shards(sizes=(26,), seed=3, start=40)
    more[0][2]["image_path"][-1] = more[0][2]["image_path"][-2]
    emb2 = write_layout(tmp_path / "emb2", more)
    with Collection.open(coll) as opened:
        report = import_embeddings(opened, emb2, encoder_spec=TOY, progress=False)
        assert (report.added, report.already_known, report.repeated_paths) == (15, 10, 1)
        assert opened.items_store.count() == 65 and opened.current_version("image").count == 65
        first = opened.items(opened.item_ids())
        assert {r.uri for r in first.values()} == {f"/data/img_{i:05d}.jpg" for i in range(65)}


def test_import_into_a_collection_of_another_encoder_or_dimension_is_refused(tmp_path):
    emb = write_layout(tmp_path / "emb", random_shards())
    coll = tmp_path / "coll"
    assert invoke("index", "import", emb, "-c", coll, "--encoder", TOY, "-q").exit_code == 0
    before = catalog_state(coll)
    line = one_error_line(invoke("index", "import", emb, "-c", coll, "--encoder", "hf-hub:laion/CLIP-ViT-B-32", "-q"))
    assert "toy-projection-16" in line and "hf-hub:laion/CLIP-ViT-B-32" in line
    rng = np.random.default_rng(1)
    narrow = write_layout(tmp_path / "narrow", [(rng.standard_normal((4, 8)).astype("float32"), None,
                                                 {"image_path": [f"/n/{i}.png" for i in range(4)]})])
    line = one_error_line(invoke("index", "import", narrow, "-c", coll, "-q"))
    assert "dimension 8" in line or "dim 8" in line
    assert catalog_state(coll) == before


def _bad_layouts():
    """(name, how to damage a good two-shard folder, the file the message must name)."""
    def rows_mismatch(root):
        np.save(root / "img_emb" / "img_emb_1.npy", np.ones((19, DIM), "float16"))
        return "img_emb_1.npy"

    def text_rows_mismatch(root):
        np.save(root / "text_emb" / "text_emb_0.npy", np.ones((31, DIM), "float16"))
        return "text_emb_0.npy"

    def missing_image_shard(root):
        (root / "img_emb" / "img_emb_0.npy").unlink()
        return "img_emb_0.npy"

    def missing_metadata_shard(root):
        (root / "metadata" / "metadata_1.parquet").unlink()
        return "metadata_1.parquet"

    def missing_text_shard(root):
        (root / "text_emb" / "text_emb_1.npy").unlink()
        return "text_emb_1.npy"

    def gap_in_numbers(root):
        for folder, stem, suffix in (("img_emb", "img_emb_", ".npy"), ("text_emb", "text_emb_", ".npy"),
                                     ("metadata", "metadata_", ".parquet")):
            (root / folder / f"{stem}1{suffix}").rename(root / folder / f"{stem}2{suffix}")
        return "_1."

    def dims_differ(root):
        np.save(root / "img_emb" / "img_emb_1.npy", np.ones((20, DIM + 1), "float16"))
        return "img_emb_1.npy"

    def text_dim_differs(root):
        np.save(root / "text_emb" / "text_emb_1.npy", np.ones((20, DIM - 1), "float16"))
        return "text_emb_1.npy"

    def nan_row(root):
        array = np.load(root / "img_emb" / "img_emb_1.npy")
        array[7, 3] = np.nan
        np.save(root / "img_emb" / "img_emb_1.npy", array)
        return "img_emb_1.npy: row 7"

    def inf_text_row(root):
        array = np.load(root / "text_emb" / "text_emb_0.npy")
        array[2, 0] = np.inf
        np.save(root / "text_emb" / "text_emb_0.npy", array)
        return "text_emb_0.npy: row 2"

    def one_d(root):
        np.save(root / "img_emb" / "img_emb_0.npy", np.ones(30, "float32"))
        return "img_emb_0.npy"

    def three_d(root):
        np.save(root / "img_emb" / "img_emb_0.npy", np.ones((30, 4, 4), "float32"))
        return "img_emb_0.npy"

    def integers(root):
        np.save(root / "img_emb" / "img_emb_0.npy", np.ones((30, DIM), "int32"))
        return "img_emb_0.npy"

    def not_npy(root):
        (root / "img_emb" / "img_emb_1.npy").write_bytes(b"not numpy at all")
        return "img_emb_1.npy"

    def not_parquet(root):
        (root / "metadata" / "metadata_0.parquet").write_bytes(b"PAR1 broken")
        return "metadata_0.parquet"

    def no_image_path_column(root):
        table = pq.read_table(root / "metadata" / "metadata_1.parquet").rename_columns(
            ["path", "caption", "tone", "score"])
        pq.write_table(table, root / "metadata" / "metadata_1.parquet")
        return "metadata_1.parquet"

    def null_image_path(root):  # found while writing: the transaction rolls back shard 0 too
        table = pq.read_table(root / "metadata" / "metadata_1.parquet").to_pydict()
        table["image_path"][5] = None
        pq.write_table(pa.table(table), root / "metadata" / "metadata_1.parquet")
        return "metadata_1.parquet, row 6"

    def empty_folder(root):
        for path in sorted(root.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        return "not an embedding folder"

    return [rows_mismatch, text_rows_mismatch, missing_image_shard, missing_metadata_shard, missing_text_shard,
            gap_in_numbers, dims_differ, text_dim_differs, nan_row, inf_text_row, one_d, three_d, integers,
            not_npy, not_parquet, no_image_path_column, null_image_path, empty_folder]


@pytest.mark.parametrize("damage", _bad_layouts(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_a_bad_folder_is_one_line_naming_the_file_and_changes_nothing(tmp_path, damage, existing):
    coll = tmp_path / "coll"
    if existing:  # a collection with other items already in it
        good = write_layout(tmp_path / "good", random_shards(sizes=(5,), seed=9, start=1000))
        assert invoke("index", "import", good, "-c", coll, "--encoder", TOY, "-q").exit_code == 0
    before = catalog_state(coll)
    emb = write_layout(tmp_path / "emb", random_shards())
    named = damage(emb)
    line = one_error_line(invoke("index", "import", emb, "-c", coll, "--encoder", TOY, "-q"))
    assert named in line, line
    assert catalog_state(coll) == before  # a new collection is not even created
    if existing:  # and the folder imports once repaired
        emb2 = write_layout(tmp_path / "emb2", random_shards())
        assert invoke("index", "import", emb2, "-c", coll, "-q").exit_code == 0


def test_a_failure_while_writing_rolls_everything_back(tmp_path, monkeypatch):
    from indexing.embedding_store import EmbeddingStore

    emb = write_layout(tmp_path / "emb", random_shards(sizes=(30, 20, 10)))
    coll = tmp_path / "coll"
    good = write_layout(tmp_path / "good", random_shards(sizes=(5,), seed=9, start=1000))
    assert invoke("index", "import", good, "-c", coll, "--encoder", TOY, "-q").exit_code == 0
    before = catalog_state(coll)
    real, calls = EmbeddingStore.write, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # shards 0 and 1 written (image + caption), then the disk fills up
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingStore, "write", failing)
    line = one_error_line(invoke("index", "import", emb, "-c", coll, "-q"))
    assert "No space left" in line
    assert catalog_state(coll) == before
    monkeypatch.setattr(EmbeddingStore, "write", real)
    assert invoke("index", "import", emb, "-c", coll, "-q").exit_code == 0
    assert catalog_state(coll)[0][2] == 65


def test_a_killed_import_leaves_all_or_nothing_and_a_rerun_completes_it(tmp_path):
    """SIGKILL a real `sce index import` process part way: nothing is committed (not even the
    encoder), and the rerun ends where an uninterrupted import ends (no orphan embedding files)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    emb = write_layout(tmp_path / "emb", random_shards(sizes=(10000, 10000, 10000), dtype="float32"))
    cli = [sys.executable, str(Path(__file__).with_name("toy_cli.py")), "index", "import", str(emb), "--encoder", TOY,
           "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    reference = tmp_path / "reference"
    subprocess.run([*cli, "-c", str(reference)], check=True, env=env, capture_output=True)
    coll = tmp_path / "coll"
    process = subprocess.Popen([*cli, "-c", str(coll)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((coll / "embeddings" / "image").glob("*.npy")) and time.monotonic() < deadline:
        time.sleep(0.01)  # the first embedding file of the (uncommitted) transaction is written
    process.send_signal(signal.SIGKILL)
    process.wait()
    # killed within ~10 ms of its first write, long before the one commit: nothing is in the catalog
    assert list((coll / "embeddings" / "image").glob("*.npy"))
    with Collection.open(coll) as opened:
        assert opened.items_store.count() == 0 and opened.encoder_name is None
    rerun = subprocess.run([*cli, "-c", str(coll)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    (got, _), (want, _) = catalog_state(coll), catalog_state(reference)
    assert got[:4] == want[:4] and got[5] == want[5]  # encoder, dim, counts, every item's row
    assert [(state, count) for _, state, count in got[4]] == [(state, count) for _, state, count in want[4]]
    with Collection.open(coll) as opened:
        referenced = {Path(p).name for p in opened.embeddings.catalog.engine.connect().exec_driver_sql(
            "SELECT file FROM embedding_shards").scalars()}
    assert {p.name for p in (coll / "embeddings").rglob("*.npy")} == referenced  # the killed run's files are gone


# -- search by vector -------------------------------------------------------------------------
@pytest.fixture
def built(tmp_path):
    """A toy collection built from images, with a correction fitted (not re-indexed)."""
    rows = []
    for i in range(40):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i)
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"item {i}" if i % 5 else "",
                     "tone": "dark" if i % 3 == 0 else "light", "n": str(i)})
    listing = write_csv(tmp_path / "list.csv", rows, ["file", "caption", "tone", "n"])
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(12)))
    coll = tmp_path / "coll"
    assert invoke("index", "build", listing, "-c", coll, "--encoder", TOY, "-q").exit_code == 0
    fitted = invoke("correct", "fit", "--concept", concept, "--name", "no-tone", "--components", "2", "-c", coll, "-q")
    assert fitted.exit_code == 0, fitted.output
    return tmp_path, coll


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


@pytest.mark.parametrize("extra", [(), ("--correction", "no-tone"), ("--correction", "no-tone", "--strategy", "query"),
                                   ("--kind", "caption")], ids=["plain", "corrected", "query-side", "caption"])
def test_search_vector_json_equals_the_retriever(built, extra):
    tmp, coll = built
    queries = np.random.default_rng(3).standard_normal((4, DIM)).astype("float32")
    np.save(tmp / "q.npy", queries)
    result = invoke("search", "--vector", tmp / "q.npy", "-k", "7", "--json", *extra, "-c", coll)
    assert result.exit_code == 0, result.output
    objects = json_lines(result.output)
    assert len(objects) == 4
    options = dict(zip(extra[::2], extra[1::2]))
    with Collection.open(coll) as opened:
        retriever = Retriever(opened)
        for number, (row, data) in enumerate(zip(queries, objects)):
            expected = retriever.search(row, 7, kind=options.get("--kind", "image"),
                                        correction=options.get("--correction"),
                                        strategy=options.get("--strategy", "auto")).hits
            assert data["query"] == number and isinstance(data["ms"], float) and data["ms"] >= 0
            assert [h["id"] for h in data["hits"]] == [h.item_id for h in expected]
            assert [h["score"] for h in data["hits"]] == pytest.approx([h.score for h in expected], abs=1e-6)
            assert [(h["uri"], h["caption"], h["metadata"]) for h in data["hits"]] == \
                [(h.uri, h.caption, h.metadata) for h in expected]
    one = invoke("search", "--vector", tmp / "q1.npy", "-c", coll)  # missing file: one line
    assert "q1.npy" in one_error_line(one)
    np.save(tmp / "single.npy", queries[0])  # shape (d,)
    single = json_lines(invoke("search", "--vector", tmp / "single.npy", "-k", "3", "--json", *extra, "-c", coll).output)
    assert len(single) == 1 and [h["id"] for h in single[0]["hits"]] == [h["id"] for h in objects[0]["hits"]][:3]


def test_search_vector_ab_json_equals_compare(built):
    from retrieval.compare import compare

    tmp, coll = built
    queries = np.random.default_rng(8).standard_normal((2, DIM))
    np.save(tmp / "q.npy", queries)
    out = invoke("search", "--vector", tmp / "q.npy", "--ab", "no-tone", "-k", "6", "--json", "-c", coll)
    assert out.exit_code == 0, out.output
    lines = json_lines(out.output)
    with Collection.open(coll) as opened:
        retriever = Retriever(opened)
        for number, (row, data) in enumerate(zip(queries, lines)):
            expected = compare(retriever, row, "q", "no-tone", k=6)
            assert data["query"] == number and data["ms"] >= 0 and data["strategy"] == expected.strategy
            assert [h["id"] for h in data["corrected"]] == [h.item_id for h in expected.corrected]
            assert [h["id"] for h in data["original"]] == [h.item_id for h in expected.original]
            assert data["overlap_at_k"] == pytest.approx(expected.overlap_at_k)


def test_search_vector_with_nprobe_on_an_ivf_import(tmp_path):
    emb = write_layout(tmp_path / "emb", random_shards(sizes=(200, 100), dtype="float32"))
    coll = tmp_path / "coll"
    r = invoke("index", "import", emb, "-c", coll, "--encoder", TOY, "--factory", "IVF8,Flat", "-q")
    assert r.exit_code == 0, r.output
    queries = np.random.default_rng(4).standard_normal((3, DIM))
    np.save(tmp_path / "q.npy", queries)
    with Collection.open(coll) as opened:
        assert opened.current_version("image").factory == "IVF8,Flat"
        for nprobe in (1, 8):
            out = invoke("search", "--vector", tmp_path / "q.npy", "-k", "10", "--nprobe", nprobe, "--json", "-c", coll)
            assert out.exit_code == 0, out.output
            lines = json_lines(out.output)
            retriever = Retriever(opened, nprobe=nprobe)
            assert [[h["id"] for h in data["hits"]] for data in lines] == \
                [[h.item_id for h in retriever.search(q, 10).hits] for q in queries]
        brute = [set((np.argsort(-(unit(opened.embeddings.get("image", opened.item_ids())) @ unit(q)))[:10] + 1)
                     .tolist()) for q in queries]
        full = [set(h["id"] for h in d["hits"]) for d in json_lines(invoke(
            "search", "--vector", tmp_path / "q.npy", "-k", "10", "--nprobe", "8", "--json", "-c", coll).output)]
        assert full == brute  # all 8 lists visited: exact


def test_a_query_of_the_wrong_dimension_or_values_is_one_line(built):
    tmp, coll = built
    np.save(tmp / "wide.npy", np.ones((2, DIM + 3)))
    assert f"dimension {DIM + 3}" in one_error_line(invoke("search", "--vector", tmp / "wide.npy", "-c", coll))
    np.save(tmp / "cube.npy", np.ones((2, 2, DIM)))
    assert "cube.npy" in one_error_line(invoke("search", "--vector", tmp / "cube.npy", "-c", coll))
    bad = np.ones((3, DIM))
    bad[1, 2] = np.nan
    np.save(tmp / "nan.npy", bad)
    assert "row 1" in one_error_line(invoke("search", "--vector", tmp / "nan.npy", "-c", coll))
    both = invoke("search", "item 3", "--vector", tmp / "nan.npy", "-c", coll)
    assert "one of them" in one_error_line(both)


def test_text_queries_say_why_an_unloadable_encoder_fails_and_vectors_still_work(tmp_path):
    emb = write_layout(tmp_path / "emb", random_shards(dtype="float32"))
    coll = tmp_path / "coll"
    r = invoke("index", "import", emb, "-c", coll, "--encoder", "hf-hub:laion/CLIP-ViT-B-32", "-q")
    assert r.exit_code == 0, r.output
    line = one_error_line(invoke("search", "waving hand", "-c", coll))
    assert "hf-hub:laion/CLIP-ViT-B-32" in line and "cannot be loaded here" in line and "--vector" in line
    assert "invalid encoder spec" in line  # and why
    q = np.random.default_rng(2).standard_normal(DIM)
    np.save(tmp_path / "q.npy", q)
    out = invoke("search", "--vector", tmp_path / "q.npy", "-k", "5", "--json", "-c", coll)
    assert out.exit_code == 0, out.output
    hits = json_lines(out.output)[0]["hits"]
    images = np.concatenate([s[0] for s in random_shards(dtype="float32")])
    assert [h["id"] for h in hits] == (np.argsort(-(unit(images) @ unit(q)))[:5] + 1).tolist()


def test_weights_that_fail_to_load_on_first_use_are_one_line_too(tmp_path, monkeypatch):
    class Offline(ToyEncoder):  # a hub model: constructed fine, its weights fail to download
        def encode_texts(self, texts, batch_size=256, progress=False):
            raise RuntimeError("Failed to download weights for tag 'x': no network")

    monkeypatch.setattr(indexing, "load_encoder", lambda spec, device=None: Offline(name="offline"))
    emb = write_layout(tmp_path / "emb", random_shards(dtype="float32"))
    coll = tmp_path / "coll"
    assert invoke("index", "import", emb, "-c", coll, "--encoder", "offline", "-q").exit_code == 0
    line = one_error_line(invoke("search", "a dog", "-c", coll))
    assert "offline-16" in line and "cannot be loaded here" in line and "no network" in line and "--vector" in line


# -- export -----------------------------------------------------------------------------------
def read_folder(root: Path, which="img_emb"):
    shards = sorted((root / which).glob("*.npy"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    vectors = np.concatenate([np.load(p) for p in shards])
    tables = [pq.read_table(p).to_pylist() for p in sorted((root / "metadata").glob("*.parquet"),
                                                           key=lambda p: int(re.findall(r"\d+", p.name)[-1]))]
    return vectors, sum(tables, []), len(shards)


@pytest.mark.parametrize("float16", [False, True], ids=["float32", "float16"])
def test_export_then_import_round_trips(built, float16):
    tmp, coll = built
    out = tmp / "export"
    args = ["--float16"] if float16 else []
    r = invoke("index", "export", out, "-c", coll, "--shard-size", "15", *args, "-q")
    assert r.exit_code == 0, r.output
    assert "exported 40 image vectors" in r.output and "3 shard(s)" in r.output
    vectors, rows, shards = read_folder(out)
    assert shards == 3 and len(rows) == 40 and vectors.dtype == (np.float16 if float16 else np.float32)
    assert not [p for p in tmp.iterdir() if p.name.startswith(".export")]
    copy = tmp / "copy"
    r = invoke("index", "import", out, "-c", copy, "--encoder", TOY, "-q")
    assert r.exit_code == 0, r.output
    with Collection.open(coll) as a, Collection.open(copy) as b:
        ra = {r.uri: r for r in a.items(a.item_ids()).values()}
        rb = {r.uri: r for r in b.items(b.item_ids()).values()}
        assert set(ra) == set(rb)
        for uri, first in ra.items():
            second = rb[uri]
            assert (first.caption, first.metadata, first.sha256, first.width, first.height) == \
                (second.caption, second.metadata, second.sha256, second.width, second.height)
        ids_a = np.array([ra[u].id for u in sorted(ra)])
        ids_b = np.array([rb[u].id for u in sorted(ra)])
        tolerance = 2e-3 if float16 else 0
        for kind in ("image", "caption"):
            have = np.isin(ids_a, a.embeddings.ids(kind))
            assert np.array_equal(np.isin(ids_b, b.embeddings.ids(kind)), have)
            va, vb = a.embeddings.get(kind, ids_a[have]), b.embeddings.get(kind, ids_b[have])
            assert np.allclose(va, vb, rtol=tolerance, atol=tolerance)
        assert b.embeddings.count("caption") == 32  # the 8 uncaptioned items have none
        encoder = ToyEncoder()
        ra_ret, rb_ret = Retriever(a, encoder), Retriever(b, encoder)
        for query in ("item 3", "item 17", "tone 1"):
            for kind in ("image", "caption"):
                ha = [h.uri for h in ra_ret.search(ra_ret.embed_text(query), 10, kind=kind).hits]
                hb = [h.uri for h in rb_ret.search(rb_ret.embed_text(query), 10, kind=kind).hits]
                assert ha == hb


def test_export_of_a_correction_is_what_its_index_holds(built):
    from indexing.correction_store import load_correction

    tmp, coll = built
    with Collection.open(coll) as opened:
        ids = opened.item_ids()
        raw = opened.embeddings.get("image", ids).astype(np.float64)
        stored = load_correction(opened, "no-tone")
        P = stored.corrector.projection(n_components=2, mode="nullify")
    expected = unit(raw) @ P.T  # the projection of the unit stored vectors, kept at its length
    r = invoke("index", "export", tmp / "query-side", "--correction", "no-tone", "-c", coll, "-q")
    assert r.exit_code == 0 and "no re-indexed version" in r.output, r.output
    vectors, rows, _ = read_folder(tmp / "query-side")
    assert [row["id"] for row in rows] == ids.tolist()
    assert np.allclose(vectors, expected, atol=1e-5)
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)  # P x keeps its shorter length

    assert invoke("index", "reindex", "--correction", "no-tone", "-c", coll, "-q").exit_code == 0
    r = invoke("index", "export", tmp / "reindexed", "--correction", "no-tone", "-c", coll, "-q")
    assert r.exit_code == 0 and "index version image-no-tone" in r.output, r.output
    held, rows2, _ = read_folder(tmp / "reindexed")
    assert rows2 == rows and np.allclose(held, expected, atol=1e-5)
    with Collection.open(coll) as opened:
        _, index = opened.open_index(correction="no-tone")
        assert np.array_equal(held, index.index.reconstruct_batch(ids))
    # a paired re-index replaces it: the export follows the index, renormalised rows
    assert invoke("index", "reindex", "--correction", "no-tone", "--variant", "paired", "-c", coll, "-q").exit_code == 0
    invoke("index", "export", tmp / "paired", "--correction", "no-tone", "-c", coll, "-q")
    paired, _, _ = read_folder(tmp / "paired")
    assert np.allclose(np.linalg.norm(paired, axis=1), 1.0, atol=1e-5) and not np.allclose(paired, held, atol=1e-3)


def test_export_caption_kind_writes_text_emb(built):
    tmp, coll = built
    r = invoke("index", "export", tmp / "captions", "--kind", "caption", "-c", coll, "-q")
    assert r.exit_code == 0, r.output
    assert not (tmp / "captions" / "img_emb").exists()
    vectors, rows, _ = read_folder(tmp / "captions", "text_emb")
    with Collection.open(coll) as opened:
        ids = opened.embeddings.ids("caption")
        assert [row["id"] for row in rows] == ids.tolist()
        assert np.array_equal(vectors, opened.embeddings.get("caption", ids))
    line = one_error_line(invoke("index", "export", tmp / "x", "--correction", "no-tone", "--kind", "caption",
                                 "-c", coll, "-q"))
    assert "--kind image" in line and not (tmp / "x").exists()


def test_export_refuses_a_non_empty_folder_and_a_failed_export_leaves_nothing(built, monkeypatch):
    tmp, coll = built
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("mine")
    line = one_error_line(invoke("index", "export", tmp / "full", "-c", coll, "-q"))
    assert "not empty" in line and (tmp / "full" / "keep.txt").read_text() == "mine"
    (tmp / "empty").mkdir()
    assert invoke("index", "export", tmp / "empty", "-c", coll, "-q").exit_code == 0  # an empty folder is fine
    assert (tmp / "empty" / "img_emb" / "img_emb_0.npy").exists()

    import retrieval.embedding_export as export

    calls = []

    def failing_items(self, ids):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(5, "Input/output error")
        return real(self, ids)

    real = Collection.items
    monkeypatch.setattr(export, "CHUNK_ROWS", 8)
    monkeypatch.setattr(Collection, "items", failing_items)
    line = one_error_line(invoke("index", "export", tmp / "broken", "-c", coll, "-q"))
    assert "Input/output error" in line
    assert not (tmp / "broken").exists() and not [p for p in tmp.iterdir() if p.name.startswith(".broken")]
