"""What the OpenAI and Anthropic look-alikes share: recording, test controls, made-up replies.

Tests steer a fake with request headers (the gateway passes them through unchanged):

* ``x-fake-status: N`` answers N with the vendor's error body, generating nothing;
* ``x-fake-output-tokens: N`` sets the reply's length in tokens (default 12; the
  request's output limit cuts it short, as the real APIs do);
* ``x-fake-cached-tokens: N`` reports N input tokens as read from the prompt cache
  (``x-fake-cache-write-tokens: N``: as written to it; Anthropic only);
* ``x-fake-chunk-delay-ms: N`` pauses between streamed events;
* ``x-fake-break-after-events: N`` cuts the connection after N streamed events;
* ``x-fake-stall-after-events: N`` stops sending after N events but keeps the connection.

Token counts are made up but deterministic: a reply token is one word, and the input
counts a quarter of the text's UTF-8 bytes (rounded up) plus 4 per message.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

import msgspec
from starlette.requests import Request
from starlette.responses import Response

# Most requests remembered for inspection; older ones are dropped.
RECORDED_REQUESTS_MAX = 10_000
OUTPUT_TOKENS_DEFAULT = 12
# A stalled stream sends nothing for this long (the gateway's read timeout ends it first).
STALL_SECONDS = 600
INPUT_FIELDS = ("messages", "system", "input", "instructions")
_REPLY_WORDS = [
    "Spendgate",
    "fake",
    "reply:",
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "the",
    "budget",
    "holds",
    "and",
    "every",
    "token",
    "is",
    "counted",
    "before",
    "it",
    "is",
    "spent",
]


@dataclass(frozen=True, slots=True)
class Controls:
    status: int | None
    output_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    chunk_delay_s: float
    break_after_events: int | None
    stall_after_events: int | None

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> Controls:
        def number(name: str) -> int | None:
            value = headers.get(name)
            return int(value) if value is not None and value.isdigit() else None

        return cls(
            status=number("x-fake-status"),
            output_tokens=number("x-fake-output-tokens") or OUTPUT_TOKENS_DEFAULT,
            cached_tokens=number("x-fake-cached-tokens") or 0,
            cache_write_tokens=number("x-fake-cache-write-tokens") or 0,
            chunk_delay_s=(number("x-fake-chunk-delay-ms") or 0) / 1000,
            break_after_events=number("x-fake-break-after-events"),
            stall_after_events=number("x-fake-stall-after-events"),
        )


@dataclass(slots=True)
class Recorder:
    """What the fake received, for ``GET /_fake/requests`` (newest last, bounded)."""

    requests: list[dict[str, object]] = field(default_factory=list)

    async def record(self, request: Request, header_names: Iterable[str]) -> dict[str, object]:
        raw = await request.body()
        try:
            body: object = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            body = raw.decode("utf-8", "replace")
        entry: dict[str, object] = {
            "method": request.method,
            "path": request.url.path,
            "headers": {name: request.headers.get(name) for name in header_names},
            "body": body,
        }
        self.requests.append(entry)
        del self.requests[:-RECORDED_REQUESTS_MAX]
        return entry

    async def list_requests(self, _: Request) -> Response:
        return json_response(200, {"requests": self.requests})

    async def clear_requests(self, _: Request) -> Response:
        self.requests.clear()
        return json_response(200, {"cleared": True})


def json_response(status: int, body: object) -> Response:
    return Response(msgspec.json.encode(body), status, media_type="application/json")


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def input_tokens(body: Mapping[str, object]) -> int:
    """The made-up input count: a quarter of the text bytes, plus 4 per message."""
    text_bytes = 0
    messages = 0
    stack: list[object] = [body.get(name) for name in INPUT_FIELDS]
    for name in ("messages", "input"):
        value = body.get(name)
        messages += len(value) if isinstance(value, list) else 0
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            text_bytes += len(value.encode("utf-8"))
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return -(-text_bytes // 4) + 4 * max(messages, 1)


def reply_words(tokens_wanted: int, limit: int | None) -> tuple[list[str], bool]:
    """The reply, one token per word, and whether the limit cut it short."""
    count = tokens_wanted if limit is None else min(tokens_wanted, limit)
    words = [_REPLY_WORDS[i % len(_REPLY_WORDS)] for i in range(count)]
    pieces = [word + " " for word in words[:-1]] + words[-1:]
    return pieces, count < tokens_wanted


def output_limit(body: Mapping[str, object], names: Iterable[str]) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    payload = data if isinstance(data, bytes) else msgspec.json.encode(data)
    return head + b"data: " + payload + b"\n\n"


class StreamBrokenError(Exception):
    """Raised inside a streamed answer to cut the connection (x-fake-break-after-events)."""


async def paced(
    events: Iterable[bytes], controls: Controls, entry: dict[str, object]
) -> AsyncIterator[bytes]:
    """Send ``events`` as the controls say; record how the stream ended in ``entry``."""
    entry["stream"] = "started"
    sent = 0
    try:
        for event in events:
            if controls.break_after_events is not None and sent >= controls.break_after_events:
                entry["stream"] = "broken"
                raise StreamBrokenError("x-fake-break-after-events")
            if controls.stall_after_events is not None and sent >= controls.stall_after_events:
                entry["stream"] = "stalled"
                await asyncio.sleep(STALL_SECONDS)
            if controls.chunk_delay_s and sent:
                await asyncio.sleep(controls.chunk_delay_s)
            yield event
            sent += 1
        entry["stream"] = "complete"
    finally:
        entry["events_sent"] = sent
        if entry["stream"] in ("started", "stalled"):
            # The reader went away (the gateway closed the upstream stream) first.
            entry["stream"] = "abandoned"
