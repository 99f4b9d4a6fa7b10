"""Writers in several processes against one PostgreSQL catalog (a cluster's shared catalog).

Each process stands for a machine: they share the collection folder (as a cluster shares a
network file system) and the catalog. Where the folder's lock files do not see each other
(a file system without working flock, simulated by a lock that excludes no one), the
catalog's own writer lock must still make the writers take turns, or one writer's clean-up
deletes another's fresh embedding files and two index builds race.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import ToyEncoder, make_image
from sqlalchemy import inspect, text
from test_collection_parts import HOLD_LOCK, REPO, _process_context
from test_pipeline import assert_catalog_matches_index

from indexing.catalog import CatalogError, IndexState, open_catalog
from indexing.collection import Collection, CollectionBusyError, NewItem
from indexing.pipeline import build_collection
from indexing.readers import file_uri
from sce_correct.errors import SceError

pytestmark = pytest.mark.postgres


@pytest.fixture
def catalog_backend() -> str:
    """These tests are about PostgreSQL only (SQLite is one machine's file)."""
    return "postgres"


class LockThatExcludesNoOne:
    """Stands in for ``filelock.FileLock`` on a file system where locks are not shared."""

    def __init__(self, *args, **kwargs) -> None:
        self.lock_counter = 0

    @property
    def is_locked(self) -> bool:
        return self.lock_counter > 0

    def acquire(self, timeout=None, **kwargs):
        self.lock_counter += 1
        return self

    def release(self, force: bool = False) -> None:
        self.lock_counter = 0 if force else max(0, self.lock_counter - 1)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _build_until_done(root: str, db: str, listing: str, folder_locks: bool, worker: int,
                      barrier, results) -> None:
    """Build ``listing`` into the collection, retrying while another writer holds it."""
    try:
        if not folder_locks:
            import indexing.collection

            indexing.collection.FileLock = LockThatExcludesNoOne
        barrier.wait(timeout=60)
        encoder = ToyEncoder()
        for attempt in range(1, 1201):
            try:
                report = build_collection(listing, root, db=db, encoder=encoder, progress=False,
                                          batch_size=3, shard_size=3)
                results.put((worker, "ok", report.added, attempt))
                return
            except CollectionBusyError:
                time.sleep(0.025)
        results.put((worker, "still busy", 0, attempt))
    except SceError as error:
        results.put((worker, "sce", str(error), 0))
    except BaseException as error:  # noqa: BLE001 - reported to the test, which fails on it
        results.put((worker, "bug", f"{type(error).__name__}: {error}", 0))


@pytest.mark.parametrize("folder_locks", [True, False], ids=["shared-lock-files", "unshared-lock-files"])
def test_concurrent_writers_add_every_item_once(tmp_path, catalog_url, folder_locks):
    """Three processes build disjoint listings into one new collection at the same moment."""
    workers, per_worker = 3, 7
    listings = []
    for worker in range(workers):
        folder = tmp_path / f"listing{worker}"
        for n in range(per_worker):
            make_image(folder / f"{n}.png", seed=1000 * worker + n)
        listings.append(folder)
    root = tmp_path / "coll"
    context = _process_context()
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_build_until_done,
                                 args=(str(root), catalog_url, str(listings[w]), folder_locks, w, barrier, results))
                 for w in range(workers)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=240) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert [outcome[1] for outcome in outcomes] == ["ok"] * workers, outcomes
    assert [outcome[2] for outcome in outcomes] == [per_worker] * workers, outcomes

    with Collection.open(root, db=catalog_url) as collection:
        ids = collection.item_ids()
        records = collection.items(ids)
        expected = {file_uri(folder / f"{n}.png") for folder in listings for n in range(per_worker)}
        assert len(ids) == len(set(ids.tolist())) == workers * per_worker  # each item once, ids unique
        assert {record.uri for record in records.values()} == expected  # no lost rows
        assert not collection.failures()
        # stored vectors are each item's own encoding, and the index holds exactly the catalog
        assert_catalog_matches_index(collection, ToyEncoder())
        versions = collection.versions(include_retired=True)
        assert [v.state for v in versions if v.kind == "image"].count(IndexState.READY) == 1
        assert not [v for v in versions if v.state in (IndexState.BUILDING, IndexState.FAILED)]
        assert collection.embeddings.remove_unreferenced_files() == 0  # every shard file committed


def _create_at_once(root: str, db: str, barrier, results) -> None:
    import indexing.catalog as catalog_module

    failed_creates = []
    waiting = catalog_module._wait_for_schema
    catalog_module._wait_for_schema = lambda *args: failed_creates.append(1) or waiting(*args)
    try:
        barrier.wait(timeout=60)
        with Collection.open(root, db=db, create=True) as collection:
            collection.bind_encoder("toy", 4)
            results.put(("ok" if not failed_creates else "a create failed", collection.encoder_name))
    except BaseException as error:  # noqa: BLE001
        results.put(("error", f"{type(error).__name__}: {error}"))


@pytest.mark.parametrize("folders", ["one folder", "two folders"])
def test_two_processes_create_the_same_new_collection_at_once(tmp_path, new_catalog_url, folders):
    """Both end up with the one schema and encoder; the one that came second waited for it
    rather than failing a CREATE TABLE (with two folders no lock file is shared at all)."""
    context = _process_context()
    for round_ in range(4):
        db = new_catalog_url()
        roots = [tmp_path / f"r{round_}" / ("a" if folders == "one folder" else name) for name in "ab"]
        barrier, results = context.Barrier(2), context.Queue()
        processes = [context.Process(target=_create_at_once, args=(str(root), db, barrier, results))
                     for root in roots]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        assert outcomes == [("ok", "toy")] * 2
        with Collection.open(roots[1], db=db) as collection:
            assert collection.catalog.get_info("schema_version") == "1" and collection.dim == 4


def _open_at_once(url: str, barrier, results) -> None:
    try:
        barrier.wait(timeout=60)
        catalog = open_catalog(url)
        results.put(("ok", catalog.get_info("schema_version")))
        catalog.dispose()
    except BaseException as error:  # noqa: BLE001
        results.put(("error", f"{type(error).__name__}: {error}"))


def test_processes_upgrading_one_catalog_at_once_migrate_it_once(catalog_url, monkeypatch):
    """The migration (here an ALTER TABLE, which fails when run twice) runs in one of them;
    the others wait on the schema lock and then find the catalog upgraded."""
    import indexing.catalog as catalog_module

    open_catalog(catalog_url).dispose()
    version = catalog_module.SCHEMA_VERSION

    def add_column(connection) -> None:
        connection.execute(text("ALTER TABLE items ADD COLUMN rating INTEGER"))

    monkeypatch.setattr(catalog_module, "SCHEMA_VERSION", version + 1)  # inherited by the forks
    monkeypatch.setitem(catalog_module.MIGRATIONS, version, add_column)
    context = _process_context()
    barrier, results = context.Barrier(3), context.Queue()
    processes = [context.Process(target=_open_at_once, args=(catalog_url, barrier, results)) for _ in range(3)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert outcomes == [("ok", str(version + 1))] * 3
    catalog = open_catalog(catalog_url)
    assert "rating" in {column["name"] for column in inspect(catalog.engine).get_columns("items")}
    catalog.dispose()


def test_the_catalog_lock_excludes_a_writer_with_another_folder(tmp_path, catalog_url, new_catalog_url):
    """Two machines' collection objects (each its own folder, so no shared lock file) on one
    catalog: while one writes, the other is refused; afterwards it may write. Another
    catalog on the same server is not blocked."""
    first = Collection.open(tmp_path / "machine-a", db=catalog_url, create=True)
    second = Collection.open(tmp_path / "machine-b", db=catalog_url)
    elsewhere = Collection.open(tmp_path / "machine-c", db=new_catalog_url(), create=True)
    try:
        with first.writing():
            with first.writing():  # re-entrant in the holder
                first.bind_encoder("toy", 4)
            with pytest.raises(CollectionBusyError, match="another process is writing.*catalog"):
                with second.writing():
                    pass
            with elsewhere.writing():
                pass
        with second.writing():
            second.add_items([], None)
        with pytest.raises(CollectionBusyError):
            with second.writing(), first.writing():
                pass
        first.add_items([], None)  # released by the refused block above too
        vectors = np.ones((1, 4), np.float32)
        assert second.add_items([NewItem("/x", "x", 1, 1)], vectors) == [1]
    finally:
        for collection in (first, second, elsewhere):
            collection.close()


def test_threads_sharing_the_write_lock_keep_the_catalog_lock_until_the_last_leaves(tmp_path, catalog_url):
    """The lock file is process-wide (threads share it); so is the catalog lock: the first
    thread to leave must not free it while another thread of the process still writes."""
    holder = Collection.open(tmp_path / "a", db=catalog_url, create=True)
    other = Collection.open(tmp_path / "b", db=catalog_url)
    entered, leave_first = threading.Event(), threading.Event()

    def first_writer() -> None:
        with holder.writing():
            entered.set()
            leave_first.wait(30)

    try:
        thread = threading.Thread(target=first_writer)
        thread.start()
        assert entered.wait(30)
        with holder.writing():  # a second thread of the same process, inside while the first is
            leave_first.set()
            thread.join(30)
            with pytest.raises(CollectionBusyError):  # still held for this block
                with other.writing():
                    pass
        with other.writing():  # free once the last one left
            pass
        with holder.writing():  # and the refused attempts left nothing behind
            pass
    finally:
        holder.close()
        other.close()


def test_a_server_gone_while_open_is_one_catalog_error_when_writing(tmp_path, catalog_url, postgres_server):
    collection = Collection.open(tmp_path / "coll", db=catalog_url, create=True)
    try:
        with collection.writing():  # leaves a pooled connection behind
            pass
        postgres_server.drop_databases()  # ends this collection's connections too
        for _ in range(2):  # a pooled connection the server ended, then none to be had
            with pytest.raises(CatalogError, match="cannot lock the catalog .* for writing") as caught:
                with collection.writing():
                    pass
            assert "\n" not in str(caught.value)
            assert not collection._lock.is_locked  # the lock file was let go again
    finally:
        collection.close()


def test_a_killed_writers_catalog_lock_is_released(tmp_path, catalog_url):
    """The lock belongs to the holder's database session: a SIGKILL ends it."""
    root = tmp_path / "coll"
    Collection.open(root, db=catalog_url, create=True).close()
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(root), db=catalog_url)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert process.stdout.readline().strip() == "locked", process.stderr.read()
        with Collection.open(tmp_path / "other-folder", db=catalog_url) as collection:
            with pytest.raises(CollectionBusyError, match="catalog"):
                with collection.writing():
                    pass
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            deadline = time.monotonic() + 30
            while True:  # the server notices the closed connection at once, but asynchronously
                try:
                    with collection.writing():
                        break
                except CollectionBusyError:
                    assert time.monotonic() < deadline, "the killed writer's lock was never released"
                    time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
