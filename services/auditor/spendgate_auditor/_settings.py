"""The auditor's settings, read once at start from ``SPENDGATE_*`` variables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from spendgate_common.errors import ConfigurationError
from spendgate_common.settings import CommonSettings, Env


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
                "SPENDGATE_AUDITOR_DATABASE_POOL_MAX", 2, minimum=1, maximum=64
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
