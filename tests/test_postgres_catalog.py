"""The catalog on PostgreSQL: the same answers as on SQLite, end to end, and its own limits.

The suites of tests/test_catalog.py and tests/test_collection_parts.py run on both backends
(the `catalog_url` fixture); these are the checks that compare the two directly, run the
pipeline, the CLI and a correction re-index on a PostgreSQL catalog, and cover what only
PostgreSQL refuses (NUL characters, over-long URIs) or fails with (an unreachable server).
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import ToyEncoder, make_image, write_csv
from test_pipeline import assert_catalog_matches_index
from test_reindex import _by_id, _vectors
from toy_cli import toy_specs_in_process
from typer.testing import CliRunner

import retrieval.reindex as rx

from indexing.catalog import CatalogError, RejectReason, open_catalog
from indexing.collection import Collection, CollectionNotFoundError, NewItem, Rejection
from indexing.items import metadata_text
from indexing.pipeline import add_to_collection, build_collection
from indexing.readers import file_uri
from indexing.vector_index import unit_rows
from retrieval.concepts import load_concept_set
from retrieval.corrections import fit_concept_correction
from retrieval.reindex import reindex
from sce_correct.errors import InputError
from ui.cli import app

pytestmark = pytest.mark.postgres


@pytest.fixture
def catalog_backend() -> str:
    return "postgres"


# -- the metadata filter gives the same answers on both ---------------------------------------
METADATA = [
    {"tone": "dark", "n": 3, "x": 1.5, "flag": True, "none": None, "empty": ""},
    {"tone": "light", "n": 0, "flag": False},
    {"tone": "Dark", "n": 30, "x": -0.25},
    {},
    {"tone": "ünï", 'q"k': 'say "hi"', "n": -2, "a b": "c, d"},
    {"tone": "a,b", "flag": "true", "n": "3"},
]
#: (filter, the rows it selects), written out by hand: the oracle both backends must meet.
CASES = [
    ({"tone": "dark"}, [0]),
    ({"tone": "Dark"}, [2]),  # case matters
    ({"tone": ""}, [3]),  # a missing key is the empty value
    ({"n": "3"}, [0, 5]),  # the number 3 and the string "3"
    ({"n": "0"}, [1]),
    ({"n": "-2"}, [4]),
    ({"n": "30"}, [2]),
    ({"n": "3.0"}, []),  # numbers as written
    ({"x": "1.5"}, [0]),
    ({"x": "-0.25"}, [2]),
    ({"flag": "true"}, [0, 5]),  # the boolean and the string
    ({"flag": "false"}, [1]),
    ({"flag": "True"}, []),
    ({"flag": ""}, [2, 3, 4]),
    ({"none": ""}, [0, 1, 2, 3, 4, 5]),  # null is the empty value too
    ({"empty": ""}, [0, 1, 2, 3, 4, 5]),
    ({"tone": "ünï"}, [4]),
    ({'q"k': 'say "hi"'}, [4]),
    ({"a b": "c, d"}, [4]),
    ({"tone": "a,b", "flag": "true"}, [5]),  # clauses are ANDed
    ({"tone": "dark", "flag": "false"}, []),
    ({"tone": "nothing"}, []),
    ({"tone": "da\x00rk"}, []),  # a NUL (the web UI's textbox could send one) matches nothing
    ({"to\x00ne": ""}, [0, 1, 2, 3, 4, 5]),  # and no stored key has one
]


def _filtered(tmp_path, db: str) -> list[list[int]]:
    with Collection.open(tmp_path / db.split(":")[0], db=db, create=True) as collection:
        collection.bind_encoder("toy", 2)
        items = [NewItem(f"/img/{n}.png", f"{n:064d}", 1, 1, caption=f"item {n}", metadata=meta)
                 for n, meta in enumerate(METADATA)]
        ids = collection.add_items(items, np.ones((len(items), 2), np.float32))
        row_of = {item_id: row for row, item_id in enumerate(ids)}
        answers = [[row_of[i] for i in collection.item_ids(where).tolist()] for where, _ in CASES]
        # the records filtered in SQL are the same rows as the ids
        assert [r.uri for r in collection.items_store.matching({"flag": "true"})] == ["/img/0.png", "/img/5.png"]
    return answers


def test_metadata_filter_is_the_same_on_sqlite_and_postgresql(tmp_path, catalog_url):
    on_postgres = _filtered(tmp_path, catalog_url)
    on_sqlite = _filtered(tmp_path, f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    for (where, expected), pg, lite in zip(CASES, on_postgres, on_sqlite):
        assert pg == lite == expected, where
        python = [row for row, meta in enumerate(METADATA)
                  if all(metadata_text(meta.get(k)) == v for k, v in where.items())]
        if "\x00" not in "".join(where) + "".join(where.values()):
            assert python == expected, where  # the documented spelling, in Python


# -- what only PostgreSQL refuses ---------------------------------------------------------------
@pytest.mark.parametrize("item, named", [
    (NewItem("/a\x00b.png", "x", 1, 1), r"/a\\0b\.png: its uri holds a NUL"),
    (NewItem("/c.png", "x", 1, 1, caption="a\x00b"), "/c.png: its caption holds a NUL"),
    (NewItem("/d.png", "x", 1, 1, metadata={"k": ["a", "b\x00"]}), "/d.png: its metadata holds a NUL"),
    (NewItem("/e.png", "x", 1, 1, metadata={"k\x00": 1}), "/e.png: its metadata holds a NUL"),
    (NewItem("/" + "f" * 2100, "x", 1, 1), "longer than 2048 characters"),
])
def test_an_item_postgresql_cannot_store_is_an_input_error(tmp_path, catalog_url, item, named):
    with Collection.open(tmp_path / "coll", db=catalog_url, create=True) as collection:
        collection.bind_encoder("toy", 2)
        good = NewItem("/good.png", "g", 1, 1)
        with pytest.raises(InputError, match=named) as caught:
            collection.add_items([good, item], np.ones((2, 2), np.float32))
        assert "\n" not in str(caught.value) and "\x00" not in str(caught.value)
        assert collection.item_ids().tolist() == [] and collection.embeddings.count() == 0
        # the same item without the problem goes in (the check refuses nothing else)
        assert len(collection.add_items([good], np.ones((1, 2), np.float32))) == 1


def test_rejections_postgresql_cannot_store_as_given_are_recorded_escaped(tmp_path, catalog_url):
    long_uri = "/" + "g" * 3000
    with Collection.open(tmp_path / "coll", db=catalog_url, create=True) as collection:
        collection.add_items([], None, [
            Rejection("/a\x00b.png", RejectReason.UNREADABLE, "embedded null byte: a\x00b"),
            Rejection(long_uri + "1", RejectReason.MISSING),
            Rejection(long_uri + "2", RejectReason.MISSING),  # the same 2048 first characters
            Rejection("/plain.png", RejectReason.EMPTY, "0 bytes"),
        ])
        failures = {f.uri: f for f in collection.failures()}
    assert failures["/a\ufffdb.png"].detail == "embedded null byte: a\ufffdb"
    cut = [uri for uri in failures if uri.startswith(long_uri[:100])]
    assert len(cut) == 2 and all(len(uri) <= 2048 for uri in cut)  # both kept, still unique
    assert failures["/plain.png"].detail == "0 bytes"


def test_a_listing_with_a_nul_caption_stops_with_one_line_and_keeps_earlier_shards(tmp_path, catalog_url):
    rows = [{"file": str(make_image(tmp_path / f"{n}.png", seed=n)), "caption": f"item {n}"} for n in range(5)]
    rows[3]["caption"] = "bad\x00caption"
    listing = write_csv(tmp_path / "list.csv", rows)
    with pytest.raises(InputError, match=r"3\.png: its caption holds a NUL"):
        build_collection(listing, tmp_path / "coll", db=catalog_url, encoder=ToyEncoder(), progress=False,
                         batch_size=1, shard_size=2)
    with Collection.open(tmp_path / "coll", db=catalog_url) as collection:
        assert len(collection.item_ids()) == 2  # the first shard committed; the bad one did not


def test_a_refused_first_build_removes_its_folder_and_frees_the_catalog_lock(tmp_path, catalog_url):
    empty = tmp_path / "empty.csv"
    empty.write_text("file,caption\n")
    with pytest.raises(InputError, match="nothing listed"):
        build_collection(empty, tmp_path / "new" / "coll", db=catalog_url, encoder=ToyEncoder(), progress=False)
    assert not (tmp_path / "new").exists()
    make_image(tmp_path / "imgs" / "a.png", seed=1)
    report = build_collection(tmp_path / "imgs", tmp_path / "coll", db=catalog_url, encoder=ToyEncoder(),
                              progress=False)
    assert report.added == 1  # the catalog's writer lock was released with the folder


# -- an unreachable server or database is one CatalogError ----------------------------------
def test_an_unreachable_postgresql_catalog_is_one_catalog_error(tmp_path, postgres_server):
    missing_database = postgres_server.url("no_such_database")
    no_server = f"postgresql+psycopg://sce@/x?host={tmp_path}&port=5432"
    for url in (missing_database, no_server):
        with pytest.raises(CatalogError) as caught:
            open_catalog(url)
        message = str(caught.value)
        assert "\n" not in message and "[SQL" not in message and "cannot open the catalog" in message
        if url == missing_database:
            assert "no_such_database" in message
        result = CliRunner().invoke(app, ["index", "info", "-c", str(tmp_path / "coll"), "--db", url])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "Traceback" not in result.output and "internal error" not in result.output


def test_messages_never_show_the_catalogs_password(tmp_path, catalog_url, postgres_server):
    with_password = catalog_url.replace("sce@", "sce:s3cret@")  # the test server trusts, so ignores it
    with pytest.raises(CollectionNotFoundError) as caught:  # an empty database: no collection yet
        Collection.open(tmp_path / "coll", db=with_password)
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
    with pytest.raises(CatalogError) as caught:
        open_catalog(with_password.replace(postgres_server.databases[-1], "no_such_database"))
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)
    with Collection.open(tmp_path / "coll", db=with_password, create=True) as collection:
        assert "s3cret" not in collection.info().catalog_url


# -- the pipeline, the CLI and a correction on a PostgreSQL catalog -------------------------------
def test_build_add_delete_on_postgresql(tmp_path, image_folder, catalog_url):
    encoder = ToyEncoder()
    report = build_collection(image_folder, tmp_path / "coll", db=catalog_url, encoder=encoder,
                              progress=False, batch_size=5, shard_size=4)
    assert report.added == 12 and not report.rejected
    more = tmp_path / "more"
    make_image(more / "new.png", seed=500)
    make_image(more / "copy.png", seed=3)  # the bytes of an indexed file
    (more / "empty.png").write_bytes(b"")
    report = add_to_collection(more, tmp_path / "coll", db=catalog_url, encoder=encoder, progress=False)
    assert report.added == 1 and report.rejected == {"duplicate": 1, "empty": 1}
    with Collection.open(tmp_path / "coll", db=catalog_url) as collection:
        assert_catalog_matches_index(collection, encoder)
        duplicate = collection.failures(reason="duplicate")[0]
        assert collection.items([duplicate.duplicate_of])[duplicate.duplicate_of].uri.endswith("img_03.png")
        with collection.new_index_version(correction="negated") as writer:
            for ids, raw in collection.embeddings.iter_chunks("image", chunk_size=5):
                writer.add(ids, -raw)
        result = collection.delete(ids=[1, 999], uris=[file_uri(more / "new.png")])
        assert len(result.deleted) == 2 and result.not_found == [999]
        assert_catalog_matches_index(collection, encoder)
        _, negated = collection.open_index(correction="negated")
        assert np.array_equal(np.sort(negated.ids()), collection.item_ids())
        query = collection.embeddings.get("image", [5])
        assert collection.search(query, k=1)[0][0].item_id == 5


def test_the_cli_on_a_postgresql_catalog(tmp_path, image_folder, catalog_url):
    runner, coll = CliRunner(), str(tmp_path / "coll")
    with toy_specs_in_process():
        build = runner.invoke(app, ["index", "build", str(image_folder), "-c", coll, "--db", catalog_url,
                                    "--encoder", "toy", "-q"])
        assert build.exit_code == 0, build.output
        info = runner.invoke(app, ["index", "info", "-c", coll, "--db", catalog_url])
        assert info.exit_code == 0 and "items       12" in info.output and "postgresql" in info.output
        search = runner.invoke(app, ["search", "a query", "-k", "3", "-c", coll, "--db", catalog_url])
        assert search.exit_code == 0, search.output
        lines = search.output.strip().splitlines()
        assert len(lines) == 4
    assert not (tmp_path / "coll" / "catalog.sqlite").exists()
    with Collection.open(coll, db=catalog_url) as collection:
        ids = collection.item_ids()
        stored = collection.embeddings.get("image", ids)
    scores = unit_rows(ToyEncoder().encode_texts(["a query"])) @ unit_rows(stored).T
    assert [int(line.split()[2]) for line in lines[1:]] == ids[np.argsort(-scores[0])[:3]].tolist()


def test_a_correction_fit_and_reindex_on_postgresql(tmp_path, catalog_url):
    """The re-index reads the catalog from worker threads; the correction registry is SQL too."""
    encoder = ToyEncoder()
    for i in range(12):
        make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=100 + i)
    concept = tmp_path / "concept.csv"
    concept.write_text("prompt,image\n" + "".join(f"tone {i % 3},imgs/{i:03d}.png\n" for i in range(12)))
    with Collection.open(tmp_path / "coll", db=catalog_url, create=True) as collection:
        collection.bind_encoder(encoder.name, encoder.dim)
        rng = np.random.default_rng(0)
        collection.add_items([NewItem(uri=f"x/{i}", sha256=f"{i:064x}", width=4, height=4, caption=f"c {i}")
                              for i in range(50)], rng.standard_normal((50, encoder.dim)).astype(np.float32))
        collection.sync_index()
        fit_concept_correction(collection, encoder, load_concept_set(concept), name="c1", n_components=2)
        version = reindex(collection, "c1", chunk_size=4, checkpoint_every=4, progress=False)
        assert version.count == 50
        ids, vectors = _vectors(collection, version.name)
        P = rx.load_correction(collection, "c1").corrector.projection(n_components=2)
        raw = collection.embeddings.get("image", np.sort(ids))
        expected = (raw / np.linalg.norm(raw, axis=1, keepdims=True)) @ P.T
        np.testing.assert_allclose(_by_id(ids, vectors), expected, atol=1e-5)
        assert [c.name for c in collection.corrections.list()] == ["c1"]
