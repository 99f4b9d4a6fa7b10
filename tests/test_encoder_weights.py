"""A collection records its encoder's weights id; writes with other weights under the same name
are refused, reads warn, and collections without a recorded id accept any."""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ToyEncoder, make_image
from typer.testing import CliRunner

from indexing.catalog import CatalogInfo
from indexing.collection import WEIGHTS_KEY, Collection, EncoderMismatchError
from indexing.encoders import emoji_vit
from indexing.encoders.default_encoder import HEAD_PATH, DefaultEncoder
from indexing.encoders.emoji_vit import WEIGHTS_PATH, EmojiVitEncoder
from indexing.encoders.open_clip_encoder import OpenClipEncoder
from indexing.pipeline import add_to_collection, build_collection

REPO = Path(__file__).resolve().parents[1]
ID_FORMAT = re.compile(r"sha256:[0-9a-f]{16}")
pytestmark = pytest.mark.usefixtures("no_network")


def changed_weights(source: Path, target: Path) -> Path:
    """``source``'s safetensors state with one value of one tensor changed."""
    from safetensors.numpy import load_file, save_file

    state = load_file(str(source))
    name = sorted(state)[0]
    state[name] = state[name].copy()
    state[name].flat[0] += np.asarray(0.5, dtype=state[name].dtype)
    save_file(state, str(target))
    return target


@pytest.fixture
def weights(tmp_path) -> tuple[Path, Path]:
    """(a copy of the shipped emoji-vit weights, a slightly changed version of them)."""
    same = tmp_path / "weights" / "a.safetensors"
    same.parent.mkdir()
    shutil.copyfile(WEIGHTS_PATH, same)
    return same, changed_weights(WEIGHTS_PATH, tmp_path / "weights" / "b.safetensors")


def build(root: Path, images: Path, weights_path: Path):
    return build_collection(images, root, encoder=EmojiVitEncoder(device="cpu", weights_path=weights_path),
                            workers=0, progress=False, captions=False)


def more_images(folder: Path, seeds=range(200, 203)) -> Path:
    for seed in seeds:
        make_image(folder / f"new_{seed}.png", seed=seed)
    return folder


def test_the_id_follows_the_bytes_of_the_weights_file(weights, tmp_path):
    same, changed = weights
    shipped = EmojiVitEncoder().weights_id
    assert ID_FORMAT.fullmatch(shipped)
    assert EmojiVitEncoder(weights_path=same).weights_id == shipped  # same bytes, another path
    assert EmojiVitEncoder().weights_id == shipped  # stable
    assert EmojiVitEncoder(weights_path=changed).weights_id not in (None, shipped)
    same.write_bytes(changed.read_bytes())  # the file at the same path changes: so does the id
    assert EmojiVitEncoder(weights_path=same).weights_id == EmojiVitEncoder(weights_path=changed).weights_id

    head = tmp_path / "head.npz"
    shutil.copyfile(HEAD_PATH, head)
    assert DefaultEncoder(head_path=head).weights_id == DefaultEncoder().weights_id
    head.write_bytes(head.read_bytes() + b"\0")
    assert DefaultEncoder(head_path=head).weights_id != DefaultEncoder().weights_id

    checkpoint = str(tmp_path / "checkpoint.safetensors")
    shutil.copyfile(changed, checkpoint)
    assert OpenClipEncoder("ViT-B-32", checkpoint).weights_id == EmojiVitEncoder(weights_path=changed).weights_id
    assert OpenClipEncoder("ViT-B-32", "laion2b_s34b_b79k").weights_id is None  # a hub tag: the name says it


def test_the_id_loads_no_model():
    code = ("import sys, indexing; e = indexing.load_encoder('emoji-vit'); d = indexing.load_encoder('default'); "
            "assert e.weights_id and d.weights_id; print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_build_records_the_weights_id_and_info_shows_it(tmp_path, image_folder, weights):
    same, _ = weights
    build(tmp_path / "coll", image_folder, same)
    with Collection.open(tmp_path / "coll") as opened:
        assert opened.encoder_weights == EmojiVitEncoder(weights_path=same).weights_id
        assert opened.info().encoder_weights == opened.encoder_weights
    from ui.cli import app

    result = CliRunner().invoke(app, ["index", "info", "-c", str(tmp_path / "coll")])
    assert result.exit_code == 0, result.output
    assert f"weights     {EmojiVitEncoder(weights_path=same).weights_id}" in result.output


def test_adding_with_other_weights_is_refused_and_writes_nothing(tmp_path, image_folder, weights):
    same, changed = weights
    root = tmp_path / "coll"
    build(root, image_folder, same)
    with Collection.open(root) as opened:
        ids, stored = opened.item_ids(), opened.embeddings.get("image", opened.item_ids())
    other = EmojiVitEncoder(device="cpu", weights_path=changed)
    with pytest.raises(EncoderMismatchError) as refused:
        add_to_collection(more_images(image_folder), root, encoder=other, workers=0, progress=False, captions=False)
    message = str(refused.value)
    assert "\n" not in message and "emoji-vit" in message and "sce index build" in message
    assert EmojiVitEncoder(weights_path=same).weights_id in message and other.weights_id in message
    with Collection.open(root) as opened:
        assert opened.item_ids().tolist() == ids.tolist() and opened.embeddings.count("image") == len(ids)
        np.testing.assert_array_equal(opened.embeddings.get("image", ids), stored)
        assert not opened.failures() and opened.current_version().count == len(ids)
    # the same weights (another copy of them) are accepted
    report = add_to_collection(image_folder, root, encoder=EmojiVitEncoder(device="cpu", weights_path=WEIGHTS_PATH),
                               workers=0, progress=False, captions=False)
    assert report.added == 3


def test_the_cli_refuses_an_add_once_the_installed_weights_changed(tmp_path, image_folder, weights, monkeypatch):
    from ui.cli import app

    root = str(tmp_path / "coll")
    result = CliRunner().invoke(app, ["index", "build", str(image_folder), "-c", root, "--encoder", "emoji-vit",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(emoji_vit, "WEIGHTS_PATH", weights[1])  # a release with new weights, same name
    result = CliRunner().invoke(app, ["index", "add", str(more_images(image_folder)), "-c", root, "--quiet"])
    assert result.exit_code != 0
    assert EmojiVitEncoder(weights_path=weights[1]).weights_id in result.output
    with Collection.open(root) as opened:
        assert opened.embeddings.count("image") == 12


def test_reading_works_and_loading_the_encoder_warns(tmp_path, image_folder, weights, monkeypatch, caplog):
    same, changed = weights
    root = tmp_path / "coll"
    build(root, image_folder, same)
    with Collection.open(root) as opened, caplog.at_level(logging.WARNING, logger="indexing.collection"):
        opened.load_encoder(device="cpu")
        assert not caplog.records  # the installed weights are the recorded ones
        monkeypatch.setattr(emoji_vit, "WEIGHTS_PATH", changed)
        encoder = opened.load_encoder(device="cpu")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and opened.encoder_weights in warnings[0] and encoder.weights_id in warnings[0]
        query = encoder.encode_images([image_folder / "img_00.png"], num_workers=0)
        hits = opened.search(query, k=3, encoder=encoder.name)[0]
        assert len(hits) == 3
        with pytest.raises(EncoderMismatchError, match=encoder.weights_id):  # but not to write with
            opened.check_writer(encoder)


def test_a_collection_without_a_recorded_id_accepts_any_and_gets_none(tmp_path, image_folder, weights, caplog):
    same, changed = weights
    root = tmp_path / "coll"
    build(root, image_folder, same)
    with Collection.open(root) as opened:  # as bound before weights ids were recorded
        with opened.catalog.sessions.begin() as session:
            session.delete(session.get(CatalogInfo, WEIGHTS_KEY))
        assert opened.encoder_weights is None
    with caplog.at_level(logging.WARNING, logger="indexing.collection"):
        report = add_to_collection(more_images(image_folder), root,
                                   encoder=EmojiVitEncoder(device="cpu", weights_path=changed),
                                   workers=0, progress=False, captions=False)
        assert report.added == 3
        with Collection.open(root) as opened:
            opened.load_encoder()
            assert opened.encoder_weights is None  # not written afterwards
            assert opened.embeddings.count("image") == 15
    assert not [r for r in caplog.records if r.name == "indexing.collection" and r.levelno >= logging.WARNING]


def test_an_encoder_that_cannot_tell_its_weights_is_accepted(tmp_path, image_folder, weights):
    root = tmp_path / "coll"
    build(root, image_folder, weights[0])
    with Collection.open(root) as opened:
        unknown = ToyEncoder(dim=384)
        unknown.name = "emoji-vit"
        opened.check_writer(unknown)  # no weights_id: nothing to compare
        with pytest.raises(EncoderMismatchError):
            opened.check_writer(EmojiVitEncoder(weights_path=weights[1]))


def test_ray_actors_get_the_encoder_object_when_its_weights_are_not_the_installed_ones(weights):
    from indexing.ray_engine import encoder_recipe

    loader, what = encoder_recipe(EmojiVitEncoder(weights_path=weights[0]))  # the installed bytes
    assert loader is not None and what == "emoji-vit"
    other = EmojiVitEncoder(weights_path=weights[1])
    assert encoder_recipe(other) == (None, other)
