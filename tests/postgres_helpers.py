"""A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries, a temp folder, loopback.

    with postgres_server() as server:
        url = server.create_database("feedback")

The server listens on 127.0.0.1 on a free port, with its Unix socket inside its data folder,
and password authentication (so URLs carry a password, as in production). PostgreSQL refuses
to run as root: under root, the cluster belongs to the `postgres` system user (Debian's package
creates it) and every server command runs through `runuser`. The server is stopped and its
folder removed when the block ends.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "toolkit"


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: Debian's newest, else the PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _server_user() -> str | None:
    """Who runs the server: this user, or `postgres` when this is root (None: nobody can)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server: `url(database)` names a database on it."""

    port: int
    password: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a server for the block (skips the test where PostgreSQL or psycopg is missing)."""
    pytest.importorskip("psycopg", reason="pip install 'toolkit[postgres]'")
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL not found; apt-get install postgresql (setup.sh --tests does)")
    owner = _server_user()
    if owner is None:
        pytest.skip("running as root without a `postgres` user to own the test cluster")
    as_owner = ["runuser", "-u", owner, "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="toolkit-pg-"))
    data, password = root / "data", secrets.token_hex(12)
    (root / "pwfile").write_text(password + "\n")
    entry = pwd.getpwnam(owner)
    for path in (root, root / "pwfile"):
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def run(*args: str) -> None:
        subprocess.run([*as_owner, *args], cwd=root, check=True, capture_output=True, timeout=120)

    port = _free_port()
    started = False
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
            f"--pwfile={root / 'pwfile'}", "--no-sync", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c max_connections=50"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options,
            "-w", "-t", "60", "start")
        started = True
        yield PostgresServer(port, password)
    except subprocess.CalledProcessError as exc:
        log = root / "server.log"
        raise RuntimeError(f"{exc.cmd[len(as_owner)]} failed: {exc.stderr.decode()[-2000:]}"
                           f"{log.read_text()[-2000:] if log.exists() else ''}") from None
    finally:
        if started:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
