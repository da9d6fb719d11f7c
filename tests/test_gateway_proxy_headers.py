"""Which of the agent's headers go upstream, and which of the vendor's come back (pure)."""

from __future__ import annotations

import httpx

from spendgate_gateway._proxy import _forwarded_headers, _response_headers

_AUTH = [(b"authorization", b"Bearer sk_live_real")]


def test_hop_by_hop_routing_and_credential_headers_stay_behind() -> None:
    received = [
        (b"host", b"gateway:8080"),
        (b"authorization", b"Bearer sgk_t_k_secret"),
        (b"x-api-key", b"sgk_t_k_secret"),
        (b"content-type", b"application/json"),
        (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"content-length", b"12"),
        (b"accept-encoding", b"br"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"forwarded", b"for=10.0.0.1"),
        (b"idempotency-key", b"abc"),
        (b"stripe-version", b"2024-06-20"),
        (b"stripe-version", b"again"),
    ]
    assert _forwarded_headers(received, _AUTH) == [
        (b"content-type", b"application/json"),
        (b"idempotency-key", b"abc"),
        (b"stripe-version", b"2024-06-20"),
        (b"stripe-version", b"again"),
        (b"authorization", b"Bearer sk_live_real"),
    ]


def test_headers_the_connection_header_lists_stay_behind() -> None:
    received = [
        (b"connection", b"X-Internal-Route, keep-alive"),
        (b"x-internal-route", b"blue"),
        (b"connection", b" x-trace-hop "),
        (b"x-trace-hop", b"1"),
        (b"x-kept", b"yes"),
    ]
    assert _forwarded_headers(received, _AUTH) == [(b"x-kept", b"yes"), *_AUTH]


def test_the_vendors_framing_and_server_headers_are_not_relayed() -> None:
    upstream = httpx.Response(
        200,
        headers=[
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"2"),
            (b"Content-Encoding", b"gzip"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Connection", b"keep-alive"),
            (b"Server", b"nginx"),
            (b"Date", b"Mon, 07 Dec 2026 10:00:00 GMT"),
            (b"Request-Id", b"req_1"),
        ],
    )
    assert _response_headers(upstream) == [
        (b"Content-Type", b"application/json"),
        (b"Request-Id", b"req_1"),
    ]
