"""Reading credentials from request headers: bearer tokens, Basic credentials and the
admin token check."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping

from spendgate_common.errors import InvalidRequestError


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (None when absent or another scheme)."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def check_admin_token(headers: Mapping[str, str], admin_token: str) -> None:
    """Refuse the request unless it carries ``Authorization: Bearer <admin token>``
    (compared in constant time)."""
    token = bearer_token(headers) or ""
    if not hmac.compare_digest(token.encode("utf-8"), admin_token.encode("utf-8")):
        raise InvalidRequestError(
            "invalid_admin_token",
            "this endpoint needs 'Authorization: Bearer <admin token>'",
            status=401,
        )


def basic_credentials(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """``(user, password)`` of ``Authorization: Basic ...`` (None when absent, another
    scheme, or not valid base64 of ASCII text)."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    return user, password
