"""Indexes bigger than memory: ``--factory auto``, on-disk IVF versions, tuned nprobe.

Seeded clustered vectors (a Gaussian mixture, unit-normed) stored in a real collection; every
recall is measured against brute force over the same stored vectors.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from indexing import index_factory, ondisk_ivf
from indexing.collection import Collection
from indexing.index_factory import choose_factory, parse_memory, resolve_factory
from indexing.items import NewItem
from retrieval.search import Retriever
from sce_correct.errors import InputError

REPO = Path(__file__).resolve().parents[1]
N, DIM, CENTERS = 20_000, 32, 64
FACTORY = "IVF64,Flat"
GB = 1 << 30


def mixture(n: int, dim: int, centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim)).astype(np.float32)
    x = means[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_collection(root: Path, vectors: np.ndarray, batch: int = 5000) -> Collection:
    coll = Collection.open(root, create=True)
    coll.bind_encoder("vectors", vectors.shape[1])
    for start in range(0, len(vectors), batch):
        items = [NewItem(uri=f"mem://{i}", sha256=hashlib.sha256(str(i).encode()).hexdigest(), width=1, height=1)
                 for i in range(start, min(start + batch, len(vectors)))]
        coll.add_items(items, vectors[start:start + batch])
    return coll


def exact_top(coll: Collection, queries: np.ndarray, k: int = 10) -> np.ndarray:
    chunks = [(ids.copy(), np.array(rows, dtype=np.float32)) for ids, rows in coll.embeddings.iter_chunks("image", 65536)]
    ids = np.concatenate([c[0] for c in chunks])
    vectors = np.concatenate([c[1] for c in chunks])
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :k]]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth)) / truth.size


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return mixture(N, DIM, CENTERS, seed=5)


@pytest.fixture(scope="module")
def ivf_collection(tmp_path_factory, vectors) -> Path:
    root = tmp_path_factory.mktemp("scale") / "coll"
    with make_collection(root, vectors) as coll:
        coll.sync_index("image", FACTORY)
    return root


# -- choose_factory -----------------------------------------------------------------------------
def test_choose_factory_rules():
    assert choose_factory(0, 384, 4 * GB) == "Flat"
    assert choose_factory(99_999, 384, 4 * GB) == "Flat"
    # 100k: nlist = power of two nearest 4 sqrt(n) = 1265 -> 1024; IVF-Flat fits 4 GB
    assert choose_factory(100_000, 384, 4 * GB) == "IVF1024,Flat"
    # 500k x 384 floats = 768 MB: IVF-Flat within 1 GB, SQ8 (1 byte per dim) within 256 MB
    assert choose_factory(500_000, 384, 1 * GB) == "IVF2048,Flat"
    assert choose_factory(500_000, 384, 256 << 20) == "IVF2048,SQ8"
    # from 1M vectors on the codes are quantized even when floats would fit (autofaiss)
    assert choose_factory(1_000_000, 384, 64 * GB) == "IVF4096,SQ8"
    # 100M: SQ8 needs ~39 GB; a 4 GB budget leaves PQ with the largest size that fits (32 bytes)
    assert choose_factory(100_000_000, 384, 4 * GB) == "IVF32768,PQ32"
    assert choose_factory(10 ** 10, 384, 4 * GB).startswith("IVF65536,PQ")  # nlist capped
    assert index_factory.nlist_for(200_000) == 2048 and index_factory.nlist_for(1000) == 256
    assert index_factory.train_size(4096, 1_000_000) == 122_880
    assert index_factory.train_size(256, 100_000) == 65_536 and index_factory.train_size(256, 5000) == 5000
    for n, budget in [(2_000_000, 1 * GB), (50_000_000, 8 * GB)]:  # every choice is a faiss factory
        faiss.index_factory(384, choose_factory(n, 384, budget), faiss.METRIC_INNER_PRODUCT)


def test_memory_budget_parsing():
    assert parse_memory("4GB") == 4 * GB and parse_memory("512M") == 512 << 20
    assert parse_memory("1.5GiB") == int(1.5 * GB) and parse_memory("1000") == 1000
    for bad in ("lots", "4XB", "0", "-1GB"):
        with pytest.raises(InputError, match="memory-budget"):
            parse_memory(bad)
    meminfo = "MemTotal: 100 kB\nMemAvailable:    8000000 kB\n"
    assert index_factory.default_memory_budget(_write(meminfo)) == 8000000 * 1024 // 2
    factory, record = resolve_factory("auto:1GB", 500_000, 384)
    assert factory == "IVF2048,Flat" and record["memory_budget_bytes"] == GB
    assert resolve_factory("IVF8,Flat", 10, 4) == ("IVF8,Flat", None)


def _write(text: str) -> Path:
    import tempfile

    handle = tempfile.NamedTemporaryFile("w", suffix=".meminfo", delete=False)
    handle.write(text)
    handle.close()
    return Path(handle.name)


def test_gpu_path_is_not_taken_without_a_gpu(monkeypatch):
    assert faiss.get_num_gpus() == 0 and index_factory.gpu_count() == 0
    called = []
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda *a, **k: called.append(a), raising=False)
    index = faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    ondisk_ivf.train(index, mixture(400, 8, 4, seed=1))
    assert index.is_trained and called == []


# -- on-disk IVF versions -----------------------------------------------------------------------
def test_ivf_version_is_on_disk_memory_mapped_and_tuned(ivf_collection, vectors):
    with Collection.open(ivf_collection) as coll:
        info = coll.current_version("image")
        assert info.factory == FACTORY and info.count == N
        pair = ondisk_ivf.ivfdata_files(info.file)
        assert len(pair) == 1 and pair[0].stat().st_size > N * DIM * 4  # the lists: codes and ids
        nprobe = info.parameters["nprobe"]
        assert info.parameters["ondisk"] and 1 <= nprobe < 64
        assert info.parameters["tuned_recall_at_10"] >= 0.95
        _, index = coll.open_index()
        assert index.ondisk and isinstance(ondisk_ivf.ondisk_lists(index.index), faiss.OnDiskInvertedLists)
        assert faiss.extract_index_ivf(index.index).nprobe == nprobe  # written into the file
        assert np.array_equal(np.sort(index.ids()), np.sort(coll.embeddings.ids("image")))
        # held-out queries (not stored vectors): recall of the tuned nprobe vs brute force
        queries = mixture(300, DIM, CENTERS, seed=5)[:200] + 0.05 * np.random.default_rng(9).standard_normal((200, DIM))
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        truth = exact_top(coll, queries)

        class Stub:
            name, dim = "vectors", DIM

        retriever = Retriever(coll, Stub())
        found = np.array([[h.item_id for h in retriever.search(q, 10).hits] for q in queries])
        assert recall(found, truth) >= 0.95
        one = np.array([[h.item_id for h in retriever.search(q, 10, nprobe=1).hits] for q in queries])
        assert recall(one, truth) < recall(found, truth)  # --nprobe overrides the recorded one


def test_index_info_shows_the_recorded_nprobe(ivf_collection):
    from ui.cli import app

    result = CliRunner().invoke(app, ["index", "info", "-c", str(ivf_collection)])
    assert result.exit_code == 0, result.output
    with Collection.open(ivf_collection) as coll:
        info = coll.current_version("image")
    line = next(line for line in result.output.splitlines() if info.name in line)
    assert f"nprobe={info.parameters['nprobe']}" in line and "lists on disk" in line
    assert f"recall@10={info.parameters['tuned_recall_at_10']:.3f}" in line


def test_delete_and_add_on_an_on_disk_version(tmp_path, vectors):
    small = vectors[:3000]
    with make_collection(tmp_path / "coll", small) as coll:
        coll.sync_index("image", "IVF16,Flat")
        info = coll.current_version("image")
        before = ondisk_ivf.ivfdata_files(info.file)
        doomed = [5, 6, 7, 2000]
        queries = small[[4, 5, 6, 1999]]  # item i holds vector i - 1
        coll.delete(ids=doomed)
        info = coll.current_version("image")
        assert info.count == 3000 - 4 and info.factory == "IVF16,Flat"
        _, index = coll.open_index()
        assert index.ondisk and not np.isin(doomed, index.ids()).any() and index.count == 2996
        hits = coll.search(queries, 5, nprobe=16)
        assert all(h.item_id not in doomed for row in hits for h in row)
        after = ondisk_ivf.ivfdata_files(info.file)
        assert before[0] in after and len(after) == 2  # the lists a search may still read stay once
        # adding the stored vectors back (sync) puts the ids in a new copy of the lists
        fresh = NewItem(uri="mem://new", sha256="0" * 64, width=1, height=1)
        (new_id,) = coll.add_items([fresh], small[:1])
        coll.sync_index("image")
        _, index = coll.open_index()
        assert new_id in index.ids() and index.count == 2997
        assert coll.search(small[:1], 1, nprobe=16)[0][0].item_id in (1, new_id)
        assert before[0] not in ondisk_ivf.ivfdata_files(info.file)  # two edits on: removed


def test_on_disk_lists_keep_faiss_resizing_lines_off_stdout(tmp_path):
    # faiss's OnDiskInvertedLists printf's "resizing FILE to N bytes" whenever its lists file
    # grows (the merge of a build, the copy before an edit, an add): on stderr, not in a
    # command's output. A subprocess, so that the C-level stdout is a real pipe.
    script = textwrap.dedent(f"""
        import hashlib, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_index_scale import make_collection, mixture
        from indexing.items import NewItem
        small = mixture(3000, 32, 16, seed=3)
        with make_collection({str(tmp_path / "coll")!r}, small) as coll:
            coll.sync_index("image", "IVF16,Flat")   # train, fill shards, merge on disk
            coll.delete(ids=[5, 6])                   # copy the lists, remove
            coll.add_items([NewItem(uri="mem://new", sha256="0" * 64, width=1, height=1)], small[:1])
            coll.sync_index("image")                  # add to the on-disk lists
            print("done", coll.current_version("image").count)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "done 2999\n"
    assert "resizing" in out.stderr  # faiss did print: the guard sent it here


def test_gc_removes_both_files_of_a_retired_on_disk_version(tmp_path, vectors):
    with make_collection(tmp_path / "coll", vectors[:2000]) as coll:
        coll.sync_index("image", "IVF8,Flat")
        first = coll.current_version("image")
        pair = [first.file, *ondisk_ivf.ivfdata_files(first.file)]
        assert len(pair) == 2 and all(p.exists() for p in pair)
        coll.sync_index("image", "IVF16,Flat")  # a new version: the first is retired, kept (keep=2)
        assert all(p.exists() for p in pair)
        report = coll.collect_garbage(keep=0)
        assert set(report.removed) == set(pair) and not any(p.exists() for p in pair)
        assert report.freed_bytes > 2000 * 8 * 4
        current = coll.current_version("image")
        assert current.file.exists() and len(ondisk_ivf.ivfdata_files(current.file)) == 1


def test_nan_is_never_published_in_an_on_disk_version(tmp_path, vectors):
    with make_collection(tmp_path / "coll", vectors[:1000]) as coll:
        rows = vectors[:1000].copy()
        rows[10, 3] = np.nan
        with pytest.raises(InputError, match="NaN"):
            with coll.new_index_version(factory="IVF8,Flat", expected_count=1000) as writer:
                writer.add(np.arange(1, 1001), rows)
        assert coll.current_version("image") is None
        assert not list((tmp_path / "coll" / "indexes").glob("*.ivfdata"))


_KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    import faiss.contrib.ondisk
    from indexing import ondisk_ivf
    from indexing.collection import Collection
    stage = sys.argv[2]
    if stage == "merge":  # SIGKILL in the middle of merging the shards
        ondisk_ivf.merge_ondisk = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    else:  # SIGKILL after the first shard is written
        real = ondisk_ivf.write_atomically
        def write(path, fn):
            real(path, fn)
            if ".shard-" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
        ondisk_ivf.write_atomically = write
    ondisk_ivf.SHARD_ROWS = 4000
    with Collection.open(sys.argv[1]) as coll:
        coll.sync_index("image", "IVF32,Flat")
""")


@pytest.mark.parametrize("stage", ["shard", "merge"])
def test_a_killed_on_disk_build_resumes_to_the_same_index(tmp_path, vectors, monkeypatch, stage):
    data = vectors[:10_000]
    for name in ("killed", "whole"):
        make_collection(tmp_path / name, data).close()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(tmp_path / "killed"), stage], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr
    staging = [p.name for p in (tmp_path / "killed" / "indexes").iterdir() if p.name.endswith(".staging")]
    assert any("trained" in name for name in staging) and any("shard-" in name for name in staging)
    # every staged row was durable before the first shard (shards are named by row position)
    (progress,) = (tmp_path / "killed" / "indexes").glob(".*.progress")
    assert json.loads(progress.read_text())["count"] == len(data)
    monkeypatch.setattr(ondisk_ivf, "SHARD_ROWS", 4000)
    results = {}
    for name in ("killed", "whole"):
        with Collection.open(tmp_path / name) as coll:
            coll.sync_index("image", "IVF32,Flat")  # the killed one resumes its unfinished version
            info = coll.current_version("image")
            _, index = coll.open_index()
            ivf = faiss.extract_index_ivf(index.index)
            lists = [np.sort(faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)))
                     for i in range(ivf.nlist)]
            centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
            results[name] = (info.parameters["nprobe"], lists, centroids, coll.search(data[:20], 10))
            files = sorted(p.name for p in (tmp_path / name / "indexes").iterdir())
            assert len(files) == 2 and not any(f.startswith(".") for f in files), files  # the pair only
            assert len(coll.versions()) == 1
    (np_k, lists_k, cent_k, hits_k), (np_w, lists_w, cent_w, hits_w) = results["killed"], results["whole"]
    assert np_k == np_w and np.array_equal(cent_k, cent_w)
    assert all(np.array_equal(a, b) for a, b in zip(lists_k, lists_w))
    assert [[h.item_id for h in row] for row in hits_k] == [[h.item_id for h in row] for row in hits_w]


def test_auto_factory_builds_what_choose_factory_picks_and_records_why(tmp_path, vectors, monkeypatch):
    monkeypatch.setattr(index_factory, "FLAT_BELOW", 1000)  # so that 5,000 vectors get an IVF
    data = vectors[:5000]
    with make_collection(tmp_path / "coll", data) as coll:
        info = coll.sync_index("image", "auto:64MB")
        assert info.factory == choose_factory(5000, DIM, 64 << 20) == "IVF256,Flat"
        assert info.parameters["auto"] == {"requested": "auto:64MB", "n": 5000, "dim": DIM,
                                           "memory_budget_bytes": 64 << 20, "chosen": "IVF256,Flat"}
        assert info.parameters["ondisk"] and info.parameters["train_size"] == 5000
        again = coll.sync_index("image", "auto:64MB")  # the same choice: no rebuild
        assert again.name == info.name
        assert coll.sync_index("image", "auto:1KB").factory.startswith("IVF256,PQ")  # smaller codes
        monkeypatch.setattr(index_factory, "FLAT_BELOW", 100_000)
        assert coll.sync_index("image", "auto").factory == "Flat"


def test_memory_budget_option():
    from ui.cli_index import auto_factory

    assert auto_factory(None, "4GB") == "auto:4GB" and auto_factory("auto", "4GB") == "auto:4GB"
    assert auto_factory("IVF8,Flat", None) == "IVF8,Flat"
    with pytest.raises(InputError, match="--memory-budget applies to --factory auto"):
        auto_factory("Flat", "4GB")
    with pytest.raises(InputError, match="--memory-budget 'plenty'"):
        auto_factory(None, "plenty")


def test_cli_build_with_factory_auto_and_a_memory_budget(tmp_path, monkeypatch):
    import indexing
    from conftest import ToyEncoder, make_image

    from ui.cli import app

    monkeypatch.setattr(indexing, "load_encoder", lambda spec, device=None: ToyEncoder(), raising=False)
    for i in range(12):
        make_image(tmp_path / "imgs" / f"{i:02d}.png", seed=i, size=(8, 8))
    coll = tmp_path / "coll"
    runner = CliRunner()
    result = runner.invoke(app, ["index", "build", str(tmp_path / "imgs"), "-c", str(coll), "--factory", "auto",
                                 "--memory-budget", "1GB", "-q"])
    assert result.exit_code == 0, result.output
    with Collection.open(coll) as opened:
        info = opened.current_version("image")
        assert info.factory == "Flat" and info.parameters["auto"]["memory_budget_bytes"] == GB
    bad = runner.invoke(app, ["index", "add", str(tmp_path / "imgs"), "-c", str(coll), "--factory", "Flat",
                              "--memory-budget", "1GB", "-q"])
    assert bad.exit_code == 1 and "--memory-budget applies to --factory auto" in bad.output


def test_a_resumed_auto_build_keeps_the_factory_it_chose(tmp_path, monkeypatch):
    """--factory auto's default budget follows the free memory: a retry that would choose
    another factory resumes the unfinished version with the factory it chose the first time."""
    vectors = mixture(60, 8, 3, seed=1)
    choice = {"now": "Flat"}  # what choose_factory says: Flat on the first run, HNSW8 on the retry
    monkeypatch.setattr(index_factory, "choose_factory", lambda n, dim, budget: choice["now"])
    with make_collection(tmp_path / "coll", vectors) as coll:
        ids = np.sort(coll.embeddings.ids("image"))
        with pytest.raises(RuntimeError, match="stopped"):
            with coll.new_index_version(factory="auto", checkpoint_every=10) as writer:
                writer.add(ids[:30], coll.embeddings.get("image", ids[:30]))
                writer.checkpoint()
                raise RuntimeError("stopped")
        choice["now"] = "HNSW8"
        with coll.new_index_version(factory="auto") as writer:
            assert writer.resumed == 30
            writer.add(ids[30:], coll.embeddings.get("image", ids[30:]))
        version = coll.current_version("image")
        assert version.factory == "Flat" and version.count == 60
        assert version.parameters["auto"]["chosen"] == "Flat"
