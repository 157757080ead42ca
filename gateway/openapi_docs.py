"""The OpenAPI document and the ``/docs`` page: exact about the wire, and served offline.

Rules:
- ``/docs`` (Swagger UI) loads every script, stylesheet and icon from the gateway
  itself, under ``/docs/assets/``: the files ship in the ``swagger-ui-bundle-v2``
  package, so the page works with no Internet access and leaks no visit to a CDN.
  The page reads the document from ``/docs/openapi.json``; the online validator
  badge is off (it would call validator.swagger.io).
- A request body struct that refuses unknown fields (``forbid_unknown_fields``)
  is documented with ``additionalProperties: false``, so a client generated from
  the document cannot send what the server answers 400.
- Decimal fields a response struct lists in ``__json_numbers__`` are documented as
  numbers: they are encoded as JSON numbers (exact decimals), not strings.
- A route that answers CSV as well as JSON (``format=csv``) documents both
  (``JsonOrCsvOperation``).
- ``OPTIONS`` on a path answers ``Allow`` with every method of the path
  (litestar's own answer lists only the methods of the first handler registered
  on it).
"""

import json
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from litestar import Litestar, Request
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.datastructures import MutableScopeHeaders
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.routes import HTTPRoute
from litestar.static_files import create_static_files_router
from litestar.types import Message, Scope
from litestar.typing import FieldDefinition
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

DOCS_PATH: Final = "/docs"
ASSETS_PATH: Final = f"{DOCS_PATH}/assets"
# The files of the Swagger UI distribution the page uses.
ASSETS: Final = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png")


class OfflineSwagger(SwaggerRenderPlugin):
    """Swagger UI from ``/docs/assets``, reading ``/docs/openapi.json``."""

    def __init__(self) -> None:
        super().__init__(
            js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            css_url=f"{ASSETS_PATH}/swagger-ui.css",
            path="/swagger",
        )

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        title = json.dumps(str(openapi_schema.get("info", {}).get("title", "API")))[1:-1]
        config = json.dumps(
            {
                "url": f"{DOCS_PATH}/openapi.json",
                "dom_id": "#swagger-ui",
                "deepLinking": True,
                # No badge that fetches validator.swagger.io.
                "validatorUrl": None,
            }
        )
        page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title.replace("<", "&lt;")}</title>
<link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon-32x32.png">
<link rel="stylesheet" href="{self.css_url}">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{self.js_url}"></script>
<script>window.ui = SwaggerUIBundle({config});</script>
</body>
</html>
"""
        return page.encode()


def docs_assets_router() -> Any:
    """The static files of the docs page, from the installed Swagger UI distribution."""
    return create_static_files_router(
        path=ASSETS_PATH,
        directories=[swagger_ui_path],
        include_in_schema=False,
        name="docs-assets",
    )


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """msgspec structs as litestar documents them, plus ``additionalProperties: false``
    for those that refuse unknown fields."""

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        info = msgspec.inspect.type_info(field_definition.type_)
        if isinstance(info, msgspec.inspect.StructType) and info.forbid_unknown_fields:
            schema.additional_properties = False
        for name in getattr(field_definition.type_, "__json_numbers__", ()):
            if schema.properties and name in schema.properties:
                _strings_to_numbers(schema.properties[name])
        return schema


def _strings_to_numbers(schema: Any) -> None:
    """Every ``type: string`` within ``schema`` (one_of, additionalProperties) → number."""
    if not isinstance(schema, Schema):
        return
    if schema.type == OpenAPIType.STRING:
        schema.type = OpenAPIType.NUMBER
    for inner in schema.one_of or ():
        _strings_to_numbers(inner)
    _strings_to_numbers(schema.additional_properties)


def allowed_methods(app: Litestar, path_template: str) -> str | None:
    """The ``Allow`` value of a path: every method any handler of the path takes."""
    for route in app.routes:
        if isinstance(route, HTTPRoute) and route.path_format == path_template:
            return ", ".join(sorted(route.methods))
    return None


async def full_options_allow(message: Message, scope: Scope) -> None:
    """A ``before_send`` hook putting the path's full ``Allow`` on OPTIONS answers."""
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS":
        return
    if message["status"] != 204:
        return
    methods = allowed_methods(scope["app"], scope.get("path_template") or "")
    if methods is not None:
        MutableScopeHeaders.from_message(message)["Allow"] = methods


@dataclass
class JsonOrCsvOperation(Operation):
    """An operation whose 200 is JSON, or CSV when asked (``format=csv``)."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content["text/csv"] = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
