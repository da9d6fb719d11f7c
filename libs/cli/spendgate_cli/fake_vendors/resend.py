"""A Resend look-alike: ``POST /emails`` and ``POST /emails/batch``, enough for the ``resend`` SDK.

Behaviour that tests rely on:
* ``Authorization: Bearer re_...``; no key is 401 ``missing_api_key``, another key
  (a vault key leaking through) 403 ``invalid_api_key``;
* an email needs ``from``, ``to`` (a string or a list) and ``subject``, else 422
  ``validation_error``; a batch is a list of at most 100 emails: with
  ``x-batch-validation: permissive`` the valid ones are sent and the others listed in
  ``errors`` (``index``, ``message``), else one invalid email refuses the whole batch;
* a repeated ``Idempotency-Key`` replays the first answer;
* ``GET /emails/{id}`` retrieves a sent email;
* errors have Resend's shape ``{"statusCode", "name", "message"}``;
* ``X-Fake-Status`` / ``POST /_fake/fail-next`` and ``GET /_fake/requests`` as in
  ``_recorder.py``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from spendgate_cli.fake_vendors._recorder import Recorder, json_response

BATCH_EMAILS_MAX = 100


@dataclass(slots=True)
class _FakeResendState:
    recorder: Recorder = field(default_factory=Recorder)
    idempotent: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    emails: dict[str, dict[str, object]] = field(default_factory=dict)


def _error(status: int, name: str, message: str) -> Response:
    return json_response(status, {"statusCode": status, "name": name, "message": message})


def _problem(email: object) -> str | None:
    """Why ``email`` would be refused, or None."""
    if not isinstance(email, dict):
        return "an email must be an object"
    to = email.get("to")
    valid_to = isinstance(to, str) or (isinstance(to, list) and 0 < len(to) <= 50)
    if not email.get("from") or not valid_to or not email.get("subject"):
        return "from, to (1 to 50 addresses) and subject are required"
    return None


def create_resend_app() -> Starlette:
    state = _FakeResendState()

    async def received(request: Request) -> tuple[object, Response | None]:
        body = await request.body()
        try:
            payload = msgspec.json.decode(body) if body else None
        except msgspec.DecodeError:
            payload = None
        authorization = request.headers.get("authorization", "")
        state.recorder.record(
            {
                "method": request.method,
                "path": request.url.path,
                "authorization": authorization,
                "idempotency_key": request.headers.get("idempotency-key"),
                "batch_validation": request.headers.get("x-batch-validation"),
                "payload": payload,
            }
        )
        if not authorization.startswith("Bearer "):
            return payload, _error(401, "missing_api_key", "Missing API key")
        if not authorization.startswith("Bearer re_"):
            return payload, _error(403, "invalid_api_key", "API key is invalid")
        forced = state.recorder.forced_status(request)
        if forced is not None:
            return payload, _error(forced, "application_error", "Forced failure (fake)")
        return payload, None

    def replayed(request: Request) -> Response | None:
        key = request.headers.get("idempotency-key")
        if key and key in state.idempotent:
            status, body = state.idempotent[key]
            return Response(body, status, media_type="application/json")
        return None

    def remember(request: Request, response: Response) -> Response:
        key = request.headers.get("idempotency-key")
        if key:
            state.idempotent[key] = (response.status_code, bytes(response.body))
        return response

    def send(email: dict[str, object]) -> dict[str, object]:
        email_id = str(uuid.uuid4())
        state.emails[email_id] = {"object": "email", "id": email_id, **email}
        return {"id": email_id}

    async def send_email(request: Request) -> Response:
        payload, refused = await received(request)
        if refused is not None:
            return refused
        again = replayed(request)
        if again is not None:
            return again
        problem = _problem(payload)
        if problem is not None or not isinstance(payload, dict):
            return remember(request, _error(422, "validation_error", problem or "not an object"))
        return remember(request, json_response(200, send(payload)))

    async def send_batch(request: Request) -> Response:
        payload, refused = await received(request)
        if refused is not None:
            return refused
        again = replayed(request)
        if again is not None:
            return again
        if not isinstance(payload, list) or not 0 < len(payload) <= BATCH_EMAILS_MAX:
            message = f"a batch is a list of 1 to {BATCH_EMAILS_MAX} emails"
            return remember(request, _error(422, "validation_error", message))
        problems = [(index, _problem(email)) for index, email in enumerate(payload)]
        errors = [{"index": index, "message": p} for index, p in problems if p is not None]
        permissive = request.headers.get("x-batch-validation") == "permissive"
        if errors and not permissive:
            message = f"email {errors[0]['index']}: {errors[0]['message']}"
            return remember(request, _error(422, "validation_error", message))
        data = [send(email) for email, (_, p) in zip(payload, problems, strict=True) if p is None]
        answer: dict[str, object] = {"data": data}
        if permissive:
            answer["errors"] = errors
        return remember(request, json_response(200, answer))

    async def retrieve(request: Request) -> Response:
        _, refused = await received(request)
        if refused is not None:
            return refused
        found = state.emails.get(request.path_params["email_id"])
        if found is None:
            return _error(404, "not_found", "Email not found")
        return json_response(200, found)

    return Starlette(
        routes=[
            Route("/emails", send_email, methods=["POST"]),
            Route("/emails/batch", send_batch, methods=["POST"]),
            Route("/emails/{email_id}", retrieve, methods=["GET"]),
            *state.recorder.routes(),
        ]
    )
