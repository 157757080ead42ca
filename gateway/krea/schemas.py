"""The Krea 2 API's shapes (seeds/001), and ``render_krea_job``, the one renderer of a job.

Plain msgspec structs: the callback worker renders a Krea-door task's callback with
``render_krea_job`` without loading the route layer.
"""

from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import msgspec

from gateway.storage import UrlSigner
from gateway.tasks.models import Task, TaskStatus

if TYPE_CHECKING:
    from gateway.callbacks.service import CallbackTask

API: Final = "krea"  # Task.api of the tasks this door creates

# The variant in the path -> the catalogue model it runs.
MODELS: Final[dict[str, str]] = {"medium": "krea-2-medium", "large": "krea-2-large"}

# Krea request fields that have another name in the unified request.
TO_UNIFIED: Final[dict[str, str]] = {"aspect_ratio": "size", "resolution": "quality"}
FROM_UNIFIED: Final[dict[str, str]] = {unified: krea for krea, unified in TO_UNIFIED.items()}

# Task status -> job status.
STATUSES: Final[dict[str, str]] = {
    TaskStatus.PENDING.value: "queued",
    TaskStatus.PROCESSING.value: "processing",
    TaskStatus.COMPLETED.value: "completed",
    TaskStatus.FAILED.value: "failed",
    TaskStatus.CANCELLED.value: "cancelled",
}


class KreaGeneration(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /generate/image/krea/krea-2/{variant}``: the request body of seeds/001."""

    prompt: str
    aspect_ratio: str | None = None
    resolution: str | None = None
    seed: int | None = None
    creativity: str | None = None
    image_style_references: list[Any] | None = None
    moodboards: list[Any] | None = None
    styles: list[Any] | None = None
    intensity: int | None = None
    complexity: int | None = None
    movement: int | None = None

    def unified_fields(self, model: str) -> dict[str, Any]:
        """The fields of ``POST /v1/images/generations`` this request stands for."""
        fields: dict[str, Any] = {"model": model}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if value is not None:  # an explicit null counts as not sent
                fields[TO_UNIFIED.get(name, name)] = value
        return fields


class KreaJobCreated(msgspec.Struct):
    job_id: str
    status: str
    created_at: str


class KreaResult(msgspec.Struct):
    urls: list[str]


class KreaJobError(msgspec.Struct):
    code: str
    message: str


class KreaJob(msgspec.Struct, omit_defaults=True):
    job_id: str
    status: str
    created_at: str
    completed_at: str | None  # no default: always present, null until the job is final
    result: KreaResult | None = None
    error: KreaJobError | None = None


def iso(moment: datetime) -> str:
    """UTC, milliseconds, ``Z``: ``2026-01-02T03:04:05.678Z``."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render_krea_job(task: "Task | CallbackTask", signer: UrlSigner) -> KreaJob:
    """The Krea job object of a task, from whichever door it came."""
    status = task.status
    result = None
    if status == TaskStatus.COMPLETED.value and task.results and task.results_expire_at:
        expires_at = int(task.results_expire_at.timestamp())
        result = KreaResult(urls=[signer.url(key, expires_at) for key in task.results])
    error = None
    if status == TaskStatus.FAILED.value:
        error = KreaJobError(
            code=task.error_code or "generation_failed",
            message=task.error_message or "The generation failed",
        )
    final = status not in (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value)
    return KreaJob(
        job_id=task.id,
        status=STATUSES[status],
        created_at=iso(task.created_at),
        completed_at=iso(task.finished_at) if final and task.finished_at else None,
        result=result,
        error=error,
    )
