"""Anthropic: the Messages API, priced per token, streamed or not.

Priced call: ``POST /v1/messages`` for the models in ``pricing/anthropic.json`` (others
answer 400 ``unknown_model``). The agent presents its vault key as ``x-api-key`` (or as a
bearer token); upstream gets the real key as ``x-api-key`` and the caller's
``anthropic-version`` / ``anthropic-beta`` headers unchanged.

* Estimate: an upper bound of the input tokens (``_tokens.py``; images at the model's
  largest image; PDFs and other stored or binary documents at the whole context window;
  tool definitions plus the tool-use system prompt) at the input price (at the cache
  write price when the request marks content for caching), plus ``max_tokens``, which
  Anthropic requires and which bounds the output including thinking, at the output price.
* Settle: 2xx from ``usage`` (uncached input, cache writes at their TTL's price, cache
  reads, output); 2xx without a readable ``usage`` at the full estimate; 4xx other than
  408 is free; 408, 5xx (including 529 overloaded) and anything else unknown.
* Streams: ``message_start`` carries the input usage, ``message_delta`` the output usage
  (cumulative). A stream that ends after ``message_start`` but without ``message_delta``
  is settled at its known input plus ``max_tokens`` of output; one without
  ``message_start`` at the full estimate.

Refused as ``unpriced_feature`` (403, never forwarded): server tools billed per use (web
search, web fetch, code execution), MCP servers and containers (several model turns in
one call), the 1M-token context beta (long-context prices), fast mode (``speed``) and
regional inference (``inference_geo``), both billed at a premium.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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

# Fixed tokens added to every input bound (message framing, the reply's start).
REQUEST_OVERHEAD_TOKENS = 32
# The tool-use system prompt Anthropic adds when tools are given (documented: at most
# 346 tokens for current models), rounded up.
TOOLS_OVERHEAD_TOKENS = 500
# A schema-less client tool (bash, text editor, computer use, memory) is expanded by
# Anthropic into a definition and system prompt we cannot see (documented: up to about
# 1,250 tokens for computer use), rounded up.
CLIENT_TOOL_TOKENS = 1_500
_CLIENT_TOOL_TYPE_PREFIXES = ("bash_", "text_editor_", "computer_", "memory_")
# Largest max_tokens a request may ask for (no model writes more).
OUTPUT_TOKENS_REQUEST_MAX = 10_000_000
# A usage figure above this is not believed (the answer is settled conservatively).
USAGE_TOKENS_MAX = 1_000_000_000
_VISIBLE_DOCUMENT_SOURCES = frozenset({"text", "content"})
_PRICED_OPERATION = ("POST", "v1/messages")

# ------------------------------------------------------------------------------- prices


class _ModelEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    input_usd_per_million_tokens: str
    output_usd_per_million_tokens: str
    cache_write_5m_usd_per_million_tokens: str
    cache_write_1h_usd_per_million_tokens: str
    cache_read_usd_per_million_tokens: str
    context_window_tokens: int
    image_input_tokens_max: int
    output_tokens_max: int


class _PriceFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: str
    source: str
    models: dict[str, _ModelEntry]
    aliases: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class ModelPrices:
    """One model's prices (micro-USD per million tokens) and token limits."""

    name: str
    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int
    context_window_tokens: int
    image_input_tokens_max: int
    output_tokens_max: int


def price_table(data: _PriceFile) -> PriceTable[ModelPrices]:
    """Check and convert the price file; raises ValueError (the gateway does not start)."""
    models: dict[str, ModelPrices] = {}
    for name, entry in data.models.items():
        field = f"pricing/anthropic.json models.{name}"

        def price(usd: str, field: str = field) -> int:
            return micros_per_million_tokens(usd, field_name=field)

        prices = ModelPrices(
            name=name,
            input=price(entry.input_usd_per_million_tokens),
            output=price(entry.output_usd_per_million_tokens),
            cache_write_5m=price(entry.cache_write_5m_usd_per_million_tokens),
            cache_write_1h=price(entry.cache_write_1h_usd_per_million_tokens),
            cache_read=price(entry.cache_read_usd_per_million_tokens),
            context_window_tokens=entry.context_window_tokens,
            image_input_tokens_max=entry.image_input_tokens_max,
            output_tokens_max=entry.output_tokens_max,
        )
        if min(prices.context_window_tokens, prices.output_tokens_max) <= 0:
            raise ValueError(f"{field}: token limits must be positive")
        models[name] = prices
    return PriceTable.with_aliases("pricing/anthropic.json", data.version, models, data.aliases)


PRICES = price_table(load_pricing("anthropic", _PriceFile))

# ------------------------------------------------------------------------------- vendor


@dataclass(frozen=True, slots=True)
class CallDetails:
    """What the settle rule and the stream meter need (``Estimate.details``)."""

    prices: ModelPrices
    stream: bool
    max_tokens: int
    # The price of cache writes whose TTL the answer does not break down (the highest
    # TTL the request asked for).
    cache_write_price: int


class Anthropic:
    name = "anthropic"
    # Anthropic does not deduplicate retries by an idempotency key.
    idempotency_headers: tuple[str, ...] = ()
    upstream_deduplicates = False

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        api_key = headers.get("x-api-key", "").strip()
        if api_key:
            return api_key
        # The SDK's auth_token option sends a bearer token instead.
        return bearer_token(headers)

    def estimate(self, call: Call) -> Estimate:
        if (call.method, call.path) != _PRICED_OPERATION:
            raise UnpricedCallError(self.name, call.method, call.path)
        return estimate_call(f"{call.method} /{call.path}", call.headers, call.body)

    def settle(self, status_code: int, body: bytes, estimate: Estimate) -> Settlement:
        # An operator's fixed cost priced this call (SPENDGATE_FIXED_COSTS), not tokens.
        fixed = settle_fixed(status_code, estimate)
        if fixed is not None:
            return fixed
        if 200 <= status_code < 300:
            details = _details(estimate)
            usage = _usage_of(body)
            cost = None if usage is None else usage_cost_micros(usage, details)
            return Settlement(Outcome.SPENT, estimate.amount_micros if cost is None else cost)
        if 400 <= status_code < 500 and status_code != 408:
            # Refused before the model ran (bad request, auth, size, rate limit): no tokens.
            return Settlement(Outcome.FREE)
        return Settlement(Outcome.UNKNOWN)

    def stream_meter(self, status_code: int, estimate: Estimate) -> StreamMeter | None:
        details = estimate.details
        if not isinstance(details, CallDetails) or not details.stream:
            return None  # not streamed, or priced by a fixed cost: read whole, settle()
        if not 200 <= status_code < 300:
            return None
        return MessagesStreamMeter(estimate)

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

    def error_object(self, code: str, message: str, status: int) -> dict[str, object]:
        return error_object(code, message, status)

    def refusal_headers(self) -> dict[str, str]:
        # The Anthropic SDKs obey x-should-retry before their status rules.
        return {"x-should-retry": "false"}


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def error_object(code: str, message: str, status: int) -> dict[str, object]:
    """Anthropic's error shape (``{"type", "message"}``); our ``code`` is beside it."""
    error_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": error_type, "message": message}


# ----------------------------------------------------------------------------- estimate


def estimate_call(operation: str, headers: Mapping[str, str], body_bytes: bytes) -> Estimate:
    """The reservation for one call (pure; raises InvalidRequestError for a bad request)."""
    body = _json_object(body_bytes)
    prices = _model_prices(body)
    _refuse_unpriced_features(headers, body)
    max_tokens = _max_tokens(body)
    scan = scan_input(body, _classify)
    overhead = REQUEST_OVERHEAD_TOKENS + _tools_overhead_tokens(body.get("tools"))
    input_tokens = scan.tokens_max(
        overhead_tokens=overhead,
        image_tokens_max=prices.image_input_tokens_max,
        context_window_tokens=prices.context_window_tokens,
    )
    # Content marked for caching is billed at the write price the first time.
    cache_write_price = prices.cache_write_1h if "1h" in scan.cache_ttls else prices.cache_write_5m
    input_price = max(prices.input, cache_write_price) if scan.cache_ttls else prices.input
    amount = max(1, cost_micros((input_tokens, input_price), (max_tokens, prices.output)))
    if amount > AMOUNT_MICROS_MAX:
        raise InvalidRequestError("invalid_parameter", "the call's cost bound is above the maximum")
    return Estimate(
        amount_micros=amount,
        operation=f"{operation} {prices.name}",
        pricing_version=PRICES.version,
        details=CallDetails(prices, body.get("stream") is True, max_tokens, cache_write_price),
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


def _model_prices(body: Mapping[str, object]) -> ModelPrices:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("missing_model", "the request names no model")
    prices = PRICES.model(model)
    if prices is None:
        raise InvalidRequestError(
            "unknown_model",
            f"model {model!r} has no price in Spendgate's table ({PRICES.version}); "
            "the call was not forwarded",
        )
    return prices


def _max_tokens(body: Mapping[str, object]) -> int:
    value = body.get("max_tokens")
    if value is None:
        raise InvalidRequestError("missing_max_tokens", "max_tokens is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError("invalid_parameter", "max_tokens must be a whole number")
    if not 0 < value <= OUTPUT_TOKENS_REQUEST_MAX:
        raise InvalidRequestError(
            "invalid_parameter", f"max_tokens must be from 1 to {OUTPUT_TOKENS_REQUEST_MAX}"
        )
    return value


def _refuse_unpriced_features(headers: Mapping[str, str], body: Mapping[str, object]) -> None:
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in (None, "custom") and not str(kind).startswith(_CLIENT_TOOL_TYPE_PREFIXES):
            raise _unpriced(f"the server tool {kind!r} is billed per use")
    if body.get("mcp_servers"):
        raise _unpriced("MCP servers run several model turns in one call")
    if body.get("container") is not None:
        raise _unpriced("code execution containers are billed per use")
    if "context-1m" in headers.get("anthropic-beta", ""):
        raise _unpriced("the 1M-token context beta has long-context prices")
    if body.get("speed") not in (None, "standard"):
        raise _unpriced("fast mode is billed at a multiple of the model's prices")
    if body.get("inference_geo") is not None:
        raise _unpriced("inference pinned to a region is billed at a premium")


def _unpriced(reason: str) -> InvalidRequestError:
    return InvalidRequestError(
        "unpriced_feature", f"Spendgate cannot bound this call's cost: {reason}", status=403
    )


def _classify(part: dict[str, object]) -> PartKind:
    kind = part.get("type")
    if kind == "image":
        return "image"
    if kind == "document":
        source = part.get("source")
        source_type = source.get("type") if isinstance(source, dict) else None
        # Plain-text documents are read like text; PDFs and file references are not.
        return "text" if source_type in _VISIBLE_DOCUMENT_SOURCES else "unseen"
    if kind == "container_upload":
        return "unseen"
    return "text"


def _tools_overhead_tokens(tools: object) -> int:
    if not isinstance(tools, list) or not tools:
        return 0
    client_tools = sum(
        1
        for tool in tools
        if isinstance(tool, dict) and str(tool.get("type")).startswith(_CLIENT_TOOL_TYPE_PREFIXES)
    )
    return TOOLS_OVERHEAD_TOKENS + client_tools * CLIENT_TOOL_TOKENS


# ------------------------------------------------------------------------------- settle


class _CacheCreation(msgspec.Struct, frozen=True):
    ephemeral_5m_input_tokens: int = 0
    ephemeral_1h_input_tokens: int = 0


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation: _CacheCreation | None = None

    def updated(self, later: Usage) -> Usage:
        """This usage with the figures a later event reports (they are cumulative)."""
        return Usage(
            input_tokens=_first(later.input_tokens, self.input_tokens),
            output_tokens=_first(later.output_tokens, self.output_tokens),
            cache_creation_input_tokens=_first(
                later.cache_creation_input_tokens, self.cache_creation_input_tokens
            ),
            cache_read_input_tokens=_first(
                later.cache_read_input_tokens, self.cache_read_input_tokens
            ),
            cache_creation=later.cache_creation or self.cache_creation,
        )


def _first(value: int | None, otherwise: int | None) -> int | None:
    return otherwise if value is None else value


class _WithUsage(msgspec.Struct, frozen=True):
    usage: Usage | None = None


class _StreamEvent(msgspec.Struct, frozen=True):
    type: str = ""
    message: _WithUsage | None = None
    usage: Usage | None = None


_with_usage_decoder = msgspec.json.Decoder(_WithUsage)
_stream_event_decoder = msgspec.json.Decoder(_StreamEvent)


def _details(estimate: Estimate) -> CallDetails:
    assert isinstance(estimate.details, CallDetails), estimate.details
    return estimate.details


def _usage_of(body: bytes) -> Usage | None:
    try:
        return _with_usage_decoder.decode(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def usage_cost_micros(
    usage: Usage, details: CallDetails, *, output_tokens_unknown: int | None = None
) -> int | None:
    """The cost of a reported usage, or None when it is missing or not believable.

    ``output_tokens_unknown``: the output count to assume when the usage has none yet
    (a stream that broke off before ``message_delta``).
    """
    prices = details.prices
    output_tokens = usage.output_tokens if output_tokens_unknown is None else output_tokens_unknown
    if usage.input_tokens is None or output_tokens is None:
        return None
    written = usage.cache_creation_input_tokens or 0
    read = usage.cache_read_input_tokens or 0
    by_ttl = usage.cache_creation
    written_5m, written_1h, written_unknown = 0, 0, written
    if by_ttl is not None:
        split = (by_ttl.ephemeral_5m_input_tokens, by_ttl.ephemeral_1h_input_tokens)
        if sum(split) == written:
            (written_5m, written_1h), written_unknown = split, 0
    figures = (usage.input_tokens, output_tokens, read, written_5m, written_1h, written_unknown)
    if any(not 0 <= figure <= USAGE_TOKENS_MAX for figure in figures):
        return None
    return cost_micros(
        (usage.input_tokens, prices.input),
        (read, prices.cache_read),
        (written_5m, prices.cache_write_5m),
        (written_1h, prices.cache_write_1h),
        (written_unknown, details.cache_write_price),
        (output_tokens, prices.output),
    )


# -------------------------------------------------------------------------------- streams


def stream_error_event(code: str, message: str) -> bytes:
    """Anthropic's mid-stream ``error`` event: its SDK raises an APIStatusError."""
    body = {"type": "error", "error": error_object(code, message, 502)}
    return b"event: error\ndata: " + msgspec.json.encode(body) + b"\n\n"


class MessagesStreamMeter:
    """Reads the usage of ``message_start`` and ``message_delta``; passes every event on.

    Only whole events are passed on (an unfinished one waits for its end), so an error
    event after a break never lands inside half an event.
    """

    def __init__(self, estimate: Estimate) -> None:
        self._estimate = estimate
        self._splitter: EventSplitter | None = EventSplitter()
        self._usage: Usage | None = None
        self._output_reported = False

    def feed(self, chunk: bytes) -> bytes:
        if self._splitter is None:
            return chunk
        try:
            events = self._splitter.push(chunk)
        except EventTooLargeError:
            # Not an event stream we can read: pass the rest on; without message_delta
            # the output counts as max_tokens.
            pending, self._splitter = self._splitter.take_pending(), None
            return pending
        for event in events:
            if b"message_start" in event or b"message_delta" in event:
                self._observe(event)
        return b"".join(events)

    def _observe(self, event: bytes) -> None:
        _, data = event_name_and_data(event)
        try:
            decoded = _stream_event_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if decoded.type == "message_start" and decoded.message is not None:
            self._usage = decoded.message.usage
        elif decoded.type == "message_delta" and decoded.usage is not None and self._usage:
            self._usage = self._usage.updated(decoded.usage)
            self._output_reported = True

    def interruption(self, code: str, message: str) -> bytes:
        return stream_error_event(code, message)

    def finish(self, complete: bool) -> Settlement:
        details = _details(self._estimate)
        cost = None
        if self._usage is not None:
            # Until message_delta reports the output, it may be anything up to max_tokens.
            unknown = None if self._output_reported else details.max_tokens
            cost = usage_cost_micros(self._usage, details, output_tokens_unknown=unknown)
        return Settlement(Outcome.SPENT, self._estimate.amount_micros if cost is None else cost)
