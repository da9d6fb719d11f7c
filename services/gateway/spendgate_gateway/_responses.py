"""Building HTTP responses: JSON via msgspec, our errors in one shape, reading bounded bodies."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common.errors import InvalidRequestError

_encoder = msgspec.json.Encoder()


def json_response(status: int, body: object, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        content=_encoder.encode(body),
        status_code=status,
        media_type="application/json",
        headers=dict(headers or {}),
    )


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    vendor_error: Mapping[str, object] | None = None,
    extra: Mapping[str, object] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """``{"code", "message", ...extra}`` and, on proxy routes, the vendor-shaped ``error``."""
    body: dict[str, object] = {"code": code, "message": message}
    body.update(extra or {})
    if vendor_error is not None:
        body["error"] = dict(vendor_error)
    return json_response(status, body, headers)


async def read_body(request: Request, bytes_max: int) -> bytes:
    """The request body, refusing more than ``bytes_max`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequestError("invalid_content_length", "Content-Length is not a number")
        if int(declared) > bytes_max:
            raise _too_large(bytes_max)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > bytes_max:
            raise _too_large(bytes_max)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(bytes_max: int) -> InvalidRequestError:
    return InvalidRequestError(
        "body_too_large", f"the request body is larger than {bytes_max} bytes", status=413
    )
