"""The public shapes of the unified endpoint (seeds/002), as msgspec structs.

``TaskObject`` is ``ImageGenerationResponse`` of the contract; ``results``,
``result_sizes``, ``expires_at``, ``error`` and ``usage.credits_charged`` are additive fields that
appear only when they have a value. Credits are rendered as JSON numbers from
exact decimals (``encode_json``), never through a float.
"""

from decimal import Decimal
from typing import Any, ClassVar

import msgspec


class GenerationRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/images/generations``: which fields a model accepts is in ``GET /v1/models``."""

    model: str
    prompt: str
    size: str | None = None
    quality: str | None = None
    seed: int | None = None
    nsfw_check: bool | None = None
    callback_url: str | None = None
    n: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    prompt_enhancement: bool | None = None
    creativity: str | None = None
    image_style_references: list[Any] | None = None
    moodboards: list[Any] | None = None
    styles: list[Any] | None = None
    intensity: int | None = None
    complexity: int | None = None
    movement: int | None = None

    def provided(self) -> dict[str, Any]:
        """The fields the client sent (an explicit null counts as not sent)."""
        return {
            name: value
            for name in self.__struct_fields__
            if (value := getattr(self, name)) is not None
        }


REQUEST_FIELDS = frozenset(GenerationRequest.__struct_fields__)


class TaskInfo(msgspec.Struct):
    can_cancel: bool
    estimated_time: int


class Usage(msgspec.Struct, omit_defaults=True):
    # Encoded as JSON numbers (``encode_json``): documented so (gateway/openapi_docs.py).
    __json_numbers__: ClassVar[tuple[str, ...]] = ("credits_reserved", "credits_charged")

    billing_rule: str
    credits_reserved: Decimal
    user_group: str
    credits_charged: Decimal | None = None


class TaskError(msgspec.Struct):
    code: str
    message: str


class ResultSize(msgspec.Struct):
    """A result image's pixels, read from the image Tollgate stored."""

    width: int
    height: int


class TaskObject(msgspec.Struct, omit_defaults=True):
    created: int
    id: str
    model: str
    object: str
    progress: int
    status: str
    task_info: TaskInfo
    type: str
    usage: Usage
    results: list[str] | None = None
    # Each result's width and height, in the order of ``results``.
    result_sizes: list[ResultSize] | None = None
    expires_at: int | None = None
    error: TaskError | None = None


class ModelCard(msgspec.Struct, omit_defaults=True):
    """One entry of ``GET /v1/models``."""

    id: str
    object: str
    name: str
    description: str
    images_per_generation: int
    max_images: int
    estimated_seconds: int
    max_resolution: str
    billing_rule: str
    prompt_max_chars: int
    sizes: dict[str, dict[str, str]] | None = None
    default_size: str | None = None
    qualities: list[str] | None = None
    default_quality: str | None = None
    size_format: str | None = None
    size_bounds: dict[str, int] | None = None
    settings: dict[str, dict[str, Any]] | None = None
    price: "ModelPrice | None" = None


class ModelPrice(msgspec.Struct, omit_defaults=True):
    """What the caller's group pays for the model, in credits of ``currency``.

    ``amount`` is per call, per image or per megapixel-step (``rule``); the modifiers
    replace it for a quality tier, with style references, or with a moodboard. The
    quote multiplies by the request's units and rounds once, up, to the micro-credit.
    """

    # Encoded as JSON numbers (``encode_json``): documented so (gateway/openapi_docs.py).
    __json_numbers__: ClassVar[tuple[str, ...]] = (
        "amount",
        "by_quality",
        "with_style_references",
        "with_moodboard",
    )

    rule: str
    amount: Decimal
    currency: str
    user_group: str
    by_quality: dict[str, Decimal] | None = None
    with_style_references: Decimal | None = None
    with_moodboard: Decimal | None = None


class ModelList(msgspec.Struct):
    object: str
    data: list[ModelCard]


_encoder = msgspec.json.Encoder(decimal_format="number")


def encode_json(value: object) -> bytes:
    return _encoder.encode(value)
