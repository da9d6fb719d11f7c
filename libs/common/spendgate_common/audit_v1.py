"""Auditor protocol, version 1: requests to the auditor over NATS request-reply.

The gateway has no database connection, so its ``/v1/audit/...`` routes ask the auditor
(subjects in :mod:`spendgate_common.subjects`: ``spendgate.v1.audit.<op>``). Every
request is JSON of the struct named below; every reply is JSON of :data:`AuditReply`, or
:class:`AuditFailed` when the auditor cannot answer (``code`` ``busy``,
``store_unavailable``, ``invalid_request``).

| subject                        | request             | reply          |
|--------------------------------|---------------------|----------------|
| ``spendgate.v1.audit.keys``       | KeysRequest         | SigningKeys    |
| ``spendgate.v1.audit.verify``     | VerifyRequest       | Verification   |
| ``spendgate.v1.audit.checkpoint`` | CheckpointRequest   | Checkpoints    |
| ``spendgate.v1.audit.status``     | StatusRequest       | AuditorStatus  |
"""

from __future__ import annotations

import msgspec


class KeysRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class VerifyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Verify one partition (or all), from ``from_seq`` on (or from the start)."""

    partition: int | None = None
    from_seq: int | None = None


class CheckpointRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sign every partition's head now (those not signed at their current seq)."""


class StatusRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class _Reply(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=True):
    pass


class SigningKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A public key checkpoints are signed with: ``public_key`` is the raw 32-byte Ed25519
    key in standard base64, ``public_key_pem`` the same as SubjectPublicKeyInfo PEM."""

    key_id: str
    algorithm: str
    public_key: str
    public_key_pem: str
    first_used_at: str
    current: bool


class SigningKeys(_Reply, frozen=True, tag="SigningKeys"):
    keys: list[SigningKey]


class PartitionVerification(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One partition: ``problem`` is ``None`` when it verified (see docs/audit.md)."""

    partition: int
    events: int
    verified: int
    not_yet_audited: int
    signed_seq: int
    checkpoints_verified: int
    problem: str | None = None
    problem_seq: int | None = None
    reason: str | None = None


class Verification(_Reply, frozen=True, tag="Verification"):
    ok: bool
    events: int
    verified: int
    not_yet_audited: int
    partitions: list[PartitionVerification]


class Checkpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A signed checkpoint: ``link`` hex, ``signature`` standard base64."""

    partition: int
    seq: int
    link: str
    key_id: str
    signature: str


class Checkpoints(_Reply, frozen=True, tag="Checkpoints"):
    checkpoints: list[Checkpoint]


class AuditorStatus(_Reply, frozen=True, tag="AuditorStatus"):
    """Counters of one auditor process since it started (gauges where noted)."""

    events_chained: int
    batches: int
    duplicates: int
    # Gauges: messages in the stream the consumer has not been delivered yet, and the age
    # of the last chained event (now - its at_ms) in milliseconds.
    lag_events: int
    lag_ms: int
    checkpoints_signed: int
    finance_published: int
    # Gauge: finance events committed but not yet acknowledged by JetStream.
    finance_pending: int
    gaps_seen: int
    gap_alarms: int
    # Gauge: partitions whose chain is stalled behind a gap open past the alarm time.
    stalled_partitions: list[int]
    rollup_skipped_events: int
    signing_key_id: str
    signing_key_ephemeral: bool


class AuditFailed(_Reply, frozen=True, tag="AuditFailed"):
    code: str
    message: str


AuditReply = SigningKeys | Verification | Checkpoints | AuditorStatus | AuditFailed

_encoder = msgspec.json.Encoder()
_reply_decoder = msgspec.json.Decoder(AuditReply)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_reply(data: bytes) -> AuditReply:
    """Decode a reply; raises ``msgspec.DecodeError`` / ``ValidationError`` when malformed."""
    reply: AuditReply = _reply_decoder.decode(data)
    return reply
