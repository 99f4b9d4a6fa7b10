"""Fault suite: generated bad inputs through the `sce` command line, as a user would give them.

Black box: the tests depend on the public CLI (`ui.cli.app` through typer's CliRunner, and a
few cases in a real process through tests/toy_cli.py) and on what a user can see on disk: the
catalog file read with SQLAlchemy (every table, by reflection), the files of the collection
folder, `sce index info` and `sce search` output. The only hook is the encoder:
`indexing.load_encoder` resolves the test specs to the seeded toy encoder of conftest.py (as
tests/test_cli_index.py does), reading files through the product's own image check, so no
model loads.

Every REFUSED case must exit non-zero with one error line on stderr (no traceback, no dump,
nothing on stdout), and leave the collection exactly as it was (every catalog row, every
file under the collection folder, `index info`, an original/corrected A/B search) and write
nothing next to its inputs (no half-written collection or report). The HANDLED cases are
bad files that the indexing pipeline is designed to record as rejected (missing files,
non-images, paths outside the listing's folder, duplicates): they exit 0, add failure rows
only, and leave items, vectors and search results unchanged.

Cases that fail on today's code carry ``xfail(strict=True, reason="known: ...")``: when a fix
lands the case turns into an XPASS error and the mark must be removed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import toy_cli
from conftest import make_image, make_png_header_only
from PIL import Image
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 12
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def toy_encoder_specs():
    """`indexing.load_encoder` resolves the test specs to the toy encoder (tests/toy_cli.py)."""
    with toy_cli.toy_specs_in_process():
        yield


def invoke(*args):
    return runner.invoke(app(), [str(a) for a in args], env={"COLUMNS": "400", "NO_COLOR": "1"})


def app():
    from ui.cli import app as sce_app

    return sce_app


@dataclass
class World:
    """The shared, consistent collection every case runs against."""

    root: Path
    coll: Path
    images: list[Path]  # the indexed images (captions "item i", metadata tone = i % 3)
    listing: Path
    concept: Path
    pristine: dict  # its snapshot
    backup: Path  # a copy of its folder, put back after a case changed it

    def restore(self) -> None:
        shutil.rmtree(self.coll)
        shutil.copytree(self.backup, self.coll, symlinks=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, toy_encoder_specs) -> World:
    root = tmp_path_factory.mktemp("faults")
    images = [make_image(root / "imgs" / f"{i:02d}.png", seed=i) for i in range(N_ITEMS)]
    listing = root / "list.csv"
    _write_csv(listing, ["file", "caption", "tone"],
               [[f"imgs/{i:02d}.png", f"item {i}", str(i % 3)] for i in range(N_ITEMS)])
    coll = root / "coll"
    concept = root / "concept.csv"
    _write_csv(concept, ["prompt", "image"], [[f"tone {i % 3}", f"imgs/{i:02d}.png"] for i in range(N_ITEMS)])
    for argv in (["index", "build", listing, "-c", coll, "--encoder", "toy", "-q"],
                 ["correct", "fit", "--name", "c1", "--concept", concept, "--components", "1", "-c", coll, "-q"],
                 ["index", "reindex", "--correction", "c1", "-c", coll, "-q"]):
        result = invoke(*argv)
        assert result.exit_code == 0, result.output
    assert_consistent(coll)
    backup = root / "coll-backup"
    shutil.copytree(coll, backup, symlinks=True)
    return World(root, coll, images, listing, concept, snapshot(coll), backup)


# -- what a user can see: the snapshot -------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog_rows(coll: Path) -> dict[str, list[tuple]]:
    """Every row of every table of the catalog file, read with SQLAlchemy (schema-agnostic)."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{coll / 'catalog.sqlite'}")
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as connection:
            return {name: sorted(tuple(repr(v) for v in row) for row in connection.execute(sa.select(table)))
                    for name, table in sorted(meta.tables.items())}
    finally:
        engine.dispose()


def folder_files(folder: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and not skip(p)}


def _not_catalog(path: Path) -> bool:
    return path.name.startswith("catalog.sqlite") or path.name == ".write.lock"


def snapshot(coll: Path) -> dict:
    info = invoke("index", "info", "-c", coll, "--failures", "1000")
    ab = invoke("search", "item 3", "-k", "5", "--ab", "c1", "--json", "-c", coll)  # original and corrected
    assert info.exit_code == ab.exit_code == 0, info.output + ab.output
    return {"catalog": catalog_rows(coll), "files": folder_files(coll, _not_catalog), "info": info.stdout,
            "search": {key: value for key, value in json.loads(ab.stdout).items() if key != "ms"}}  # ms: timing


def assert_consistent(coll: Path) -> None:
    """The catalog, the stored embeddings and the current index versions agree."""
    info = invoke("index", "info", "-c", coll).stdout
    items = int(re.search(r"^items\s+(\d+)", info, re.M).group(1))
    assert re.search(rf"^embeddings\s+image: {items}$", info, re.M), info
    versions = re.findall(r"^\s+(\S+)\s+ready\s+image\s+correction=(\S+)\s+\S+\s+(\d+) vectors(.*)$", info, re.M)
    assert {c for _, c, _, _ in versions} >= {"-", "c1"}, info
    for name, _, count, note in versions:
        assert int(count) == items and not note.strip(), info
    hits = json.loads(invoke("search", "item 3", "-k", str(items), "--json", "-c", coll).stdout)["hits"]
    assert len(hits) == items and len({h["id"] for h in hits}) == items
    assert all(np.isfinite(h["score"]) for h in hits)
    assert not [p for p in (coll / "indexes").iterdir() if p.name.startswith(".")]  # no staging left


def error_line(stderr: str) -> str:
    """The one message of a failed command, or an assertion naming why there is not one.

    typer's usage errors (exit 2) are a 'Usage:' line, a 'Try ... --help' line and one
    message in a box; the box is unwrapped to its one line.
    """
    assert "Traceback" not in stderr, stderr
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("Usage:"):
        lines = [line.strip().strip("│").strip() for line in lines[1:]
                 if not line.startswith("Try ") and not line.lstrip().startswith(("╭", "╰"))]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{stderr}"
    return lines[0]


# -- generated bad inputs ---------------------------------------------------------------------
def png_bytes(seed: int, size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int, size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _bad_images() -> dict[str, Callable[[Path], Path]]:
    rng = np.random.default_rng(12)

    def content(suffix: str, data: bytes):
        def make(d: Path) -> Path:
            path = d / f"bad{suffix}"
            path.write_bytes(data)
            return path
        return make

    out = {f"zero_byte{s}": content(s, b"") for s in (".png", ".jpg", ".webp", ".gif", ".bmp")}
    out.update({
        "text_as_png": content(".png", b"hello, this is not an image\n"),
        "html_as_jpg": content(".jpg", b"<!doctype html><html><body>404</body></html>"),
        "json_as_gif": content(".gif", b'{"an": "object"}'),
        "csv_as_tiff": content(".tiff", b"a,b\n1,2\n"),
        "png_signature_only": content(".png", b"\x89PNG\r\n\x1a\n"),
        "png_signature_then_noise": content(".png", b"\x89PNG\r\n\x1a\n" + rng.bytes(300)),
        "jpeg_header_then_noise": content(".jpg", b"\xff\xd8\xff\xe0" + rng.bytes(300)),
    })
    for i, suffix in enumerate((".png", ".jpg", ".webp", ".bmp")):
        out[f"random_bytes_{i}{suffix}"] = content(suffix, rng.bytes(int(rng.integers(10, 2000))))
    for fraction in (0.2, 0.45, 0.7):
        data = png_bytes(int(fraction * 100))
        out[f"truncated_png_{int(fraction * 100)}"] = content(".png", data[: int(len(data) * fraction)])
        data = jpeg_bytes(int(fraction * 100))
        out[f"truncated_jpg_{int(fraction * 100)}"] = content(".jpg", data[: int(len(data) * fraction)])

    def bomb(d: Path) -> Path:
        return make_png_header_only(d / "bomb.png", 60_000, 60_000)

    def folder(d: Path) -> Path:
        (d / "folder.png").mkdir()
        return d / "folder.png"

    def dangling(d: Path) -> Path:
        (d / "dangling.png").symlink_to(d / "nowhere.png")
        return d / "dangling.png"

    def loop(d: Path) -> Path:
        (d / "loop.png").symlink_to(d / "loop.png")
        return d / "loop.png"

    out.update({"decompression_bomb": bomb, "folder_named_png": folder, "dangling_symlink": dangling,
                "symlink_loop": loop})
    return out


BAD_IMAGES = _bad_images()


def _write_csv(path: Path, header: list[str] | None, rows: list[list[str]], encoding="utf-8", delimiter=",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


def _write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


@dataclass
class Case:
    id: str
    argv: Callable[[Path, World], list]  # (case folder, world) -> the command line
    match: str = ""  # a regex (case-insensitive) the error line must contain: it names the problem
    known: str | None = None  # today's behaviour when the case fails today (strict xfail)


REFUSED: list[Case] = []
HANDLED: list[Case] = []


def refused(id, argv, match="", known=None):
    REFUSED.append(Case(id, argv, match, known))


def handled(id, argv, match="", known=None):
    HANDLED.append(Case(id, argv, match, known))


def _rows(w: World, n: int = 4) -> list[list[str]]:
    """Listing rows naming already-indexed images (so an accepted listing adds nothing)."""
    return [[str(p), f"item {i}", str(i % 3)] for i, p in enumerate(w.images[:n])]


# 1. bad image files as query, concept, report and evaluation inputs ---------------------------
for name, make in BAD_IMAGES.items():
    refused(f"search_image-{name}", lambda d, w, make=make: ["search", "--image", make(d), "-c", w.coll],
            match=r"bad|bomb|folder|dangling|loop|image")

_CONCEPT_BAD = ["zero_byte.png", "truncated_png_45", "text_as_png", "random_bytes_1.jpg", "decompression_bomb",
                "folder_named_png", "png_signature_then_noise", "truncated_jpg_70"]
for name in _CONCEPT_BAD:
    def concept_with_bad(d, w, make=BAD_IMAGES[name]):
        bad = make(d)
        rows = [[f"tone {i % 3}", str(p)] for i, p in enumerate(w.images[:6])] + [["tone 1", str(bad)]]
        return ["correct", "fit", "--name", f"f_{d.name}", "--concept", _write_csv(d / "c.csv", ["prompt", "image"], rows),
                "--no-reuse", "-c", w.coll, "-q"]
    refused(f"concept_image-{name}", concept_with_bad, match=r"bad|bomb|folder|image")

for name in ["zero_byte.jpg", "truncated_png_20", "html_as_jpg", "decompression_bomb", "symlink_loop"]:
    def pairs_with_bad(d, w, make=BAD_IMAGES[name], command="report"):
        bad = make(d)
        rows = [[str(p), f"item {i}"] for i, p in enumerate(w.images[:4])] + [[str(bad), "a bad one"]]
        pairs = _write_csv(d / "pairs.csv", ["image", "prompt"], rows)
        return [command, "--prompts", pairs, "--out", d / "out", "-q"]
    refused(f"report_image-{name}", pairs_with_bad, match=r"bad|bomb|loop|image")
    refused(f"evaluate_image-{name}", lambda d, w, f=pairs_with_bad: f(d, w, command="evaluate"),
            match=r"bad|bomb|loop|image")


# 2. listings through `sce index add` -----------------------------------------------------------
def add(listing_fn, *extra):
    return lambda d, w: ["index", "add", listing_fn(d, w), "-c", w.coll, "-q", *extra]


def csv_listing(suffix=".csv", delimiter=",", edit=lambda rows: rows, header=("file", "caption", "tone"),
                encoding="utf-8"):
    def make(d, w):
        return _write_csv(d / f"list{suffix}", list(header) if header else None, edit(_rows(w)),
                          encoding=encoding, delimiter=delimiter)
    return make


for position in (0, 2, 3):
    def more(rows, p=position):
        rows[p] = rows[p] + ["surplus", "fields"]
        return rows

    def fewer(rows, p=position):
        rows[p] = rows[p][:1]
        return rows
    refused(f"listing_csv_more_fields-row{position}", add(csv_listing(edit=more)), match=rf"line {position + 2}|row {position + 1}")
    refused(f"listing_csv_fewer_fields-row{position}", add(csv_listing(edit=fewer)), match=rf"line {position + 2}|row {position + 1}")
refused("listing_tsv_more_fields", add(csv_listing(".tsv", "\t", edit=lambda r: [r[0] + ["x"]] + r[1:])), match=r"line 2|row 1")


def raw_listing(name: str, data: bytes):
    def make(d, w):
        (d / name).write_bytes(data.replace(b"IMG", str(w.images[0]).encode()))
        return d / name
    return make


for i, line in enumerate([b'{"file": "IMG", "caption": "x"', b'{"file": "IMG",}', b"{'file': 'IMG'}"]):
    refused(f"listing_jsonl_invalid_json-{i}", add(raw_listing("list.jsonl", b'{"file": "IMG"}\n' + line + b"\n")),
            match=r"list\.jsonl.*2")
for i, line in enumerate([b'["IMG"]', b"42", b'"IMG"', b"null"]):
    refused(f"listing_jsonl_not_an_object-{i}", add(raw_listing("list.ndjson", line + b"\n")), match=r"list\.ndjson.*1")

refused("listing_parquet_zero_byte", add(raw_listing("list.parquet", b"")), match=r"list\.parquet")
refused("listing_parquet_is_csv_text", add(raw_listing("list.parquet", b"file,caption\nIMG,x\n")), match=r"list\.parquet")


def truncated_parquet(fraction):
    def make(d, w):
        path = _write_parquet(d / "list.parquet", {"file": [str(p) for p in w.images[:4]], "caption": ["a"] * 4})
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        return path
    return make


for fraction in (0.3, 0.9):
    refused(f"listing_parquet_truncated-{int(fraction * 100)}", add(truncated_parquet(fraction)), match=r"list\.parquet")

for i, header in enumerate([("name", "caption", "tone"), ("caption",), ("url", "caption", "tone")]):
    refused(f"listing_csv_no_path_column-{i}",
            add(csv_listing(header=header, edit=lambda rows, n=len(header): [r[:n] for r in rows])),
            match=r"column")
refused("listing_jsonl_no_path_column", add(raw_listing("list.jsonl", b'{"caption": "a"}\n{"caption": "b"}\n')),
        match=r"column")
refused("listing_parquet_no_path_column",
        add(lambda d, w: _write_parquet(d / "list.parquet", {"caption": ["a", "b"], "tone": [1, 2]})), match=r"column")

# not UTF-8: the line must name the file and the line
for i, (data, line) in enumerate([
    (b"file,caption\nIMG,caf\xe9\n", 2),
    (b"file,caption\nIMG,ok\nIMG,\xff\xfe bad\n", 3),
    (b"fil\xe9,caption\nIMG,ok\n", 1),
]):
    refused(f"listing_csv_not_utf8-{i}", add(raw_listing("list.csv", data)), match=rf"list\.csv.*{line}")
refused("listing_csv_utf16", add(lambda d, w: _write_csv(d / "list.csv", ["file", "caption"], _rows(w), encoding="utf-16")),
        match=r"list\.csv.*(1|utf)")
refused("listing_jsonl_not_utf8", add(raw_listing("list.jsonl", b'{"file": "IMG", "caption": "caf\xe9"}\n')),
        match=r"list\.jsonl.*1")
refused("listing_tsv_cp1252", add(raw_listing("list.tsv", b"file\tcaption\nIMG\t\x93quoted\x94\n")), match=r"list\.tsv.*2")

# empty listings: say that nothing was listed
EMPTY = r"empty|nothing|no rows|no images|no records"
for name, data in [("zero_byte.csv", b""), ("header_only.csv", b"file,caption\n"), ("blank_lines.csv", b"\n\n\n"),
                   ("zero_byte.jsonl", b""), ("blank_lines.jsonl", b"\n  \n\n")]:
    refused(f"listing_empty-{name}", add(raw_listing(name, data)), match=EMPTY)
refused("listing_empty-zero_rows.parquet",
        add(lambda d, w: _write_parquet(d / "list.parquet", {"file": __import__("pyarrow").array([], "string")})),
        match=EMPTY)
refused("listing_empty-folder", add(lambda d, w: (d / "empty").mkdir() or d / "empty"), match=EMPTY)

# not a listing at all
for name, data in [("list.xlsx", b"PK\x03\x04"), ("list.txt", b"IMG\n"), ("list.json", b'[{"file": "IMG"}]'),
                   ("listing", b"file\nIMG\n"), ("image.png", png_bytes(3))]:
    refused(f"listing_wrong_extension-{name}", add(raw_listing(name, data)), match=re.escape(name))
refused("listing_missing_source", add(lambda d, w: d / "no-such-list.csv"), match=r"no-such-list")
refused("listing_folder_with_image_root",
        lambda d, w: ["index", "add", w.root / "imgs", "--image-root", d, "-c", w.coll, "-q"], match=r"image.root")


# 3. concept files through `sce correct fit` --------------------------------------------------
def fit(concept_fn, *extra):
    return lambda d, w: ["correct", "fit", "--name", f"f_{d.name}", "--concept", concept_fn(d, w), "-c", w.coll, "-q",
                         *extra]


def concept_csv(edit=lambda rows: rows, header=("prompt", "image"), encoding="utf-8"):
    def make(d, w):
        rows = [[f"tone {i % 3}", str(p)] for i, p in enumerate(w.images[:9])]
        return _write_csv(d / "concept.csv", list(header) if header else None, edit(rows), encoding=encoding)
    return make


for position in (0, 4, 8):
    def more(rows, p=position):
        rows[p] = rows[p] + ["surplus"]
        return rows

    def fewer(rows, p=position):
        rows[p] = rows[p][:1]
        return rows
    refused(f"concept_more_fields-row{position}", fit(concept_csv(edit=more)), match=rf"line {position + 2}")
    refused(f"concept_fewer_fields-row{position}", fit(concept_csv(edit=fewer)), match=rf"line {position + 2}")
# ("prompt", "file") and ("text", "image") are valid: the one column convention (indexing.tables)
for i, header in enumerate([("words", "image"), ("prompt", "picture"), ("caption",), ("image", "image")]):
    refused(f"concept_missing_column-{i}", fit(concept_csv(header=header)), match=r"column|prompt")
for i, (data, line) in enumerate([(b"prompt,image\ncaf\xe9,IMG\n", 2), (b"prompt,image\ntone 1,IMG\n\xff,IMG\n", 3),
                                  (b"\xfe\xffprompt,image\n", 1)]):
    refused(f"concept_not_utf8-{i}", fit(raw_listing("concept.csv", data)), match=rf"concept\.csv.*{line}")
refused("concept_utf16", fit(concept_csv(encoding="utf-16")), match=r"concept\.csv")
for name, data in [("zero_byte", b""), ("header_only", b"prompt,image\n"), ("blank_lines", b"\n\n")]:
    refused(f"concept_empty-{name}", fit(raw_listing("concept.csv", data)), match=r"concept|pair|empty|column")
refused("concept_missing_image", fit(concept_csv(edit=lambda r: r + [["tone 2", "nowhere/x.png"]])),
        match=r"line 11.*not found")
refused("concept_outside_path_not_an_image", fit(concept_csv(edit=lambda r: r + [["tone 2", "/etc/passwd"]])),
        match=r"passwd")
refused("concept_path_is_a_folder", fit(concept_csv(edit=lambda r: r + [["tone 2", "/tmp"]])), match=r"line 11|/tmp")
refused("concept_duplicate_rows_one_prompt", fit(concept_csv(edit=lambda r: [r[0]] * 6)), match=r"distinct|prompt")
refused("concept_one_pair", fit(concept_csv(edit=lambda r: r[:1])), match=r"pair")
refused("concept_jsonl_malformed", fit(raw_listing("concept.jsonl", b'{"prompt": "a", "image": "IMG"\n')),
        match=r"concept\.jsonl")
refused("concept_missing_file", fit(lambda d, w: d / "nowhere.csv"), match=r"nowhere")


def t2t(sources: bytes, targets: bytes):
    def argv(d, w):
        (d / "s.txt").write_bytes(sources)
        (d / "t.txt").write_bytes(targets)
        return ["correct", "fit", "--name", f"f_{d.name}", "--direction", "t2t", "--source-texts", d / "s.txt",
                "--target-texts", d / "t.txt", "-c", w.coll, "-q"]
    return argv


refused("t2t_count_mismatch", t2t(b"a\nb\nc\n", b"x\ny\n"), match=r"3.*2|pair")
refused("t2t_empty", t2t(b"", b""), match=r"empty|pair")
refused("t2t_not_utf8", t2t(b"a\n\xffb\n", b"x\ny\n"), match=r"s\.txt.*2")
refused("fit_concept_and_texts", lambda d, w: ["correct", "fit", "--name", "x", "--concept", w.concept,
                                              "--source-texts", w.concept, "-c", w.coll, "-q"], match=r"not both")
refused("fit_no_concept", lambda d, w: ["correct", "fit", "--name", "x", "-c", w.coll, "-q"], match=r"concept")


# 4. numeric options out of range ---------------------------------------------------------------
def fit_opts(*opts):
    return lambda d, w: ["correct", "fit", "--name", f"f_{d.name}", "--concept", w.concept, "-c", w.coll, "-q",
                         *map(str, opts)]


for value in ("1e308", "-1e308", "1e309", "inf", "-inf", "nan"):
    refused(f"fit_strength-{value}", fit_opts("--strength", value), match=r"strength")
# the concept varies in 3 prompts: 2 directions once centred (the image space has 16)
for value in (3, 8, 16, 17, 10**6, 2**63):
    refused(f"fit_components_beyond_concept-{value}", fit_opts("--components", value), match=r"component|direction")
refused("fit_components_zero", fit_opts("--components", 0), match=r"components")
refused("fit_energy_with_components", fit_opts("--energy", 0.5, "--components", 1), match=r"energy.*components|components.*energy")
for value in ("1.5", "-0.1", "nan"):
    refused(f"fit_energy-{value}", fit_opts("--energy", value), match=r"energy")
for value in ("nan", "inf", "-1"):
    refused(f"fit_ridge-{value}", fit_opts("--ridge", value), match=r"ridge")


def search_opts(*opts, query="item 3"):
    return lambda d, w: ["search", query, "-c", w.coll, *map(str, opts)]


# A -k beyond the collection's size is not an error: it is capped at the size (see
# test_k_beyond_the_collection_returns_every_item_once below).
for value in (0, -1, -(10**12)):
    refused(f"search_k-{value}", search_opts("-k", value), match=r"-k|top.k")
for value in (0, -3):
    refused(f"search_nprobe-{value}", search_opts("--nprobe", value), match=r"nprobe")
for value in ("nan", "inf", "-inf"):
    refused(f"search_negative_weight-{value}", search_opts("--correction", "c1", "--strategy", "negative",
                                                            "--negative-weight", value), match=r"weight")
    refused(f"search_ab_negative_weight-{value}", search_opts("--ab", "c1", "--strategy", "negative",
                                                               "--negative-weight", value), match=r"weight")


def reindex_opts(*opts):
    return lambda d, w: ["index", "reindex", "--correction", "c1", "-c", w.coll, "-q", *map(str, opts)]


for option, value in [("--chunk-size", 0), ("--chunk-size", -5), ("--checkpoint-every", 0),
                      ("--checkpoint-every", -1)]:
    refused(f"reindex{option}-{value}", reindex_opts(option, value), match=option)


def add_opts(*opts):
    return lambda d, w: ["index", "add", w.listing, "-c", w.coll, "-q", *map(str, opts)]


for option, value in [("--batch-size", 0), ("--shard-size", 0), ("--workers", -1), ("--max-pixels", 0),
                      ("--batch-size", "nan"), ("--shard-size", "1e3")]:
    refused(f"add{option}-{value}", add_opts(option, value), match=option)
refused("info_failures_negative", lambda d, w: ["index", "info", "-c", w.coll, "--failures", -1], match="--failures")


def report_opts(*opts):
    return lambda d, w: ["report", "-c", w.coll, "--out", d / "out", "-q", *map(str, opts)]


for option, value in [("--limit", 1), ("--limit", 0), ("--modes", 0), ("--top", 0), ("--ridge", -1),
                      ("--ridge", "nan"), ("--sigma", "nan"), ("--sigma", "-1"), ("--sigma", "0"), ("--sigma", "inf")]:
    extra = ("--kernel", "gaussian") if option == "--sigma" else ()
    refused(f"report{option}-{value}", report_opts(option, value, *extra), match=option.lstrip("-"))


# 5. unknown names ------------------------------------------------------------------------------
refused("search_unknown_correction", search_opts("--correction", "nope"), match=r"nope")
refused("search_ab_unknown_correction", search_opts("--ab", "nope"), match=r"nope")
refused("search_ab_and_other_correction", search_opts("--ab", "c1", "--correction", "nope"), match=r"--ab|--correction")
refused("search_unknown_kind", search_opts("--kind", "audio"), match=r"audio")
refused("search_correction_on_other_kind", search_opts("--kind", "caption", "--correction", "c1"), match=r"caption")
refused("search_unknown_strategy", search_opts("--correction", "c1", "--strategy", "magic"), match=r"magic")
refused("search_no_query", lambda d, w: ["search", "-c", w.coll], match=r"query")
refused("search_query_and_image", lambda d, w: ["search", "x", "--image", w.images[0], "-c", w.coll], match=r"one of")
refused("search_missing_image", lambda d, w: ["search", "--image", d / "nope.png", "-c", w.coll], match=r"nope\.png")
refused("reindex_unknown_correction", lambda d, w: ["index", "reindex", "--correction", "nope", "-c", w.coll, "-q"],
        match=r"nope")
refused("reindex_unknown_variant", reindex_opts("--variant", "sideways"), match=r"sideways")
refused("reindex_unknown_factory", reindex_opts("--factory", "Nope99"), match=r"Nope99|factory")
refused("show_unknown_correction", lambda d, w: ["correct", "show", "nope", "-c", w.coll], match=r"nope")
refused("delete_unknown_correction", lambda d, w: ["correct", "delete", "nope", "-c", w.coll], match=r"nope")
refused("fit_existing_name", lambda d, w: ["correct", "fit", "--name", "c1", "--concept", w.concept, "-c", w.coll, "-q"],
        match=r"c1")
for option, value in [("--kernel", "laplace"), ("--mode", "invert"), ("--direction", "i2i")]:
    refused(f"fit_unknown{option}", fit_opts(option, value), match=value)
refused("add_unknown_factory", add_opts("--factory", "Nope99"), match=r"Nope99|factory")
refused("add_other_encoder", add_opts("--encoder", "open_clip:no-such-model-xyz"), match=r"no-such-model-xyz")
for i, spec in enumerate(["clip", "open_clip:", "open_clip:no-such-model-xyz", "default:extra"]):
    refused(f"build_unknown_encoder-{i}", lambda d, w, s=spec: ["index", "build", w.listing, "-c", d / "new",
                                                               "--encoder", s, "-q"], match=r"encoder|spec")
    refused(f"report_unknown_encoder-{i}", lambda d, w, s=spec: [
        "report", "--prompts", _write_csv(d / "p.csv", ["image", "prompt"], [[str(p), f"i {n}"] for n, p in
                                                                              enumerate(w.images[:4])]),
        "--encoder", s, "--out", d / "out", "-q"], match=r"encoder|spec")
refused("evaluate_unknown_encoder", lambda d, w: [
    "evaluate", "--prompts", _write_csv(d / "p.csv", ["image", "prompt"], [[str(p), f"i {n}"] for n, p in
                                                                           enumerate(w.images[:4])]),
    "--encoder", "open_clip:no-such-model-xyz", "--out", d / "out", "-q"], match=r"no-such-model-xyz")
refused("build_unknown_factory", lambda d, w: ["index", "build", w.listing, "-c", d / "new", "--encoder", "toy",
                                               "--factory", "IVF0,Nope", "-q"], match=r"factory|IVF0")
refused("report_unknown_kernel", report_opts("--kernel", "laplace"), match=r"laplace")
refused("build_unknown_db_dialect", lambda d, w: ["index", "build", w.listing, "-c", d / "new", "--encoder", "toy",
                                                  "--db", "nosuchdialect://x", "-q"], match=r"nosuchdialect|catalog")
for command in (["index", "info"], ["search", "x"], ["correct", "list"], ["index", "reindex", "--correction", "c1"],
                ["report"], ["index", "delete", "--id", "1"]):
    refused(f"unknown_collection-{'_'.join(command[:2])}",
            lambda d, w, c=command: [*c, "-c", d / "no-such-collection"], match=r"no-such-collection|no collection")
refused("add_to_unknown_collection", lambda d, w: ["index", "add", w.listing, "-c", d / "no-such-collection", "-q"],
        match=r"no-such-collection|no collection")


# 6. --where that is not key=value --------------------------------------------------------------
for i, clause in enumerate(["tone", "=1", "", "   ", "=", "tone:1"]):
    refused(f"report_where_not_key_value-{i}", report_opts("--where", clause), match=r"--where|key=value")
refused("report_where_mixed", report_opts("--where", "tone=1", "--where", "oops"), match=r"oops")
refused("report_where_matches_nothing", report_opts("--where", "tone=99"), match=r"tone|match|pair|item")


# 7. `sce report` / `sce evaluate` with prompts and images that do not pair up ------------------
def numbered(d: Path, names: list[str]) -> Path:
    folder = d / "gen"
    for i, name in enumerate(names):
        make_image(folder / name, seed=300 + i)
    folder.mkdir(exist_ok=True)
    return folder


def prompts_txt(d: Path, lines: list[str], data: bytes | None = None) -> Path:
    path = d / "prompts.txt"
    path.write_bytes(data if data is not None else "".join(line + "\n" for line in lines).encode())
    return path


MISMATCHES = {
    "more_images_than_prompts": (["a", "b", "c"], ["0.png", "1.png", "2.png", "5.png"], r"5\.png|line 5"),
    "one_based_names": (["a", "b", "c"], ["1.png", "2.png", "3.png"], r"3\.png|line 3"),
    "names_without_numbers": (["a", "b"], ["0.png", "cat.png"], r"cat\.png"),
    "empty_image_folder": (["a", "b"], [], r"0 .*pair|no image|image"),
    "empty_prompts": ([], ["0.png", "1.png"], r"0\.png|prompt"),
    "blank_prompt_line": (["a", "", "c"], ["0.png", "1.png", "2.png"], r"1\.png|line 1"),
    "one_pair": (["a"], ["0.png"], r"pair"),
}
for command in ("report", "evaluate"):
    for name, (lines, files, match) in MISMATCHES.items():
        refused(f"{command}_mismatch-{name}", lambda d, w, c=command, lines=lines, files=files: [
            c, "--prompts", prompts_txt(d, lines), "--images", numbered(d, files), "--out", d / "out", "-q"],
            match=match)
    refused(f"{command}_txt_without_images", lambda d, w, c=command: [
        c, "--prompts", prompts_txt(d, ["a", "b"]), "--out", d / "out", "-q"], match=r"image")
    refused(f"{command}_prompts_not_utf8", lambda d, w, c=command: [
        c, "--prompts", prompts_txt(d, [], b"a\n\xff\xfe\n"), "--images", numbered(d, ["0.png", "1.png"]),
        "--out", d / "out", "-q"], match=r"prompts\.txt.*2")
    refused(f"{command}_csv_missing_image", lambda d, w, c=command: [
        c, "--prompts", _write_csv(d / "p.csv", ["image", "prompt"], [[str(w.images[0]), "a"], ["gone.png", "b"]]),
        "--out", d / "out", "-q"], match=r"gone\.png")
    refused(f"{command}_csv_more_fields", lambda d, w, c=command: [
        c, "--prompts", _write_csv(d / "p.csv", ["image", "prompt"], [[str(w.images[0]), "a", "extra"],
                                                                       [str(w.images[1]), "b"]]),
        "--out", d / "out", "-q"], match=r"p\.csv.*(line|row)")
    refused(f"{command}_missing_prompts_file", lambda d, w, c=command: [
        c, "--prompts", d / "nope.txt", "--images", numbered(d, ["0.png"]), "--out", d / "out", "-q"],
        match=r"nope\.txt")
    refused(f"{command}_missing_image_folder", lambda d, w, c=command: [
        c, "--prompts", prompts_txt(d, ["a", "b"]), "--images", d / "nope", "--out", d / "out", "-q"],
        match=r"nope")
refused("report_images_without_prompts", lambda d, w: [
    "report", "--images", numbered(d, ["0.png", "1.png"]), "-c", w.coll, "--out", d / "out", "-q"],
    match=r"--images|--prompts")
refused("report_prompts_with_limit", lambda d, w: [
    "report", "--prompts", prompts_txt(d, ["a", "b", "c"]), "--images", numbered(d, ["0.png", "1.png", "2.png"]),
    "--limit", 2, "--out", d / "out", "-q"], match=r"limit")
refused("evaluate_missing_reference", lambda d, w: [
    "evaluate", "--prompts", prompts_txt(d, ["a", "b"]), "--images", numbered(d, ["0.png", "1.png"]),
    "--reference", d / "noref", "--out", d / "out", "-q"], match=r"noref")
refused("evaluate_malformed_edits", lambda d, w: [
    "evaluate", "--prompts", prompts_txt(d, ["a", "b"]), "--images", numbered(d, ["0.png", "1.png"]),
    "--edits", _write_csv(d / "edits.csv", ["source_image"], [[str(w.images[0])]]), "--out", d / "out", "-q"],
    match=r"edits")


# -- HANDLED: bad files the indexing pipeline records as rejected -------------------------------
def add_listing_rows(rows_fn):
    def argv(d, w):
        return ["index", "add", _write_csv(d / "list.csv", ["file", "caption"], rows_fn(d, w)), "-c", w.coll, "-q"]
    return argv


handled("missing_files", add_listing_rows(lambda d, w: [["gone_1.png", "a"], [str(d / "gone_2.jpg"), "b"]]),
        match="missing")
handled("absolute_outside_not_images", add_listing_rows(lambda d, w: [["/etc/passwd", "a"], ["/etc/hostname", "b"]]))
handled("dev_null", add_listing_rows(lambda d, w: [["/dev/null", "a"]]))
handled("outside_folder_path", add_listing_rows(lambda d, w: [["/tmp", "a"]]))
handled("dot_dot_traversal", add_listing_rows(lambda d, w: [["../../../../../../etc/passwd", "a"]]))
handled("row_without_path", add_listing_rows(lambda d, w: [["", "no file here"]]))
handled("duplicate_rows_of_known_images", add_listing_rows(lambda d, w: [[str(w.images[1]), "x"]] * 3))
handled("same_content_other_name", add_listing_rows(
    lambda d, w: [[str(d / "copy.png"), "x"]] if (d / "copy.png").write_bytes(w.images[2].read_bytes()) else []))


def bad_folder(names):
    def argv(d, w):
        folder = d / "bad"
        folder.mkdir()
        for name in names:
            BAD_IMAGES[name](folder)
            # each maker writes a fixed name: keep them apart
            for p in folder.iterdir():
                if p.name.startswith(("bad", "bomb")) and not p.name.startswith(name):
                    p.rename(folder / f"{name}{p.suffix}")
        return ["index", "add", folder, "-c", w.coll, "-q"]
    return argv


handled("folder_of_bad_images", bad_folder(["zero_byte.png", "truncated_png_45", "text_as_png", "random_bytes_1.jpg",
                                            "decompression_bomb", "truncated_jpg_70"]))


# -- cases the code does not handle yet: id -> what it does today (a strict xfail) --------------
KNOWN: dict[str, str] = {}
for _case in REFUSED + HANDLED:
    _case.known = _case.known or KNOWN.pop(_case.id, None)
assert not KNOWN, f"known failures of no case: {sorted(KNOWN)}"


# -- the tests --------------------------------------------------------------------------------
def _params(cases: list[Case]):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.known)] if c.known else [])
            for c in cases]


def test_the_corpus_is_large_and_unique():
    ids = [c.id for c in REFUSED + HANDLED]
    assert len(ids) == len(set(ids))
    assert len(REFUSED) >= 100


@pytest.fixture
def case_dir(world: World, request, monkeypatch) -> Path:
    """A fresh folder for the case's inputs (also the working directory); the shared collection
    is put back as it was if the case changed it, so that one bad case cannot spoil the next."""
    d = world.root / "cases" / re.sub(r"[^\w.-]", "_", request.node.name)
    d.mkdir(parents=True)
    monkeypatch.chdir(d)
    yield d
    if (catalog_rows(world.coll) != world.pristine["catalog"]
            or folder_files(world.coll, _not_catalog) != world.pristine["files"]):
        world.restore()


def assert_refused(case: Case, returncode: int, stdout: str, stderr: str, world: World) -> None:
    assert returncode not in (0, None), f"accepted: {stdout}"
    message = error_line(stderr)
    # 1: a user's mistake, 2: typer's usage error; 70 would say the input hit a bug
    assert returncode in (1, 2), f"exit status {returncode}: {message}"
    assert stdout.strip() == "", f"printed before failing: {stdout}"
    if case.match:
        assert re.search(case.match, message, re.I), f"the line does not name the problem: {message}"
    after = snapshot(world.coll)
    changed = sorted(k for k in after if after[k] != world.pristine[k])
    tables = sorted(t for t in after["catalog"] if after["catalog"][t] != world.pristine["catalog"].get(t))
    files = sorted(set(after["files"].items()) ^ set(world.pristine["files"].items()))
    assert not changed, f"the collection changed: {changed}, tables {tables}, files {files}"


@pytest.mark.parametrize("case", _params(REFUSED))
def test_refused_with_one_line_and_nothing_changed(case: Case, world: World, case_dir: Path):
    argv = case.argv(case_dir, world)
    inputs = folder_files(case_dir)
    result = invoke(*argv)
    assert_refused(case, result.exit_code, result.stdout, result.stderr, world)
    assert folder_files(case_dir) == inputs, "files were written next to the inputs"


@pytest.mark.parametrize("case", _params(HANDLED))
def test_rejected_files_are_recorded_and_nothing_else_changes(case: Case, world: World, case_dir: Path):
    argv = case.argv(case_dir, world)
    before = world.pristine
    result = invoke(*argv)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "indexed 0 new images" in result.stdout, result.stdout
    if case.match:
        assert re.search(case.match, result.stdout, re.I), result.stdout
    after = snapshot(world.coll)
    assert after["files"] == before["files"]  # no vector, embedding or index file changed
    assert after["search"] == before["search"]
    changed = {t for t in before["catalog"] if before["catalog"][t] != after["catalog"].get(t)}
    added = {t: set(after["catalog"][t]) - set(before["catalog"][t]) for t in changed}
    assert all(set(before["catalog"][t]) <= set(after["catalog"][t]) for t in changed), "rows were lost or edited"
    assert len(changed) <= 1, f"tables other than the failures changed: {sorted(changed)}"
    rejected = re.search(r"rejected: (.*?)\s+\(", result.stdout)
    count = sum(int(n) for n in re.findall(r"\d+", rejected.group(1))) if rejected else 0
    if "duplicate_rows" in case.id:
        assert count == 0 and not changed
    else:
        assert count >= 1 and sum(map(len, added.values())) == count
    assert_consistent(world.coll)


# -- a few through a real process: stderr is the terminal's, logging included ------------------
def sce_process(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "400"}
    return subprocess.run([sys.executable, str(Path(toy_cli.__file__)), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


SUBPROCESS_CASES = [c for c in REFUSED if c.id in {
    "search_image-truncated_png_45", "concept_more_fields-row4", "listing_csv_not_utf8-0", "search_k--1",
    "report_where_not_key_value-0", "reindex_unknown_correction", "listing_empty-header_only.csv",
    "fit_components_beyond_concept-8", "search_k-0", "report_mismatch-one_based_names",
}]


@pytest.mark.parametrize("case", _params(SUBPROCESS_CASES))
def test_refused_in_a_real_process(case: Case, world: World, case_dir: Path):
    argv = case.argv(case_dir, world)
    completed = sce_process(*argv, cwd=case_dir)
    assert completed.returncode > 0, completed.stdout
    assert "Traceback" not in completed.stdout
    assert_refused(case, completed.returncode, completed.stdout, completed.stderr, world)


def test_an_overflowing_strength_never_reaches_a_published_index(world: World, case_dir: Path):
    """Refused at the fit, or at the re-index: never a published index version holding NaN."""
    fit = invoke("correct", "fit", "--name", "s308", "--concept", world.concept, "--strength", "1e308",
                 "-c", world.coll, "-q")
    if fit.exit_code != 0:
        assert re.search("strength", error_line(fit.stderr), re.I)
        return
    built = invoke("index", "reindex", "--correction", "s308", "--variant", "paired", "-c", world.coll, "-q")
    assert built.exit_code != 0, built.stdout
    assert re.search(r"strength|finite|nan|overflow", error_line(built.stderr), re.I)
    info = invoke("index", "info", "-c", world.coll).stdout
    assert not re.search(r"ready\s+image\s+correction=s308", info), info
    hits = invoke("search", "item 3", "--correction", "s308", "--strategy", "reindexed", "--json", "-c", world.coll)
    assert hits.exit_code != 0 or all(np.isfinite(h["score"]) for h in json.loads(hits.stdout)["hits"])


@pytest.mark.parametrize("opts", [("-k", 10**12), ("-k", 2**63), ("-k", 10**30), ("-k", 10**12, "--correction", "c1"),
                                  ("-k", 10**12, "--ab", "c1")], ids=["1e12", "2^63", "1e30", "corrected", "ab"])
def test_k_beyond_the_collection_returns_every_item_once(opts, world: World, case_dir: Path):
    """Handled correctly rather than refused: -k is capped at the collection's size, with
    no allocation of k rows, and every item appears once (in each column of an A/B)."""
    result = invoke(*search_opts(*opts)(case_dir, world))
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    rows = [line for line in result.stdout.splitlines() if re.match(r"\s*\d+\s", line)]
    assert len(rows) == len(world.images), result.stdout
    assert snapshot(world.coll) == world.pristine
