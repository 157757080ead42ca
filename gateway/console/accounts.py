"""Console users: create them, check a password, change it, and invite by an expiring link.

Passwords are hashed with argon2id (``argon2-cffi``'s defaults). Services take the
session first and never commit, like the rest of ``gateway/``. An email is stored
lowercased, so it is one account however it is typed.
"""

import hashlib
import re
import secrets
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.console.models import ROLES, ConsoleUser, Invitation, TenantConsoleSettings
from gateway.db import utcnow
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.tenants.models import Tenant, new_id

MIN_PASSWORD = 10
MAX_PASSWORD = 200
INVITATION_TTL = timedelta(days=3)
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
_hasher = PasswordHasher()
# Checked against when the email is unknown, so a wrong email costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a password anyone has")


def normal_email(email: str) -> str:
    email = email.strip().lower()
    if not _EMAIL.match(email):
        raise InvalidRequest("email", "must be an email address (name@domain)")
    return email


def check_password_rules(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidRequest(
            "password", f"must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long"
        )


def hash_password(password: str) -> str:
    check_password_rules(password)
    return _hasher.hash(password)


def password_matches(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


async def create_user(
    session: AsyncSession,
    *,
    email: str,
    password: str,
    role: str,
    tenant_id: str | None = None,
) -> ConsoleUser:
    email = normal_email(email)
    if role not in ROLES:
        raise InvalidRequest("role", f"must be one of {', '.join(ROLES)}")
    if role == "operator" and tenant_id is not None:
        raise InvalidRequest("tenant", "an operator belongs to no tenant")
    if role != "operator":
        if tenant_id is None:
            raise InvalidRequest("tenant", f"a tenant {role} needs its tenant")
        if await session.get(Tenant, tenant_id) is None:
            raise NotFound(f"no tenant {tenant_id}")
    existing = await session.exec(select(ConsoleUser).where(ConsoleUser.email == email))
    if existing.first() is not None:
        raise Conflict(f"a console user with email {email!r} already exists")
    user = ConsoleUser(
        id=new_id("usr"),
        email=email,
        password_hash=hash_password(password),
        role=role,
        tenant_id=tenant_id,
    )
    session.add(user)
    await session.flush()
    return user


async def find_user(session: AsyncSession, email: str) -> ConsoleUser | None:
    query = select(ConsoleUser).where(ConsoleUser.email == email.strip().lower())
    return (await session.exec(query)).first()


async def authenticate(session: AsyncSession, email: str, password: str) -> ConsoleUser | None:
    """The user these credentials name, or None (unknown email, wrong password, disabled)."""
    user = await find_user(session, email)
    if user is None:
        password_matches(_DUMMY_HASH, password)
        return None
    if not password_matches(user.password_hash, password) or user.disabled_at is not None:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
        session.add(user)
    return user


async def set_password(session: AsyncSession, user: ConsoleUser, password: str) -> None:
    user.password_hash = hash_password(password)
    session.add(user)
    await session.flush()


async def list_users(session: AsyncSession, tenant_id: str | None) -> list[ConsoleUser]:
    """A tenant's users, or the operators (``tenant_id`` None)."""
    query = select(ConsoleUser).order_by(col(ConsoleUser.created_at))
    if tenant_id is None:
        query = query.where(ConsoleUser.role == "operator")
    else:
        query = query.where(ConsoleUser.tenant_id == tenant_id)
    return list((await session.exec(query)).all())


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def invite(
    session: AsyncSession,
    inviter: ConsoleUser,
    *,
    email: str,
    role: str,
    tenant_id: str | None,
) -> str:
    """Record an invitation; return its token (shown once, in the link)."""
    email = normal_email(email)
    if role not in ROLES:
        raise InvalidRequest("role", f"must be one of {', '.join(ROLES)}")
    if inviter.role != "operator":
        if role == "operator":
            raise InvalidRequest("role", "only an operator may invite an operator")
        tenant_id = inviter.tenant_id
    if (role == "operator") != (tenant_id is None):
        raise InvalidRequest("tenant", "an operator has no tenant; an owner or member has one")
    if await find_user(session, email) is not None:
        raise Conflict(f"a console user with email {email!r} already exists")
    token = secrets.token_urlsafe(32)
    session.add(
        Invitation(
            token_hash=_token_hash(token),
            email=email,
            role=role,
            tenant_id=tenant_id,
            invited_by=inviter.id,
            expires_at=utcnow() + INVITATION_TTL,
        )
    )
    await session.flush()
    return token


async def open_invitation(session: AsyncSession, token: str) -> Invitation:
    invitation = await session.get(Invitation, _token_hash(token))
    if invitation is None or invitation.used_at is not None or invitation.expires_at < utcnow():
        raise NotFound("this invitation link is unknown, used or expired")
    return invitation


async def accept_invitation(session: AsyncSession, token: str, password: str) -> ConsoleUser:
    invitation = await open_invitation(session, token)
    user = await create_user(
        session,
        email=invitation.email,
        password=password,
        role=invitation.role,
        tenant_id=invitation.tenant_id,
    )
    invitation.used_at = utcnow()
    session.add(invitation)
    await session.flush()
    return user


async def members_manage_keys(session: AsyncSession, tenant_id: str) -> bool:
    found = await session.get(TenantConsoleSettings, tenant_id)
    return True if found is None else found.members_manage_keys


async def set_members_manage_keys(session: AsyncSession, tenant_id: str, allowed: bool) -> None:
    found = await session.get(TenantConsoleSettings, tenant_id)
    if found is None:
        found = TenantConsoleSettings(tenant_id=tenant_id)
    found.members_manage_keys = allowed
    session.add(found)
    await session.flush()
