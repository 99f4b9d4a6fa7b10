"""The `sce` command line with the test encoder: ``python tests/toy_cli.py ARGS...`` runs ``sce ARGS...``.

The one hook of the black-box suites (tests/test_faults.py, tests/test_kill_resume.py):
``indexing.load_encoder`` resolves the specs in ``TOY_SPECS`` (and the name the toy encoder
stores in a collection) to :class:`DecodingToyEncoder`; every other spec goes to the
product's own ``load_encoder`` (so bogus specs get the product's error). Everything else is
the real CLI in a real process. ``SCE_TEST_TOY_DELAY`` (seconds) slows each image batch, so
that a kill can land part way through a build.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import ToyEncoder  # noqa: E402

TOY_SPECS = ("toy", "default", ToyEncoder().name)


class DecodingToyEncoder(ToyEncoder):
    """The toy encoder reading files as the product's encoders do (``indexing.encoders.open_image``:
    missing, empty, truncated, non-image and oversized files raise the product's own error)."""

    def encode_images(self, images, batch_size: int = 64, num_workers: int = 0, progress: bool = False):
        from indexing.encoders import open_image

        return super().encode_images([open_image(image) for image in images], batch_size, num_workers, progress)


def toy_load_encoder(real):
    delay = float(os.environ.get("SCE_TEST_TOY_DELAY", "0") or 0)

    def load(spec, device=None):
        if spec in TOY_SPECS:
            return DecodingToyEncoder(delay=delay)
        return real(spec, device=device)

    return load


@contextlib.contextmanager
def toy_specs_in_process():
    """While open, `indexing.load_encoder` in this process resolves the test specs to the toy encoder."""
    import indexing
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(indexing, "load_encoder", toy_load_encoder(indexing.load_encoder))
        yield


def install() -> None:
    import indexing

    indexing.load_encoder = toy_load_encoder(indexing.load_encoder)


if __name__ == "__main__":
    install()
    from ui.cli import main

    sys.argv = ["sce", *sys.argv[1:]]
    main()
