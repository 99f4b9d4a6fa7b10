"""`sce index import`: a collection from embeddings computed elsewhere, in clip-retrieval's layout.

Nothing is re-encoded: the vectors of ``img_emb/`` become the items' stored image embeddings,
those of ``text_emb/`` (when present) their caption embeddings, and ``metadata/`` the catalog
rows (``image_path`` is the item's URI, ``caption`` its caption; ``sha256``, ``width`` and
``height`` fill the item's own fields when they hold valid values, as img2dataset and
``sce index export`` write them; ``id``, the exporting collection's item id, is dropped, since
the catalog gives its own; every other column is metadata). The encoder is recorded by its
spec and never loaded: a spec this installation cannot load (another tool's model name) is
recorded as given, and the collection is then searched by vector (``sce search --vector``).

All or nothing: the folder is checked first (:func:`indexing.embedding_layout.read_layout`),
then every row is written in one catalog transaction through the storage core
(:mod:`indexing.items`, :mod:`indexing.embedding_store`); a failure rolls it back and the
embedding files it wrote are removed, so the collection stays as it was (a new collection's
encoder is recorded in that same transaction). A re-run skips the image paths already in the
catalog. The index versions are then synced from the stored embeddings
(:meth:`Collection.sync_index`), as after a build.

Memory: the vectors are memory-mapped and copied ``chunk_rows`` rows at a time, the metadata
read per file in batches of as many rows, and which paths the catalog holds already is asked
per chunk (not held as a set of every URI). ``benchmarks/bench_import.py`` measures the peak.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from tqdm.auto import tqdm

from indexing.catalog import EmbeddingKind, Item, in_chunks
from indexing.collection import Collection, IndexVersionInfo, NewItem
from indexing.embedding_layout import CAPTION_COLUMN, PATH_COLUMN, LayoutShard, read_layout, release_pages
from indexing.readers import metadata_value
from indexing.vector_index import VectorIndex
from sce_correct.errors import InputError, MissingDependencyError

logger = logging.getLogger(__name__)

#: Columns that fill an item's own fields when valid (else they stay metadata).
ITEM_COLUMNS = ("sha256", "width", "height")
#: The exporting collection's item id: not metadata here (the catalog gives its own ids).
ID_COLUMN = "id"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_CHUNK_ROWS = 8192


@dataclass
class ImportReport:
    """What an import did."""

    source: str
    encoder: str
    dim: int
    shards: int = 0
    rows: int = 0
    already_known: int = 0
    repeated_paths: int = 0
    added: int = 0
    captions_added: int = 0
    seconds: float = 0.0
    index_version: IndexVersionInfo | None = None
    caption_index_version: IndexVersionInfo | None = None


def recorded_encoder(spec: str) -> tuple[str, int | None]:
    """The name to record for ``spec`` and the dimension its encoder makes (None: unknown here).

    Constructing an encoder loads no weights (:func:`indexing.load_encoder`); its name is what
    searches later check against. A spec this installation cannot parse (another tool's
    model name, say clip-retrieval's ``ViT-B/32``) is recorded as written; a malformed spec
    of its own grammar (an unknown open_clip model, a missing checkpoint) is refused.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("--encoder: give the spec of the encoder that made the embeddings "
                         "(e.g. 'default' or 'open_clip:ViT-B-32:laion2b_s34b_b79k')")
    spec = spec.strip()
    import indexing
    from indexing.encoders.factory import parse_spec

    try:
        parsed = parse_spec(spec)
    except InputError:
        parsed = None
    try:
        encoder = indexing.load_encoder(spec)
    except MissingDependencyError as error:
        logger.warning("encoder %r cannot be loaded here (%s): recorded as written", spec, error)
        return spec, None
    except InputError:
        if parsed is not None:
            raise
        logger.warning("encoder %r is not one this installation can load: recorded as written; text and "
                       "image queries will not work here, searches by vector will", spec)
        return spec, None
    lazy_dim = parsed is not None and parsed.kind == "open_clip" and str(parsed.model).startswith(
        ("hf-hub:", "local-dir:"))  # known only once the model is built: not checked
    return encoder.name, None if lazy_dim else int(encoder.dim)


def import_embeddings(
    collection: Collection,
    emb_dir: Path,
    *,
    encoder_spec: str,
    progress: bool = True,
    factory: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    build_index: bool = True,
) -> ImportReport:
    """Import the embedding folder ``emb_dir`` into ``collection`` (see the module docstring).

    ``factory``: the faiss index factory of a new index (default: the current one's, or Flat).
    ``build_index=False`` leaves the index versions to a later :meth:`Collection.sync_index`.
    Raises :class:`InputError` (one line naming the file) for a folder that is not a valid
    layout, and :class:`~indexing.collection.EncoderMismatchError` for a collection bound to
    another encoder or dimension; the collection is then unchanged.
    """
    started = time.perf_counter()
    if int(chunk_rows) < 1:
        raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
    emb_dir = Path(emb_dir)
    layout = read_layout(emb_dir)
    if not layout.has_image:
        raise InputError(f"{emb_dir}: no img_emb/ shards (text_emb/ alone cannot make image items)")
    name, encoder_dim = recorded_encoder(encoder_spec)
    if encoder_dim is not None and encoder_dim != layout.dim:
        raise InputError(f"{emb_dir}: the vectors have dimension {layout.dim}, but encoder {encoder_spec!r} "
                         f"makes {encoder_dim}-d embeddings")
    report = ImportReport(source=str(emb_dir), encoder=name, dim=layout.dim, shards=len(layout.shards),
                          rows=layout.rows)
    with collection.writing():
        collection.check_encoder(name, layout.dim)
        if factory is not None:
            VectorIndex.create(layout.dim, factory)  # a bad factory fails before anything is written
        collection.embeddings.remove_unreferenced_files()
        catalog = collection.catalog
        with catalog.session() as session:  # items above this id are this import's
            last_id = int(session.scalar(select(func.max(Item.id))) or 0)
        bar = tqdm(total=layout.rows, unit="row", desc="importing", disable=not progress)
        try:
            with bar, catalog.sessions.begin() as session:
                if collection.encoder_name is None:  # recorded with the rows: a failed import records nothing
                    catalog.set_info(session, "encoder", name)
                    catalog.set_info(session, "dim", str(layout.dim))
                for shard in layout.shards:
                    _import_shard(collection, session, shard, name, last_id, report, int(chunk_rows), bar)
        except BaseException:
            collection.embeddings.remove_unreferenced_files()  # the shards of the rolled-back rows
            raise
        logger.info("%s: %d rows, %d already in the catalog, %d added (%d with caption embeddings)",
                    emb_dir, report.rows, report.already_known, report.added, report.captions_added)
        if build_index:
            report.index_version = collection.sync_index(EmbeddingKind.IMAGE, factory)
            if collection.embeddings.count(EmbeddingKind.CAPTION):
                report.caption_index_version = collection.sync_index(EmbeddingKind.CAPTION, factory)
    report.seconds = time.perf_counter() - started
    return report


def _import_shard(collection: Collection, session: Any, shard: LayoutShard, encoder: str, last_id: int,
                  report: ImportReport, chunk_rows: int, bar: Any) -> None:
    """Write one shard's new rows (items, image and caption embeddings) inside ``session``.

    Which paths are in the catalog already is asked of the catalog per chunk, inside the
    import's transaction (so it sees the rows this import wrote: a path listed twice is taken
    once), rather than held as a set of every URI: memory stays a chunk's worth. Items with
    ids above ``last_id`` are this import's."""
    images = shard.vectors("image")
    texts = shard.vectors("text") if shard.text is not None else None
    image_dtype = _stored_dtype(images)
    text_dtype = _stored_dtype(texts) if texts is not None else None
    start = 0
    for columns in shard.metadata_batches(chunk_rows):
        count = len(columns[PATH_COLUMN])
        chunk = [_new_item(shard, start + offset, {key: values[offset] for key, values in columns.items()})
                 for offset in range(count)]
        present = _present(session, [item.uri for item in chunk])
        rows, items = [], []
        for offset, item in enumerate(chunk):
            held = present.get(item.uri)
            if held is not None:
                if held > last_id:
                    report.repeated_paths += 1
                else:
                    report.already_known += 1
                continue
            present[item.uri] = last_id + 1  # taken now: a repeat later in this chunk is one
            rows.append(start + offset)
            items.append(item)
        if items:
            positions = np.asarray(rows, dtype=np.int64)
            ids = np.asarray(collection.items_store.insert(session, items), dtype=np.int64)
            collection.embeddings.write(session, EmbeddingKind.IMAGE, ids, images[positions], encoder,
                                        image_dtype, replace=False)
            report.added += len(items)
            if texts is not None:
                text_rows = np.asarray(texts[positions])
                # a caption vector for items with a caption (as a build stores them); an all-zero
                # row is how an export marks an item without one
                keep = np.fromiter((item.caption is not None for item in items), bool, len(items))
                keep &= np.any(text_rows != 0, axis=1)
                if keep.any():
                    collection.embeddings.write(session, EmbeddingKind.CAPTION, ids[keep], text_rows[keep],
                                                encoder, text_dtype, replace=False)
                    report.captions_added += int(keep.sum())
        start += count
        bar.update(count)
        for mapped in (images, texts):
            if mapped is not None:
                release_pages(mapped)  # the rows just copied: resident no more


def _present(session: Any, uris: list[str]) -> dict[str, int]:
    """uri -> item id of those of ``uris`` the catalog holds (as this transaction sees it)."""
    found: dict[str, int] = {}
    for chunk in in_chunks(list(dict.fromkeys(uris))):
        found.update(session.execute(select(Item.uri, Item.id).where(Item.uri.in_(chunk))).all())
    return found


def _stored_dtype(array: np.ndarray) -> str:
    """float16 shards stay float16 in the store (no precision is made up); others become float32."""
    return "float16" if array.dtype == np.float16 else "float32"


def _new_item(shard: LayoutShard, row: int, values: dict[str, Any]) -> NewItem:
    """The catalog item of one metadata row; a row without an image path is an InputError naming it."""
    path = values.pop(PATH_COLUMN)
    if not isinstance(path, str) or not path.strip():
        raise InputError(f"{shard.metadata}, row {row + 1}: no {PATH_COLUMN} (got {path!r}); "
                         "every row needs one; nothing was imported")
    caption = metadata_value(values.pop(CAPTION_COLUMN, None))
    values.pop(ID_COLUMN, None)
    fields: dict[str, Any] = {"sha256": "", "width": 0, "height": 0}
    for column in ITEM_COLUMNS:
        value = values.get(column)
        if column == "sha256" and isinstance(value, str) and _SHA256.match(value):
            fields[column] = values.pop(column)
        elif column != "sha256" and isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
            fields[column] = int(values.pop(column))
    metadata = {str(key): metadata_value(value) for key, value in values.items()}
    return NewItem(
        uri=path.strip(), sha256=fields["sha256"], width=fields["width"], height=fields["height"],
        caption=None if caption is None else str(caption),
        metadata={key: value for key, value in metadata.items() if value is not None},
    )
