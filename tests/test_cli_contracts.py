"""``spendgate contracts`` and ``spendgate approvals`` against a real stack: upload a
contract file (a broken one is refused with exit 1), show it, see a reserve held for
approval in ``approvals list``, approve it (the SDK's ``resume()`` is then granted) and
reject another; without the admin token the command exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spendgate_sdk import ApprovalRejected, ApprovalRequired, SpendgateClient
from tests.harness import Stack
from tests.test_sdk import CONTRACTS, issue_key

pytestmark = pytest.mark.e2e


def spendgate(
    stack: Stack, *argv: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPENDGATE_")}
    env["SPENDGATE_ADMIN_TOKEN"] = stack.admin_token if token is None else token
    return subprocess.run(
        [sys.executable, "-m", "spendgate_cli", *argv, "--gateway-url", stack.gateway_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_contracts_and_approvals_commands(spendgate_stack: Stack, tmp_path: Path) -> None:
    stack = spendgate_stack
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules:\n  - name: bad\n    when: request.amount_usd >\n    decision: stop\n")
    refused = spendgate(stack, "contracts", "upload", str(broken))
    assert refused.returncode == 1, refused
    assert "invalid_contract" in refused.stderr

    source = tmp_path / "contracts.yaml"
    source.write_bytes(CONTRACTS)
    uploaded = spendgate(stack, "contracts", "upload", str(source), "--tenant", "default")
    assert uploaded.returncode == 0, uploaded
    assert "big-calls: require_approval" in uploaded.stdout
    shown = spendgate(stack, "contracts", "show")
    assert shown.returncode == 0, shown
    assert [rule["name"] for rule in json.loads(shown.stdout)["rules"]] == [
        "no-forbidden",
        "big-calls",
        "cheaper-model",
    ]

    key = issue_key(stack, cap_usd="2.00", label="cli-run")
    with SpendgateClient(key, gateway_url=stack.gateway_url) as sg:
        with pytest.raises(ApprovalRequired) as first:
            sg.reserve("0.50", vendor="openai", operation="chat")
        with pytest.raises(ApprovalRequired) as second:
            sg.reserve("0.70", vendor="openai", operation="chat")

        pending = spendgate(stack, "approvals", "list", "--status", "pending")
        assert pending.returncode == 0, pending
        assert first.value.approval_id in pending.stdout
        assert second.value.approval_id in pending.stdout
        assert "0.50" in pending.stdout
        assert "cli-run" in pending.stdout

        approved = spendgate(
            stack, "approvals", "approve", first.value.approval_id, "--by", "alice", "--note", "ok"
        )
        assert approved.returncode == 0, approved
        assert json.loads(approved.stdout)["status"] == "approved"
        assert first.value.resume().amount_micros == 500_000

        rejected = spendgate(stack, "approvals", "reject", second.value.approval_id, "--by", "bob")
        assert rejected.returncode == 0, rejected
        with pytest.raises(ApprovalRejected):
            second.value.resume()

    listed = spendgate(stack, "approvals", "list", "--json")
    statuses = {a["approval_id"]: a["status"] for a in json.loads(listed.stdout)["approvals"]}
    assert statuses[first.value.approval_id] == "used"
    assert statuses[second.value.approval_id] == "rejected"

    unauthorized = spendgate(stack, "contracts", "show", token="")
    assert unauthorized.returncode != 0
    assert "SPENDGATE_ADMIN_TOKEN" in unauthorized.stderr
    wrong = spendgate(stack, "approvals", "list", token="not-the-token")
    assert wrong.returncode == 1
    assert "401" in wrong.stderr
