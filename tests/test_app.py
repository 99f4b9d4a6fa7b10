"""The web UI end to end: launch it on a free port and drive each tab's API endpoint with gradio_client."""
from __future__ import annotations

import csv
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ToyEncoder, make_image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from indexing.collection import Collection  # noqa: E402
from indexing.correction_store import CorrectionNotFoundError, list_corrections, save_correction  # noqa: E402
from indexing.pipeline import build_collection  # noqa: E402
from retrieval.concepts import load_concept_set  # noqa: E402
from retrieval.corrections import fit_concept_correction  # noqa: E402
from retrieval.search import Retriever  # noqa: E402
from sce_correct import SchurCorrector  # noqa: E402
from sce_correct.errors import ConflictError, InputError, NotFoundError  # noqa: E402

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:gradio\..*")

N_ITEMS = 40
SEARCH_DEFAULTS = {"correction": "c1", "strategy": "query", "weight": 1.0, "k": 8, "kind": "image", "attribute": "tone"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A 40-image collection with corrections c1 (usable), other-encoder and captions-only, served."""
    from ui.app import build_app, close_app, launch_app

    root = tmp_path_factory.mktemp("app")
    encoder = ToyEncoder()
    rows = []
    for i in range(N_ITEMS):
        make_image(root / "imgs" / f"{i:03d}.png", seed=i)
        rows.append([f"imgs/{i:03d}.png", f"item {i}", "dark" if i % 2 else ""])
    write_csv(root / "list.csv", ["file", "caption", "tone"], rows)
    build_collection(root / "list.csv", root / "coll", encoder=encoder, progress=False)
    concepts = root / "concepts"
    concepts.mkdir()
    write_csv(concepts / "tone.csv", ["prompt", "image"],
              [[f"tone {i % 3}", f"../imgs/{i:03d}.png"] for i in range(12)])
    with Collection.open(root / "coll") as coll:
        concept = load_concept_set(concepts / "tone.csv")
        fit_concept_correction(coll, encoder, concept, name="c1", n_components=2)
        fit_concept_correction(coll, encoder, concept, name="captions-only", direction="i2t", n_components=2)
        rng = np.random.default_rng(0)
        foreign = SchurCorrector().fit(rng.standard_normal((12, 16)), rng.standard_normal((12, 16)))
        save_correction(coll, "other-encoder", foreign, encoder="another-encoder-16", dim=16,
                        parameters={"mode": "nullify", "n_components": 2})
    app = build_app(root / "coll", encoder=encoder, concepts_dir=concepts)
    url = launch_app(app, host="127.0.0.1", port=free_port(), max_upload_mb=0.5, block=False, quiet=True)
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(root / "downloads"))
    yield {"root": root, "app": app, "url": url, "client": client, "encoder": encoder}
    close_app(app)


def search(site, text="", image=None, **options):
    o = {**SEARCH_DEFAULTS, **options}
    return site["client"].predict(text, image, o["correction"], o["strategy"], o["weight"], o["k"], o["kind"],
                                  o["attribute"], api_name="/search")


def gallery_ids(gallery) -> list[int]:
    return [int(re.search(r"\bid (\d+)\b", item["caption"]).group(1)) for item in gallery]


#: Users' mistakes that layers below the UI still raise as a plain ValueError, outside the
#: sce_correct.errors hierarchy: the page shows their message but calls it a bug until they
#: derive from SceError (ui/app_uploads.py, indexing/correction_store.py, retrieval/report.py,
#: retrieval/search.py, retrieval/pairs.py).
def expect_error(call, pattern: str, *, bug: bool = False) -> str:
    with pytest.raises(AppError) as caught:
        call()
    message = str(caught.value)
    assert re.search(pattern, message), message
    assert "Traceback" not in message and 'File "' not in message
    if bug:
        assert "This is a bug" in message, message
    else:
        assert "This is a bug" not in message, message  # a user's mistake is not called a bug
    return message


class BrokenRetriever:
    """Stands in for the app's retriever: every query raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def embed_text(self, text):
        raise self.error


@pytest.mark.parametrize("error, shown", [
    (InputError("k must be at most 1000"), "k must be at most 1000"),
    (NotFoundError("no correction named 'x'"), "no correction named 'x'"),
    (CorrectionNotFoundError("no correction named 'x'"), "no correction named 'x'"),
    (ConflictError("another process is writing to the collection"), "another process is writing to the collection"),
    (PermissionError(13, "Permission denied", "/data/a.png"), "[Errno 13] Permission denied: '/data/a.png'"),
    (FileNotFoundError(2, "No such file or directory", "/data/b.png"), "[Errno 2] No such file or directory"),
    (InputError("a message\non two lines <b>"), "a message on two lines &lt;b&gt;"),
])
def test_users_errors_are_their_one_line_message(error, shown, caplog):
    from ui.app_errors import user_errors

    def action():
        raise error

    with caplog.at_level("INFO", logger="ui.app_errors"), pytest.raises(gr.Error) as caught:
        user_errors(action)()
    assert caught.value.message.startswith(shown) and "\n" not in caught.value.message
    assert "bug" not in caught.value.message
    assert not any(record.exc_info for record in caplog.records)  # a user's mistake: no traceback in the log


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), KeyError("item_id"),
                                   ValueError("array must not contain infs or NaNs"), RuntimeError()])
def test_anything_else_is_reported_as_a_bug(error, caplog):
    from ui.app_errors import user_errors

    def action():
        raise error

    with caplog.at_level("ERROR", logger="ui.app_errors"), pytest.raises(gr.Error) as caught:
        user_errors(action)()
    message = caught.value.message
    assert message.startswith(f"Unexpected error ({type(error).__name__}")
    assert message.endswith("This is a bug; the server log has the traceback.") and "\n" not in message
    assert "Traceback" not in message
    # The server log has the traceback.
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.exc_info is not None and record.exc_info[1] is error


def test_the_page_shows_a_bug_and_an_os_error_in_one_line(site, monkeypatch, caplog):
    state = site["app"].sce_state
    monkeypatch.setattr(state, "_retriever", BrokenRetriever(RuntimeError("the index vanished")))
    with caplog.at_level("ERROR", logger="ui.app_errors"):
        message = expect_error(lambda: search(site, "item 3"), r"^Unexpected error \(RuntimeError: the index "
                               r"vanished\)\. This is a bug; the server log has the traceback\.$", bug=True)
    assert any(r.exc_info and "the index vanished" in str(r.exc_info[1]) for r in caplog.records)
    monkeypatch.setattr(state, "_retriever", BrokenRetriever(PermissionError(13, "Permission denied", "/x.npy")))
    message = expect_error(lambda: search(site, "item 3"), r"^\[Errno 13\] Permission denied: '/x.npy'$")
    assert "bug" not in message


def test_named_endpoints(site):
    from ui.app import ENDPOINTS

    endpoints = set(site["client"].view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {f"/{name}" for name in ENDPOINTS} <= endpoints


def test_only_listed_images_are_served(site):
    """The server shows the images the catalog or a concept set lists, and no other file of their folders."""
    import httpx

    root = site["root"]
    base = site["url"].rstrip("/") + "/gradio_api/file="
    # In the listed images' folder, but listed nowhere: an image and a text file.
    unlisted_png = make_image(root / "imgs" / "unlisted.png", seed=999)
    unlisted_txt = root / "imgs" / "notes.txt"
    unlisted_txt.write_text("not listed")
    # A listed image reaches the page: it is fetched from the URL the server gives for it.
    links = Client(site["url"], verbose=False, analytics_enabled=False, download_files=False)
    _, original, _, _ = links.predict("item 3", None, "", "auto", 1.0, 3, "image", "", api_name="/search")
    listed = {item["image"]["url"]: root / "imgs" / f"{gallery_ids([item])[0] - 1:03d}.png" for item in original}
    assert len(listed) == 3
    for url, source in listed.items():
        response = httpx.get(url)
        assert response.status_code == 200 and response.content == source.read_bytes()
    _, _, pairs = links.predict("tone.csv", None, [], api_name="/concept_report")
    response = httpx.get(pairs[0]["image"]["url"])
    assert response.status_code == 200 and response.content == (root / "imgs" / "000.png").read_bytes()
    # Nothing is served from the folders themselves: not the unlisted files, not the listed ones by
    # their own path, not the collection's catalog, not the rest of the disk.
    for path in (unlisted_png, unlisted_txt, root / "imgs" / "003.png", root / "concepts" / "tone.csv",
                 root / "coll" / "catalog.sqlite", Path("/etc/passwd")):
        assert httpx.get(base + str(path)).status_code == 403, path
    assert site["app"].allowed_paths == []


def test_a_missing_image_is_left_out_with_a_warning(site, caplog):
    import gradio.utils

    state, root = site["app"].sce_state, site["root"]
    missing = root / "imgs" / "gone.png"
    with caplog.at_level("WARNING"), pytest.warns(UserWarning, match="1 image\\(s\\) are missing"):
        shown = state.gallery([(str(root / "imgs" / "001.png"), "one"), (str(missing), "gone")])
    ((cached, caption),) = shown
    assert caption == "one" and Path(cached).read_bytes() == (root / "imgs" / "001.png").read_bytes()
    assert Path(cached).is_relative_to(gradio.utils.get_upload_folder())  # served from gradio's cache
    assert any(str(missing) in record.getMessage() for record in caplog.records)


def test_search_lists_match_the_retriever(site):
    summary, original, corrected, moves = search(site, "item 3", k=8)
    with Collection.open(site["root"] / "coll") as coll:
        retriever = Retriever(coll, site["encoder"])
        query = retriever.embed_text("item 3")
        expected_original = [h.item_id for h in retriever.search(query, 8).hits]
        expected_corrected = [h.item_id for h in retriever.search(query, 8, correction="c1", strategy="query").hits]
    assert gallery_ids(original) == expected_original
    assert gallery_ids(corrected) == expected_corrected
    overlap = len(set(expected_original) & set(expected_corrected)) / 8
    assert f"overlap@8: {overlap:.0%}" in summary and "query-side projection" in summary
    assert "hits with `tone` set" in summary
    # The table lists every item of either list with both ranks and the movement.
    table = {int(row[0]): row for row in moves["data"]}
    assert set(table) == set(expected_original) | set(expected_corrected)
    for item_id, row in table.items():
        was = expected_original.index(item_id) + 1 if item_id in expected_original else None
        now = expected_corrected.index(item_id) + 1 if item_id in expected_corrected else None
        assert row[2] == ("" if was is None else str(was)) and row[3] == ("" if now is None else str(now))
        if was and now:
            assert row[4] == ("same rank" if was == now else f"up {was - now}" if was > now else f"down {now - was}")
    # The negative-query baseline moves the query, not the index.
    _, _, negative, _ = search(site, "item 3", strategy="negative", weight=2.0)
    with Collection.open(site["root"] / "coll") as coll:
        retriever = Retriever(coll, site["encoder"])
        expected = retriever.search(retriever.embed_text("item 3"), 8, correction="c1", strategy="negative",
                                    negative_weight=2.0)
    assert gallery_ids(negative) == [h.item_id for h in expected.hits]


def test_image_query_finds_the_image_itself(site):
    image = site["root"] / "imgs" / "007.png"
    summary, original, corrected, _ = search(site, "", handle_file(str(image)), correction="")
    assert gallery_ids(original)[0] == 8  # ids start at 1: 007.png is item 8
    assert corrected == [] and "Choose a correction" in summary


def test_bad_searches_are_messages(site):
    expect_error(lambda: search(site, "   "), "type a text query or upload an image")
    image = handle_file(str(site["root"] / "imgs" / "001.png"))
    expect_error(lambda: search(site, "item", image), "not both")
    text_file = site["root"] / "notes.txt"
    text_file.write_text("not an image")
    expect_error(lambda: search(site, "", handle_file(str(text_file))), "Invalid file type")
    fake_png = site["root"] / "fake.png"
    fake_png.write_bytes(b"this is no png")
    expect_error(lambda: search(site, "", handle_file(str(fake_png))), "fake.png is not an image")
    big = site["root"] / "big.png"
    make_image(big, seed=5, size=(600, 600))  # ~1 MB of noise, above the 0.5 MB limit
    assert big.stat().st_size > 0.5 * 1024 * 1024
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        search(site, "", handle_file(str(big)))
    import httpx  # the server refuses it too, whatever the client does

    with big.open("rb") as handle:
        response = httpx.post(site["url"].rstrip("/") + "/gradio_api/upload", files={"files": handle})
    assert response.status_code == 413
    expect_error(lambda: search(site, "item", correction="nope"), "no correction named 'nope'.*known corrections: c1")
    expect_error(lambda: search(site, "item", k=0), "less than minimum value 1")


def test_mismatched_corrections_are_refused(site):
    expect_error(lambda: search(site, "item 3", correction="other-encoder"),
                 "fitted with encoder 'another-encoder-16'.*'toy-projection-16'")
    expect_error(lambda: search(site, "item 3", correction="captions-only"),
                 "applies to the caption index, not the image index")
    expect_error(lambda: site["client"].predict("other-encoder", api_name="/reindex"),
                 "cannot be used with this collection: fitted with encoder")


def test_concept_report_of_a_shipped_set(site):
    report, plot, pairs = site["client"].predict("tone.csv", None, [], api_name="/concept_report")
    assert "SCE report of the preliminary set tone (12 pairs)" in report
    assert "| SCE score: image diversity E(S) |" in report
    assert Path(plot).is_file() and Path(plot).suffix == ".png"
    assert [item["caption"] for item in pairs] == [f"tone {i % 3}" for i in range(12)]


def test_fit_from_upload_then_reindex(site):
    client, root = site["client"], site["root"]
    upload = root / "upload"
    upload.mkdir()
    images = [make_image(upload / f"u{i}.png", seed=200 + i) for i in range(8)]
    # Paths in the uploaded CSV are ignored but for the file name: the server uses the uploads.
    table = write_csv(upload / "shade.csv", ["prompt", "image"],
                      [[f"shade {i % 2}", f"/somewhere/else/u{i}.png"] for i in range(8)])
    status, rows, *_ = client.predict(
        "upload", handle_file(str(table)), [handle_file(str(p)) for p in images], "no-shade", "t2i", "cosine",
        "nullify", "components", 1, 0.95, 1.0, False, api_name="/fit_correction")
    assert "Stored correction **no-shade**" in status and "image index" in status and "SCE report" in status
    with Collection.open(root / "coll") as coll:
        stored = {c.name: c for c in list_corrections(coll)}
    assert stored["no-shade"].parameters["n_components"] == 1 and stored["no-shade"].report["n"] == 8
    assert "no-shade" in [row[0] for row in rows["data"]]
    # Same name again without "replace": refused, nothing changes.
    expect_error(lambda: client.predict(
        "upload", handle_file(str(table)), [handle_file(str(p)) for p in images], "no-shade", "t2i", "cosine",
        "nullify", "components", 1, 0.95, 1.0, False, api_name="/fit_correction"), "already exists")
    # A table naming an image that was not uploaded is refused with its line.
    expect_error(lambda: client.predict(
        "upload", handle_file(str(table)), [handle_file(str(p)) for p in images[:7]], "no-shade-2", "t2i",
        "cosine", "nullify", "energy", 1, 0.95, 1.0, False, api_name="/fit_correction"),
        r"shade.csv, line 9: image '/somewhere/else/u7.png' is not among the uploaded images")

    status, table_after, _, header = client.predict("no-shade", api_name="/reindex")
    assert "corrected by **no-shade**" in status and f"{N_ITEMS} image vectors" in status
    assert "image corrected by `no-shade`" in header
    row = next(r for r in table_after["data"] if r[0] == "no-shade")
    assert row[7].startswith("image-no-shade-")
    summary, _, corrected, _ = search(site, "item 5", correction="no-shade", strategy="auto")
    assert "re-indexed version" in summary
    with Collection.open(root / "coll") as coll:
        retriever = Retriever(coll, site["encoder"])
        expected = retriever.search(retriever.embed_text("item 5"), 8, correction="no-shade", strategy="query")
    assert gallery_ids(corrected) == [h.item_id for h in expected.hits]


def test_fit_with_a_shipped_set_and_bad_parameters(site):
    client = site["client"]
    status, *_ = client.predict("tone.csv", None, [], "tone-energy", "t2i", "cosine", "nullify", "energy", 2, 0.9,
                                1.0, False, api_name="/fit_correction")
    assert "Stored correction **tone-energy**" in status and "centred" in status  # the default
    status, *_ = client.predict("tone.csv", None, [], "tone-uncentred", "t2i", "cosine", "nullify", "energy", 2,
                                0.9, 1.0, False, False, api_name="/fit_correction")
    assert "uncentred" in status
    with Collection.open(site["root"] / "coll") as coll:
        stored = {c.name: c for c in list_corrections(coll)}
    assert stored["tone-energy"].parameters["center"] is True
    assert stored["tone-uncentred"].parameters["center"] is False
    expect_error(lambda: client.predict("tone.csv", None, [], "bad name!", "t2i", "cosine", "nullify", "energy", 2,
                                        0.9, 1.0, False, api_name="/fit_correction"), "invalid correction name")
    expect_error(lambda: client.predict("missing.csv", None, [], "x", "t2i", "cosine", "nullify", "energy", 2,
                                        0.9, 1.0, False, api_name="/fit_correction"), "no concept set 'missing.csv'")
    expect_error(lambda: client.predict("upload", None, [], "x", "t2i", "cosine", "nullify", "energy", 2,
                                        0.9, 1.0, False, api_name="/fit_correction"), "upload a concept CSV")


def test_clusters_show_original_and_schur_modes(site):
    out = site["client"].predict("collection", "tone=dark", 100, None, None, [], 5, api_name="/clusters")
    summary, plot, galleries = out[0], out[1], out[2:]
    assert "20 pairs" in summary and Path(plot).is_file()
    # Each gallery comes as an update: its label names the mode, its value holds the top images.
    original, schur = galleries[:6], galleries[6:]
    assert [len(g["value"]) for g in original + schur] == [5] * 12
    assert re.match(r"original mode 1: eigenvalue [0-9.]+, [0-9.]+% of the variety", original[0]["label"])
    assert schur[0]["label"].startswith("schur mode 1: eigenvalue")
    dark = {f"item {i}" for i in range(1, N_ITEMS, 2)}
    assert {item["caption"].split(" | ")[0] for g in original + schur for item in g["value"]} <= dark
    assert all(g["columns"] == 5 for g in galleries)
    # A shipped concept set is named by its file, not by the server's folder.
    summary = site["client"].predict("concept", "", 100, "tone.csv", None, [], 3, api_name="/clusters")[0]
    assert "**12 pairs** (concept set tone.csv)" in summary and str(site["root"]) not in summary
    expect_error(lambda: site["client"].predict("collection", "tone", 100, None, None, [], 5, api_name="/clusters"),
                 "key=value")
    expect_error(lambda: site["client"].predict("collection", "tone=nobody", 100, None, None, [], 5,
                                                api_name="/clusters"), "0 captioned item")


def test_report_for_uploaded_prompts_and_catalog_selection(site):
    client, root = site["client"], site["root"]
    folder = root / "report-upload"
    folder.mkdir()
    images = [make_image(folder / f"{i}_0.png", seed=300 + i) for i in range(6)]
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(6)))
    score, spectra, modes, report_json = client.predict(
        "upload", "", 100, None, handle_file(str(prompts)), [handle_file(str(p)) for p in images],
        api_name="/report")
    assert "SCE report: uploaded prompts.txt" in score and "6 pairs" in score
    assert Path(spectra).is_file() and Path(modes).is_file()
    import json

    data = json.loads(Path(report_json).read_text())
    assert data["score"]["n"] == 6 and len(data["original_modes"]) >= 1
    score, *_ = client.predict("collection", "tone=dark", 10, None, None, [], api_name="/report")
    assert "10 pairs" in score
    expect_error(lambda: client.predict("upload", "", 100, None, None, [], api_name="/report"),
                 "upload a prompts file")


def test_evaluate_uploaded_outputs_matches_the_metrics(site):
    from retrieval.metrics import clip_score

    client, root, encoder = site["client"], site["root"], site["encoder"]
    folder = root / "evaluate-upload"
    images = [make_image(folder / f"gen{i}.png", seed=400 + i) for i in range(6)]
    references = [make_image(folder / "ref" / f"gen{i}.png", seed=500 + i) for i in range(4)]
    prompts = [f"a photo of thing {i % 3}" for i in range(6)]
    # Paths in the table are ignored but for the file name: the server uses the uploads.
    table = write_csv(folder / "outputs.csv", ["image", "prompt"],
                      [[f"/elsewhere/gen{i}.png", prompts[i]] for i in range(6)])
    rows, notes, files = client.predict(handle_file(str(table)), [handle_file(str(p)) for p in images], [],
                                        api_name="/evaluate")
    values = {row[0]: row[1] for row in rows["data"]}
    assert rows["headers"] == ["metric", "value"]
    expected = clip_score(encoder.encode_images(images), encoder.encode_texts(prompts))
    assert values["CLIPScore (w=2.5, mean)"] == f"{expected.mean:.4f}"
    assert values["images / distinct prompts"] == "6 / 3"
    assert {"SCE score E(S)", "Vendi", "RKE"} <= set(values)
    assert not any(name.startswith(("Frechet", "KID", "CMMD")) for name in values)
    assert "6 pairs" in notes and "No reference images uploaded" in notes
    assert sorted(Path(f).name for f in files) == ["evaluation.html", "evaluation.json"]
    import json

    html_file = next(Path(f) for f in files if f.endswith(".html"))
    json_file = next(Path(f) for f in files if f.endswith(".json"))
    assert "CLIPScore" in html_file.read_text()
    assert json.loads(json_file.read_text())["clip_score"]["mean"] == pytest.approx(expected.mean, abs=1e-6)
    # With reference images: the reference metrics join the table.
    rows, notes, _ = client.predict(handle_file(str(table)), [handle_file(str(p)) for p in images],
                                    [handle_file(str(p)) for p in references], api_name="/evaluate")
    values = {row[0]: row[1] for row in rows["data"]}
    assert "Frechet distance vs reference (4)" in values and "CMMD" in values
    assert float(values["CMMD"]) >= 0 and values["KID (mean +- std)"]
    assert "PSNR / SSIM (4 pairs)" in values
    assert "No reference images uploaded" not in notes


def test_bad_evaluation_uploads_are_messages(site):
    client, root = site["client"], site["root"]
    folder = root / "evaluate-bad"
    images = [make_image(folder / f"g{i}.png", seed=600 + i) for i in range(3)]
    table = write_csv(folder / "outputs.csv", ["image", "prompt"], [[f"g{i}.png", f"prompt {i}"] for i in range(3)])
    uploads = [handle_file(str(p)) for p in images]
    expect_error(lambda: client.predict(None, uploads, [], api_name="/evaluate"), "upload a prompts file")
    expect_error(lambda: client.predict(handle_file(str(table)), [], [], api_name="/evaluate"),
                 "upload the generated images")
    # A table naming an image that was not uploaded: its line, and no server path.
    message = expect_error(lambda: client.predict(handle_file(str(table)), uploads[:2], [], api_name="/evaluate"),
                           r"outputs.csv, line 4: image 'g2.png' is not among the uploaded images")
    assert "sce-ui-" not in message
    # Text prompts whose images do not start with a line number.
    prompts = folder / "prompts.txt"
    prompts.write_text("first\nsecond\n")
    message = expect_error(lambda: client.predict(handle_file(str(prompts)), uploads, [], api_name="/evaluate"),
                           r"3 image\(s\) in the uploaded images do not start with a prompt line number")
    assert "sce-ui-" not in message
    # Too few pairs, too few reference images, a non-image reference.
    single = write_csv(folder / "single.csv", ["image", "prompt"], [["g0.png", "prompt 0"]])
    expect_error(lambda: client.predict(handle_file(str(single)), uploads[:1], [], api_name="/evaluate"),
                 r"single.csv: 1 prompt/image pair\(s\) found, at least 2 needed")
    expect_error(lambda: client.predict(handle_file(str(table)), uploads, uploads[:1], api_name="/evaluate"),
                 r"1 reference image\(s\) uploaded; a reference set needs at least 2")
    fake = folder / "fake.png"
    fake.write_bytes(b"no png here")
    expect_error(lambda: client.predict(handle_file(str(table)), uploads, [uploads[0], handle_file(str(fake))],
                                        api_name="/evaluate"), "fake.png is not an image")


def test_ui_modules_do_not_import_gradio_at_cli_start():
    import subprocess

    code = "import sys, ui.app, ui.cli; print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "False"


def test_serve_command_options_and_a_missing_collection(tmp_path):
    import typer
    from typer.testing import CliRunner

    from ui.app import serve_command

    cli = typer.Typer()
    cli.command("serve")(serve_command)
    runner = CliRunner()
    shown = runner.invoke(cli, ["--help"])
    assert shown.exit_code == 0
    for option in ("--collection", "--db", "--host", "--port", "--max-upload-mb", "--concepts"):
        assert option in shown.output
    missing = runner.invoke(cli, ["--collection", str(tmp_path / "nowhere"), "--port", str(free_port())])
    assert missing.exit_code == 1
    try:
        output = missing.output + missing.stderr
    except ValueError:  # older Click mixes stderr into output
        output = missing.output
    assert "no collection at" in output and "Traceback" not in output


def test_default_attribute_follows_the_concept_file_name(site):
    """tone.csv -> "tone"; tone_large.csv -> "tone" too (longest prefix that is a field)."""
    from ui.app_state import AppState
    from ui.tab_search import SearchActions

    concepts = site["root"] / "concepts"
    (concepts / "tone_large.csv").write_text((concepts / "tone.csv").read_text())
    state = AppState(site["root"] / "coll", encoder=site["encoder"], concepts_dir=concepts)
    try:
        fit_concept_correction(state.collection, site["encoder"], load_concept_set(concepts / "tone_large.csv"),
                               name="c-large", n_components=2)
        search = SearchActions(state)
        assert search.default_attribute("c1") == "tone"
        assert search.default_attribute("c-large") == "tone"
        assert search.default_attribute("captions-only") == "tone"
        assert search.default_attribute("other-encoder") == ""  # fitted on no file
    finally:
        state.close()
