"""Embedding folders in clip-retrieval's layout: reading (checked, memory-mapped) and writing (atomic).

The exchange format with other tools (clip-retrieval's ``inference`` writes it, autofaiss and
``clip-retrieval index`` read it)::

    EMB_DIR/
        img_emb/img_emb_{i}.npy          (n_i, d) float16 or float32, one row per image
        text_emb/text_emb_{i}.npy        optional: (n_i, d) caption embeddings, same rows
        metadata/metadata_{i}.parquet    n_i rows in the same order: image_path, caption, ...

Shard numbers ``i`` count from 0 without gaps (clip-retrieval pads them with zeros in newer
versions: ``img_emb_007.npy`` is shard 7). :func:`read_layout` checks a folder before anything
is imported from it: every shard present, row counts that agree, one dimension, 2-d float
arrays, no NaN or infinite values; each problem is one :class:`InputError` naming the file.
The vectors are opened with ``np.load(mmap_mode="r")`` and the metadata read per file in row
batches with pyarrow, so a reader never holds more than a batch in memory.

:class:`LayoutWriter` writes a folder in this layout (``sce index export``): into a hidden
temporary sibling, each ``.npy`` through numpy's own format writer (``open_memmap``) and each
``.parquet`` through pyarrow, renamed into place only when complete, so a reader never sees
a partial export and a failed one leaves nothing.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexing.atomic import check_output_folder, fsync_directory, fsync_file
from sce_correct.errors import InputError, NotFoundError

logger = logging.getLogger(__name__)

IMAGE_DIR, TEXT_DIR, METADATA_DIR = "img_emb", "text_emb", "metadata"
IMAGE_PREFIX, TEXT_PREFIX, METADATA_PREFIX = "img_emb_", "text_emb_", "metadata_"
PATH_COLUMN, CAPTION_COLUMN = "image_path", "caption"
#: Rows checked for NaN/inf, or read from a parquet file, at a time.
CHECK_ROWS = 8192

_NUMBER = r"(\d+)"


@dataclass(frozen=True)
class LayoutShard:
    """One shard of an embedding folder: its files and row count (``image`` or ``text`` may be None)."""

    number: int
    image: Path | None
    text: Path | None
    metadata: Path
    rows: int

    def vectors(self, which: str) -> np.ndarray:
        """The memory-mapped (rows, d) array of ``which`` ("image" or "text")."""
        path = self.image if which == "image" else self.text
        if path is None:
            raise InputError(f"shard {self.number} has no {which} embeddings")
        return open_vectors(path)

    def metadata_batches(self, rows: int = CHECK_ROWS) -> Iterator[dict[str, list[Any]]]:
        """The metadata rows in order, as column -> values batches of at most ``rows`` rows."""
        import pyarrow

        handle = _parquet(self.metadata)
        try:
            for batch in handle.iter_batches(batch_size=rows):
                yield batch.to_pydict()
        except (pyarrow.ArrowException, OSError) as error:
            raise InputError(f"{self.metadata}: cannot read the parquet data: {error}") from None


@dataclass(frozen=True)
class EmbeddingLayout:
    """A checked embedding folder: its shards in order, the dimension and what it holds."""

    root: Path
    shards: list[LayoutShard]
    dim: int
    has_image: bool
    has_text: bool

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)


def open_vectors(path: Path) -> np.ndarray:
    """A memory map of the 2-d float array in ``path``; anything else is an InputError naming it."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: missing") from None
    except (ValueError, EOFError, OSError) as error:
        # numpy reads a file without its header as pickled data: not a reason worth repeating
        reason = "" if "pickle" in str(error) else f" ({' '.join(str(error).split())})"
        raise InputError(f"{path}: not a readable .npy array file{reason}") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path}: not a .npy array")
    if array.ndim != 2:
        raise InputError(f"{path}: expected a 2-d (rows, dim) array, got shape {array.shape}")
    if array.dtype.kind != "f":
        raise InputError(f"{path}: expected float16 or float32 vectors, got {array.dtype}")
    if array.shape[1] == 0:
        raise InputError(f"{path}: the vectors have dimension 0")
    return array


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set (the kernel
    keeps them in its page cache): a scan then holds about a chunk of the file resident, not
    all of it. A no-op for arrays that are not memory maps, or where madvise is missing."""
    handle = getattr(array, "_mmap", None)  # numpy's memmap keeps its mmap.mmap here
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            handle.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed or unusual mapping: only a memory hint was lost
            pass


def check_finite(path: Path, array: np.ndarray, rows: int = CHECK_ROWS) -> None:
    """InputError naming ``path``, its first bad row and how many there are when ``array`` holds
    NaN or infinite values (read ``rows`` rows at a time)."""
    first, bad = None, 0
    for start in range(0, len(array), rows):
        if start % (8 * rows) == 0:
            release_pages(array)
        good = np.isfinite(np.asarray(array[start : start + rows])).all(axis=1)
        if not good.all():
            bad += int(np.count_nonzero(~good))
            first = start + int(np.flatnonzero(~good)[0]) if first is None else first
    if first is not None:
        raise InputError(f"{path}: row {first} holds NaN or infinite values ({bad} of its {len(array)} rows do); "
                         "nothing was imported")


def _parquet(path: Path):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise InputError(f"{path}: not a readable parquet file: {error}") from None


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    """Files ``prefix{i}suffix`` in ``folder`` by shard number (a repeated number is an error)."""
    if not folder.is_dir():
        return {}
    pattern = re.compile(re.escape(prefix) + _NUMBER + re.escape(suffix) + "$")
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match is None:
            continue
        number = int(match.group(1))
        if number in found:
            raise InputError(f"{path}: shard {number} is also {found[number].name}")
        found[number] = path
    return found


def read_layout(emb_dir: str | Path, *, check_values: bool = True) -> EmbeddingLayout:
    """Check the embedding folder ``emb_dir`` and list its shards (see the module docstring).

    Reads only array headers and parquet footers, then (``check_values``) scans every vector
    once, block by block, for NaN and infinite values.
    """
    root = Path(emb_dir)
    if not root.is_dir():
        raise NotFoundError(f"{root} does not exist" if not root.exists() else f"{root} is not a folder")
    images = _numbered(root / IMAGE_DIR, IMAGE_PREFIX, ".npy")
    texts = _numbered(root / TEXT_DIR, TEXT_PREFIX, ".npy")
    metadata = _numbered(root / METADATA_DIR, METADATA_PREFIX, ".parquet")
    if not images and not texts:
        raise InputError(f"{root}: no {IMAGE_DIR}/{IMAGE_PREFIX}0.npy: not an embedding folder in "
                         f"clip-retrieval's layout ({IMAGE_DIR}/, {METADATA_DIR}/)")
    numbers = sorted(set(images) | set(texts) | set(metadata))
    expected = range(numbers[-1] + 1)

    def require(found: dict[int, Path], folder: str, prefix: str, suffix: str) -> None:
        for number in expected:
            if number not in found:
                raise InputError(f"{root / folder / f'{prefix}{number}{suffix}'}: missing (shards 0-{numbers[-1]} "
                                 f"are expected; shard {number} is not there)")

    if images:
        require(images, IMAGE_DIR, IMAGE_PREFIX, ".npy")
    if texts:
        require(texts, TEXT_DIR, TEXT_PREFIX, ".npy")
    require(metadata, METADATA_DIR, METADATA_PREFIX, ".parquet")
    shards: list[LayoutShard] = []
    dim: int | None = None
    first: Path | None = None
    for number in expected:
        table = _parquet(metadata[number])  # the footer only
        rows, names = int(table.metadata.num_rows), table.schema_arrow.names
        if PATH_COLUMN not in names:
            raise InputError(f"{metadata[number]}: no {PATH_COLUMN!r} column (found {', '.join(names) or 'none'})")
        for path in (images.get(number), texts.get(number)):
            if path is None:
                continue
            array = open_vectors(path)
            if len(array) != rows:
                raise InputError(f"{path}: {len(array)} rows, but {metadata[number].name} has {rows}; "
                                 "the vectors and the metadata must list the same rows in the same order")
            if dim is None:
                dim, first = int(array.shape[1]), path
            elif array.shape[1] != dim:
                raise InputError(f"{path}: vectors of dimension {array.shape[1]}, but {first} has dimension {dim}")
        shards.append(LayoutShard(number, images.get(number), texts.get(number), metadata[number], rows))
    assert dim is not None
    if check_values:
        for shard in shards:
            for path in (shard.image, shard.text):
                if path is not None:
                    check_finite(path, open_vectors(path))
    return EmbeddingLayout(root, shards, dim, bool(images), bool(texts))


# -- writing ----------------------------------------------------------------------------------
def _arrow_column(values: Sequence[Any]):
    """A pyarrow array of ``values``; a column mixing types (7 and "7") is written as text."""
    import json

    import pyarrow

    try:
        return pyarrow.array(values)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError):
        return pyarrow.array([None if v is None else v if isinstance(v, str) else json.dumps(v, default=str)
                              for v in values], type=pyarrow.string())


class LayoutWriter:
    """Writes an embedding folder atomically: everything goes to a hidden sibling of ``out_dir``,
    renamed to ``out_dir`` by :meth:`commit` (an empty existing ``out_dir`` is replaced; a
    non-empty one is refused before anything is written).

    Use as a context manager: committed when the block ends, removed on an exception.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir).expanduser().absolute()
        if self.out_dir.exists():
            if not self.out_dir.is_dir():
                raise InputError(f"{self.out_dir} is a file; give a new or empty folder to export to")
            if any(self.out_dir.iterdir()):
                raise InputError(f"{self.out_dir} is not empty; give a new or empty folder to export to")
        check_output_folder(self.out_dir, "export folder")  # a file on its path: not "does not exist"
        if not self.out_dir.parent.is_dir():
            raise NotFoundError(f"{self.out_dir.parent} does not exist")
        self.temporary = self.out_dir.with_name(f".{self.out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        try:
            self.temporary.mkdir()
        except OSError as error:  # name the folder asked for, not the hidden one beside it
            raise InputError(f"cannot export to {self.out_dir}: {error.strerror or error}") from None
        self._files: list[Path] = []

    def vectors(self, which: str, number: int, rows: int, dim: int, dtype: str = "float32") -> np.memmap:
        """A writable (rows, dim) memory map of shard ``number``'s ``which`` ("image"/"text") file."""
        folder, prefix = (IMAGE_DIR, IMAGE_PREFIX) if which == "image" else (TEXT_DIR, TEXT_PREFIX)
        path = self.temporary / folder / f"{prefix}{number}.npy"
        path.parent.mkdir(exist_ok=True)
        self._files.append(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(rows, dim))

    def metadata(self, number: int, columns: dict[str, Sequence[Any]]) -> None:
        """Write shard ``number``'s metadata (column name -> values, in row order)."""
        import pyarrow
        import pyarrow.parquet as pq

        path = self.temporary / METADATA_DIR / f"{METADATA_PREFIX}{number}.parquet"
        path.parent.mkdir(exist_ok=True)
        table = pyarrow.table({name: _arrow_column(values) for name, values in columns.items()})
        pq.write_table(table, path)
        self._files.append(path)

    def commit(self) -> Path:
        """Make every file durable and rename the folder into place; returns ``out_dir``."""
        for path in self._files:
            fsync_file(path)
        for folder in {path.parent for path in self._files}:
            fsync_directory(folder)
        if self.out_dir.exists() and any(self.out_dir.iterdir()):
            raise InputError(f"{self.out_dir} was filled by someone else during the export; "
                             f"the export stays in {self.temporary}")
        os.replace(self.temporary, self.out_dir)  # an empty out_dir is replaced (rename(2))
        fsync_directory(self.out_dir.parent)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.temporary, ignore_errors=True)

    def __enter__(self) -> LayoutWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


__all__ = ["EmbeddingLayout", "LayoutShard", "LayoutWriter", "read_layout", "open_vectors", "check_finite",
           "release_pages",
           "IMAGE_DIR", "TEXT_DIR", "METADATA_DIR", "PATH_COLUMN", "CAPTION_COLUMN"]
