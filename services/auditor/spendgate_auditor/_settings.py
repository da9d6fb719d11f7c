"""The auditor's settings, read once at start from ``SPENDGATE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from spendgate_auditor._signing import SigningKeyError, load_private_key
from spendgate_common.errors import ConfigurationError
from spendgate_common.settings import CommonSettings, Env

# Largest signing key file we read (a PEM Ed25519 key is about 120 bytes).
SIGNING_KEY_FILE_BYTES_MAX = 16_384


@dataclass(frozen=True, slots=True)
class AuditorSettings:
    common: CommonSettings
    database_url: str
    # Most messages taken from JetStream and chained in one Postgres transaction.
    fetch_messages_max: int
    # Longest a fetch waits for the first message when the stream is idle; also bounds
    # how long a stop waits for the loop to notice it.
    fetch_wait: timedelta
    # JetStream redelivers a message not acked within this time (a crashed auditor's
    # in-flight messages come back after it).
    ack_wait: timedelta
    # Most delivered-but-unacked messages JetStream allows the consumer; at least one batch.
    ack_pending_max: int
    # Delay before a message held behind a gap is redelivered.
    gap_redelivery_delay: timedelta
    # A gap open this long is an alarm (logged as an error); shorter ones heal by
    # redelivery. At least ack_wait: a restarted auditor waits that long for its
    # predecessor's in-flight messages.
    gap_alarm_after: timedelta
    # Bounds of the pause after Postgres or NATS failed (doubling from min to max).
    retry_pause_min: timedelta
    retry_pause_max: timedelta
    database_pool_max: int
    statement_timeout: timedelta
    connect_deadline: timedelta
    shutdown_deadline: timedelta
    # The current checkpoint signing key; None: none configured (an ephemeral key is
    # generated at start, see docs/audit.md).
    signing_key: Ed25519PrivateKey | None
    # A partition's chain is signed at least every this many events ...
    checkpoint_every_events: int
    # ... and at least this long after its oldest unsigned event was chained.
    checkpoint_interval: timedelta
    # Longest wait for JetStream to acknowledge one batch of finance events.
    finance_publish_timeout: timedelta
    # How often the auditor logs its counters and lag.
    status_log_interval: timedelta
    # Longest a verification asked for over NATS (GET /v1/audit/verify) may run.
    verify_deadline: timedelta
    # Where ApprovalRequested events are POSTed (None: no notifications), and the
    # HMAC-SHA256 secret that signs them (docs/contracts.md).
    approval_webhook_url: str | None = None
    approval_webhook_secret: str | None = None
    # The operations endpoint (/metrics, /healthz, /readyz); port 0: not served.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0

    @classmethod
    def from_env(cls, env: Env) -> AuditorSettings:
        settings = cls(
            common=CommonSettings.from_env(env),
            database_url=env.url("SPENDGATE_DATABASE_URL"),
            fetch_messages_max=env.integer(
                "SPENDGATE_AUDITOR_FETCH_MESSAGES_MAX", 512, minimum=1, maximum=10_000
            ),
            fetch_wait=env.milliseconds(
                "SPENDGATE_AUDITOR_FETCH_WAIT_MS", 1_000, minimum=10, maximum=30_000
            ),
            ack_wait=env.seconds(
                "SPENDGATE_AUDITOR_ACK_WAIT_SECONDS", 30, minimum=1, maximum=3_600
            ),
            ack_pending_max=env.integer(
                "SPENDGATE_AUDITOR_ACK_PENDING_MAX", 4_096, minimum=1, maximum=100_000
            ),
            gap_redelivery_delay=env.milliseconds(
                "SPENDGATE_AUDITOR_GAP_REDELIVERY_DELAY_MS", 1_000, minimum=10, maximum=60_000
            ),
            gap_alarm_after=env.seconds(
                "SPENDGATE_AUDITOR_GAP_ALARM_SECONDS", 120, minimum=1, maximum=86_400
            ),
            retry_pause_min=env.milliseconds(
                "SPENDGATE_AUDITOR_RETRY_PAUSE_MIN_MS", 100, minimum=1, maximum=60_000
            ),
            retry_pause_max=env.milliseconds(
                "SPENDGATE_AUDITOR_RETRY_PAUSE_MAX_MS", 5_000, minimum=1, maximum=300_000
            ),
            database_pool_max=env.integer(
                "SPENDGATE_AUDITOR_DATABASE_POOL_MAX", 4, minimum=2, maximum=64
            ),
            statement_timeout=env.milliseconds(
                "SPENDGATE_AUDITOR_STATEMENT_TIMEOUT_MS", 10_000, minimum=100, maximum=120_000
            ),
            connect_deadline=env.seconds(
                "SPENDGATE_AUDITOR_CONNECT_DEADLINE_SECONDS", 30, minimum=1, maximum=600
            ),
            shutdown_deadline=env.seconds(
                "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS", 20, minimum=1, maximum=600
            ),
            signing_key=_signing_key(env),
            checkpoint_every_events=env.integer(
                "SPENDGATE_AUDITOR_CHECKPOINT_EVERY_EVENTS", 1_000, minimum=1, maximum=1_000
            ),
            checkpoint_interval=env.milliseconds(
                "SPENDGATE_AUDITOR_CHECKPOINT_INTERVAL_MS", 1_000, minimum=10, maximum=1_000
            ),
            finance_publish_timeout=env.milliseconds(
                "SPENDGATE_AUDITOR_FINANCE_PUBLISH_TIMEOUT_MS", 5_000, minimum=100, maximum=60_000
            ),
            status_log_interval=env.seconds(
                "SPENDGATE_AUDITOR_STATUS_LOG_SECONDS", 60, minimum=1, maximum=86_400
            ),
            verify_deadline=env.seconds(
                "SPENDGATE_AUDITOR_VERIFY_DEADLINE_SECONDS", 50, minimum=1, maximum=3_600
            ),
            approval_webhook_url=env.optional_text("SPENDGATE_APPROVAL_WEBHOOK_URL"),
            approval_webhook_secret=env.optional_text("SPENDGATE_APPROVAL_WEBHOOK_SECRET"),
            metrics_host=env.text("SPENDGATE_METRICS_HOST", "127.0.0.1"),
            metrics_port=env.integer(
                "SPENDGATE_AUDITOR_METRICS_PORT", 0, minimum=0, maximum=65_535
            ),
        )
        if settings.approval_webhook_url and len(settings.approval_webhook_secret or "") < 16:
            raise ConfigurationError(
                "SPENDGATE_APPROVAL_WEBHOOK_SECRET",
                "must be set (at least 16 characters) with SPENDGATE_APPROVAL_WEBHOOK_URL",
            )
        if settings.ack_pending_max < settings.fetch_messages_max:
            # A batch larger than the pending bound could never be delivered whole.
            raise ConfigurationError(
                "SPENDGATE_AUDITOR_ACK_PENDING_MAX",
                f"must be at least SPENDGATE_AUDITOR_FETCH_MESSAGES_MAX "
                f"({settings.fetch_messages_max})",
            )
        if settings.gap_alarm_after < settings.ack_wait:
            raise ConfigurationError(
                "SPENDGATE_AUDITOR_GAP_ALARM_SECONDS",
                "must be at least SPENDGATE_AUDITOR_ACK_WAIT_SECONDS",
            )
        if settings.retry_pause_max < settings.retry_pause_min:
            raise ConfigurationError(
                "SPENDGATE_AUDITOR_RETRY_PAUSE_MAX_MS",
                "must be at least SPENDGATE_AUDITOR_RETRY_PAUSE_MIN_MS",
            )
        return settings


def _signing_key(env: Env) -> Ed25519PrivateKey | None:
    """The signing key from SPENDGATE_AUDIT_SIGNING_KEY_FILE or SPENDGATE_AUDIT_SIGNING_KEY
    (PEM PKCS#8, or base64 of the raw 32-byte seed); at most one of them may be set."""
    path = env.optional_text("SPENDGATE_AUDIT_SIGNING_KEY_FILE")
    inline = env.optional_text("SPENDGATE_AUDIT_SIGNING_KEY")
    if path is not None and inline is not None:
        raise ConfigurationError(
            "SPENDGATE_AUDIT_SIGNING_KEY", "set it or SPENDGATE_AUDIT_SIGNING_KEY_FILE, not both"
        )
    if path is not None:
        variable = "SPENDGATE_AUDIT_SIGNING_KEY_FILE"
        try:
            with Path(path).open("rb") as file:
                secret = file.read(SIGNING_KEY_FILE_BYTES_MAX + 1)
        except OSError as error:
            raise ConfigurationError(variable, f"cannot read {path}: {error.strerror}") from None
        if len(secret) > SIGNING_KEY_FILE_BYTES_MAX:
            raise ConfigurationError(variable, f"{path} is too large for a key")
    elif inline is not None:
        variable, secret = "SPENDGATE_AUDIT_SIGNING_KEY", inline.encode("utf-8")
    else:
        return None
    try:
        return load_private_key(secret)
    except SigningKeyError as error:
        raise ConfigurationError(variable, f"is not an Ed25519 private key: {error}") from None
