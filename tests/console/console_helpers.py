"""What the console tests share: users made in the database, and logging in over HTTP."""

import re
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.console import accounts
from gateway.db import create_engine, session_factory, transaction
from gateway.settings import Settings

PASSWORD = "correct horse battery"


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
