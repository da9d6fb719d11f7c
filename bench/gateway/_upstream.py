"""The benchmark's upstream: a minimal HTTP/1.1 server that answers like Stripe's charges.

``python -m bench.gateway._upstream --port N`` serves, on 127.0.0.1, every
``POST /v1/charges`` (and ``/v1/payment_intents``) with ``200`` and a small charge object,
on keep-alive connections, from an ``asyncio.Protocol`` without a framework: it costs a
few tens of microseconds per call, so that the *direct* runs measure the load generator
and the loopback, not a slow fake, and the upstream takes little CPU away from the
gateway on a small machine. (The Stripe fake of ``spendgate fake-vendor stripe`` is a
Starlette app under uvicorn: it costs several times more per call and remembers every
object it created, so it would be both the bottleneck and a growing baseline.)

It checks what a real vendor would: the ``Authorization: Bearer sk_...`` header (401
otherwise, so a vault key leaking through would show up as failures). It counts the calls
per API key; ``GET /_bench/counts`` answers ``{"<api key>": calls, ...}``, which lets the
orchestrator compare what reached the vendor with what the ledger committed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence

import msgspec

# Largest request head or body the server accepts; a larger one closes the connection.
REQUEST_HEAD_BYTES_MAX = 16_384
REQUEST_BODY_BYTES_MAX = 1_048_576
# Pending connections the listening socket queues (a burst of new client connections).
LISTEN_BACKLOG = 1_024
READY_MESSAGE = "bench upstream listening"

# Path -> (object kind, id prefix), as Stripe names them.
_CREATE_PATHS = {
    b"/v1/charges": ("charge", "ch"),
    b"/v1/payment_intents": ("payment_intent", "pi"),
}
_UNAUTHORIZED = msgspec.json.encode(
    {"error": {"type": "invalid_request_error", "code": "api_key_invalid", "message": "bad key"}}
)
_NOT_FOUND = msgspec.json.encode(
    {"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "no route"}}
)


class _Charge(msgspec.Struct):
    id: str
    object: str
    amount: int
    currency: str
    status: str
    created: int
    livemode: bool


_encoder = msgspec.json.Encoder()


class _Upstream:
    """State shared by every connection: object ids and calls per API key."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.calls: Counter[str] = Counter()

    def answer(self, method: bytes, target: bytes, headers: dict[bytes, bytes]) -> bytes:
        path = target.partition(b"?")[0]
        if method == b"GET" and path == b"/_bench/counts":
            return _response(200, _encoder.encode(dict(self.calls)))
        created = _CREATE_PATHS.get(path)
        if method != b"POST" or created is None:
            return _response(404, _NOT_FOUND)
        scheme, _, api_key = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not api_key.startswith(b"sk_"):
            return _response(401, _UNAUTHORIZED)
        self.calls[api_key.decode("latin-1")] += 1
        kind, prefix = created
        # The body is not parsed: the gateway already checked it, and the benchmark always
        # sends the same amount. An id per object keeps answers distinct, as Stripe's are.
        charge = _Charge(
            id=f"{prefix}_{next(self.ids):024x}",
            object=kind,
            amount=1,
            currency="usd",
            status="succeeded",
            created=int(time.time()),
            livemode=False,
        )
        return _response(200, _encoder.encode(charge))


def _response(status: int, body: bytes) -> bytes:
    reason = {200: b"OK", 401: b"Unauthorized", 404: b"Not Found"}[status]
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"request-id: req_bench\r\n\r\n%s" % (status, reason, len(body), body)
    )


class _Connection(asyncio.Protocol):
    """One client connection: parse requests as they arrive, answer each in order."""

    def __init__(self, upstream: _Upstream) -> None:
        self._upstream = upstream
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._answer_one():
            pass

    def _answer_one(self) -> bool:
        """Answer the first complete request in the buffer; False when there is none."""
        transport = self._transport
        assert transport is not None
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(self._buffer) > REQUEST_HEAD_BYTES_MAX:
                transport.close()
            return False
        request_line, *header_lines = bytes(self._buffer[:head_end]).split(b"\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        try:
            method, target, _version = request_line.split(b" ", 2)
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            transport.close()
            return False
        if length > REQUEST_BODY_BYTES_MAX:
            transport.close()
            return False
        request_end = head_end + 4 + length
        if len(self._buffer) < request_end:
            return False
        del self._buffer[:request_end]
        transport.write(self._upstream.answer(method, target, headers))
        if headers.get(b"connection", b"").lower() == b"close":
            transport.close()
            return False
        return True


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    upstream = _Upstream()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Connection(upstream), host, port, backlog=LISTEN_BACKLOG, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"{READY_MESSAGE} on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway._upstream",
        description="The gateway benchmark's minimal Stripe-like upstream (see the module).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
