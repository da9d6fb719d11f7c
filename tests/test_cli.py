"""The ``spendgate`` command and the service harness, against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import pytest

from spendgate_cli.__main__ import main
from spendgate_cli.processes import free_port, port_is_free
from spendgate_common.ledger_v1 import (
    CommandBatch,
    Failed,
    IssueKey,
    KeyCreated,
    KeyState,
    QueryKey,
    decode_result_batch,
    encode_batch,
)
from spendgate_common.partitioning import partition_for_tenant
from spendgate_common.subjects import ledger_command_subject
from spendgate_common.vault_keys import new_vault_key
from tests.harness import ServiceFactory, ServiceStartError, Stack

SUBCOMMANDS = [
    ["up"],
    ["gateway"],
    ["ledger"],
    ["auditor"],
    ["fake-vendor"],
    ["audit"],
    ["audit", "verify"],
    ["migrate"],
]
PARTITION_COUNT = 8
FAST_LEASE_MS = 1_000


def _spendgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``spendgate`` script (the console entry point, not main())."""
    script = Path(sys.executable).parent / "spendgate"
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def test_spendgate_help_lists_every_command() -> None:
    result = _spendgate("--help")
    assert result.returncode == 0, result.stderr
    for command in ("up", "gateway", "ledger", "auditor", "fake-vendor", "audit", "migrate"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith(f"usage: spendgate {' '.join(command)}")
    description = help_text.split("\n\n")[1]
    assert len(description.split()) >= 2, f"no description in:\n{help_text}"


def test_no_command_prints_usage_and_fails() -> None:
    result = _spendgate()
    assert result.returncode == 2
    assert "usage: spendgate" in result.stderr


def test_migrate_applies_once_then_reports_up_to_date(database_url: str) -> None:
    first = _spendgate("migrate", "--database-url", database_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("applied migrations 1, 2")
    second = _spendgate("migrate", "--database-url", database_url)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("schema is up to date (version ")


def test_migrate_without_a_database_url_names_the_variable() -> None:
    result = _spendgate("migrate", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "SPENDGATE_DATABASE_URL" in result.stderr
    assert "--database-url" in result.stderr


def test_migrate_reports_an_unreachable_database_without_a_traceback() -> None:
    url = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/nowhere"
    result = _spendgate("migrate", "--database-url", url)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "secret" not in result.stderr
    assert "spendgate migrate:" in result.stderr


# -------------------------------------------------------------------------------- ledger


async def _ask_ledger(nats_url: str, command: IssueKey | QueryKey) -> object:
    """Send one command to its partition; the result, or None when nobody answered."""
    partition = partition_for_tenant(command.tenant, PARTITION_COUNT)
    client = await nats.connect(nats_url)
    try:
        reply = await client.request(
            ledger_command_subject(partition),
            encode_batch(CommandBatch(partition, [command])),
            timeout=2,
        )
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    finally:
        await client.close()
    return decode_result_batch(reply.data).results[0]


async def test_ledger_killed_with_sigkill_restarts_and_takes_its_partitions_back(
    service_factory: ServiceFactory, database_url: str, nats_url: str
) -> None:
    env = {
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_NATS_URL": nats_url,
        "SPENDGATE_PARTITION_COUNT": str(PARTITION_COUNT),
        "SPENDGATE_LEDGER_LEASE_MS": str(FAST_LEASE_MS),
    }
    first = service_factory("ledger", env)
    assert f"owns {PARTITION_COUNT} partitions" in first.logs()
    key = new_vault_key("acme")
    issued = await _ask_ledger(
        nats_url,
        IssueKey(
            tenant=key.tenant,
            key_id=key.key_id,
            label="run-1",
            secret_sha256=key.secret_sha256,
            cap_micros=5_000_000,
            window="total",
            timezone="UTC",
            expires_at_ms=int(time.time() * 1000) + 3_600_000,
        ),
    )
    assert isinstance(issued, KeyCreated), issued

    first.kill()
    assert first.returncode == -9

    # The dead replica's leases hold for FAST_LEASE_MS; the new one is ready before that
    # (it owns what is free) and claims the rest on its next lease rounds.
    second = service_factory("ledger", env)
    assert second.pid != first.pid
    query = QueryKey(tenant=key.tenant, key_id=key.key_id)
    deadline = time.monotonic() + 20 * FAST_LEASE_MS / 1000
    state = await _ask_ledger(nats_url, query)
    while not isinstance(state, KeyState) and time.monotonic() < deadline:
        assert state is None or (isinstance(state, Failed) and state.code == "not_owner"), state
        await asyncio.sleep(0.1)
        state = await _ask_ledger(nats_url, query)
    assert isinstance(state, KeyState), f"{state}\n{second.logs()}"
    assert state.cap_micros == 5_000_000

    # Every partition was taken over with a new epoch (fencing the dead owner's).
    logs = second.logs()
    owned = {int(p) for p in re.findall(r"partition (\d+): owned at epoch 2", logs)}
    for _ in range(int(10 * FAST_LEASE_MS / 100)):
        if owned == set(range(PARTITION_COUNT)):
            break
        await asyncio.sleep(0.1)
        logs = second.logs()
        owned = {int(p) for p in re.findall(r"partition (\d+): owned at epoch 2", logs)}
    assert owned == set(range(PARTITION_COUNT)), logs
    assert second.terminate(10.0) == 0, second.logs()


def test_a_service_that_cannot_start_reports_its_log(
    service_factory: ServiceFactory, nats_url: str
) -> None:
    with pytest.raises(ServiceStartError) as raised:
        service_factory("ledger", {"SPENDGATE_NATS_URL": nats_url}, ready_timeout_s=30)
    assert "exited with code" in raised.value.problem
    assert "SPENDGATE_DATABASE_URL" in raised.value.log_tail


def test_stack_fixture_wires_gateway_ledger_auditor_and_fake_stripe(spendgate_stack: Stack) -> None:
    stack = spendgate_stack
    assert set(stack.services) == {"ledger", "auditor", "gateway"}
    assert all(service.is_running for service in stack.services.values())
    assert httpx.get(f"{stack.gateway_url}/healthz", timeout=10).status_code == 200
    issued = httpx.post(
        f"{stack.gateway_url}/v1/keys",
        headers={"Authorization": f"Bearer {stack.admin_token}"},
        json={"label": "wiring", "cap_usd": "1.00"},
        timeout=10,
    )
    assert issued.status_code == 201, issued.text
    assert httpx.get(f"{stack.fake_stripe_url}/_fake/requests", timeout=10).status_code == 200
    assert stack.env["SPENDGATE_STRIPE_BASE_URL"] == stack.fake_stripe_url


# ------------------------------------------------------------------------------------ up


def _run_up(state_dir: Path, port: int, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``spendgate up``; return it and its stdout once it says it is up."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPENDGATE_")}
    out, err = logs / "up.out", logs / "up.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "spendgate"),
                "up",
                "--state-dir",
                str(state_dir),
                "--port",
                str(port),
                "--partitions",
                "4",
            ],
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
    deadline = time.monotonic() + 90
    while "Press Ctrl-C to stop." not in out.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"spendgate up did not come up:\n{err.read_text()}")
        time.sleep(0.1)
    return process, out.read_text()


@pytest.mark.e2e
def test_up_runs_everything_stops_on_ctrl_c_and_keeps_ports_and_token(
    tmp_path: Path, postgres_data_path: Path
) -> None:
    # The state directory holds a Postgres cluster: see postgres_data_path for why it is
    # not under tmp_path.
    state = postgres_data_path / "state"
    port = free_port()
    process, announcement = _run_up(state, port, tmp_path)
    try:
        assert f"gateway      http://127.0.0.1:{port}" in announcement
        token = (state / "admin_token").read_text().strip()
        assert token in announcement
        assert oct((state / "admin_token").stat().st_mode & 0o777) == "0o600"
        issued = httpx.post(
            f"http://127.0.0.1:{port}/v1/keys",
            headers={"Authorization": f"Bearer {token}"},
            json={"label": "up", "daily_usd_cap": "5.00"},
            timeout=10,
        )
        assert issued.status_code == 201, issued.text
        ports = json.loads((state / "ports.json").read_text())
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, (tmp_path / "up.err").read_text()
    progress = (tmp_path / "up.err").read_text()
    assert progress.index("stopping gateway") < progress.index("stopping ledger")
    assert progress.index("stopping ledger") < progress.index("stopping postgres")
    assert progress.index("stopping postgres") < progress.index("stopping nats")
    for busy in (port, ports["nats"], ports["postgres"]):
        assert port_is_free(busy), f"port {busy} still in use after spendgate up exited"

    # A second run finds the same data, ports and token.
    process, announcement = _run_up(state, port, tmp_path)
    try:
        assert json.loads((state / "ports.json").read_text()) == ports
        assert token in announcement
        key_id = issued.json()["key_id"]
        again = httpx.get(
            f"http://127.0.0.1:{port}/v1/keys/{key_id}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert again.status_code == 200, again.text
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, (tmp_path / "up.err").read_text()
