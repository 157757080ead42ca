"""The OpenAPI document says what the wire does, and /docs works offline (issue 13, item 9)."""

import json
import re
from typing import Any

import pytest
from conftest import ADMIN_TOKEN, bearer
from litestar.testing import AsyncTestClient
from swagger_ui_bundle import swagger_ui_path

Client = AsyncTestClient[Any]

ENVELOPE = "#/components/schemas/ErrorResponse"
KREA_ENVELOPE = "#/components/schemas/KreaErrorBody"
OPENAI_ENVELOPE = "#/components/schemas/OpenAIErrorBody"


async def document(client: Client) -> dict[str, Any]:
    response = await client.get("/docs/openapi.json")
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.parametrize("page", ["/docs", "/docs/swagger"])
async def test_the_docs_page_loads_every_asset_from_the_gateway(client: Client, page: str) -> None:
    response = await client.get(page)
    assert response.status_code == 200, response.text
    html = response.text
    # No other host: no absolute or protocol-relative URL anywhere in the page.
    assert not re.search(r"(?i)(https?:)?//[a-z0-9]", html), html
    references = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', html)
    assert any(ref.endswith(".js") for ref in references), references
    assert any(ref.endswith(".css") for ref in references), references
    for ref in references:
        assert ref.startswith("/"), ref
        asset = await client.get(ref)
        assert asset.status_code == 200, (ref, asset.status_code)
        assert asset.content, ref
        shipped = swagger_ui_path / ref.rsplit("/", 1)[1]
        assert asset.content == shipped.read_bytes(), ref
    # The document it loads is served too.
    loaded = re.search(r'"url":\s*"([^"]+)"', html)
    assert loaded is not None
    assert (await client.get(loaded[1])).status_code == 200


async def test_options_allows_every_method_of_the_path(client: Client) -> None:
    jobs = await client.options("/jobs/task-unified-1-x")
    assert jobs.status_code == 204
    assert set(jobs.headers["allow"].split(", ")) == {"GET", "DELETE", "OPTIONS"}
    channel = await client.options("/admin/channels/ch_1", headers=bearer(ADMIN_TOKEN))
    assert set(channel.headers["allow"].split(", ")) == {"GET", "PATCH", "DELETE", "OPTIONS"}


async def test_bodies_that_refuse_unknown_fields_are_documented_closed(client: Client) -> None:
    doc = await document(client)
    schemas = doc["components"]["schemas"]
    bodies = set()
    for path in doc["paths"].values():
        for operation in path.values():
            for media in operation.get("requestBody", {}).get("content", {}).values():
                refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(media["schema"]))
                bodies.update(ref.rsplit("/", 1)[-1] for ref in refs)
    assert {"GenerationRequest", "KreaGeneration"} <= bodies
    for name in bodies:
        assert schemas[name].get("additionalProperties") is False, name


async def test_an_unknown_field_is_refused_as_the_document_says(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    _, key = tenant_key
    response = await client.post(
        "/v1/images/generations",
        json={"model": "krea-2-turbo", "prompt": "p", "colour": "red"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "colour: unknown field"


def error_refs(doc: dict[str, Any], prefix: str) -> dict[tuple[str, str, str], str]:
    """(method, path, status) -> the schema each 4xx/5xx answer of the paths under prefix names."""
    found = {}
    for path, operations in doc["paths"].items():
        if not path.startswith(prefix):
            continue
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if int(status) >= 400:
                    schema = answer["content"]["application/json"]["schema"]
                    found[(method, path, status)] = schema.get("$ref", repr(schema))
    return found


@pytest.mark.parametrize("prefix", ["/v1/", "/jobs/", "/generate/", "/admin/", "/openai/v1/"])
async def test_every_error_answer_is_documented_as_the_envelope_sent(
    client: Client, prefix: str
) -> None:
    expected = {
        "/jobs/": KREA_ENVELOPE,
        "/generate/": KREA_ENVELOPE,
        "/openai/v1/": OPENAI_ENVELOPE,
    }.get(prefix, ENVELOPE)
    refs = error_refs(await document(client), prefix)
    assert refs
    wrong = {where: ref for where, ref in refs.items() if ref != expected}
    assert not wrong, wrong


async def test_routes_with_parameters_document_their_400(client: Client) -> None:
    doc = await document(client)
    for path in ("/v1/tasks/{task_id}", "/jobs/{job_id}", "/v1/files/{task_id}/{name}"):
        for operation in doc["paths"][path].values():
            assert "400" in operation["responses"], path


async def test_every_admin_route_documents_401_and_lookups_their_404(client: Client) -> None:
    doc = await document(client)
    admin = {p: ops for p, ops in doc["paths"].items() if p.startswith("/admin/")}
    assert len(admin) >= 15
    for path, operations in admin.items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert "401" in statuses, (method, path)
            # Setting a currency's rate creates it: there is nothing to look up.
            upsert = (method, path) == ("put", "/admin/exchange-rates/{currency}")
            if "{" in path and not upsert:
                assert {"400", "404"} <= statuses, (method, path)


async def test_usage_documents_its_csv_answer(client: Client) -> None:
    doc = await document(client)
    ok = doc["paths"]["/admin/tenants/{tenant_id}/usage"]["get"]["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/csv"}


async def test_a_tasks_credits_are_documented_as_the_numbers_sent(client: Client) -> None:
    usage = (await document(client))["components"]["schemas"]["Usage"]["properties"]
    assert usage["credits_reserved"] == {"type": "number"}
    assert {s["type"] for s in usage["credits_charged"]["oneOf"]} == {"number", "null"}
