"""SIGKILL `sce index build` and `sce index reindex` at seeded random moments; each rerun must end
exactly where an uninterrupted run ends.

Black box: the commands run as real processes (tests/toy_cli.py: the real CLI with the toy
encoder, slowed a little per image batch so that a kill lands part way through), and the
results are read from what a user can see: the catalog file through SQLAlchemy, the faiss
files of the current index versions through faiss, `sce search` results and the files of the
collection folder.

For each command an uninterrupted run is timed first (from the start of the process to the
moment its work begins, and to its exit); the kill moments are then spread over that work
window (one seeded random moment in each of KILLS equal slices). After every kill the command
is run again to completion and compared with the uninterrupted run: the same items, the same
vectors in the current index versions (by URI, within float tolerance), the same search ids
for a few queries, the same embedding files, no index file that no version names, and no
staging or temporary file left anywhere in the collection. (A kill that lands after the job
published its version makes the rerun publish a second one and retire the first: same result,
one more retired version.)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import toy_cli
from conftest import make_image, write_csv
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEED = 20261201
KILLS = 10  # per command: 20 kills in all
BUILD_IMAGES = 32
REINDEX_ITEMS = 400
QUERIES = ("item 3", "item 17", "a red square")
TEMPORARY = re.compile(r"\.(partial|progress|tmp|temp|staging)$|~$")
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def toy_encoder_specs():
    with toy_cli.toy_specs_in_process():
        yield


def invoke(*args):
    from ui.cli import app

    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def sce(*args, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "SCE_TEST_TOY_DELAY": str(delay), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(Path(toy_cli.__file__)), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- what a user can see -------------------------------------------------------------------------
def _table(meta, *columns: str):
    """The catalog table that has these columns (found by reflection, not by name)."""
    return next(t for t in meta.tables.values() if set(columns) <= set(t.columns.keys()))


def observe(coll: Path) -> dict:
    """Items by URI, vectors of the ready index versions by URI, search ids, and version counts."""
    import faiss
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{coll / 'catalog.sqlite'}")
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        items_t = _table(meta, "uri", "sha256", "caption")
        versions_t = _table(meta, "name", "kind", "state", "file", "count")
        with engine.connect() as connection:
            items = {r.uri: (r.sha256, r.caption, r.width, r.height, repr(r.metadata), r.id)
                     for r in connection.execute(sa.select(items_t))}
            versions = [r._asdict() for r in connection.execute(sa.select(versions_t))]
    finally:
        engine.dispose()
    uri_of = {v[-1]: uri for uri, v in items.items()}
    vectors = {}
    for version in versions:
        if version["state"] != "ready":
            continue
        index = faiss.read_index(str(coll / version["file"]))
        ids = faiss.vector_to_array(faiss.downcast_index(index).id_map)
        rows = np.stack([index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, index.d))
        key = (version["kind"], version.get("correction"))
        vectors[key] = {uri_of[int(i)]: row for i, row in zip(ids, rows)}
    searches = {q: [h["uri"] for h in __import__("json").loads(invoke("search", q, "-k", "8", "--json", "-c", coll))["hits"]]
                for q in QUERIES}
    # A kill after the job published its version makes the rerun publish another one (and retire
    # the first, whose file stays until a retention rule removes it): count only unnamed files.
    named = {Path(v["file"]).name for v in versions}
    files = {"index files no version names": sorted(p.name for p in (coll / "indexes").glob("*.faiss")
                                                    if p.name not in named),
             "embedding file sizes": sorted(p.stat().st_size for p in (coll / "embeddings").rglob("*") if p.is_file())}
    return {"items": {uri: v[:-1] for uri, v in items.items()}, "vectors": vectors, "searches": searches,
            "files": files,
            "states": sorted((v["kind"], v.get("correction") or "-", v["state"]) for v in versions
                             if v["state"] in ("ready", "building"))}


def leftovers(coll: Path) -> list[str]:
    return sorted(p.relative_to(coll).as_posix() for p in coll.rglob("*")
                  if p.is_file() and (TEMPORARY.search(p.name) or (p.name.startswith(".") and p.name != ".write.lock")))


def assert_same(result: dict, reference: dict, what: str) -> None:
    assert result["items"] == reference["items"], f"{what}: items differ"
    assert result["states"] == reference["states"], f"{what}: index versions differ"
    assert result["vectors"].keys() == reference["vectors"].keys(), what
    for key, ref in reference["vectors"].items():
        got = result["vectors"][key]
        assert got.keys() == ref.keys(), f"{what}: {key} holds other items"
        np.testing.assert_allclose(np.stack([got[u] for u in ref]), np.stack(list(ref.values())),
                                   rtol=1e-5, atol=1e-6, err_msg=f"{what}: {key} vectors")
    assert result["searches"] == reference["searches"], f"{what}: search results differ"
    assert result["files"] == reference["files"], f"{what}: other index or embedding files"


# -- the harness ---------------------------------------------------------------------------------
@dataclass
class Timing:
    started: float  # seconds from the process start to the first sign of work
    total: float  # seconds from the process start to the end of the work (or its exit)


def run_to_completion(argv: list, started_when, delay: float, timeout: float = 180, working=None) -> Timing:
    """Run the command to its end. ``working()``: whether the work is still unfinished; the
    work ends at the first poll after its start where it is not (the interpreter's exit after
    that, slow on a loaded machine, is no place for a kill that should land mid-work)."""
    process = sce(*argv, delay=delay)
    t0 = time.monotonic()
    started = done = None
    while process.poll() is None:
        if started is None and started_when():
            started = time.monotonic() - t0
        if started is not None and done is None and working is not None and not working():
            done = time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, "the command did not finish"
        time.sleep(0.01)
    total = time.monotonic() - t0
    out, err = process.communicate()
    assert process.returncode == 0, err
    assert "Traceback" not in err + out, err
    return Timing(started if started is not None else total, done if done is not None else total)


def kill_at(argv: list, moment: float, started_when, delay: float) -> bool:
    """Start the command and SIGKILL it; True when it was still running then.

    ``moment`` >= 0: that many seconds after the first sign of work (``started_when``), so the
    kill lands in the work however long this process took to start (the start-up time varies
    most on a loaded machine); ``moment`` < 0: ``-moment`` seconds after the process start (a
    kill during start-up).
    """
    process = sce(*argv, delay=delay)
    t0 = time.monotonic()
    if moment < 0:
        deadline = t0 + max(0.0, -moment)
    else:
        while process.poll() is None and not started_when():
            time.sleep(0.005)
        deadline = time.monotonic() + moment
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return running


def kill_moments(timing: Timing, seed: int) -> list[float]:
    """KILLS moments, one in each of KILLS equal spans from a little before the work starts
    (negative: see :func:`kill_at`) to just before the work ends."""
    rng = np.random.default_rng(seed)
    start, end = -0.2 * timing.started, 0.9 * (timing.total - timing.started)
    edges = np.linspace(start, end, KILLS + 1)
    moments = [float(rng.uniform(a, b)) for a, b in zip(edges[:-1], edges[1:])]
    # before the work: -(seconds from the process start), at 0.8x to 1x of the calibration's start-up
    return [-(timing.started + m) if m < 0 else m for m in moments]


def harness(argv: list, reset, started_when, mid_work, delay: float, seed: int) -> None:
    reset()
    timing = run_to_completion(argv, started_when, delay, working=mid_work)
    reference = observe(COLL[0])
    assert leftovers(COLL[0]) == []
    landed = 0
    for number, moment in enumerate(kill_moments(timing, seed)):
        reset()
        running = kill_at(argv, moment, started_when, delay)
        partial = mid_work()
        landed += running and partial
        run_to_completion(argv, started_when, delay)
        when = f"{moment:.2f}s into the work" if moment >= 0 else f"{-moment:.2f}s after the start"
        what = f"kill {number} {when} (calibration: work {timing.started:.2f}s to {timing.total:.2f}s)"
        assert_same(observe(COLL[0]), reference, what)
        assert leftovers(COLL[0]) == [], what
    # the harness is only worth something if the kills land part way through the work
    print(f"{argv[:2]}: {landed} of {KILLS} kills landed mid-work; {timing}")
    assert landed >= KILLS // 2, f"only {landed} of {KILLS} kills landed mid-work ({timing})"


COLL: list[Path] = []  # the collection of the running harness


def _count(coll: Path, sql: str) -> int:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{coll / 'catalog.sqlite'}?mode=ro", uri=True, timeout=1) as connection:
            return connection.execute(sql).fetchone()[0]
    except sqlite3.Error:
        return 0


def test_build_killed_at_random_moments_resumes_to_the_same_collection(tmp_path):
    for i in range(BUILD_IMAGES):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i, size=(16, 16))
    listing = write_csv(tmp_path / "list.csv", [{"file": f"imgs/{i:03d}.png", "caption": f"item {i}",
                                                 "tone": str(i % 3)} for i in range(BUILD_IMAGES)])
    coll = tmp_path / "coll"
    COLL[:] = [coll]
    argv = ["index", "build", listing, "-c", coll, "--encoder", "toy", "--batch-size", "2", "--shard-size", "4",
            "--workers", "0", "-q"]

    def reset():
        shutil.rmtree(coll, ignore_errors=True)

    def mid_work():  # killed with part of the listing committed, or before the index was published
        if not (coll / "catalog.sqlite").exists():
            return False
        items = _count(coll, "SELECT count(*) FROM items")
        ready = _count(coll, "SELECT count(*) FROM index_versions WHERE state = 'ready'")
        return items < BUILD_IMAGES or ready < 2

    harness(argv, reset, lambda: (coll / "catalog.sqlite").exists(), mid_work, delay=0.1, seed=SEED)


def test_reindex_killed_at_random_moments_resumes_to_the_same_version(tmp_path):
    for i in range(REINDEX_ITEMS):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=1000 + i, size=(8, 8))
    listing = write_csv(tmp_path / "list.csv", [{"file": f"imgs/{i:03d}.png", "caption": f"item {i}"}
                                                for i in range(REINDEX_ITEMS)])
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(12)))
    pristine = tmp_path / "pristine"
    invoke("index", "build", listing, "-c", pristine, "--encoder", "toy", "-q")
    invoke("correct", "fit", "--name", "c1", "--concept", concept, "--components", "2", "-c", pristine, "-q")
    coll = tmp_path / "coll"
    COLL[:] = [coll]
    argv = ["index", "reindex", "--correction", "c1", "-c", coll, "--chunk-size", "1", "--checkpoint-every", "1", "-q"]

    def reset():
        shutil.rmtree(coll, ignore_errors=True)
        shutil.copytree(pristine, coll, symlinks=True)

    before = {p.name for p in (pristine / "indexes").iterdir()}

    def started():  # a new file under indexes/ (staging), or the new version's catalog row
        return (any(p.name not in before for p in (coll / "indexes").iterdir())
                or _count(coll, "SELECT count(*) FROM index_versions WHERE correction = 'c1'") > 0)

    def mid_work():
        return _count(coll, "SELECT count(*) FROM index_versions WHERE correction = 'c1' AND state = 'ready'") == 0

    harness(argv, reset, started, mid_work, delay=0.0, seed=SEED + 1)
