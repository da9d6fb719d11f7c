"""An Anthropic look-alike: the Messages API, streamed or not.

Behaviour that tests rely on (besides the controls in ``_llm.py``):
* a key must look like an Anthropic key (``x-api-key: sk-ant-...``); anything else (a
  vault key leaking through) is refused with 401 ``authentication_error``; a request
  without ``anthropic-version`` or ``max_tokens`` is refused with 400, as Anthropic would;
* every answer carries ``usage``; a stream carries the input usage in ``message_start``
  and the output usage in ``message_delta``, as the real API does;
* ``GET /_fake/requests`` lists what was received, each with the ``usage`` answered and,
  for streams, how the stream ended (``complete``, ``abandoned``, ``broken``);
  ``DELETE /_fake/requests`` clears it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from spendgate_cli.fake_vendors._llm import (
    Controls,
    Recorder,
    input_tokens,
    json_response,
    new_id,
    output_limit,
    paced,
    reply_words,
    sse,
)

RECORDED_HEADERS = ("x-api-key", "authorization", "anthropic-version", "anthropic-beta")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _error(status: int, message: str) -> Response:
    error_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": new_id("req_"),
    }
    return json_response(status, body)


def create_anthropic_app() -> Starlette:
    recorder = Recorder()

    async def messages(request: Request) -> Response:
        entry = await recorder.record(request, RECORDED_HEADERS)
        if not request.headers.get("x-api-key", "").startswith("sk-ant-"):
            return _error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required")
        controls = Controls.of(request.headers)
        if controls.status is not None:
            return _error(controls.status, "Forced by x-fake-status.")
        body = entry["body"]
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "model: Field required")
        if output_limit(body, ("max_tokens",)) is None:
            return _error(400, "max_tokens: Field required")
        return _message(body, controls, entry)

    return Starlette(
        routes=[
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/_fake/requests", recorder.list_requests, methods=["GET"]),
            Route("/_fake/requests", recorder.clear_requests, methods=["DELETE"]),
        ]
    )


def _message(body: Mapping[str, object], controls: Controls, entry: dict[str, object]) -> Response:
    pieces, cut = reply_words(controls.output_tokens, output_limit(body, ("max_tokens",)))
    usage = {
        "input_tokens": input_tokens(body),
        "cache_creation_input_tokens": controls.cache_write_tokens,
        "cache_read_input_tokens": controls.cached_tokens,
        "output_tokens": len(pieces),
    }
    entry["usage"] = usage
    message: dict[str, object] = {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": "max_tokens" if cut else "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }
    if body.get("stream") is not True:
        return json_response(200, message)
    events = _message_events(message, pieces, usage)
    return StreamingResponse(paced(events, controls, entry), media_type="text/event-stream")


def _message_events(
    message: Mapping[str, object], pieces: list[str], usage: Mapping[str, object]
) -> Iterator[bytes]:
    def event(kind: str, **fields: object) -> bytes:
        return sse({"type": kind, **fields}, event=kind)

    start_usage = {**usage, "output_tokens": 1}
    started = {**message, "content": [], "stop_reason": None, "usage": start_usage}
    yield event("message_start", message=started)
    yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    yield event("ping")
    for piece in pieces:
        yield event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
    yield event("content_block_stop", index=0)
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    yield event("message_delta", delta=delta, usage={"output_tokens": usage["output_tokens"]})
    yield event("message_stop")
