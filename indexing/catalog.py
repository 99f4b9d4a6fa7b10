"""The SQL catalog: items, stored embeddings, index versions, corrections and rejected files.

The catalog owns identity: an item's integer primary key is its FAISS id, so metadata and
vectors cannot drift apart. Every session comes from :func:`open_catalog`.

Schema versioning: the catalog stores an integer ``schema_version`` in ``catalog_info`` and
checks it on open. A later change adds a function to ``MIGRATIONS`` (version n -> n + 1)
and bumps ``SCHEMA_VERSION``. We chose this over Alembic because the catalog is an embedded,
usually single-file store that the application upgrades itself on open; Alembic would add a
dependency and a migration environment for what are, here, a few ``ALTER TABLE`` lines.
Brand-new tables need no migration: ``create_all`` adds them on open.

SQLite (a file, the default) and PostgreSQL (one catalog shared by the machines of a
cluster) run the same schema; where they differ the code says so: item ids are BIGINT and
paths TEXT on PostgreSQL, creating or upgrading the schema takes an advisory lock there
(SQLite: ``BEGIN IMMEDIATE``), and :class:`WriterLock` makes writers on several machines
take turns.
"""
from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from sce_correct.errors import ConflictError, InputError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: At most this many values in one ``IN (...)`` (SQLite caps a query's bound parameters).
IN_CHUNK = 900

#: PostgreSQL advisory locks (first key; the second is the catalog's schema, so catalogs in
#: several schemas of one database do not wait on each other): one for creating or upgrading
#: the schema, one held by the collection's writer (see :meth:`Catalog.writer_lock`).
PG_SCHEMA_LOCK = 0x5CE0001
PG_WRITER_LOCK = 0x5CE0002

#: Upgrades keyed by the version they start from; each takes a connection inside the
#: transaction that also bumps the stored version.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


class CatalogError(ConflictError):
    """The catalog's database cannot be opened or used (locked, unreachable, damaged)."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def in_chunks(values: Sequence[Any]) -> Iterator[Any]:
    """``values`` in slices of at most ``IN_CHUNK`` (a list, tuple or numpy array)."""
    for start in range(0, len(values), IN_CHUNK):
        yield values[start : start + IN_CHUNK]


#: An item id, which is also its 64-bit FAISS id: BIGINT on PostgreSQL (a plain INTEGER runs
#: out at 2**31), and SQLite's INTEGER, the only type its AUTOINCREMENT takes (64-bit there).
ItemId = BigInteger().with_variant(Integer, "sqlite")
#: File paths and encoder specs (which may hold a checkpoint's path): as long as the file
#: system allows. SQLite ignores a VARCHAR's length; PostgreSQL would refuse a longer value.
PathText = String(1024).with_variant(Text(), "postgresql")
SpecText = String(512).with_variant(Text(), "postgresql")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class CatalogInfo(Base):
    """Key/value settings of the collection: schema version, encoder, dimension, paths."""

    __tablename__ = "catalog_info"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Item(Base):
    """One image of the collection; ``id`` is also its id in every FAISS index version."""

    __tablename__ = "items"
    # AUTOINCREMENT so SQLite never hands a deleted item's id (still present in an old,
    # retired index file) to a new item.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(ItemId, primary_key=True)
    uri: Mapped[str] = mapped_column(String(2048), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    caption: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int]
    height: Mapped[int]
    # `metadata` is reserved on declarative classes, hence the trailing underscore.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class EmbeddingKind(StrEnum):
    """What a stored vector embeds: the item's image or its caption (issue 8)."""

    IMAGE = "image"
    CAPTION = "caption"


class EmbeddingShard(Base):
    """One ``.npy`` file of raw encoder outputs, written atomically before its rows commit."""

    __tablename__ = "embedding_shards"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    encoder: Mapped[str] = mapped_column(SpecText)
    dim: Mapped[int]
    dtype: Mapped[str] = mapped_column(String(16))
    file: Mapped[str] = mapped_column(PathText)
    count: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Embedding(Base):
    """Where the stored vector of (kind, item) lives: a shard file and a row in it."""

    __tablename__ = "embeddings"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    item_id: Mapped[int] = mapped_column(
        ItemId, ForeignKey("items.id", ondelete="CASCADE"), primary_key=True
    )
    shard_id: Mapped[int] = mapped_column(ForeignKey("embedding_shards.id"), index=True)
    row: Mapped[int]


class IndexState(StrEnum):
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"
    RETIRED = "retired"


class IndexVersion(Base):
    """One FAISS index file and what it was built from.

    The current version for a (kind, correction) pair is the newest ``ready`` one; publishing
    a new version retires the previous one in the same transaction.
    """

    __tablename__ = "index_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    kind: Mapped[str] = mapped_column(String(32), default=EmbeddingKind.IMAGE.value)
    encoder: Mapped[str] = mapped_column(SpecText)
    dim: Mapped[int]
    correction: Mapped[str | None] = mapped_column(String(256))
    factory: Mapped[str] = mapped_column(String(256), default="Flat")
    file: Mapped[str] = mapped_column(PathText)
    count: Mapped[int] = mapped_column(default=0)
    state: Mapped[str] = mapped_column(String(16), default=IndexState.BUILDING.value)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utc_now, onupdate=utc_now
    )


class Correction(Base):
    """A fitted concept correction (written by the correction workflow, issue 5)."""

    __tablename__ = "corrections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    direction: Mapped[str] = mapped_column(String(16))
    kernel: Mapped[str] = mapped_column(String(32))
    encoder: Mapped[str | None] = mapped_column(SpecText)
    dim: Mapped[int | None]
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    file: Mapped[str | None] = mapped_column(PathText)
    fitted_on: Mapped[str | None] = mapped_column(Text)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class RejectReason(StrEnum):
    """Why a source file did not become an item."""

    MISSING = "missing"
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    DECOMPRESSION_BOMB = "decompression_bomb"
    DUPLICATE = "duplicate"
    UNREADABLE = "unreadable"
    PREPROCESS_FAILED = "preprocess_failed"


class Failure(Base):
    """A source file that was rejected, with its reason; a resumed build skips these."""

    __tablename__ = "failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uri: Mapped[str] = mapped_column(String(2048), unique=True)
    reason: Mapped[str] = mapped_column(String(32), index=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    sha256: Mapped[str | None] = mapped_column(String(64))
    duplicate_of: Mapped[int | None] = mapped_column(ItemId)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


@dataclass(frozen=True)
class Catalog:
    """An open catalog: the engine and the one session factory everything uses."""

    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def session(self) -> Session:
        return self.sessions()

    def get_info(self, key: str) -> str | None:
        with self.sessions() as session:
            row = session.get(CatalogInfo, key)
            return None if row is None else row.value

    def set_info(self, session: Session, key: str, value: str) -> None:
        """Set a setting inside the caller's transaction.

        One upsert on SQLite and PostgreSQL (``INSERT ... ON CONFLICT DO UPDATE``), so two
        processes setting the same new key at once both succeed; a look-up then an insert
        (``Session.merge``) would fail the second on the key. Other databases: ``merge``.
        """
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as upsert
        else:
            session.merge(CatalogInfo(key=key, value=value))
            return
        statement = upsert(CatalogInfo).values(key=key, value=value)
        session.execute(statement.on_conflict_do_update(index_elements=[CatalogInfo.key],
                                                        set_={"value": statement.excluded.value}))

    def writer_lock(self) -> WriterLock:
        """A handle on the catalog's own writer lock (see :class:`WriterLock`)."""
        return WriterLock(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


class WriterLock:
    """The catalog's own lock for its one writer at a time, shared by every machine using it.

    On PostgreSQL, where one catalog serves writers on several machines (whose lock files in
    the collection folder need not see each other), a session advisory lock on a connection
    kept while it is held: never waited for (:meth:`acquire` is False when another session
    holds it), and released by :meth:`release` or when the holder's connection ends (a killed
    process). SQLite is written on one machine, where the collection's lock file is enough:
    :meth:`acquire` is always True. Not re-entrant; the caller counts (``Collection.writing``).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connection: Connection | None = None

    def acquire(self) -> bool:
        if self.engine.dialect.name != "postgresql" or self._connection is not None:
            return True
        try:
            connection = self.engine.connect()
            try:
                held = bool(connection.execute(
                    text("SELECT pg_try_advisory_lock(:key, hashtext(current_schema()))"),
                    {"key": PG_WRITER_LOCK},
                ).scalar())
                connection.commit()  # a session lock outlives the transaction that took it
            except BaseException:
                connection.invalidate()  # ends the session, and any lock it took
                connection.close()
                raise
        except SQLAlchemyError as error:  # e.g. the server went away since the catalog was opened
            raise CatalogError(f"cannot lock the catalog at {self.engine.url.render_as_string(hide_password=True)}"
                               f" for writing: {_one_line(error)}") from error
        if not held:
            connection.close()
            return False
        self._connection = connection
        return True

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key, hashtext(current_schema()))"),
                               {"key": PG_WRITER_LOCK})
            connection.commit()
        except SQLAlchemyError:
            connection.invalidate()  # the session ends, and its lock with it
            logger.debug("catalog writer lock: unlock failed; connection dropped", exc_info=True)
        finally:
            connection.close()


def catalog_url(url_or_path: str | Path) -> str:
    """An SQLAlchemy URL for a URL string or a filesystem path (SQLite)."""
    text = str(url_or_path)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().absolute()}"


def shown_url(url_or_path: str | Path) -> str:
    """A catalog URL as messages show it: its password masked (a path as it is)."""
    text = str(url_or_path)
    if "://" not in text:
        return text
    try:
        return make_url(text).render_as_string(hide_password=True)
    except ArgumentError:
        return text


def json_text(value: Any) -> str:
    """JSON columns' text: as ``json.dumps``, but NaN and infinities (which JSON cannot hold:
    PostgreSQL refuses them, SQLite stores them and then its JSON functions fail on every
    filter) become null, a missing value, as a parquet listing's NaN means."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(entry) for key, entry in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(entry) for entry in value]
    return value


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Foreign keys make a deleted item's embedding rows go with it; WAL lets searches read
    # while a build or re-index writes.
    cursor.execute("PRAGMA foreign_keys=ON")
    _use_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _use_wal(cursor: Any, seconds: float = 30.0) -> None:
    """Switch the database to WAL (a setting stored in the file, so once is enough).

    Switching needs a moment alone with the file and SQLite does not wait for it (the busy
    timeout does not apply): when other processes open the same new catalog at once, retry.
    """
    deadline = time.monotonic() + seconds
    while True:
        mode = cursor.execute("PRAGMA journal_mode").fetchone()
        if mode and str(mode[0]).lower() in ("wal", "memory"):
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def open_catalog(url_or_path: str | Path, *, create: bool = True) -> Catalog:
    """Open (and by default create or upgrade) the catalog at an SQLAlchemy URL or a path.

    Raises FileNotFoundError when ``create`` is false and there is no catalog there,
    :class:`~sce_correct.errors.InputError` when the stored schema is newer than this code or
    the database holds tables that are not an sce catalog, and :class:`CatalogError` (one
    line) when the database itself fails (locked, unreachable, not a database). Creating is
    idempotent: when another process creates the same catalog at the same moment, both end
    up opening the one schema.
    """
    try:
        url = make_url(catalog_url(url_or_path))
    except ArgumentError as error:
        raise InputError(f"not a database URL or path: {str(url_or_path)!r}") from error
    is_sqlite = url.get_backend_name() == "sqlite"
    if is_sqlite and url.database not in (None, "", ":memory:"):
        database = Path(url.database)
        if not create and not database.exists():
            raise FileNotFoundError(f"no catalog at {database}")
        database.parent.mkdir(parents=True, exist_ok=True)
    connect_args: dict[str, Any] = {"timeout": 30} if is_sqlite else {}
    engine_args: dict[str, Any] = {"json_serializer": json_text}
    if not is_sqlite:
        # a server's connections can end under a long-lived process (a restart, a fail-over,
        # an idle timeout): test each one as the pool hands it out, not on the first query
        engine_args["pool_pre_ping"] = True
    if is_sqlite and url.database in (None, "", ":memory:"):
        # One database for every thread (the re-index reads and checkpoints from worker
        # threads); SQLAlchemy's default gives each thread its own, empty, in-memory database.
        connect_args["check_same_thread"] = False
        engine_args["poolclass"] = StaticPool
    try:
        engine = create_engine(url, connect_args=connect_args, **engine_args)
    except (ArgumentError, ImportError) as error:
        raise InputError(f"cannot use catalog URL {url.render_as_string(hide_password=True)}: {error}") from error
    if is_sqlite:
        event.listen(engine, "connect", _configure_sqlite)
    try:
        _prepare_schema(engine, create=create)
    except SQLAlchemyError as error:
        engine.dispose()
        raise CatalogError(
            f"cannot open the catalog at {engine.url.render_as_string(hide_password=True)}: "
            f"{_one_line(error)}"
        ) from error
    except BaseException:
        engine.dispose()
        raise
    return Catalog(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))


def _one_line(error: SQLAlchemyError) -> str:
    """The database's own message, without SQLAlchemy's statement and background lines."""
    original = getattr(error, "orig", None)
    text = str(original if original is not None else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _prepare_schema(engine: Engine, *, create: bool) -> None:
    tables = set(inspect(engine).get_table_names())
    if CatalogInfo.__tablename__ not in tables:
        known = tables & set(Base.metadata.tables)
        if known:
            raise InputError(
                f"{engine.url.render_as_string(hide_password=True)} has catalog tables "
                f"({', '.join(sorted(known))}) but no schema version; it was not written by sce"
            )
        if not create:
            raise FileNotFoundError(
                f"no catalog at {engine.url.render_as_string(hide_password=True)}"
            )
        try:
            if _create_schema(engine):
                logger.info("created catalog schema v%d", SCHEMA_VERSION)
                return
        except SQLAlchemyError:
            # Another process is creating the catalog at the same moment ("table exists",
            # a duplicate key): wait for its schema, then open it. Otherwise raise.
            if not _wait_for_schema(engine):
                raise
            logger.debug("catalog created by another process meanwhile", exc_info=True)
    if set(Base.metadata.tables) <= tables and _stored_version(engine) == SCHEMA_VERSION:
        return  # up to date: opening writes nothing (readers never wait on a writer here)
    with engine.begin() as connection:
        _lock_schema(connection)
        stored = connection.execute(
            select(CatalogInfo.value).where(CatalogInfo.key == "schema_version")
        ).scalar_one_or_none()
        version = int(stored) if stored is not None and stored.isdigit() else 0
        if version > SCHEMA_VERSION:
            raise InputError(
                f"catalog schema version {version} is newer than this sce-retrieval "
                f"supports ({SCHEMA_VERSION}); upgrade sce-retrieval"
            )
        while version < SCHEMA_VERSION:
            migrate = MIGRATIONS.get(version)
            if migrate is None:
                raise InputError(f"no migration from catalog schema version {version}")
            logger.info("migrating catalog schema v%d -> v%d", version, version + 1)
            migrate(connection)
            version += 1
        Base.metadata.create_all(connection)
        connection.execute(
            CatalogInfo.__table__.update()
            .where(CatalogInfo.key == "schema_version")
            .values(value=str(SCHEMA_VERSION))
        )


def _stored_version(engine: Engine) -> int | None:
    """The schema version the catalog records, or None (no catalog_info table or row)."""
    with engine.connect() as connection:
        if CatalogInfo.__tablename__ not in set(inspect(connection).get_table_names()):
            return None
        stored = connection.execute(
            select(CatalogInfo.value).where(CatalogInfo.key == "schema_version")
        ).scalar_one_or_none()
    try:
        return None if stored is None else int(stored)
    except ValueError:
        raise InputError(f"the catalog's schema version {stored!r} is not a number") from None


def _create_schema(engine: Engine) -> bool:
    """Create the tables and the schema version in one transaction; False if another
    process had created them first."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            # pysqlite runs DDL outside a transaction: take the write lock first, so the
            # tables and the version row appear together and concurrent creators queue here
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        _lock_schema(connection)
        Base.metadata.create_all(connection)  # checks first: only missing tables
        stored = connection.execute(
            select(CatalogInfo.value).where(CatalogInfo.key == "schema_version")
        ).scalar_one_or_none()
        if stored is None:
            connection.execute(
                CatalogInfo.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
            )
        connection.commit()
        return stored is None


def _lock_schema(connection: Connection) -> None:
    """On PostgreSQL, make concurrent creators and upgraders of one catalog take turns.

    Its DDL is transactional (the tables and the version row commit together), but two
    transactions creating the same table both try, and the second fails on a duplicate key
    of the system catalogs. A transaction advisory lock taken first queues them instead; the
    one that waited then finds the tables (each statement sees what committed before it).
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))"),
                           {"key": PG_SCHEMA_LOCK})


def _wait_for_schema(engine: Engine, seconds: float = 10.0) -> bool:
    """Whether a schema version appears within ``seconds`` (another process creating it)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if _stored_version(engine) is not None:
                return True
        except SQLAlchemyError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
