"""Every Kubernetes manifest is valid against the Kubernetes JSON schemas of the pinned
versions (bundled by kubernetes-validate), strictly: an unknown field is an error; and the
manifests wire what the docs say."""

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from deploy.files import IMAGE_UID, KUBERNETES_VERSIONS, manifest, manifest_id, manifests, workloads


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
