"""The ledger's settings, read once at start from ``SPENDGATE_*`` variables."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta

from spendgate_common.settings import CommonSettings, Env


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    common: CommonSettings
    database_url: str
    # Unique per process: a restarted replica is a new owner and waits for old leases.
    owner_id: str
    lease: timedelta
    # Default time a reservation is held before it may be settled as expired.
    hold_default: timedelta
    # How long idempotency answers are remembered.
    idempotency_retention: timedelta
    # How long settled reservation ids are remembered (answers already_settled).
    settled_retention: timedelta
    # How often each partition settles holds past their expiry.
    sweep_interval: timedelta
    # A partition snapshots its state every this many events (bounds recovery time).
    snapshot_every_events: int
    # Most commands applied and appended as one batch (one transaction).
    batch_commands_max: int
    # Most requests waiting for one partition's loop; beyond it callers get "overloaded".
    partition_queue_requests_max: int
    # Most unacknowledged JetStream messages (runs of up to 128 events) in flight per
    # partition relay.
    relay_inflight_max: int
    database_pool_max: int
    statement_timeout: timedelta
    shutdown_deadline: timedelta
    # The operations endpoint (/metrics, /healthz, /readyz); port 0: not served.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0

    @classmethod
    def from_env(cls, env: Env) -> LedgerSettings:
        default_owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return cls(
            common=CommonSettings.from_env(env),
            database_url=env.url("SPENDGATE_DATABASE_URL"),
            owner_id=env.text("SPENDGATE_LEDGER_OWNER_ID", default_owner),
            lease=env.milliseconds("SPENDGATE_LEDGER_LEASE_MS", 5_000, minimum=500, maximum=60_000),
            hold_default=env.seconds(
                "SPENDGATE_HOLD_DEFAULT_SECONDS", 900, minimum=1, maximum=7 * 86_400
            ),
            idempotency_retention=env.seconds(
                "SPENDGATE_IDEMPOTENCY_RETENTION_SECONDS",
                86_400,
                minimum=60,
                maximum=30 * 86_400,
            ),
            settled_retention=env.seconds(
                "SPENDGATE_LEDGER_SETTLED_RETENTION_SECONDS", 3_600, minimum=60, maximum=86_400
            ),
            sweep_interval=env.milliseconds(
                "SPENDGATE_LEDGER_SWEEP_INTERVAL_MS", 1_000, minimum=10, maximum=60_000
            ),
            snapshot_every_events=env.integer(
                "SPENDGATE_LEDGER_SNAPSHOT_EVERY_EVENTS", 50_000, minimum=1, maximum=10_000_000
            ),
            batch_commands_max=env.integer(
                "SPENDGATE_LEDGER_BATCH_COMMANDS_MAX", 2_048, minimum=1, maximum=65_536
            ),
            partition_queue_requests_max=env.integer(
                "SPENDGATE_LEDGER_QUEUE_REQUESTS_MAX", 10_000, minimum=1, maximum=1_000_000
            ),
            relay_inflight_max=env.integer(
                "SPENDGATE_LEDGER_RELAY_INFLIGHT_MAX", 64, minimum=1, maximum=4_096
            ),
            database_pool_max=env.integer(
                "SPENDGATE_LEDGER_DATABASE_POOL_MAX", 16, minimum=2, maximum=256
            ),
            statement_timeout=env.milliseconds(
                "SPENDGATE_LEDGER_STATEMENT_TIMEOUT_MS", 5_000, minimum=100, maximum=120_000
            ),
            shutdown_deadline=env.seconds(
                "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS", 20, minimum=1, maximum=600
            ),
            metrics_host=env.text("SPENDGATE_METRICS_HOST", "127.0.0.1"),
            metrics_port=env.integer("SPENDGATE_LEDGER_METRICS_PORT", 0, minimum=0, maximum=65_535),
        )
