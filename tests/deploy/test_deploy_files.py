"""The deployment files in deploy/ stay true to the code, checked without Docker or a cluster.

- ``compose.yaml``, interpolated with ``tollgate.env.example``, is valid against the Compose
  Specification's JSON schema (the copy check-jsonschema ships) and wires what the docs say:
  the migration first, one shared storage volume, healthchecks, one published port.
- Every Kubernetes manifest is valid against the Kubernetes JSON schemas of the pinned
  versions (bundled by kubernetes-validate), strictly: an unknown field is an error.
- The alert rules and the dashboard parse (PromQL by promql-parser) and query only metrics
  the code exports, with the labels and label values of the metrics contract below.
- The image runs as a fixed non-root UID, the one the manifests and compose require.
- Every environment variable the files set is a ``Settings`` field or a documented other one,
  and every command they run is a real command of the ``tollgate`` CLI.
"""

import ast
import functools
import importlib.resources
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from gateway.cli import main as tollgate_cli
from gateway.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OPERATIONS = ROOT / "docs" / "operations.md"


@pytest.fixture(scope="session", autouse=True)
def ledger_checked_after_the_suite() -> None:
    """These tests touch no database: the suite-wide ledger check of tests/conftest.py (which
    needs PostgreSQL) is replaced by nothing here, so they run on a machine without one. Run
    with the rest of the suite, the other tests still bring the real check."""


# The oldest Kubernetes the manifests support (CronJob.timeZone is 1.27+), and a recent one.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")

# The image's user; the manifests and compose.yaml must name the same.
IMAGE_UID = 10001

# Variables the deployment files may set that are not Tollgate settings, and why.
OTHER_ENVIRONMENT = {
    "PROMETHEUS_MULTIPROC_DIR": "prometheus-client: where each process keeps its metric files",
    "POSTGRES_USER": "the postgres image: the user it creates",
    "POSTGRES_DB": "the postgres image: the database it creates",
    "POSTGRES_PASSWORD": "the postgres image: that user's password (compose)",
    "HTTP_PORT": "compose: the host port of the proxy in front of the gateways",
    "MINIO_ROOT_USER": "the minio image (compose --profile s3): its root user, our S3 key id",
    "MINIO_ROOT_PASSWORD": "the minio image: that user's secret, our S3 secret key",
    "PATH": "the shell",
    "PYTHONUNBUFFERED": "Python: logs reach the container runtime at once",
    "PYTHONDONTWRITEBYTECODE": "Python: no .pyc written on a read-only filesystem",
    "PIP_DISABLE_PIP_VERSION_CHECK": "pip, in the image's builder stage",
    "PIP_NO_CACHE_DIR": "pip, in the image's builder stage",
}

# Commands the `tollgate-worker` entry point accepts (workers/main.py reads sys.argv).
WORKER_ARGUMENTS = {(), ("--callbacks",)}


# --- The metrics contract ---------------------------------------------------------------
#
# The metric names, labels and label values shared by the code (gateway/metrics.py), the
# dashboard and the alert rules. test_metrics_contract_is_what_the_code_exports checks the
# names and types against what gateway.metrics registers; labels and their values are the
# contract's (prometheus-client does not publish a metric's label names).


@dataclass(frozen=True)
class Family:
    type: str  # counter, gauge or histogram
    labels: frozenset[str] = frozenset()
    # For labels with a fixed set of values: those values.
    values: Mapping[str, frozenset[str]] = field(default_factory=dict)


def _family(kind: str, *labels: str, **values: str) -> Family:
    return Family(
        kind,
        frozenset(labels),
        {label: frozenset(allowed.split()) for label, allowed in values.items()},
    )


PHASES = "submit poll cancel download"
QUEUES = "generate callbacks"

CONTRACT: dict[str, Family] = {
    "tollgate_http_requests_total": _family("counter", "route", "method", "status"),
    "tollgate_http_request_duration_seconds": _family("histogram", "route", "method"),
    "tollgate_tasks_submitted_total": _family("counter", "model"),
    "tollgate_tasks_finished_total": _family(
        "counter", "model", "status", status="completed failed cancelled"
    ),
    "tollgate_tasks_open": _family("gauge", "model", "status", status="pending processing"),
    "tollgate_queue_depth": _family("gauge", "queue", queue=QUEUES),
    "tollgate_queue_oldest_job_age_seconds": _family("gauge", "queue", queue=QUEUES),
    "tollgate_upstream_requests_total": _family(
        "counter",
        "provider",
        "channel",
        "phase",
        "outcome",
        phase=PHASES,
        outcome="ok timeout unavailable rate_limited rejected bad_response",
    ),
    "tollgate_upstream_request_duration_seconds": _family(
        "histogram", "provider", "channel", "phase", phase=PHASES
    ),
    "tollgate_channel_circuit_opened_total": _family("counter", "channel"),
    "tollgate_callback_attempts_total": _family("counter", "outcome", outcome="delivered failed"),
    "tollgate_callback_give_ups_total": _family("counter"),
    # `tenant` only with TOLLGATE_METRICS_TENANT_LABELS=true.
    "tollgate_credits_reserved_microcredits_total": _family("counter", "tenant"),
    "tollgate_credits_captured_microcredits_total": _family("counter", "tenant"),
    "tollgate_credits_released_microcredits_total": _family("counter", "tenant"),
    "tollgate_rate_limit_refusals_total": _family(
        "counter", "scope", scope="key tenant in_flight key_budget"
    ),
    "tollgate_ledger_check_problems": _family("gauge"),
    "tollgate_ledger_check_last_run_timestamp_seconds": _family("gauge"),
    "tollgate_results_deleted_files_total": _family("counter", "backend", backend="file s3"),
    "tollgate_results_deleted_bytes_total": _family("counter", "backend", backend="file s3"),
    "tollgate_storage_errors_total": _family(
        "counter", "backend", "operation", backend="file s3", operation="put delete"
    ),
}

# Series Prometheus itself records for every scrape target.
SYNTHETIC = {"up": _family("gauge")}
# Labels every scraped series carries: the target's (scrape-kubernetes.yaml adds the last two).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod"})


def _family_name(name: str, family: Family) -> str:
    """The name prometheus-client gives the family (a counter's without ``_total``)."""
    return name.removesuffix("_total") if family.type == "counter" else name


def families_in_code() -> dict[str, str]:
    """Family name -> type of every ``tollgate_`` metric the code exports: what
    gateway.metrics registers in prometheus-client's default registry, and the gauges it
    builds at each scrape from PostgreSQL and Redis (``GaugeMetricFamily`` in its source)."""
    from prometheus_client import REGISTRY

    import gateway.metrics  # registers its metrics

    found = {f.name: f.type for f in REGISTRY.collect() if f.name.startswith("tollgate_")}
    source = ast.parse(Path(gateway.metrics.__file__).read_text())
    for node in ast.walk(source):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "GaugeMetricFamily"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found[node.args[0].value] = "gauge"
    return found


def exported_series() -> dict[str, Family]:
    """Every series name a query may use -> the family that labels it."""
    series = dict(SYNTHETIC)
    for name, family in CONTRACT.items():
        if family.type == "histogram":
            series[name + "_bucket"] = Family(family.type, family.labels | {"le"}, family.values)
            series[name + "_sum"] = family
            series[name + "_count"] = family
        else:
            series[name] = family
    return series


# --- PromQL -------------------------------------------------------------------------------

_SIMPLE_ALTERNATION = re.compile(r"[A-Za-z0-9_]+(\|[A-Za-z0-9_]+)*")


def _selectors(node: Any) -> Iterator[Any]:
    found: list[Any] = []
    promql_parser.walk(
        node, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None
    )
    yield from found


def _labels_of(node: Any, series: Mapping[str, Family]) -> frozenset[str]:
    labels = set(TARGET_LABELS)
    for selector in _selectors(node):
        if selector.name in series:
            labels |= series[selector.name].labels
    return frozenset(labels)


def promql_problems(expr: str) -> list[str]:
    """What is wrong with ``expr``: a metric the code does not export, a label its metric
    does not have, a label value outside the contract's. Raises ValueError if it does not
    parse."""
    tree = promql_parser.parse(expr)
    series = exported_series()
    problems: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            family = series.get(node.name) if node.name else None
            if family is None:
                problems.append(f"{node.name or node}: not a metric the code exports")
                return
            for matcher in node.matchers.matchers:
                if matcher.name not in family.labels | TARGET_LABELS:
                    problems.append(f"{node.name}: has no label {matcher.name!r}")
                allowed = family.values.get(matcher.name)
                if allowed is None:
                    continue
                if matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual):
                    values = {matcher.value}
                elif _SIMPLE_ALTERNATION.fullmatch(matcher.value):
                    values = set(matcher.value.split("|"))
                else:
                    values = set()
                for value in sorted(values - allowed):
                    problems.append(f"{node.name}: {matcher.name}={value!r} never occurs")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            available = _labels_of(node.expr, series)
            for label in node.modifier.labels:
                if label not in available:
                    problems.append(f"{node.op} by/without {label!r}: no such label below")
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            available = _labels_of(node.lhs, series) | _labels_of(node.rhs, series)
            for label in matching.labels if matching is not None else ():
                if label not in available:
                    problems.append(f"{node.op} on/ignoring {label!r}: no such label")

    promql_parser.walk(tree, visit)
    return problems


def metrics_in(expr: str) -> set[str]:
    return {s.name for s in _selectors(promql_parser.parse(expr)) if s.name}


# --- Loading the files --------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every manifest, the Secret's example included (``.yaml.example``: kubectl skips it)."""
    paths = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yaml.example")])
    return [(path, doc) for path in paths for doc in load_yaml_documents(path)]


def manifest_id(path: Path, doc: dict[str, Any]) -> str:
    return f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}"


def manifest(kind: str, name: str) -> dict[str, Any]:
    for _, doc in manifests():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "Job"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    if doc["kind"] == "CronJob":
        spec = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    return None


def workloads() -> list[tuple[str, dict[str, Any]]]:
    """(id, pod spec) of every workload in the manifests."""
    found = []
    for path, doc in manifests():
        spec = pod_spec(doc)
        if spec is not None:
            found.append((manifest_id(path, doc), spec))
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of a dotenv file, quotes removed (compose's reading)."""
    values = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line.strip())
        if match:
            value = match[2]
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[match[1]] = value
    return values


_INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^${}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ``${VAR}``, ``$VAR``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}``, nested (innermost first); ``$$`` is a literal ``$``."""
    text = text.replace("$$", "\0")
    while match := _INTERPOLATION.search(text):
        name = match["name"] or match["bare"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        # With a colon, an empty value counts as unset.
        present = bool(value) if op in (":-", ":?") else value is not None
        if op is None and not present:
            raise AssertionError(f"${{{name}}} is not set by tollgate.env.example")
        if op in (":?", "?") and not present:
            raise AssertionError(f"${{{name}}}: {arg}")
        replacement = value if present else arg
        text = text[: match.start()] + (replacement or "") + text[match.end() :]
    return text.replace("\0", "$")


def interpolated(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [interpolated(item, env) for item in value]
    if isinstance(value, dict):
        return {key: interpolated(item, env) for key, item in value.items()}
    return value


def compose_env() -> dict[str, str]:
    return read_env_file(DEPLOY / "tollgate.env.example")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    resolved: dict[str, Any] = interpolated(loaded, compose_env())
    return resolved


def compose_services(*, image: str | None = None) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return {n: s for n, s in services.items() if image is None or s.get("image") == image}


def tollgate_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose_services().items() if "build" in s}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]


def dockerfile_stages(path: Path) -> list[Stage]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    stages: list[Stage] = []
    for keyword, arguments in instructions:
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        elif stages:
            stages[-1].instructions.append((keyword, arguments))
    return stages


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


# --- The metrics contract -----------------------------------------------------------------


def test_metrics_contract_is_what_the_code_exports() -> None:
    contract = {_family_name(n, f): f.type for n, f in CONTRACT.items()}
    assert families_in_code() == contract


# --- Compose ------------------------------------------------------------------------------


def compose_schema_errors(document: dict[str, Any]) -> list[str]:
    """Where ``document`` breaks the Compose Specification's JSON schema."""
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    assert compose_schema_errors(compose()) == []


def test_the_compose_schema_check_refuses_a_misspelt_key() -> None:
    document = compose()
    document["services"]["gateway"]["healthckeck"] = document["services"]["gateway"].pop(
        "healthcheck"
    )
    assert compose_schema_errors(document) != []


def test_compose_sets_only_variables_the_example_environment_defines() -> None:
    raw = (DEPLOY / "compose.yaml").read_text()
    # Without a default, a variable must come from the example (interpolate() says which).
    interpolate(raw, compose_env())
    assert "env_file" in raw
    for service in tollgate_services().values():
        assert service["env_file"] == ".env"
    assert ".env" in (DEPLOY / ".gitignore").read_text().splitlines(), "secrets stay out of git"


def test_compose_migrates_before_starting_anything_that_uses_the_database() -> None:
    services = tollgate_services()
    assert services["migrate"]["command"] == ["tollgate", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("gateway", "worker", "callback-worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_compose_gateways_and_workers_share_one_storage_volume() -> None:
    storage = "/var/lib/tollgate/storage"
    services = tollgate_services()
    assert services["gateway"]["volumes"] == [f"storage:{storage}:ro"]
    assert services["worker"]["volumes"] == [f"storage:{storage}"]
    assert "storage" in compose()["volumes"]
    for service in services.values():
        assert service["environment"]["TOLLGATE_STORAGE_DIR"] == storage


def test_compose_offers_minio_for_s3_storage_with_tollgates_own_key_pair() -> None:
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for name in ("minio", "minio-bucket"):
        assert raw[name]["profiles"] == ["s3"], name
        environment = raw[name]["environment"]
        assert "TOLLGATE_STORAGE_ACCESS_KEY_ID" in environment["MINIO_ROOT_USER"], name
        assert "TOLLGATE_STORAGE_SECRET_ACCESS_KEY" in environment["MINIO_ROOT_PASSWORD"], name
    assert raw["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing tollgate/tollgate" in raw["minio-bucket"]["command"][0]
    example = (DEPLOY / "tollgate.env.example").read_text()
    assert "# TOLLGATE_STORAGE_URL=s3://tollgate/results" in example
    assert "# TOLLGATE_STORAGE_ENDPOINT_URL=http://minio:9000" in example


def test_compose_publishes_one_port_in_front_of_scaled_gateways() -> None:
    services = compose_services()
    published = [name for name, service in services.items() if service.get("ports")]
    assert published == ["proxy"]
    assert services["gateway"]["deploy"]["replicas"] >= 2
    assert services["worker"]["deploy"]["replicas"] >= 1
    source, target, mode = services["proxy"]["volumes"][0].split(":")
    assert (target, mode) == ("/etc/nginx/conf.d/default.conf", "ro")
    nginx = (DEPLOY / source).read_text()
    assert "set $gateway http://gateway:8000;" in nginx
    assert "proxy_pass $gateway;" in nginx
    assert re.search(r"location = /metrics \{\s*return 404;", nginx), "metrics stay internal"


def test_compose_long_running_services_have_healthchecks_and_grace() -> None:
    services = compose_services()
    for name in ("postgres", "redis", "gateway", "proxy", "worker", "callback-worker"):
        assert services[name]["healthcheck"]["test"], name
    grace = Settings.model_fields["shutdown_grace_seconds"].default
    assert int(services["gateway"]["stop_grace_period"].removesuffix("s")) > grace
    probe = " ".join(services["gateway"]["healthcheck"]["test"])
    assert "/readyz" in probe


def test_compose_redis_refuses_writes_rather_than_evict_queued_jobs() -> None:
    command = compose_services()["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_compose_containers_run_as_the_image_user_on_a_read_only_filesystem() -> None:
    for name, service in tollgate_services().items():
        assert service["user"] == f"{IMAGE_UID}:{IMAGE_UID}", name
        assert service["read_only"] is True, name
        assert "/tmp" in service["tmpfs"], name
        assert service["environment"]["PROMETHEUS_MULTIPROC_DIR"] in service["tmpfs"], name
        assert service["cap_drop"] == ["ALL"], name


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("path", "doc"), manifests(), ids=[manifest_id(p, d) for p, d in manifests()]
)
def test_manifest_is_valid_kubernetes(version: str, path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_refuses_a_misspelt_field() -> None:
    doc = json.loads(json.dumps(manifest("Deployment", "tollgate-gateway")))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)


def test_manifests_name_no_namespace() -> None:
    for path, doc in manifests():
        assert "namespace" not in doc["metadata"], manifest_id(path, doc)


@pytest.mark.parametrize(("name", "spec"), workloads(), ids=[n for n, _ in workloads()])
def test_pods_run_unprivileged_on_a_read_only_filesystem(name: str, spec: dict[str, Any]) -> None:
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == IMAGE_UID
    assert spec["securityContext"]["runAsGroup"] == IMAGE_UID
    assert spec["automountServiceAccountToken"] is False
    volumes = {volume["name"] for volume in spec["volumes"]}
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) == {"cpu", "memory"}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert set(mounts.values()) <= volumes
        assert "/tmp" in mounts
        assert "/run/tollgate/prometheus" in mounts, "the PROMETHEUS_MULTIPROC_DIR of the image"


def test_gateway_probes_are_liveness_healthz_readiness_readyz() -> None:
    spec = manifest("Deployment", "tollgate-gateway")["spec"]["template"]["spec"]
    gateway = spec["containers"][0]
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert gateway["args"][gateway["args"].index("--port") + 1] == str(ports["http"])


def test_worker_probes_and_scrape_port_are_the_metrics_port() -> None:
    port = int(manifest("ConfigMap", "tollgate-config")["data"]["TOLLGATE_METRICS_PORT"])
    for name in ("tollgate-worker", "tollgate-callback-worker"):
        template = manifest("Deployment", name)["spec"]["template"]
        container = template["spec"]["containers"][0]
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": port}
        assert container["startupProbe"]["tcpSocket"]["port"] == "metrics"
        assert container["livenessProbe"]["tcpSocket"]["port"] == "metrics"
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_gateway_outlives_its_requests_in_flight_on_shutdown() -> None:
    spec = manifest("Deployment", "tollgate-gateway")["spec"]["template"]["spec"]
    config = manifest("ConfigMap", "tollgate-config")["data"]
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = int(pre_stop[1]) + int(config["TOLLGATE_SHUTDOWN_GRACE_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] > needed


def test_manifests_refer_to_objects_that_exist() -> None:
    present = {(doc["kind"], doc["metadata"]["name"]) for _, doc in manifests()}
    for name, spec in workloads():
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in present, name
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in present, name
        for volume in spec["volumes"]:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in present, name
    for _, doc in manifests():
        if doc["kind"] == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            assert (target["kind"], target["name"]) in present


def test_storage_is_one_read_write_many_volume_the_workers_write() -> None:
    claim = manifest("PersistentVolumeClaim", "tollgate-storage")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    storage_dir = manifest("ConfigMap", "tollgate-config")["data"]["TOLLGATE_STORAGE_DIR"]
    writes = {"tollgate-gateway": False, "tollgate-worker": True}
    for name, writable in writes.items():
        spec = manifest("Deployment", name)["spec"]["template"]["spec"]
        mount = next(
            m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == storage_dir
        )
        assert mount.get("readOnly", False) is not writable, name
        assert spec["securityContext"]["fsGroup"] == IMAGE_UID


def test_gateway_service_budget_and_autoscalers_select_the_gateway_pods() -> None:
    deployment = manifest("Deployment", "tollgate-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    service = manifest("Service", "tollgate-gateway")
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    budget = manifest("PodDisruptionBudget", "tollgate-gateway")
    assert budget["spec"]["selector"]["matchLabels"] == labels
    for name in ("tollgate-gateway", "tollgate-worker"):
        hpa = manifest("HorizontalPodAutoscaler", name)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert hpa["spec"]["minReplicas"] >= 2
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert budget["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_migration_job_and_hourly_ledger_check() -> None:
    job = manifest("Job", "tollgate-migrate")["spec"]["template"]["spec"]
    assert job["containers"][0]["args"] == ["tollgate", "migrate"]
    assert job["restartPolicy"] == "Never"
    cron = manifest("CronJob", "tollgate-ledger-check")["spec"]
    minute, *rest = cron["schedule"].split()
    assert minute.isdigit(), "at a fixed minute"
    assert rest == ["*", "*", "*", "*"], "of every hour"
    assert cron["concurrencyPolicy"] == "Forbid"
    check = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert check["args"] == ["tollgate", "ledger", "check"]


def test_workloads_run_the_same_image() -> None:
    images = {c["image"] for _, spec in workloads() for c in spec["containers"]}
    assert len(images) == 1


# --- Commands -----------------------------------------------------------------------------


def commands() -> list[tuple[str, list[str]]]:
    found = [(f"compose {n}", s["command"]) for n, s in tollgate_services().items()]
    for name, spec in workloads():
        found += [(f"k8s {name}", container["args"]) for container in spec["containers"]]
    return found


@pytest.mark.parametrize(("where", "argv"), commands(), ids=[w for w, _ in commands()])
def test_every_command_is_a_real_tollgate_command(where: str, argv: list[str]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    program, *arguments = argv
    assert program in scripts
    if program == "tollgate-worker":
        assert tuple(arguments) in WORKER_ARGUMENTS
        return
    command: click.Command = tollgate_cli
    while isinstance(command, click.Group) and arguments and arguments[0] in command.commands:
        command = command.commands[arguments.pop(0)]
    if arguments != ["--help"]:
        # Parses the options (a wrong one raises a UsageError); runs nothing.
        command.make_context(program, arguments)


# --- The image ----------------------------------------------------------------------------


def test_image_runs_as_a_fixed_non_root_user() -> None:
    final = dockerfile_stages(DEPLOY / "Dockerfile")[-1]
    users = [arguments for keyword, arguments in final.instructions if keyword == "USER"]
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), "a numeric UID: runAsNonRoot can only check those"
    assert int(uid) == IMAGE_UID != 0
    assert gid == str(IMAGE_UID)


def test_image_final_stage_installs_nothing_and_copies_the_built_virtualenv() -> None:
    builder, final = dockerfile_stages(DEPLOY / "Dockerfile")
    assert builder.base == final.base == "${PYTHON_IMAGE}", "one Python for the venv's links"
    runs = " ".join(arguments for keyword, arguments in final.instructions if keyword == "RUN")
    for installer in ("apt-get", "apt ", "apk ", "pip ", "gcc", "build-essential"):
        assert installer not in runs
    copies = [arguments for keyword, arguments in final.instructions if keyword == "COPY"]
    assert f"--from={builder.name} /opt/tollgate /opt/tollgate" in copies


def test_image_builder_installs_tollgate_with_the_locked_versions() -> None:
    builder = dockerfile_stages(DEPLOY / "Dockerfile")[0]
    runs = [arguments for keyword, arguments in builder.instructions if keyword == "RUN"]
    assert any(re.search(r"pip install .*-c requirements\.lock \.", run) for run in runs)


def test_build_context_keeps_what_the_image_copies() -> None:
    # Dockerfile.dockerignore leaves out everything ("*") and lets back in what it names.
    patterns = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in patterns
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in dockerfile_stages(DEPLOY / "Dockerfile"):
        for keyword, arguments in stage.instructions:
            if keyword != "COPY" or "--from=" in arguments:
                continue
            *sources, _ = [word for word in arguments.split() if not word.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert any(source == k or source.startswith(k + "/") for k in kept), source


def test_entrypoint_is_an_executable_shell_script() -> None:
    entrypoint = DEPLOY / "docker-entrypoint.sh"
    assert entrypoint.read_text().startswith("#!/bin/sh\n")
    assert os.access(entrypoint, os.X_OK)


# --- Environment variables ----------------------------------------------------------------


def environment_names() -> dict[str, set[str]]:
    """Every variable name the deployment files set -> where."""
    names: dict[str, set[str]] = {}

    def add(name: str, where: str) -> None:
        names.setdefault(name, set()).add(where)

    for service_name, service in compose_services().items():
        for name in service.get("environment", {}):
            add(name, f"compose.yaml {service_name}")
    for line in (DEPLOY / "tollgate.env.example").read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Za-z_][A-Za-z0-9_]*)=.*", line.strip())
        if match:
            add(match[1], "tollgate.env.example")
    for path, doc in manifests():
        where = manifest_id(path, doc)
        for key in (*doc.get("data", {}), *doc.get("stringData", {})):
            add(key, where)
        spec = pod_spec(doc)
        for container in spec["containers"] if spec else []:
            for variable in container.get("env", []):
                add(variable["name"], where)
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    add(reference["key"], where)
    for stage in dockerfile_stages(DEPLOY / "Dockerfile"):
        for keyword, arguments in stage.instructions:
            if keyword == "ENV":
                for assignment in shlex.split(arguments):
                    add(assignment.partition("=")[0], "Dockerfile")
    return names


def test_environment_variables_are_settings_or_documented_others() -> None:
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = {
        name: sorted(where)
        for name, where in environment_names().items()
        if name not in settings and name not in OTHER_ENVIRONMENT
    }
    assert unknown == {}


def test_every_tollgate_variable_mentioned_is_a_setting() -> None:
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    texts = [p for p in DEPLOY.rglob("*") if p.is_file()] + [OPERATIONS]
    mentioned = {
        (name, str(path.relative_to(ROOT)))
        for path in texts
        for name in re.findall(r"\bTOLLGATE_[A-Z0-9_]*[A-Z0-9]", path.read_text())
    }
    assert {pair for pair in mentioned if pair[0] not in settings} == set()


# --- Alert rules --------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_have_the_shape_of_a_prometheus_rule_file() -> None:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    assert set(document) == {"groups"}
    group_names = [group["name"] for group in document["groups"]]
    assert len(group_names) == len(set(group_names))
    alerts = [rule["alert"] for rule in alert_rules()]
    assert len(alerts) == len(set(alerts))
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert re.fullmatch(r"Tollgate[A-Z][A-Za-z]+", rule["alert"])
        if "for" in rule:
            assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description", "runbook"} <= set(rule["annotations"])


@pytest.mark.parametrize("rule", alert_rules(), ids=[r["alert"] for r in alert_rules()])
def test_alert_queries_only_exported_metrics(rule: dict[str, Any]) -> None:
    assert promql_problems(rule["expr"]) == []


def test_alerts_watch_what_operators_must_be_paged_for() -> None:
    watched = {name for rule in alert_rules() for name in metrics_in(rule["expr"])}
    assert {
        "up",
        "tollgate_http_requests_total",
        "tollgate_queue_oldest_job_age_seconds",
        "tollgate_upstream_requests_total",
        "tollgate_channel_circuit_opened_total",
        "tollgate_callback_give_ups_total",
        "tollgate_ledger_check_problems",
        "tollgate_ledger_check_last_run_timestamp_seconds",
    } <= watched


def test_every_alert_has_a_runbook_section() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    for rule in alert_rules():
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, rule["alert"]


def scrape_jobs() -> dict[str, set[str]]:
    """Job names each scrape configuration gives Tollgate's targets."""
    kubernetes = yaml.safe_load((DEPLOY / "prometheus" / "scrape-kubernetes.yaml").read_text())
    (job,) = kubernetes["scrape_configs"]
    rule = next(r for r in job["relabel_configs"] if r.get("target_label") == "job")
    assert rule["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    scraped = set()
    for _, doc in manifests():
        template = doc["spec"]["template"] if doc["kind"] == "Deployment" else None
        if template and template["metadata"].get("annotations", {}).get("prometheus.io/scrape"):
            component = template["metadata"]["labels"]["app.kubernetes.io/component"]
            scraped.add(rule["replacement"].replace("$1", component))
    compose_jobs = yaml.safe_load((DEPLOY / "prometheus" / "scrape-compose.yaml").read_text())
    return {
        "kubernetes": scraped,
        "compose": {job["job_name"] for job in compose_jobs["scrape_configs"]},
    }


def test_alerts_name_the_jobs_the_scrape_configurations_make() -> None:
    jobs = scrape_jobs()
    assert jobs["kubernetes"] == jobs["compose"]
    named = set()
    for rule in alert_rules():
        for selector in _selectors(promql_parser.parse(rule["expr"])):
            for matcher in selector.matchers.matchers:
                if matcher.name == "job":
                    named |= set(matcher.value.split("|"))
    assert named
    assert named <= jobs["compose"]


# --- The dashboard ------------------------------------------------------------------------

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (DEPLOY / "grafana" / "tollgate-dashboard.json").read_text()
    )
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's interval variables replaced) of every target."""
    found = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def test_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"]
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize(
    ("title", "expr"), dashboard_queries(), ids=[f"{t}: {e[:40]}" for t, e in dashboard_queries()]
)
def test_dashboard_queries_only_exported_metrics(title: str, expr: str) -> None:
    assert promql_problems(expr) == []


def test_dashboard_shows_every_metric_of_the_contract() -> None:
    shown = {name for _, expr in dashboard_queries() for name in metrics_in(expr)}
    families = {
        re.sub(r"_(bucket|sum|count)$", "", name) if name not in CONTRACT else name
        for name in shown
    }
    assert set(CONTRACT) - families == set()


# --- Documentation ------------------------------------------------------------------------


def test_operations_examples_are_valid_kubernetes() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", OPERATIONS.read_text(), re.S)
    examples = [
        doc
        for block in blocks
        for doc in yaml.safe_load_all(block)
        if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc
    ]
    assert examples, "the queue-age autoscaler example"
    for doc in examples:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("document", [OPERATIONS, DEPLOY / "README.md"], ids=lambda p: p.name)
def test_relative_links_lead_to_files(document: Path) -> None:
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", document.read_text())
    assert targets
    missing = [t for t in targets if not (document.parent / t).exists()]
    assert missing == []


def test_readme_links_the_operations_guide() -> None:
    assert "(docs/operations.md)" in (ROOT / "README.md").read_text()
    assert "(../docs/operations.md)" in (DEPLOY / "README.md").read_text()
