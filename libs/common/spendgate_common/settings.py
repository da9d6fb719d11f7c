"""Typed reading of prefixed environment variables, once per process, failing fast.

Each service builds its frozen settings object from an :class:`Env` at start; nothing else
reads ``os.environ``. A missing or malformed variable raises :class:`ConfigurationError`
naming the variable, and the process exits before it serves anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from spendgate_common.errors import ConfigurationError
from spendgate_common.limits import PARTITION_COUNT_MAX
from spendgate_common.timezones import zone

PREFIX = "SPENDGATE_"

_URL_PATTERN = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")


class Env:
    """Reads ``SPENDGATE_*`` variables from a mapping (``os.environ`` by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = dict(os.environ if environ is None else environ)

    def _raw(self, name: str) -> str | None:
        assert name.startswith(PREFIX), name
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str | None = None) -> str:
        value = self._raw(name)
        if value is None:
            if default is None:
                raise ConfigurationError(name, "is required but not set")
            return default
        return value

    def optional_text(self, name: str) -> str | None:
        return self._raw(name)

    def standard(self, name: str) -> str | None:
        """A variable that another specification names (OpenTelemetry's ``OTEL_*``),
        stripped; None when unset or empty. Parsing it is the caller's business."""
        assert name.startswith("OTEL_"), name
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def url(self, name: str, default: str | None = None) -> str:
        value = self.text(name, default)
        if not _URL_PATTERN.match(value):
            raise ConfigurationError(name, f"must be a URL like scheme://host:port, got {value!r}")
        return value

    def optional_url(self, name: str) -> str | None:
        if self._raw(name) is None:
            return None
        return self.url(name)

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = int(value, 10)
        except ValueError:
            raise ConfigurationError(name, f"must be a whole number, got {value!r}") from None
        if not minimum <= number <= maximum:
            raise ConfigurationError(name, f"must be between {minimum} and {maximum}, got {number}")
        return number

    def milliseconds(self, name: str, default: int, *, minimum: int, maximum: int) -> timedelta:
        """A duration given in whole milliseconds (the name should end in ``_MS``)."""
        assert name.endswith("_MS"), name
        value = self.integer(name, default, minimum=minimum, maximum=maximum)
        return timedelta(milliseconds=value)

    def seconds(self, name: str, default: int, *, minimum: int, maximum: int) -> timedelta:
        """A duration given in whole seconds (the name should end in ``_SECONDS``)."""
        assert name.endswith("_SECONDS"), name
        return timedelta(seconds=self.integer(name, default, minimum=minimum, maximum=maximum))

    def timezone(self, name: str, default: str) -> str:
        value = self.text(name, default)
        if zone(value) is None:
            raise ConfigurationError(name, f"is not an IANA time zone: {value!r}")
        return value


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How the ``SPENDGATE_EVENTS`` stream is configured by whoever ensures it (the ledger,
    the auditor, the stream Job): they must all agree, or each start would undo the other."""

    # JetStream replicas of the stream: 1 on one server, 3 on a three-node cluster.
    replicas: int = 1
    # Messages older than this are dropped (0: kept forever). The event log in Postgres is
    # the record; the stream only has to hold what the auditor has not consumed yet.
    max_age: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class CommonSettings:
    """Settings every service reads the same way."""

    nats_url: str
    partition_count: int
    events_stream: StreamSettings

    @classmethod
    def from_env(cls, env: Env) -> CommonSettings:
        return cls(
            nats_url=env.url("SPENDGATE_NATS_URL", "nats://127.0.0.1:4222"),
            partition_count=env.integer(
                "SPENDGATE_PARTITION_COUNT", 64, minimum=1, maximum=PARTITION_COUNT_MAX
            ),
            events_stream=StreamSettings(
                replicas=env.integer("SPENDGATE_EVENTS_STREAM_REPLICAS", 1, minimum=1, maximum=5),
                max_age=env.seconds(
                    "SPENDGATE_EVENTS_STREAM_MAX_AGE_SECONDS",
                    0,
                    minimum=0,
                    maximum=10 * 365 * 86_400,
                ),
            ),
        )
