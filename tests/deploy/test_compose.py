"""``compose.yaml``, interpolated with ``tollgate.env.example``, is valid against the Compose
Specification's JSON schema (the copy check-jsonschema ships) and wires what the docs say:
the migration first, one shared storage volume, healthchecks, one published port."""

import importlib.resources
import json
import re
from typing import Any

import jsonschema
import yaml

from deploy.files import (
    DEPLOY,
    IMAGE_UID,
    compose,
    compose_env,
    compose_services,
    interpolate,
    tollgate_services,
)
from gateway.settings import Settings


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
