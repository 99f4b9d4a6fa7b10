"""Where the data shipped with the package lives: the sample corpus and the concept sets.

The repository keeps them in ``data/`` at its root (``data/sample``, ``data/concepts``, their
licence notices). pyproject.toml maps that folder to the package name ``sce_data``, so a wheel
carries it and an editable install finds it in the checkout; :func:`shipped_data` looks it up
through :mod:`importlib.resources`, and every caller (``sce demo``, the web UI's list of concept
sets, the command line's defaults) goes through it.
"""
from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

from sce_correct.errors import NotFoundError

logger = logging.getLogger(__name__)

PACKAGE = "sce_data"


def _package_root() -> Path:
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        # Run from a source checkout that is not installed (PYTHONPATH=checkout): data/ beside
        # the packages is the same folder an install would map to `sce_data`.
        checkout = Path(__file__).resolve().parents[1] / "data"
        if (checkout / "__init__.py").is_file():
            logger.debug("package %s is not installed; using the checkout's %s", PACKAGE, checkout)
            return checkout
        raise NotFoundError(f"the shipped data (package {PACKAGE}) is not installed; reinstall sce-retrieval") from None
    if not isinstance(root, Path):  # e.g. imported from a zip file: the files have no path of their own
        raise NotFoundError(f"the shipped data (package {PACKAGE}) is not a folder on disk ({root}); "
                            "install sce-retrieval with pip")
    return root


def shipped_data(*parts: str) -> Path:
    """The path of ``parts`` inside the shipped data, e.g. ``shipped_data("concepts")``.

    ``shipped_data("sample", "captions.csv")`` is the sample corpus's listing. Raises
    :class:`NotFoundError` when that file or folder is not there.
    """
    path = _package_root().joinpath(*parts)
    if not path.exists():
        raise NotFoundError(f"the shipped data has no {'/'.join(parts)} ({path}); reinstall sce-retrieval")
    return path
