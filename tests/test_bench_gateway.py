"""The gateway benchmark runs end to end and writes its report (``--quick``: no timing
assertions, those are for a quiet machine; see bench/gateway/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPOSITORY = Path(__file__).resolve().parents[1]
# A quick run takes about 10 s (most of it starting Postgres, the ledger and the gateway).
QUICK_RUN_TIMEOUT_S = 120


def test_quick_run_writes_the_report(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPENDGATE_")}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gateway",
            "--quick",
            "--keys",
            "2",
            "--rates",
            "100",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert "added p50" in completed.stdout
    [path] = tmp_path.glob("gateway-2*.json")
    assert (tmp_path / "gateway-latest.json").read_bytes() == path.read_bytes()
    report = json.loads(path.read_text())

    assert report["settings"]["quick"] is True
    assert report["settings"]["keys"] == [2]
    assert report["search"] is None
    assert report["ledger_runs"] == []
    # One direct run and one proxied run (per key count), at the one rate.
    runs = report["runs"]
    assert [(run["target"], run["keys"]) for run in runs] == [("direct", None), ("gateway", 2)]
    for run in runs:
        assert run["rate_per_s"] == 100
        assert run["scheduled"] > 0
        assert run["latency"]["count"] == run["scheduled"], run
        assert run["statuses"] == {"200": run["scheduled"]}, run
        assert run["errors"] == run["dropped"] == run["unanswered"] == 0, run
        assert {"p50_ms", "p99_ms", "p999_ms", "max_ms"} <= run["latency"].keys()
        assert {"gateway", "upstream", "ledger", "clients", "other"} <= run["cores"].keys()
    points = report["points"]
    assert [(point["rate_per_s"], point["keys"]) for point in points] == [(100, 2)]
    for point in points:
        assert point["added_p50_ms"] == pytest.approx(
            point["gateway_p50_ms"] - point["direct_p50_ms"], abs=0.01
        )
        assert point["added_p99_ms"] == pytest.approx(
            point["gateway_p99_ms"] - point["direct_p99_ms"], abs=0.01
        )
        assert point["gateway_cpu_us_per_call"] > 0
    # Every call that reached the upstream through the gateway was committed, none is held.
    checks = report["checks"]
    assert checks["consistent"] is True
    assert checks["reserved_micros"] == 0
    assert checks["upstream_calls_via_gateway"] == checks["gateway_2xx_seen_by_clients"] > 0
    assert report["environment"]["gateway_runtime"]["uvicorn"]
