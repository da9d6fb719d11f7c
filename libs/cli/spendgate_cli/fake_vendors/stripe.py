"""A Stripe look-alike: charges and payment intents, form or JSON bodies, idempotency keys.

Behaviour that tests rely on:
* a key must look like a Stripe secret key (``sk_...``); anything else (a vault key
  leaking through) is refused with 401, as Stripe would;
* ``payment_method=pm_card_chargeDeclined`` (or ``source=tok_chargeDeclined``) answers
  402 ``card_declined``, as Stripe's test tokens do;
* a repeated ``Idempotency-Key`` replays the first response (``Idempotent-Replayed: true``);
* ``X-Fake-Delay-Ms: <n>`` answers after n ms; ``X-Fake-Status: 500`` fails without acting;
* ``GET /_fake/requests`` lists what was received; ``DELETE /_fake/requests`` clears it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# Most requests remembered for inspection; older ones are dropped.
RECORDED_REQUESTS_MAX = 10_000
DECLINED_TOKENS = frozenset({"pm_card_chargeDeclined", "tok_chargeDeclined"})


@dataclass(slots=True)
class _FakeStripeState:
    requests: list[dict[str, object]] = field(default_factory=list)
    idempotent: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    objects: dict[str, dict[str, object]] = field(default_factory=dict)


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status, headers, media_type="application/json")


def _error(status: int, error_type: str, code: str, message: str) -> Response:
    return _json(status, {"error": {"type": error_type, "code": code, "message": message}})


async def _fields(request: Request) -> dict[str, object] | None:
    body = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            parsed = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def create_stripe_app() -> Starlette:
    state = _FakeStripeState()

    async def create_object(request: Request) -> Response:
        kind = "charge" if request.url.path.endswith("/charges") else "payment_intent"
        authorization = request.headers.get("authorization", "")
        fields = await _fields(request)
        state.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "authorization": authorization,
                "idempotency_key": request.headers.get("idempotency-key"),
                "fields": fields,
            }
        )
        del state.requests[:-RECORDED_REQUESTS_MAX]
        if not authorization.startswith("Bearer sk_"):
            return _error(401, "invalid_request_error", "api_key_invalid", "Invalid API Key")
        # Test hooks: answer late, or fail as an overloaded Stripe would (nothing is stored).
        delay_ms = request.headers.get("x-fake-delay-ms", "")
        if delay_ms.isdigit():
            await asyncio.sleep(int(delay_ms) / 1000)
        if request.headers.get("x-fake-status") == "500":
            return _error(500, "api_error", "fake_failure", "Forced failure (x-fake-status)")
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key and idempotency_key in state.idempotent:
            status, body = state.idempotent[idempotency_key]
            return Response(
                body, status, {"idempotent-replayed": "true"}, media_type="application/json"
            )
        response = _create(kind, fields, state)
        if idempotency_key:
            state.idempotent[idempotency_key] = (response.status_code, bytes(response.body))
        return response

    async def retrieve_object(request: Request) -> Response:
        found = state.objects.get(request.path_params["object_id"])
        if found is None:
            return _error(404, "invalid_request_error", "resource_missing", "No such object")
        return _json(200, found)

    async def list_requests(_: Request) -> Response:
        return _json(200, {"requests": state.requests})

    async def clear_requests(_: Request) -> Response:
        state.requests.clear()
        return _json(200, {"cleared": True})

    return Starlette(
        routes=[
            Route("/v1/charges", create_object, methods=["POST"]),
            Route("/v1/payment_intents", create_object, methods=["POST"]),
            Route("/v1/charges/{object_id}", retrieve_object, methods=["GET"]),
            Route("/v1/payment_intents/{object_id}", retrieve_object, methods=["GET"]),
            Route("/_fake/requests", list_requests, methods=["GET"]),
            Route("/_fake/requests", clear_requests, methods=["DELETE"]),
        ]
    )


def _create(kind: str, fields: dict[str, object] | None, state: _FakeStripeState) -> Response:
    if fields is None:
        return _error(400, "invalid_request_error", "parameter_invalid", "Malformed body")
    amount = fields.get("amount")
    try:
        cents = int(str(amount))
    except ValueError:
        return _error(400, "invalid_request_error", "parameter_missing", "Missing amount")
    if cents <= 0:
        return _error(400, "invalid_request_error", "amount_too_small", "Amount too small")
    payment_method = fields.get("payment_method") or fields.get("source")
    if payment_method in DECLINED_TOKENS:
        return _json(
            402,
            {
                "error": {
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": "generic_decline",
                    "message": "Your card was declined.",
                }
            },
        )
    prefix = "ch" if kind == "charge" else "pi"
    created = {
        "id": f"{prefix}_{secrets.token_hex(12)}",
        "object": kind,
        "amount": cents,
        "currency": str(fields.get("currency", "usd")),
        "status": "succeeded",
        "created": int(time.time()),
        "livemode": False,
    }
    state.objects[str(created["id"])] = created
    return _json(200, created)
