"""The embedded servers are real: they start, serve, keep data across restarts and crashes."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StreamConfig

from spendgate_cli.embedded import (
    POSTGRES_SYSTEM_USER,
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServerError,
)
from spendgate_cli.processes import free_port

# ---------------------------------------------------------------------------------- NATS


async def _publish(url: str, subject: str, payload: bytes) -> None:
    client = await nats.connect(url)
    try:
        jetstream = client.jetstream()
        await jetstream.add_stream(StreamConfig(name="EMBEDDED_TEST", subjects=["embedded.>"]))
        await jetstream.publish(subject, payload)
    finally:
        await client.close()


async def _stored_messages(url: str) -> int:
    client = await nats.connect(url)
    try:
        info = await client.jetstream().stream_info("EMBEDDED_TEST")
        count: int = info.state.messages
        return count
    finally:
        await client.close()


async def test_nats_serves_jetstream_and_keeps_it_across_restart_and_kill(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats")
    started = time.monotonic()
    server.start()
    try:
        start_s = time.monotonic() - started
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert server.pid is not None
        await _publish(server.url, "embedded.one", b"first")

        server.restart()
        assert await _stored_messages(server.url) == 1

        server.kill()
        assert not server.is_running
        server.start()
        assert await _stored_messages(server.url) == 1
    finally:
        assert server.stop() == 0
    assert server.stop() is None, "stopping a stopped server is a no-op"
    assert start_s < 5, f"NATS took {start_s:.2f} s to start"
    assert "Server is ready" in (tmp_path / "nats.log").read_text()


def test_nats_on_a_busy_port_fails_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = EmbeddedNats(tmp_path / "nats", squatter.getsockname()[1])
        with pytest.raises(EmbeddedServerError) as raised:
            server.start()
    assert "exited with code" in raised.value.problem
    assert "address already in use" in raised.value.log_tail
    assert not server.is_running


async def test_nats_fixture_restart_keeps_the_url(
    embedded_nats: EmbeddedNats, nats_url: str
) -> None:
    await _publish(nats_url, "embedded.fixture", b"x")
    embedded_nats.kill()
    embedded_nats.start()
    assert embedded_nats.url == nats_url
    assert await _stored_messages(nats_url) == 1


# ------------------------------------------------------------------------------ Postgres


async def _rows(url: str) -> list[int]:
    connection = await asyncpg.connect(url)
    try:
        return [row["n"] for row in await connection.fetch("SELECT n FROM kept ORDER BY n")]
    finally:
        await connection.close()


async def _insert(url: str, value: int) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("CREATE TABLE IF NOT EXISTS kept (n integer)")
        await connection.execute("INSERT INTO kept VALUES ($1)", value)
    finally:
        await connection.close()


async def test_postgres_keeps_committed_rows_across_restart_and_kill(
    tmp_path: Path, postgres_data_path: Path
) -> None:
    log_path = tmp_path / "postgres.log"
    server = EmbeddedPostgres(postgres_data_path / "data", durable=True, log_path=log_path)
    started = time.monotonic()
    server.start()
    try:
        first_start_s = time.monotonic() - started
        assert server.url() == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        assert server.create_database("kept") is True
        assert server.create_database("kept") is False
        url = server.url("kept")
        await _insert(url, 1)

        server.restart()
        await _insert(url, 2)
        assert await _rows(url) == [1, 2]

        # A crash with a client connected: its backend dies with the postmaster's group,
        # and the next start recovers from the WAL despite the stale postmaster.pid.
        connection = await asyncpg.connect(url)
        await connection.execute("INSERT INTO kept VALUES (3)")
        server.kill()
        assert (postgres_data_path / "data" / "postmaster.pid").exists()
        server.start()
        assert await _rows(url) == [1, 2, 3]
        connection.terminate()
    finally:
        assert server.stop() == 0
    assert first_start_s < 20, f"initdb + first start took {first_start_s:.2f} s"
    assert "database system is ready" in log_path.read_text()


async def test_postgres_starts_when_the_dead_postmasters_pid_was_reused(
    tmp_path: Path, postgres_data_path: Path
) -> None:
    server = EmbeddedPostgres(
        postgres_data_path / "data", durable=False, log_path=tmp_path / "postgres.log"
    )
    server.start()
    server.kill()
    # In a container the dead postmaster's pid is soon someone else's. When that process
    # belongs to the same user, Postgres alone would refuse to start ("Is another
    # postmaster running?"); a process of another user it already treats as stale.
    same_user = POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None
    with subprocess.Popen(["sleep", "60"], user=same_user) as unrelated:
        lock_file = postgres_data_path / "data" / "postmaster.pid"
        lines = lock_file.read_text().splitlines()
        lock_file.write_text("\n".join([str(unrelated.pid), *lines[1:]]) + "\n")
        try:
            server.start()
            assert server.is_running
        finally:
            server.stop()
            unrelated.kill()


def test_postgres_on_a_busy_port_fails_with_its_log(
    tmp_path: Path, postgres_data_path: Path
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = EmbeddedPostgres(
            postgres_data_path / "data",
            squatter.getsockname()[1],
            durable=False,
            log_path=tmp_path / "postgres.log",
        )
        with pytest.raises(EmbeddedServerError) as raised:
            server.start()
    assert "exited with code" in raised.value.problem
    assert "could not" in raised.value.log_tail
    assert not server.is_running


def test_postgres_refuses_a_database_name_that_is_not_plain(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "postgres", free_port())
    with pytest.raises(ValueError, match="plain database name"):
        server.create_database('x"; DROP DATABASE postgres; --')


async def test_session_postgres_restart_keeps_the_test_database(
    embedded_postgres: EmbeddedPostgres, database_url: str
) -> None:
    await _insert(database_url, 7)
    embedded_postgres.kill()
    embedded_postgres.start()
    assert await _rows(database_url) == [7]


async def test_each_test_gets_an_empty_database(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        tables = await connection.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        name = await connection.fetchval("SELECT current_database()")
    finally:
        await connection.close()
    assert tables == 0
    assert name.startswith("test_")
