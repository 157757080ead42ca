"""What the console tests share: users made in the database, and logging in over HTTP."""

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import text

from gateway.console import accounts
from gateway.db import create_engine, session_factory, transaction
from gateway.settings import Settings

PASSWORD = "correct horse battery"
# Channels these tests make are named with this prefix and removed afterwards: the table
# is shared with the routing and worker tests of the same run.
CHANNEL_PREFIX = "console-test-"


@pytest.fixture
async def remove_console_channels(settings: Settings) -> AsyncIterator[None]:
    yield
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("DELETE FROM channels WHERE name LIKE :p"), {"p": f"{CHANNEL_PREFIX}%"}
            )
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class Login:
    email: str
    password: str = PASSWORD


async def make_user(settings: Settings, role: str, tenant_id: str | None = None) -> Login:
    email = f"{role}-{uuid.uuid4().hex[:8]}@example.com"
    engine = create_engine(settings)
    try:
        async with transaction(session_factory(engine)) as session:
            await accounts.create_user(
                session, email=email, password=PASSWORD, role=role, tenant_id=tenant_id
            )
    finally:
        await engine.dispose()
    return Login(email)


def csrf_in(html: str) -> str:
    found = re.search(r'name="_csrf" value="([^"]+)"', html)
    assert found, "no CSRF field in the page"
    return found.group(1)


async def log_in(client: Any, login: Login) -> str:
    """Log ``client`` in (its cookie jar keeps the session); the session's CSRF token."""
    page = await client.get("/console/login")
    assert page.status_code == 200, page.text
    answer = await client.post(
        "/console/login",
        data={"email": login.email, "password": login.password, "_csrf": csrf_in(page.text)},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    home = await client.get(answer.headers["location"])
    assert home.status_code == 200, home.text
    return csrf_in(home.text)
