"""Shared fixtures: real Postgres, real NATS and real service processes, on free ports.

Servers (never the machine's own Postgres on 5432 or NATS on 4222):

* Postgres: one embedded server for the session (``durable=False``; about 0.5 s to create
  and start), or the server of ``SPENDGATE_TEST_DATABASE_URL`` when that is set. Every
  test that asks for ``database_url`` gets its own empty database on it.
* NATS: one embedded server per test (about 20 ms), or ``SPENDGATE_TEST_NATS_URL`` when
  that is set, with the ``SPENDGATE_EVENTS`` stream deleted before each test.

Processes: everything started through :mod:`tests.harness` during a test is stopped at its
teardown, before the test's database is dropped and its NATS stopped; when the test
failed, the tail of each process's log is printed (pytest shows it with the failure).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import pytest
from nats.js.errors import NotFoundError

from spendgate_cli.embedded import EmbeddedNats, EmbeddedPostgres
from spendgate_common.settings import Env
from spendgate_common.subjects import EVENTS_STREAM
from tests import harness
from tests.harness import ServiceFactory, Stack

# Bound of the administrative connections the fixtures open (create / drop database).
ADMIN_CONNECT_TIMEOUT_S = 10.0
# DROP DATABASE waits for nothing (WITH FORCE), but a wedged server must not hang teardown.
ADMIN_COMMAND_TIMEOUT_S = 30.0

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember on the item whether its setup or call failed (for the log dump below)."""
    report = yield
    if report.when in ("setup", "call") and report.failed:
        item.stash[_FAILED] = True
    return report


# ----------------------------------------------------------------------------- processes


@pytest.fixture(scope="session", autouse=True)
def _service_log_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    harness.configure_log_dir(tmp_path_factory.mktemp("service-logs"))


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stop every harness process at teardown; on failure, show the tail of their logs."""
    yield
    if request.node.stash.get(_FAILED, False):
        for process in harness.started_processes():
            print(
                f"\n--- {process.name} (pid {process.pid}, exit {process.returncode}),"
                f" {process.log_path} ---\n{process.log_tail()}",
                file=sys.stderr,
            )
    harness.stop_processes()
    harness.forget_processes()


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Starts service processes (``service_factory("ledger", env)``), logging to tmp_path.

    Everything it started is stopped at teardown (SIGTERM, then SIGKILL after 15 s).
    """
    factory = ServiceFactory(tmp_path / "logs")
    yield factory
    factory.close()


# ------------------------------------------------------------------------------ Postgres


@pytest.fixture(scope="session")
def _postgres_data_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="spendgate-test-postgres-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_data_path(_postgres_data_root: Path) -> Path:
    """A new directory for a Postgres data directory, outside pytest's tmp_path.

    When the tests run as root, Postgres runs as the user ``pgserver``, which must be able
    to reach its data directory whenever it (re)starts. pytest's tmp_path does not allow
    that reliably: every pytest session that starts on the machine resets
    ``/tmp/pytest-of-<user>`` to mode 0700. Removed at the end of the session.
    """
    return Path(tempfile.mkdtemp(dir=_postgres_data_root))


@pytest.fixture(scope="session")
def _postgres_server(
    tmp_path_factory: pytest.TempPathFactory, _postgres_data_root: Path
) -> Iterator[EmbeddedPostgres | None]:
    if Env().optional_url("SPENDGATE_TEST_DATABASE_URL") is not None:
        yield None
        return
    # Data outside pytest's tmp directory (see postgres_data_path), the log inside it.
    server = EmbeddedPostgres(
        _postgres_data_root / "session",
        durable=False,
        log_path=tmp_path_factory.mktemp("postgres") / "postgres.log",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def embedded_postgres(_postgres_server: EmbeddedPostgres | None) -> Iterator[EmbeddedPostgres]:
    """The session's embedded Postgres, for tests that stop, kill or restart it.

    Skips the test when ``SPENDGATE_TEST_DATABASE_URL`` points at an external server. The
    server is shared by the session: when the test leaves it stopped, it is started again.
    """
    if _postgres_server is None:
        pytest.skip("Postgres is external (SPENDGATE_TEST_DATABASE_URL)")
    yield _postgres_server
    if not _postgres_server.is_running:
        _postgres_server.start()


def _admin_url(server: EmbeddedPostgres | None) -> str:
    if server is None:
        return Env().url("SPENDGATE_TEST_DATABASE_URL")
    return server.url("postgres")


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def _admin_execute(server: EmbeddedPostgres | None, sql: str) -> None:
    connection = await asyncpg.connect(
        _admin_url(server),
        timeout=ADMIN_CONNECT_TIMEOUT_S,
        command_timeout=ADMIN_COMMAND_TIMEOUT_S,
    )
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture
async def database_url(_postgres_server: EmbeddedPostgres | None) -> AsyncIterator[str]:
    """URL of a new, empty database (no migrations applied: services apply them).

    Dropped after the test (best effort, ``WITH (FORCE)``), once the processes the test
    started are stopped.
    """
    name = f"test_{secrets.token_hex(6)}"
    await _admin_execute(_postgres_server, f'CREATE DATABASE "{name}"')
    yield _with_database(_admin_url(_postgres_server), name)
    harness.stop_processes()
    if _postgres_server is not None and not _postgres_server.is_running:
        _postgres_server.start()
    with contextlib.suppress(Exception):
        await _admin_execute(_postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------------------- NATS


@pytest.fixture
def _nats_server(tmp_path: Path) -> Iterator[EmbeddedNats | None]:
    if Env().optional_url("SPENDGATE_TEST_NATS_URL") is not None:
        yield None
        return
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        # The test's services first: a service whose NATS vanished waits out its drain.
        harness.stop_processes()
        server.stop()


@pytest.fixture
def embedded_nats(_nats_server: EmbeddedNats | None) -> EmbeddedNats:
    """This test's embedded NATS (the one behind ``nats_url``), to kill or restart it.

    It keeps its port and data across :meth:`~EmbeddedNats.restart`, so ``nats_url`` stays
    valid. Skips the test when ``SPENDGATE_TEST_NATS_URL`` points at an external server.
    """
    if _nats_server is None:
        pytest.skip("NATS is external (SPENDGATE_TEST_NATS_URL)")
    return _nats_server


@pytest.fixture
async def nats_url(_nats_server: EmbeddedNats | None) -> str:
    """URL of a NATS server with JetStream that no other test is using right now.

    A fresh embedded server per test; with ``SPENDGATE_TEST_NATS_URL``, that server with
    the ``SPENDGATE_EVENTS`` stream (and so its consumers) deleted first.
    """
    if _nats_server is not None:
        return _nats_server.url
    url = Env().url("SPENDGATE_TEST_NATS_URL")
    client = await nats.connect(url, connect_timeout=ADMIN_CONNECT_TIMEOUT_S)
    try:
        with contextlib.suppress(NotFoundError):
            await client.jetstream().delete_stream(EVENTS_STREAM)
    finally:
        await client.close()
    return url


# --------------------------------------------------------------------------------- stack


@pytest.fixture
def spendgate_stack(service_factory: ServiceFactory, nats_url: str, database_url: str) -> Stack:
    """Fake Stripe, ledger, auditor and gateway processes wired together (8 partitions).

    The gateway forwards Stripe calls to the fake with ``sk_test_fake_upstream_key``; the
    admin token is random. See :class:`tests.harness.Stack` for the fields.
    """
    return harness.build_stack(service_factory, nats_url=nats_url, database_url=database_url)
