"""Reading request bodies for estimators: form-encoded and JSON, bounded, errors as 400s."""

from __future__ import annotations

import urllib.parse
from decimal import Decimal

import msgspec

from spendgate_common.errors import InvalidRequestError

# Most fields we parse from a form body (vendors' own bodies are far smaller).
FORM_FIELDS_MAX = 1_000
_json_decoder = msgspec.json.Decoder(float_hook=Decimal)


def media_type(content_type: str) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return content_type.split(";", 1)[0].strip().lower()


def form_pairs(body: bytes) -> list[tuple[str, str]]:
    """The ``name=value`` pairs of a form-encoded body, in order, repeated names kept."""
    try:
        text = body.decode("utf-8")
        return urllib.parse.parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            max_num_fields=FORM_FIELDS_MAX,
        )
    except (UnicodeDecodeError, ValueError) as error:
        raise InvalidRequestError(
            "malformed_form", f"the form body is malformed: {error}"
        ) from None


def json_value(body: bytes) -> object:
    """The decoded JSON body; numbers with a fraction become :class:`~decimal.Decimal`."""
    try:
        return _json_decoder.decode(body)
    except msgspec.DecodeError as error:
        message = f"the JSON body is malformed: {error}"
        raise InvalidRequestError("malformed_json", message) from None


def unsupported_media_type(content_type: str) -> InvalidRequestError:
    return InvalidRequestError(
        "unsupported_media_type",
        f"content type {media_type(content_type)!r} is not supported",
        status=415,
    )
