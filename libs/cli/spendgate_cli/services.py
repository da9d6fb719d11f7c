"""Spendgate services (and helper programs) as child processes, with readiness checks.

Used by ``spendgate up`` and by the test harness. A service is ready when:

* ledger: it logged a JSON line whose ``message`` starts with ``"ledger "`` and contains
  ``" started"`` (after it applied migrations, created the stream and claimed leases);
* auditor: it logged a JSON line whose ``message`` starts with ``"auditor started"``;
* gateway: ``GET http://SPENDGATE_GATEWAY_HOST:SPENDGATE_GATEWAY_PORT/healthz`` is 200.

Each child writes stdout and stderr to one log file (appended, so restarts keep history);
readiness only looks at what was written after this start.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Literal, get_args

import httpx

from spendgate_cli.processes import (
    REAP_DEADLINE,
    die_with_parent,
    log_tail,
    signal_group,
    stop_process,
    wait_until,
)
from spendgate_common.errors import SpendgateError
from spendgate_common.settings import Env

ServiceKind = Literal["ledger", "gateway", "auditor"]
SERVICE_KINDS: tuple[ServiceKind, ...] = get_args(ServiceKind)

# Bound of one readiness HTTP request to the gateway.
HEALTH_PROBE_TIMEOUT = timedelta(seconds=1)
# How often readiness is polled.
READY_POLL_INTERVAL = timedelta(milliseconds=50)
# Most bytes of new log output scanned per readiness poll; a service logging faster than
# this during start is still scanned, just over several polls.
READY_SCAN_BYTES_MAX = 1_048_576


class ServiceStartError(SpendgateError):
    """A child process exited or was not ready in time. ``log_tail`` quotes its log."""

    def __init__(self, name: str, problem: str, log_tail: str) -> None:
        message = f"{name}: {problem}"
        if log_tail:
            message += f"\n--- last lines of the {name} log ---\n{log_tail.rstrip()}"
        super().__init__(message)
        self.name = name
        self.problem = problem
        self.log_tail = log_tail


class ServiceProcess:
    """One child process whose stdout and stderr go to ``log_path``.

    The child runs in its own session and, on Linux, gets ``parent_death_signal`` when the
    process that started it dies, so neither a Ctrl-C nor a crashed supervisor leaves it
    running unnoticed.
    """

    def __init__(
        self, name: str, process: subprocess.Popen[bytes], log_path: Path, log_offset: int
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.log_offset = log_offset
        self._process = process

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        parent_death_signal: signal.Signals = signal.SIGTERM,
    ) -> ServiceProcess:
        """Start ``argv`` with exactly ``env`` (not merged with ours); do not wait."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                list(argv),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(parent_death_signal),
            )
        return cls(name, process, log_path, offset)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process ended (negative: killed by that signal)."""
        return self._process.poll()

    @property
    def is_running(self) -> bool:
        return self._process.poll() is None

    def wait_ready(self, ready: Callable[[], bool], deadline: timedelta) -> None:
        """Return once ``ready()``; raise :class:`ServiceStartError` on exit or timeout.

        On timeout the process is killed, so a failed start leaves nothing behind.
        """
        if wait_until(
            ready, deadline=deadline, poll_interval=READY_POLL_INTERVAL, alive=self._alive
        ):
            return
        code = self._process.poll()
        if code is None:
            self.kill()
            problem = f"not ready within {deadline.total_seconds():.0f} s"
        else:
            problem = f"exited with code {code} while starting"
        raise ServiceStartError(self.name, problem, self.log_tail())

    def _alive(self) -> bool:
        return self._process.poll() is None

    def send_signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process (ignored when it already exited)."""
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signum)

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` seconds for the exit; the exit code, or None if running."""
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the process (and its process group) and reap it."""
        signal_group(self._process, signal.SIGKILL)
        self._process.wait(timeout=REAP_DEADLINE.total_seconds())

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout_s`` seconds, then SIGKILL; return the exit code."""
        return stop_process(self._process, signal.SIGTERM, timedelta(seconds=timeout_s))

    def logs(self) -> str:
        """Everything this process wrote since it started (not earlier runs' output)."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode("utf-8", errors="replace")

    def log_tail(self) -> str:
        """The last few kilobytes this process wrote."""
        return log_tail(self.log_path, offset=self.log_offset)

    def __repr__(self) -> str:
        return f"<ServiceProcess {self.name} pid={self.pid} returncode={self.returncode}>"


def service_argv(kind: ServiceKind) -> list[str]:
    """``python -m spendgate_<kind>`` with this interpreter."""
    assert kind in SERVICE_KINDS, kind
    return [sys.executable, "-m", f"spendgate_{kind}"]


def start_service(
    kind: ServiceKind,
    env: Mapping[str, str],
    log_path: Path,
    *,
    ready_deadline: timedelta,
) -> ServiceProcess:
    """Start one service with exactly ``env`` and wait until it is ready (see module doc).

    Raises :class:`ServiceStartError` with the log tail when it exits or is not ready
    within ``ready_deadline`` (then it is killed).
    """
    service = ServiceProcess.spawn(kind, service_argv(kind), env, log_path)
    service.wait_ready(readiness_probe(kind, env, service), ready_deadline)
    return service


def readiness_probe(
    kind: ServiceKind, env: Mapping[str, str], service: ServiceProcess
) -> Callable[[], bool]:
    """A cheap, repeatable check that ``service`` of ``kind`` is ready."""
    if kind == "gateway":
        return gateway_health_probe(gateway_url(env))
    prefix, needle = ("ledger ", " started") if kind == "ledger" else ("auditor started", "")
    return LogLineProbe(
        service.log_path,
        service.log_offset,
        lambda message: message.startswith(prefix) and needle in message,
    )


def gateway_url(env: Mapping[str, str]) -> str:
    """The gateway's base URL from SPENDGATE_GATEWAY_HOST/PORT in ``env`` (its defaults)."""
    settings = Env(env)
    host = settings.text("SPENDGATE_GATEWAY_HOST", "127.0.0.1")
    port = settings.integer("SPENDGATE_GATEWAY_PORT", 8080, minimum=1, maximum=65_535)
    # A wildcard bind address is not something to connect to; loopback reaches it.
    connect_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    if ":" in connect_host:
        connect_host = f"[{connect_host}]"
    return f"http://{connect_host}:{port}"


def gateway_health_probe(base_url: str) -> Callable[[], bool]:
    def healthy() -> bool:
        try:
            response = httpx.get(
                f"{base_url}/healthz", timeout=HEALTH_PROBE_TIMEOUT.total_seconds()
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    return healthy


class LogLineProbe:
    """True once a JSON log line after ``offset`` has a ``message`` that ``matches``.

    Reads the log incrementally: each call scans only what was appended since the last.
    Lines that are not JSON objects (a traceback, a library's print) are skipped.
    """

    def __init__(self, log_path: Path, offset: int, matches: Callable[[str], bool]) -> None:
        self._log_path = log_path
        self._offset = offset
        self._matches = matches
        self._partial = b""
        self._found = False

    def __call__(self) -> bool:
        if self._found:
            return True
        try:
            with self._log_path.open("rb") as log:
                log.seek(self._offset)
                chunk = log.read(READY_SCAN_BYTES_MAX)
        except FileNotFoundError:
            return False
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        self._found = any(self._line_matches(line) for line in lines)
        return self._found

    def _line_matches(self, line: bytes) -> bool:
        if not line.startswith(b"{"):
            return False
        try:
            record = json.loads(line)
        except ValueError:
            return False
        message = record.get("message") if isinstance(record, dict) else None
        return isinstance(message, str) and self._matches(message)
