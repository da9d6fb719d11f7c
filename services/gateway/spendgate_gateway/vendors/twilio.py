"""Twilio: messages priced per segment by destination, calls per minute up to their time limit.

Priced operations (form-encoded, as Twilio's SDKs send them):

* ``POST /2010-04-01/Accounts/{sid}/Messages.json``: the destination (``To``, E.164)
  picks a price row of ``pricing/twilio.json`` by its longest known prefix (unknown
  prefixes and channel addresses such as ``whatsapp:...`` get the deliberately high
  default row). SMS: segments of ``Body`` (``_sms.py``) times the segment price. MMS
  (``MediaUrl`` or ``SendAsMms=true``): the row's MMS price, or where Twilio converts MMS
  to an SMS with a link, the segments of the body plus a link. A ``ContentSid`` message
  without ``Body`` has no text to count: ``unpriced_call`` unless a fixed cost is set.
* ``POST /2010-04-01/Accounts/{sid}/Calls.json``: minutes of ``TimeLimit`` (seconds,
  rounded up) times the per-minute price, plus recording per minute (``Record=true``) and
  answering-machine detection (``MachineDetection``). Without ``TimeLimit`` the gateway
  adds ``TimeLimit=<SPENDGATE_TWILIO_CALL_SECONDS_MAX>`` to the forwarded body, so the
  call cannot outlast its reservation; a larger ``TimeLimit`` is refused.

The ``{sid}`` of the agent's path is replaced by the configured account SID, and the
agent's vault key (the Basic-auth password, as Twilio's SDK sends ``account_sid:token``)
never leaves the gateway. Settling: 2xx is spent (a message at its answer's ``price`` when
Twilio already gives one, else at its ``num_segments`` times the segment price, else at
the estimate; a call at the estimate), 4xx is free, anything else unknown.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import TYPE_CHECKING

import msgspec

from spendgate_common.errors import ConfigurationError, InvalidRequestError
from spendgate_common.limits import AMOUNT_MICROS_MAX
from spendgate_common.money import MICROS_PER_USD, parse_usd
from spendgate_gateway._auth import basic_credentials
from spendgate_gateway.pricing import load_pricing
from spendgate_gateway.vendors._base import (
    Call,
    Estimate,
    Outcome,
    Settlement,
    StreamMeter,
    UnpricedCallError,
)
from spendgate_gateway.vendors._bodies import form_pairs, media_type, unsupported_media_type
from spendgate_gateway.vendors._fixed import settle_fixed
from spendgate_gateway.vendors._sms import segment_count

if TYPE_CHECKING:
    from spendgate_common.settings import Env

# Twilio's own largest TimeLimit (4 hours), and our default cap of a call's length.
TWILIO_TIME_LIMIT_SECONDS_MAX = 14_400
CALL_SECONDS_MAX_DEFAULT = 600
# Where Twilio converts an MMS to an SMS, it appends a link to the media; we count this
# many characters for it (a generous bound of the link and its line break).
MMS_LINK_CHARS = 60
_PATH = re.compile(r"^2010-04-01/Accounts/([A-Za-z0-9]{1,64})/(Messages|Calls)\.json$")
_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_E164 = re.compile(r"^\+([1-9][0-9]{5,14})$")
_SECONDS = re.compile(r"^[0-9]{1,6}$")
_SINGLE_FIELDS = frozenset({"To", "Body", "TimeLimit", "SendAsMms", "Record"})
_json_decoder = msgspec.json.Decoder(float_hook=Decimal)
_PRICE_USD_MAX = Decimal(AMOUNT_MICROS_MAX) / MICROS_PER_USD


@dataclass(frozen=True, slots=True)
class TwilioSettings:
    # The real account SID (upstream paths and the Basic-auth user name); None: not set.
    account_sid: str | None = None
    # Longest call a reservation covers: the TimeLimit added when the caller sets none,
    # and the largest TimeLimit accepted.
    call_seconds_max: int = CALL_SECONDS_MAX_DEFAULT

    @classmethod
    def from_env(cls, env: Env, auth_token: str | None) -> TwilioSettings:
        """``SPENDGATE_TWILIO_*``; the SID is required once an auth token is configured."""
        account_sid = env.optional_text("SPENDGATE_TWILIO_ACCOUNT_SID")
        if account_sid is not None and not _ACCOUNT_SID.match(account_sid):
            raise ConfigurationError(
                "SPENDGATE_TWILIO_ACCOUNT_SID", "must be AC followed by 32 hex digits"
            )
        if auth_token is not None and account_sid is None:
            raise ConfigurationError(
                "SPENDGATE_TWILIO_ACCOUNT_SID", "is required when SPENDGATE_TWILIO_API_KEY is set"
            )
        return cls(
            account_sid=account_sid,
            call_seconds_max=env.integer(
                "SPENDGATE_TWILIO_CALL_SECONDS_MAX",
                CALL_SECONDS_MAX_DEFAULT,
                minimum=60,
                maximum=TWILIO_TIME_LIMIT_SECONDS_MAX,
            ),
        )


TWILIO_DEFAULTS = TwilioSettings()

# ------------------------------------------------------------------------------- prices


class _RatesData(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sms_usd: str
    mms_usd: str | None
    voice_minute_usd: str


class _DestinationData(_RatesData, frozen=True, forbid_unknown_fields=True):
    prefix: str
    name: str


class _TwilioPricing(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: str
    basis: str
    default: _RatesData
    recording_minute_usd: str
    machine_detection_usd: str
    destinations: list[_DestinationData]


@dataclass(frozen=True, slots=True)
class Rates:
    """One destination's prices in micro-USD."""

    destination: str
    sms_segment_micros: int
    # None where Twilio converts MMS to an SMS with a link.
    mms_micros: int | None
    voice_minute_micros: int


def _micros(value: str, where: str) -> int:
    return parse_usd(value, field=f"pricing/twilio.json {where}")


def _rates(name: str, data: _RatesData) -> Rates:
    return Rates(
        destination=name,
        sms_segment_micros=_micros(data.sms_usd, f"{name} sms_usd"),
        mms_micros=None if data.mms_usd is None else _micros(data.mms_usd, f"{name} mms_usd"),
        voice_minute_micros=_micros(data.voice_minute_usd, f"{name} voice_minute_usd"),
    )


PRICING = load_pricing("twilio", _TwilioPricing)
DEFAULT_RATES = _rates("default", PRICING.default)
RECORDING_MINUTE_MICROS = _micros(PRICING.recording_minute_usd, "recording_minute_usd")
MACHINE_DETECTION_MICROS = _micros(PRICING.machine_detection_usd, "machine_detection_usd")
_BY_PREFIX = {d.prefix: _rates(f"+{d.prefix} {d.name}", d) for d in PRICING.destinations}
assert all(prefix.isdigit() for prefix in _BY_PREFIX), "prefixes are digits"
assert len(_BY_PREFIX) == len(PRICING.destinations), "prefixes are unique"
_PREFIX_DIGITS_MAX = max(map(len, _BY_PREFIX))


def rates_for(to: str) -> Rates:
    """The prices of destination ``to``: longest known E.164 prefix, else the default row."""
    match = _E164.match(to.strip())
    if match is None:
        return DEFAULT_RATES
    digits = match.group(1)
    for length in range(min(len(digits), _PREFIX_DIGITS_MAX), 0, -1):
        rates = _BY_PREFIX.get(digits[:length])
        if rates is not None:
            return rates
    return DEFAULT_RATES


# ------------------------------------------------------------------------------ vendor


@dataclass(frozen=True, slots=True)
class MessageDetails:
    """What settling a message needs: the price of one of its SMS segments."""

    sms_segment_micros: int
    media: bool


class Twilio:
    name = "twilio"
    idempotency_headers: tuple[str, ...] = ("i-twilio-idempotency-token",)
    # Twilio's Messages and Calls APIs do not promise to deduplicate retries.
    upstream_deduplicates = False

    def __init__(self, settings: TwilioSettings | None = None) -> None:
        self._settings = settings or TWILIO_DEFAULTS

    def presented_key(self, headers: Mapping[str, str]) -> str | None:
        # Twilio's SDKs send Basic account_sid:auth_token; the vault key is the token.
        credentials = basic_credentials(headers)
        if credentials is None:
            return None
        user, password = credentials
        return password or user or None

    def upstream_path(self, path: str) -> str | None:
        """``path`` with its account SID replaced by the configured one (None: unchanged)."""
        sid = self._settings.account_sid
        prefix = "2010-04-01/Accounts/"
        if sid is None or not path.startswith(prefix):
            return None
        _, _, rest = path[len(prefix) :].partition("/")
        return f"{prefix}{sid}/{rest}" if rest else None

    def estimate(self, call: Call) -> Estimate:
        match = _PATH.match(call.path)
        if call.method != "POST" or match is None:
            raise UnpricedCallError(self.name, call.method, call.path)
        fields = _form(call)
        to = _single(fields, "To")
        if not to:
            raise InvalidRequestError("missing_to", "the request has no To (the destination)")
        rates = rates_for(to)
        if match.group(2) == "Messages":
            return self._message(call, fields, rates)
        return self._voice_call(call, fields, rates)

    def _message(self, call: Call, fields: Mapping[str, list[str]], rates: Rates) -> Estimate:
        body = _single(fields, "Body")
        media = bool(fields.get("MediaUrl")) or (_single(fields, "SendAsMms") or "") == "true"
        if body is None and not media and "ContentSid" in fields:
            # A content template's text is not in the request: nothing to count.
            raise UnpricedCallError(self.name, call.method, call.path)
        text = body or ""
        if media and rates.mms_micros is not None:
            amount = rates.mms_micros
        elif media:
            amount = segment_count(text + "\n" + "x" * MMS_LINK_CHARS) * rates.sms_segment_micros
        else:
            amount = segment_count(text) * rates.sms_segment_micros
        return Estimate(
            amount,
            "POST /2010-04-01/Accounts/{sid}/Messages.json",
            pricing_version=PRICING.version,
            upstream_path=self.upstream_path(call.path),
            details=MessageDetails(rates.sms_segment_micros, media),
        )

    def _voice_call(self, call: Call, fields: Mapping[str, list[str]], rates: Rates) -> Estimate:
        limit = _single(fields, "TimeLimit")
        upstream_body = None
        seconds_max = self._settings.call_seconds_max
        if limit is None:
            seconds = seconds_max
            separator = b"&" if call.body else b""
            upstream_body = call.body + separator + f"TimeLimit={seconds}".encode()
        elif _SECONDS.match(limit) and 1 <= int(limit) <= TWILIO_TIME_LIMIT_SECONDS_MAX:
            seconds = int(limit)
            if seconds > seconds_max:
                raise InvalidRequestError(
                    "time_limit_too_long",
                    f"TimeLimit {seconds} s is above this gateway's maximum of {seconds_max} s",
                )
        else:
            raise InvalidRequestError(
                "invalid_time_limit",
                f"TimeLimit must be whole seconds from 1 to {TWILIO_TIME_LIMIT_SECONDS_MAX}",
            )
        minutes = -(-seconds // 60)
        amount = minutes * rates.voice_minute_micros
        if (_single(fields, "Record") or "").lower() == "true":
            amount += minutes * RECORDING_MINUTE_MICROS
        if fields.get("MachineDetection"):
            amount += MACHINE_DETECTION_MICROS
        return Estimate(
            amount,
            "POST /2010-04-01/Accounts/{sid}/Calls.json",
            pricing_version=PRICING.version,
            upstream_body=upstream_body,
            upstream_path=self.upstream_path(call.path),
        )

    def settle(self, status_code: int, body: bytes, estimate: Estimate) -> Settlement:
        fixed = settle_fixed(status_code, estimate)
        if fixed is not None:
            return fixed
        if 200 <= status_code < 300:
            actual = None
            if isinstance(estimate.details, MessageDetails):
                actual = message_cost(body, estimate.details)
            return Settlement(Outcome.SPENT, estimate.amount_micros if actual is None else actual)
        if 400 <= status_code < 500:
            # Twilio refuses 4xx requests before sending anything.
            return Settlement(Outcome.FREE)
        return Settlement(Outcome.UNKNOWN)

    def stream_meter(self, status_code: int, estimate: Estimate) -> StreamMeter | None:
        return None

    def upstream_auth_headers(self, api_key: str) -> dict[str, str]:
        # The settings compose the key as "<account sid>:<auth token>" (Basic auth).
        assert ":" in api_key, "the Twilio credential is account_sid:auth_token"
        return {"authorization": "Basic " + base64.b64encode(api_key.encode()).decode("ascii")}

    def error_object(self, code: str, message: str, status: int) -> dict[str, object]:
        return {"code": code, "message": message, "more_info": "docs/api.md", "status": status}

    def refusal_headers(self) -> dict[str, str]:
        return {}


def message_cost(body: bytes, details: MessageDetails) -> int | None:
    """A created message's cost from Twilio's answer, when the answer tells it.

    ``price`` (negative, in ``price_unit``) once Twilio has priced the message, else
    ``num_segments`` times the segment price for an SMS; None when neither is usable.
    """
    try:
        answer = _json_decoder.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(answer, dict):
        return None
    price, unit = answer.get("price"), answer.get("price_unit")
    if isinstance(price, str) and unit in ("USD", "usd"):
        try:
            usd = abs(Decimal(price))
        except InvalidOperation:
            usd = None
        # Compared before scaling, so that an absurd exponent cannot build a huge number.
        if usd is not None and usd.is_finite() and usd <= _PRICE_USD_MAX:
            return int((usd * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING))
    segments = answer.get("num_segments")
    if not details.media and isinstance(segments, str) and segments.isdigit():
        return int(segments) * details.sms_segment_micros
    return None


def _form(call: Call) -> dict[str, list[str]]:
    if media_type(call.content_type) not in ("application/x-www-form-urlencoded", ""):
        raise unsupported_media_type(call.content_type)
    fields: dict[str, list[str]] = {}
    for name, value in form_pairs(call.body):
        fields.setdefault(name, []).append(value)
        if name in _SINGLE_FIELDS and len(fields[name]) > 1:
            raise InvalidRequestError("malformed_form", f"{name} is given more than once")
    return fields


def _single(fields: Mapping[str, list[str]], name: str) -> str | None:
    values = fields.get(name)
    return values[0] if values else None
