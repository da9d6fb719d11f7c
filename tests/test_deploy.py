"""The deployment: deploy/check.py passes on the repository and fails on broken manifests;
the image's ops scripts (ledger probes, stream setup) against a real ledger and NATS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import nats
import pytest

from deploy import check
from deploy.ops import ensure_stream, ledger_probe
from deploy.ops.ledger_probe import ReplicaView, judge
from spendgate_common.settings import StreamSettings
from spendgate_common.subjects import EVENTS_STREAM, EVENTS_SUBJECTS
from tests.harness import ServiceFactory

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
LEASE = timedelta(seconds=5)


def test_deploy_check_passes_on_the_repository() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy.check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deploy-check: ok" in result.stdout


# (file under deploy/k8s, text, its replacement, words of the problem it must cause)
MUTATIONS = [
    ("base/ledger.yaml", "revisionHistoryLimit: 5", "revisionHistoryLimt: 5", "schema"),
    ("base/ledger.yaml", "terminationGracePeriodSeconds: 40", "terminationGracePeriodSeconds: 15",
     "shutdown deadline"),
    ("base/kustomization.yaml", "- SPENDGATE_LEDGER_LEASE_MS=5000",
     "- SPENDGATE_LEDGER_LEASE_SECONDS=5", "configuration table"),
    ("base/network-policies.yaml", "component: gateway\n  policyTypes",
     "component: ledger\n  policyTypes", "may reach the internet"),
    ("base/gateway.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false",
     "root filesystem is writable"),
    ("base/auditor.yaml", "drop: [\"ALL\"]", "drop: [\"NET_RAW\"]", "drop ALL"),
    ("base/jobs.yaml", "name: spendgate-postgres-app", "name: spendgate-pg-app",
     "neither rendered nor documented"),
    ("base/kustomization.yaml", "  - auditor.yaml\n", "  - auditors.yaml\n", "kustomize failed"),
    ("overlays/prod/kustomization.yaml", "patches:",
     "secretGenerator:\n  - name: spendgate-admin\n    literals: [SPENDGATE_ADMIN_TOKEN=x]\n"
     "patches:",
     "renders a Secret"),
    ("overlays/prod/postgres.yaml", "instances: 3", "instances: 2", "Postgres instances"),
    ("base/gateway.yaml", "port: 8080\n      targetPort", "port: http\n      targetPort", "schema"),
    ("components/observability/service-monitor.yaml", "- port: http", "- port: metrics",
     "finds no port"),
    ("nats/values-prod.yaml", "replicas: 3", "replicas: 1", "3 nodes"),
    ("base/gateway.yaml", "apiVersion: policy/v1", "apiVersion: policy/v1beta1", "no schema"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "text", "replacement", "expected"), MUTATIONS)
def test_deploy_check_fails_on_a_broken_manifest(
    tmp_path: Path, path: str, text: str, replacement: str, expected: str
) -> None:
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    target = k8s / path
    original = target.read_text("utf-8")
    assert original.count(text) == 1, f"the mutation's text is not unique in {path}"
    target.write_text(original.replace(text, replacement), "utf-8")

    report = check.check_all(k8s)

    assert any(expected in problem for problem in report.problems), report.problems


TILT_MUTATIONS = [
    ('["ledger", "auditor", "fake-stripe"]', '["ledger", "fake-stripe"]',
     "gateway should wait for auditor"),
    ('spendgate_resource("spendgate-migrate", "migrate", ["postgres"])',
     'spendgate_resource("spendgate-migrate", "migrate", ["postgress"])', "unknown postgress"),
    ('"spendgate-auditor", "auditor"', '"spendgate-auditors", "auditor"', "not in the dev overlay"),
    ('("libs/cli", "spendgate_cli")', '("libs/client", "spendgate_cli")', "does not exist"),
    ('port_forwards = ["8080:8080"],', "", "not port-forwarded"),
    ("def main():", "def main()", "Tiltfile"),
    ('load("ext://restart_process", "docker_build_with_restart")',
     'load("ext://restart_process", "docker_build_with_restart", "custom_build_with_restart")',
     "unknown extension"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "replacement", "expected"), TILT_MUTATIONS)
def test_tiltfile_check_fails_on_a_broken_tiltfile(
    text: str, replacement: str, expected: str
) -> None:
    report = check.Report()
    dev = check.render(report, "dev", K8S / "overlays" / "dev")
    tiltfile = (ROOT / "Tiltfile").read_text("utf-8")
    assert tiltfile.count(text) == 1

    check.check_tiltfile(report, dev, tiltfile.replace(text, replacement))

    assert any(expected in problem for problem in report.problems), report.problems


def test_selector_semantics() -> None:
    labels = {"app": "spendgate", "tier": "ledger"}
    assert check.selector_matches({"matchLabels": {"app": "spendgate"}}, labels)
    assert not check.selector_matches({"matchLabels": {"app": "nats"}}, labels)
    expression = {"key": "tier", "operator": "In", "values": ["gateway", "ledger"]}
    assert check.selector_matches({"matchExpressions": [expression]}, labels)
    assert not check.selector_matches(
        {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels
    )
    assert check.selector_matches({}, labels)


# ------------------------------------------------------------------------ ledger probes


def view(expired_for_s: float | None, owned: int = 0, unowned: int = 0) -> ReplicaView:
    expired_for = None if expired_for_s is None else timedelta(seconds=expired_for_s)
    return ReplicaView(heartbeat_expired_for=expired_for, owned=owned, unowned=unowned)


@pytest.mark.parametrize(
    ("check_name", "replica", "passes"),
    [
        ("started", None, False),
        ("started", view(None), False),
        ("started", view(-3), True),
        ("started", view(1), False),
        ("ready", None, False),
        ("ready", view(-3, owned=0, unowned=4), False),
        ("ready", view(-3, owned=21, unowned=4), True),
        ("ready", view(-3, owned=0, unowned=0), True),  # a standby
        ("ready", view(2, owned=21), False),  # its heartbeat lapsed
        ("live", None, True),  # Postgres away: cannot judge
        ("live", view(None), False),
        ("live", view(-3), True),
        ("live", view(50), True),  # 55 s since the heartbeat: still within 60 s
        ("live", view(56), False),
    ],
)
def test_probe_judgement(
    check_name: ledger_probe.Check, replica: ReplicaView | None, passes: bool
) -> None:
    passed, reason = judge(check_name, replica, LEASE)
    assert passed is passes, reason


@pytest.mark.e2e
async def test_ledger_probes_follow_a_real_ledger(
    service_factory: ServiceFactory, database_url: str, nats_url: str
) -> None:
    prefix = ledger_probe.owner_prefix()  # the harness runs the ledger on this host
    # Before any ledger: no tables yet, nothing heartbeats.
    before = await ledger_probe.read_view(database_url, prefix)
    assert not judge("started", before, LEASE)[0]
    assert not judge("ready", before, LEASE)[0]

    env = {
        "SPENDGATE_DATABASE_URL": database_url,
        "SPENDGATE_NATS_URL": nats_url,
        "SPENDGATE_PARTITION_COUNT": "4",
        "SPENDGATE_LEDGER_LEASE_MS": "1000",
        "SPENDGATE_SHUTDOWN_DEADLINE_SECONDS": "5",
    }
    ledger = await asyncio.to_thread(service_factory, "ledger", env)
    running = await ledger_probe.read_view(database_url, prefix)
    assert running is not None
    assert running.owned == 4
    for name in ("started", "ready", "live"):
        passed, reason = judge(name, running, timedelta(seconds=1))
        assert passed, f"{name}: {reason}"

    # Postgres unreachable (nothing listens on port 1): only liveness passes.
    away = await ledger_probe.read_view("postgresql://nobody@127.0.0.1:1/none", prefix)
    assert away is None
    assert judge("live", away, LEASE)[0]
    assert not judge("ready", away, LEASE)[0]

    # SIGTERM: the replica leaves and gives its leases up.
    assert await asyncio.to_thread(ledger.terminate) == 0
    gone = await ledger_probe.read_view(database_url, prefix)
    assert gone is not None
    assert (gone.owned, gone.unowned) == (0, 4)
    assert not judge("ready", gone, LEASE)[0]
    assert not judge("live", gone, LEASE)[0]


async def test_stream_setup_creates_the_stream_idempotently(nats_url: str) -> None:
    week = StreamSettings(replicas=1, max_age=timedelta(days=7))
    first = await ensure_stream.ensure_stream(nats_url, week)
    second = await ensure_stream.ensure_stream(nats_url, week)
    assert first.startswith(f"stream {EVENTS_STREAM}: subjects {', '.join(EVENTS_SUBJECTS)}")
    assert second == first
    client = await nats.connect(nats_url)
    try:
        info = await client.jetstream().stream_info(EVENTS_STREAM)
    finally:
        await client.close()
    assert info.config.subjects == EVENTS_SUBJECTS
    # What the settings say, not the library's defaults (each start applies them again).
    assert info.config.max_age == timedelta(days=7).total_seconds()
    assert (info.config.num_replicas or 1) == 1
