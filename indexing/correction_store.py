"""Fitted corrections of a collection: the SchurCorrector file plus its catalog row.

Layout: ``<collection>/corrections/<name>.npz`` (written atomically by the corrector's
``save``: a ``SchurCorrector`` or a ``HeadAblation``) and one ``corrections`` row. The file is written first and the row
inserted in a transaction; if the row cannot be written the file is removed, so there is
never a row without a file or a file that a later fit with the same name would trip over.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from sqlalchemy import select

from indexing.atomic import replace_durably
from indexing.catalog import Catalog, Correction
from sce_correct import HeadAblation, SchurCorrector, load_corrector
from sce_correct.errors import ConflictError, InputError, NotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from indexing.collection import Collection

logger = logging.getLogger(__name__)

CORRECTIONS_DIRNAME = "corrections"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Which stored embedding kind (and so which index) a direction corrects.
TARGET_KIND = {"t2i": "image", "i2t": "caption", "t2t": "caption"}


class CorrectionNotFoundError(NotFoundError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CorrectionExistsError(ConflictError, ValueError):
    """A correction of that name is already stored (and replacing it was not asked for)."""


class CorrectionFileMissingError(NotFoundError, FileNotFoundError):
    """A correction's row is in the catalog but its file is not on disk."""


@dataclass(frozen=True)
class CorrectionInfo:
    """A snapshot of a ``corrections`` row."""

    name: str
    direction: str
    kernel: str
    encoder: str | None
    dim: int | None
    parameters: dict[str, Any]
    file: Path
    fitted_on: str | None
    report: dict[str, Any]
    created_at: datetime

    @property
    def target_kind(self) -> str:
        """The embedding kind this correction applies to: "image" or "caption"."""
        return TARGET_KIND[self.direction]


@dataclass
class StoredCorrection:
    info: CorrectionInfo
    corrector: SchurCorrector | HeadAblation = field(repr=False)


def check_correction_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(
            f"invalid correction name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class CorrectionRegistry:
    """The ``corrections`` rows of one catalog, with their files in ``directory``.

    A part of :class:`~indexing.collection.Collection` (``collection.corrections``); the
    functions below go through it.
    """

    def __init__(self, catalog: Catalog, directory: Path) -> None:
        self.catalog = catalog
        self.directory = directory

    def info(self, row: Correction) -> CorrectionInfo:
        return CorrectionInfo(
            name=row.name, direction=row.direction, kernel=row.kernel, encoder=row.encoder, dim=row.dim,
            parameters=dict(row.parameters or {}), file=self.directory / (row.file or ""),
            fitted_on=row.fitted_on, report=dict(row.report or {}), created_at=row.created_at,
        )

    def find(self, name: str) -> CorrectionInfo | None:
        with self.catalog.session() as session:
            row = session.scalar(select(Correction).where(Correction.name == name))
            return None if row is None else self.info(row)

    def get(self, name: str) -> CorrectionInfo:
        found = self.find(name)
        if found is None:
            known = self.names()
            hint = f"; known corrections: {', '.join(known)}" if known else "; none has been fitted yet"
            raise CorrectionNotFoundError(f"no correction named {name!r} in this collection{hint}")
        return found

    def names(self) -> list[str]:
        with self.catalog.session() as session:
            return list(session.scalars(select(Correction.name).order_by(Correction.name)))

    def list(self) -> list[CorrectionInfo]:
        with self.catalog.session() as session:
            rows = session.scalars(select(Correction).order_by(Correction.created_at)).all()
            return [self.info(row) for row in rows]

    def put(self, name: str, direction: str, kernel: str, staged: Path, *, encoder: str, dim: int,
            parameters: dict[str, Any], fitted_on: str | None, report: dict[str, Any]) -> None:
        """Insert (or replace) the row of ``name`` and move its ``staged`` file into place, in
        one transaction: a failed rename rolls the row back, and the renamed file is durable
        (directory fsynced) before the row is committed."""
        final = self.directory / f"{name}.npz"
        with self.catalog.sessions.begin() as session:
            existing = session.scalar(select(Correction).where(Correction.name == name))
            if existing is not None:
                session.delete(existing)
                session.flush()
            session.add(Correction(
                name=name, direction=direction, kernel=kernel,
                encoder=encoder, dim=int(dim), parameters=dict(parameters), file=final.name,
                fitted_on=fitted_on, report=dict(report),
            ))
            session.flush()
            replace_durably(staged, final)

    def delete(self, name: str) -> CorrectionInfo:
        """Delete the row of ``name`` (then its file); returns what it was."""
        with self.catalog.sessions.begin() as session:
            row = session.scalar(select(Correction).where(Correction.name == name))
            if row is None:
                raise CorrectionNotFoundError(f"no correction named {name!r} in this collection")
            info = self.info(row)
            session.delete(row)
        info.file.unlink(missing_ok=True)
        return info


def corrections_dir(collection: Collection) -> Path:
    return collection.corrections.directory


def save_correction(collection: Collection, name: str, corrector: SchurCorrector | HeadAblation, *,
                    encoder: str, dim: int, parameters: dict[str, Any] | None = None,
                    fitted_on: str | None = None, report: dict[str, Any] | None = None,
                    replace: bool = False, direction: str | None = None) -> CorrectionInfo:
    """Store a fitted corrector under `name`; an existing name is an error unless `replace`.

    ``direction`` defaults to the corrector's own (a HeadAblation's is "t2i": it changes image
    embeddings).
    """
    check_correction_name(name)
    direction = direction or corrector.direction
    if direction not in TARGET_KIND:
        raise InputError(f"direction must be one of {', '.join(TARGET_KIND)}, got {direction!r}")
    registry = collection.corrections
    with collection.writing():
        if registry.find(name) is not None and not replace:
            raise CorrectionExistsError(f"a correction named {name!r} already exists (choose another name or replace it)")
        staged = registry.directory / f".{name}.staged.npz"
        corrector.save(staged)
        try:
            registry.put(name, direction, corrector.kernel, staged, encoder=encoder, dim=dim, parameters=parameters or {},
                         fitted_on=fitted_on, report=report or {})
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
    logger.info("stored correction %s (%s, %s)", name, direction, corrector.kernel)
    return correction_info(collection, name)


def correction_info(collection: Collection, name: str) -> CorrectionInfo:
    return collection.corrections.get(name)


def list_corrections(collection: Collection) -> list[CorrectionInfo]:
    return collection.corrections.list()


def load_correction(collection: Collection, name: str) -> StoredCorrection:
    """The stored corrector, checked against the collection's encoder and dimension."""
    from indexing.collection import EncoderMismatchError

    info = correction_info(collection, name)
    if info.encoder is not None and collection.encoder_name is not None and info.encoder != collection.encoder_name:
        raise EncoderMismatchError(
            f"correction {name!r} was fitted with encoder {info.encoder!r}, but the collection uses "
            f"{collection.encoder_name!r}: fit it again with the collection's encoder"
        )
    if not info.file.exists():
        raise CorrectionFileMissingError(f"the file of correction {name!r} is missing: {info.file}")
    corrector = load_corrector(info.file)
    if collection.dim is not None and corrector.n_features_in_ != collection.dim:
        raise InputError(
            f"correction {name!r} expects {corrector.n_features_in_}-d embeddings but the collection's "
            f"are {collection.dim}-d"
        )
    return StoredCorrection(info=info, corrector=corrector)


def delete_correction(collection: Collection, name: str) -> None:
    with collection.writing():
        collection.corrections.delete(name)
