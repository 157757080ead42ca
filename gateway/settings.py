"""Settings: every knob is an environment variable with the ``TOLLGATE_`` prefix.

Built by ``create_app(settings)`` and by the worker's start-up, never at import
time, so tests pass their own. ``load_settings`` turns validation errors into one
readable message naming each variable, for the process to print and exit.
The README's configuration table lists every field here. A renamed setting keeps
its old variable name working as an alias (``_renamed``); the new name wins.
"""

from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    HttpUrl,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.crypto import Keyring

ENV_PREFIX = "TOLLGATE_"


def _renamed(name: str, old: str) -> AliasChoices:
    """Read ``TOLLGATE_<NAME>``, or the old ``TOLLGATE_<OLD>`` when only that is set."""
    return AliasChoices(ENV_PREFIX + name.upper(), ENV_PREFIX + old.upper())


class UpstreamAccount(BaseModel):
    """One account at an upstream provider: where to call it and with which key."""

    base_url: HttpUrl
    api_key: str = Field(min_length=1, repr=False)
    # Upstream jobs running at once on this account (issue 4 enforces it).
    max_concurrency: int = Field(default=16, ge=1)
    # Routing among the channels of a model (docs/channels.md).
    priority: int = Field(default=0, ge=-1000, le=1000)
    weight: int = Field(default=1, ge=1, le=1000)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True
    )

    database_url: str = Field(
        description="PostgreSQL URL, e.g. postgresql+asyncpg://user@host:5432/tollgate"
    )
    redis_url: str = Field(description="Redis URL, e.g. redis://127.0.0.1:6379/0")
    admin_token: str = Field(min_length=16, repr=False)
    signing_secret: str = Field(min_length=16, repr=False)
    # Keys that encrypt webhook secrets and upstream keys at rest: id:key[,id:key…], the
    # first encrypts, all decrypt (gateway/crypto.py).
    encryption_keys: str = Field(repr=False)

    public_base_url: str = "http://127.0.0.1:8000"
    catalog_path: Path | None = None
    # The currency one credit is one unit of (docs/billing.md); the catalogue's prices must
    # be in it (its `credit_currency`), or the gateway and workers refuse to start.
    credit_currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    # Results (docs/operations.md, "Results"): file:///path or s3://bucket/prefix; unset,
    # the directory storage_dir.
    storage_url: str | None = None
    storage_dir: Path = Path(".tollgate/storage")
    # S3: where and who; unset, the standard AWS variables (AWS_ENDPOINT_URL, AWS_REGION,
    # AWS_ACCESS_KEY_ID, …), then the AWS credential chain.
    storage_endpoint_url: str | None = None
    storage_region: str | None = None
    storage_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    storage_access_key_id: str | None = Field(default=None, repr=False)
    storage_secret_access_key: str | None = Field(default=None, repr=False)
    storage_timeout_seconds: float = Field(default=30.0, gt=0)
    # Links presigned by the bucket instead of served by the gateway (same expiry).
    storage_presigned_links: bool = False
    result_url_ttl_seconds: int = Field(default=86_400, ge=1)
    # Retention: a task's files are deleted this long after its links expire, by a worker
    # job every retention_interval_seconds (0: never; files are kept).
    result_grace_seconds: int = Field(default=3600, ge=0)
    retention_interval_seconds: int = Field(default=300, ge=0)

    key_cache_ttl_seconds: float = Field(default=5.0, ge=0)
    # How long a rotated key's old secret keeps working when the rotation does not say.
    key_rotation_grace_seconds: int = Field(default=86_400, ge=0, le=30 * 86_400)
    # Redemption attempts a key may make per minute (POST /v1/account/redeem).
    redeem_rate_limit_per_minute: int = Field(default=10, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    db_pool_size: int = Field(default=10, ge=1)

    # Limits for tenants and keys that set none of their own (0: no limit).
    default_key_rate_limit_per_minute: int = Field(default=600, ge=0)
    default_key_rate_limit_burst: int = Field(default=100, ge=1)
    default_tenant_rate_limit_per_minute: int = Field(default=3000, ge=0)
    default_tenant_rate_limit_burst: int = Field(default=500, ge=1)
    default_max_in_flight: int = Field(default=100, ge=0)
    # How long a request waits on Redis (rate limits) before answering 503.
    redis_timeout_seconds: float = Field(default=1.0, gt=0)

    # Callbacks (docs/callbacks.md).
    callback_queue_name: str = "tollgate:callbacks"
    callback_timeout_seconds: float = Field(default=10.0, gt=0)
    callback_max_jobs: int = Field(default=200, ge=1)
    # Outbound HTTP to URLs others name: callbacks and result-image links (gateway/outbound/).
    # FOR TESTS ONLY: hosts exempt from the internal-address refusal (local receivers).
    outbound_allowed_hosts: list[str] = Field(
        default_factory=list,
        validation_alias=_renamed("outbound_allowed_hosts", "callback_allowed_hosts"),
    )
    # Extra CA certificates trusted for outbound TLS (a PEM file).
    outbound_ca_bundle: Path | None = Field(
        default=None, validation_alias=_renamed("outbound_ca_bundle", "callback_ca_bundle")
    )

    upstreams: dict[str, UpstreamAccount] = Field(default_factory=dict)
    queue_name: str = "tollgate:queue"
    worker_max_jobs: int = Field(default=100, ge=1)
    # On SIGTERM a worker takes no new jobs and waits this long for running ones before
    # handing them back (keep it below the orchestrator's kill timeout).
    worker_shutdown_grace_seconds: int = Field(default=20, ge=0)
    task_deadline_seconds: int = Field(default=600, ge=5)
    lease_seconds: float = Field(default=30.0, gt=0)
    # A generation worker silent this long is dead: its tasks polling an upstream job are
    # handed on at once, not when their leases run out (workers/liveness.py).
    worker_dead_after_seconds: float = Field(default=5.0, gt=0)
    reconcile_interval_seconds: int = Field(default=10, ge=1, le=60)
    requeue_pending_after_seconds: float = Field(default=20.0, ge=0)
    # Overload (gateway/tasks/backlog.py): refuse a submit whose model's backlog would make
    # it finish later than this fraction of the deadline (0 turns the check off).
    overload_deadline_fraction: float = Field(default=0.8, ge=0, le=1)
    overload_refresh_seconds: float = Field(default=0.5, gt=0, le=60)
    poll_interval_seconds: float = Field(default=1.0, gt=0)
    upstream_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    # Per-phase limits on one upstream call: a submit (for a synchronous upstream, the whole
    # generation), and each poll or cancel. The task's own deadline bounds them all.
    upstream_timeout_seconds: float = Field(default=30.0, gt=0)
    upstream_poll_timeout_seconds: float = Field(default=10.0, gt=0)
    # Back-off between submit retries: base, 2 × base, 4 × base (or the upstream's Retry-After).
    upstream_retry_base_seconds: float = Field(default=1.0, ge=0)
    # The longest a task waits out an upstream's 429s (their Retry-After, added up) before
    # it fails over, or fails with upstream_rate_limited when no other channel is left.
    upstream_retry_after_cap_seconds: float = Field(default=30.0, ge=0)
    max_image_bytes: int = Field(default=52_428_800, ge=1024)
    # The most an upstream API answer may hold; a base64 image answer (OpenAI) may add
    # max_image_bytes (as base64) per image asked for. Larger: upstream_bad_response.
    upstream_max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # Channels (docs/channels.md): how soon workers see a changed channel, and the circuit
    # breaker: this many failures within the window open a channel for the cool-down.
    channel_cache_ttl_seconds: float = Field(default=5.0, ge=0)
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_window_seconds: float = Field(default=60.0, gt=0)
    circuit_cooldown_seconds: float = Field(default=30.0, gt=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Observability (docs/observability.md). Prompts are never logged unless this says so.
    log_prompts: bool = False
    access_log: bool = False
    # The console's cookies carry Secure always (set it when TLS ends at a proxy in front);
    # otherwise only when the request came over HTTPS (gateway/console/web.py).
    console_secure_cookies: bool = False
    metrics_port: int = Field(default=9100, ge=0, le=65535)  # workers' /metrics; 0: off
    metrics_token: str | None = Field(default=None, min_length=16, repr=False)
    metrics_tenant_labels: bool = False
    ledger_check_interval_seconds: int = Field(default=3600, ge=60)
    shutdown_grace_seconds: int = Field(default=30, ge=0)
    # POST /openai/v1/images/generations waits this long for the task's end (docs/openai.md).
    openai_wait_seconds: int = Field(default=120, ge=1, le=3600)

    @field_validator("database_url")
    @classmethod
    def _asyncpg_url(cls, value: str) -> str:
        # Accept the plain postgresql:// form people copy from elsewhere.
        for plain in ("postgresql://", "postgres://"):
            if value.startswith(plain):
                return "postgresql+asyncpg://" + value[len(plain) :]
        if not value.startswith("postgresql+asyncpg://"):
            raise ValueError("must be a postgresql:// or postgresql+asyncpg:// URL")
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("file://"):
            path = value[len("file://") :]
            if not path.startswith("/"):
                raise ValueError(
                    "must be file:///absolute/path (three slashes) or s3://bucket/prefix"
                )
            return value
        if value.startswith("s3://"):
            bucket = value[len("s3://") :].split("/", 1)[0]
            if not bucket:
                raise ValueError("must name a bucket: s3://bucket or s3://bucket/prefix")
            return value
        raise ValueError("must be file:///absolute/path or s3://bucket/prefix")

    @field_validator("storage_endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _storage_keys(self) -> "Settings":
        if (self.storage_access_key_id is None) != (self.storage_secret_access_key is None):
            raise ValueError(
                "TOLLGATE_STORAGE_ACCESS_KEY_ID and TOLLGATE_STORAGE_SECRET_ACCESS_KEY go "
                "together: set both or neither"
            )
        return self

    @model_validator(mode="after")
    def _presigned_links(self) -> "Settings":
        if self.storage_presigned_links:
            if not (self.storage_url or "").startswith("s3://"):
                raise ValueError(
                    "TOLLGATE_STORAGE_PRESIGNED_LINKS needs an s3:// TOLLGATE_STORAGE_URL"
                )
            if self.result_url_ttl_seconds > 604_800:
                raise ValueError(
                    "TOLLGATE_STORAGE_PRESIGNED_LINKS: presigned links last at most 7 days; "
                    "set TOLLGATE_RESULT_URL_TTL_SECONDS to 604800 or less"
                )
        return self

    @field_validator("encryption_keys")
    @classmethod
    def _encryption_keys(cls, value: str) -> str:
        Keyring.parse(value)  # KeyringError is a ValueError: the message names the key
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class SettingsError(RuntimeError):
    """The environment does not describe a usable configuration."""


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (and ``overrides``), or raise SettingsError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            message = "is required" if err["type"] == "missing" else err["msg"]
            if not err["loc"]:
                # A rule across settings: its message names the variables.
                lines.append(f"  {message.removeprefix('Value error, ')}")
                continue
            field = str(err["loc"][0]).upper()
            rest = ".".join(str(p) for p in err["loc"][1:])
            # A field read through an alias is located by the alias: the variable's full name.
            name = field if field.startswith(ENV_PREFIX) else ENV_PREFIX + field
            name += f" ({rest})" if rest else ""
            lines.append(f"  {name}: {message}")
        raise SettingsError("invalid configuration:\n" + "\n".join(lines)) from None
