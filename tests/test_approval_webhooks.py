"""Approval notifications, end to end: a contract asks for an approval, the auditor POSTs
a signed webhook to a real HTTP server on loopback, the test verifies the signature as a
receiver would (docs/contracts.md), approves through the API, and the retried call with
the same idempotency key is forwarded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests import harness
from tests.harness import ServiceFactory

pytestmark = pytest.mark.e2e

SECRET = "whsec_test_0123456789abcdef"
CONTRACTS = b"""\
rules:
  - name: big-charges
    when: request.amount_usd >= 5.0
    decision: require_approval
    message: charges of $5 or more need an operator
"""


class Received:
    def __init__(self) -> None:
        self.requests: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue(maxsize=100)
        self.fail_first = 1  # the first delivery answers 500: the auditor retries


@pytest.fixture
def webhook() -> Iterator[tuple[str, Received]]:
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if received.fail_first > 0:
                received.fail_first -= 1
                self.send_response(500)
            else:
                received.requests.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/spendgate", received
    finally:
        server.shutdown()
        server.server_close()


def verify(signature_header: str, body: bytes) -> bool:
    """What a receiver does: recompute HMAC-SHA256(secret, "<t>." + body), compare."""
    fields = dict(part.split("=", 1) for part in signature_header.split(","))
    expected = hmac.new(
        SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


def test_approval_webhook_then_approve(
    service_factory: ServiceFactory, nats_url: str, database_url: str, webhook: Any
) -> None:
    url, received = webhook
    stack = harness.build_stack(
        service_factory,
        nats_url=nats_url,
        database_url=database_url,
        extra_env={
            "SPENDGATE_APPROVAL_WEBHOOK_URL": url,
            "SPENDGATE_APPROVAL_WEBHOOK_SECRET": SECRET,
        },
    )
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    with httpx.Client(base_url=stack.gateway_url, headers=admin, timeout=10) as client:
        assert client.put("/v1/contracts", content=CONTRACTS).status_code == 200
        key = client.post("/v1/keys", json={"label": "run-7", "cap_usd": 50}).json()["key"]

        def charge() -> httpx.Response:
            return httpx.post(
                f"{stack.gateway_url}/stripe/v1/charges",
                headers={"authorization": f"Bearer {key}", "idempotency-key": "order-7"},
                data={"amount": "800", "currency": "usd", "source": "tok_visa"},
                timeout=30,
            )

        pending = charge()
        assert pending.status_code == 409, pending.text
        approval_id = pending.json()["approval_id"]

        headers, body = received.requests.get(timeout=30)
        assert verify(headers["spendgate-signature"], body)
        assert not verify(headers["spendgate-signature"], body + b" ")
        notification = json.loads(body)
        assert notification["type"] == "approval.requested"
        assert notification["approval_id"] == approval_id
        assert notification["amount_usd"] == "8.00"
        assert notification["contract"] == "big-charges"
        assert notification["label"] == "run-7"

        approved = client.post(f"/v1/approvals/{approval_id}/approve", json={"by": "ops"})
        assert approved.status_code == 200, approved.text
        granted = charge()
        assert granted.status_code == 200, granted.text
    # One notification per approval, even though the first delivery attempt failed.
    assert received.requests.empty()
