"""The console over plain HTTP: logging in, sessions, CSRF, and who may see what.

A tenant's user sees only its own tenant (pages, htmx fragments and direct URLs); a
console cookie is no credential for /v1 or /admin; a bearer key is no console login.
"""

import re
from typing import Any

import pytest
from conftest import bearer, make_tenant_key, wait_for_status
from console_helpers import PASSWORD, csrf_in, log_in, make_user
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.console.sessions import (
    MAX_FAILURES_PER_ACCOUNT,
    MAX_FAILURES_PER_ADDRESS,
    SESSION_COOKIE,
)
from gateway.settings import Settings

Client = AsyncTestClient[Any]


async def new_client(settings: Settings) -> Client:
    return AsyncTestClient(app=create_app(settings), base_url="http://testserver.local")


async def test_pages_need_a_login_and_a_bearer_key_is_not_one(
    client: Client, tenant_key: tuple[str, str]
) -> None:
    answer = await client.get("/console/overview", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/login"
    with_key = await client.get(
        "/console/overview", headers=bearer(tenant_key[1]), follow_redirects=False
    )
    assert with_key.status_code == 303
    fragment = await client.get("/console/tasks", headers={"HX-Request": "true"})
    assert fragment.headers.get("HX-Redirect") == "/console/login"


async def test_login_sets_a_safe_cookie_and_logout_ends_the_session(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    owner = await make_user(settings, "owner", tenant_key[0])
    page = await client.get("/console/login")
    answer = await client.post(
        "/console/login",
        data={"email": owner.email.upper(), "password": PASSWORD, "_csrf": csrf_in(page.text)},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    cookie = next(h for h in answer.headers.get_list("set-cookie") if SESSION_COOKIE in h)
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie or "SameSite=Lax" in cookie
    assert "Path=/console" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure when served over HTTPS
    overview = await client.get("/console/overview")
    assert overview.status_code == 200
    assert "1000" in overview.text  # the tenant's balance
    token = csrf_in(overview.text)
    out = await client.post("/console/logout", data={"_csrf": token}, follow_redirects=False)
    assert out.status_code == 303
    # The old cookie, sent again, is no session any more.
    client.cookies.set(SESSION_COOKIE, cookie.split(";")[0].split("=", 1)[1], path="/console")
    again = await client.get("/console/overview", follow_redirects=False)
    assert again.status_code == 303


async def test_wrong_passwords_lock_the_account(client: Client, settings: Settings) -> None:
    operator = await make_user(settings, "operator")
    page = await client.get("/console/login")
    token = csrf_in(page.text)
    for _ in range(MAX_FAILURES_PER_ACCOUNT):
        wrong = await client.post(
            "/console/login",
            data={"email": operator.email, "password": "nope-nope-nope", "_csrf": token},
        )
        assert wrong.status_code == 401
        assert "Wrong email or password" in wrong.text
    locked = await client.post(
        "/console/login", data={"email": operator.email, "password": PASSWORD, "_csrf": token}
    )
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.text


async def test_posts_without_the_csrf_token_are_refused(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    page = await client.get("/console/login")
    owner = await make_user(settings, "owner", tenant_key[0])
    no_token = await client.post(
        "/console/login", data={"email": owner.email, "password": PASSWORD}
    )
    assert no_token.status_code == 403
    assert csrf_in(page.text)
    token = await log_in(client, owner)
    for path, data in [
        ("/console/keys", {"name": "sneaky"}),
        ("/console/playground", {"model": "flux-1-schnell", "prompt": "x"}),
        ("/console/logout", {}),
        ("/console/webhooks/secret", {"rotate": "1"}),
    ]:
        refused = await client.post(path, data=data)
        assert refused.status_code == 403, path
        assert "CSRF" in refused.text
        forged = await client.post(path, data={**data, "_csrf": token + "x"})
        assert forged.status_code == 403, path
    keys = await client.get("/console/keys")
    assert "sneaky" not in keys.text
    # With the token (htmx sends it as a header), the same post works.
    made = await client.post(
        "/console/keys", data={"name": "honest"}, headers={"X-CSRF-Token": token}
    )
    assert made.status_code == 200
    assert "shown this once" in made.text


async def test_a_console_cookie_is_no_credential_for_the_api(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    await log_in(client, await make_user(settings, "owner", tenant_key[0]))
    await log_in(client, await make_user(settings, "operator"))
    assert client.cookies.get(SESSION_COOKIE)
    for path in ("/v1/models", "/v1/webhooks/secret", "/admin/tenants"):
        answer = await client.get(path)
        assert answer.status_code == 401, path


async def test_a_tenant_sees_only_its_own(client: Client, settings: Settings, worker: None) -> None:
    mine, _ = await make_tenant_key(settings)
    theirs, their_key = await make_tenant_key(settings)
    submitted = await client.post(
        "/v1/images/generations",
        json={
            "model": "flux-1-schnell",
            "prompt": "their secret cat",
            "callback_url": "https://example.com/hook",
        },
        headers=bearer(their_key),
    )
    assert submitted.status_code in (200, 202), submitted.text
    task_id = submitted.json()["id"]
    done = await wait_for_status(client, their_key, task_id, {"completed"})
    image = done["results"][0]

    # Their own owner sees it (so the checks below are not vacuous).
    async with await new_client(settings) as other:
        await log_in(other, await make_user(settings, "owner", theirs))
        assert task_id in (await other.get("/console/tasks")).text
        stream = await other.get(f"/console/tasks/{task_id}/events")
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "event: task\ndata: " in stream.text
        assert '"status":"completed"' in stream.text
        assert (
            image.split("?")[0].rsplit("/", 1)[1]
            in (await other.get(f"/console/tasks/{task_id}")).text
        )
        their_keys = (await other.get("/console/keys")).text
        # Their owner may deliver the callback again: a new delivery on the task's page.
        detail = await other.get(f"/console/tasks/{task_id}")
        before = detail.text.count("https://example.com/hook</td>")
        again = await other.post(
            f"/console/tasks/{task_id}/redeliver",
            data={"_csrf": csrf_in(detail.text)},
            follow_redirects=False,
        )
        assert again.status_code == 303
        after = (await other.get(f"/console/tasks/{task_id}")).text
        assert after.count("https://example.com/hook</td>") == before + 1

    await log_in(client, await make_user(settings, "owner", mine))
    listing = await client.get("/console/tasks")
    assert listing.status_code == 200
    assert task_id not in listing.text
    fragment = await client.get("/console/tasks", headers={"HX-Request": "true"})
    assert task_id not in fragment.text
    for path in (
        f"/console/tasks/{task_id}",
        f"/console/tasks/{task_id}/status",
        f"/console/tasks/{task_id}/events",
    ):
        answer = await client.get(path)
        assert answer.status_code == 404, path
        assert "their secret cat" not in answer.text
    token = csrf_in((await client.get("/console/keys")).text)
    redeliver = await client.post(f"/console/tasks/{task_id}/redeliver", data={"_csrf": token})
    assert redeliver.status_code == 404
    # Their keys: neither listed on my page nor revocable by id.
    my_keys = (await client.get("/console/keys")).text
    their_prefixes = [p for p in ("tg_",) if p in their_keys]
    assert their_prefixes
    their_key_ids = re.findall(r"/console/keys/(key_[0-9a-f]+)/revoke", their_keys)
    assert their_key_ids
    for key_id in their_key_ids:
        assert key_id not in my_keys
        revoke = await client.post(f"/console/keys/{key_id}/revoke", data={"_csrf": token})
        assert revoke.status_code == 404
    usage = await client.get("/console/usage")
    assert "flux-1-schnell" not in usage.text
    csv = await client.get("/console/usage.csv")
    assert csv.status_code == 200
    assert "flux-1-schnell" not in csv.text
    # The operator pages are not a tenant's.
    assert (await client.get("/console/operator/tenants")).status_code in (403, 404)


async def test_a_member_manages_keys_only_if_the_owner_lets_them(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    tenant_id = tenant_key[0]
    owner_token = await log_in(client, await make_user(settings, "owner", tenant_id))
    async with await new_client(settings) as member:
        member_token = await log_in(member, await make_user(settings, "member", tenant_id))
        allowed = await member.post(
            "/console/keys", data={"name": "by-member", "_csrf": member_token}
        )
        assert allowed.status_code == 200
        assert "shown this once" in allowed.text
        # The owner forbids it: the checkbox unticked.
        off = await client.post("/console/keys/members", data={"_csrf": owner_token})
        assert off.status_code == 200
        refused = await member.post("/console/keys", data={"name": "again", "_csrf": member_token})
        assert refused.status_code == 403
        page = await member.get("/console/keys")
        assert "Create key" not in page.text
        # A member may not change the rule back, nor see the webhook secret.
        sneaky = await member.post(
            "/console/keys/members", data={"allowed": "on", "_csrf": member_token}
        )
        assert sneaky.status_code == 403
        secret = await member.post("/console/webhooks/secret", data={"_csrf": member_token})
        assert secret.status_code == 403


async def test_changing_the_password_ends_the_other_sessions(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    owner = await make_user(settings, "owner", tenant_key[0])
    async with await new_client(settings) as elsewhere:
        await log_in(elsewhere, owner)
        token = await log_in(client, owner)
        changed = await client.post(
            "/console/account/password",
            data={"current": PASSWORD, "new": "a brand new passphrase", "_csrf": token},
        )
        assert changed.status_code == 200
        assert "1 other session(s) ended" in changed.text
        assert (await client.get("/console/overview")).status_code == 200
        gone = await elsewhere.get("/console/overview", follow_redirects=False)
        assert gone.status_code == 303


@pytest.mark.parametrize("role", ["member", "owner"])
async def test_an_invitation_link_makes_an_account_once(
    client: Client, settings: Settings, tenant_key: tuple[str, str], role: str
) -> None:
    token = await log_in(client, await make_user(settings, "owner", tenant_key[0]))
    invited = await client.post(
        "/console/users/invite",
        data={"email": f"new-{role}@example.com", "role": role, "_csrf": token},
    )
    assert invited.status_code == 200, invited.text
    link = re.search(r"http://testserver.local(/console/invite/[A-Za-z0-9_\-]+)", invited.text)
    assert link
    async with await new_client(settings) as newcomer:
        page = await newcomer.get(link.group(1))
        assert page.status_code == 200
        made = await newcomer.post(
            link.group(1),
            data={"password": "newcomer password", "_csrf": csrf_in(page.text)},
            follow_redirects=False,
        )
        assert made.status_code == 303
        assert (await newcomer.get("/console/overview")).status_code == 200
        assert (await newcomer.get(link.group(1))).status_code == 404  # used up


async def test_a_new_key_carries_models_and_budgets_never_wider_than_the_tenant(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    tenant_id = tenant_key[0]
    token = await log_in(client, await make_user(settings, "owner", tenant_id))
    made = await client.post(
        "/console/keys",
        data={
            "name": "limited",
            "models": ["krea-2-turbo", "flux-1-schnell"],
            "budget_daily": "1.5",
            "_csrf": token,
        },
    )
    assert made.status_code == 200, made.text
    secret = re.search(r'id="new-key">([^<]+)<', made.text)
    assert secret
    assert "models: flux-1-schnell, krea-2-turbo" in made.text
    assert "daily budget 1.5" in made.text
    # The API enforces them: another model is refused.
    refused = await client.post(
        "/v1/images/generations",
        json={"model": "flux-1-dev", "prompt": "x"},
        headers=bearer(secret.group(1)),
    )
    assert refused.status_code == 403, refused.text
    bad = await client.post("/console/keys", data={"budget_total": "lots", "_csrf": token})
    assert "budget_total: must be a number of credits" in bad.text

    # A tenant limited to one model cannot give a key another.
    admin = bearer(settings.admin_token)
    limited = await client.patch(
        f"/admin/tenants/{tenant_id}/limits",
        json={"allowed_models": ["krea-2-turbo"]},
        headers=admin,
    )
    assert limited.status_code == 200, limited.text
    wider = await client.post(
        "/console/keys", data={"name": "wide", "models": ["flux-1-dev"], "_csrf": token}
    )
    assert "allowed_models: this key may not use: flux-1-dev" in wider.text
    assert "shown this once" not in wider.text


async def test_many_failures_from_one_address_lock_it(client: Client, settings: Settings) -> None:
    token = csrf_in((await client.get("/console/login")).text)
    for n in range(MAX_FAILURES_PER_ADDRESS):
        wrong = await client.post(
            "/console/login",
            data={"email": f"nobody-{n}@example.com", "password": "wrong password", "_csrf": token},
        )
        assert wrong.status_code == 401
    operator = await make_user(settings, "operator")
    locked = await client.post(
        "/console/login", data={"email": operator.email, "password": PASSWORD, "_csrf": token}
    )
    assert locked.status_code == 429


async def test_an_operator_invites_an_operator_and_an_owner_cannot(
    client: Client, settings: Settings, tenant_key: tuple[str, str]
) -> None:
    token = await log_in(client, await make_user(settings, "operator"))
    invited = await client.post(
        "/console/operator/users/invite", data={"email": "second-op@example.com", "_csrf": token}
    )
    link = re.search(r"http://testserver.local(/console/invite/[A-Za-z0-9_\-]+)", invited.text)
    assert link, invited.text
    async with await new_client(settings) as newcomer:
        page = await newcomer.get(link.group(1))
        assert "operator" in page.text
        made = await newcomer.post(
            link.group(1), data={"password": "operator number two", "_csrf": csrf_in(page.text)}
        )
        assert made.status_code == 200
        assert "<h1>Tenants</h1>" in made.text
    async with await new_client(settings) as owner:
        owner_token = await log_in(owner, await make_user(settings, "owner", tenant_key[0]))
        assert (await owner.get("/console/operator/users")).status_code == 403
        refused = await owner.post(
            "/console/users/invite",
            data={"email": "sneaky@example.com", "role": "operator", "_csrf": owner_token},
        )
        assert "only an operator may invite an operator" in refused.text


async def test_the_playground_shows_the_api_s_refusals_on_its_page(
    client: Client, settings: Settings
) -> None:
    broke, _ = await make_tenant_key(settings, credits_micros=0)
    token = await log_in(client, await make_user(settings, "owner", broke))
    page = await client.get("/console/playground?model=krea-2-turbo")
    assert 'name="size"' in page.text
    assert "0.006 credits" in page.text  # the price before submitting (its shipped sale price)
    price = await client.post(
        "/console/playground/price",
        data={"model": "krea-2-turbo", "prompt": "x", "_csrf": token},
    )
    assert price.text.strip() == "0.006 credits"
    empty = await client.post(
        "/console/playground", data={"model": "krea-2-turbo", "prompt": "", "_csrf": token}
    )
    assert empty.status_code == 400
    assert "prompt: is required" in empty.text
    poor = await client.post(
        "/console/playground", data={"model": "krea-2-turbo", "prompt": "a cat", "_csrf": token}
    )
    assert poor.status_code == 402
    assert "Playground" in poor.text


async def test_cookies_are_secure_over_https_or_when_configured(
    settings: Settings, tenant_key: tuple[str, str]
) -> None:
    owner = await make_user(settings, "owner", tenant_key[0])
    async with AsyncTestClient(
        app=create_app(settings), base_url="https://testserver.local"
    ) as client:
        page = await client.get("/console/login")
        assert "Secure" in page.headers["set-cookie"]
        answer = await client.post(
            "/console/login",
            data={"email": owner.email, "password": PASSWORD, "_csrf": csrf_in(page.text)},
            follow_redirects=False,
        )
        assert answer.status_code == 303
        cookie = next(h for h in answer.headers.get_list("set-cookie") if SESSION_COOKIE in h)
        assert "Secure" in cookie
        assert "HttpOnly" in cookie
    # Behind a proxy that ends TLS, the gateway sees plain HTTP: the setting says Secure.
    behind_proxy = settings.model_copy(update={"console_secure_cookies": True})
    async with AsyncTestClient(
        app=create_app(behind_proxy), base_url="http://testserver.local"
    ) as client:
        page = await client.get("/console/login")
        assert "Secure" in page.headers["set-cookie"]


async def test_the_task_list_pages_back_in_time_within_the_tenant(
    client: Client, settings: Settings
) -> None:
    tenant_id, key = await make_tenant_key(settings)
    _, their_key = await make_tenant_key(settings)
    ids = []
    for n in range(52):
        made = await client.post(
            "/v1/images/generations",
            json={"model": "krea-2-turbo", "prompt": f"picture {n}"},
            headers=bearer(key),
        )
        assert made.status_code in (200, 202), made.text
        ids.append(made.json()["id"])
    theirs = await client.post(
        "/v1/images/generations",
        json={"model": "krea-2-turbo", "prompt": "x"},
        headers=bearer(their_key),
    )
    await log_in(client, await make_user(settings, "owner", tenant_id))
    first = await client.get("/console/tasks?status=pending")
    shown = re.findall(r'href="/console/tasks/(task-[^"]+)"', first.text)
    assert shown == ids[::-1][:50]
    older = re.search(r'href="(/console/tasks\?[^"]+)">Older tasks', first.text)
    assert older
    assert "status=pending" in older.group(1)
    second = await client.get(older.group(1).replace("&amp;", "&"))
    assert re.findall(r'href="/console/tasks/(task-[^"]+)"', second.text) == ids[1::-1]
    assert "Older tasks" not in second.text
    # The cursor is the API's (``next_cursor``): one it never gave is a 400, and no cursor
    # reaches another tenant's tasks.
    assert "cursor=" in older.group(1)
    bogus = await client.get(f"/console/tasks?cursor={theirs.json()['id']}")
    assert bogus.status_code == 400
    assert theirs.json()["id"] not in (await client.get("/console/tasks")).text


async def test_playground_submits_count_against_the_tenant_s_rate_limit(
    client: Client, settings: Settings
) -> None:
    tenant_id, _ = await make_tenant_key(settings)
    admin = bearer(settings.admin_token)
    limited = await client.patch(
        f"/admin/tenants/{tenant_id}/limits",
        json={"rate_limit_per_minute": 1, "rate_limit_burst": 1},
        headers=admin,
    )
    assert limited.status_code == 200, limited.text
    token = await log_in(client, await make_user(settings, "owner", tenant_id))
    form = {"model": "krea-2-turbo", "prompt": "a cat", "_csrf": token}
    first = await client.post("/console/playground", data=form, follow_redirects=False)
    assert first.status_code == 303
    second = await client.post("/console/playground", data=form)
    assert second.status_code == 429
