"""The operator's pages over HTTP: channels with their circuit as the workers keep it,
editing a channel, tenants' credits and limits, tasks across tenants, the ledger check."""

import asyncio
import re
from typing import Any

import pytest
from conftest import SIM_KEY, bearer, make_tenant_key, wait_for_status
from console_helpers import CHANNEL_PREFIX, log_in, make_user, remove_console_channels
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis

from gateway.settings import Settings
from workers.circuits import Circuits

Client = AsyncTestClient[Any]
pytestmark = pytest.mark.usefixtures(remove_console_channels.__name__)
EDIT, WRONG = f"{CHANNEL_PREFIX}edit", f"{CHANNEL_PREFIX}wrong-key"


async def test_channels_show_the_workers_circuit_and_can_be_edited(
    client: Client, settings: Settings, simulator_url: str, worker: None
) -> None:
    token = await log_in(client, await make_user(settings, "operator"))
    fields = {
        "name": EDIT,
        "priority": "-1000",  # last: no task of the run is routed to it meanwhile
        "adapter": "siliconflow",
        "base_url": simulator_url,
        "api_key": SIM_KEY,
        "models": "flux-1-schnell\nflux-1-dev=black-forest-labs/FLUX.1-dev",
        "_csrf": token,
    }
    added = await client.post("/console/operator/channels", data=fields)
    assert added.status_code == 200
    channel_id = re.search(rf'/console/operator/channels/(ch_[0-9a-f]+)">{EDIT}<', added.text)
    assert channel_id
    ch = channel_id.group(1)
    assert f'data-health="{EDIT}">closed' in added.text
    assert SIM_KEY not in added.text  # the key is never shown

    # "Test": a worker runs one generation through the channel; the fragment polls for it.
    started = await client.post(f"/console/operator/channels/{ch}/test", data={"_csrf": token})
    poll = re.search(r'hx-get="(/console/operator/channels/[^"]+/test/[0-9a-f]+)"', started.text)
    assert poll, started.text
    for _ in range(100):
        outcome = await client.get(poll.group(1), headers={"HX-Request": "true"})
        if "Testing" not in outcome.text:
            break
        await asyncio.sleep(0.1)
    assert "passed — completed with 1 image(s)" in outcome.text
    broken = await client.post(
        "/console/operator/channels",
        data={**fields, "name": WRONG, "api_key": "not-the-key"},
    )
    wrong = re.search(rf'/console/operator/channels/(ch_[0-9a-f]+)">{WRONG}<', broken.text)
    assert wrong, broken.text
    started = await client.post(
        f"/console/operator/channels/{wrong.group(1)}/test", data={"_csrf": token}
    )
    poll = re.search(r'hx-get="(/console/operator/channels/[^"]+/test/[0-9a-f]+)"', started.text)
    assert poll
    for _ in range(100):
        outcome = await client.get(poll.group(1), headers={"HX-Request": "true"})
        if "Testing" not in outcome.text:
            break
        await asyncio.sleep(0.1)
    assert "failed" in outcome.text

    # The workers' own circuit breaker opens it: the page says so (its htmx refresh too).
    redis = Redis.from_url(settings.redis_url)
    try:
        circuits = Circuits(
            redis, namespace=settings.queue_name, threshold=5, window_seconds=60,
            cooldown_seconds=30,
        )  # fmt: skip
        assert await circuits.failure(ch, at_once=True)
    finally:
        await redis.aclose()
    fragment = await client.get("/console/operator/channels", headers={"HX-Request": "true"})
    assert re.search(rf'data-health="{EDIT}">open \((29|30)\.\d+ s\)', fragment.text)
    assert "<h1>" not in fragment.text  # the table alone

    duplicate = await client.post("/console/operator/channels", data=fields)
    assert "exists already" in duplicate.text
    edit = await client.get(f"/console/operator/channels/{ch}")
    assert "flux-1-dev=black-forest-labs/FLUX.1-dev" in edit.text
    saved = await client.post(
        f"/console/operator/channels/{ch}", data={"weight": "7", "models": "", "_csrf": token}
    )
    assert saved.status_code == 200
    assert "-1000 / 7" in saved.text
    bad = await client.post(
        f"/console/operator/channels/{ch}", data={"weight": "0", "_csrf": token}
    )
    assert bad.status_code == 400
    assert "weight" in bad.text
    off = await client.post(
        f"/console/operator/channels/{ch}/enabled", data={"enabled": "false", "_csrf": token}
    )
    assert f"Enable {EDIT}" in off.text


async def test_credits_limits_tasks_and_the_ledger_check(
    client: Client, settings: Settings, worker: None
) -> None:
    tenant_id, key = await make_tenant_key(settings, credits_micros=0)
    token = await log_in(client, await make_user(settings, "operator"))
    base = f"/console/operator/tenants/{tenant_id}"
    topped = await client.post(
        f"{base}/credits",
        data={"kind": "topup", "amount": "10", "reason": "invoice", "_csrf": token},
    )
    assert 'id="balance">10<' in topped.text
    no_reason = await client.post(
        f"{base}/credits", data={"kind": "adjustment", "amount": "-1", "_csrf": token}
    )
    assert "reason: an adjustment needs a reason" in no_reason.text
    adjusted = await client.post(
        f"{base}/credits",
        data={
            "kind": "adjustment",
            "amount": "-2.5",
            "reason": "refund a double top-up",
            "_csrf": token,
        },
    )
    assert 'id="balance">7.5<' in adjusted.text
    limits = await client.post(
        f"{base}/settings",
        data={
            "group": "default",
            "max_in_flight": "3",
            "allowed_models": "krea-2-turbo flux-1-schnell",
            "_csrf": token,
        },
    )
    assert "Group and limits saved" in limits.text
    shown = await client.get(
        f"/admin/tenants/{tenant_id}/limits", headers=bearer(settings.admin_token)
    )
    assert shown.json()["max_in_flight"]["value"] == 3
    assert shown.json()["allowed_models"] == ["flux-1-schnell", "krea-2-turbo"]
    unknown = await client.post(
        f"{base}/settings", data={"allowed_models": "no-such-model", "_csrf": token}
    )
    assert "unknown model(s): no-such-model" in unknown.text

    submitted = await client.post(
        "/v1/images/generations",
        json={"model": "flux-1-schnell", "prompt": "a fox"},
        headers=bearer(key),
    )
    task_id = submitted.json()["id"]
    await wait_for_status(client, key, task_id, {"completed"})
    tasks = await client.get(f"/console/operator/tasks?tenant={tenant_id}")
    assert task_id in tasks.text
    other = await client.get("/console/operator/tasks?tenant=ten_nobody")
    assert task_id not in other.text
    assert (await client.get("/console/operator/deliveries")).status_code == 200
    check = await client.post("/console/operator/ledger/check", data={"_csrf": token})
    assert "The ledger is consistent" in check.text
    search = await client.get(f"/console/operator/tenants?q={tenant_id}")
    assert tenant_id in search.text


async def test_names_are_shown_as_text_never_as_markup(client: Client, settings: Settings) -> None:
    token = await log_in(client, await make_user(settings, "operator"))
    made = await client.post(
        "/console/operator/tenants",
        data={"name": '<script>alert("x")</script>', "_csrf": token},
    )
    assert made.status_code == 200
    assert '<script>alert("x")</script>' not in made.text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in made.text
