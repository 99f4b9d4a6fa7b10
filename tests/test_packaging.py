"""Build a wheel, install it apart from the source tree, and use it as a user would.

The installs go into fresh virtual environments whose only link to this machine's
environment is a .pth line that adds its site-packages for the dependencies (torch, faiss,
...): nothing is downloaded, and neither the checkout nor the editable install's finder is on
the path (a .pth line adds a folder; that folder's own .pth files are not run).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from indexing.collection import Collection
from indexing.shipped_data import shipped_data
from sce_correct.errors import NotFoundError

ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("sce_correct", "indexing", "retrieval", "ui")
DATA_PACKAGE = "sce_data"  # the repository's data/ folder, mapped by pyproject.toml


def _tracked(*paths: str) -> set[str]:
    """Files under `paths` that git tracks or would track (what a wheel must carry)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *paths],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
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


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without PYTHONPATH (which points at the checkout in development)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "PATH": "/usr/bin:/bin", **extra}


def _venv(where: Path) -> Path:
    """A new virtual environment that sees this environment's site-packages through a .pth line."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip_install(python: Path, *args: str) -> None:
    res = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                          "-q", *args], capture_output=True, text=True, env=_clean_env())
    assert res.returncode == 0, res.stderr


def _where_from(python: Path, cwd: Path) -> dict[str, str]:
    """Where an interpreter imports each package from, and where it finds the shipped data."""
    code = (
        "import importlib, sys\n"
        f"for name in {(*CODE_PACKAGES, DATA_PACKAGE)!r}:\n"
        "    print(name, importlib.import_module(name).__file__)\n"
        "assert 'torch' not in sys.modules and 'gradio' not in sys.modules, 'heavy import at import time'\n"
        "from indexing.shipped_data import shipped_data\n"
        "print('concepts', shipped_data('concepts'))\n"
        "print('sample', shipped_data('sample', 'captions.csv'))\n"
        "print('finders', ' '.join(type(f).__name__ if not isinstance(f, type) else f.__name__ for f in sys.meta_path))\n"
    )
    res = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, env=_clean_env())
    assert res.returncode == 0, res.stderr
    return dict(line.split(" ", 1) for line in res.stdout.splitlines())


def test_wheel_carries_exactly_the_packages_and_their_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {*CODE_PACKAGES, DATA_PACKAGE}
    expected = _tracked(*CODE_PACKAGES) | {DATA_PACKAGE + p.removeprefix("data") for p in _tracked("data")}
    missing = expected - names
    assert not missing, f"files missing from the wheel: {sorted(missing)[:10]}"
    assert f"{DATA_PACKAGE}/sample/LICENSE-NOTICE.txt" in names
    assert len([n for n in names if n.startswith(f"{DATA_PACKAGE}/sample/images/")]) > 3000
    meta = zipfile.ZipFile(wheel)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sce = ui.cli:main" in meta.read(entry_points).decode()
    licences = {n.split("/licenses/", 1)[1] for n in names if ".dist-info/licenses/" in n}
    assert licences == {"data/sample/LICENSE-NOTICE.txt", "data/licenses/Apache-2.0.txt"}


def test_installed_wheel_imports_and_finds_its_data_from_another_directory(wheel, tmp_path):
    env = tmp_path / "env"
    python = _venv(env)
    _pip_install(python, str(wheel))
    where = _where_from(python, cwd=tmp_path)
    for name in (*CODE_PACKAGES, DATA_PACKAGE, "concepts", "sample"):
        assert Path(where[name]).is_relative_to(env), (name, where[name])
    assert "_EditableFinder" not in where["finders"]


def test_editable_install_finds_the_checkouts_data(tmp_path):
    python = _venv(tmp_path / "env")
    _pip_install(python, "-e", str(ROOT))
    where = _where_from(python, cwd=tmp_path)
    assert Path(where["ui"]) == ROOT / "ui" / "__init__.py"
    assert Path(where["concepts"]) == ROOT / "data" / "concepts"
    assert Path(where["sample"]) == ROOT / "data" / "sample" / "captions.csv"


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_in_an_empty_folder(wheel, tmp_path):
    """`sce demo --no-serve` from the wheel alone: builds the whole sample collection (minutes)."""
    env = tmp_path / "env"
    python = _venv(env)
    _pip_install(python, str(wheel))
    work = tmp_path / "empty"
    work.mkdir()
    res = subprocess.run([str(env / "bin" / "sce"), "demo", "--no-serve", "--quiet"], cwd=work,
                         capture_output=True, text=True, env=_clean_env(), timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    out = res.stdout
    assert "building the sample collection in demo-collection" in out
    assert "SCE report of the sample corpus" in out and "SCE score (image diversity E(S))" in out
    for name in ("no-skin-tone", "no-gender", "no-colour"):
        assert f"with {name}:" in out
    assert (work / "demo-report").is_dir()
    with Collection.open(work / "demo-collection") as coll:
        uris = coll.known_uris(include_failures=False)
    with (ROOT / "data" / "sample" / "captions.csv").open(encoding="utf-8") as fh:
        distinct = {row["sha256"] for row in csv.DictReader(fh)}  # pixel-identical images are indexed once
    assert len(uris) == len(distinct)
    assert all(Path(uri).is_relative_to(env) for uri in uris)  # the images shipped in the wheel


def test_shipped_data_names_what_is_missing():
    assert (shipped_data("concepts") / "colour.csv").is_file()
    with pytest.raises(NotFoundError, match="the shipped data has no sample/nothing-here"):
        shipped_data("sample", "nothing-here")
