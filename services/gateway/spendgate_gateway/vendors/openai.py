"""OpenAI: chat completions, responses and embeddings, priced per token, streamed or not.

Priced calls: ``POST /v1/chat/completions``, ``POST /v1/responses``, ``POST /v1/embeddings``
for the models in ``pricing/openai.json`` (others answer 400 ``unknown_model``).

* Estimate: an upper bound of the input tokens (``_tokens.py``: UTF-8 bytes of every
  string, images at the model's largest image, the whole context window when part of the
  input is stored at OpenAI) at the input price, plus the output limit
  (``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens``, else the model's
  own limit) times ``n`` at the output price.
* Settle: 2xx from ``usage`` (cached input tokens at the cached price); 2xx without a
  readable ``usage`` at the full estimate; 4xx other than 408 is free (OpenAI does not
  bill refused requests); 408, 5xx and anything else unknown.
* Streams: a chat stream gets ``stream_options.include_usage`` upstream; when the caller
  did not ask for it, the meter removes the usage-only chunk (and the ``"usage":null``
  the option adds to every chunk), so the caller sees what it would have without it.
  A responses stream carries its usage in ``response.completed``. A stream that ends
  without usage settles at the full estimate.

Calls that cost more than tokens are refused as ``unpriced_feature`` (403, never
forwarded): hosted tools (web search, file search, code interpreter, MCP, ...), and the
priority service tier. docs/vendors.md has the reasons.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import msgspec

from spendgate_common.errors import InvalidRequestError
from spendgate_common.limits import AMOUNT_MICROS_MAX
from spendgate_gateway._auth import bearer_token
from spendgate_gateway.pricing import load_pricing
from spendgate_gateway.vendors._base import (
    Call,
    Estimate,
    Outcome,
    Settlement,
    StreamMeter,
    UnpricedCallError,
)
from spendgate_gateway.vendors._fixed import settle_fixed
from spendgate_gateway.vendors._sse import EventSplitter, EventTooLargeError, event_name_and_data
from spendgate_gateway.vendors._tokens import (
    PartKind,
    PriceTable,
    cost_micros,
    micros_per_million_tokens,
    scan_input,
)

# Fixed tokens added to every input bound (the chat format's start and reply priming).
REQUEST_OVERHEAD_TOKENS = 32
# Added once when the request defines tools (the rendered tool namespace's frame).
TOOLS_OVERHEAD_TOKENS = 64
# Largest output limit a request may ask for, and most choices (OpenAI's own bound of n).
OUTPUT_TOKENS_REQUEST_MAX = 10_000_000
CHOICES_MAX = 128
# A usage figure above this is not believed (the answer is settled at the estimate).
USAGE_TOKENS_MAX = 1_000_000_000

_CLIENT_TOOL_TYPES = frozenset({"function", "custom"})
_IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "computer_screenshot"})
# Parts whose content is stored at OpenAI or not text we can bound by its bytes.
_UNSEEN_PART_TYPES = frozenset({"file", "input_file", "input_audio", "item_reference"})
# Responses parameters that pull earlier, stored content into the input.
_STORED_INPUT_PARAMETERS = ("previous_response_id", "conversation", "prompt")
_RESPONSE_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSE_FINAL_EVENT_BYTES = tuple(name.encode() for name in _RESPONSE_FINAL_EVENTS)
# Chunks of a chat stream with include_usage carry `"usage":null` (JSON structure: a
# quote inside a string is escaped, so this cannot match string content).
_USAGE_NULL_MEMBER = re.compile(rb',\s*"usage"\s*:\s*null')


class Api(enum.Enum):
    CHAT = "chat"
    RESPONSES = "responses"
    EMBEDDINGS = "embeddings"


_ENDPOINTS = {
    ("POST", "v1/chat/completions"): Api.CHAT,
    ("POST", "v1/responses"): Api.RESPONSES,
    ("POST", "v1/embeddings"): Api.EMBEDDINGS,
}
# Where each API takes its output limit (chat: the current name, then the legacy one).
_OUTPUT_LIMIT_PARAMETERS = {
    Api.CHAT: ("max_completion_tokens", "max_tokens"),
    Api.RESPONSES: ("max_output_tokens",),
    Api.EMBEDDINGS: (),
}

# ------------------------------------------------------------------------------- prices


class _ModelEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: Literal["chat", "embedding"]
    input_usd_per_million_tokens: str
    cached_input_usd_per_million_tokens: str | None = None
    output_usd_per_million_tokens: str = "0"
    context_window_tokens: int
    output_tokens_max: int = 0
    image_input_tokens_max: int = 0


class _PriceFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: str
    source: str
    models: dict[str, _ModelEntry]
    aliases: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class ModelPrices:
    """One model's prices (micro-USD per million tokens) and token limits."""

    name: str
    kind: Literal["chat", "embedding"]
    input: int
    cached_input: int
    output: int
    context_window_tokens: int
    output_tokens_max: int
    image_input_tokens_max: int


def price_table(data: _PriceFile) -> PriceTable[ModelPrices]:
    """Check and convert the price file; raises ValueError (the gateway does not start)."""
    models: dict[str, ModelPrices] = {}
    for name, entry in data.models.items():
        field = f"pricing/openai.json models.{name}"
        prices = ModelPrices(
            name=name,
            kind=entry.kind,
            input=micros_per_million_tokens(entry.input_usd_per_million_tokens, field_name=field),
            cached_input=micros_per_million_tokens(
                entry.cached_input_usd_per_million_tokens or entry.input_usd_per_million_tokens,
                field_name=field,
            ),
            output=micros_per_million_tokens(entry.output_usd_per_million_tokens, field_name=field),
            context_window_tokens=entry.context_window_tokens,
            output_tokens_max=entry.output_tokens_max,
            image_input_tokens_max=entry.image_input_tokens_max,
        )
        if prices.context_window_tokens <= 0 or prices.cached_input > prices.input:
            raise ValueError(f"{field}: context window or cached price out of range")
        if prices.kind == "chat" and not 0 < prices.output_tokens_max <= OUTPUT_TOKENS_REQUEST_MAX:
            raise ValueError(f"{field}: a chat model needs output_tokens_max")
        models[name] = prices
    return PriceTable.with_aliases("pricing/openai.json", data.version, models, data.aliases)


PRICES = price_table(load_pricing("openai", _PriceFile))

# ------------------------------------------------------------------------------- vendor


@dataclass(frozen=True, slots=True)
class CallDetails:
    """What the settle rule and the stream meter need (``Estimate.details``)."""

    api: Api
    prices: ModelPrices
    stream: bool
    # The gateway added stream_options.include_usage: the caller must not see its chunk.
    usage_added: bool


class OpenAI:
    name = "openai"
    # OpenAI does not deduplicate retries by an idempotency key: a completed call is not
    # forwarded twice. Idempotency-Key, when sent, still keys the ledger's decision.
    idempotency_headers: tuple[str, ...] = ()
    upstream_deduplicates = False

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        return bearer_token(headers)

    def estimate(self, call: Call) -> Estimate:
        api = _ENDPOINTS.get((call.method, call.path))
        if api is None:
            raise UnpricedCallError(self.name, call.method, call.path)
        return estimate_call(api, f"{call.method} /{call.path}", call.body)

    def settle(self, status_code: int, body: bytes, estimate: Estimate) -> Settlement:
        # An operator's fixed cost priced this call (SPENDGATE_FIXED_COSTS), not tokens.
        fixed = settle_fixed(status_code, estimate)
        if fixed is not None:
            return fixed
        if 200 <= status_code < 300:
            return _settle_from_usage(_usage_of(body), estimate)
        if 400 <= status_code < 500 and status_code != 408:
            # OpenAI bills tokens processed; a refused request (bad parameters, auth,
            # rate limit, quota) processed none. A 408 may have run: unknown.
            return Settlement(Outcome.FREE)
        return Settlement(Outcome.UNKNOWN)

    def stream_meter(self, status_code: int, estimate: Estimate) -> StreamMeter | None:
        details = estimate.details
        if not isinstance(details, CallDetails) or not details.stream:
            return None  # not streamed, or priced by a fixed cost: read whole, settle()
        if not 200 <= status_code < 300:
            return None
        if details.api is Api.RESPONSES:
            return ResponsesStreamMeter(estimate)
        return ChatStreamMeter(estimate, strip_usage=details.usage_added)

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {api_key}"}

    def error_object(self, code: str, message: str, status: int) -> dict[str, object]:
        return error_object(code, message, status)

    def refusal_headers(self) -> dict[str, str]:
        # The OpenAI SDKs obey x-should-retry before their status rules (429 and 5xx retry).
        return {"x-should-retry": "false"}


def error_object(code: str, message: str, status: int) -> dict[str, object]:
    """OpenAI's error shape; a spent cap reads as OpenAI's own ``insufficient_quota``."""
    if status >= 500:
        error_type = "server_error"
    elif code == "cap_exhausted":
        error_type = "insufficient_quota"
    else:
        error_type = "invalid_request_error"
    return {"message": message, "type": error_type, "param": None, "code": code}


# ----------------------------------------------------------------------------- estimate


def estimate_call(api: Api, operation: str, body_bytes: bytes) -> Estimate:
    """The reservation for one call (pure; raises InvalidRequestError for a bad request)."""
    body = _json_object(body_bytes)
    prices = _model_prices(api, body)
    if api is Api.EMBEDDINGS:
        input_tokens, output_tokens = _embedding_input_tokens(body, prices), 0
    else:
        _refuse_unpriced_features(api, body)
        input_tokens = _input_tokens(api, body, prices)
        output_tokens = _output_tokens(api, body, prices)
    amount = max(1, cost_micros((input_tokens, prices.input), (output_tokens, prices.output)))
    if amount > AMOUNT_MICROS_MAX:
        raise InvalidRequestError("invalid_parameter", "the call's cost bound is above the maximum")
    stream = api is not Api.EMBEDDINGS and body.get("stream") is True
    upstream_body = _with_usage_option(body) if stream and api is Api.CHAT else None
    return Estimate(
        amount_micros=amount,
        operation=f"{operation} {prices.name}",
        pricing_version=PRICES.version,
        upstream_body=upstream_body,
        details=CallDetails(api, prices, stream, usage_added=upstream_body is not None),
    )


def _json_object(body: bytes) -> dict[str, object]:
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError as error:
        message = f"the JSON body is malformed: {error}"
        raise InvalidRequestError("malformed_json", message) from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("malformed_json", "the JSON body must be an object")
    return parsed


def _model_prices(api: Api, body: Mapping[str, object]) -> ModelPrices:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("missing_model", "the request names no model")
    prices = PRICES.model(model)
    wanted = "embedding" if api is Api.EMBEDDINGS else "chat"
    if prices is None or prices.kind != wanted:
        raise InvalidRequestError(
            "unknown_model",
            f"model {model!r} has no {wanted} price in Spendgate's table "
            f"({PRICES.version}); the call was not forwarded",
        )
    return prices


def _refuse_unpriced_features(api: Api, body: Mapping[str, object]) -> None:
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in _CLIENT_TOOL_TYPES:
            raise _unpriced(f"the hosted tool {kind!r} is billed per use")
    if api is Api.CHAT and body.get("web_search_options") is not None:
        raise _unpriced("web search is billed per use")
    if body.get("service_tier") == "priority":
        raise _unpriced("the priority service tier has its own prices")


def _unpriced(reason: str) -> InvalidRequestError:
    return InvalidRequestError(
        "unpriced_feature", f"Spendgate cannot bound this call's cost: {reason}", status=403
    )


def _classify(part: dict[str, object]) -> PartKind:
    kind = part.get("type")
    if kind in _IMAGE_PART_TYPES:
        return "image"
    if kind in _UNSEEN_PART_TYPES:
        return "unseen"
    return "text"


def _input_tokens(api: Api, body: Mapping[str, object], prices: ModelPrices) -> int:
    scan = scan_input(body, _classify)
    if api is Api.RESPONSES:
        scan.unseen.extend(name for name in _STORED_INPUT_PARAMETERS if body.get(name))
    overhead = REQUEST_OVERHEAD_TOKENS + (TOOLS_OVERHEAD_TOKENS if body.get("tools") else 0)
    return scan.tokens_max(
        overhead_tokens=overhead,
        image_tokens_max=prices.image_input_tokens_max,
        context_window_tokens=prices.context_window_tokens,
    )


def _embedding_input_tokens(body: Mapping[str, object], prices: ModelPrices) -> int:
    """Each input is bounded by its bytes (or its token ids) and the model's input limit."""
    value = body.get("input")
    inputs = value if isinstance(value, list) and value and not _is_token_ids(value) else [value]
    total = 0
    for item in inputs:
        if isinstance(item, str):
            total += min(len(item.encode("utf-8", "surrogatepass")), prices.context_window_tokens)
        elif isinstance(item, list) and _is_token_ids(item):
            total += len(item)
        else:
            raise InvalidRequestError(
                "invalid_parameter", "input must be text, a list of texts or of token ids"
            )
    return total


def _is_token_ids(items: list[object]) -> bool:
    return all(isinstance(item, int) and not isinstance(item, bool) for item in items)


def _output_tokens(api: Api, body: Mapping[str, object], prices: ModelPrices) -> int:
    names = _OUTPUT_LIMIT_PARAMETERS[api]
    limits = [_positive_int(body, name, OUTPUT_TOKENS_REQUEST_MAX) for name in names]
    given = [limit for limit in limits if limit is not None]
    # Both chat names given: OpenAI refuses the request; the larger bounds it either way.
    per_choice = max(given) if given else prices.output_tokens_max
    if api is Api.CHAT:
        per_choice += _rejected_prediction_tokens_max(body)
        return per_choice * (_positive_int(body, "n", CHOICES_MAX) or 1)
    return per_choice


def _rejected_prediction_tokens_max(body: Mapping[str, object]) -> int:
    """A predicted output's rejected tokens are billed as output (at most its bytes)."""
    prediction = body.get("prediction")
    if prediction is None:
        return 0
    return scan_input(prediction, _classify).text_bytes


def _positive_int(body: Mapping[str, object], name: str, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise InvalidRequestError(
            "invalid_parameter", f"{name} must be a whole number from 1 to {maximum}"
        )
    return value


def _with_usage_option(body: dict[str, object]) -> bytes | None:
    """The body with ``stream_options.include_usage`` set, or None when the caller set it."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("invalid_parameter", "stream_options must be an object")
    if options is not None and options.get("include_usage") is True:
        return None
    with_usage = {**(options or {}), "include_usage": True}
    return msgspec.json.encode({**body, "stream_options": with_usage})


# ------------------------------------------------------------------------------- settle


class _TokenDetails(msgspec.Struct, frozen=True):
    cached_tokens: int | None = None


class Usage(msgspec.Struct, frozen=True):
    """Chat and embeddings say prompt/completion, responses say input/output."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    prompt_tokens_details: _TokenDetails | None = None
    input_tokens_details: _TokenDetails | None = None


class _WithUsage(msgspec.Struct, frozen=True):
    usage: Usage | None = None


class _ChatChunk(msgspec.Struct, frozen=True):
    choices: list[msgspec.Raw] = []
    usage: Usage | None = None


class _ResponseEvent(msgspec.Struct, frozen=True):
    type: str = ""
    response: _WithUsage | None = None


_with_usage_decoder = msgspec.json.Decoder(_WithUsage)
_chat_chunk_decoder = msgspec.json.Decoder(_ChatChunk)
_response_event_decoder = msgspec.json.Decoder(_ResponseEvent)


def _details(estimate: Estimate) -> CallDetails:
    assert isinstance(estimate.details, CallDetails), estimate.details
    return estimate.details


def _usage_of(body: bytes) -> Usage | None:
    try:
        return _with_usage_decoder.decode(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def usage_cost_micros(usage: Usage, prices: ModelPrices) -> int | None:
    """The cost of a reported usage, or None when the figures are missing or not believable."""
    input_tokens = usage.prompt_tokens if usage.prompt_tokens is not None else usage.input_tokens
    output_tokens = (
        usage.completion_tokens if usage.completion_tokens is not None else usage.output_tokens
    )
    details = usage.prompt_tokens_details or usage.input_tokens_details
    cached = details.cached_tokens if details is not None else None
    if input_tokens is None:
        return None
    output_tokens = output_tokens or 0
    cached = cached or 0
    figures = (input_tokens, output_tokens, cached)
    if any(not 0 <= figure <= USAGE_TOKENS_MAX for figure in figures) or cached > input_tokens:
        return None
    return cost_micros(
        (input_tokens - cached, prices.input),
        (cached, prices.cached_input),
        (output_tokens, prices.output),
    )


def _settle_from_usage(usage: Usage | None, estimate: Estimate) -> Settlement:
    """Spent at the usage's cost; without a believable usage, at the full estimate."""
    cost = None if usage is None else usage_cost_micros(usage, _details(estimate).prices)
    return Settlement(Outcome.SPENT, estimate.amount_micros if cost is None else cost)


# -------------------------------------------------------------------------------- streams


def stream_error_event(code: str, message: str) -> bytes:
    """OpenAI's mid-stream error (``data: {"error": ...}``): its SDK raises APIError."""
    error = error_object(code, message, 502)
    return b"data: " + msgspec.json.encode({"error": error}) + b"\n\n"


class ChatStreamMeter:
    """Reads the usage chunk of a chat stream; removes it when the caller did not ask for it.

    Only whole events are passed on (an unfinished one waits for its end), so an error
    event after a break never lands inside half an event.
    """

    def __init__(self, estimate: Estimate, *, strip_usage: bool) -> None:
        self._estimate = estimate
        self._strip_usage = strip_usage
        self._splitter: EventSplitter | None = EventSplitter()
        self._usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self._splitter is None:
            return chunk
        try:
            events = self._splitter.push(chunk)
        except EventTooLargeError:
            # Not an event stream we can read: pass the rest on, settle at the estimate.
            pending, self._splitter = self._splitter.take_pending(), None
            return pending
        return b"".join([self._relayed(event) for event in events])

    def _relayed(self, event: bytes) -> bytes:
        if b'"usage"' not in event:
            return event
        _, data = event_name_and_data(event)
        try:
            chunk = _chat_chunk_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return event
        if chunk.usage is not None and self._usage is None:
            self._usage = chunk.usage
        if not self._strip_usage:
            return event
        if chunk.usage is not None and not chunk.choices:
            return b""
        return _USAGE_NULL_MEMBER.sub(b"", event, count=1)

    def interruption(self, code: str, message: str) -> bytes:
        return stream_error_event(code, message)

    def finish(self, complete: bool) -> Settlement:
        # Broken off or not, the usage chunk comes last: without it, the full estimate.
        return _settle_from_usage(self._usage, self._estimate)


class ResponsesStreamMeter:
    """Reads the usage of ``response.completed`` (or ``.incomplete`` / ``.failed``)."""

    def __init__(self, estimate: Estimate) -> None:
        self._estimate = estimate
        self._splitter: EventSplitter | None = EventSplitter()
        self._usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self._splitter is None:
            return chunk
        try:
            events = self._splitter.push(chunk)
        except EventTooLargeError:
            pending, self._splitter = self._splitter.take_pending(), None
            return pending
        for event in events:
            self._observe(event)
        return b"".join(events)

    def _observe(self, event: bytes) -> None:
        if b'"usage"' not in event:
            return
        if not any(name in event for name in _RESPONSE_FINAL_EVENT_BYTES):
            return
        _, data = event_name_and_data(event)
        try:
            decoded = _response_event_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if decoded.type in _RESPONSE_FINAL_EVENTS and decoded.response is not None:
            self._usage = decoded.response.usage or self._usage

    def interruption(self, code: str, message: str) -> bytes:
        return stream_error_event(code, message)

    def finish(self, complete: bool) -> Settlement:
        return _settle_from_usage(self._usage, self._estimate)
