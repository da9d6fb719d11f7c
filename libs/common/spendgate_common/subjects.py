"""NATS subject and stream names, defined once, with the protocol version in them."""

from __future__ import annotations

PROTOCOL_VERSION = "v1"

# JetStream stream that carries every committed ledger event, one subject per partition.
# Version 2 messages carry a run of events (spendgate_common.event_messages_v2); version 1
# messages (one event each) are no longer written, but the stream keeps their subjects and
# the auditor reads them, so that ledgers can be upgraded while events are in flight.
EVENTS_STREAM = "SPENDGATE_EVENTS"
EVENTS_SUBJECT_PREFIX = "spendgate.v2.events"
EVENTS_SUBJECT_WILDCARD = f"{EVENTS_SUBJECT_PREFIX}.>"
EVENTS_V1_SUBJECT_PREFIX = "spendgate.v1.events"
EVENTS_SUBJECTS = [EVENTS_SUBJECT_WILDCARD, f"{EVENTS_V1_SUBJECT_PREFIX}.>"]

# Durable consumer name of the auditor.
AUDITOR_DURABLE = "spendgate-auditor"

# Message headers on published events: JetStream's deduplication id, the partition, and
# the seqs a message carries (version 2: first and last; version 1: its one seq).
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_PARTITION = "Spendgate-Partition"
HEADER_FIRST_SEQ = "Spendgate-First-Seq"
HEADER_LAST_SEQ = "Spendgate-Last-Seq"
HEADER_SEQ = "Spendgate-Seq"

# Trace context (W3C Trace Context) in NATS headers. ``traceparent`` is the standard
# header: on a ledger request, the context of its first traced command; on an event, the
# context of the ledger span of the command that produced it. A ledger request carrying
# several commands (the gateway coalesces) also lists one traceparent per command, in
# command order, comma-separated, empty for a command without one.
HEADER_TRACEPARENT = "traceparent"
HEADER_TRACEPARENTS = "Spendgate-Traceparents"


def ledger_command_subject(partition: int) -> str:
    """Request-reply subject for a batch of commands to one partition."""
    return f"spendgate.{PROTOCOL_VERSION}.ledger.{partition}.cmd"


def events_subject(partition: int) -> str:
    """JetStream subject of one partition's committed events (version 2 messages)."""
    return f"{EVENTS_SUBJECT_PREFIX}.{partition}"


def events_msg_id(partition: int, first_seq: int, last_seq: int) -> str:
    """``Nats-Msg-Id`` of a version 2 message carrying seqs ``first_seq..last_seq``, so a
    republish after a crash is deduplicated."""
    return f"{partition}:{first_seq}-{last_seq}"


def events_v1_subject(partition: int) -> str:
    """Subject of version 1 event messages (one event each; read, no longer written)."""
    return f"{EVENTS_V1_SUBJECT_PREFIX}.{partition}"


def event_v1_msg_id(partition: int, seq: int) -> str:
    """``Nats-Msg-Id`` of a version 1 event message."""
    return f"{partition}:{seq}"


# Auditor request-reply subjects (payloads: spendgate_common.audit_v1). The auditor
# answers them in the queue group AUDITOR_QUEUE_GROUP, so any replica may answer.
AUDIT_SUBJECT_PREFIX = f"spendgate.{PROTOCOL_VERSION}.audit"
AUDIT_KEYS_SUBJECT = f"{AUDIT_SUBJECT_PREFIX}.keys"
AUDIT_VERIFY_SUBJECT = f"{AUDIT_SUBJECT_PREFIX}.verify"
AUDIT_CHECKPOINT_SUBJECT = f"{AUDIT_SUBJECT_PREFIX}.checkpoint"
AUDIT_STATUS_SUBJECT = f"{AUDIT_SUBJECT_PREFIX}.status"
AUDITOR_QUEUE_GROUP = "spendgate-auditor"

# JetStream stream of finance events (CloudEvents JSON, spendgate_common.finance_v1), one
# subject per tenant; Nats-Msg-Id is the CloudEvent id, so a republish is dropped.
FINANCE_STREAM = "SPENDGATE_FINANCE"
FINANCE_SUBJECT_PREFIX = f"spendgate.{PROTOCOL_VERSION}.finance"
FINANCE_SUBJECT_WILDCARD = f"{FINANCE_SUBJECT_PREFIX}.>"


def finance_subject(tenant: str) -> str:
    """JetStream subject of one tenant's finance events (tenants are ``[a-z0-9-]``)."""
    return f"{FINANCE_SUBJECT_PREFIX}.{tenant}"
