"""Build a wheel, install it apart from the source tree and import every package from it."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sce_correct", "indexing", "retrieval", "ui")


def _package_files() -> set[str]:
    """Files under the packages that git tracks or would track (what a wheel must carry)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGES],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return {p for p in out if "__pycache__" not in p and not p.endswith(".pyc")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )
    (whl,) = out.glob("sce_retrieval-*.whl")
    return whl


def test_wheel_carries_exactly_the_packages_and_their_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == set(PACKAGES)
    missing = {f for f in _package_files() if f not in names}
    assert not missing, f"files missing from the wheel: {sorted(missing)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sce = ui.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_imports_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    code = (
        "import importlib, sys\n"
        f"for name in {PACKAGES!r}:\n"
        "    mod = importlib.import_module(name)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), (name, mod.__file__)\n"
        "assert 'torch' not in sys.modules and 'gradio' not in sys.modules, 'heavy import at import time'\n"
        "print('ok')\n"
    )
    # PYTHONPATH puts the installed wheel ahead of the editable install; cwd is not the repo.
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
