"""``spendgate up``: real NATS, real Postgres and the three services on this machine.

Everything lives in one state directory, so a second ``spendgate up`` finds the same
data, ports and admin token::

    STATE/nats/              JetStream data
    STATE/postgres/          the Postgres cluster (durable: fsync on)
    STATE/logs/<name>.log    one log per server and service, appended across runs
    STATE/ports.json         NATS and Postgres ports, reused so URLs stay stable
    STATE/admin_token        generated admin token (mode 0600), unless one is configured
    STATE/audit_signing_key.pem  the auditor's Ed25519 checkpoint signing key (mode 0600,
                             generated on first start), unless one is configured
    STATE/partition_count    the partition count the database was created with
    STATE/database_url       the Postgres URL of this run (for ``spendgate audit verify``)
    STATE/up.lock            locked while ``spendgate up`` runs on this directory

Start order is NATS, Postgres, ledger, auditor, gateway; stop order is the reverse of
what depends on what (see :data:`SERVICE_STOP_ORDER`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TextIO

from spendgate_cli.embedded import EmbeddedNats, EmbeddedPostgres
from spendgate_cli.processes import free_port, log_tail, port_is_free
from spendgate_cli.services import (
    ServiceKind,
    ServiceProcess,
    gateway_url,
    readiness_probe,
    service_argv,
)
from spendgate_common.errors import SpendgateError
from spendgate_common.limits import PARTITION_COUNT_MAX
from spendgate_common.settings import CommonSettings, Env

DATABASE_NAME = "spendgate"
SERVICE_START_ORDER: tuple[ServiceKind, ...] = ("ledger", "auditor", "gateway")
# The gateway stops taking calls first; the ledger then finishes its queued batches and
# publishes what committed; the auditor stops last so it can consume those final events.
SERVICE_STOP_ORDER: tuple[ServiceKind, ...] = ("gateway", "ledger", "auditor")
# A first start applies migrations and claims every partition; a laptop does it in ~1 s.
SERVICE_READY_DEADLINE = timedelta(seconds=60)
# Longer than the services' own default SPENDGATE_SHUTDOWN_DEADLINE_SECONDS (20 s), so a
# service's bounded graceful shutdown normally ends before we resort to SIGKILL.
SERVICE_STOP_DEADLINE = timedelta(seconds=25)
SUPERVISE_POLL_INTERVAL = timedelta(milliseconds=200)
# Entropy of a generated admin token (secrets.token_urlsafe), in bytes.
ADMIN_TOKEN_BYTES = 32


@dataclass(frozen=True, slots=True)
class UpOptions:
    host: str
    port: int
    state_dir: Path
    # None: the recorded count, else SPENDGATE_PARTITION_COUNT, else the default.
    partition_count: int | None


class _StopRequested(BaseException):
    """Raised in the main thread by our SIGINT/SIGTERM handler, like KeyboardInterrupt.

    A BaseException, so that no ``except Exception`` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class UpError(SpendgateError):
    """``spendgate up`` cannot proceed; the message says why and what to do."""


class LocalStack:
    """Runs the whole stack in the foreground until SIGINT/SIGTERM or a service dies."""

    def __init__(
        self, options: UpOptions, *, out: TextIO = sys.stdout, progress: TextIO = sys.stderr
    ) -> None:
        self._options = options
        self._state = options.state_dir.absolute()
        self._out = out
        self._progress = progress
        self._nats: EmbeddedNats | None = None
        self._postgres: EmbeddedPostgres | None = None
        self._services: dict[ServiceKind, ServiceProcess] = {}
        self._admin_token_value = ""
        # Where the token is saved; None when it came from SPENDGATE_ADMIN_TOKEN.
        self._admin_token_path: Path | None = None
        self._gateway_url = ""
        # Set once shutdown begins; later signals are ignored because shutdown is bounded
        # and must not be abandoned half-way.
        self._stopping = False
        # True while a progress line ("starting NATS... ") waits for its outcome.
        self._step_open = False

    def run(self) -> int:
        """Start, supervise, stop. Returns the exit code: 0 after a signal, 1 on failure."""
        self._state.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(self._state / "up.lock"):
            previous = {
                signum: signal.signal(signum, self._on_signal)
                for signum in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                self._start_all()
                self._announce()
                failure = self._supervise()
                self._stopping = True
                self._fail(f"spendgate up: {failure}")
                code = 1
            except _StopRequested as stop:
                name = signal.Signals(stop.signum).name
                self._fail(f"received {name}, stopping", outcome="interrupted")
                code = 0
            except SpendgateError as error:
                self._stopping = True
                self._fail(f"spendgate up: {error}")
                code = 1
            finally:
                self._stopping = True
                self._stop_all()
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            self._stopping = True
            raise _StopRequested(signum)

    # ------------------------------------------------------------------------- start

    def _start_all(self) -> None:
        options = self._options
        if not port_is_free(options.port, options.host):
            raise UpError(
                f"cannot serve on {options.host}:{options.port}: the port is in use"
                " (choose another with --port)"
            )
        partition_count = self._partition_count()
        admin_token = self._admin_token()
        ports = self._ports()
        logs = self._state / "logs"

        self._step("starting NATS")
        self._nats = EmbeddedNats(self._state / "nats", ports["nats"], log_path=logs / "nats.log")
        self._nats.start()
        self._done(f"ok ({self._nats.url})")

        self._step("starting Postgres")
        self._postgres = EmbeddedPostgres(
            self._state / "postgres", ports["postgres"], log_path=logs / "postgres.log"
        )
        self._postgres.start()
        created = self._postgres.create_database(DATABASE_NAME)
        # For `spendgate audit verify` and psql: SPENDGATE_DATABASE_URL=$(cat STATE/database_url)
        (self._state / "database_url").write_text(self._postgres.url(DATABASE_NAME) + "\n")
        note = ", database created" if created else ""
        self._done(f"ok ({self._postgres.url(DATABASE_NAME)}{note})")

        env = dict(os.environ)
        env.update(
            {
                "SPENDGATE_NATS_URL": self._nats.url,
                "SPENDGATE_DATABASE_URL": self._postgres.url(DATABASE_NAME),
                "SPENDGATE_ADMIN_TOKEN": admin_token,
                "SPENDGATE_GATEWAY_HOST": options.host,
                "SPENDGATE_GATEWAY_PORT": str(options.port),
                "SPENDGATE_PARTITION_COUNT": str(partition_count),
                # Log lines reach the files as they are written, not when a buffer fills.
                "PYTHONUNBUFFERED": "1",
            }
        )
        signing_key_file = self._audit_signing_key_file()
        if signing_key_file is not None:
            env["SPENDGATE_AUDIT_SIGNING_KEY_FILE"] = str(signing_key_file)
        self._admin_token_value = admin_token
        for kind in SERVICE_START_ORDER:
            self._step(f"starting {kind}")
            service = ServiceProcess.spawn(kind, service_argv(kind), env, logs / f"{kind}.log")
            self._services[kind] = service
            service.wait_ready(readiness_probe(kind, env, service), SERVICE_READY_DEADLINE)
            self._done(f"ok (pid {service.pid})")
        self._gateway_url = gateway_url(env)

    def _partition_count(self) -> int:
        """The partition count, fixed for the life of the database (it routes tenants)."""
        record = self._state / "partition_count"
        try:
            recorded = int(record.read_text().strip()) if record.exists() else None
        except ValueError:
            raise UpError(f"{record} should hold the partition count; fix it") from None
        requested = self._options.partition_count
        env = Env()
        if requested is None and env.optional_text("SPENDGATE_PARTITION_COUNT") is not None:
            # The default is never used: the variable is set. The bounds are the services'.
            requested = env.integer(
                "SPENDGATE_PARTITION_COUNT", 1, minimum=1, maximum=PARTITION_COUNT_MAX
            )
        if recorded is not None and requested is not None and requested != recorded:
            raise UpError(
                f"{self._state} was created with {recorded} partitions; changing the count"
                f" would move tenants between partitions. Use --partitions {recorded},"
                " or a new --state-dir."
            )
        count = requested or recorded or CommonSettings.from_env(Env({})).partition_count
        assert 1 <= count <= PARTITION_COUNT_MAX
        if recorded is None:
            record.write_text(f"{count}\n")
        return count

    def _admin_token(self) -> str:
        """SPENDGATE_ADMIN_TOKEN when set, else the token saved in the state directory."""
        configured = Env().optional_text("SPENDGATE_ADMIN_TOKEN")
        if configured is not None:
            return configured
        path = self._state / "admin_token"
        self._admin_token_path = path
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(ADMIN_TOKEN_BYTES)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(token + "\n")
        return token

    def _audit_signing_key_file(self) -> Path | None:
        """The auditor's signing key file in the state directory, generated on first use;
        None when SPENDGATE_AUDIT_SIGNING_KEY(_FILE) is configured (passed through)."""
        env = Env()
        if (
            env.optional_text("SPENDGATE_AUDIT_SIGNING_KEY") is not None
            or env.optional_text("SPENDGATE_AUDIT_SIGNING_KEY_FILE") is not None
        ):
            return None
        from spendgate_auditor import new_private_key_pem

        path = self._state / "audit_signing_key.pem"
        if not path.exists():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(new_private_key_pem())
        return path

    def _ports(self) -> dict[str, int]:
        """The NATS and Postgres ports of the last run when still free, else new ones."""
        path = self._state / "ports.json"
        try:
            remembered = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            remembered = {}
        ports: dict[str, int] = {}
        for name in ("nats", "postgres"):
            port = remembered.get(name) if isinstance(remembered, dict) else None
            if isinstance(port, int) and 0 < port < 65_536 and port_is_free(port):
                ports[name] = port
                continue
            ports[name] = free_port()
            if port is not None:
                self._say(f"note: {name} port {port} is in use; using {ports[name]} instead")
        path.write_text(json.dumps(ports, indent=2) + "\n")
        return ports

    def _announce(self) -> None:
        options = self._options
        url = self._gateway_url
        token = self._admin_token_value
        logs = self._state / "logs"
        token_origin = (
            "from SPENDGATE_ADMIN_TOKEN"
            if self._admin_token_path is None
            else f"saved in {self._admin_token_path}"
        )
        assert self._nats is not None
        assert self._postgres is not None
        example = (
            f"curl -s -X POST {url}/v1/keys -H 'Authorization: Bearer {token}'"
            " -H 'Content-Type: application/json'"
            ' -d \'{"label": "my-first-run", "daily_usd_cap": "5.00"}\''
        )
        lines = [
            "",
            f"Spendgate is up (state in {options.state_dir}).",
            f"  gateway      {url}",
            f"  admin token  {token}  ({token_origin})",
            f"  logs         {logs}/{{ledger,auditor,gateway,nats,postgres}}.log",
            f"  NATS         {self._nats.url}",
            f"  Postgres     {self._postgres.url(DATABASE_NAME)}",
            "Issue a vault key with a $5 daily cap:",
            f"  {example}",
            "Press Ctrl-C to stop.",
        ]
        print("\n".join(lines), file=self._out, flush=True)

    # --------------------------------------------------------------------- supervise

    def _supervise(self) -> str:
        """Wait until something exits on its own; describe it (a signal raises instead)."""
        while True:
            for kind, service in self._services.items():
                if not service.is_running:
                    return (
                        f"{kind} exited unexpectedly with code {service.returncode}\n"
                        f"--- last lines of {service.log_path} ---\n{service.log_tail()}"
                    )
            for server in (self._nats, self._postgres):
                if server is not None and not server.is_running:
                    return (
                        f"{server.name} exited unexpectedly\n"
                        f"--- last lines of {server.log_path} ---\n{log_tail(server.log_path)}"
                    )
            time.sleep(SUPERVISE_POLL_INTERVAL.total_seconds())

    # -------------------------------------------------------------------------- stop

    def _stop_all(self) -> None:
        for kind in SERVICE_STOP_ORDER:
            service = self._services.pop(kind, None)
            if service is None:
                continue
            self._step(f"stopping {kind}")
            code = service.terminate(SERVICE_STOP_DEADLINE.total_seconds())
            self._done(f"exit code {code}")
        for server in (self._postgres, self._nats):
            if server is not None and server.is_running:
                self._step(f"stopping {server.name}")
                server_code = server.stop()
                self._done(f"exit code {server_code}")
        self._postgres = self._nats = None

    # ------------------------------------------------------------------------ output

    def _step(self, text: str) -> None:
        print(f"{text}... ", end="", file=self._progress, flush=True)
        self._step_open = True

    def _done(self, text: str) -> None:
        print(text, file=self._progress, flush=True)
        self._step_open = False

    def _say(self, text: str) -> None:
        print(text, file=self._progress, flush=True)

    def _fail(self, text: str, *, outcome: str = "failed") -> None:
        """Close an open progress line with ``outcome``, then say ``text``."""
        if self._step_open:
            self._done(outcome)
        self._say(text)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock on ``path``, or fail at once if another process holds it."""
    with path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpError(
                f"another 'spendgate up' is running with state directory {path.parent}"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
