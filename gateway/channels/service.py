"""Managing channels: create, read, change, remove; and the view that never shows a key.

Used by the admin API and the CLI alike, so both validate the same way and
name the field at fault. Workers read the table themselves
(``workers/routing.py``) and see a change within their directory's TTL.
"""

import re
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.channels.models import ADAPTER_NAMES, MAX_WEIGHT, Channel
from gateway.db import utcnow
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.prices.service import check_price, price_json
from gateway.tenants.models import new_id
from pricing.catalog import Catalog

EDITABLE = (
    "name",
    "adapter",
    "base_url",
    "api_key",
    "models",
    "priority",
    "weight",
    "max_concurrency",
    "enabled",
    "upstream_costs",
)
REQUIRED = ("name", "adapter", "base_url", "api_key", "models")

# A name is used as a reference in URLs and on the command line: no spaces, no
# slashes, and no colon, so it can never be taken for an ``env:<adapter>``
# channel of TOLLGATE_UPSTREAMS.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# What ``new_id("ch")`` makes; a name of that shape would make a reference ambiguous.
_CHANNEL_ID = re.compile(r"ch_[0-9a-f]{16}")
# A key goes into an HTTP header: printable ASCII without spaces.
_KEY = re.compile(r"[\x21-\x7e]+")


def _check_text(name: str, value: object, max_length: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(name, "must be a non-empty string")
    if len(value) > max_length:
        raise InvalidRequest(name, f"must be at most {max_length} characters")
    if "\x00" in value:
        raise InvalidRequest(name, "must not contain NUL (\\u0000) characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        # Lone surrogates (an undecodable environment variable, say): PostgreSQL
        # cannot store them, and the driver's error would quote the statement.
        raise InvalidRequest(name, "must be valid Unicode text") from None
    return value


def _check_name(value: object) -> str:
    name = _check_text("name", value, 100)
    if not _NAME.fullmatch(name):
        raise InvalidRequest(
            "name",
            "may hold only letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    if _CHANNEL_ID.fullmatch(name):
        raise InvalidRequest("name", "must not look like a channel id (ch_ and 16 hex digits)")
    return name


def _check_api_key(value: object) -> str:
    # The messages here never quote the value.
    key = _check_text("api_key", value, 4096)
    if not _KEY.fullmatch(key):
        raise InvalidRequest(
            "api_key", "must be printable ASCII without spaces, tabs or line breaks"
        )
    return key


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, "must be an integer")
    if not low <= value <= high:
        raise InvalidRequest(name, f"must be between {low} and {high}")
    return value


def _check_base_url(value: object) -> str:
    url = _check_text("base_url", value, 2048).rstrip("/")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise InvalidRequest("base_url", "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a port out of range
    except ValueError:
        raise InvalidRequest("base_url", "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("base_url", "must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidRequest("base_url", "must not carry a query, fragment or credentials")
    return url


def _check_models(value: object, catalog: Catalog) -> dict[str, str | None]:
    if not isinstance(value, dict) or not value:
        raise InvalidRequest(
            "models",
            "must be a non-empty object mapping catalogue model ids to the upstream's model id "
            "(null: the catalogue's)",
        )
    checked: dict[str, str | None] = {}
    for model_id, upstream in value.items():
        if catalog.model(model_id) is None:
            raise InvalidRequest(f"models.{model_id}", "is not a model of the catalogue")
        if upstream is not None:
            upstream = _check_text(f"models.{model_id}", upstream, 200)
        checked[model_id] = upstream
    return checked


def _check_costs(value: object, catalog: Catalog) -> dict[str, dict[str, Any]]:
    """This account's own upstream cost per model: ``currency``, ``rule``, ``amount`` and
    the modifiers, as in the catalogue's ``upstream_cost``."""
    if not isinstance(value, dict):
        raise InvalidRequest("upstream_costs", "must be an object: model id -> its cost")
    checked: dict[str, dict[str, Any]] = {}
    for model_id, cost in value.items():
        where = f"upstream_costs.{model_id}"
        if catalog.model(model_id) is None:
            raise InvalidRequest(where, "is not a model of the catalogue")
        if not isinstance(cost, dict):
            raise InvalidRequest(where, "must be an object with currency, rule and amount")
        try:
            price = check_price(catalog, model_id, cost, cost=True)
        except InvalidRequest as exc:
            raise InvalidRequest(where, exc.message) from None
        checked[model_id] = {"currency": cost["currency"], **price_json(price)}
    return checked


def validate_fields(fields: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """The editable fields of ``fields``, each checked; unknown ones are refused."""
    checked: dict[str, Any] = {}
    for name, value in fields.items():
        match name:
            case "name":
                checked[name] = _check_name(value)
            case "adapter":
                if value not in ADAPTER_NAMES:
                    raise InvalidRequest(name, f"must be one of {', '.join(ADAPTER_NAMES)}")
                checked[name] = value
            case "base_url":
                checked[name] = _check_base_url(value)
            case "api_key":
                checked[name] = _check_api_key(value)
            case "models":
                checked[name] = _check_models(value, catalog)
            case "priority":
                checked[name] = _check_int(name, value, -1000, 1000)
            case "weight":
                checked[name] = _check_int(name, value, 1, MAX_WEIGHT)
            case "max_concurrency":
                checked[name] = _check_int(name, value, 1, 100_000)
            case "upstream_costs":
                checked[name] = _check_costs(value, catalog)
            case "enabled":
                if not isinstance(value, bool):
                    raise InvalidRequest(name, "must be true or false")
                checked[name] = value
            case _:
                raise InvalidRequest(name, f"unknown field; fields are {', '.join(EDITABLE)}")
    return checked


async def create_channel(
    session: AsyncSession, fields: dict[str, Any], catalog: Catalog
) -> Channel:
    checked = validate_fields(fields, catalog)
    for name in REQUIRED:
        if name not in checked:
            raise InvalidRequest(name, "is required")
    channel = Channel(id=new_id("ch"), **checked)
    session.add(channel)
    await _flush(session, channel.name)
    return channel


async def get_channel(session: AsyncSession, ref: str) -> Channel:
    """A channel by id or by name."""
    if "\x00" in ref:
        # PostgreSQL refuses NUL in text; no channel could match it anyway.
        raise NotFound(f"No channel {ref!r}")
    query = select(Channel).where((col(Channel.id) == ref) | (col(Channel.name) == ref))
    channel = (await session.exec(query)).first()
    if channel is None:
        raise NotFound(f"No channel {ref!r}")
    return channel


async def list_channels(session: AsyncSession) -> list[Channel]:
    query = select(Channel).order_by(col(Channel.priority).desc(), col(Channel.name))
    return list((await session.exec(query)).all())


async def update_channel(
    session: AsyncSession, ref: str, fields: dict[str, Any], catalog: Catalog
) -> Channel:
    checked = validate_fields(fields, catalog)
    channel = await get_channel(session, ref)
    for name, value in checked.items():
        setattr(channel, name, value)
    channel.updated_at = utcnow()
    session.add(channel)
    await _flush(session, channel.name)
    return channel


async def delete_channel(session: AsyncSession, ref: str) -> None:
    """Remove a channel. Tasks whose upstream job ran there fail over to another channel."""
    channel = await get_channel(session, ref)
    await session.delete(channel)
    await session.flush()


async def _flush(session: AsyncSession, name: str) -> None:
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict(f"A channel named {name!r} exists already") from None


def channel_view(channel: Channel) -> dict[str, Any]:
    """What the API and CLI show of a channel: everything but the key."""
    return {
        "id": channel.id,
        "name": channel.name,
        "adapter": channel.adapter,
        "base_url": channel.base_url,
        "api_key_set": bool(channel.api_key),
        "models": channel.models,
        "upstream_costs": channel.upstream_costs or {},
        "priority": channel.priority,
        "weight": channel.weight,
        "max_concurrency": channel.max_concurrency,
        "enabled": channel.enabled,
        "created_at": channel.created_at.isoformat(),
        "updated_at": channel.updated_at.isoformat(),
    }
