"""Shared test fixtures: a small deterministic encoder, image files to index, and catalogs on
SQLite and on a throwaway PostgreSQL server (tests/postgres_server.py)."""
from __future__ import annotations

import csv
import hashlib
import itertools
import struct
import subprocess
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from postgres_server import PostgresServer, find_unavailable_reason


class ToyEncoder:
    """A deterministic stand-in for a real encoder, for testing the plumbing.

    Images: downsampled to 8x8 RGB and multiplied by a fixed seeded random projection.
    Texts: each hashed to a seeded Gaussian vector. Outputs are raw (not unit-norm), as
    the contract allows. ``delay`` slows each batch (to kill a build part way) and
    ``batches_seen``/``images_seen`` count the work done.
    """

    def __init__(self, dim: int = 16, seed: int = 0, delay: float = 0.0,
                 name: str = "toy-projection") -> None:
        self.name = f"{name}-{dim}"
        self.dim = dim
        self.delay = delay
        self.projection = np.random.default_rng(seed).standard_normal((3 * 8 * 8, dim))
        self.projection = self.projection.astype(np.float32)
        self.images_seen = 0
        self.batches_seen = 0

    def preprocess(self, image: Image.Image):
        import torch

        small = image.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
        array = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy(np.ascontiguousarray(array))

    def encode_image_batch(self, batch) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        self.batches_seen += 1
        self.images_seen += int(batch.shape[0])
        flat = batch.reshape(batch.shape[0], -1).numpy()
        return (3.0 * (flat - 0.5) @ self.projection).astype(np.float32)

    def encode_images(self, images: Sequence, batch_size: int = 64, num_workers: int = 0,
                      progress: bool = False) -> np.ndarray:
        import torch

        tensors = [self.preprocess(image if isinstance(image, Image.Image) else Image.open(image))
                   for image in images]
        return self.encode_image_batch(torch.stack(tensors))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256,
                     progress: bool = False) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(self.dim))
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), self.dim)


def make_image(path: Path, seed: int, size: tuple[int, int] = (24, 24), mode: str = "RGB") -> Path:
    """A small image with distinct seeded content (so every seed has its own sha256)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def make_png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (``usefixtures("no_network")``)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def toy_encoder() -> ToyEncoder:
    return ToyEncoder()


TINY_OPEN_CLIP = "sce-test-tiny-vit"
TINY_OPEN_CLIP_CONFIG = {  # a 2-layer ViT + 2-layer text transformer, 32-d shared space
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The name of a tiny open_clip model registered with open_clip: random but seeded weights
    (``open_clip:<name>`` loads it offline), raw outputs far from unit norm."""
    import json

    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    return TINY_OPEN_CLIP


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Twelve distinct images in nested folders, one with a non-ASCII name."""
    root = tmp_path / "images"
    for number in range(10):
        make_image(root / ("sub" if number % 2 else "") / f"img_{number:02d}.png", seed=number)
    make_image(root / "café" / "smiley 😀 ñ.png", seed=100)
    make_image(root / "photo.jpg", seed=101)
    (root / "notes.txt").write_text("not indexed: no image extension")
    return root


def write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> Path:
    """A CSV listing (header + rows), e.g. file,caption for build_collection."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# -- catalogs on SQLite and PostgreSQL ----------------------------------------------------------
#: The catalog backends a `catalog_url` test runs on; the PostgreSQL one is marked `postgres`.
CATALOG_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the session (initdb once), stopped at its end.
    Skips the test, saying how to get one, where PostgreSQL or its driver is missing."""
    reason = find_unavailable_reason()
    if reason is not None:
        pytest.skip(f"PostgreSQL catalog tests: {reason}")
    server = PostgresServer()
    try:
        server.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        server.stop()
        pytest.skip(f"PostgreSQL catalog tests: could not start a test server: {error}")
    yield server
    server.stop()


@pytest.fixture(params=CATALOG_BACKENDS)
def catalog_backend(request) -> str:
    return request.param


@pytest.fixture
def new_catalog_url(request, catalog_backend: str, tmp_path: Path):
    """Makes a fresh, empty catalog URL on the test's backend at each call: an SQLite file
    under ``tmp_path``, or a new database on the session's server (dropped after the test)."""
    if catalog_backend == "sqlite":
        numbers = itertools.count()
        yield lambda: f"sqlite:///{tmp_path / f'catalog-{next(numbers)}.sqlite'}"
        return
    server = request.getfixturevalue("postgres_server")
    try:
        yield server.new_database
    finally:
        server.drop_databases()


@pytest.fixture
def catalog_url(new_catalog_url) -> str:
    """An empty catalog's URL, on SQLite and (marked ``postgres``) on PostgreSQL."""
    return new_catalog_url()
