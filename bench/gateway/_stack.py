"""What the gateway benchmark runs against: the ledger benchmark's cluster (embedded NATS,
durable Postgres, one ledger process), plus the bench upstream and one gateway process.

The gateway is ``python -m spendgate_gateway`` (uvicorn, one worker), configured only
through its environment, as in production; ``gateway_env`` adds or overrides variables
(``SPENDGATE_*`` settings, or ``OTEL_*`` and the like for tracing experiments). Keys are
issued through the gateway's own ``POST /v1/keys``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import msgspec

import bench
from bench.ledger._cluster import Cluster
from spendgate_cli.processes import free_port, tcp_accepts
from spendgate_cli.services import ServiceProcess, readiness_probe, service_argv

HOST = "127.0.0.1"
# The upstream key the gateway is configured with, and the one direct calls present:
# the upstream counts calls per key, so the two kinds of calls are told apart.
GATEWAY_UPSTREAM_KEY = "sk_test_bench_gateway"
DIRECT_UPSTREAM_KEY = "sk_test_bench_direct"
GATEWAY_READY_DEADLINE = timedelta(seconds=60)
UPSTREAM_READY_DEADLINE = timedelta(seconds=30)
STOP_DEADLINE = timedelta(seconds=20)
# Bound of one setup or check request (issue a key, read its usage, read counts).
ADMIN_REQUEST_TIMEOUT = timedelta(seconds=10)
# Each key's cap: far above what a benchmark spends (a call costs one cent).
KEY_CAP_USD = "1000000"
# Prints {distribution: version or null} for the gateway's hot-path libraries.
_RUNTIME_SCRIPT = """
import importlib.metadata, importlib.util, json
modules = {"uvicorn": "uvicorn", "h11": "h11", "httptools": "httptools", "uvloop": "uvloop",
           "starlette": "starlette", "fastapi": "fastapi", "httpx": "httpx",
           "httpcore": "httpcore", "nats-py": "nats", "msgspec": "msgspec"}
print(json.dumps({name: importlib.metadata.version(name) if importlib.util.find_spec(module)
                  else None for name, module in modules.items()}))
"""


class BenchKey(msgspec.Struct, frozen=True):
    key: str  # the plaintext vault key (sgk_...)
    key_id: str
    tenant: str


@dataclass(frozen=True, slots=True)
class Usage:
    committed_micros: int
    reserved_micros: int


@dataclass(slots=True)
class GatewayStack:
    cluster: Cluster
    upstream: ServiceProcess
    upstream_port: int
    gateway_env: dict[str, str]
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    gateway: ServiceProcess | None = None
    gateway_port: int = 0
    gateway_process_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        *,
        partition_count: int,
        ledger_env: Mapping[str, str],
        postgres_settings: Mapping[str, str],
        gateway_env: Mapping[str, str],
        nats_store_dir: Path | None = None,
    ) -> GatewayStack:
        """NATS, Postgres, one ledger, the upstream and one gateway, each ready."""
        cluster = Cluster.start(
            partition_count, ledger_env, postgres_settings, nats_store_dir=nats_store_dir
        )
        upstream: ServiceProcess | None = None
        try:
            cluster.start_ledgers(1)
            port = free_port(HOST)
            upstream = ServiceProcess.spawn(
                "upstream", _upstream_argv(port), _upstream_env(), cluster.root / "upstream.log"
            )
            upstream.wait_ready(lambda: tcp_accepts(HOST, port), UPSTREAM_READY_DEADLINE)
        except BaseException:
            if upstream is not None:
                upstream.terminate(STOP_DEADLINE.total_seconds())
            cluster.close(keep_data=False)
            raise
        stack = cls(cluster, upstream, port, dict(gateway_env))
        try:
            stack._start_gateway()
        except BaseException:
            stack.close(keep_data=False)
            raise
        return stack

    def _start_gateway(self) -> None:
        self.gateway_port = free_port(HOST)
        env = _base_env() | {
            "SPENDGATE_NATS_URL": self.cluster.nats_server.url,
            "SPENDGATE_PARTITION_COUNT": str(self.cluster.partition_count),
            "SPENDGATE_ADMIN_TOKEN": self.admin_token,
            "SPENDGATE_GATEWAY_HOST": HOST,
            "SPENDGATE_GATEWAY_PORT": str(self.gateway_port),
            "SPENDGATE_STRIPE_BASE_URL": f"http://{HOST}:{self.upstream_port}",
            "SPENDGATE_STRIPE_API_KEY": GATEWAY_UPSTREAM_KEY,
            "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS": "5",
            **self.gateway_env,
        }
        self.gateway_process_env = env
        log_path = self.cluster.root / "gateway.log"
        self.gateway = ServiceProcess.spawn("gateway", service_argv("gateway"), env, log_path)
        self.gateway.wait_ready(
            readiness_probe("gateway", env, self.gateway), GATEWAY_READY_DEADLINE
        )

    def gateway_runtime(self) -> dict[str, object]:
        """Versions of the libraries on the gateway's hot path, as its environment imports
        them (None: not importable). uvicorn's ``auto`` picks httptools and uvloop when they
        are importable, else h11 and asyncio's own event loop."""
        try:
            completed = subprocess.run(
                [sys.executable, "-c", _RUNTIME_SCRIPT],
                capture_output=True,
                text=True,
                timeout=ADMIN_REQUEST_TIMEOUT.total_seconds() * 3,
                check=True,
                env=self.gateway_process_env,
            )
        except (OSError, subprocess.SubprocessError) as error:
            return {"error": str(error)}
        return msgspec.json.decode(completed.stdout, type=dict[str, object])

    @property
    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.gateway_port}"

    @property
    def gateway_pid(self) -> int:
        assert self.gateway is not None
        return self.gateway.pid

    def process_ids(self) -> dict[str, list[int]]:
        """Pids by component: the cluster's, the gateway and the upstream."""
        ids = self.cluster.process_ids()
        ids["gateway"] = [self.gateway_pid]
        ids["upstream"] = [self.upstream.pid]
        return ids

    def close(self, *, keep_data: bool) -> None:
        # The gateway first (it settles its calls with the ledger on the way out).
        if self.gateway is not None:
            self.gateway.terminate(STOP_DEADLINE.total_seconds())
        self.upstream.terminate(STOP_DEADLINE.total_seconds())
        self.cluster.close(keep_data=keep_data)

    # ------------------------------------------------------------------ admin requests

    def _admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.gateway_url,
            headers={"authorization": f"Bearer {self.admin_token}"},
            timeout=ADMIN_REQUEST_TIMEOUT.total_seconds(),
            trust_env=False,
        )

    def issue_keys(self, count: int, prefix: str) -> list[BenchKey]:
        """``count`` keys with a large total cap, in tenants that spread them over as many
        partitions as there are (key ``n`` lives in tenant ``n mod partitions``)."""
        tenants = self.cluster.tenants_in_distinct_partitions(
            min(count, self.cluster.partition_count), prefix
        )
        keys = []
        with self._admin() as admin:
            for index in range(count):
                tenant = tenants[index % len(tenants)]
                response = admin.post(
                    "/v1/keys",
                    json={"label": f"{prefix}-{index}", "cap_usd": KEY_CAP_USD, "tenant": tenant},
                )
                response.raise_for_status()
                body = response.json()
                keys.append(BenchKey(body["key"], body["key_id"], tenant))
        return keys

    def usage(self, keys: list[BenchKey]) -> Usage:
        """Committed and reserved micro-USD summed over ``keys``."""
        committed = reserved = 0
        with self._admin() as admin:
            for key in keys:
                response = admin.get(f"/v1/keys/{key.key_id}", params={"tenant": key.tenant})
                response.raise_for_status()
                body = response.json()
                committed += int(body["committed_micros"])
                reserved += int(body["reserved_micros"])
        return Usage(committed, reserved)

    def upstream_calls(self) -> dict[str, int]:
        """Calls the upstream answered, by the API key they presented."""
        response = httpx.get(
            f"http://{HOST}:{self.upstream_port}/_bench/counts",
            timeout=ADMIN_REQUEST_TIMEOUT.total_seconds(),
            trust_env=False,
        )
        response.raise_for_status()
        return msgspec.json.decode(response.content, type=dict[str, int])


def _upstream_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "bench.gateway._upstream", "--host", HOST, "--port", str(port)]


def _upstream_env() -> dict[str, str]:
    """The upstream is a module of this repository, not an installed package."""
    env = _base_env()
    root = str(Path(bench.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _base_env() -> dict[str, str]:
    """Our environment without ``SPENDGATE_*`` (a shell's settings must not leak in)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPENDGATE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env
