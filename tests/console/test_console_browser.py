"""The console in a real browser: headless Chromium from the OS packages (``chromium``),
driven by Playwright pointed at that executable (``playwright install`` is never run).

A real gateway (uvicorn), worker and upstream simulator behind it. Each flow saves a
screenshot of every page it visits; ``TOLLGATE_CONSOLE_SCREENSHOTS=docs/console`` puts
them where the README shows them (``scripts/console_screenshots.sh``).

Without Chromium these tests skip, except under ``CI=true``, where they fail.
"""

import os
import re
import shutil
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from conftest import SIM_KEY, make_tenant_key, serve_app
from console_helpers import CHANNEL_PREFIX, Login, make_user, remove_console_channels

from gateway.settings import Settings

CHROMIUM = os.environ.get("TOLLGATE_CHROMIUM", "/usr/bin/chromium")

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the dev extra installs it
    async_playwright = None  # type: ignore[assignment]


def _need_browser() -> None:
    missing = async_playwright is None or not shutil.which(CHROMIUM)
    if missing:
        message = f"the browser tests need Chromium at {CHROMIUM} and the playwright package"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
async def browser() -> AsyncIterator["Browser"]:
    _need_browser()
    async with async_playwright() as driver:
        launched = await driver.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def gateway(settings: Settings, worker: None) -> AsyncIterator[str]:
    async with serve_app(settings) as url:
        yield url


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TOLLGATE_CONSOLE_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


UNLABELLED = """() => Array.from(document.querySelectorAll("input, select, textarea, button"))
  .filter(el => el.type !== "hidden")
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                && !(el.tagName === "BUTTON" && el.textContent.trim()))
  .map(el => el.outerHTML.slice(0, 120))"""


async def snap(page: "Page", shots: Path, name: str) -> None:
    """Save the page's screenshot, and check every control on it has a label."""
    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    assert await page.evaluate(UNLABELLED) == [], f"controls without a label on {name}"


async def log_in(page: "Page", base: str, login: Login) -> None:
    await page.goto(f"{base}/console/login")
    await page.get_by_label("Email").fill(login.email)
    await page.get_by_label("Password").fill(login.password)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_load_state("networkidle")


def credits(text: str) -> Decimal:
    return Decimal(text.strip())


async def test_a_tenant_owner_generates_an_image_and_pays_for_it(
    browser: "Browser", gateway: str, settings: Settings, shots: Path
) -> None:
    tenant_id, _ = await make_tenant_key(settings, credits_micros=100_000_000)  # 100 credits
    owner = await make_user(settings, "owner", tenant_id)
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    await page.goto(f"{gateway}/console/login")
    await snap(page, shots, "login")
    await log_in(page, gateway, owner)
    await expect(page.locator("h1")).to_contain_text("Overview")
    before = credits(await page.locator("#balance").inner_text())
    assert before == Decimal(100)
    await expect(page.locator("#spend-chart canvas")).to_have_count(1)  # uPlot drew the chart

    # A key, shown once with a copy button.
    await page.get_by_role("link", name="Keys").click()
    await page.get_by_label("Name").fill("from the browser")
    await page.get_by_role("button", name="Create key").click()
    secret = await page.locator("#new-key").inner_text()
    assert re.fullmatch(r"tg_[A-Za-z0-9_\-]{40,}", secret)
    await expect(page.get_by_role("button", name="Copy key")).to_be_visible()
    await snap(page, shots, "tenant-keys")
    await page.reload()
    assert secret not in await page.content()  # never shown again

    # The playground: a model's settings from the catalogue, its price, then the run.
    await page.get_by_role("link", name="Playground").click()
    await page.get_by_label("Model").select_option("flux-1-schnell")
    images = page.get_by_label("Images (n)")
    await expect(images).to_have_value("1")  # the catalogue's default
    assert await images.get_attribute("max") == "4"  # and its range
    await page.get_by_label("Prompt", exact=True).fill("a lighthouse at dawn")
    single = credits((await page.locator("#price").inner_text()).split()[0])
    await images.fill("2")
    await images.press("Tab")  # a change: the price is asked for again
    await expect(page.locator("#price")).to_have_text(f"{single * 2} credits")
    price = single * 2
    await snap(page, shots, "tenant-playground")
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if r.url.endswith("/events") else None)
    await page.get_by_role("button", name="Generate").click()
    await expect(page.locator("h1")).to_contain_text("Task ")
    await expect(page.locator("#status-text")).to_have_text("completed", timeout=30_000)
    assert streams, "the task page did not follow the task's event stream"
    await expect(page.locator(".images img")).to_have_count(2)
    image = page.locator(".images img").first
    await expect(image).to_be_visible()
    # Loaded and decoded: a real image came back through the gateway's signed link.
    await image.evaluate("img => img.decode()")
    assert await image.evaluate("img => img.naturalWidth") > 0
    charged = credits(await page.locator("#charged").inner_text())
    assert charged == price
    await snap(page, shots, "tenant-task")

    await page.get_by_role("link", name="Tasks").click()
    await expect(page.locator(".thumbs img")).to_have_count(2)
    # Filters update the list in place (htmx) and the address with them.
    await page.get_by_label("Status").select_option("failed")
    await expect(page.locator("#task-rows")).to_contain_text("No tasks match")
    assert "status=failed" in page.url
    await page.get_by_label("Status").select_option("completed")
    await expect(page.locator(".thumbs img")).to_have_count(2)
    await snap(page, shots, "tenant-tasks")

    await page.get_by_role("link", name="Overview").click()
    after = credits(await page.locator("#balance").inner_text())
    assert after == before - charged
    await expect(page.locator("#spend-chart canvas")).to_have_count(1)
    await snap(page, shots, "tenant-overview")
    for name in ("Webhooks", "Usage", "Users"):
        await page.get_by_role("link", name=name).click()
        await expect(page.locator("h1")).to_contain_text(name)
        await snap(page, shots, f"tenant-{name.lower()}")
    await page.get_by_role("link", name="Webhooks").click()
    await page.get_by_role("button", name="Reveal secret").click()
    await expect(page.locator("#webhook-secret")).to_contain_text("whsec_")
    # On a phone: the same page, nothing wider than the screen.
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.get_by_role("link", name="Overview").click()
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the overview is {width}px wide on a 390px phone"
    await snap(page, shots, "tenant-overview-phone")
    assert errors == []
    await context.close()


@pytest.mark.usefixtures(remove_console_channels.__name__)
async def test_an_operator_onboards_a_tenant_and_a_channel(
    browser: "Browser", gateway: str, settings: Settings, simulator_url: str, shots: Path
) -> None:
    operator = await make_user(settings, "operator")
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # With the keyboard alone: skip link, email, password, then Enter.
    await page.goto(f"{gateway}/console/login")
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Email")).to_be_focused()
    await page.keyboard.type(operator.email)
    await page.keyboard.press("Tab")
    await page.keyboard.type(operator.password)
    await page.keyboard.press("Enter")
    await expect(page.locator("h1")).to_have_text("Tenants")

    name = f"browser-co-{os.getpid()}-{id(page) % 10_000}"
    await page.get_by_label("New tenant's name").fill(name)
    await page.get_by_role("button", name="Create tenant").click()
    await expect(page.locator("h1")).to_contain_text(name)
    await expect(page.locator("#balance")).to_have_text("0")
    await page.get_by_label("Change").select_option("topup")
    await page.get_by_label("Credits").fill("25.5")
    await page.get_by_label("Reason").fill("first invoice")
    await page.get_by_role("button", name="Apply").click()
    await expect(page.locator("#balance")).to_have_text("25.5")
    await snap(page, shots, "operator-tenant")
    await page.get_by_role("link", name="Tenants").click()
    await page.get_by_label("Search by name or id").fill(name)
    await page.get_by_role("button", name="Search").click()
    await expect(page.get_by_role("link", name=name)).to_be_visible()
    await snap(page, shots, "operator-tenants")

    await page.get_by_role("link", name="Channels").click()
    channel = f"{CHANNEL_PREFIX}{id(page) % 100_000}"
    await page.get_by_label("Name", exact=True).fill(channel)
    await page.get_by_label("Adapter").select_option("siliconflow")
    await page.get_by_label("Base URL").fill(simulator_url)
    await page.get_by_label("API key").fill(SIM_KEY)
    await page.get_by_label("Models").fill("flux-1-schnell")
    await page.get_by_role("button", name="Add channel").click()
    health = page.locator(f'[data-health="{channel}"]')
    await expect(health).to_contain_text("closed")
    await page.get_by_role("button", name=f"Test {channel}").click()
    outcome = page.locator("#channel-test-outcome")
    await expect(outcome).to_contain_text("passed", timeout=30_000)
    await snap(page, shots, "operator-channels")
    await page.get_by_role("button", name=f"Disable {channel}").click()
    await expect(page.get_by_role("button", name=f"Enable {channel}")).to_be_visible()

    for link, file in (("Tasks", "operator-tasks"), ("Callbacks", "operator-callbacks")):
        await page.get_by_role("link", name=link).click()
        await snap(page, shots, file)
    await page.get_by_role("link", name="Ledger").click()
    await page.get_by_role("button", name="Run the check").click()
    await expect(page.locator("#ledger-result")).to_contain_text("consistent")
    await snap(page, shots, "operator-ledger")
    await page.get_by_role("link", name="Operators").click()
    await expect(page.get_by_role("cell", name=operator.email)).to_be_visible()
    await snap(page, shots, "operator-operators")
    await page.get_by_role("link", name="Account").click()
    await snap(page, shots, "account")
    assert errors == []
    await context.close()


async def test_prices_codes_and_suspension_reach_the_tenant_s_pages(
    browser: "Browser", gateway: str, settings: Settings, shots: Path
) -> None:
    """An operator sets a group's price → the tenant's playground quotes it; the tenant
    redeems a code → its balance rises; the operator suspends it → the playground refuses."""
    tenant_id, _ = await make_tenant_key(settings, credits_micros=10_000_000)  # 10 credits
    owner = await make_user(settings, "owner", tenant_id)
    operator = await make_user(settings, "operator")
    async with httpx.AsyncClient(base_url=gateway) as api:
        made = await api.post(
            "/admin/redemption-codes",
            json={"amount": "2.5", "count": 1, "note": "browser test"},
            headers={"Authorization": f"Bearer {settings.admin_token}"},
        )
    assert made.status_code == 201, made.text
    code = made.json()["codes"][0]
    errors: list[str] = []
    ops = await (await browser.new_context(viewport={"width": 1200, "height": 900})).new_page()
    ops.on("pageerror", lambda exc: errors.append(str(exc)))
    mine = await (await browser.new_context(viewport={"width": 1200, "height": 900})).new_page()
    mine.on("pageerror", lambda exc: errors.append(str(exc)))

    # The operator makes a group, puts the tenant in it, and gives it its own price.
    await log_in(ops, gateway, operator)
    await ops.get_by_role("link", name="Prices").click()
    group = f"browser-{os.getpid()}-{id(ops) % 10_000}"
    await ops.get_by_label("Name", exact=True).fill(group)
    await ops.get_by_label("Multiplier", exact=True).last.fill("2")
    await ops.get_by_label("Description", exact=True).last.fill("resellers, twice the list")
    await ops.get_by_role("button", name="Create group").click()
    await expect(ops.get_by_role("link", name=group)).to_be_visible()
    await ops.goto(f"{gateway}/console/operator/tenants/{tenant_id}")
    await ops.get_by_label("Group", exact=True).select_option(group)
    await ops.get_by_role("button", name="Save group and limits").click()
    await expect(ops.locator("p.note")).to_contain_text("Group and limits saved")
    await ops.goto(f"{gateway}/console/operator/prices/groups/{group}")
    row = ops.locator("#price-krea-2-turbo")
    await expect(row.locator(".source")).to_have_text("group_multiplier")
    await row.get_by_label("Rule").select_option("per_call")
    await row.get_by_label("Amount").fill("0.25")
    await row.get_by_role("button", name="Set the price of krea-2-turbo").click()
    await expect(ops.locator("#price-krea-2-turbo .source")).to_have_text("group_override")
    await snap(ops, shots, "operator-group-prices")
    await ops.get_by_role("link", name="All groups").click()
    await expect(ops.get_by_role("cell", name=f"{group}/krea-2-turbo")).to_be_visible()
    await snap(ops, shots, "operator-prices")
    await ops.get_by_role("link", name="Rates").click()
    await ops.get_by_label("Currency").fill("CNY")
    await ops.get_by_label("Credits per unit").fill("0.14")
    await ops.get_by_label("Note").fill("from the browser test")
    await ops.get_by_role("button", name="Set rate").click()
    await expect(ops.get_by_role("cell", name="from the browser test")).to_be_visible()
    await snap(ops, shots, "operator-rates")

    # The tenant's playground quotes the group's own price (every gateway within the
    # price book's refresh time).
    await log_in(mine, gateway, owner)
    for _ in range(20):
        await mine.goto(f"{gateway}/console/playground?model=krea-2-turbo")
        if (await mine.locator("#price").inner_text()).strip() == "0.25 credits":
            break
        await mine.wait_for_timeout(500)
    await expect(mine.locator("#price")).to_have_text("0.25 credits")

    # A code: the balance rises by its amount.
    await mine.get_by_role("link", name="Redeem").click()
    await expect(mine.locator("#balance")).to_have_text("10")
    await mine.get_by_label("Redemption code").fill(code)
    await mine.get_by_role("button", name="Redeem").click()
    await expect(mine.locator("#redeemed")).to_contain_text("2.5 credits added")
    await expect(mine.locator("#balance")).to_have_text("12.5")
    await snap(mine, shots, "tenant-redeem")
    await mine.get_by_label("Redemption code").fill(code)
    await mine.get_by_role("button", name="Redeem").click()
    await expect(mine.locator("#redeem-error")).to_contain_text("redemption_code_used")
    await mine.get_by_role("link", name="Overview").click()
    await expect(mine.locator("#balance")).to_have_text("12.5")

    # The operator suspends the tenant: the playground shows the API's refusal.
    await ops.goto(f"{gateway}/console/operator/tenants/{tenant_id}")
    await ops.get_by_role("button", name="Suspend tenant").click()
    await expect(ops.locator("#tenant-state")).to_contain_text("suspended")
    await snap(ops, shots, "operator-tenant-suspended")
    await mine.goto(f"{gateway}/console/playground?model=krea-2-turbo")
    await mine.get_by_label("Prompt", exact=True).fill("a lighthouse at dawn")
    await mine.get_by_role("button", name="Generate").click()
    await expect(mine.locator("#playground-error")).to_contain_text("tenant_suspended")
    await snap(mine, shots, "tenant-playground-suspended")
    await mine.get_by_role("link", name="Overview").click()
    await expect(mine.locator("#suspended")).to_be_visible()
    assert errors == []
