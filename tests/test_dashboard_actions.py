"""The dashboard's run actions taken for real: Cancel, Retry and "Retry reusing
outputs" clicked in Chromium, on a dashboard built with ``allow_actions=True``. The
read-only default, the buttons shown per run status, the form token, the
Sec-Fetch-Site check and the auth hook are tested in tests/test_dashboard.py."""

from __future__ import annotations

import re
import uuid
from typing import Any

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from pgflow_sa import get_run
from pgflow_sa._db import sync_engine
from pgflow_sa.dashboard import dashboard_app

from .test_dashboard import (  # fixtures and helpers of the dashboard's tests
    SCREENSHOTS,
    _form,
    _idle_run,
    browser,  # noqa: F401 - a fixture
    dash_db,  # noqa: F401 - a fixture
    http,
    serve_asgi,
)


def _run(url: str, run_id: uuid.UUID) -> Any:
    engine = sync_engine(url)
    try:
        with engine.connect() as conn:
            return get_run(conn, run_id, steps=False)
    finally:
        engine.dispose()


def _click(driver: webdriver.Chrome, action: str) -> None:
    """Click an action's button and wait for the page it leads to."""
    driver.execute_script("window.beforeAction = true")
    driver.find_element(By.CSS_SELECTOR, f'button[data-action="{action}"]').click()
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return window.beforeAction") is None
    )
    problems = driver.find_elements(By.CSS_SELECTOR, "p.problem")
    assert not problems, problems[0].text


def test_actions_cancel_and_retry(
    dash_db: dict[str, Any],  # noqa: F811
    browser: webdriver.Chrome,  # noqa: F811
) -> None:
    url, failed = dash_db["url"], dash_db["ids"]["failed"]
    idle = _idle_run(url)
    with serve_asgi(dashboard_app(url, allow_actions=True)) as base:
        # Cancel a started run: the page comes back with the run cancelled
        browser.get(f"{base}/runs/{idle}")
        _click(browser, "cancel")
        assert browser.current_url == f"{base}/runs/{idle}"
        run = _run(url, idle)
        assert run.cancelled and run.finished
        offered = browser.find_elements(By.CSS_SELECTOR, "button[data-action]")
        assert [b.get_attribute("data-action") for b in offered] == [
            "retry",
            "retry_reusing_outputs",
        ]  # a cancelled run can be retried, not cancelled again
        browser.save_screenshot(str(SCREENSHOTS / "run-cancelled.png"))

        # Retry a failed run, then retry it reusing outputs: each opens the retry
        for action in ("retry", "retry_reusing_outputs"):
            browser.get(f"{base}/runs/{failed}")
            _click(browser, action)
            found = re.search(r"/runs/([0-9a-f-]{36})$", browser.current_url)
            assert found, browser.current_url
            retry = uuid.UUID(found.group(1))
            assert retry != failed
            assert _run(url, retry).retry_of == failed
            link = browser.find_element(By.CSS_SELECTOR, ".retry-of a")
            assert link.get_attribute("href") == f"{base}/runs/{failed}"
        browser.save_screenshot(str(SCREENSHOTS / "run-retried.png"))

        # an action the run's state refuses is a 409 saying why (the run has finished)
        token = _form(base, failed)[1]
        status, body = http(
            "POST",
            f"{base}/runs/{idle}/actions/cancel",
            {"Cookie": f"pgflow_sa_csrf={token}", "Sec-Fetch-Site": "same-origin"},
            f"csrf_token={token}".encode(),
        )
        assert status == 409, body
        status, body = http(
            "POST",
            f"{base}/runs/{uuid.uuid4()}/actions/retry",
            {"Cookie": f"pgflow_sa_csrf={token}"},
            f"csrf_token={token}".encode(),
        )
        assert status == 404, body
