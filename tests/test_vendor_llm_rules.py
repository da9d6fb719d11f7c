"""Pure tests of the OpenAI and Anthropic estimators, settle rules and stream meters.

No processes: these are the pure cores (STYLE.md rule 9). The streams below are written
out in the vendors' real wire formats, not produced by our fakes.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest

from spendgate_common.errors import InvalidAmountError, InvalidRequestError
from spendgate_gateway.vendors import (
    VENDORS,
    Call,
    Estimate,
    Outcome,
    Settlement,
    UnpricedCallError,
)
from spendgate_gateway.vendors import anthropic as anthropic_vendor
from spendgate_gateway.vendors import openai as openai_vendor
from spendgate_gateway.vendors._fixed import FixedCost, FreeCall
from spendgate_gateway.vendors._sse import EventSplitter, EventTooLargeError, event_name_and_data
from spendgate_gateway.vendors._tokens import cost_micros, micros_per_million_tokens

OPENAI = VENDORS["openai"]
ANTHROPIC = VENDORS["anthropic"]


def openai_estimate(body: dict[str, Any], path: str = "v1/chat/completions") -> Estimate:
    return OPENAI.estimate(Call("POST", path, "", {}, json.dumps(body).encode()))


def anthropic_estimate(body: dict[str, Any], headers: dict[str, str] | None = None) -> Estimate:
    return ANTHROPIC.estimate(
        Call("POST", "v1/messages", "", headers or {}, json.dumps(body).encode())
    )


def refused(estimate: Any, *args: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as raised:
        estimate(*args)
    return raised.value


def feed_in_pieces(meter: Any, stream: bytes, piece_bytes: int) -> bytes:
    out = b""
    for start in range(0, len(stream), piece_bytes):
        out += meter.feed(stream[start : start + piece_bytes])
    return out


# ---------------------------------------------------------------------------------- money


def test_cost_rounds_up_once_over_the_sum() -> None:
    # 3 tokens at $0.15 and 1 at $0.075 per million: 0.525 micro, rounded up once to 1.
    assert cost_micros((3, 150_000), (1, 75_000)) == 1
    assert cost_micros((1_000_000, 2_500_000)) == 2_500_000
    assert cost_micros((0, 2_500_000)) == 0
    assert cost_micros((1, 1)) == 1


def test_prices_are_parsed_exactly() -> None:
    assert micros_per_million_tokens("0.075", field_name="p") == 75_000
    assert micros_per_million_tokens("18.75", field_name="p") == 18_750_000
    with pytest.raises(InvalidAmountError):
        micros_per_million_tokens("0.0000001", field_name="p")


def test_price_files_carry_a_version_and_the_listed_models() -> None:
    assert openai_vendor.PRICES.version.startswith("openai-")
    assert anthropic_vendor.PRICES.version.startswith("anthropic-")
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3-mini"):
        assert openai_vendor.PRICES.model(model) is not None
    for model in ("text-embedding-3-small", "text-embedding-3-large"):
        prices = openai_vendor.PRICES.model(model)
        assert prices is not None
        assert prices.kind == "embedding"
    gpt_4o = openai_vendor.PRICES.model("gpt-4o")
    assert gpt_4o is not None
    assert (gpt_4o.input, gpt_4o.cached_input, gpt_4o.output) == (2_500_000, 1_250_000, 10_000_000)
    assert openai_vendor.PRICES.model("gpt-4o-2024-08-06") is gpt_4o
    haiku = anthropic_vendor.PRICES.model("claude-3-5-haiku-latest")
    assert haiku is not None
    assert (haiku.input, haiku.output, haiku.cache_write_5m, haiku.cache_read) == (
        800_000,
        4_000_000,
        1_000_000,
        80_000,
    )


# ------------------------------------------------------------------------------------ sse


def test_events_are_split_at_blank_lines_across_any_chunking() -> None:
    stream = b"event: a\ndata: 1\n\ndata: 2\r\n\r\ndata: 3\n\ndata: partial"
    for piece_bytes in range(1, len(stream) + 1):
        splitter = EventSplitter()
        events: list[bytes] = []
        for start in range(0, len(stream), piece_bytes):
            events += splitter.push(stream[start : start + piece_bytes])
        assert events == [b"event: a\ndata: 1\n\n", b"data: 2\r\n\r\n", b"data: 3\n\n"]
        assert splitter.take_pending() == b"data: partial"


def test_event_fields() -> None:
    assert event_name_and_data(b"event: message_start\ndata: {}\n\n") == ("message_start", b"{}")
    assert event_name_and_data(b"data:a\r\ndata: b\r\n\r\n") == ("", b"a\nb")
    assert event_name_and_data(b": comment\n\n") == ("", b"")


def test_an_endless_event_is_refused() -> None:
    splitter = EventSplitter(event_bytes_max=10)
    with pytest.raises(EventTooLargeError):
        splitter.push(b"data: 0123456789")


# ------------------------------------------------------------------------ openai estimate


def test_openai_chat_estimate_is_text_bytes_plus_overhead_plus_output_limit() -> None:
    estimate = openai_estimate(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    )
    # Strings: model messages max_tokens role content gpt-4o user hi = 46 bytes; one
    # number; 32 overhead: 79 input tokens at $2.50/M plus 10 output at $10/M = 297.5.
    assert estimate.amount_micros == 298
    assert estimate.operation == "POST /v1/chat/completions gpt-4o"
    assert estimate.pricing_version == openai_vendor.PRICES.version
    assert estimate.upstream_body is None


def test_openai_output_defaults_to_the_models_limit_and_counts_every_choice() -> None:
    messages = [{"role": "user", "content": "hi"}]
    unlimited = openai_estimate({"model": "gpt-4o", "messages": messages})
    limited = openai_estimate({"model": "gpt-4o", "messages": messages, "max_tokens": 1})
    # gpt-4o writes at most 16,384 tokens: the difference is 16,383 output tokens at $10/M
    # (plus the one number "max_tokens": 1 adds to the input bound).
    assert unlimited.amount_micros - limited.amount_micros == pytest.approx(163_830 - 28, abs=2)
    three = openai_estimate({"model": "gpt-4o", "messages": messages, "max_tokens": 100, "n": 3})
    one = openai_estimate({"model": "gpt-4o", "messages": messages, "max_tokens": 100, "n": 1})
    assert three.amount_micros - one.amount_micros == 2_000  # 200 more output tokens
    both = openai_estimate(
        {"model": "gpt-4o", "messages": messages, "max_tokens": 5, "max_completion_tokens": 500}
    )
    assert (
        both.amount_micros
        > openai_estimate(
            {"model": "gpt-4o", "messages": messages, "max_completion_tokens": 500}
        ).amount_micros
    )


def test_openai_images_count_at_the_models_largest_image_not_by_their_bytes() -> None:
    def with_image(data_bytes: int) -> int:
        part = {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + "A" * data_bytes},
        }
        body = {
            "model": "gpt-4o",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": [part]}],
        }
        return openai_estimate(body).amount_micros

    assert with_image(10) == with_image(500_000)
    no_image = openai_estimate(
        {"model": "gpt-4o", "max_tokens": 1, "messages": [{"role": "user", "content": []}]}
    ).amount_micros
    # 1,445 tokens (gpt-4o's largest image) at $2.50/M, give or take the part's keys.
    assert 1_445 * 2.5 - 1 <= with_image(10) - no_image <= 1_445 * 2.5 + 10


def test_openai_content_stored_at_openai_is_bounded_by_the_context_window() -> None:
    window = 128_000 * 2.5 + 100 * 10  # gpt-4o: input window at $2.50/M + 100 output at $10/M
    file_part = {"type": "file", "file": {"file_id": "file-abc"}}
    chat = openai_estimate(
        {
            "model": "gpt-4o",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": [file_part]}],
        }
    )
    chained = openai_estimate(
        {"model": "gpt-4o", "max_output_tokens": 100, "input": "hi", "previous_response_id": "r"},
        path="v1/responses",
    )
    assert chat.amount_micros == chained.amount_micros == window
    # Text can never count for more than the window either.
    huge = openai_estimate(
        {"model": "gpt-4o", "max_output_tokens": 100, "input": "x" * 900_000}, "v1/responses"
    )
    assert huge.amount_micros == window


def test_openai_rejected_prediction_tokens_count_as_output() -> None:
    messages = [{"role": "user", "content": "hi"}]
    prediction = {"type": "content", "content": "y" * 1_000}
    plain = openai_estimate({"model": "gpt-4o", "messages": messages, "max_tokens": 10})
    predicted = openai_estimate(
        {"model": "gpt-4o", "messages": messages, "max_tokens": 10, "prediction": prediction}
    )
    # ~1,000 bytes more input at $2.50/M and at least 1,000 more output tokens at $10/M.
    assert predicted.amount_micros - plain.amount_micros >= 1_000 * 2.5 + 1_000 * 10


def test_openai_embeddings_are_bounded_per_input() -> None:
    small = openai_estimate(
        {"model": "text-embedding-3-small", "input": ["a" * 1_000_000, "b" * 10]}, "v1/embeddings"
    )
    # Each input is at most 8,192 tokens: 8,192 + 10 tokens at $0.02/M.
    assert small.amount_micros == cost_micros((8_202, 20_000))
    ids = openai_estimate(
        {"model": "text-embedding-3-small", "input": [[1, 2, 3], [4]]}, "v1/embeddings"
    )
    assert ids.amount_micros == 1
    assert refused(
        openai_estimate, {"model": "text-embedding-3-small", "input": 5}, "v1/embeddings"
    ).code == ("invalid_parameter")


@pytest.mark.parametrize(
    ("body", "path", "code", "status"),
    [
        ({"messages": []}, "v1/chat/completions", "missing_model", 400),
        ({"model": "gpt-9", "messages": []}, "v1/chat/completions", "unknown_model", 400),
        (
            {"model": "text-embedding-3-small", "messages": []},
            "v1/chat/completions",
            "unknown_model",
            400,
        ),
        ({"model": "gpt-4o", "input": "x"}, "v1/embeddings", "unknown_model", 400),
        ({"model": "gpt-4o", "max_tokens": 0}, "v1/chat/completions", "invalid_parameter", 400),
        ({"model": "gpt-4o", "max_tokens": True}, "v1/chat/completions", "invalid_parameter", 400),
        ({"model": "gpt-4o", "max_tokens": 10**9}, "v1/chat/completions", "invalid_parameter", 400),
        ({"model": "gpt-4o", "n": 129}, "v1/chat/completions", "invalid_parameter", 400),
        (
            {"model": "gpt-4o", "stream": True, "stream_options": 1},
            "v1/chat/completions",
            "invalid_parameter",
            400,
        ),
        (
            {"model": "gpt-4o", "tools": [{"type": "web_search_preview"}]},
            "v1/responses",
            "unpriced_feature",
            403,
        ),
        ({"model": "gpt-4o", "tools": [{"type": "mcp"}]}, "v1/responses", "unpriced_feature", 403),
        (
            {"model": "gpt-4o", "web_search_options": {}},
            "v1/chat/completions",
            "unpriced_feature",
            403,
        ),
        (
            {"model": "gpt-4o", "service_tier": "priority"},
            "v1/chat/completions",
            "unpriced_feature",
            403,
        ),
    ],
)
def test_openai_refusals(body: dict[str, Any], path: str, code: str, status: int) -> None:
    error = refused(openai_estimate, body, path)
    assert (error.code, error.status) == (code, status)


def test_openai_malformed_and_unpriced_calls() -> None:
    assert (
        refused(OPENAI.estimate, Call("POST", "v1/chat/completions", "", {}, b"{")).code
        == "malformed_json"
    )
    assert (
        refused(OPENAI.estimate, Call("POST", "v1/chat/completions", "", {}, b"[]")).code
        == "malformed_json"
    )
    with pytest.raises(UnpricedCallError):
        OPENAI.estimate(Call("GET", "v1/models", "", {}, b""))


def test_openai_function_tools_are_priced() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"model": "gpt-4o", "max_tokens": 1, "messages": [], "tools": [tool]}
    assert (
        openai_estimate(body).amount_micros > openai_estimate({**body, "tools": []}).amount_micros
    )


def test_openai_chat_stream_asks_upstream_for_usage_unless_the_caller_did() -> None:
    body = {"model": "gpt-4o", "messages": [], "stream": True, "stream_options": {"x": 1}}
    estimate = openai_estimate(body)
    assert estimate.upstream_body is not None
    sent = json.loads(estimate.upstream_body)
    assert sent["stream_options"] == {"x": 1, "include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        k: v for k, v in body.items() if k != "stream_options"
    }
    asked = openai_estimate({**body, "stream_options": {"include_usage": True}})
    assert asked.upstream_body is None
    assert openai_estimate({"model": "gpt-4o", "messages": []}).upstream_body is None
    # Responses streams always carry usage: nothing to add.
    assert (
        openai_estimate(
            {"model": "gpt-4o", "input": "x", "stream": True}, "v1/responses"
        ).upstream_body
        is None
    )


# -------------------------------------------------------------------------- openai settle


def test_openai_settle_from_usage_with_cached_tokens() -> None:
    estimate = openai_estimate({"model": "gpt-4o", "messages": [], "max_tokens": 100})
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 50,
        "prompt_tokens_details": {"cached_tokens": 400},
    }
    settled = OPENAI.settle(200, json.dumps({"usage": usage}).encode(), estimate)
    # 600 at $2.50/M + 400 at $1.25/M + 50 at $10/M = 1500 + 500 + 500.
    assert settled.outcome is Outcome.SPENT
    assert settled.actual_micros == 2_500
    responses = {
        "input_tokens": 1000,
        "output_tokens": 50,
        "input_tokens_details": {"cached_tokens": 0},
    }
    assert (
        OPENAI.settle(200, json.dumps({"usage": responses}).encode(), estimate).actual_micros
        == 3_000
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"usage": null}',
        b'{"usage": {"prompt_tokens": -1}}',
        b'{"usage": {"completion_tokens": 5}}',
    ],
)
def test_openai_success_without_believable_usage_settles_at_the_estimate(body: bytes) -> None:
    estimate = openai_estimate({"model": "gpt-4o", "messages": [], "max_tokens": 100})
    settled = OPENAI.settle(200, body, estimate)
    assert (settled.outcome, settled.actual_micros) == (Outcome.SPENT, estimate.amount_micros)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (400, Outcome.FREE),
        (401, Outcome.FREE),
        (404, Outcome.FREE),
        (409, Outcome.FREE),
        (429, Outcome.FREE),
        (408, Outcome.UNKNOWN),
        (500, Outcome.UNKNOWN),
        (503, Outcome.UNKNOWN),
        (302, Outcome.UNKNOWN),
    ],
)
def test_openai_failures(status: int, outcome: Outcome) -> None:
    estimate = openai_estimate({"model": "gpt-4o", "messages": [], "max_tokens": 100})
    assert OPENAI.settle(status, b'{"error": {}}', estimate).outcome is outcome


def test_openai_error_shape_and_refusal_headers() -> None:
    assert OPENAI.error_object("cap_exhausted", "m", 429) == {
        "message": "m",
        "type": "insufficient_quota",
        "param": None,
        "code": "cap_exhausted",
    }
    assert OPENAI.error_object("ledger_unavailable", "m", 503)["type"] == "server_error"
    assert OPENAI.refusal_headers() == {"x-should-retry": "false"}
    assert OPENAI.presented_key({"authorization": "Bearer sgk_a_b_c"}) == "sgk_a_b_c"
    assert OPENAI.presented_key({"authorization": "Basic abc"}) is None


# -------------------------------------------------------------------------- openai streams

_HEAD = (
    '"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    '"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_1"'
)
_CHUNKS = [
    '"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    '"logprobs":null,"finish_reason":null}]',
    # Text that looks like the member we remove must survive (it is escaped in JSON).
    '"choices":[{"index":0,"delta":{"content":"He said \\"usage\\":null, twice"},'
    '"logprobs":null,"finish_reason":null}]',
    '"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]',
]
_USAGE_CHUNK = (
    '"choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,'
    '"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0}}'
)


def chat_stream(*, include_usage: bool) -> bytes:
    member = ',"usage":null' if include_usage else ""
    events = [f"data: {{{_HEAD},{chunk}{member}}}\n\n" for chunk in _CHUNKS]
    if include_usage:
        events.append(f"data: {{{_HEAD},{_USAGE_CHUNK}}}\n\n")
    events.append("data: [DONE]\n\n")
    return "".join(events).encode()


def streamed_chat_estimate(*, caller_asked: bool) -> Estimate:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [], "stream": True, "max_tokens": 100}
    if caller_asked:
        body["stream_options"] = {"include_usage": True}
    return openai_estimate(body)


@pytest.mark.parametrize("piece_bytes", [1, 7, 64, 100_000])
def test_chat_meter_removes_the_usage_the_caller_did_not_ask_for(piece_bytes: int) -> None:
    estimate = streamed_chat_estimate(caller_asked=False)
    meter = OPENAI.stream_meter(200, estimate)
    assert meter is not None
    out = feed_in_pieces(meter, chat_stream(include_usage=True), piece_bytes)
    assert out == chat_stream(include_usage=False)
    settled = meter.finish(True)
    # 19 input at $2.50/M + 10 output at $10/M = 147.5.
    assert (settled.outcome, settled.actual_micros) == (Outcome.SPENT, 148)


def test_chat_meter_passes_everything_when_the_caller_asked_for_usage() -> None:
    estimate = streamed_chat_estimate(caller_asked=True)
    meter = OPENAI.stream_meter(200, estimate)
    assert meter is not None
    stream = chat_stream(include_usage=True)
    assert feed_in_pieces(meter, stream, 13) == stream
    assert meter.finish(True).actual_micros == 148


def test_chat_meter_without_usage_settles_at_the_estimate() -> None:
    estimate = streamed_chat_estimate(caller_asked=False)
    meter = OPENAI.stream_meter(200, estimate)
    assert meter is not None
    stream = chat_stream(include_usage=True)
    # Broken off before the usage chunk; an unfinished event is held back.
    cut = stream.index(b"data: [DONE]") - 40
    out = meter.feed(stream[:cut])
    assert out.endswith(b"\n\n")
    assert len(out) < cut
    assert meter.finish(False).actual_micros == estimate.amount_micros
    event = meter.interruption("upstream_timeout", "openai stopped")
    _, data = event_name_and_data(event)
    assert event.endswith(b"\n\n")
    assert json.loads(data)["error"]["code"] == "upstream_timeout"


def test_chat_meter_passes_an_endless_event_through_and_settles_at_the_estimate() -> None:
    estimate = streamed_chat_estimate(caller_asked=False)
    meter = OPENAI.stream_meter(200, estimate)
    assert meter is not None
    huge = b"data: " + b"x" * (5 * 1_048_576)
    assert meter.feed(huge) == huge
    assert meter.feed(b"more") == b"more"
    assert meter.finish(True).actual_micros == estimate.amount_micros


def test_no_meter_for_errors_or_unstreamed_calls() -> None:
    estimate = streamed_chat_estimate(caller_asked=False)
    assert OPENAI.stream_meter(400, estimate) is None
    assert OPENAI.stream_meter(500, estimate) is None
    assert OPENAI.stream_meter(200, openai_estimate({"model": "gpt-4o", "messages": []})) is None


def test_responses_meter_reads_the_final_event() -> None:
    estimate = openai_estimate(
        {"model": "gpt-4o", "input": "x", "stream": True, "max_output_tokens": 500}, "v1/responses"
    )
    usage = {"input_tokens": 100, "output_tokens": 20, "input_tokens_details": {"cached_tokens": 0}}
    created = {"type": "response.created", "sequence_number": 0, "response": {"usage": None}}
    delta = {
        "type": "response.output_text.delta",
        "sequence_number": 1,
        "delta": 'response.completed "usage"',
    }
    final = {
        "type": "response.incomplete",
        "sequence_number": 2,
        "response": {"status": "incomplete", "usage": usage},
    }
    stream = b"".join(
        f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        for event in (created, delta, final)
    )
    meter = OPENAI.stream_meter(200, estimate)
    assert meter is not None
    assert feed_in_pieces(meter, stream, 5) == stream
    assert meter.finish(True).actual_micros == 450  # 100 x $2.50 + 20 x $10 per million
    unfinished = OPENAI.stream_meter(200, estimate)
    assert unfinished is not None
    unfinished.feed(stream[: stream.index(b"event: response.incomplete")])
    assert unfinished.finish(False).actual_micros == estimate.amount_micros


# ---------------------------------------------------------------------- anthropic estimate

SONNET = "claude-sonnet-5-5"  # $2 input, $10 output, $2.50 / $4 cache writes, $0.10 reads


def test_anthropic_estimate_is_text_bytes_plus_overhead_plus_max_tokens() -> None:
    body = {"model": SONNET, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    estimate = anthropic_estimate(body)
    # Strings: model max_tokens messages role content claude-sonnet-5-5 user hi = 57 bytes;
    # one number; 32 overhead: 90 tokens at $2/M + 10 at $10/M = 280.
    assert estimate.amount_micros == 280
    assert estimate.operation == f"POST /v1/messages {SONNET}"
    assert estimate.pricing_version == anthropic_vendor.PRICES.version


def test_anthropic_cache_marks_price_the_input_at_the_write_price() -> None:
    text = {"type": "text", "text": "x" * 10_000}
    plain = anthropic_estimate({"model": SONNET, "max_tokens": 1, "system": [text]})
    five = anthropic_estimate(
        {
            "model": SONNET,
            "max_tokens": 1,
            "system": [{**text, "cache_control": {"type": "ephemeral"}}],
        }
    )
    hour = anthropic_estimate(
        {
            "model": SONNET,
            "max_tokens": 1,
            "system": [{**text, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        }
    )
    # ~10,000 input tokens at $2, $2.50 and $4 per million.
    assert 20_000 < plain.amount_micros < 20_200
    assert 25_000 < five.amount_micros < 25_300
    assert 40_000 < hour.amount_micros < 40_500


def test_anthropic_tools_images_and_documents() -> None:
    base = {"model": SONNET, "max_tokens": 1, "messages": []}
    tool = {"name": "f", "input_schema": {"type": "object"}}
    with_tool = anthropic_estimate({**base, "tools": [tool]}).amount_micros
    assert with_tool - anthropic_estimate(base).amount_micros >= 500 * 2  # tool-use system prompt
    computer = {"type": "computer_20250124", "name": "computer", "display_width_px": 1024}
    assert (
        anthropic_estimate({**base, "tools": [tool, computer]}).amount_micros - with_tool
        >= 1_500 * 2
    )

    def message(part: dict[str, Any]) -> dict[str, Any]:
        return {**base, "messages": [{"role": "user", "content": [part]}]}

    small = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A"}}
    large = {**small, "source": {**small["source"], "data": "A" * 500_000}}
    assert (
        anthropic_estimate(message(small)).amount_micros
        == anthropic_estimate(message(large)).amount_micros
    )
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
    }
    # A PDF's tokens cannot be seen: the whole 1M-token window at $2/M, plus 1 output token.
    assert anthropic_estimate(message(pdf)).amount_micros == 2_000_000 + 10
    plain_text = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "hello"},
    }
    assert anthropic_estimate(message(plain_text)).amount_micros < 1_000


@pytest.mark.parametrize(
    ("body", "headers", "code", "status"),
    [
        ({"max_tokens": 1}, {}, "missing_model", 400),
        ({"model": "claude-9", "max_tokens": 1}, {}, "unknown_model", 400),
        ({"model": SONNET}, {}, "missing_max_tokens", 400),
        ({"model": SONNET, "max_tokens": 0}, {}, "invalid_parameter", 400),
        ({"model": SONNET, "max_tokens": "10"}, {}, "invalid_parameter", 400),
        (
            {
                "model": SONNET,
                "max_tokens": 1,
                "tools": [{"type": "web_search_20250305", "name": "w"}],
            },
            {},
            "unpriced_feature",
            403,
        ),
        (
            {
                "model": SONNET,
                "max_tokens": 1,
                "tools": [{"type": "code_execution_20250522", "name": "c"}],
            },
            {},
            "unpriced_feature",
            403,
        ),
        (
            {"model": SONNET, "max_tokens": 1, "mcp_servers": [{"url": "https://x"}]},
            {},
            "unpriced_feature",
            403,
        ),
        ({"model": SONNET, "max_tokens": 1, "container": "c1"}, {}, "unpriced_feature", 403),
        ({"model": SONNET, "max_tokens": 1, "speed": "fast"}, {}, "unpriced_feature", 403),
        ({"model": SONNET, "max_tokens": 1, "inference_geo": "us"}, {}, "unpriced_feature", 403),
        (
            {"model": SONNET, "max_tokens": 1},
            {"anthropic-beta": "context-1m-2025-08-07"},
            "unpriced_feature",
            403,
        ),
    ],
)
def test_anthropic_refusals(
    body: dict[str, Any], headers: dict[str, str], code: str, status: int
) -> None:
    error = refused(anthropic_estimate, body, headers)
    assert (error.code, error.status) == (code, status)


def test_anthropic_key_and_error_shape() -> None:
    assert ANTHROPIC.presented_key({"x-api-key": "sgk_a_b_c"}) == "sgk_a_b_c"
    assert ANTHROPIC.presented_key({"authorization": "Bearer sgk_a_b_c"}) == "sgk_a_b_c"
    assert ANTHROPIC.presented_key({}) is None
    assert ANTHROPIC.upstream_auth_headers("sk-ant-x") == {"x-api-key": "sk-ant-x"}
    assert ANTHROPIC.error_object("cap_exhausted", "m", 429) == {
        "type": "rate_limit_error",
        "message": "m",
    }
    assert ANTHROPIC.error_object("invalid_key", "m", 401)["type"] == "authentication_error"
    assert ANTHROPIC.error_object("ledger_unavailable", "m", 503)["type"] == "api_error"
    assert ANTHROPIC.refusal_headers() == {"x-should-retry": "false"}


# ------------------------------------------------------------------------ anthropic settle


def test_anthropic_settle_prices_cache_reads_and_writes_by_ttl() -> None:
    estimate = anthropic_estimate({"model": SONNET, "max_tokens": 100, "messages": []})
    usage = {
        "input_tokens": 1000,
        "output_tokens": 100,
        "cache_read_input_tokens": 10_000,
        "cache_creation_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
    }
    settled = ANTHROPIC.settle(200, json.dumps({"usage": usage}).encode(), estimate)
    # 1000 x 2 + 10,000 x 0.10 + 1000 x 2.50 + 2000 x 4 + 100 x 10 (per million) = 14,500.
    assert (settled.outcome, settled.actual_micros) == (Outcome.SPENT, 14_500)
    # Without a breakdown, writes are priced at the TTL the request asked for (5 minutes):
    # 1000 x 2 + 10,000 x 0.10 + 3000 x 2.50 + 100 x 10 = 11,500.
    del usage["cache_creation"]
    assert (
        ANTHROPIC.settle(200, json.dumps({"usage": usage}).encode(), estimate).actual_micros
        == 11_500
    )


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (400, Outcome.FREE),
        (413, Outcome.FREE),
        (429, Outcome.FREE),
        (408, Outcome.UNKNOWN),
        (500, Outcome.UNKNOWN),
        (529, Outcome.UNKNOWN),
    ],
)
def test_anthropic_failures(status: int, outcome: Outcome) -> None:
    estimate = anthropic_estimate({"model": SONNET, "max_tokens": 100, "messages": []})
    assert ANTHROPIC.settle(status, b'{"type": "error"}', estimate).outcome is outcome
    assert ANTHROPIC.settle(200, b"{}", estimate).actual_micros == estimate.amount_micros


def anthropic_stream(*, delta_usage: dict[str, int]) -> list[bytes]:
    def event(kind: str, **fields: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()

    start_usage = {
        "input_tokens": 2000,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [],
        "usage": start_usage,
    }
    return [
        event("message_start", message=message),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("ping"),
        event(
            "content_block_delta", index=0, delta={"type": "text_delta", "text": "message_delta"}
        ),
        event("content_block_stop", index=0),
        event(
            "message_delta",
            delta={"stop_reason": "end_turn", "stop_sequence": None},
            usage=delta_usage,
        ),
        event("message_stop"),
    ]


def streamed_message_estimate() -> Estimate:
    return anthropic_estimate({"model": SONNET, "max_tokens": 1000, "messages": [], "stream": True})


def test_anthropic_meter_reads_message_start_and_message_delta() -> None:
    meter = ANTHROPIC.stream_meter(200, streamed_message_estimate())
    assert meter is not None
    stream = b"".join(anthropic_stream(delta_usage={"output_tokens": 30}))
    assert feed_in_pieces(meter, stream, 3) == stream
    # 2000 x $2 + 30 x $10 per million.
    assert meter.finish(True).actual_micros == 4_300
    # Newer API versions repeat the input figures in message_delta (cumulative).
    meter = ANTHROPIC.stream_meter(200, streamed_message_estimate())
    assert meter is not None
    meter.feed(b"".join(anthropic_stream(delta_usage={"input_tokens": 2500, "output_tokens": 30})))
    assert meter.finish(True).actual_micros == 5_300


def test_anthropic_meter_broken_off_settles_at_known_input_plus_max_tokens() -> None:
    estimate = streamed_message_estimate()
    meter = ANTHROPIC.stream_meter(200, estimate)
    assert meter is not None
    events = anthropic_stream(delta_usage={"output_tokens": 30})
    meter.feed(b"".join(events[:4]) + events[4][:10])
    # 2000 x $2 + 1000 (max_tokens) x $10 per million.
    assert meter.finish(False).actual_micros == 14_000
    nothing = ANTHROPIC.stream_meter(200, estimate)
    assert nothing is not None
    assert nothing.finish(False).actual_micros == estimate.amount_micros
    name, data = event_name_and_data(nothing.interruption("upstream_error", "cut"))
    assert name == "error"
    assert msgspec.json.decode(data) == {
        "type": "error",
        "error": {"type": "api_error", "message": "cut"},
    }


def test_calls_priced_by_an_operators_fixed_cost_settle_by_it() -> None:
    """A fixed cost (SPENDGATE_FIXED_COSTS) prices e.g. GET /v1/models: no tokens, no meter."""
    fixed = FixedCost("openai", "GET", "/v1/models", 100, re.compile("v1/models"))
    for vendor in (OPENAI, ANTHROPIC):
        estimate = Estimate(100, "GET /v1/models", "fixed-x", details=fixed)
        assert vendor.settle(200, b"{}", estimate) == Settlement(Outcome.SPENT, 100)
        assert vendor.settle(404, b"{}", estimate).outcome is Outcome.FREE
        assert vendor.stream_meter(200, estimate) is None
        free = Estimate(1, "GET /v1/models", "fixed-x", details=FreeCall("free"))
        assert vendor.settle(200, b"{}", free).outcome is Outcome.FREE
