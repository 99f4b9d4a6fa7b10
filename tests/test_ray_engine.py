"""`--engine ray`: build, add and re-index on Ray Data give the collection `--engine local` gives.

One local Ray cluster for the module (2 CPUs, a 200 MB object store); the jobs run in this
process use it (a process already connected to Ray keeps its connection), and the subprocess
tests join it with `--address`. Its workers import the test encoder (tests/ is on their
PYTHONPATH). Compared with the local engine: the catalog rows (items with their ids, rejected
files), the stored embeddings, the vectors of the current index versions and search results.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import toy_cli
from conftest import ToyEncoder, make_image, write_csv
from typer.testing import CliRunner

from indexing.collection import Collection
from indexing.pipeline import add_to_collection, build_collection
from retrieval.concepts import load_concept_set
from retrieval.corrections import fit_concept_correction
from retrieval.reindex import reindex
from sce_correct.errors import InputError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
QUERIES = ("item 3", "item 17", "a red square", "tone 1")
runner = CliRunner()


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'sce-retrieval[ray]'")
    if ray.is_initialized():
        ray.shutdown()
    path = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])
    with pytest.MonkeyPatch.context() as patch:  # the workers' environment is the one at start
        patch.setenv("PYTHONPATH", path)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
                 logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def toy_specs():
    with toy_cli.toy_specs_in_process():
        yield


def invoke(*args, ok: bool = True):
    from ui.cli import app

    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


# -- the data: duplicates, a broken file, a missing one, captions and metadata --------------------
@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    rows = []
    for i in range(30):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i, size=(16, 16))
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"item {i}", "tone": str(i % 3)})
    make_image(tmp_path / "imgs" / "copy_of_4.png", seed=4, size=(16, 16))
    make_image(tmp_path / "imgs" / "copy_of_9.png", seed=9, size=(16, 16))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows[5:5] = [{"file": "imgs/copy_of_4.png", "caption": "a copy", "tone": "0"},
                 {"file": "imgs/broken.png", "caption": "broken", "tone": "1"},
                 {"file": "imgs/missing.png", "caption": "missing", "tone": "2"}]
    rows.append({"file": "imgs/copy_of_9.png", "caption": "", "tone": "0"})
    listing = write_csv(tmp_path / "list.csv", rows)
    for i in range(6):  # for `add`: new images and one more duplicate
        make_image(tmp_path / "more" / f"m{i}.png", seed=500 + i, size=(16, 16))
    make_image(tmp_path / "more" / "again_7.png", seed=7, size=(16, 16))
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(12)))
    return {"listing": listing, "more": tmp_path / "more", "concept": concept, "root": tmp_path}


def snapshot(path: Path, encoder: ToyEncoder) -> dict:
    """What a user of the collection sees, keyed so two builds can be compared."""
    with Collection.open(path) as collection:
        ids = collection.item_ids()
        items = {i: (r.uri, r.sha256, r.width, r.height, r.caption, r.metadata)
                 for i, r in collection.items(ids).items()}
        failures = sorted((f.uri, str(f.reason), f.detail) for f in collection.failures())
        stored = {}
        for kind in ("image", "caption"):
            kind_ids = collection.embeddings.ids(kind)
            stored[kind] = (kind_ids, collection.embeddings.get(kind, kind_ids))
        indexes, searchable = {}, []
        for version in collection.versions():
            if version.state == "ready":
                indexes[(version.kind, version.correction)] = index_vectors(collection, version.name)
                if version.kind == "image" and version.dim == encoder.dim:  # not a gaussian one's feature space
                    searchable.append(version.correction)
        queries = encoder.encode_texts(list(QUERIES))
        searches = {correction: [[h.item_id for h in hits] for hits in collection.search(queries, 8, correction=correction)]
                    for correction in searchable}
    return {"items": items, "failures": failures, "stored": stored, "indexes": indexes, "searches": searches}


def index_vectors(collection: Collection, name: str) -> dict[int, np.ndarray]:
    _, index = collection.open_index(name)
    ids = index.ids()
    vectors = faiss.downcast_index(index.index.index).reconstruct_n(0, len(ids))
    return dict(zip(ids.tolist(), vectors))


def assert_same(got: dict, want: dict) -> None:
    assert got["items"] == want["items"]
    assert got["failures"] == want["failures"]
    for kind, (ids, vectors) in want["stored"].items():
        np.testing.assert_array_equal(got["stored"][kind][0], ids, err_msg=kind)
        np.testing.assert_allclose(got["stored"][kind][1], vectors, rtol=1e-5, atol=1e-6, err_msg=kind)
    assert got["indexes"].keys() == want["indexes"].keys()
    for key, vectors in want["indexes"].items():
        assert got["indexes"][key].keys() == vectors.keys(), key
        np.testing.assert_allclose(np.stack([got["indexes"][key][i] for i in vectors]), np.stack(list(vectors.values())),
                                   rtol=1e-5, atol=1e-6, err_msg=str(key))
    assert got["searches"] == want["searches"]


# -- in this process -----------------------------------------------------------------------------
def test_build_and_add_on_ray_equal_local(ray_cluster, corpus):
    encoder = ToyEncoder()
    options = {"batch_size": 4, "shard_size": 8, "workers": 0, "progress": False}
    for engine, extra in (("local", {}), ("ray", {"actors": 2})):
        report = build_collection(corpus["listing"], corpus["root"] / engine, encoder=encoder, engine=engine,
                                  **options, **extra)
        assert (report.listed, report.added) == (34, 30), engine
        assert report.rejected["duplicate"] == 2 and report.rejected["missing"] == 1, report.rejected
        assert sum(report.rejected.values()) == 4, report.rejected
        added = add_to_collection(corpus["more"], corpus["root"] / engine, encoder=encoder, engine=engine,
                                  **options, **({"actors": 1} if extra else {}))
        assert (added.added, added.rejected["duplicate"]) == (6, 1), engine
    local, on_ray = snapshot(corpus["root"] / "local", encoder), snapshot(corpus["root"] / "ray", encoder)
    assert len(local["items"]) == 36 and len(local["stored"]["caption"][0]) == 30  # the added files have none
    assert_same(on_ray, local)


def test_reindex_on_ray_equals_local_projection_and_paired(ray_cluster, corpus):
    from retrieval.ray_reindex import reindex_on_ray

    encoder = ToyEncoder()
    build_collection(corpus["listing"], corpus["root"] / "local", encoder=encoder, progress=False)
    with Collection.open(corpus["root"] / "local") as collection:
        concept = load_concept_set(corpus["concept"])
        fit_concept_correction(collection, encoder, concept, name="c1", n_components=2)
        fit_concept_correction(collection, encoder, concept, name="g1", kernel="gaussian", rff_dim=16)
    shutil.copytree(corpus["root"] / "local", corpus["root"] / "ray")
    for engine in ("local", "ray"):
        with Collection.open(corpus["root"] / engine) as collection:
            for name in ("c1", "g1"):
                if engine == "local":
                    version = reindex(collection, name, chunk_size=5, progress=False)
                else:
                    version = reindex_on_ray(collection, name, chunk_size=5, progress=False, actors=2)
                assert version.count == 30 and version.parameters["variant"] == ("projection" if name == "c1" else "paired")
    local, on_ray = snapshot(corpus["root"] / "local", encoder), snapshot(corpus["root"] / "ray", encoder)
    assert {("image", "c1"), ("image", "g1")} <= set(local["indexes"])
    assert_same(on_ray, local)


def test_cli_engine_ray_build_and_reindex(ray_cluster, corpus, toy_specs):
    root = corpus["root"]
    for engine in ("local", "ray"):
        coll = root / engine
        out = invoke("index", "build", corpus["listing"], "-c", coll, "--encoder", "toy", "--batch-size", "4",
                     "--shard-size", "8", "--engine", engine, "-q").stdout
        assert "indexed 30 new images" in out, out
        invoke("correct", "fit", "--name", "c1", "--concept", corpus["concept"], "--components", "2", "-c", coll, "-q")
        out = invoke("index", "reindex", "--correction", "c1", "-c", coll, "--chunk-size", "7", "--engine", engine,
                     "-q").stdout
        assert "30 vectors, correction 'c1'" in out, out
    assert_same(snapshot(root / "ray", ToyEncoder()), snapshot(root / "local", ToyEncoder()))
    local, on_ray = (json.loads(invoke("search", "item 3", "--correction", "c1", "--json", "-c", root / e).stdout)["hits"]
                     for e in ("local", "ray"))
    assert [(h["id"], h["uri"], h["rank"]) for h in on_ray] == [(h["id"], h["uri"], h["rank"]) for h in local]
    np.testing.assert_allclose([h["score"] for h in on_ray], [h["score"] for h in local], rtol=1e-5)


class FailingEncoder(ToyEncoder):
    """Raises a user's error (as a missing checkpoint would) when asked to encode images."""

    def encode_image_batch(self, batch):
        raise InputError("checkpoint /nowhere/model.pt: no such file")


def test_a_users_error_in_an_actor_is_raised_as_itself(ray_cluster, corpus):
    """Not Ray's wrapper with the worker's traceback: the error class and message the actor met."""
    from retrieval.ray_reindex import reindex_on_ray

    with pytest.raises(InputError) as raised:
        build_collection(corpus["listing"], corpus["root"] / "failing", encoder=FailingEncoder(), engine="ray",
                         actors=1, progress=False)
    assert type(raised.value) is InputError and str(raised.value) == "checkpoint /nowhere/model.pt: no such file"
    coll = corpus["root"] / "coll"
    encoder = ToyEncoder()
    build_collection(corpus["listing"], coll, encoder=encoder, progress=False)
    with Collection.open(coll) as collection:
        fit_concept_correction(collection, encoder, load_concept_set(corpus["concept"]), name="c1", n_components=2)
    shards = sorted((coll / "embeddings").rglob("*.npy"))
    for shard in shards:
        shard.write_bytes(b"not an npy file")
    with Collection.open(coll) as collection, pytest.raises(InputError, match="damaged embedding file") as raised:
        reindex_on_ray(collection, "c1", progress=False, actors=1)
    assert any(str(shard) in str(raised.value) for shard in shards)
    assert "UserCodeException" not in str(raised.value) and "Traceback" not in str(raised.value)


def test_without_ray_engine_ray_is_one_line(corpus, monkeypatch, toy_specs):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    coll = corpus["root"] / "coll"
    result = invoke("index", "build", corpus["listing"], "-c", coll, "--encoder", "toy", "--engine", "ray", ok=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --engine ray needs Ray Data, which is not installed: pip install 'sce-retrieval[ray]'"]
    assert not coll.exists()
    invoke("index", "build", corpus["listing"], "-c", coll, "--encoder", "toy", "-q")
    invoke("correct", "fit", "--name", "c1", "--concept", corpus["concept"], "-c", coll, "-q")
    for command in (("index", "reindex", "--correction", "c1"), ("index", "add", corpus["more"])):
        result = invoke(*command, "-c", coll, "--engine", "ray", ok=False)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "pip install 'sce-retrieval[ray]'" in result.output
    result = invoke("index", "build", corpus["listing"], "-c", coll, "--address", "127.0.0.1:6379", ok=False)
    assert result.exit_code == 1 and result.output.strip() == "error: --address and --actors need --engine ray"


def test_package_import_does_not_import_ray():
    import subprocess

    code = ("import sys, indexing.pipeline, indexing.ray_engine, retrieval.reindex, retrieval.ray_reindex, ui.cli; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"


# -- --address where no cluster is --------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_address_refuses_where_nothing_listens_and_passes_a_listener():
    import socket

    from indexing.ray_engine import check_address

    port = _free_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(InputError, match=rf"^--address {address}: no Ray cluster answers at 127.0.0.1:{port} "):
            check_address(address)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_address(f"127.0.0.1:{server.getsockname()[1]}")  # something answers: Ray takes it from there
    for address in ("auto", "local", "head-node"):
        check_address(address)  # no port: left to Ray


def test_build_with_an_address_where_no_cluster_is_fails_in_one_line(corpus):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'sce-retrieval[ray]'")
    from test_kill_resume import sce

    coll = corpus["root"] / "nowhere"
    address = f"127.0.0.1:{_free_port()}"
    process = sce("index", "build", corpus["listing"], "-c", coll, "--encoder", "toy", "--engine", "ray",
                  "--address", address, "-q")
    out, err = process.communicate(timeout=120)  # Ray's own retries would take minutes
    assert process.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith(f"error: --address {address}: no Ray cluster answers"), err
    assert not coll.exists()  # nothing written


# -- another process joins the cluster with --address ---------------------------------------------
def test_address_joins_the_running_cluster(ray_cluster, corpus, toy_specs):
    from test_kill_resume import sce

    import ray._private.state

    address = ray_cluster.get_runtime_context().gcs_address
    coll = corpus["root"] / "joined"
    process = sce("index", "build", corpus["listing"], "-c", coll, "--encoder", "toy", "--batch-size", "4",
                  "--engine", "ray", "--address", address, "-q")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "indexed 30 new images" in out
    drivers = {job["DriverPid"] for job in ray._private.state.jobs()}  # the cluster's job table
    assert process.pid in drivers, "the build did not run as a job of the existing cluster"
    invoke("index", "build", corpus["listing"], "-c", corpus["root"] / "local", "--encoder", "toy", "-q")
    assert_same(snapshot(coll, ToyEncoder()), snapshot(corpus["root"] / "local", ToyEncoder()))


# -- a killed driver resumes (the jobs join the module's cluster) ----------------------------------
KILLS = 3


def _count(coll: Path, sql: str) -> int:
    from test_kill_resume import _count as count

    return count(coll, sql)


@pytest.mark.slow
def test_killed_ray_build_and_reindex_resume_to_the_same_collection(ray_cluster, tmp_path, toy_specs):
    """SIGKILL the driver of a Ray build, then of a Ray re-index, at seeded moments of its work;
    each rerun must end where an uninterrupted run ends (tests/test_kill_resume.py's checks: items,
    index vectors, searches, files, no leftovers). The drivers join the module's cluster: a
    killed driver's actors are removed by the cluster."""
    from test_kill_resume import COLL, kill_at, leftovers, observe, run_to_completion
    from test_kill_resume import assert_same as same

    address = ray_cluster.get_runtime_context().gcs_address
    images = 24
    for i in range(images):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i, size=(16, 16))
    listing = write_csv(tmp_path / "list.csv", [{"file": f"imgs/{i:03d}.png", "caption": f"item {i}"}
                                                for i in range(images)])
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(12)))
    coll, pristine = tmp_path / "coll", tmp_path / "pristine"
    COLL[:] = [coll]  # observe() searches through the CLI
    ray_args = ["--engine", "ray", "--address", address, "--actors", "1", "-q"]

    def build_reset():
        shutil.rmtree(coll, ignore_errors=True)

    def reindex_reset():
        shutil.rmtree(coll, ignore_errors=True)
        shutil.copytree(pristine, coll)

    jobs = [
        ("build", ["index", "build", listing, "-c", coll, "--encoder", "toy", "--batch-size", "2", "--shard-size", "4",
                   "--workers", "0", *ray_args], build_reset, 0.5,
         lambda: _count(coll, "SELECT count(*) FROM items") > 0,  # the first shard is committed
         lambda: _count(coll, "SELECT count(*) FROM items") < images
         or _count(coll, "SELECT count(*) FROM index_versions WHERE state = 'ready'") < 2),
        ("reindex", ["index", "reindex", "--correction", "c1", "-c", coll, "--chunk-size", "1", "--checkpoint-every",
                     "1", *ray_args], reindex_reset, 0.0,
         lambda: _count(coll, "SELECT count(*) FROM index_versions WHERE correction = 'c1'") > 0,
         lambda: _count(coll, "SELECT count(*) FROM index_versions WHERE correction = 'c1' AND state = 'ready'") == 0),
    ]
    landed = {}
    for seed, (name, argv, reset, delay, started, mid_work) in enumerate(jobs):
        if name == "reindex":  # on the collection the build test left
            shutil.rmtree(pristine, ignore_errors=True)
            shutil.copytree(coll, pristine)
            invoke("correct", "fit", "--name", "c1", "--concept", concept, "--components", "2", "-c", pristine, "-q")
        reset()
        timing = run_to_completion(argv, started, delay, timeout=300)
        reference = observe(coll)
        assert leftovers(coll) == []
        landed[name] = 0
        rng = np.random.default_rng(100 + seed)  # one moment in each of KILLS slices of the work
        edges = np.linspace(0.8 * timing.started, 0.97 * timing.total, KILLS + 1)
        for number, moment in enumerate(float(rng.uniform(a, b)) for a, b in zip(edges[:-1], edges[1:])):
            reset()
            running = kill_at(argv, -moment, started, delay)  # negative: seconds from the process start
            landed[name] += running and mid_work()
            run_to_completion(argv, started, delay, timeout=300)
            what = f"{name}: kill {number} at {moment:.2f}s of {timing.total:.2f}s (work from {timing.started:.2f}s)"
            same(observe(coll), reference, what)
            assert leftovers(coll) == [], what
        print(f"{name}: {landed[name]} of {KILLS} kills landed mid-work; {timing}")
    assert all(count >= 1 for count in landed.values()), landed
