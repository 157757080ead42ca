"""Any bytes in a request body: a 4xx naming the problem, never a 5xx (issue 13, item 8)."""

from typing import Any

import pytest
from conftest import ADMIN_TOKEN, bearer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient

from gateway.json_body import MAX_JSON_DEPTH, deeper_than

Client = AsyncTestClient[Any]

# Every route that takes a body, with a placeholder for its path parameters.
BODY_ROUTES = [
    ("POST", "/v1/images/generations"),
    ("POST", "/generate/image/krea/krea-2/medium"),
    ("POST", "/admin/tenants"),
    ("POST", "/admin/tenants/{id}/topup"),
    ("POST", "/admin/tenants/{id}/adjust"),
    ("PATCH", "/admin/tenants/{id}/callbacks"),
    ("PATCH", "/admin/tenants/{id}/limits"),
    ("POST", "/admin/tenants/{id}/keys"),
    ("PATCH", "/admin/keys/{id}/limits"),
    ("POST", "/admin/tasks/{id}/refund"),
    ("POST", "/admin/channels"),
    ("PATCH", "/admin/channels/{id}"),
]

NESTED_ARRAYS = b"[" * 5000 + b"]" * 5000
NESTED_OBJECTS = b'{"a":' * 400 + b"1" + b"}" * 400
# Deep enough to pass the decoder in a shallow stack, deeper than any request of ours.
NESTED_FIELD = (
    b'{"model": "krea-2-turbo", "prompt": "p", "styles": ' + b"[" * 300 + b"]" * 300 + b"}"
)
INVALID_UTF8 = [b'{"prompt": "\xff\xfe"}', b'{"name": "\xc3\x28"}', b'"\x80"']


def headers_for(path: str, key: str) -> dict[str, str]:
    token = ADMIN_TOKEN if path.startswith("/admin") else key
    return {**bearer(token), "Content-Type": "application/json"}


def error_code(response: Any) -> str:
    body = response.json()
    # The Krea door answers {"error": "<message>", "code"}; the others the envelope.
    return str(body["code"] if isinstance(body["error"], str) else body["error"]["code"])


def error_message(response: Any) -> str:
    body = response.json()
    return str(body["error"] if isinstance(body["error"], str) else body["error"]["message"])


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (NESTED_ARRAYS, "nested deeper than"),
        (NESTED_OBJECTS, "nested deeper than"),
        (NESTED_FIELD, "nested deeper than"),
        *[(body, "not valid UTF-8") for body in INVALID_UTF8],
    ],
)
async def test_deep_or_invalid_utf8_bodies_are_400_on_every_route(
    client: Client, tenant_key: tuple[str, str], method: str, path: str, body: bytes, says: str
) -> None:
    _, key = tenant_key
    response = await client.request(
        method, path.format(id="t-1"), content=body, headers=headers_for(path, key)
    )
    assert response.status_code == 400, response.text
    assert error_code(response) == "invalid_request"
    assert says in error_message(response)


async def test_a_body_nested_to_the_limit_is_read(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    """The cap refuses only what is deeper: at the cap, the field's own check answers."""
    _, key = tenant_key
    deep = b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1)
    body = b'{"model": "krea-2-turbo", "prompt": "p", "styles": ' + deep + b"}"
    response = await client.post(
        "/v1/images/generations", content=body, headers=headers_for("/v1", key)
    )
    assert response.status_code == 400, response.text
    assert "nested" not in error_message(response)
    assert "styles" in error_message(response)


def test_depth_counts_containers_not_scalars() -> None:
    assert not deeper_than("x", 0)
    assert not deeper_than({"a": [1, {"b": 2}]}, 3)
    assert deeper_than({"a": [1, {"b": []}]}, 3)
    assert deeper_than([[[[]]]], 3)
    assert not deeper_than([[], [], [[]]], 3)


# Bytes that are JSON-shaped often enough to get past the first byte.
json_ish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
).map(lambda v: repr(v).encode("utf-8", "surrogatepass"))
depths = st.integers(min_value=1, max_value=100) | st.integers(min_value=100, max_value=3000)
bodies = st.one_of(
    st.binary(max_size=256),
    json_ish,
    st.builds(lambda a, b: a + b, json_ish, st.binary(max_size=8)),
    # A JSON string holding any bytes at all, valid UTF-8 or not.
    st.binary(max_size=16).map(lambda raw: b'{"prompt": "' + raw.replace(b'"', b"") + b'"}'),
    depths.map(lambda n: b"[" * n + b"]" * n),
    depths.map(lambda n: b'{"a":' * n + b"0" + b"}" * n),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(route=st.sampled_from(BODY_ROUTES), body=bodies, json_type=st.booleans())
async def test_no_body_is_a_5xx(
    client: Client,
    tenant_key: tuple[str, str],
    route: tuple[str, str],
    body: bytes,
    json_type: bool,
) -> None:
    method, path = route
    _, key = tenant_key
    headers = headers_for(path, key)
    if not json_type:
        headers["Content-Type"] = "application/octet-stream"
    response = await client.request(method, path.format(id="t-1"), content=body, headers=headers)
    assert response.status_code < 500, (body, response.text)
