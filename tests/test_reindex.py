"""Batch re-index jobs: checkpoints, resume after SIGKILL through the real CLI, non-finite vectors,
the store's chunks, Gaussian corrections of raw encoder outputs (staging: test_reindex_staging.py)."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import ToyEncoder, make_image, write_csv

import retrieval.reindex as rx
from indexing.collection import Collection, NewItem
from indexing.pipeline import build_collection
from indexing.vector_index import VectorIndex
from retrieval.concepts import load_concept_set
from retrieval.corrections import fit_concept_correction
from retrieval.reindex import reindex
from retrieval.search import Retriever
from sce_correct.errors import InputError

REPO = Path(__file__).resolve().parents[1]
TOTAL = 40


@pytest.fixture
def collection_dir(tmp_path: Path, toy_encoder: ToyEncoder) -> Path:
    """40 toy-encoded images with captions and a fitted projection correction "c1"."""
    rows = []
    for i in range(TOTAL):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i)
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"item {i}"})
    listing = tmp_path / "list.csv"
    write_csv(listing, rows, ["file", "caption"])
    build_collection(listing, tmp_path / "coll", encoder=toy_encoder, progress=False)
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(12)))
    with Collection.open(tmp_path / "coll") as collection:
        fit_concept_correction(collection, toy_encoder, load_concept_set(concept), name="c1", n_components=2)
    return tmp_path / "coll"


def _vectors(collection: Collection, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of an index version, in the file's order."""
    _, index = collection.open_index(name)
    ids = index.ids()
    return ids, faiss.downcast_index(index.index.index).reconstruct_n(0, len(ids))


def _by_id(ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    return vectors[np.argsort(ids)]


def _segment_files(collection_dir: Path, version: str) -> list[str]:
    """The segment files the progress record of ``version`` lists."""
    record = json.loads((collection_dir / "indexes" / f".{version}.faiss.progress").read_text())
    return [f"{segment['name']}.{part}.npy" for segment in record["segments"] for part in ("ids", "rows")]


def _hidden_files(collection_dir: Path) -> list[str]:
    return sorted(p.name for p in (collection_dir / "indexes").iterdir() if p.name.startswith("."))


# -- the real CLI, killed after its first durable checkpoint, then resumed ---------------------
def _reindex_command(collection_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ui.cli", "index", "reindex", "--correction", "c1",
            "-c", str(collection_dir), "--chunk-size", "4", "--checkpoint-every", "8"]


def _recorded_count(indexes: Path) -> int:
    for progress in indexes.glob(".*.progress"):
        try:
            return int(json.loads(progress.read_text())["count"])
        except (OSError, ValueError, KeyError):  # replaced meanwhile: look again
            return 0
    return 0


def test_cli_reindex_killed_after_a_checkpoint_resumes_from_it(collection_dir, toy_encoder):
    env = {k: v for k, v in os.environ.items() if k != rx.PAUSE_ENV}
    env.pop(rx.CHECKPOINT_ENV, None)  # the command's --checkpoint-every 8: every second chunk of 4
    command = _reindex_command(collection_dir)

    reference = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stderr
    assert f"{TOTAL} vectors" in reference.stdout
    with Collection.open(collection_dir) as collection:
        old = collection.current_version("image", "c1")
        ref_ids, ref_vectors = _vectors(collection, old.name)
        retriever = Retriever(collection, toy_encoder)
        query = retriever.embed_text("item 7")
        old_hits = [h.item_id for h in retriever.search(query, 5, correction="c1", strategy="reindexed").hits]
    assert sorted(ref_ids.tolist()) == list(range(1, TOTAL + 1))

    # Second job: pauses after its first durable checkpoint (a test hook), and is killed there.
    process = subprocess.Popen(command, cwd=REPO, env={**env, rx.PAUSE_ENV: "120"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while _recorded_count(collection_dir / "indexes") < 8:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the re-index never recorded a checkpoint"
            time.sleep(0.05)
        with Collection.open(collection_dir) as collection:  # searches meanwhile: the old version
            building = [v for v in collection.versions() if v.correction == "c1" and v.state == "building"]
            assert len(building) == 1 and building[0].name != old.name
            assert collection.current_version("image", "c1").name == old.name
            retriever = Retriever(collection, toy_encoder)
            hits = [h.item_id for h in retriever.search(query, 5, correction="c1", strategy="reindexed").hits]
            assert hits == old_hits
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    partial = building[0].name
    assert _recorded_count(collection_dir / "indexes") == 8  # the kill landed on the paused job
    leftovers = _hidden_files(collection_dir)
    # the record and the one segment it lists (ids and rows); nothing of the unrecorded chunks
    assert leftovers == sorted([f".{partial}.faiss.progress", *_segment_files(collection_dir, partial)])
    assert len(leftovers) == 3
    with Collection.open(collection_dir) as collection:  # still searchable after the kill
        assert collection.current_version("image", "c1").name == old.name
        assert [h.item_id for h in Retriever(collection, toy_encoder).search(
            query, 5, correction="c1", strategy="reindexed").hits] == old_hits

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming index version {partial} at 8 vectors" in resumed.stderr
    assert f"computed {TOTAL - 8} vectors, reused 8 from checkpoints" in resumed.stderr
    with Collection.open(collection_dir) as collection:
        new = collection.current_version("image", "c1")
        assert new.name == partial and new.count == TOTAL
        assert collection.version(old.name).state == "retired"
        ids, vectors = _vectors(collection, new.name)
        assert len(ids) == len(np.unique(ids)) == TOTAL  # every id exactly once
        assert np.array_equal(np.sort(ids), collection.embeddings.ids("image"))
        np.testing.assert_allclose(_by_id(ids, vectors), _by_id(ref_ids, ref_vectors), rtol=1e-5, atol=1e-6)
    assert _hidden_files(collection_dir) == []  # no staging, progress or temporary files
    assert {p.suffix for p in (collection_dir / "indexes").iterdir()} == {".faiss"}


# -- re-index jobs through the Python API --------------------------------------------------------
def _failing_on_call(monkeypatch, number: int) -> None:
    real_apply, calls = rx._apply, {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == number:
            raise RuntimeError("killed")
        return real_apply(*args)

    monkeypatch.setattr(rx, "_apply", flaky)


def test_resume_drops_staged_items_deleted_meanwhile(collection_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    with Collection.open(collection_dir) as collection:
        _failing_on_call(monkeypatch, 3)
        with pytest.raises(RuntimeError, match="killed"):
            reindex(collection, "c1", chunk_size=10, checkpoint_every=10, progress=False)
        monkeypatch.undo()
        failed = [v for v in collection.versions() if v.correction == "c1"]
        assert [v.state for v in failed] == ["failed"] and failed[0].count == 20
        collection.delete(ids=[3])
        version = reindex(collection, "c1", chunk_size=10, checkpoint_every=10, progress=False)
        ids, _ = _vectors(collection, version.name)
    assert version.name == failed[0].name
    assert sorted(ids.tolist()) == [i for i in range(1, TOTAL + 1) if i != 3]
    assert "dropping 1 staged vectors" in caplog.text
    assert f"computed {TOTAL - 20} vectors, reused 19 from checkpoints" in caplog.text
    assert _hidden_files(collection_dir) == []


def test_a_job_is_not_resumed_with_a_correction_fitted_again(collection_dir, monkeypatch, toy_encoder, caplog):
    """Killed, then the correction is refitted under the same name: the next re-index starts
    afresh with the new fit instead of mixing the two."""
    caplog.set_level(logging.INFO)
    concept = collection_dir.parent / "concept.csv"
    with Collection.open(collection_dir) as collection:
        _failing_on_call(monkeypatch, 3)
        with pytest.raises(RuntimeError, match="killed"):
            reindex(collection, "c1", chunk_size=10, checkpoint_every=10, progress=False)
        monkeypatch.undo()
        failed = next(v for v in collection.versions() if v.correction == "c1")
        assert failed.state == "failed" and failed.count == 20
        fit_concept_correction(collection, toy_encoder, load_concept_set(concept), name="c1", n_components=1,
                               replace=True)
        version = reindex(collection, "c1", chunk_size=10, checkpoint_every=10, progress=False)
        assert version.name != failed.name
        assert collection.version(failed.name).state == "retired"
        ids, vectors = _vectors(collection, version.name)
        P = rx.load_correction(collection, "c1").corrector.projection(n_components=1)
        raw = collection.embeddings.get("image", np.sort(ids))
    np.testing.assert_allclose(_by_id(ids, vectors), (raw / np.linalg.norm(raw, axis=1, keepdims=True)) @ P.T,
                               atol=1e-5)
    assert f"not resuming index version {failed.name}" in caplog.text
    assert f"computed {TOTAL} vectors, reused 0 from checkpoints" in caplog.text
    assert _hidden_files(collection_dir) == []


def test_ivf_version_resumes_and_searches_like_the_flat_one(collection_dir, monkeypatch):
    with Collection.open(collection_dir) as collection:
        flat = reindex(collection, "c1", progress=False)
        _failing_on_call(monkeypatch, 3)  # the 1st call trains on a sample, chunks follow
        with pytest.raises(RuntimeError, match="killed"):
            reindex(collection, "c1", factory="IVF2,Flat", chunk_size=10, checkpoint_every=10, progress=False)
        monkeypatch.undo()
        ivf = reindex(collection, "c1", factory="IVF2,Flat", chunk_size=10, checkpoint_every=10, progress=False)
        assert ivf.factory == "IVF2,Flat" and ivf.count == TOTAL
        _, flat_index = collection.open_index(flat.name)
        _, ivf_index = collection.open_index(ivf.name)
        ivf_index.set_nprobe(2)  # every list: exact
        queries = np.random.default_rng(0).standard_normal((5, ivf.dim)).astype(np.float32)
        flat_scores, flat_ids = flat_index.search(queries, 10)
        ivf_scores, ivf_ids = ivf_index.search(queries, 10)
    np.testing.assert_array_equal(ivf_ids, flat_ids)
    np.testing.assert_allclose(ivf_scores, flat_scores, rtol=1e-5, atol=1e-6)
    assert _hidden_files(collection_dir) == []


def test_a_checkpoint_in_the_former_format_is_resumed(collection_dir, caplog):
    """Before staging files, a checkpoint was the partial index saved as the version's file."""
    caplog.set_level(logging.INFO)
    with Collection.open(collection_dir) as collection:
        reference = reindex(collection, "c1", progress=False)
        ref_ids, ref_vectors = _vectors(collection, reference.name)
        with pytest.raises(RuntimeError):
            with collection.new_index_version(correction="c1", dim=reference.dim):
                raise RuntimeError("killed before any checkpoint")
        failed = next(v for v in collection.versions() if v.state == "failed")
        partial = VectorIndex.create(reference.dim)
        partial.add(ref_ids[:10], ref_vectors[:10], normalize=False)
        partial.save(failed.file)
        version = reindex(collection, "c1", progress=False)
        ids, vectors = _vectors(collection, version.name)
    assert version.name == failed.name
    assert f"resuming index version {failed.name} at 10 vectors" in caplog.text
    np.testing.assert_allclose(_by_id(ids, vectors), _by_id(ref_ids, ref_vectors), rtol=1e-5, atol=1e-6)
    assert _hidden_files(collection_dir) == []


def _poison_stored_embeddings(collection_dir: Path, rows: int) -> None:
    """Put NaN, +inf and -inf into the first ``rows`` rows of a stored image shard."""
    shard = sorted((collection_dir / "embeddings" / "image").glob("*.npy"))[0]
    vectors = np.load(shard)
    vectors[:rows, ::7] = np.array([np.nan, np.inf, -np.inf], np.float32)[np.arange(rows) % 3, None]
    np.save(shard, vectors)


def test_cli_reindex_never_publishes_nan_or_infinite_vectors(collection_dir, toy_encoder):
    command = _reindex_command(collection_dir)
    env = {k: v for k, v in os.environ.items() if k not in (rx.PAUSE_ENV, rx.CHECKPOINT_ENV)}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    with Collection.open(collection_dir) as collection:
        old = collection.current_version("image", "c1")
        before = _vectors(collection, old.name)
    _poison_stored_embeddings(collection_dir, 3)

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, second.stderr
    with Collection.open(collection_dir) as collection:
        failed = [v for v in collection.versions() if v.state == "failed"]
        assert len(failed) == 1
        assert errors[0] == (f"error: index version {failed[0].name} was not published: 3 of {TOTAL} vectors "
                             "hold NaN or infinite values (the current version stays in use)")
        assert collection.current_version("image", "c1").name == old.name  # nothing published
        assert not failed[0].file.exists()
        after = _vectors(collection, old.name)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])


def test_a_version_with_nan_is_not_published_through_the_api(collection_dir):
    with Collection.open(collection_dir) as collection:
        original = collection.current_version("image")
        ids = collection.embeddings.ids("image")
        vectors = collection.embeddings.get("image", ids)
        vectors[5, 0] = np.nan
        with pytest.raises(InputError, match=r"was not published: 1 of 40 vectors hold NaN"):
            with collection.new_index_version(factory="IVF2,Flat", expected_count=len(ids)) as writer:
                writer.train(vectors[np.isfinite(vectors).all(axis=1)])
                writer.add(ids, vectors)
        assert collection.current_version("image").name == original.name
        assert [v.state for v in collection.versions() if v.factory == "IVF2,Flat"] == ["failed"]


def test_leftover_staging_files_of_published_versions_are_swept(collection_dir):
    with Collection.open(collection_dir) as collection:
        first = reindex(collection, "c1", progress=False)
        stray = [first.file.with_name(f".{first.file.name}.progress"),
                 first.file.with_name(f".{first.file.name}.0a1b2c3d.partial")]
        for path in stray:
            path.write_text("left by a kill between publishing and cleaning up")
        reindex(collection, "c1", progress=False)
    assert not any(path.exists() for path in stray)
    assert _hidden_files(collection_dir) == []


# -- reading the store ------------------------------------------------------------------------
def test_streamed_chunks_with_exclusions_and_reused_buffers(collection_dir, monkeypatch):
    with Collection.open(collection_dir) as collection:
        store = collection.embeddings
        every = list(store.iter_chunks("image", chunk_size=7))
        all_ids = np.concatenate([ids for ids, _ in every])
        all_vectors = np.concatenate([v for _, v in every])
        assert sorted(all_ids.tolist()) == list(range(1, TOTAL + 1))
        np.testing.assert_array_equal(all_vectors, store.get("image", all_ids))

        buffers = []

        def into(rows, dim):
            buffers.append(np.empty((rows, dim), np.float32))
            return buffers[-1]

        skip = all_ids[::3]
        chunks = [(ids.copy(), v.copy()) for ids, v in store.iter_chunks("image", 6, exclude=skip, into=into)]
        kept = ~np.isin(all_ids, skip)
        np.testing.assert_array_equal(np.concatenate([ids for ids, _ in chunks]), all_ids[kept])
        np.testing.assert_array_equal(np.concatenate([v for _, v in chunks]), all_vectors[kept])
        assert all(b.shape == (6, all_vectors.shape[1]) for b in buffers)

        # the portable query (any SQL database) reads the same locations as SQLite's fast one
        monkeypatch.setattr(collection.catalog.engine.dialect, "name", "postgresql")
        portable = list(store.iter_chunks("image", chunk_size=7))
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in portable]), all_ids)


def test_reindex_with_an_in_memory_catalog(tmp_path: Path, toy_encoder: ToyEncoder):
    """The pipeline's worker threads must see the same in-memory SQLite catalog as the caller."""
    for i in range(12):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=100 + i)
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(12)))
    with Collection.open(tmp_path / "coll", db="sqlite://", create=True) as collection:
        collection.bind_encoder(toy_encoder.name, toy_encoder.dim)
        rng = np.random.default_rng(0)
        collection.add_items([NewItem(uri=f"x/{i}", sha256=f"{i:064x}", width=4, height=4, caption=f"c {i}")
                              for i in range(50)], rng.standard_normal((50, toy_encoder.dim)).astype(np.float32))
        collection.sync_index()
        fit_concept_correction(collection, toy_encoder, load_concept_set(concept), name="c1", n_components=2)
        version = reindex(collection, "c1", chunk_size=4, checkpoint_every=4, progress=False)
        assert version.count == 50
        ids, vectors = _vectors(collection, version.name)
        P = rx.load_correction(collection, "c1").corrector.projection(n_components=2)
        raw = collection.embeddings.get("image", np.sort(ids))
        expected = (raw / np.linalg.norm(raw, axis=1, keepdims=True)) @ P.T
        np.testing.assert_allclose(_by_id(ids, vectors), expected, atol=1e-5)


def test_paired_reindex_with_a_one_item_chunk(collection_dir, toy_encoder):
    """40 items in chunks of 3 end with a chunk of one item that has a caption."""
    concept = collection_dir.parent / "concept.csv"
    with Collection.open(collection_dir) as collection:
        fit_concept_correction(collection, toy_encoder, load_concept_set(concept), name="g1", kernel="gaussian",
                               rff_dim=16)
        version = reindex(collection, "g1", chunk_size=3, progress=False)
        ids, vectors = _vectors(collection, version.name)
        corrector = rx.load_correction(collection, "g1").corrector
        order = np.sort(ids)
        images = collection.embeddings.get("image", order)
        captions = collection.embeddings.get("caption", order)
    x = images / np.linalg.norm(images, axis=1, keepdims=True)
    expected = corrector.correct(captions / np.linalg.norm(captions, axis=1, keepdims=True), x)  # both unit
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert version.count == TOTAL
    np.testing.assert_allclose(_by_id(ids, vectors), expected, atol=1e-5)


# -- Gaussian corrections of raw (not unit-norm) encoder outputs ---------------------------------
OPEN_CLIP_ITEMS = 24
GAUSS = dict(kernel="gaussian", rff_dim=32, seed=3)


def _open_clip_encoder(model: str, scale: float = 1.0):
    """The tiny random open_clip model (raw outputs, norms far from 1), outputs times ``scale``."""
    from indexing.encoders.open_clip_encoder import OpenClipEncoder

    class Scaled(OpenClipEncoder):
        def encode_image_batch(self, batch):
            return super().encode_image_batch(batch) * np.float32(scale)

        def encode_texts(self, texts, batch_size=256, progress=False):
            return super().encode_texts(texts, batch_size, progress) * np.float32(scale)

    return Scaled(model, device="cpu")


def _open_clip_gaussian(root: Path, encoder) -> dict:
    """An open_clip collection with a Gaussian correction "g" fitted and re-indexed: the
    re-indexed vectors by item, the captions' file numbers, and the top hits of a text query."""
    rows = []
    for i in range(OPEN_CLIP_ITEMS):
        make_image(root / "imgs" / f"{i:03d}.png", seed=300 + i)
        rows.append({"file": f"imgs/{i:03d}.png", "caption": f"item {i}"})
    write_csv(root / "list.csv", rows, ["file", "caption"])
    build_collection(root / "list.csv", root / "coll", encoder=encoder, progress=False)
    concept = root / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(12)))
    with Collection.open(root / "coll") as collection:
        fit_concept_correction(collection, encoder, load_concept_set(concept), name="g", **GAUSS)
        version = reindex(collection, "g", chunk_size=5, progress=False)
        ids, vectors = _vectors(collection, version.name)
        order = np.sort(ids)
        records = collection.items(order)
        retriever = Retriever(collection, encoder)
        hits = retriever.search(retriever.embed_text("item 5"), 8, correction="g", strategy="reindexed").hits
        # a raw query vector (not unit-norm) ranks as its unit-norm form, as with a projection
        raw_hits = retriever.search(encoder.encode_texts(["item 5"])[0], 8, correction="g", strategy="reindexed").hits
        assert [h.item_id for h in raw_hits] == [h.item_id for h in hits]
        np.testing.assert_allclose([h.score for h in raw_hits], [h.score for h in hits], atol=1e-5)
        return {"ids": order, "vectors": _by_id(ids, vectors),
                "sigma": rx.load_correction(collection, "g").corrector.feature_map_.sigma_,
                "files": [int(records[i].caption.split()[1]) for i in order.tolist()],
                "images": collection.embeddings.get("image", order),
                "captions": collection.embeddings.get("caption", order),
                "hits": [(h.item_id, h.score) for h in hits]}


@pytest.mark.usefixtures("no_network")
def test_gaussian_paired_reindex_of_open_clip_outputs_is_fitted_and_applied_on_unit_embeddings(tmp_path, tiny_model):
    """Fitted on raw open_clip outputs and applied to unit-norm ones, the bandwidth and the
    random features were those of another scale; both sides are unit-norm embeddings now."""
    from sce_correct import SchurCorrector

    encoder = _open_clip_encoder(tiny_model)
    got = _open_clip_gaussian(tmp_path, encoder)
    norms = np.linalg.norm(got["images"], axis=1)
    assert np.abs(norms - 1).min() > 0.5  # the case at hand: raw outputs far from unit norm

    def unit(a):
        a = np.asarray(a, dtype=np.float64)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    # The brute force: the concept pairs (prompt "tone i%3", image file i, i < 12) on unit rows.
    by_file = dict(zip(got["files"], range(len(got["files"]))))
    images = unit(got["images"])
    prompts = unit(encoder.encode_texts(["tone 0", "tone 1", "tone 2"]))[[i % 3 for i in range(12)]]
    pair_images = images[[by_file[i] for i in range(12)]]
    both = np.vstack([prompts, pair_images])
    distances = np.linalg.norm(both[:, None] - both[None], axis=-1)[np.triu_indices(len(both), 1)]
    sigma = float(np.median(distances[distances > 0]))
    assert got["sigma"] == pytest.approx(sigma, rel=1e-5)  # the median heuristic of unit rows
    reference = SchurCorrector(sigma=sigma, center=True, **GAUSS).fit(prompts, pair_images)
    expected = reference.correct(unit(got["captions"]), images)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got["vectors"], expected, atol=1e-5)

    # a text query on the re-indexed version ranks by phi(unit query) . corrected vector
    query = unit(encoder.encode_texts(["item 5"]))
    scores = expected @ reference.feature_map_.transform(query)[0]
    top = np.argsort(-scores)[:8]
    assert [item for item, _ in got["hits"]] == got["ids"][top].tolist()
    np.testing.assert_allclose([score for _, score in got["hits"]], scores[top], atol=1e-5)


@pytest.mark.usefixtures("no_network")
def test_a_gaussian_correction_does_not_depend_on_the_scale_of_the_encoder_outputs(tmp_path, tiny_model):
    """The same model with every output times 40: the same correction, the same search."""
    plain = _open_clip_gaussian(tmp_path / "plain", _open_clip_encoder(tiny_model))
    scaled = _open_clip_gaussian(tmp_path / "scaled", _open_clip_encoder(tiny_model, scale=40.0))
    np.testing.assert_allclose(scaled["images"], 40 * plain["images"], rtol=1e-5)  # the wrapper did scale
    assert scaled["files"] == plain["files"]
    assert scaled["sigma"] == pytest.approx(plain["sigma"], rel=1e-5)
    np.testing.assert_allclose(scaled["vectors"], plain["vectors"], atol=1e-5)
    assert [i for i, _ in scaled["hits"]] == [i for i, _ in plain["hits"]]
    np.testing.assert_allclose([s for _, s in scaled["hits"]], [s for _, s in plain["hits"]], atol=1e-5)
