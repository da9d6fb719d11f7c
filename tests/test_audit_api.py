"""The gateway's /v1/audit routes, answered by the auditor over NATS (real processes).

Also: ``spendgate up`` generates the auditor's signing key once, with mode 0600.
"""

from __future__ import annotations

import asyncio
import base64
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from spendgate_auditor._signing import key_id_of, load_private_key, parse_public_key
from spendgate_cli._stack import LocalStack, UpOptions
from tests.harness import Stack

pytestmark = pytest.mark.e2e
DEADLINE_S = 20.0


def admin(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.admin_token}"}


def get(stack: Stack, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{stack.gateway_url}{path}", headers=admin(stack), params=params, timeout=30)


async def test_keys_checkpoints_verify_and_status_through_the_gateway(
    spendgate_stack: Stack,
) -> None:
    stack = spendgate_stack
    assert httpx.get(f"{stack.gateway_url}/v1/audit/keys", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert httpx.get(f"{stack.gateway_url}/v1/audit/verify", headers=wrong).status_code == 401

    response = get(stack, "/v1/audit/keys")
    assert response.status_code == 200, response.text
    [key] = response.json()["keys"]
    assert key["current"] is True
    assert key["algorithm"] == "ed25519"
    raw = base64.b64decode(key["public_key"])
    assert key["key_id"] == key_id_of(raw)
    assert parse_public_key(key["public_key_pem"]) == raw

    # An event to audit: issuing a key appends KeyIssued to the tenant's partition.
    issued = httpx.post(
        f"{stack.gateway_url}/v1/keys",
        headers=admin(stack),
        json={"label": "run-audit", "cap_usd": "1.00"},
        timeout=10,
    )
    assert issued.status_code == 201, issued.text
    deadline = time.monotonic() + DEADLINE_S
    while get(stack, "/v1/audit/status").json()["events_chained"] < 1:
        assert time.monotonic() < deadline, "the auditor chained nothing"
        await asyncio.sleep(0.05)

    signed = httpx.post(f"{stack.gateway_url}/v1/audit/checkpoints", headers=admin(stack))
    assert signed.status_code == 200, signed.text
    [checkpoint] = signed.json()["checkpoints"]
    assert checkpoint["seq"] == 1
    assert checkpoint["key_id"] == key["key_id"]

    verified = get(stack, "/v1/audit/verify")
    assert verified.status_code == 200, verified.text
    body = verified.json()
    assert body["ok"] is True
    [partition] = body["partitions"]
    assert partition["partition"] == checkpoint["partition"]
    assert (partition["verified"], partition["signed_seq"], partition["problem"]) == (1, 1, None)
    one = get(stack, "/v1/audit/verify", partition=checkpoint["partition"], **{"from": 1})
    assert one.status_code == 200
    assert one.json()["ok"] is True
    assert get(stack, "/v1/audit/verify", partition=-1).status_code == 400
    assert get(stack, "/v1/audit/verify", **{"from": "x"}).status_code == 400

    status = get(stack, "/v1/audit/status").json()
    assert status["signing_key_id"] == key["key_id"]
    assert status["stalled_partitions"] == []
    assert status["lag_events"] == 0

    # Without an auditor the routes fail closed with 503, they do not hang.
    await asyncio.to_thread(stack.services["auditor"].terminate, 10.0)
    down = get(stack, "/v1/audit/keys")
    assert down.status_code == 503
    assert down.json()["code"] == "auditor_unavailable"


def test_spendgate_up_generates_the_signing_key_once_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPENDGATE_AUDIT_SIGNING_KEY", raising=False)
    monkeypatch.delenv("SPENDGATE_AUDIT_SIGNING_KEY_FILE", raising=False)
    stack = LocalStack(UpOptions("127.0.0.1", 8080, tmp_path, None))
    stack._state.mkdir(parents=True, exist_ok=True)
    path = stack._audit_signing_key_file()
    assert path == tmp_path.absolute() / "audit_signing_key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    load_private_key(first)
    assert stack._audit_signing_key_file() == path
    assert path.read_bytes() == first  # kept, not regenerated
    monkeypatch.setenv("SPENDGATE_AUDIT_SIGNING_KEY_FILE", "/run/secrets/audit.pem")
    assert stack._audit_signing_key_file() is None  # a configured key is passed through
