"""The items of a collection and its rejected files: insert, look up, filter, delete.

An item's integer id is its FAISS id in every index version. Metadata filters run in SQL
(JSON element access, on SQLite and PostgreSQL alike) so a filter over a large catalog never
loads every item. :func:`parse_where` is the one parser of ``key=value`` filters, for the
command line (``--where``, repeatable) and the web UI (a textbox of clauses).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import String, case, cast, delete, false, func, insert, literal, null, select
from sqlalchemy.orm import Session

from indexing.catalog import Catalog, Embedding, Failure, Item, RejectReason, in_chunks
from sce_correct.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewItem:
    """An image ready to enter the catalog (its embedding travels alongside)."""

    uri: str
    sha256: str
    width: int
    height: int
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """A source file that did not become an item, and why."""

    uri: str
    reason: RejectReason
    detail: str = ""
    sha256: str | None = None
    duplicate_of: int | None = None


@dataclass(frozen=True)
class ItemRecord:
    """A snapshot of an ``items`` row."""

    id: int
    uri: str
    sha256: str
    caption: str | None
    width: int
    height: int
    metadata: dict[str, Any]
    added_at: datetime


@dataclass(frozen=True)
class FailureRecord:
    uri: str
    reason: str
    detail: str
    duplicate_of: int | None


@dataclass(frozen=True)
class DeleteResult:
    deleted: list[int]
    not_found: list[int | str]


def parse_where(clauses: str | Iterable[str] | None) -> dict[str, str]:
    """``key=value`` filters as a dict: a list of clauses (``--where``, repeatable), or one text
    of clauses separated by semicolons or new lines (the web UI's textbox). A value may hold
    commas in both ("name=waving hand, dark skin tone").

    Keys and values are stripped; an empty value selects items without that key. A clause
    without ``=`` or without a key is an :class:`InputError` naming it.
    """
    if clauses is None:
        return {}
    if isinstance(clauses, str):
        pieces: Iterable[str] = clauses.replace(";", "\n").splitlines()
    else:
        pieces = clauses
    where: dict[str, str] = {}
    from_text = isinstance(clauses, str)
    for clause in pieces:
        if not isinstance(clause, str):
            raise InputError(f"a filter is written key=value, got {clause!r}")
        if not clause.strip():
            if from_text:  # blank lines of the UI's textbox
                continue
            raise InputError("a filter is written key=value (e.g. category=people), got an empty --where")
        key, sep, value = clause.partition("=")
        if not sep or not key.strip():
            raise InputError(f"a filter is written key=value (e.g. category=people), got {clause.strip()!r}")
        where[key.strip()] = value.strip()
    return where


def metadata_text(value: Any) -> str:
    """A metadata value as the text a ``--where`` clause compares with: strings as they are,
    numbers as written, booleans ``true``/``false``, a missing or null value ``""``.
    (The Python statement of what :func:`metadata_matches` does in SQL.)"""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def metadata_matches(where: dict[str, str], dialect: str) -> list[Any]:
    """SQL conditions that an item's metadata match ``where``: for each key, the value's text
    (:func:`metadata_text`) equals the given value.

    PostgreSQL (and others): ``metadata ->> key``, the key a bound parameter. SQLite: the
    value looked up with ``json_each`` rather than a JSON path, so any key works (a path
    cannot hold a double quote, and SQLAlchemy escapes non-ASCII keys into paths SQLite
    does not read).
    """
    conditions = []
    for key, value in where.items():
        if dialect == "postgresql" and "\x00" in value:
            conditions.append(false())  # PostgreSQL text holds no NUL, so no stored value has one
            continue
        if dialect == "postgresql" and "\x00" in key:
            element = null()  # nor does any stored key: the key is missing everywhere
        elif dialect == "sqlite":
            entries = func.json_each(Item.metadata_).table_valued("key", "value", "type")
            as_text = case(
                (entries.c.type == "true", literal("true")),
                (entries.c.type == "false", literal("false")),
                else_=cast(entries.c.value, String),
            )
            element = select(as_text).where(entries.c.key == key).limit(1).scalar_subquery()
        else:
            element = Item.metadata_[key].as_string()
        conditions.append(func.coalesce(element, "") == str(value))
    return conditions


class ItemStore:
    """The ``items`` and ``failures`` rows of one catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # -- writing, inside the caller's transaction ---------------------------------------------
    def insert(self, session: Session, items: Sequence[NewItem]) -> list[int]:
        """Insert ``items``; returns their new ids in order. Files they were once rejected
        as are no longer failures (the retry of a fixed file).

        On PostgreSQL an item it cannot store (a NUL character, which its text and ``->>``
        refuse; a URI longer than the column, which SQLite does not enforce) is an
        :class:`InputError` naming it, and nothing of the call is written."""
        if not items:
            return []
        if session.get_bind().dialect.name == "postgresql":
            for item in items:
                _check_storable_on_postgres(item)
        # One executemany INSERT, then the ids by (unique) uri: far faster than an ORM
        # object or a RETURNING round trip per item on SQLite.
        session.execute(
            insert(Item),
            [
                {
                    "uri": item.uri,
                    "sha256": item.sha256,
                    "caption": item.caption,
                    "width": item.width,
                    "height": item.height,
                    "metadata_": item.metadata,
                }
                for item in items
            ],
        )
        uris = [item.uri for item in items]
        id_by_uri: dict[str, int] = {}
        for chunk in in_chunks(uris):
            rows = session.execute(select(Item.uri, Item.id).where(Item.uri.in_(chunk)))
            id_by_uri.update((uri, item_id) for uri, item_id in rows)
        self.forget_failures(session, uris)
        return [id_by_uri[uri] for uri in uris]

    def record_rejections(self, session: Session, rejections: Sequence[Rejection]) -> None:
        """Record rejected files (replacing earlier records of the same URIs)."""
        if not rejections:
            return
        if session.get_bind().dialect.name == "postgresql":
            rejections = [_storable_rejection(rejection) for rejection in rejections]
        self.forget_failures(session, [rejection.uri for rejection in rejections])
        session.add_all(
            Failure(
                uri=rejection.uri,
                reason=str(rejection.reason),
                detail=rejection.detail,
                sha256=rejection.sha256,
                duplicate_of=rejection.duplicate_of,
            )
            for rejection in rejections
        )

    @staticmethod
    def forget_failures(session: Session, uris: list[str]) -> None:
        for chunk in in_chunks(uris):
            session.execute(delete(Failure).where(Failure.uri.in_(chunk)))

    def delete(
        self, session: Session, ids: Sequence[int] = (), uris: Sequence[str] = ()
    ) -> DeleteResult:
        """Delete items (and their stored-embedding rows) by id and/or URI."""
        found: dict[int, str] = {}
        wanted_ids = [int(item_id) for item_id in ids]
        for chunk in in_chunks(wanted_ids):
            found.update(session.execute(select(Item.id, Item.uri).where(Item.id.in_(chunk))).all())
        wanted_uris = list(uris)
        for chunk in in_chunks(wanted_uris):
            found.update(session.execute(select(Item.id, Item.uri).where(Item.uri.in_(chunk))).all())
        not_found: list[int | str] = [i for i in wanted_ids if i not in found]
        found_uris = set(found.values())
        not_found += [uri for uri in wanted_uris if uri not in found_uris]
        doomed = sorted(found)
        for chunk in in_chunks(doomed):
            session.execute(delete(Embedding).where(Embedding.item_id.in_(chunk)))
            session.execute(delete(Item).where(Item.id.in_(chunk)))
        return DeleteResult(deleted=doomed, not_found=not_found)

    # -- reading ----------------------------------------------------------------------------
    def count(self) -> int:
        with self.catalog.session() as session:
            return session.scalar(select(func.count()).select_from(Item))

    def known_uris(self, include_failures: bool = True) -> set[str]:
        """URIs already in the catalog (and, by default, already rejected)."""
        with self.catalog.session() as session:
            uris = set(session.scalars(select(Item.uri)).all())
            if include_failures:
                uris.update(session.scalars(select(Failure.uri)).all())
        return uris

    def find_sha256(self, digests: Sequence[str]) -> dict[str, tuple[int, str]]:
        """Existing items by content hash: sha256 -> (item id, uri)."""
        found: dict[str, tuple[int, str]] = {}
        unique = list(dict.fromkeys(digests))
        with self.catalog.session() as session:
            for chunk in in_chunks(unique):
                for item_id, uri, digest in session.execute(
                    select(Item.id, Item.uri, Item.sha256).where(Item.sha256.in_(chunk))
                ):
                    found.setdefault(digest, (item_id, uri))
        return found

    def ids(self, where: dict[str, str] | None = None, *, captioned: bool = False) -> np.ndarray:
        """Sorted item ids, optionally only those whose metadata match ``where`` (in SQL) and,
        with ``captioned``, that have a non-blank caption."""
        statement = select(Item.id).where(*self._conditions(where, captioned)).order_by(Item.id)
        with self.catalog.session() as session:
            return np.asarray(session.scalars(statement).all(), dtype=np.int64)

    def records(self, ids: Sequence[int] | np.ndarray) -> dict[int, ItemRecord]:
        """Item snapshots by id (absent ids are left out)."""
        wanted = list(dict.fromkeys(int(item_id) for item_id in ids))
        records: dict[int, ItemRecord] = {}
        with self.catalog.session() as session:
            for chunk in in_chunks(wanted):
                for row in session.scalars(select(Item).where(Item.id.in_(chunk))):
                    records[row.id] = _item_record(row)
        return records

    def matching(
        self, where: dict[str, str] | None = None, *, captioned: bool = False
    ) -> list[ItemRecord]:
        """Snapshots of the items whose metadata match ``where`` (filtered in SQL), by id."""
        statement = select(Item).where(*self._conditions(where, captioned)).order_by(Item.id)
        with self.catalog.session() as session:
            return [_item_record(row) for row in session.scalars(statement)]

    def captions(self) -> tuple[np.ndarray, list[str]]:
        """(ids, stripped captions) of the items that have a non-blank caption, by id."""
        statement = select(Item.id, Item.caption).where(*self._conditions(None, True)).order_by(Item.id)
        with self.catalog.session() as session:
            rows = [(item_id, caption.strip()) for item_id, caption in session.execute(statement)]
        rows = [(item_id, caption) for item_id, caption in rows if caption]
        return np.asarray([i for i, _ in rows], dtype=np.int64), [c for _, c in rows]

    def failures(self, reason: str | None = None, limit: int | None = None) -> list[FailureRecord]:
        statement = select(Failure).order_by(Failure.id)
        if reason is not None:
            statement = statement.where(Failure.reason == reason)
        if limit is not None:
            statement = statement.limit(limit)
        with self.catalog.session() as session:
            return [
                FailureRecord(row.uri, row.reason, row.detail, row.duplicate_of)
                for row in session.scalars(statement)
            ]

    def failure_counts(self) -> dict[str, int]:
        with self.catalog.session() as session:
            return dict(
                session.execute(select(Failure.reason, func.count()).group_by(Failure.reason)).all()
            )

    def _conditions(self, where: dict[str, str] | None, captioned: bool) -> list[Any]:
        conditions = metadata_matches(where or {}, self.catalog.engine.dialect.name)
        if captioned:
            # blank captions (only spaces) are not captions either; trim() is on both dialects
            conditions.append(func.coalesce(func.trim(Item.caption), "") != "")
        return conditions


#: The longest URI the ``uri`` columns hold (PostgreSQL enforces the length; SQLite does not).
URI_LENGTH = Item.__table__.c.uri.type.length


def _has_nul(value: Any) -> bool:
    """Whether a text, or any key or text inside JSON-like data, holds a NUL character."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(key) or _has_nul(entry) for key, entry in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_nul(entry) for entry in value)
    return False


def _check_storable_on_postgres(item: NewItem) -> None:
    if len(item.uri) > URI_LENGTH:
        raise InputError(f"{item.uri[:80]}...: a URI longer than {URI_LENGTH} characters "
                         "does not fit the PostgreSQL catalog")
    for field_name in ("uri", "caption", "metadata"):
        if _has_nul(getattr(item, field_name)):
            shown = item.uri.replace("\x00", "\\0")
            raise InputError(f"{shown}: its {field_name} holds a NUL character, which a "
                             "PostgreSQL catalog cannot store; remove it from the listing")


def _storable_rejection(rejection: Rejection) -> Rejection:
    """A rejection PostgreSQL can record: NUL characters replaced and an over-long URI cut
    (a digest keeps it unique). Such a record no longer names the listed URI exactly, so a
    later run tries that file again (and rejects it again): the record is only diagnostic."""
    uri, detail = rejection.uri.replace("\x00", "\ufffd"), rejection.detail.replace("\x00", "\ufffd")
    if len(uri) > URI_LENGTH:
        digest = hashlib.sha256(rejection.uri.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        uri = f"{uri[: URI_LENGTH - 20]}...#{digest}"
    return dataclasses.replace(rejection, uri=uri, detail=detail)


def _item_record(row: Item) -> ItemRecord:
    return ItemRecord(
        id=row.id, uri=row.uri, sha256=row.sha256, caption=row.caption, width=row.width,
        height=row.height, metadata=dict(row.metadata_ or {}), added_at=row.added_at,
    )
