"""Test harness: real Spendgate service processes wired to real NATS and Postgres.

* :func:`start_service` runs ``python -m spendgate_<kind>`` and returns once it is ready
  (ledger and auditor: their "started" log line; gateway: ``GET /healthz`` is 200).
* :func:`start_fake_vendor` runs ``spendgate fake-vendor <vendor>`` on a free port.
* :class:`ServiceFactory` (the ``service_factory`` fixture) starts several at once.
* :func:`build_stack` wires fake Stripe, ledger, auditor and gateway together
  (the ``spendgate_stack`` fixture).

Every process started here is recorded; the conftest stops whatever is still running at
the end of each test (before its NATS and database go away), so no process outlives the
test that started it. Services get ``os.environ`` without its ``SPENDGATE_*`` and
``OTEL_*`` variables (a developer's shell settings must not change what a test does) plus
the given ``env``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from spendgate_cli.processes import free_port, tcp_accepts
from spendgate_cli.services import (
    ServiceKind,
    ServiceProcess,
    ServiceStartError,
    readiness_probe,
    service_argv,
)

__all__ = [
    "FAKE_STRIPE_API_KEY",
    "FAKE_TWILIO_ACCOUNT_SID",
    "FAKE_VENDOR_API_KEYS",
    "FakeVendorProcess",
    "ServiceFactory",
    "ServiceKind",
    "ServiceProcess",
    "ServiceStartError",
    "Stack",
    "build_stack",
    "free_port",
    "spawn_program",
    "start_fake_vendor",
    "start_service",
    "started_processes",
    "stop_processes",
]

READY_TIMEOUT_S_DEFAULT = 30.0
# Bound of a graceful stop at teardown; the stack's services are told to finish sooner
# (SPENDGATE_SHUTDOWN_DEADLINE_SECONDS below), so this is only reached by a hung process.
TERMINATE_TIMEOUT_S_DEFAULT = 15.0
STACK_SHUTDOWN_DEADLINE_SECONDS = 5
STACK_PARTITION_COUNT = 8
FAKE_STRIPE_API_KEY = "sk_test_fake_upstream_key"
# The upstream key the gateway gets for each fake vendor a stack starts (build_stack).
FAKE_VENDOR_API_KEYS = {
    "stripe": FAKE_STRIPE_API_KEY,
    "openai": "sk-test-fake-openai-upstream-key",
    "anthropic": "sk-ant-test-fake-upstream-key",
    "twilio": "fake_twilio_upstream_auth_token",
    "resend": "re_test_fake_upstream_key",
}
# The real account SID the gateway puts in Twilio paths (any SID works with the fake).
FAKE_TWILIO_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
# Settings a vendor needs besides its base URL and key.
FAKE_VENDOR_EXTRA_ENV = {"twilio": {"SPENDGATE_TWILIO_ACCOUNT_SID": FAKE_TWILIO_ACCOUNT_SID}}

_log_dir: Path | None = None
_log_numbers = itertools.count(1)
# Every process started through this module, in start order; see stop_processes().
_started: list[ServiceProcess] = []
_started_lock = threading.Lock()


def configure_log_dir(path: Path) -> None:
    """Where service logs go (the conftest points it into pytest's tmp directory)."""
    global _log_dir
    _log_dir = path


def _next_log_path(name: str, log_dir: Path | None) -> Path:
    global _log_dir
    if log_dir is None:
        if _log_dir is None:
            _log_dir = Path(tempfile.mkdtemp(prefix="spendgate-test-logs-"))
        log_dir = _log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"{next(_log_numbers):04d}-{name}.log"


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    # Neither Spendgate's settings nor OpenTelemetry's (OTEL_*) from the developer's shell:
    # a test turns tracing on by passing the variables itself.
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SPENDGATE_", "OTEL_"))
    }
    return {**inherited, "PYTHONUNBUFFERED": "1", **env}


def _record(process: ServiceProcess) -> ServiceProcess:
    with _started_lock:
        _started.append(process)
    return process


def started_processes() -> list[ServiceProcess]:
    """Every process started through this module since :func:`forget_processes`."""
    with _started_lock:
        return list(_started)


def forget_processes() -> None:
    """Start a new record (the conftest calls it after each test, once all are stopped)."""
    with _started_lock:
        _started.clear()


def stop_processes(timeout_s: float = TERMINATE_TIMEOUT_S_DEFAULT) -> None:
    """SIGTERM every recorded process still running, all at once; SIGKILL the stragglers.

    Idempotent: processes that already exited are left alone. Called at teardown.
    """
    running = [process for process in started_processes() if process.is_running]
    for process in running:
        process.send_signal(signal.SIGTERM)
    give_up_at = time.monotonic() + timeout_s
    for process in running:
        if process.wait(max(0.0, give_up_at - time.monotonic())) is None:
            process.kill()


# ------------------------------------------------------------------------------ services


def spawn_service(
    kind: ServiceKind, env: Mapping[str, str], *, log_dir: Path | None = None
) -> ServiceProcess:
    """Start ``python -m spendgate_<kind>`` without waiting; see :func:`wait_service_ready`."""
    if kind == "gateway" and "SPENDGATE_GATEWAY_PORT" not in env:
        # Its default, 8080, may belong to something else on this machine, whose /healthz
        # would then pass for ours.
        raise ValueError("start the gateway with SPENDGATE_GATEWAY_PORT set (see free_port())")
    log_path = _next_log_path(kind, log_dir)
    return _record(ServiceProcess.spawn(kind, service_argv(kind), _child_env(env), log_path))


def wait_service_ready(
    process: ServiceProcess,
    kind: ServiceKind,
    env: Mapping[str, str],
    *,
    ready_timeout_s: float = READY_TIMEOUT_S_DEFAULT,
) -> None:
    """Return once ``process`` is ready; raise :class:`ServiceStartError` with its log tail."""
    probe = readiness_probe(kind, _child_env(env), process)
    process.wait_ready(probe, timedelta(seconds=ready_timeout_s))


def start_service(
    kind: ServiceKind,
    env: Mapping[str, str],
    *,
    ready_timeout_s: float = READY_TIMEOUT_S_DEFAULT,
    log_dir: Path | None = None,
) -> ServiceProcess:
    """Start ``python -m spendgate_<kind>`` with ``env`` and wait until it is ready.

    The ledger needs SPENDGATE_DATABASE_URL and SPENDGATE_NATS_URL; the gateway needs
    SPENDGATE_GATEWAY_PORT (and SPENDGATE_ADMIN_TOKEN). Raises :class:`ServiceStartError`
    with the tail of the log when the process exits or is not ready within
    ``ready_timeout_s`` seconds. Safe to call from a worker thread (``asyncio.to_thread``).
    """
    process = spawn_service(kind, env, log_dir=log_dir)
    wait_service_ready(process, kind, env, ready_timeout_s=ready_timeout_s)
    return process


def spawn_program(
    name: str, argv: Sequence[str], env: Mapping[str, str], *, log_dir: Path | None = None
) -> ServiceProcess:
    """Start a helper program (a load client, ...) without waiting for anything.

    It is recorded like a service: stopped at the test's teardown, its log tail shown when
    the test fails. It gets ``os.environ`` without ``SPENDGATE_*`` plus ``env``.
    """
    log_path = _next_log_path(name, log_dir)
    return _record(ServiceProcess.spawn(name, list(argv), _child_env(env), log_path))


# --------------------------------------------------------------------------- fake vendor


@dataclass(frozen=True, slots=True)
class FakeVendorProcess:
    """A ``spendgate fake-vendor`` subprocess serving ``url`` (no trailing slash)."""

    vendor: str
    url: str
    port: int
    process: ServiceProcess

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.process.kill()

    def terminate(self, timeout_s: float = TERMINATE_TIMEOUT_S_DEFAULT) -> int:
        return self.process.terminate(timeout_s)

    def logs(self) -> str:
        return self.process.logs()


def spawn_fake_vendor(
    vendor: str = "stripe", *, port: int | None = None, log_dir: Path | None = None
) -> FakeVendorProcess:
    """Start the fake vendor on 127.0.0.1 without waiting (ready when its port accepts)."""
    port = free_port() if port is None else port
    argv = [sys.executable, "-m", "spendgate_cli", "fake-vendor", vendor]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    name = f"fake-{vendor}"
    process = ServiceProcess.spawn(name, argv, _child_env({}), _next_log_path(name, log_dir))
    return FakeVendorProcess(vendor, f"http://127.0.0.1:{port}", port, _record(process))


def wait_fake_vendor_ready(
    fake: FakeVendorProcess, *, ready_timeout_s: float = READY_TIMEOUT_S_DEFAULT
) -> None:
    fake.process.wait_ready(
        lambda: tcp_accepts("127.0.0.1", fake.port), timedelta(seconds=ready_timeout_s)
    )


def start_fake_vendor(
    vendor: str = "stripe",
    *,
    port: int | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S_DEFAULT,
    log_dir: Path | None = None,
) -> FakeVendorProcess:
    """Start ``spendgate fake-vendor <vendor>`` on a free port; return once it accepts TCP."""
    fake = spawn_fake_vendor(vendor, port=port, log_dir=log_dir)
    wait_fake_vendor_ready(fake, ready_timeout_s=ready_timeout_s)
    return fake


# ---------------------------------------------------------------------------- factory


class ServiceFactory:
    """Starts services for one test, logging into ``log_dir``; stops them in :meth:`close`.

    ``factory(kind, env)`` is :meth:`start`. :meth:`start_many` starts several in parallel
    (spawn all, then wait for each), which is how the stack starts in about a second.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    def __call__(
        self,
        kind: ServiceKind,
        env: Mapping[str, str],
        *,
        ready_timeout_s: float = READY_TIMEOUT_S_DEFAULT,
    ) -> ServiceProcess:
        return self.start(kind, env, ready_timeout_s=ready_timeout_s)

    def start(
        self,
        kind: ServiceKind,
        env: Mapping[str, str],
        *,
        ready_timeout_s: float = READY_TIMEOUT_S_DEFAULT,
    ) -> ServiceProcess:
        """Like :func:`start_service`, logging into this factory's directory."""
        return start_service(kind, env, ready_timeout_s=ready_timeout_s, log_dir=self.log_dir)

    def start_many(
        self,
        kinds: Mapping[ServiceKind, Mapping[str, str]],
        *,
        ready_timeout_s: float = READY_TIMEOUT_S_DEFAULT,
    ) -> dict[ServiceKind, ServiceProcess]:
        """Start one process per ``kind -> env`` entry concurrently; return once all are ready."""
        spawned = {
            kind: spawn_service(kind, env, log_dir=self.log_dir) for kind, env in kinds.items()
        }
        for kind, process in spawned.items():
            wait_service_ready(process, kind, kinds[kind], ready_timeout_s=ready_timeout_s)
        return spawned

    def fake_vendor(
        self,
        vendor: str = "stripe",
        *,
        port: int | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S_DEFAULT,
    ) -> FakeVendorProcess:
        return start_fake_vendor(
            vendor, port=port, ready_timeout_s=ready_timeout_s, log_dir=self.log_dir
        )

    def close(self, timeout_s: float = TERMINATE_TIMEOUT_S_DEFAULT) -> None:
        """Stop every process started in this test (the same as :func:`stop_processes`)."""
        stop_processes(timeout_s)


# ------------------------------------------------------------------------------- stack


@dataclass(frozen=True, slots=True)
class Stack:
    """Fake Stripe, ledger, auditor and gateway processes wired together for one test.

    ``env`` is what the services were started with: start another replica (or restart a
    killed one) with ``service_factory("ledger", stack.env)``.
    """

    gateway_url: str
    admin_token: str
    fake_stripe_url: str
    database_url: str
    nats_url: str
    services: dict[str, ServiceProcess]
    fake: FakeVendorProcess
    env: dict[str, str]
    # Every fake vendor the stack started, by vendor name (Stripe's is ``fake`` too).
    fakes: dict[str, FakeVendorProcess] = field(default_factory=dict)

    def fake_url(self, vendor: str) -> str:
        """Base URL of the fake ``vendor`` (started with ``build_stack(vendors=...)``)."""
        return self.fakes[vendor].url


def stack_env(
    *,
    nats_url: str,
    database_url: str,
    fake_stripe_url: str,
    gateway_port: int,
    admin_token: str,
    partition_count: int = STACK_PARTITION_COUNT,
) -> dict[str, str]:
    """The environment of a test stack's services."""
    return {
        "SPENDGATE_NATS_URL": nats_url,
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_ADMIN_TOKEN": admin_token,
        "SPENDGATE_GATEWAY_HOST": "127.0.0.1",
        "SPENDGATE_GATEWAY_PORT": str(gateway_port),
        "SPENDGATE_STRIPE_BASE_URL": fake_stripe_url,
        "SPENDGATE_STRIPE_API_KEY": FAKE_STRIPE_API_KEY,
        "SPENDGATE_PARTITION_COUNT": str(partition_count),
        # Teardown after a test that killed NATS or Postgres should not wait 20 s per service.
        "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS": str(STACK_SHUTDOWN_DEADLINE_SECONDS),
    }


def build_stack(
    factory: ServiceFactory,
    *,
    nats_url: str,
    database_url: str,
    partition_count: int = STACK_PARTITION_COUNT,
    extra_env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 60.0,
    vendors: Sequence[str] = ("stripe",),
) -> Stack:
    """Start fake Stripe, then ledger, auditor and gateway in parallel; return when ready.

    ``extra_env`` adds or overrides service settings (e.g. a short ledger lease).
    ``vendors`` names the fake vendors to start (Stripe's always runs); the gateway gets
    ``SPENDGATE_<VENDOR>_BASE_URL`` and ``_API_KEY`` (:data:`FAKE_VENDOR_API_KEYS`) for each.
    """
    spawned = {
        vendor: spawn_fake_vendor(vendor, log_dir=factory.log_dir)
        for vendor in dict.fromkeys(("stripe", *vendors))
    }
    for spawned_fake in spawned.values():
        wait_fake_vendor_ready(spawned_fake, ready_timeout_s=ready_timeout_s)
    fake = spawned["stripe"]
    env = stack_env(
        nats_url=nats_url,
        database_url=database_url,
        fake_stripe_url=fake.url,
        gateway_port=free_port(),
        admin_token=secrets.token_urlsafe(24),
        partition_count=partition_count,
    )
    for vendor, vendor_fake in spawned.items():
        env[f"SPENDGATE_{vendor.upper()}_BASE_URL"] = vendor_fake.url
        env[f"SPENDGATE_{vendor.upper()}_API_KEY"] = FAKE_VENDOR_API_KEYS[vendor]
        env.update(FAKE_VENDOR_EXTRA_ENV.get(vendor, {}))
    env.update(extra_env or {})
    services = factory.start_many(
        {"ledger": env, "auditor": env, "gateway": env}, ready_timeout_s=ready_timeout_s
    )
    return Stack(
        gateway_url=f"http://127.0.0.1:{env['SPENDGATE_GATEWAY_PORT']}",
        admin_token=env["SPENDGATE_ADMIN_TOKEN"],
        fake_stripe_url=fake.url,
        database_url=database_url,
        nats_url=nats_url,
        services={str(kind): process for kind, process in services.items()},
        fake=fake,
        env=env,
        fakes=spawned,
    )
