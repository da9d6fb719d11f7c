"""Process plumbing shared by the services: JSON logs and signal-driven lifecycles."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Protocol

import msgspec

from spendgate_common.errors import ConfigurationError
from spendgate_common.settings import Env
from spendgate_common.telemetry import Telemetry, TelemetrySettings, current_trace_ids

_encoder = msgspec.json.Encoder()


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, message (and error), and
    ``trace_id`` / ``span_id`` when the line is written inside a span."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        ids = current_trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        return _encoder.encode(line).decode("utf-8")


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request (with its URL) at INFO: too much for a proxy's hot path.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def run_until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start, wait for SIGTERM or SIGINT, stop. The stop callable owns its deadline."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await start()
    await stopped.wait()
    await stop()


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# How long a stopping process may take to flush its last spans and metrics (after the
# service's own shutdown deadline; both fit in the pod's grace period).
TELEMETRY_FLUSH_DEADLINE = timedelta(seconds=5)


def start_telemetry(name: str, env: Env) -> Telemetry:
    """The process's telemetry from the ``OTEL_*`` variables (see spendgate_common.telemetry).
    Raises ConfigurationError naming a malformed variable."""
    return Telemetry.start(TelemetrySettings.from_env(env), name)


def service_main(name: str, build: Callable[[Env, Telemetry], Service]) -> None:
    """``python -m spendgate_<name>``: JSON logs, telemetry and settings from the
    environment, run until SIGTERM or SIGINT, flush telemetry. A configuration error exits
    at once, naming the variable."""
    configure_logging(name)
    env = Env()
    try:
        telemetry = start_telemetry(name, env)
        service = build(env, telemetry)
    except ConfigurationError as error:
        sys.exit(f"spendgate {name}: configuration error: {error}")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run_until_signalled(service.start, service.stop))
    finally:
        telemetry.shutdown(TELEMETRY_FLUSH_DEADLINE)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (Linux and macOS): the services spend
    much of their time in the loop's socket and timer handling, which it does in C."""
    try:
        import uvloop  # optional: not on Windows
    except ImportError:
        return None
    return uvloop.new_event_loop
