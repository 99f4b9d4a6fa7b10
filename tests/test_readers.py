"""One table reader, one column convention, one image check, one suffix list: each class of bad
input through the function on a real small file, and through the CLI (one line, no traceback)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
from conftest import ToyEncoder, make_image, make_png_header_only
from PIL import Image
from typer.testing import CliRunner

import indexing
from indexing.collection import Collection
from indexing.images import IMAGE_SUFFIXES, ImageCheckError, check_image
from indexing.pipeline import build_collection
from indexing.readers import file_uri, list_image_files, read_source
from indexing.tables import read_table, read_text_lines
from retrieval.concepts import load_concept_set
from retrieval.evaluate import read_edit_pairs
from retrieval.pairs import load_pairs
from sce_correct.errors import InputError, NotFoundError
from ui.app_uploads import stage_pairs
from ui.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def toy_specs(monkeypatch):
    """Make `load_encoder` resolve any spec to the toy encoder."""
    monkeypatch.setattr(indexing, "load_encoder", lambda spec, device=None: ToyEncoder(), raising=False)


def one_error_line(*args) -> str:
    """Run the CLI; it must fail with exactly one line and no traceback. Returns the line."""
    result = runner.invoke(app, [str(arg) for arg in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    return lines[0]


def images(folder: Path, count: int, start: int = 0, names=None) -> list[Path]:
    names = names or [f"{i}.png" for i in range(start, start + count)]
    return [make_image(folder / name, seed=zlib.crc32(str(folder / name).encode())) for name in names]


def nothing_written(collection: Path) -> None:
    """A refused listing leaves no items, no failures and no encoder bound."""
    if not (collection / "catalog.sqlite").exists():
        return
    with Collection.open(collection) as opened:
        assert opened.encoder_name is None and not len(opened.item_ids()) and not opened.failures()


# -- encoding ----------------------------------------------------------------------------------
def latin1_csv(path: Path, header: str = "file,caption") -> Path:
    """A CSV whose second line (the first row) is Latin-1, not UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = header.count(",")
    path.write_bytes((f"{header}\nb.png,caf\xe9" + ",x" * (fields - 1) + "\na.png,plain\n").encode("latin-1"))
    return path


@pytest.mark.parametrize("read, header", [
    (lambda p: list(read_source(p)), "file,caption"),
    (load_concept_set, "prompt,image"),
    (load_pairs, "image,prompt"),
    (read_edit_pairs, "source_image,source_caption,edited_image,edited_caption"),
], ids=["listing", "concept", "pairs", "edits"])
def test_a_table_that_is_not_utf8_names_the_file_line_and_byte(tmp_path, read, header):
    path = latin1_csv(tmp_path / "list.csv", header)
    with pytest.raises(InputError, match=r"list\.csv, line 2: not UTF-8 \(byte 0xe9 at column 10\)"):
        read(path)


def test_jsonl_and_text_files_that_are_not_utf8(tmp_path):
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_bytes(b'{"file": "a.png"}\n\n{"file": "\xff.png"}\n')
    with pytest.raises(InputError, match=r"list\.jsonl, line 3: not UTF-8"):
        list(read_source(jsonl))
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a cat\n\x80 dog\n")
    with pytest.raises(InputError, match=r"prompts\.txt, line 2: not UTF-8"):
        read_text_lines(prompts)
    images(tmp_path / "gen", 2)
    with pytest.raises(InputError, match=r"prompts\.txt, line 2: not UTF-8"):
        load_pairs(prompts, tmp_path / "gen")


def test_a_bom_is_not_part_of_the_first_column(tmp_path):
    make_image(tmp_path / "a.png", seed=1)
    path = tmp_path / "list.csv"
    path.write_bytes("\ufefffile,caption\na.png,x\n".encode("utf-8"))
    (record,) = read_source(path)
    assert record.uri == file_uri(tmp_path / "a.png") and record.caption == "x"


def test_cli_build_of_a_listing_that_is_not_utf8_is_one_line_and_writes_nothing(tmp_path, toy_specs):
    path = latin1_csv(tmp_path / "list.csv")
    line = one_error_line("index", "build", path, "-c", tmp_path / "coll", "--quiet")
    assert re.search(r"list\.csv, line 2: not UTF-8", line)
    nothing_written(tmp_path / "coll")


# -- malformed rows --------------------------------------------------------------------------------
@pytest.mark.parametrize("row, problem", [("a.png,x,extra", "3 fields, more than the 2 columns"),
                                          ("a.png", "1 fields, fewer than the 2 columns")])
def test_rows_with_more_or_fewer_fields_than_the_header(tmp_path, row, problem):
    listing = tmp_path / "list.csv"
    listing.write_text(f"file,caption\nb.png,fine\n\n{row}\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"list\.csv, line 4: {problem} of the header \(file, caption\)"):
        list(read_source(listing))
    concept = tmp_path / "concept.csv"
    concept.write_text(f"image,prompt\nb.png,fine\n{row}\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"concept\.csv, line 3: {problem}"):
        load_concept_set(concept)


def test_line_numbers_count_physical_lines_across_quoted_newlines(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text('file,caption\na.png,"two\nlines"\nb.png,x,y\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"list\.csv, line 4: 3 fields"):
        list(read_source(listing))


@pytest.mark.parametrize("end", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_every_line_ending_counts_lines_the_same(tmp_path, end):
    listing = tmp_path / "list.csv"
    listing.write_bytes(end.join(["file,caption", 'a.png,"x, y"', "b.png,z", "c.png", ""]).encode())
    with pytest.raises(InputError, match=r"list\.csv, line 4: 1 fields"):
        list(read_source(listing))
    listing.write_bytes(end.join(["file,caption", 'a.png,"x, y"', "b.png,z", ""]).encode())
    assert [r.caption for r in read_source(listing)] == ["x, y", "z"]


def test_a_header_that_names_a_column_twice(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("file,caption,File\na.png,x,y\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"list\.csv, line 1: the header names the column 'File' twice"):
        list(read_source(listing))


def test_jsonl_lines_that_are_not_objects_and_broken_parquet(tmp_path):
    bad = tmp_path / "list.jsonl"
    bad.write_text('{"file": "a.png"}\n{"file": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"list\.jsonl, line 2: not valid JSON"):
        list(read_source(bad))
    parquet = tmp_path / "list.parquet"
    parquet.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputError, match=r"list\.parquet is not a readable parquet file"):
        list(read_source(parquet))


def test_cli_concept_file_with_a_malformed_row_is_one_line(tmp_path):
    images(tmp_path, 5)
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"p{i},{i}.png\n" for i in range(4)) + "p4,4.png,oops\n")
    line = one_error_line("correct", "fit", "--name", "x", "--concept", concept, "-c", tmp_path / "coll", "-q")
    assert re.search(r"concept\.csv, line 6: 3 fields, more than the 2 columns", line)


# -- empty listings --------------------------------------------------------------------------------
def test_empty_listings_say_nothing_was_listed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    empty = tmp_path / "empty"
    empty.mkdir()
    others = tmp_path / "others"
    others.mkdir()
    (others / "notes.txt").write_text("x")
    header = tmp_path / "header.csv"
    header.write_text("file,caption\n\n")
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text("\n  \n")
    parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"file": pa.array([], pa.string())}), parquet)
    cases = {empty: "no image files .*the folder is empty", others: "no image files .*1 other file",
             header: "a header line and no rows", jsonl: "no JSON lines", parquet: "no rows"}
    for source, detail in cases.items():
        with pytest.raises(InputError, match=rf"{re.escape(str(source))}: nothing listed: .*{detail}"):
            list(read_source(source))
    zero = tmp_path / "zero.csv"
    zero.write_bytes(b"")
    with pytest.raises(InputError, match="zero.csv is empty: a CSV file needs a header line"):
        list(read_source(zero))


def test_an_empty_list_of_records_is_refused_before_binding(tmp_path, toy_encoder):
    with pytest.raises(InputError, match="nothing listed"):
        build_collection([], tmp_path / "coll", encoder=toy_encoder, progress=False)
    nothing_written(tmp_path / "coll")


def test_cli_build_of_an_empty_listing_is_one_line_and_writes_nothing(tmp_path, toy_specs):
    listing = tmp_path / "list.csv"
    listing.write_text("file,caption\n")
    line = one_error_line("index", "build", listing, "-c", tmp_path / "coll", "--quiet")
    assert "list.csv: nothing listed: it has a header line and no rows" in line
    nothing_written(tmp_path / "coll")


# -- folders that cannot be read -------------------------------------------------------------------
def _deny_scandir(monkeypatch, denied: Path) -> None:
    """os.walk lists folders with os.scandir: make it fail on ``denied`` as chmod 000 would for a
    non-root user (tests run as root, where chmod does not stop reads)."""
    real = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == denied:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "photos"
    images(root, 2)
    images(root / "locked", 2, start=2)
    images(root / "open", 1, start=4)
    return root, root / "locked"


def test_an_unreadable_subfolder_is_recorded_as_a_failure(tmp_path, toy_encoder, monkeypatch):
    root, locked = _tree(tmp_path)
    _deny_scandir(monkeypatch, locked)
    records = list(read_source(root))
    assert [r.error for r in records].count(None) == 3
    (bad,) = [r for r in records if r.error]
    assert bad.uri == file_uri(locked) and "Permission denied" in bad.error
    report = build_collection(root, tmp_path / "coll", encoder=toy_encoder, progress=False)
    assert report.added == 3 and report.rejected == {"unreadable": 1}
    with Collection.open(tmp_path / "coll") as opened:
        (failure,) = opened.failures()
    assert failure.uri == file_uri(locked) and failure.reason == "unreadable"
    assert failure.detail == "folder cannot be read: Permission denied"
    with pytest.raises(InputError, match=r"reference folder .*locked cannot be read: Permission denied"):
        list_image_files(root, what="reference folder")
    _deny_scandir(monkeypatch, root)
    with pytest.raises(InputError, match=r"cannot read the folder .*photos: Permission denied"):
        list(read_source(root))


def _as_if_not_root(command: list[str]) -> list[str]:
    """Run ``command`` so that file permissions apply: as root, without the capabilities that
    let root read any folder (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), via util-linux setpriv."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: chmod 000 cannot stop root's reads here")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_chmod_000_subfolder_is_recorded_as_a_failure(tmp_path):
    root, locked = _tree(tmp_path)
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from conftest import ToyEncoder
        from indexing.collection import Collection
        from indexing.pipeline import build_collection
        report = build_collection({str(root)!r}, {str(tmp_path / "coll")!r}, encoder=ToyEncoder(), progress=False)
        with Collection.open({str(tmp_path / "coll")!r}) as opened:
            print(json.dumps([report.added, [[f.uri, f.reason, f.detail] for f in opened.failures()]]))
    """)
    locked.chmod(0)
    try:
        done = subprocess.run(_as_if_not_root([sys.executable, "-c", script]), capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    finally:
        locked.chmod(0o755)
    assert done.returncode == 0, done.stderr
    added, failures = json.loads(done.stdout.splitlines()[-1])
    assert added == 3 and failures == [[file_uri(locked), "unreadable", "folder cannot be read: Permission denied"]]


def test_cli_build_reports_the_unreadable_folder(tmp_path, toy_specs, monkeypatch):
    root, locked = _tree(tmp_path)
    _deny_scandir(monkeypatch, locked)
    result = runner.invoke(app, ["index", "build", str(root), "-c", str(tmp_path / "coll"), "--quiet"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "indexed 3 new images" in result.output and "unreadable 1" in result.output


# -- one image check, one suffix list -------------------------------------------------------------
def test_one_suffix_list_for_folders_pairs_and_references(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    names = ["0.PNG", "1.jfif", "2.ppm", "3.tiff", "4.webp"]
    formats = {".jfif": "JPEG", ".ppm": "PPM", ".png": "PNG", ".tiff": "TIFF", ".webp": "WEBP"}
    for i, name in enumerate(names):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(folder / name, format=formats[Path(name).suffix.lower()])
    (folder / "5.txt").write_text("not an image")
    (folder / "6.svg").write_text("<svg/>")
    assert all(Path(n).suffix.lower() in IMAGE_SUFFIXES for n in names)
    listed = sorted(Path(r.uri).name for r in read_source(folder))
    assert listed == sorted(names) == sorted(p.name for p in list_image_files(folder))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(len(names))))
    assert sorted(p.name for p in load_pairs(prompts, folder).images) == sorted(names)
    for path in folder.iterdir():
        if path.suffix != ".txt" and path.suffix != ".svg":
            assert check_image(path) == path


def test_no_other_module_keeps_its_own_suffix_or_format_list():
    offenders = []
    for path in [*REPO.glob("indexing/**/*.py"), *REPO.glob("retrieval/**/*.py"), *REPO.glob("ui/**/*.py")]:
        if path.name == "images.py" and path.parent.name == "indexing":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"""["']\.(webp|tiff?|jpe?g)["']""", text) or re.search(r"""["']WEBP["']""", text):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_one_image_check_for_the_pipeline_and_uploads(tmp_path, toy_specs):
    folder = tmp_path / "bad"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "icon.png", format="ICO")
    make_png_header_only(folder / "bomb.png", 30000, 30000)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    make_image(folder / "good.png", seed=1)
    result = runner.invoke(app, ["index", "build", str(folder), "-c", str(tmp_path / "coll"), "--quiet"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "rejected: decompression_bomb 1, empty 1, not_an_image 2" in result.output
    with Collection.open(tmp_path / "coll") as opened:
        recorded = {Path(f.uri).name: f.reason for f in opened.failures()}
    assert recorded == {"icon.png": "not_an_image", "bomb.png": "decompression_bomb", "empty.png": "empty",
                        "text.png": "not_an_image"}
    for name, reason in recorded.items():
        with pytest.raises(ImageCheckError) as raised:
            check_image(folder / name)
        assert raised.value.reason == reason and str(raised.value).startswith(name)
    with pytest.raises(ImageCheckError, match=r"^icon\.png is not an image: not data of an accepted format "
                                              r"\(BMP, GIF, JPEG, PNG, PPM, TIFF, WEBP\)"):
        check_image(folder / "icon.png")


# -- one column convention --------------------------------------------------------------------------
def test_one_column_convention_for_listings_concepts_pairs_and_uploads(tmp_path):
    images(tmp_path / "imgs", 4)
    rows = [{"Image": f"imgs/{i}.png", "file": "ignored.png", "prompt": f"tone {i}", "shade": i} for i in range(4)]
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = list(read_source(jsonl))
    assert [Path(r.uri).name for r in records] == ["0.png", "1.png", "2.png", "3.png"]
    assert records[1].caption == "tone 1" and records[1].metadata == {"file": "ignored.png", "shade": 1}
    concept = load_concept_set(jsonl)
    assert concept.prompts == [f"tone {i}" for i in range(4)] and concept.images[2].name == "2.png"
    pairs = load_pairs(jsonl)
    assert pairs.prompts == concept.prompts and [p.name for p in pairs.images] == [p.name for p in concept.images]
    # An upload has every column that could name an image rewritten to the staged copies, so
    # whichever one a reader picks, it reads only uploaded files.
    uploads = [*sorted((tmp_path / "imgs").iterdir()), make_image(tmp_path / "ignored.png", seed=9)]
    staged, _ = stage_pairs(jsonl, uploads, tmp_path / "staged")
    first = json.loads(staged.read_text().splitlines()[0])
    assert first["Image"] == "images/0.png" and first["file"] == "images/ignored.png"
    assert load_pairs(staged).images[0] == tmp_path / "staged" / "images" / "0.png"
    secret = make_image(tmp_path / "secret.png", seed=10)
    sneaky = tmp_path / "sneaky.jsonl"
    sneaky.write_text(json.dumps({"file": "imgs/0.png", "prompt": "a"}) + "\n"
                      + json.dumps({"image": "", "file": str(secret), "prompt": "b"}) + "\n")
    with pytest.raises(InputError, match=r"sneaky\.jsonl, line 2: image '.*secret\.png' is not among the uploaded"):
        stage_pairs(sneaky, uploads, tmp_path / "staged2")


def test_uploaded_tables_name_the_upload_and_its_line(tmp_path):
    uploads = images(tmp_path / "up", 2)
    latin = latin1_csv(tmp_path / "tmp-x9" / "mine.csv", "image,prompt")
    with pytest.raises(InputError, match=r"^mine\.csv, line 2: not UTF-8"):
        stage_pairs(latin, uploads, tmp_path / "s1")
    short = tmp_path / "tmp-x9" / "short.csv"
    short.write_text("image,prompt\n0.png\n")
    with pytest.raises(InputError, match=r"^short\.csv, line 2: 1 fields, fewer"):
        stage_pairs(short, uploads, tmp_path / "s2")


def test_reading_a_table_that_does_not_exist_or_has_another_suffix(tmp_path):
    with pytest.raises(NotFoundError, match="nope.csv does not exist"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="cannot read .*x.xlsx"):
        read_table(tmp_path / "x.xlsx")


# -- pairing: by number (counted from 0) or by order -----------------------------------------------
def test_pair_by_number_counts_lines_from_0_and_says_so(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\nsecond\n\nfourth\n")
    images(tmp_path / "gen", 0, names=["0.png", "1_a.png", "3.png"])
    pairs = load_pairs(prompts, tmp_path / "gen")
    assert pairs.prompts == ["first", "second", "fourth"] and "counted from 0" in pairs.pairing
    make_image(tmp_path / "gen" / "2.png", seed=1)
    with pytest.raises(InputError, match=r"prompt line 2 \(counted from 0\), but that line \(.*prompts\.txt, "
                                         r"line 3 as an editor counts\) is blank"):
        load_pairs(prompts, tmp_path / "gen")
    (tmp_path / "gen" / "2.png").unlink()
    make_image(tmp_path / "gen" / "4.png", seed=2)
    with pytest.raises(InputError, match=r"prompt line 4 \(counted from 0\), but .*has 4 line\(s\), 0 to 3"):
        load_pairs(prompts, tmp_path / "gen")


def test_pair_by_order_pairs_lines_with_files_sorted_by_name(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n\n")
    generated = images(tmp_path / "gen", 0, names=["z.png", "10.png", "2.png"])
    pairs = load_pairs(prompts, tmp_path / "gen", pair_by="order")
    assert [p.name for p in pairs.images] == ["10.png", "2.png", "z.png"] and pairs.prompts == ["a", "b", "c"]
    generated[0].unlink()
    with pytest.raises(InputError, match=r"has 3 prompt line\(s\) and .*gen 2 image\(s\)"):
        load_pairs(prompts, tmp_path / "gen", pair_by="order")
    prompts.write_text("a\n\nc\n")
    make_image(tmp_path / "gen" / "z.png", seed=3)
    with pytest.raises(InputError, match=r"prompts\.txt, line 2: blank, but with --pair-by order"):
        load_pairs(prompts, tmp_path / "gen", pair_by="order")
    table = tmp_path / "t.csv"
    table.write_text("image,prompt\ngen/2.png,x\ngen/z.png,y\n")
    with pytest.raises(InputError, match="--pair-by order applies to a plain prompts file"):
        load_pairs(table, pair_by="order")
    with pytest.raises(InputError, match="--pair-by takes number or order, not 'name'"):
        load_pairs(prompts, tmp_path / "gen", pair_by="name")


def test_cli_evaluate_and_report_pair_by_order(tmp_path, toy_specs):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i % 2}\n" for i in range(6)))
    images(tmp_path / "gen", 0, names=[f"img{i}.png" for i in range(6)])
    line = one_error_line("evaluate", "--prompts", prompts, "--images", tmp_path / "gen", "-q")
    assert "do not start with a prompt line number" in line and "--pair-by order" in line
    result = runner.invoke(app, ["evaluate", "--prompts", str(prompts), "--images", str(tmp_path / "gen"),
                                 "--pair-by", "order", "--out", str(tmp_path / "ev"), "-q"])
    assert result.exit_code == 0, result.output
    assert "6 pairs in order: line 1 of prompts.txt with the first image of gen sorted by name" in result.output
    result = runner.invoke(app, ["report", "--prompts", str(prompts), "--images", str(tmp_path / "gen"),
                                 "--pair-by", "order", "--out", str(tmp_path / "rep"), "-q"])
    assert result.exit_code == 0 and "6 pairs in order" in result.output, result.output
    (tmp_path / "gen" / "img5.png").unlink()
    line = one_error_line("report", "--prompts", prompts, "--images", tmp_path / "gen", "--pair-by", "order", "-q")
    assert "has 6 prompt line(s) and" in line and "5 image(s)" in line


# -- generated bad listings through the CLI: one line each, the collection unchanged --------------
def _bad_listings(folder: Path) -> list[tuple[str, bytes, str]]:
    """(file name, content, what the one line must say) for seeded variations of each defect."""
    import random

    rng = random.Random(12)
    cases = []
    for n in range(3):
        good = [f"ok{i}.png,caption {i}" for i in range(rng.randint(1, 4))]
        bad_line = len(good) + 2
        cases += [
            (f"latin{n}.csv", ("file,caption\n" + "".join(g + "\n" for g in good)).encode() + b"x.png,caf\xe9\n",
             rf"latin{n}\.csv, line {bad_line}: not UTF-8"),
            (f"extra{n}.csv", ("file,caption\n" + "".join(g + "\n" for g in good) + "x.png,a,b\n").encode(),
             rf"extra{n}\.csv, line {bad_line}: 3 fields, more than the 2 columns"),
            (f"short{n}.tsv", ("file\tcaption\n" + "".join(g.replace(",", "\t") + "\n" for g in good)
                               + "x.png\n").encode(), rf"short{n}\.tsv, line {bad_line}: 1 fields, fewer"),
            (f"quote{n}.csv", ("file,caption\n" + "".join(g + "\n" for g in good)).encode() + b'x.png,"a"b"\n',
             rf"quote{n}\.csv, line {bad_line}: not a readable CSV row"),
            (f"json{n}.jsonl", "".join(json.dumps({"file": g.split(",")[0]}) + "\n" for g in good).encode()
             + b'{"file": "x.png",}\n', rf"json{n}\.jsonl, line {bad_line - 1}: not valid JSON"),
            (f"array{n}.jsonl", "".join(json.dumps({"file": g.split(",")[0]}) + "\n" for g in good).encode()
             + rng.choice([b"[1]\n", b"3\n", b'"x.png"\n', b"null\n"]),
             rf"array{n}\.jsonl, line {bad_line - 1}: expected a JSON object per line"),
            (f"nopath{n}.jsonl", "".join(json.dumps({"file": g.split(",")[0]}) + "\n" for g in good).encode()
             + b'{"caption": "no file"}\n', rf"nopath{n}\.jsonl, line {bad_line - 1}: no image path column"),
        ]
    cases += [
        ("open.csv", b'file,caption\na.png,"never closed\nb.png,x\nc.png,y\n',
         r"open\.csv, line 2: not a readable CSV row \(unexpected end of data\)"),
        ("dup.csv", b"file,caption,FILE\na.png,x,y\n", r"dup\.csv, line 1: the header names the column 'FILE' twice"),
        ("huge.csv", b"file,caption\na.png," + b"x" * 200_000 + b"\n", r"huge\.csv, line 2: not a readable CSV row"),
        ("zero.csv", b"", r"zero\.csv is empty: a CSV file needs a header line"),
        ("header.csv", b"file,caption\n\n\n", r"header\.csv: nothing listed: it has a header line and no rows"),
        ("blank.jsonl", b"\n \n", r"blank\.jsonl: nothing listed: it has no JSON lines"),
        ("nocol.csv", b"name,caption\na,b\n", r"nocol\.csv: no image path column; expected one of image, file"),
        ("broken.parquet", b"PAR1\x00\x01garbage", r"broken\.parquet is not a readable parquet file"),
        ("list.xlsx", b"PK\x03\x04", r"cannot read .*list\.xlsx: expected a folder or a file ending in"),
    ]
    return cases


def test_generated_bad_listings_are_one_line_and_change_nothing(tmp_path, toy_specs):
    images(tmp_path / "photos", 3)
    collection = tmp_path / "coll"
    result = runner.invoke(app, ["index", "build", str(tmp_path / "photos"), "-c", str(collection), "--quiet"])
    assert result.exit_code == 0, result.output

    def state():
        with Collection.open(collection) as opened:
            return (opened.item_ids().tolist(), [f.uri for f in opened.failures()],
                    [(v.name, v.state) for v in opened.versions(include_retired=True)])

    before = state()
    cases = _bad_listings(tmp_path)
    assert len(cases) >= 25
    lists = tmp_path / "lists"
    lists.mkdir()
    for name, content, expected in cases:
        path = lists / name
        path.write_bytes(content)
        line = one_error_line("index", "add", path, "-c", collection, "--quiet")
        assert re.search(expected, line), (name, line)
        assert state() == before, name
