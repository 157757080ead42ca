"""The shapes of the OpenAI Images API that ``/openai/v1`` answers with."""

import msgspec


class OpenAIImage(msgspec.Struct, omit_defaults=True):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class OpenAIImagesResponse(msgspec.Struct, omit_defaults=True):
    created: int
    data: list[OpenAIImage]
    size: str | None = None
    output_format: str | None = None


class OpenAIModel(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str


class OpenAIModelList(msgspec.Struct):
    object: str
    data: list[OpenAIModel]


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(msgspec.Struct):
    error: OpenAIErrorDetail
