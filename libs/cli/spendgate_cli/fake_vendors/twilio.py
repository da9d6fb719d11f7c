"""A Twilio look-alike: Messages and Calls of API 2010-04-01, enough for the ``twilio`` SDK.

Behaviour that tests rely on:
* Basic auth ``<account sid>:<auth token>`` whose user name is the path's account SID,
  and a token that is not a Spendgate vault key (``sgk_...``), else 401 (code 20003);
* ``POST .../Messages.json`` needs ``To``, ``From`` or ``MessagingServiceSid``, and
  ``Body``, ``MediaUrl`` or ``ContentSid`` (else 400 with Twilio's error codes); it answers
  201 with a queued message whose ``num_segments`` is counted here (GSM-7 when the body
  is ASCII without GSM-7 extension characters, else UCS-2) and whose ``price`` is null,
  or what ``POST /_fake/price`` with ``{"price": "-0.0123"}`` set;
* ``POST .../Calls.json`` needs ``To``, ``From`` and ``Url`` or ``Twiml``, answers 201;
* ``GET .../Messages/{sid}.json`` and ``.../Calls/{sid}.json`` fetch what was created;
* errors have Twilio's shape ``{"code", "message", "more_info", "status"}``;
* ``X-Fake-Status`` / ``POST /_fake/fail-next`` and ``GET /_fake/requests`` as in
  ``_recorder.py``.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import urllib.parse
from dataclasses import dataclass, field
from email.utils import formatdate

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from spendgate_cli.fake_vendors._recorder import Recorder, json_response

_ACCOUNT = "/2010-04-01/Accounts/{account_sid}"
# An ASCII body with one of these is still GSM-7, but they take two septets each.
_GSM7_EXTENSION_ASCII = frozenset("^{}\\[~]|")


@dataclass(slots=True)
class _FakeTwilioState:
    recorder: Recorder = field(default_factory=Recorder)
    objects: dict[str, dict[str, object]] = field(default_factory=dict)
    # What created messages report as their price (Twilio reports null until billed).
    price: str | None = None


def _error(status: int, code: int, message: str) -> Response:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return json_response(status, body)


def _basic_auth(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


def _segments(body: str) -> int:
    """An independent, simpler count than the gateway's (ASCII GSM-7 or UCS-2)."""
    if body.isascii():
        septets = len(body) + sum(1 for char in body if char in _GSM7_EXTENSION_ASCII)
        return 1 if septets <= 160 else -(-septets // 153)
    units = len(body.encode("utf-16-le")) // 2
    return 1 if units <= 70 else -(-units // 67)


def create_twilio_app() -> Starlette:
    state = _FakeTwilioState()

    async def received(request: Request) -> tuple[dict[str, list[str]], Response | None]:
        """Record the request; answer early for bad auth or a forced failure."""
        pairs = urllib.parse.parse_qsl((await request.body()).decode(), keep_blank_values=True)
        form: dict[str, list[str]] = {}
        for name, value in pairs:
            form.setdefault(name, []).append(value)
        auth = _basic_auth(request)
        state.recorder.record(
            {
                "method": request.method,
                "path": request.url.path,
                "account_sid": request.path_params["account_sid"],
                "auth_user": auth[0] if auth else None,
                "authorization": request.headers.get("authorization", ""),
                "idempotency_token": request.headers.get("i-twilio-idempotency-token"),
                "fields": {name: values[-1] for name, values in form.items()},
                "form": pairs,
            }
        )
        if auth is None or auth[0] != request.path_params["account_sid"]:
            return form, _error(401, 20003, "Authenticate")
        if not auth[1] or auth[1].startswith("sgk_"):
            return form, _error(401, 20003, "Authenticate")
        forced = state.recorder.forced_status(request)
        if forced is not None:
            return form, _error(forced, 20500, "Forced failure (fake)")
        return form, None

    async def create_message(request: Request) -> Response:
        form, refused = await received(request)
        if refused is not None:
            return refused
        first = {name: values[0] for name, values in form.items()}
        if not first.get("To"):
            return _error(400, 21604, "A 'To' phone number is required.")
        if not (first.get("From") or first.get("MessagingServiceSid")):
            return _error(400, 21603, "A 'From' phone number is required.")
        media = form.get("MediaUrl", [])
        if not (first.get("Body") or media or first.get("ContentSid")):
            return _error(400, 21602, "Message body is required.")
        message = _resource(request, "SM", "Messages", first)
        message.update(
            body=first.get("Body", ""),
            num_segments=str(_segments(first.get("Body", ""))),
            num_media=str(len(media)),
            messaging_service_sid=first.get("MessagingServiceSid"),
            error_code=None,
            error_message=None,
            price=state.price,
        )
        state.objects[str(message["sid"])] = message
        return json_response(201, message)

    async def create_call(request: Request) -> Response:
        form, refused = await received(request)
        if refused is not None:
            return refused
        first = {name: values[0] for name, values in form.items()}
        if not first.get("To") or not first.get("From"):
            return _error(400, 21201, "A 'To' and a 'From' phone number are required.")
        if not (first.get("Url") or first.get("Twiml") or first.get("ApplicationSid")):
            return _error(400, 21205, "Url parameter is required.")
        call = _resource(request, "CA", "Calls", first)
        call.update(duration=None, price=None, time_limit=first.get("TimeLimit"))
        state.objects[str(call["sid"])] = call
        return json_response(201, call)

    async def fetch(request: Request) -> Response:
        _, refused = await received(request)
        if refused is not None:
            return refused
        found = state.objects.get(request.path_params["sid"])
        if found is None:
            return _error(404, 20404, "The requested resource was not found")
        return json_response(200, found)

    async def set_price(request: Request) -> Response:
        price = msgspec.json.decode(await request.body()).get("price")
        state.price = None if price is None else str(price)
        return json_response(200, {"price": state.price})

    return Starlette(
        routes=[
            Route(f"{_ACCOUNT}/Messages.json", create_message, methods=["POST"]),
            Route(f"{_ACCOUNT}/Calls.json", create_call, methods=["POST"]),
            Route(f"{_ACCOUNT}/Messages/{{sid}}.json", fetch, methods=["GET"]),
            Route(f"{_ACCOUNT}/Calls/{{sid}}.json", fetch, methods=["GET"]),
            Route("/_fake/price", set_price, methods=["POST"]),
            *state.recorder.routes(),
        ]
    )


def _resource(request: Request, prefix: str, kind: str, first: dict[str, str]) -> dict[str, object]:
    account_sid = request.path_params["account_sid"]
    sid = f"{prefix}{secrets.token_hex(16)}"
    now = formatdate(usegmt=True)
    return {
        "sid": sid,
        "account_sid": account_sid,
        "to": first.get("To"),
        "from": first.get("From"),
        "status": "queued",
        "direction": "outbound-api",
        "api_version": "2010-04-01",
        "price_unit": "USD",
        "date_created": now,
        "date_updated": now,
        "uri": f"/2010-04-01/Accounts/{account_sid}/{kind}/{sid}.json",
        "subresource_uris": {},
    }
