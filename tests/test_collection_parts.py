"""The parts of a collection: metadata filters in SQL, parse_where, the retention rule for
retired index files (`sce index gc`), publish/retire atomicity, the write lock (filelock) and
creating one collection from several processes at once."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event, inspect
from typer.testing import CliRunner

from indexing.catalog import CatalogError, open_catalog
from indexing.collection import Collection, CollectionBusyError, NewItem
from indexing.items import metadata_text, parse_where
from sce_correct.errors import InputError, SceError
from ui.cli import app

REPO = Path(__file__).resolve().parents[1]

WEIRD_KEYS = ["tone", "a b", "tone.level", 'q"uote', "ap'os", "ü", "$x", "a[0]"]


def _collection(tmp_path: Path, metadata: list[dict], dim: int = 4, seed: int = 0,
                db: str | None = None) -> Collection:
    collection = Collection.open(tmp_path / "coll", db=db, create=True)
    collection.bind_encoder("toy", dim)
    vectors = np.random.default_rng(seed).standard_normal((len(metadata), dim)).astype(np.float32)
    items = [
        NewItem(uri=f"/img/{n}.png", sha256=f"{n:064d}", width=2, height=2,
                caption=None if n % 5 == 0 else f"item {n}", metadata=meta)
        for n, meta in enumerate(metadata)
    ]
    collection.add_items(items, vectors)
    return collection


# -- metadata filters in SQL ------------------------------------------------------------------
def _random_metadata(rng: np.random.Generator, count: int) -> list[dict]:
    values = ["dark", "light", "", "Dark", "ünï", "a,b", 'say "hi"', 3, 0, 1.5, True, False, None]
    rows = []
    for _ in range(count):
        row = {}
        for key in WEIRD_KEYS:
            if rng.random() < 0.8:  # some keys are missing
                row[key] = values[rng.integers(len(values))]
        rows.append(row)
    return rows


def test_sql_metadata_filter_matches_a_python_filter(tmp_path, catalog_url):
    rng = np.random.default_rng(7)
    collection = _collection(tmp_path, _random_metadata(rng, 120), db=catalog_url)
    records = collection.items(collection.item_ids())
    assert len(records) == 120
    probes = ["dark", "light", "", "Dark", "ünï", "a,b", 'say "hi"', "3", "0", "1.5", "true", "false",
              "None", "True", "nothing"]
    checked = 0
    for _ in range(60):
        keys = rng.choice(WEIRD_KEYS, size=rng.integers(1, 3), replace=False)
        where = {str(key): str(rng.choice(probes)) for key in keys}
        expected = sorted(
            r.id for r in records.values()
            if all(metadata_text(r.metadata.get(k)) == v for k, v in where.items())
        )
        assert collection.item_ids(where).tolist() == expected, where
        captioned = sorted(i for i in expected if records[i].caption)
        assert collection.item_ids(where, captioned=True).tolist() == captioned, where
        checked += bool(expected)
    assert checked > 10  # the probes select something, not only empty sets
    assert collection.item_ids({}).tolist() == sorted(records)
    collection.close()


def test_metadata_text_is_the_documented_spelling():
    assert [metadata_text(v) for v in (None, True, False, 3, 1.5, "x")] == ["", "true", "false", "3", "1.5", "x"]


def test_report_for_collection_uses_the_sql_filter(tmp_path, catalog_url):
    from conftest import ToyEncoder

    from retrieval.report import report_for_collection

    encoder = ToyEncoder(dim=4)
    metadata = [{"tone": "dark" if n % 3 == 0 else "light"} for n in range(30)]
    collection = Collection.open(tmp_path / "coll", db=catalog_url, create=True)
    collection.bind_encoder(encoder.name, encoder.dim)
    vectors = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    collection.add_items(
        [NewItem(uri=f"/img/{n}.png", sha256=f"{n:064d}", width=2, height=2, caption=f"item {n}",
                 metadata=meta) for n, meta in enumerate(metadata)],
        vectors,
    )
    report = report_for_collection(collection, encoder, where={"tone": "dark"}, n_modes=2, top=3)
    assert report.source.endswith(", 10 items")
    uris = {item.uri for mode in report.original_modes for item in mode.items}
    assert uris and all(int(Path(uri).stem) % 3 == 0 for uri in uris)
    with pytest.raises(InputError, match="0 captioned item"):
        report_for_collection(collection, encoder, where={"tone": "none"})
    collection.close()


# -- parse_where ---------------------------------------------------------------------------------
def test_parse_where_takes_cli_lists_and_ui_text():
    assert parse_where(None) == {} and parse_where("") == {} and parse_where([]) == {}
    # the CLI: one clause per --where; a value may hold commas
    assert parse_where(["tone = dark", "place=a, b"]) == {"tone": "dark", "place": "a, b"}
    # the UI textbox: semicolons or new lines between clauses (values keep their commas)
    assert parse_where("tone=dark; size = big\n\nkind=x, y;empty=") == {
        "tone": "dark", "size": "big", "kind": "x, y", "empty": ""}
    assert parse_where(["a=b=c"]) == {"a": "b=c"}  # the first '=' separates


@pytest.mark.parametrize("clauses, named", [
    (["tone"], "'tone'"), (["=dark"], "'=dark'"), ("tone=dark; oops", "'oops'"), ([" =x"], "'=x'"),
])
def test_parse_where_names_the_bad_clause(clauses, named):
    with pytest.raises(InputError, match=named):
        parse_where(clauses)


def test_sce_report_where_bad_clause_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["report", "--where", "nokey", "-c", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "nokey" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# -- retention of retired index files ----------------------------------------------------------
def _reindex(collection: Collection, correction: str, scale: float) -> str:
    with collection.new_index_version(correction=correction) as writer:
        for ids, raw in collection.embeddings.iter_chunks("image", exclude=writer.done_ids):
            writer.add(ids, raw * scale)
    return collection.current_version(correction=correction).name


def test_retired_files_are_kept_for_the_newest_versions_only(tmp_path, catalog_url):
    collection = _collection(tmp_path, [{} for _ in range(8)], db=catalog_url)
    original = collection.sync_index()
    queries = collection.embeddings.get("image", [3])
    names = [_reindex(collection, "flip", -1.0 if n % 2 else 1.0) for n in range(6)]
    versions = {v.name: v for v in collection.versions(include_retired=True)}
    files = {name: versions[name].file for name in names}
    # after each publish the rule keeps the newest two retired files: 6 built, 3 files left
    assert [files[name].exists() for name in names] == [False, False, False, True, True, True]
    assert [versions[name].state for name in names] == ["retired"] * 5 + ["ready"]
    assert original.file.exists()  # another (kind, correction): its current file is untouched
    index_files = sorted(p.name for p in collection.index_dir.glob("*.faiss"))
    assert index_files == sorted([original.file.name] + [files[n].name for n in names[3:]])

    report = collection.collect_garbage(keep=0)
    assert sorted(report.removed) == sorted(files[name] for name in names[3:5])
    assert report.freed_bytes > 0 and report.kept == []
    assert files[names[5]].exists() and original.file.exists()
    # searches still work, on the current versions
    assert collection.search(queries, k=1)[0][0].item_id == 3
    assert collection.search(queries, k=1, correction="flip")[0][0].item_id != 3  # flipped: -x
    collection.close()


def test_sce_index_gc_prints_what_it_removed(tmp_path, catalog_url):
    collection = _collection(tmp_path, [{} for _ in range(6)], db=catalog_url)
    collection.sync_index()
    names = [_reindex(collection, "c", 1.0 + n) for n in range(4)]
    versions = {v.name: v for v in collection.versions(include_retired=True)}
    collection.close()
    runner = CliRunner()
    db = ["--db", catalog_url]
    dry = runner.invoke(app, ["index", "gc", "-c", str(tmp_path / "coll"), *db, "--keep", "1", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would remove {versions[names[1]].file}" in dry.output and versions[names[1]].file.exists()
    result = runner.invoke(app, ["index", "gc", "-c", str(tmp_path / "coll"), *db, "--keep", "1"])
    assert result.exit_code == 0, result.output
    assert f"removed {versions[names[1]].file}" in result.output
    assert "removed 1 retired index files" in result.output
    assert not versions[names[1]].file.exists() and versions[names[2]].file.exists()
    assert versions[names[3]].file.exists()  # the current one
    again = runner.invoke(app, ["index", "gc", "-c", str(tmp_path / "coll"), *db, "--keep", "1"])
    assert "removed 0 retired index files" in again.output
    bad = runner.invoke(app, ["index", "gc", "-c", str(tmp_path / "none")])
    assert bad.exit_code == 1 and "no collection" in bad.output


# -- publish and retire in one transaction -------------------------------------------------------
def test_publish_and_retire_are_one_transaction(tmp_path, catalog_url):
    collection = _collection(tmp_path, [{} for _ in range(6)], db=catalog_url)
    first = _reindex(collection, "c", 1.0)

    def fail_on_ready(conn, cursor, statement, parameters, context, executemany):
        # the second statement of publishing: the new version becomes ready
        if statement.startswith("UPDATE index_versions") and "ready" in str(parameters):
            raise RuntimeError("the database failed while publishing")

    event.listen(collection.catalog.engine, "before_cursor_execute", fail_on_ready)
    with pytest.raises(RuntimeError, match="while publishing"):
        _reindex(collection, "c", 2.0)
    event.remove(collection.catalog.engine, "before_cursor_execute", fail_on_ready)
    # the retirement of the first version rolled back with it: it is still the current one
    states = {v.name: v.state for v in collection.versions(include_retired=True) if v.correction == "c"}
    assert states[first] == "ready"
    assert sorted(states.values()) == ["failed", "ready"]
    assert collection.current_version(correction="c").name == first
    assert len(collection.search(collection.embeddings.get("image", [2]), k=2, correction="c")[0]) == 2
    second = _reindex(collection, "c", 3.0)  # and the failed one resumes and publishes
    assert collection.current_version(correction="c").name == second
    assert collection.version(first).state == "retired"
    collection.close()


# -- the write lock (filelock) -------------------------------------------------------------------
HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from indexing.collection import Collection
    with Collection.open({root!r}, db={db!r}, create=True) as collection, collection.writing():
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_write_lock_is_released_when_its_holder_is_killed(tmp_path, catalog_url):
    root = tmp_path / "coll"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(root), db=catalog_url)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert process.stdout.readline().strip() == "locked", process.stderr.read()
        with Collection.open(root, db=catalog_url) as collection:
            with pytest.raises(CollectionBusyError, match="another process is writing"):
                with collection.writing():
                    pass
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            with collection.writing(), collection.writing():  # free now, and re-entrant
                collection.bind_encoder("toy", 4)
            assert collection.encoder_name == "toy"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- creating one collection from several processes at once -----------------------------------
def _process_context():
    """Forked processes where there is fork (a spawned one imports torch and faiss again:
    seconds each); the parent holds no database connection when they start."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _create_and_add(root: str, db: str, worker: int, barrier, results) -> None:
    try:
        barrier.wait(timeout=60)
        # all at once too: the index folder setting (an upsert), and the encoder (one binds,
        # the others agree)
        with Collection.open(root, db=db, create=True, index_dir=Path(root) / "idx") as collection:
            collection.bind_encoder("toy", 4)
            for attempt in range(200):  # writers take turns: retry while another one writes
                try:
                    collection.add_items(
                        [NewItem(uri=f"/img/{worker}.png", sha256=f"{worker:064d}", width=1, height=1)],
                        np.full((1, 4), worker + 1, dtype=np.float32),
                    )
                    break
                except CollectionBusyError:
                    time.sleep(0.02)
        results.put((worker, "ok", ""))
    except SceError as error:
        results.put((worker, "sce", str(error)))
    except BaseException as error:  # noqa: BLE001 - reported to the test, which fails on it
        results.put((worker, "bug", f"{type(error).__name__}: {error}"))


@pytest.mark.parametrize("rounds", [6])
def test_processes_creating_the_same_collection_at_once(tmp_path, new_catalog_url, rounds):
    context = _process_context()
    workers = 4
    for round_ in range(rounds):
        root, db = tmp_path / f"coll{round_}", new_catalog_url()
        barrier, results = context.Barrier(workers), context.Queue()
        processes = [context.Process(target=_create_and_add, args=(str(root), db, n, barrier, results))
                     for n in range(workers)]
        for process in processes:
            process.start()
        outcomes = sorted(results.get(timeout=180) for _ in processes)
        for process in processes:
            process.join(timeout=60)
        # every process created or opened the one catalog, and its item is in it; the create lock is gone
        assert not (root / ".create.lock").exists()
        assert [outcome[1] for outcome in outcomes] == ["ok"] * workers, outcomes
        with Collection.open(root, db=db) as collection:
            assert collection.encoder_name == "toy" and collection.dim == 4
            assert collection.catalog.get_info("schema_version") == "1"
            assert collection.index_dir == root / "idx"
            assert len(collection.item_ids()) == workers
            ids = collection.item_ids()
            stored = collection.embeddings.get("image", ids)
            records = collection.items(ids)
            for item_id, vector in zip(ids.tolist(), stored):
                assert vector[0] == int(Path(records[item_id].uri).stem) + 1


def _open_catalog_at_once(path: str, barrier, results) -> None:
    import indexing.catalog as catalog_module

    failed_creates = []  # a create that failed and fell back to waiting: the creators did not queue
    waiting = catalog_module._wait_for_schema
    catalog_module._wait_for_schema = lambda *args: failed_creates.append(1) or waiting(*args)
    try:
        barrier.wait(timeout=60)
        catalog = open_catalog(path)
        results.put(("ok" if not failed_creates else "a create failed", catalog.get_info("schema_version")))
        catalog.dispose()
    except BaseException as error:  # noqa: BLE001
        results.put(("error", f"{type(error).__name__}: {error}"))


def test_catalog_creation_is_idempotent_across_processes(new_catalog_url):
    """Without the collection's lock file too: open_catalog itself tolerates the race."""
    context = _process_context()
    for round_ in range(6):
        path = new_catalog_url()
        barrier, results = context.Barrier(4), context.Queue()
        processes = [context.Process(target=_open_catalog_at_once, args=(str(path), barrier, results))
                     for _ in range(4)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=180) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert outcomes == [("ok", "1")] * 4
        catalog = open_catalog(path, create=False)
        assert {"items", "catalog_info", "index_versions"} <= set(inspect(catalog.engine).get_table_names())
        catalog.dispose()


def _set_at_once(url: str, key: str, value: str, barrier, results) -> None:
    try:
        catalog = open_catalog(url)
        barrier.wait(timeout=60)
        with catalog.sessions.begin() as session:
            catalog.set_info(session, key, value)
        results.put(("ok", ""))
        catalog.dispose()
    except BaseException as error:  # noqa: BLE001
        results.put(("error", f"{type(error).__name__}: {error}"))


def test_processes_setting_one_new_setting_at_once(catalog_url):
    """Setting a key no process has set yet (e.g. two opens with --index-dir) is an upsert."""
    context = _process_context()
    open_catalog(catalog_url).dispose()
    for round_ in range(5):
        barrier, results = context.Barrier(4), context.Queue()
        processes = [context.Process(target=_set_at_once, args=(catalog_url, f"k{round_}", f"v{n}", barrier, results))
                     for n in range(4)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert outcomes == [("ok", "")] * 4
        catalog = open_catalog(catalog_url)
        assert catalog.get_info(f"k{round_}") in {f"v{n}" for n in range(4)}
        catalog.dispose()


def test_a_database_that_fails_is_one_catalog_error(tmp_path):
    garbage = tmp_path / "coll" / "catalog.sqlite"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(CatalogError) as caught:
        Collection.open(tmp_path / "coll")
    message = str(caught.value)
    assert "not a database" in message and "\n" not in message and "[SQL" not in message
    assert isinstance(caught.value, SceError)
    result = CliRunner().invoke(app, ["index", "info", "-c", str(tmp_path / "coll")])
    assert result.exit_code == 1 and "not a database" in result.output
    assert len(result.output.strip().splitlines()) == 1


# -- a refused build of a new collection leaves nothing behind --------------------------------
def _listing(tmp_path: Path, n: int = 3) -> Path:
    from conftest import make_image, write_csv

    rows = [{"file": str(make_image(tmp_path / "imgs" / f"{i}.png", seed=i)), "caption": f"item {i}"}
            for i in range(n)]
    return write_csv(tmp_path / "list.csv", rows, ["file", "caption"])


def _toy_encoders(monkeypatch) -> None:
    """Any spec but 'clip' and 'open_clip:' (which the real parser refuses) is the toy encoder."""
    import indexing
    from conftest import ToyEncoder

    real = indexing.load_encoder
    monkeypatch.setattr(indexing, "load_encoder",
                        lambda spec, device=None: real(spec) if spec in ("clip", "open_clip:") else ToyEncoder())


def _assert_no_collection(new: Path) -> None:
    result = CliRunner().invoke(app, ["index", "info", "-c", str(new)])
    assert result.exit_code == 1 and "no collection" in result.output, result.output


@pytest.mark.parametrize("options, fragment", [
    (["--encoder", "clip"], "invalid encoder spec 'clip'"),
    (["--encoder", "open_clip:"], "invalid encoder spec"),
    (["--factory", "IVF0,Nope"], "--factory 'IVF0,Nope' is not a faiss index factory string"),
    (["--factory", "Nope99"], "could not parse index string Nope99"),
])
@pytest.mark.parametrize("nested", [False, True])
def test_a_refused_build_of_a_new_collection_leaves_nothing(tmp_path, monkeypatch, options, fragment, nested):
    _toy_encoders(monkeypatch)
    listing = _listing(tmp_path)
    new = tmp_path / "a" / "b" / "new" if nested else tmp_path / "new"
    result = CliRunner().invoke(app, ["index", "build", str(listing), "-c", str(new), *options, "-q"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and fragment in lines[0], result.output
    assert "Error in" not in lines[0] and ".cpp" not in lines[0]
    assert not new.exists() and not (tmp_path / "a").exists()
    _assert_no_collection(new)


def test_a_new_collection_whose_build_fails_after_creating_it_is_removed(tmp_path, monkeypatch):
    _toy_encoders(monkeypatch)
    empty = tmp_path / "empty.csv"
    empty.write_text("file,caption\n")  # refused when read, after the catalog was created
    new = tmp_path / "x" / "new"
    result = CliRunner().invoke(app, ["index", "build", str(empty), "-c", str(new), "-q"])
    assert result.exit_code == 1 and "nothing listed" in result.output, result.output
    assert not (tmp_path / "x").exists()
    _assert_no_collection(new)


def test_a_refused_build_keeps_a_folder_that_existed(tmp_path, monkeypatch):
    _toy_encoders(monkeypatch)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")
    result = CliRunner().invoke(app, ["index", "build", str(_listing(tmp_path)), "-c", str(folder),
                                      "--factory", "Nope99", "-q"])
    assert result.exit_code == 1
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_a_failed_build_keeps_what_it_stored(tmp_path):
    collection = Collection.open(tmp_path / "new", create=True)
    assert collection.created_folder == tmp_path / "new"
    collection.bind_encoder("toy", 4)
    collection.add_items([NewItem(uri="/img/0.png", sha256="0" * 64, width=1, height=1)],
                         np.ones((1, 4), dtype=np.float32))
    assert collection.discard_if_unused() is False
    with Collection.open(tmp_path / "new") as reopened:
        assert len(reopened.item_ids()) == 1 and reopened.created_folder is None
        assert reopened.discard_if_unused() is False
    assert (tmp_path / "new").is_dir()


def test_creating_a_collection_leaves_no_create_lock(tmp_path, monkeypatch):
    from indexing.collection import CREATE_LOCK_FILENAME, LOCK_FILENAME

    _toy_encoders(monkeypatch)
    new = tmp_path / "new"
    for command in ("build", "build", "add"):  # create, then open it again twice
        result = CliRunner().invoke(app, ["index", command, str(_listing(tmp_path)), "-c", str(new), "-q"])
        assert result.exit_code == 0, result.output
        hidden = sorted(p.name for p in new.rglob(".*") if p.is_file())
        assert CREATE_LOCK_FILENAME not in hidden and hidden == [LOCK_FILENAME], hidden


# -- a damaged collection file is one InputError naming it -----------------------------------
@pytest.mark.parametrize("damage", ["truncated", "junk", "empty"])
def test_a_damaged_embedding_file_is_an_input_error_naming_it(tmp_path, damage):
    collection = _collection(tmp_path, [{}] * 6)
    [shard] = (tmp_path / "coll" / "embeddings").rglob("*.npy")
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[: len(data) // 2], "junk": b"not numpy " * 20, "empty": b""}[damage])
    with pytest.raises(InputError, match="damaged embedding file") as caught:
        collection.embeddings.get("image", collection.item_ids())
    assert str(shard) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(InputError, match=shard.name):
        list(collection.embeddings.iter_chunks("image"))
    collection.close()


def test_damaged_embedding_locations_in_the_catalog_are_an_input_error_naming_it(tmp_path):
    import sqlite3

    collection = _collection(tmp_path, [{}] * 6)
    collection.close()
    with sqlite3.connect(tmp_path / "coll" / "catalog.sqlite") as connection:
        connection.execute("""UPDATE embeddings SET "row" = 'x' WHERE item_id = 3""")
    with Collection.open(tmp_path / "coll") as reopened:
        with pytest.raises(InputError, match="damaged catalog: unreadable embedding locations") as caught:
            list(reopened.embeddings.iter_chunks("image"))
    assert "catalog.sqlite" in str(caught.value)
