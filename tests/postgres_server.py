"""A throwaway PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` in a temporary folder.

The server listens only on a Unix socket in that folder (no TCP port, so parallel runs on one
machine cannot collide) and trusts local connections. It runs with durability switched off
(``fsync``, ``synchronous_commit``, ``full_page_writes``): the tests need its concurrency and
SQL, not its crash safety. ``initdb`` refuses to run as root, so as root the server runs as the
``postgres`` system user (Debian's package creates it); otherwise as the current user.

:func:`find_unavailable_reason` says why no server can be had (no binaries, no driver, no user
to run it as), so the fixtures can skip with a message saying how to get one.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

HOW_TO_GET_IT = "apt-get install postgresql; pip install 'sce-retrieval[postgres]'"
#: The unprivileged account a root test run starts the server as.
SERVER_USER = "postgres"
#: The superuser initdb creates (trust authentication over the socket: no password).
DB_USER = "sce"


def binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest version."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    folders = [Path(initdb).parent for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    folders = [folder for folder in folders if (folder / "pg_ctl").exists() and folder.parent.name.isdigit()]
    return max(folders, key=lambda folder: int(folder.parent.name), default=None)


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None for the current (unprivileged) user."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam(SERVER_USER)


def find_unavailable_reason() -> str | None:
    """Why a test server cannot be started here, or None when it can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return f"the PostgreSQL driver psycopg is not installed ({HOW_TO_GET_IT})"
    if binaries() is None:
        return f"no PostgreSQL server binaries (initdb, pg_ctl) found ({HOW_TO_GET_IT})"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return (f"running as root and there is no {SERVER_USER!r} user to run the server as "
                    f"(initdb refuses root; {HOW_TO_GET_IT} creates one)")
    return None


class PostgresServer:
    """One server for a test session; :meth:`new_database` gives each test its own database."""

    def __init__(self) -> None:
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError(find_unavailable_reason() or "no PostgreSQL binaries")
        self.user = _server_user()
        # Short and in /tmp: a Unix socket path must stay under ~107 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="sce-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.databases: list[str] = []
        self._admin = None

    def _run(self, *args: str) -> None:
        kwargs = {}
        if self.user is not None:  # as root: drop to the server's account (Python does the setuid)
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        result = subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True, text=True,
                                cwd=self.folder, timeout=120, **kwargs)
        if result.returncode:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
                               + (f"\n{self.log.read_text()[-2000:]}" if self.log.exists() else ""))

    def start(self) -> PostgresServer:
        if self.user is not None:
            os.chown(self.folder, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", DB_USER, "--auth=trust", "--no-sync",
                  "--no-locale", "-E", "UTF8", "--no-instructions")
        options = " ".join([
            "-c listen_addresses=''", f"-c unix_socket_directories={self.folder}", "-c port=5432",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c max_connections=200", "-c shared_buffers=32MB",
        ])
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", options)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{DB_USER}@/{database}?host={self.folder}&port=5432"

    def _execute(self, statement: str) -> None:
        import psycopg

        if self._admin is None or self._admin.closed:
            self._admin = psycopg.connect(host=str(self.folder), port=5432, user=DB_USER,
                                          dbname="postgres", autocommit=True)
        self._admin.execute(statement)

    def new_database(self) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self._execute(f"CREATE DATABASE {name} TEMPLATE template0")
        self.databases.append(name)
        return self.url(name)

    def drop_databases(self) -> None:
        """Drop the databases made so far (FORCE ends connections a test left open)."""
        while self.databases:
            self._execute(f"DROP DATABASE IF EXISTS {self.databases.pop()} WITH (FORCE)")

    def stop(self) -> None:
        """Stop the server (if it runs) and remove its folder."""
        try:
            if self._admin is not None:
                self._admin.close()
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
