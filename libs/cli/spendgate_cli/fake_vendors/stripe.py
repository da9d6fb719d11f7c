"""A Stripe look-alike: charges, payment intents, transfers, payouts, refunds; idempotency keys.

Behaviour that tests rely on:
* a key must look like a Stripe secret key (``sk_...``); anything else (a vault key
  leaking through) is refused with 401, as Stripe would;
* ``payment_method=pm_card_chargeDeclined`` (or ``source=tok_chargeDeclined``) answers
  402 ``card_declined`` when the payment is attempted, as Stripe's test tokens do;
* a payment intent follows Stripe's states: created ``requires_payment_method`` (or
  ``requires_confirmation`` with a payment method), confirmed ``succeeded`` (or
  ``requires_capture`` with ``capture_method=manual``), captured, cancelled;
* refunds need an existing charge or payment intent and at most its unrefunded amount;
* a repeated ``Idempotency-Key`` replays the first response (``Idempotent-Replayed: true``);
* ``X-Fake-Delay-Ms: <n>`` answers after n ms; ``X-Fake-Status: 500`` (or
  ``POST /_fake/fail-next``) fails without acting;
* ``GET /_fake/requests`` lists what was received; ``DELETE /_fake/requests`` clears it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from spendgate_cli.fake_vendors._recorder import Recorder, json_response

DECLINED_TOKENS = frozenset({"pm_card_chargeDeclined", "tok_chargeDeclined"})
_Fields = dict[str, object]
_Object = dict[str, object]


@dataclass(slots=True)
class _FakeStripeState:
    recorder: Recorder = field(default_factory=Recorder)
    idempotent: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    objects: dict[str, _Object] = field(default_factory=dict)


def _error(status: int, error_type: str, code: str, message: str) -> Response:
    return json_response(status, {"error": {"type": error_type, "code": code, "message": message}})


def _invalid(code: str, message: str, status: int = 400) -> Response:
    return _error(status, "invalid_request_error", code, message)


def _declined() -> Response:
    return json_response(
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


async def _fields(request: Request) -> _Fields | None:
    body = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            parsed = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _positive(fields: _Fields, name: str) -> int | None:
    try:
        value = int(str(fields.get(name)))
    except ValueError:
        return None
    return value if value > 0 else None


def _true(fields: _Fields, name: str) -> bool:
    return str(fields.get(name, "")).lower() == "true"


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


_Action = Callable[[_FakeStripeState, _Fields, Request], Response]


def create_stripe_app() -> Starlette:
    state = _FakeStripeState()

    def endpoint(action: _Action) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            authorization = request.headers.get("authorization", "")
            fields = await _fields(request) if request.method == "POST" else {}
            state.recorder.record(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "authorization": authorization,
                    "idempotency_key": request.headers.get("idempotency-key"),
                    "fields": fields,
                }
            )
            if not authorization.startswith("Bearer sk_"):
                return _invalid("api_key_invalid", "Invalid API Key", 401)
            # Test hooks: answer late, or fail as an overloaded Stripe would (nothing is stored).
            delay_ms = request.headers.get("x-fake-delay-ms", "")
            if delay_ms.isdigit():
                await asyncio.sleep(int(delay_ms) / 1000)
            forced = state.recorder.forced_status(request)
            if forced is not None:
                error_type = "api_error" if forced >= 500 else "invalid_request_error"
                return _error(forced, error_type, "fake_failure", "Forced failure (fake)")
            if fields is None:
                return _invalid("parameter_invalid", "Malformed body")
            idempotency_key = request.headers.get("idempotency-key")
            if idempotency_key and idempotency_key in state.idempotent:
                status, body = state.idempotent[idempotency_key]
                return Response(
                    body, status, {"idempotent-replayed": "true"}, media_type="application/json"
                )
            response = action(state, fields, request)
            if idempotency_key and request.method == "POST":
                state.idempotent[idempotency_key] = (response.status_code, bytes(response.body))
            return response

        return handle

    routes = [
        ("/v1/charges", "POST", _create_charge),
        ("/v1/charges/{object_id}", "GET", _retrieve),
        ("/v1/charges/{object_id}/capture", "POST", _capture_charge),
        ("/v1/charges/{object_id}/refunds", "POST", _refund_charge),
        ("/v1/payment_intents", "POST", _create_payment_intent),
        ("/v1/payment_intents/{object_id}", "GET", _retrieve),
        ("/v1/payment_intents/{object_id}", "POST", _update_payment_intent),
        ("/v1/payment_intents/{object_id}/confirm", "POST", _confirm_payment_intent),
        ("/v1/payment_intents/{object_id}/capture", "POST", _capture_payment_intent),
        ("/v1/payment_intents/{object_id}/cancel", "POST", _cancel_payment_intent),
        ("/v1/transfers", "POST", _create_transfer),
        ("/v1/payouts", "POST", _create_payout),
        ("/v1/refunds", "POST", _create_refund),
        ("/v1/refunds/{object_id}", "GET", _retrieve),
    ]
    return Starlette(
        routes=[
            *(Route(path, endpoint(action), methods=[method]) for path, method, action in routes),
            *state.recorder.routes(),
        ]
    )


def _store(state: _FakeStripeState, created: _Object) -> Response:
    created.setdefault("created", int(time.time()))
    created.setdefault("livemode", False)
    state.objects[str(created["id"])] = created
    return json_response(200, created)


def _find(state: _FakeStripeState, request: Request, kind: str) -> _Object | None:
    found = state.objects.get(request.path_params["object_id"])
    return found if found is not None and found["object"] == kind else None


def _missing() -> Response:
    return _invalid("resource_missing", "No such object", 404)


def _retrieve(state: _FakeStripeState, _: _Fields, request: Request) -> Response:
    found = state.objects.get(request.path_params["object_id"])
    return _missing() if found is None else json_response(200, found)


def _money(fields: _Fields) -> tuple[int, str] | Response:
    amount = _positive(fields, "amount")
    if amount is None:
        return _invalid("parameter_missing", "Missing or invalid amount")
    currency = fields.get("currency")
    if not isinstance(currency, str) or not currency:
        return _invalid("parameter_missing", "Missing currency")
    return amount, currency.lower()


def _create_charge(state: _FakeStripeState, fields: _Fields, _: Request) -> Response:
    money = _money(fields)
    if isinstance(money, Response):
        return money
    if fields.get("source") in DECLINED_TOKENS or fields.get("payment_method") in DECLINED_TOKENS:
        return _declined()
    amount, currency = money
    captured = str(fields.get("capture", "true")).lower() != "false"
    charge: _Object = {"id": _new_id("ch"), "object": "charge", "amount": amount}
    charge.update(currency=currency, status="succeeded", paid=True, captured=captured)
    charge.update(amount_captured=amount if captured else 0, amount_refunded=0)
    return _store(state, charge)


def _capture_charge(state: _FakeStripeState, fields: _Fields, request: Request) -> Response:
    charge = _find(state, request, "charge")
    if charge is None:
        return _missing()
    if charge["captured"]:
        return _invalid("charge_already_captured", "Charge has already been captured")
    charge.update(captured=True, amount_captured=_positive(fields, "amount") or charge["amount"])
    return json_response(200, charge)


def _create_payment_intent(state: _FakeStripeState, fields: _Fields, _: Request) -> Response:
    money = _money(fields)
    if isinstance(money, Response):
        return money
    amount, currency = money
    intent: _Object = {"id": _new_id("pi"), "object": "payment_intent", "amount": amount}
    intent.update(currency=currency, amount_capturable=0, amount_received=0)
    intent.update(capture_method=str(fields.get("capture_method", "automatic")))
    intent.update(payment_method=fields.get("payment_method"), amount_refunded=0)
    intent["client_secret"] = f"{intent['id']}_secret_{secrets.token_hex(8)}"
    intent["status"] = (
        "requires_confirmation" if intent["payment_method"] else "requires_payment_method"
    )
    if _true(fields, "confirm"):
        failed = _confirm(intent, fields)
        if failed is not None:
            return failed
    return _store(state, intent)


def _confirm(intent: _Object, fields: _Fields) -> Response | None:
    """Attempt the payment; None when it went through (``intent`` is updated)."""
    payment_method = fields.get("payment_method") or intent.get("payment_method")
    if not payment_method:
        return _invalid(
            "payment_intent_unexpected_state", "You cannot confirm without a payment method"
        )
    if payment_method in DECLINED_TOKENS:
        intent.update(status="requires_payment_method", payment_method=None)
        return _declined()
    amount = intent["amount"]
    intent["payment_method"] = payment_method
    if intent["capture_method"] == "manual":
        intent.update(status="requires_capture", amount_capturable=amount)
    else:
        intent.update(status="succeeded", amount_received=amount)
    return None


def _update_payment_intent(state: _FakeStripeState, fields: _Fields, request: Request) -> Response:
    intent = _find(state, request, "payment_intent")
    if intent is None:
        return _missing()
    if intent["status"] in ("succeeded", "canceled", "requires_capture"):
        return _invalid("payment_intent_unexpected_state", f"Intent is {intent['status']}")
    if "amount" in fields:
        amount = _positive(fields, "amount")
        if amount is None:
            return _invalid("parameter_invalid", "Invalid amount")
        intent["amount"] = amount
    if isinstance(fields.get("currency"), str):
        intent["currency"] = str(fields["currency"]).lower()
    if fields.get("payment_method"):
        intent.update(payment_method=fields["payment_method"], status="requires_confirmation")
    return json_response(200, intent)


def _confirm_payment_intent(state: _FakeStripeState, fields: _Fields, request: Request) -> Response:
    intent = _find(state, request, "payment_intent")
    if intent is None:
        return _missing()
    if intent["status"] not in ("requires_payment_method", "requires_confirmation"):
        return _invalid("payment_intent_unexpected_state", f"Intent is {intent['status']}")
    failed = _confirm(intent, fields)
    return failed if failed is not None else json_response(200, intent)


def _capture_payment_intent(state: _FakeStripeState, fields: _Fields, request: Request) -> Response:
    intent = _find(state, request, "payment_intent")
    if intent is None:
        return _missing()
    if intent["status"] != "requires_capture":
        return _invalid("payment_intent_unexpected_state", f"Intent is {intent['status']}")
    capturable = intent["amount_capturable"]
    assert isinstance(capturable, int)
    amount = _positive(fields, "amount_to_capture") or capturable
    if amount > capturable:
        return _invalid("amount_too_large", "amount_to_capture is above the capturable amount")
    intent.update(status="succeeded", amount_received=amount, amount_capturable=0)
    return json_response(200, intent)


def _cancel_payment_intent(state: _FakeStripeState, _: _Fields, request: Request) -> Response:
    intent = _find(state, request, "payment_intent")
    if intent is None:
        return _missing()
    if intent["status"] in ("succeeded", "canceled"):
        return _invalid("payment_intent_unexpected_state", f"Intent is {intent['status']}")
    intent.update(status="canceled", amount_capturable=0)
    return json_response(200, intent)


def _create_transfer(state: _FakeStripeState, fields: _Fields, _: Request) -> Response:
    money = _money(fields)
    if isinstance(money, Response):
        return money
    if not fields.get("destination"):
        return _invalid("parameter_missing", "Missing destination")
    transfer: _Object = {"id": _new_id("tr"), "object": "transfer", "amount": money[0]}
    transfer.update(currency=money[1], destination=fields["destination"], reversed=False)
    return _store(state, transfer)


def _create_payout(state: _FakeStripeState, fields: _Fields, _: Request) -> Response:
    money = _money(fields)
    if isinstance(money, Response):
        return money
    payout: _Object = {"id": _new_id("po"), "object": "payout", "amount": money[0]}
    payout.update(currency=money[1], status="pending", method="standard")
    return _store(state, payout)


def _create_refund(state: _FakeStripeState, fields: _Fields, _: Request) -> Response:
    target_id = fields.get("charge") or fields.get("payment_intent")
    if not isinstance(target_id, str):
        return _invalid("parameter_missing", "Give charge or payment_intent")
    return _refund(state, state.objects.get(target_id), fields)


def _refund_charge(state: _FakeStripeState, fields: _Fields, request: Request) -> Response:
    return _refund(state, _find(state, request, "charge"), fields)


def _refund(state: _FakeStripeState, target: _Object | None, fields: _Fields) -> Response:
    if target is None or target["object"] not in ("charge", "payment_intent"):
        return _missing()
    paid = target.get("amount_captured", target.get("amount_received", 0))
    refunded = target["amount_refunded"]
    assert isinstance(paid, int)
    assert isinstance(refunded, int)
    amount = _positive(fields, "amount") or paid - refunded
    if amount <= 0 or amount > paid - refunded:
        return _invalid("amount_too_large", "Refund amount is above the unrefunded amount")
    target["amount_refunded"] = refunded + amount
    refund: _Object = {"id": _new_id("re"), "object": "refund", "amount": amount}
    refund.update(currency=target["currency"], status="succeeded")
    refund[str(target["object"])] = target["id"]
    return _store(state, refund)
