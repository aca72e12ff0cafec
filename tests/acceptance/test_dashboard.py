"""The dashboard in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import shutil
from pathlib import Path

from playwright.async_api import async_playwright

from campaign_scheduler.config import Settings
from campaign_scheduler.store import NodeKey, StateStore
from campaign_scheduler.timewindows import utcnow
from campaign_scheduler.worker import SchedulerWorker
from tests.conftest import TOKEN, has_state, make_visit, serve, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_MISSING = not Path(CHROMIUM).exists()
# Flags this closed network needs: no background fetches to Google's services.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


async def test_retry_button_really_reruns_a_failed_job(
    settings: Settings, worker: SchedulerWorker, store: StateStore, tmp_path: Path
) -> None:
    assert not CHROMIUM_MISSING, "Chromium is missing: scripts/test installs Debian's chromium"
    (v,) = await make_visit(store, config={"fail_times": 3})
    await worker.scheduling.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow()
    )
    key = NodeKey(*v.key)

    await wait_for(lambda: has_state(store, key, "FAILED"), timeout=20)
    async with serve(settings) as client, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page()
        await page.goto(str(client.base_url) + "/")
        await page.fill("#token", TOKEN)
        await page.click("#save")
        retry = page.locator("button.retry")
        await retry.wait_for(timeout=15000)
        assert "planned failure on attempt 3" in await page.locator("#failed").inner_text()
        assert (
            await page.locator(
                'td[data-queue="campaign-execution"][data-state="failed"]'
            ).inner_text()
            == "1"
        )
        await page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
        await retry.click()
        await wait_for(
            lambda: has_state(store, key, "COMPLETED"), timeout=20
        )  # the job really ran again
        await page.locator("#failed").get_by_text("none").wait_for(timeout=10000)
        # The campaign funnel and the user's journey from the audit trail.
        await page.fill("#campaign", v.campaign_id)
        await page.click("#showFunnel")
        await page.locator("#funnel").get_by_text("COMPLETED 1").wait_for(timeout=5000)
        await page.fill("#user", v.product_user_id)
        await page.click("#showJourney")
        journey = page.locator("#journey")
        await journey.get_by_text("retry_requested").wait_for(timeout=5000)
        text = await journey.inner_text()
        assert text.count("RUNNING → FAILED") == 1 and "RUNNING → COMPLETED" in text
        await page.screenshot(path=str(tmp_path / "after.png"), full_page=True)
        shutil.copy(tmp_path / "after.png", Path("/tmp/dashboard-after.png"))
        await browser.close()


async def test_dashboard_says_when_the_token_is_wrong(
    settings: Settings, worker: SchedulerWorker
) -> None:
    async with serve(settings) as client, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page()
        await page.goto(str(client.base_url) + "/")
        await page.fill("#token", "wrong")
        await page.click("#save")
        await page.locator("#status .err").wait_for(timeout=10000)
        assert "bearer token" in await page.locator("#status").inner_text()
        await browser.close()
