"""Every environment variable the files set is a ``Settings`` field or a documented other one."""

import re
import shlex

from deploy.files import (
    DEPLOY,
    OPERATIONS,
    OTHER_ENVIRONMENT,
    ROOT,
    compose_services,
    dockerfile_stages,
    manifest_id,
    manifests,
    pod_spec,
)
from gateway.settings import ENV_PREFIX, Settings


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
