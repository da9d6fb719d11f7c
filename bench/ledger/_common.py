"""Helpers shared by the benchmark's entry points (``bench.ledger``, ``.footprint``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from bench._results import RESULTS_DIR as RESULTS_DIR
from bench.ledger._cluster import POSTGRES_SETTINGS
from spendgate_gateway._settings import LEDGER_INFLIGHT_PER_PARTITION_DEFAULT


def positive_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError("expected positive integers separated by commas")
    return values


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("SPENDGATE_"):
        raise argparse.ArgumentTypeError("expected SPENDGATE_NAME=value")
    return name, value


def setting_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.replace("_", "").isalnum():
        raise argparse.ArgumentTypeError("expected name=value")
    return name, value


def add_cluster_arguments(parser: argparse.ArgumentParser, *, replicas: bool) -> None:
    """The options both benchmarks share: load processes, partitions, ledger and Postgres."""
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--client-inflight",
        type=int,
        default=LEDGER_INFLIGHT_PER_PARTITION_DEFAULT,
        help="NATS requests in flight per partition per client (the gateway's default)",
    )
    parser.add_argument("--partitions", type=int, default=64, help="ledger partition count")
    if replicas:
        parser.add_argument("--replicas", type=int, default=1, help="ledger processes (1 owns all)")
    parser.add_argument(
        "--ledger-env",
        type=env_pair,
        action="append",
        default=[],
        metavar="SPENDGATE_NAME=value",
        help="extra ledger setting (repeatable), e.g. SPENDGATE_LEDGER_BATCH_COMMANDS_MAX=4096",
    )
    parser.add_argument(
        "--postgres-setting",
        type=setting_pair,
        action="append",
        default=[],
        metavar="name=value",
        help=(
            "Postgres setting (repeatable) on top of the defaults"
            f" {', '.join(f'{k}={v}' for k, v in POSTGRES_SETTINGS.items())};"
            " fsync and synchronous_commit stay on unless set here"
        ),
    )
    parser.add_argument(
        "--nats-store-dir",
        type=Path,
        default=None,
        help=(
            "directory for JetStream's store (default: the run's temporary directory, on the"
            " same disk as Postgres). In production JetStream and Postgres run on separate"
            " machines; here the kernel's periodic writeback of the stream's files can delay"
            " Postgres's WAL flushes by tens of ms. A directory on another disk, or on tmpfs"
            " (/dev/shm) to emulate one, measures without that interference"
        ),
    )


def progress(message: str, *, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as whole numbers allow (zeros dropped)."""
    shares = [total // parts + (1 if index < total % parts else 0) for index in range(parts)]
    return [share for share in shares if share > 0]


async def _postgres_settings(database_url: str) -> dict[str, object]:
    connection = await asyncpg.connect(database_url)
    try:
        names = (
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "wal_sync_method",
            "wal_init_zero",
            "max_wal_size",
            "wal_buffers",
            "shared_buffers",
        )
        return {name: await connection.fetchval(f"SHOW {name}") for name in names}
    finally:
        await connection.close()


def postgres_settings(database_url: str) -> dict[str, object]:
    """The durability and WAL settings the server runs with (as SHOW reports them)."""
    return asyncio.run(_postgres_settings(database_url))


def git_revision() -> str:
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return described.stdout.strip()


def environment(postgres: dict[str, object]) -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_revision(),
        "postgres": postgres,
    }
