"""The registry of index versions: which FAISS index files exist, what they hold, and which is current.

Each ``index_versions`` row is one index file and what it was built from. The current version
of a (kind, correction) pair is the newest ``ready`` one. Publishing a version makes it
``ready`` and retires the previous ready version of the pair in one transaction, so a reader
always sees exactly one current version. Building the files is :mod:`indexing.index_build`'s job.

Retention: a retired version's file is kept for a while (a search that opened it just before
the switch may still be reading it), then removed by :meth:`IndexVersions.collect_garbage`
(``sce index gc``): the files of the newest ``keep`` retired versions of each (kind,
correction) stay, and so does any file a live version points to. An on-disk IVF version is a
file pair, ``NAME.faiss`` and ``NAME.<token>.ivfdata`` (:mod:`indexing.ondisk_ivf`): gc removes both.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from indexing.catalog import Catalog, EmbeddingKind, IndexState, IndexVersion, utc_now
from sce_correct.errors import InputError, NotFoundError

logger = logging.getLogger(__name__)

INDEXES_DIRNAME = "indexes"
#: Retired versions per (kind, correction) whose files ``sce index gc`` keeps by default.
DEFAULT_KEEP_RETIRED = 2


class IndexVersionNotFoundError(NotFoundError, KeyError):
    """No index version has the name asked for, or no ready one exists for a kind/correction."""


@dataclass(frozen=True)
class IndexVersionInfo:
    """A snapshot of an ``index_versions`` row with its file resolved to a path."""

    name: str
    kind: str
    encoder: str
    dim: int
    correction: str | None
    factory: str
    file: Path
    count: int
    state: str
    parameters: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class GarbageReport:
    """What :meth:`IndexVersions.collect_garbage` removed (or, with ``dry_run``, would remove)."""

    removed: list[Path]
    kept: list[str]  # names of retired versions whose files were kept
    freed_bytes: int


def version_data_files(index_file: Path) -> list[Path]:
    """The files besides ``index_file`` that a version consists of: an on-disk IVF's lists,
    ``NAME.<token>.ivfdata`` (named without faiss, which this module does not import)."""
    if not index_file.parent.is_dir():
        return []
    return sorted(index_file.parent.glob(f"{index_file.stem}.*.ivfdata"))


def same_correction(correction: str | None) -> Any:
    """The condition that an index version has ``correction`` (None: an original version)."""
    return IndexVersion.correction.is_(None) if correction is None else IndexVersion.correction == correction


class IndexVersions:
    """The ``index_versions`` rows of one collection, and where their files go."""

    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog

    @property
    def index_dir(self) -> Path:
        stored = self.catalog.get_info("index_dir")
        return Path(stored) if stored else self.root / INDEXES_DIRNAME

    def info(self, row: IndexVersion) -> IndexVersionInfo:
        file = Path(row.file)
        if not file.is_absolute():
            file = self.root / file
        return IndexVersionInfo(
            name=row.name, kind=row.kind, encoder=row.encoder, dim=row.dim,
            correction=row.correction, factory=row.factory, file=file, count=row.count,
            state=row.state, parameters=dict(row.parameters or {}), created_at=row.created_at,
        )

    def stored_file(self, file: Path) -> str:
        """How ``file`` is recorded: relative to the collection when it lies inside it."""
        try:
            return file.relative_to(self.root).as_posix()
        except ValueError:
            return str(file)

    # -- reading ----------------------------------------------------------------------------
    def list(self, kind: str | None = None, include_retired: bool = False) -> list[IndexVersionInfo]:
        statement = select(IndexVersion).order_by(IndexVersion.id)
        if kind is not None:
            statement = statement.where(IndexVersion.kind == kind)
        if not include_retired:
            statement = statement.where(IndexVersion.state != IndexState.RETIRED)
        with self.catalog.session() as session:
            return [self.info(row) for row in session.scalars(statement)]

    def get(self, name: str) -> IndexVersionInfo:
        with self.catalog.session() as session:
            row = session.scalar(select(IndexVersion).where(IndexVersion.name == name))
            if row is None:
                raise IndexVersionNotFoundError(f"no index version named {name!r}")
            return self.info(row)

    def current(
        self, kind: str = EmbeddingKind.IMAGE, correction: str | None = None
    ) -> IndexVersionInfo | None:
        """The newest ready version for (kind, correction), or None."""
        with self.catalog.session() as session:
            row = session.scalar(
                select(IndexVersion)
                .where(
                    IndexVersion.kind == kind,
                    same_correction(correction),
                    IndexVersion.state == IndexState.READY,
                )
                .order_by(IndexVersion.id.desc())
                .limit(1)
            )
            return None if row is None else self.info(row)

    def resolve(
        self, version: str | IndexVersionInfo | None, kind: str, correction: str | None
    ) -> IndexVersionInfo:
        """A version given by snapshot, by name, or as the current one of (kind, correction)."""
        if isinstance(version, IndexVersionInfo):
            return version
        if version is not None:
            return self.get(version)
        info = self.current(kind, correction)
        if info is None:
            what = f"{kind} index" + (f" with correction {correction!r}" if correction else "")
            raise IndexVersionNotFoundError(f"collection {self.root} has no ready {what}")
        return info

    # -- state changes ----------------------------------------------------------------------
    def publish(self, name: str, count: int, parameters: dict[str, Any] | None = None) -> None:
        """Make ``name`` ready with ``count`` vectors (and ``parameters``, if given: what the
        build measured, e.g. an IVF's tuned nprobe) and retire the previous ready version of
        its (kind, correction), in one transaction: either all happens or nothing."""
        with self.catalog.sessions.begin() as session:
            row = session.scalar(select(IndexVersion).where(IndexVersion.name == name))
            if row is None:
                raise IndexVersionNotFoundError(f"no index version named {name!r}")
            session.execute(
                update(IndexVersion)
                .where(
                    IndexVersion.kind == row.kind,
                    same_correction(row.correction),
                    IndexVersion.state == IndexState.READY,
                    IndexVersion.name != name,
                )
                .values(state=IndexState.RETIRED, updated_at=utc_now())
            )
            session.execute(
                update(IndexVersion)
                .where(IndexVersion.name == name)
                .values(state=IndexState.READY, count=count, updated_at=utc_now(),
                        **({"parameters": parameters} if parameters is not None else {}))
            )

    def set_state(self, name: str, state: IndexState) -> None:
        with self.catalog.sessions.begin() as session:
            session.execute(
                update(IndexVersion).where(IndexVersion.name == name).values(state=state, updated_at=utc_now())
            )

    def set_count(self, name: str, count: int) -> None:
        with self.catalog.sessions.begin() as session:
            session.execute(
                update(IndexVersion)
                .where(IndexVersion.name == name)
                .values(count=count, updated_at=utc_now())
            )

    # -- retention --------------------------------------------------------------------------
    def collect_garbage(self, keep: int | None = None, *, dry_run: bool = False) -> GarbageReport:
        """Remove the files of retired versions beyond the newest ``keep`` of each (kind, correction)
        (default :data:`DEFAULT_KEEP_RETIRED`).

        Never removes a file that a building, failed or ready version points to. The rows
        stay (state ``retired``), so ``sce index info`` still lists them. The caller holds
        the collection's write lock.
        """
        keep = DEFAULT_KEEP_RETIRED if keep is None else keep
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise InputError(f"the number of retired versions to keep must be a whole number >= 0, got {keep!r}")
        versions = self.list(include_retired=True)
        live_files = {info.file for info in versions if info.state != IndexState.RETIRED}
        retired: dict[tuple[str, str | None], list[IndexVersionInfo]] = {}
        for info in versions:  # by id, oldest first
            if info.state == IndexState.RETIRED:
                retired.setdefault((info.kind, info.correction), []).append(info)
        removed: list[Path] = []
        kept: list[str] = []
        freed = 0
        for group in retired.values():
            newest_first = group[::-1]
            kept.extend(info.name for info in newest_first[:keep] if info.file.exists())
            for info in newest_first[keep:]:
                if info.file in live_files:
                    continue
                # the version's file pair: its .faiss file and an on-disk IVF's .ivfdata lists
                for path in [info.file, *version_data_files(info.file)]:
                    if not path.exists():
                        continue
                    size = path.stat().st_size
                    if not dry_run:
                        path.unlink(missing_ok=True)
                    removed.append(path)
                    freed += size
        if removed and not dry_run:
            logger.info("removed %d retired index files (%d bytes)", len(removed), freed)
        return GarbageReport(removed=removed, kept=kept, freed_bytes=freed)
