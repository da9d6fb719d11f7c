"""Finance events, version 1: CloudEvents 1.0 (structured JSON) for finance consumers.

The auditor publishes one event per settled reservation (committed, released or expired;
a commit carries its overrun) and one per denial, on the JetStream stream
``SPENDGATE_FINANCE``, subject ``spendgate.v1.finance.<tenant>``, after the transaction
that chained its source event committed. ``id`` (also the ``Nats-Msg-Id``) is
``<partition>:<seq>`` of the ledger event it comes from, so it is unique, stable across
republishes, and orders the events of one partition (``spendgatepartition`` and
``spendgateseq`` carry the same numbers as integers).

The JSON Schema of these types is committed as ``docs/schemas/finance-v1.json``
(regenerate it with ``python -m spendgate_common.finance_v1 > docs/schemas/finance-v1.json``;
a test checks the committed file equals :func:`json_schema`). Adding an optional field at
the end of a data struct is compatible; anything else is a new version (new ``type``
names ending in ``.v2``). Amounts are integer micro-USD, times RFC 3339 in UTC.
"""

from __future__ import annotations

from typing import Literal

import msgspec

SPEC_VERSION = "1.0"
SETTLED_TYPE = "io.spendgate.finance.reservation.settled.v1"
DENIED_TYPE = "io.spendgate.finance.reservation.denied.v1"
SCHEMA_ID = "urn:spendgate:schema:finance:v1"

Outcome = Literal["committed", "released", "expired"]


class SettledData(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A reservation settled. ``spent_micros`` is what counts as spent: the commit's actual
    cost (including any overrun), the held amount when it expired, 0 when released.
    ``day`` is the settlement's local date in the key's time zone (YYYY-MM-DD)."""

    tenant: str
    key_id: str
    label: str
    fleet_labels: list[str]
    vendor: str
    operation: str
    reservation_id: str
    outcome: Outcome
    reserved_micros: int
    spent_micros: int
    overrun_micros: int
    budget_ids: list[str]
    granted_at: str
    settled_at: str
    day: str
    timezone: str


class DeniedData(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A reserve was denied. ``scope``/``scope_id`` name the cap that refused it, with that
    cap's committed, reserved and cap amounts at the time; ``day`` as in SettledData."""

    tenant: str
    key_id: str
    label: str
    fleet_labels: list[str]
    vendor: str
    operation: str
    decision_id: str
    code: str
    requested_micros: int
    scope: str
    scope_id: str
    committed_micros: int
    reserved_micros: int
    cap_micros: int
    denied_at: str
    day: str
    timezone: str


class _CloudEvent(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=True):
    specversion: Literal["1.0"]
    # "<partition>:<seq>" of the source ledger event; also the Nats-Msg-Id.
    id: str
    # "/spendgate/v1/partitions/<partition>".
    source: str
    # The reservation id (settled) or decision id (denied).
    subject: str
    time: str
    datacontenttype: Literal["application/json"]
    spendgatepartition: int
    spendgateseq: int


class ReservationSettled(_CloudEvent, frozen=True, tag=SETTLED_TYPE):
    data: SettledData


class ReservationDenied(_CloudEvent, frozen=True, tag=DENIED_TYPE):
    data: DeniedData


FinanceEvent = ReservationSettled | ReservationDenied

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(FinanceEvent)


def event_id(partition: int, seq: int) -> str:
    return f"{partition}:{seq}"


def source(partition: int) -> str:
    return f"/spendgate/v1/partitions/{partition}"


def encode_finance_event(event: FinanceEvent) -> bytes:
    return _encoder.encode(event)


def decode_finance_event(body: bytes) -> FinanceEvent:
    """Decode a finance event; raises ``msgspec.ValidationError`` when it is not one."""
    event: FinanceEvent = _decoder.decode(body)
    return event


def json_schema() -> bytes:
    """The JSON Schema (draft 2020-12) of a finance event, as committed in docs/schemas."""
    schema = msgspec.json.schema(FinanceEvent)
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Spendgate finance event, version 1 (CloudEvents 1.0, structured JSON)",
        **schema,
    }
    return msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"


if __name__ == "__main__":
    import sys

    sys.stdout.buffer.write(json_schema())
