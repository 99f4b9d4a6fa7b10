"""Extra distillation views for emoji-vit (indexing/encoders/distill_views.py)."""
from __future__ import annotations

import numpy as np
import pytest

from indexing.encoders.distill_views import DistillViews, cached_views, make_views

pytestmark = pytest.mark.usefixtures("no_network")


def _sources(m=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(m, size, size, 3), dtype=np.uint8)
    families = np.arange(m) // 3  # 4 names of 3 images each
    return images, families


def test_views_are_seeded_and_built_from_their_recorded_sources():
    images, families = _sources()
    views, sources = make_views(images, families, 30, seed=5)
    again, sources_again = make_views(images, families, 30, seed=5)
    assert np.array_equal(views, again) and np.array_equal(sources, sources_again)
    assert not np.array_equal(views, make_views(images, families, 30, seed=6)[0])
    assert views.shape == (30, 16, 16, 3) and views.dtype == np.uint8
    for i in range(30):
        a, b = sources[i]
        kind = ("mix", "crop", "halves")[i % 3]
        if kind == "crop":
            assert b == -1
            continue
        assert families[a] != families[b]  # two different names
        if kind == "halves":  # every pixel comes from one of the two sources
            from_a = (views[i] == images[a]).all(-1)
            from_b = (views[i] == images[b]).all(-1)
            assert (from_a | from_b).all() and from_a.any() and from_b.any()
        else:  # a blend: each pixel lies between the two sources' values (rounded)
            lo = np.minimum(images[a], images[b]).astype(int) - 1
            hi = np.maximum(images[a], images[b]).astype(int) + 1
            assert ((views[i] >= lo) & (views[i] <= hi)).all()
            assert not np.array_equal(views[i], images[a]) and not np.array_equal(views[i], images[b])


def test_a_crop_of_a_constant_image_is_that_image():
    images = np.full((4, 16, 16, 3), 200, np.uint8)
    views, sources = make_views(images, np.arange(4), 6, seed=0)
    crops = [i for i in range(6) if sources[i, 1] == -1]
    assert crops and all((views[i] == 200).all() for i in crops)


def test_only_sources_drops_every_view_touching_a_disallowed_source():
    sources = np.array([[0, 1], [2, -1], [3, 0], [1, -1]])
    views = DistillViews(np.zeros((4, 2, 2, 3), np.uint8), sources, np.arange(4.0)[:, None])
    allowed = np.array([True, False, True, True])  # source 1 is held out of the run
    kept = views.only_sources(allowed)
    assert kept.sources.tolist() == [[2, -1], [3, 0]]
    assert kept.teacher[:, 0].tolist() == [1.0, 2.0]


class _CountingTeacher:
    def __init__(self):
        self.calls = 0

    def encode_images(self, images, batch_size=64, num_workers=2, progress=False):
        self.calls += 1
        x = np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in images])
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cached_views_computes_once_and_keys_on_the_source_files(tmp_path):
    from PIL import Image

    images, families = _sources(m=6)
    paths = []
    for i, x in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(x).save(paths[-1])
    teacher = _CountingTeacher()
    first = cached_views(paths, families[:6], 9, 0, teacher, tmp_path / "cache", "t")
    second = cached_views(paths, families[:6], 9, 0, teacher, tmp_path / "cache", "t")
    assert teacher.calls == 1
    assert np.array_equal(first.images, second.images) and np.allclose(first.teacher, second.teacher)
    expected = _CountingTeacher().encode_images([Image.fromarray(v) for v in first.images])
    assert np.allclose(first.teacher, expected)
    Image.fromarray(255 - images[0]).save(paths[0])  # a changed source file is a new pool
    cached_views(paths, families[:6], 9, 0, teacher, tmp_path / "cache", "t")
    assert teacher.calls == 2
    cached_views(paths, families[:6], 9, 0, teacher, tmp_path / "cache", "another teacher")
    assert teacher.calls == 3
    assert len(list((tmp_path / "cache").glob("distill-views-*.npz"))) == 3
