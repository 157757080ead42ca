"""Where the deployment files are, and how the tests read them (YAML, env files, compose
interpolation, Dockerfile stages, Markdown anchors); the constants they are checked against."""

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OPERATIONS = ROOT / "docs" / "operations.md"


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
