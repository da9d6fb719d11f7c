"""An OpenAI look-alike: chat completions, responses and embeddings, streamed or not.

Behaviour that tests rely on (besides the controls in ``_llm.py``):
* a key must look like an OpenAI key (``Bearer sk-...``); anything else (a vault key
  leaking through) is refused with 401 ``invalid_api_key``, as OpenAI would;
* every answer carries ``usage``; a chat stream carries the usage-only last chunk (and
  ``"usage":null`` on every other chunk) only with ``stream_options.include_usage``, a
  responses stream carries it in ``response.completed``, as the real API does;
* JSON answers are gzip-compressed when the client accepts it, as OpenAI's are (event
  streams are not);
* ``GET /_fake/requests`` lists what was received, each with the ``usage`` answered and,
  for streams, how the stream ended (``complete``, ``abandoned``, ``broken``);
  ``DELETE /_fake/requests`` clears it.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Iterator, Mapping

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
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

RECORDED_HEADERS = (
    "authorization",
    "content-type",
    "accept-encoding",
    "idempotency-key",
    "openai-organization",
)
EMBEDDING_DIMENSIONS = 8
# Answers at least this long are compressed (every chat completion is).
GZIP_BYTES_MIN = 200
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 429: "requests"}


def _error(status: int, code: str, message: str) -> Response:
    error_type = _ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return json_response(
        status, {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    )


def _usage(prompt: int, completion: int, cached: int, *, responses: bool) -> dict[str, object]:
    cached = min(cached, prompt)
    if responses:
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def create_openai_app() -> Starlette:
    recorder = Recorder()

    async def handle(request: Request) -> Response:
        entry = await recorder.record(request, RECORDED_HEADERS)
        if not request.headers.get("authorization", "").startswith("Bearer sk-"):
            return _error(401, "invalid_api_key", "Incorrect API key provided.")
        controls = Controls.of(request.headers)
        if controls.status is not None:
            return _error(controls.status, "fake_error", "Forced by x-fake-status.")
        body = entry["body"]
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "invalid_request_body", "We could not parse the JSON body.")
        if request.url.path.endswith("/embeddings"):
            return _embeddings(body, controls, entry)
        if request.url.path.endswith("/responses"):
            return _responses(body, controls, entry)
        return _chat(body, controls, entry)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", handle, methods=["POST"]),
            Route("/v1/responses", handle, methods=["POST"]),
            Route("/v1/embeddings", handle, methods=["POST"]),
            Route("/_fake/requests", recorder.list_requests, methods=["GET"]),
            Route("/_fake/requests", recorder.clear_requests, methods=["DELETE"]),
        ],
        middleware=[Middleware(GZipMiddleware, minimum_size=GZIP_BYTES_MIN)],
    )


# -------------------------------------------------------------------------------- chat


def _chat(body: Mapping[str, object], controls: Controls, entry: dict[str, object]) -> Response:
    limit = output_limit(body, ("max_completion_tokens", "max_tokens"))
    pieces, cut = reply_words(controls.output_tokens, limit)
    usage = _usage(input_tokens(body), len(pieces), controls.cached_tokens, responses=False)
    entry["usage"] = usage
    finish_reason = "length" if cut else "stop"
    head = {
        "id": new_id("chatcmpl-"),
        "created": int(time.time()),
        "model": body["model"],
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }
    if body.get("stream") is not True:
        message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        answer = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        return json_response(200, answer)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    events = _chat_events(head, pieces, finish_reason, usage if include_usage else None)
    return StreamingResponse(paced(events, controls, entry), media_type="text/event-stream")


def _chat_events(
    head: Mapping[str, object],
    pieces: list[str],
    finish_reason: str,
    usage: Mapping[str, object] | None,
) -> Iterator[bytes]:
    def chunk(delta: Mapping[str, object], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        data: dict[str, object] = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        if usage is not None:
            data["usage"] = None
        return sse(data)

    yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
    for piece in pieces:
        yield chunk({"content": piece}, None)
    yield chunk({}, finish_reason)
    if usage is not None:
        yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    yield sse(b"[DONE]")


# ---------------------------------------------------------------------------- responses


def _responses(
    body: Mapping[str, object], controls: Controls, entry: dict[str, object]
) -> Response:
    pieces, cut = reply_words(controls.output_tokens, output_limit(body, ("max_output_tokens",)))
    usage = _usage(input_tokens(body), len(pieces), controls.cached_tokens, responses=True)
    entry["usage"] = usage
    text = "".join(pieces)
    message_id = new_id("msg_")
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {
        "type": "message",
        "id": message_id,
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    response: dict[str, object] = {
        "id": new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "error": None,
        "model": body["model"],
        "output": [item],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "max_output_tokens": body.get("max_output_tokens"),
        "usage": usage,
    }
    if body.get("stream") is not True:
        return json_response(200, response)
    events = _response_events(response, item, part, pieces)
    return StreamingResponse(paced(events, controls, entry), media_type="text/event-stream")


def _response_events(
    response: Mapping[str, object],
    item: Mapping[str, object],
    part: Mapping[str, object],
    pieces: list[str],
) -> Iterator[bytes]:
    sequence = iter(range(1_000_000))

    def event(kind: str, **fields: object) -> bytes:
        return sse({"type": kind, "sequence_number": next(sequence), **fields}, event=kind)

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    item_id = item["id"]
    yield event("response.output_item.added", output_index=0, item={**item, "content": []})
    empty = {**part, "text": ""}
    yield event(
        "response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=empty
    )
    for piece in pieces:
        yield event(
            "response.output_text.delta",
            item_id=item_id,
            output_index=0,
            content_index=0,
            delta=piece,
        )
    text = part["text"]
    yield event(
        "response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text
    )
    yield event(
        "response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=part
    )
    yield event("response.output_item.done", output_index=0, item=item)
    final = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    yield event(final, response=response)


# --------------------------------------------------------------------------- embeddings


def _embeddings(
    body: Mapping[str, object], controls: Controls, entry: dict[str, object]
) -> Response:
    value = body.get("input")
    inputs = (
        value if isinstance(value, list) and value and not isinstance(value[0], int) else [value]
    )
    prompt = sum(
        len(item) if isinstance(item, list) else -(-len(str(item).encode()) // 4) for item in inputs
    )
    usage = {"prompt_tokens": prompt, "total_tokens": prompt}
    entry["usage"] = usage
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, _ in enumerate(inputs):
        vector = [round(0.1 * (index + 1) * (d + 1), 3) for d in range(EMBEDDING_DIMENSIONS)]
        packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        embedding: object = packed if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return json_response(
        200, {"object": "list", "data": data, "model": body["model"], "usage": usage}
    )
