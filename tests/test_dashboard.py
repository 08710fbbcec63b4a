"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium; nothing downloads a browser) against a database with real runs
made by the real worker: completed, failed, running, with a map step. Screenshots
of every page go to .pgflow_sa/screenshots/ (git-ignored). Also: the FastAPI and
Flask mounts over HTTP, the read-only default, the auth hook, hidden payloads and
the missing-extra error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import uvicorn
from a2wsgi import ASGIMiddleware
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy.dialects import postgresql
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.serving import make_server

from pgflow_sa import (
    Flow,
    check_schema,
    deploy_flows,
    install_schema,
    pause_schedule,
    start_flow,
    to_sqlalchemy_url,
    trigger_schedule,
)
from pgflow_sa._db import sync_engine
from pgflow_sa.client import _page_query
from pgflow_sa.dashboard import dashboard_app
from pgflow_sa.dashboard.dag import StepNode, render_dag
from pgflow_sa.schema import indexes
from pgflow_sa.schema.indexes import RUNS_BY_START
from pgflow_sa.schema.installer import SchemaState, SchemaStatus, install_script
from pgflow_sa.testing.plugin import DatabaseFactory

from .worker_harness import running_worker

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / ".pgflow_sa" / "screenshots"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

# --- flows ---------------------------------------------------------------------------

orders = Flow("dash_orders")


@orders.step
def fetch(input: dict[str, Any]) -> list[int]:
    return list(range(input["n"]))


@orders.map(depends_on=[fetch])
def double(item: int) -> int:
    return item * 2


@orders.step(depends_on=[double])
def total(input: dict[str, Any]) -> int:
    return sum(input["double"])


broken = Flow("dash_broken", max_attempts=1)


@broken.step
def explode(input: Any) -> None:
    raise RuntimeError("the dashboard shows this error")


gates = {"gate": threading.Event(), "hold": threading.Event()}
held = Flow("dash_held")


@held.step
def gate(input: Any) -> str:
    gates["gate"].wait(30)
    return "opened"


@held.step(depends_on=[gate])
def hold(input: Any) -> str:
    gates["hold"].wait(30)
    return "released"


FLOWS = (orders, broken, held)

# --- a database with runs, a worker, a server ----------------------------------------


def _sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def _wait_for(predicate: Any, timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


class WorkerThread:
    """The real worker on its own event loop in a thread (the test itself blocks on
    the browser)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),))

    async def main(self) -> None:
        async with running_worker(FLOWS, self.url):
            self.ready.set()
            await self.stop.wait()

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        assert self.ready.wait(30), "the worker did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        for event in gates.values():
            event.set()
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        self.loop.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        _wait_for(lambda: server.started, 10, "uvicorn")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", _free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


def http(
    method: str, url: str, headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, str]:
    return http_response(method, url, headers, data)[:2]  # type: ignore[return-value]


def http_response(
    method: str, url: str, headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, str, Any]:
    """Status, body and headers; redirects are not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers


@pytest.fixture(scope="module")
def dash_db(databases: DatabaseFactory, template_db: str) -> Iterator[dict[str, Any]]:
    """A database with a completed run (with a map step), a failed run and a run
    held at its first step, and the worker still serving it."""
    url = databases.create(template=template_db)
    deploy_flows(url, FLOWS)
    for event in gates.values():
        event.clear()
    engine = sync_engine(url)
    try:
        with WorkerThread(url) as worker, engine.begin() as conn:
            ids = {
                "completed": start_flow(conn, orders, {"n": 3, "note": "long " * 200}).run_id,
                "failed": start_flow(conn, broken, {"why": "no reason"}).run_id,
                "running": start_flow(conn, held, {"hello": "world"}).run_id,
            }
            conn.commit()

            def status(run_id: uuid.UUID) -> str:
                return str(
                    _sql(url, "SELECT status FROM pgflow.runs WHERE run_id = %s", run_id)[0][0]
                )

            _wait_for(lambda: status(ids["completed"]) == "completed", what="the completed run")
            _wait_for(lambda: status(ids["failed"]) == "failed", what="the failed run")
            yield {"url": url, "ids": ids, "worker": worker}
    finally:
        engine.dispose()
        databases.drop(url)


@pytest.fixture(scope="module")
def dashboard(dash_db: dict[str, Any]) -> Iterator[str]:
    with serve_asgi(dashboard_app(dash_db["url"])) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"{missing} missing: apt-get install chromium chromium-driver"
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _step_class(driver: webdriver.Chrome, slug: str) -> str:
    element = driver.find_element(By.CSS_SELECTOR, f'svg.dag g.step[data-step="{slug}"]')
    return str(element.get_attribute("class"))


def _fill(driver: webdriver.Chrome, slug: str) -> str:
    element = driver.find_element(By.CSS_SELECTOR, f'svg.dag g.step[data-step="{slug}"] rect.box')
    return str(element.value_of_css_property("fill"))


GREEN = "rgb(74, 194, 107)"

# --- pages in the browser ------------------------------------------------------------


def test_flows_page_draws_each_dag(dashboard: str, browser: webdriver.Chrome) -> None:
    browser.get(dashboard + "/")
    sections = {
        s.get_attribute("data-flow"): s
        for s in browser.find_elements(By.CSS_SELECTOR, "section.flow")
    }
    assert set(sections) == {"dash_orders", "dash_broken", "dash_held"}
    section = sections["dash_orders"]
    steps = section.find_elements(By.CSS_SELECTOR, "svg.dag g.step")
    assert [s.get_attribute("data-step") for s in steps] == ["fetch", "double", "total"]
    assert "map" in str(steps[1].get_attribute("class"))
    edges = {
        (e.get_attribute("data-from"), e.get_attribute("data-to"))
        for e in section.find_elements(By.CSS_SELECTOR, "svg.dag path.edge")
    }
    assert edges == {("fetch", "double"), ("double", "total")}
    # boxes left to right in dependency order
    xs = [s.find_element(By.CSS_SELECTOR, "rect.box").rect["x"] for s in steps]
    assert xs == sorted(xs) and len(set(xs)) == 3
    assert section.find_element(By.CSS_SELECTOR, "td.completed").text == "1"
    assert sections["dash_broken"].find_element(By.CSS_SELECTOR, "td.failed").text == "1"
    assert sections["dash_held"].find_element(By.CSS_SELECTOR, "td.running").text == "1"
    assert "max_attempts 1" in sections["dash_broken"].text
    browser.save_screenshot(str(SCREENSHOTS / "flows.png"))


def test_runs_page_lists_and_filters(
    dashboard: str, dash_db: dict[str, Any], browser: webdriver.Chrome
) -> None:
    browser.get(dashboard + "/runs")
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.run")
    shown = {r.get_attribute("data-run"): r.get_attribute("data-status") for r in rows}
    ids = dash_db["ids"]
    assert shown == {
        str(ids["completed"]): "completed",
        str(ids["failed"]): "failed",
        str(ids["running"]): "started",
    }
    failed_row = next(r for r in rows if r.get_attribute("data-run") == str(ids["failed"]))
    assert "the dashboard shows this error" in failed_row.text
    browser.save_screenshot(str(SCREENSHOTS / "runs.png"))
    # filter with the form, as a person would
    browser.find_element(By.CSS_SELECTOR, "select[name=status] option[value=failed]").click()
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    WebDriverWait(browser, 5).until(lambda d: "status=failed" in d.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.run")
    assert [r.get_attribute("data-run") for r in rows] == [str(ids["failed"])]


def test_run_pages_colour_the_dag(
    dashboard: str, dash_db: dict[str, Any], browser: webdriver.Chrome
) -> None:
    ids = dash_db["ids"]
    browser.get(f"{dashboard}/runs/{ids['completed']}")
    for slug in ("fetch", "double", "total"):
        assert "s-completed" in _step_class(browser, slug)
    assert _fill(browser, "total") == GREEN
    detail = browser.find_element(By.ID, "step-double")
    tasks = detail.find_elements(By.CSS_SELECTOR, "tr.task")
    assert [t.get_attribute("data-status") for t in tasks] == ["completed"] * 3
    assert "4" in tasks[2].text  # the third element doubled
    assert len(browser.find_elements(By.CSS_SELECTOR, ".timeline .bar.completed")) == 5
    # the 1,000-character note is cut, and "show all" loads it whole
    fetch_input = browser.find_element(By.CSS_SELECTOR, "#step-fetch tr.task td.input")
    assert "long long" in fetch_input.find_element(By.TAG_NAME, "pre").text
    assert fetch_input.find_element(By.TAG_NAME, "pre").text.count("long") < 200
    browser.save_screenshot(str(SCREENSHOTS / "run-completed.png"))
    fetch_input.find_element(By.CSS_SELECTOR, "a.show-all").click()
    WebDriverWait(browser, 5).until(lambda d: d.current_url.endswith("/tasks/fetch/0/input"))
    assert json.loads(browser.find_element(By.TAG_NAME, "body").text)["note"] == "long " * 200

    browser.get(f"{dashboard}/runs/{ids['failed']}")
    assert "s-failed" in _step_class(browser, "explode")
    assert "the dashboard shows this error" in browser.find_element(By.ID, "step-explode").text
    browser.save_screenshot(str(SCREENSHOTS / "run-failed.png"))


def test_running_run_turns_green_live(
    dashboard: str, dash_db: dict[str, Any], browser: webdriver.Chrome
) -> None:
    url, run_id = dash_db["url"], dash_db["ids"]["running"]
    browser.get(f"{dashboard}/runs/{run_id}")
    assert "s-started" in _step_class(browser, "gate")
    assert "s-created" in _step_class(browser, "hold")
    browser.save_screenshot(str(SCREENSHOTS / "run-running.png"))
    browser.execute_script("window.notReloaded = true")

    def step_status(slug: str) -> str:
        return str(
            _sql(
                url,
                "SELECT status FROM pgflow.step_states WHERE run_id = %s AND step_slug = %s",
                run_id,
                slug,
            )[0][0]
        )

    gates["gate"].set()
    _wait_for(lambda: step_status("gate") == "completed", what="the gate step")
    completed = time.monotonic()
    WebDriverWait(browser, 1.5, poll_frequency=0.02).until(
        lambda d: "s-completed" in _step_class(d, "gate")
    )
    shown_after = time.monotonic() - completed
    assert _fill(browser, "gate") == GREEN
    WebDriverWait(browser, 2).until(lambda d: "s-started" in _step_class(d, "hold"))
    assert browser.execute_script("return window.notReloaded") is True
    browser.save_screenshot(str(SCREENSHOTS / "run-live.png"))

    gates["hold"].set()
    WebDriverWait(browser, 3).until(lambda d: d.find_element(By.ID, "finished").is_displayed())
    assert "completed" in browser.find_element(By.ID, "finished").text
    assert "s-completed" in _step_class(browser, "hold")
    print(f"the step turned green {shown_after:.3f} s after it completed")


def test_workers_page(dashboard: str, dash_db: dict[str, Any], browser: webdriver.Chrome) -> None:
    gone = uuid.uuid4()  # a worker that stopped beating an hour ago
    _sql(
        dash_db["url"],
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name, started_at,"
        " last_heartbeat_at) VALUES (%s, 'dash_orders', 'old', now() - interval '2 hours',"
        " now() - interval '1 hour') RETURNING worker_id",
        gone,
    )
    browser.get(dashboard + "/workers")
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.worker")
    states = {
        (r.find_elements(By.TAG_NAME, "td")[2].text, r.get_attribute("data-state")) for r in rows
    }
    assert states == {
        ("dash_orders", "live"),
        ("dash_broken", "live"),
        ("dash_held", "live"),
        ("dash_orders", "stopped"),
    }
    assert rows[-1].get_attribute("data-worker") == str(gone)  # the latest heartbeat first
    browser.save_screenshot(str(SCREENSHOTS / "workers.png"))


nightly = Flow("dash_nightly")
nightly.schedule("30 2 * * *", name="dash_nightly_report", timezone="Europe/Paris", input={"n": 1})
nightly.schedule("0 0 1 1 *", name="dash_yearly", input={"n": 2})


@nightly.step
def report(input: Any) -> Any:
    return input


def test_schedules_page(
    databases: DatabaseFactory, template_db: str, browser: webdriver.Chrome
) -> None:
    """Each schedule with its state, and its latest ticks linking to their runs (a
    database of its own: no worker serves this flow, so its runs stay started)."""
    url = databases.create(template=template_db)
    try:
        deploy_flows(url, [nightly])
        fired = trigger_schedule(url, "dash_nightly_report")
        again = trigger_schedule(url, "dash_nightly_report")
        pause_schedule(url, "dash_yearly")
        with serve_asgi(dashboard_app(url)) as base:
            browser.get(base + "/")
            browser.find_element(By.LINK_TEXT, "Schedules").click()
            WebDriverWait(browser, 5).until(lambda d: d.current_url.endswith("/schedules"))
            rows = {
                r.get_attribute("data-schedule"): r
                for r in browser.find_elements(By.CSS_SELECTOR, "tr.schedule")
            }
            assert list(rows) == ["dash_nightly_report", "dash_yearly"]
            cells = [c.text for c in rows["dash_nightly_report"].find_elements(By.TAG_NAME, "td")]
            assert cells[:5] == [
                "dash_nightly_report",
                "dash_nightly",
                "30 2 * * *",
                "Europe/Paris",
                "active",
            ]
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:30:00", cells[5]), cells  # 02:30 Paris
            assert cells[6] == "—"  # a manual trigger is no tick of the cron
            yearly = rows["dash_yearly"]
            assert yearly.get_attribute("data-paused") == "true"
            assert (
                "paused" in yearly.text
                and yearly.find_element(By.CLASS_NAME, "next-fire").text == "—"
            )
            ticks = browser.find_elements(By.CSS_SELECTOR, "#ticks-dash_nightly_report tr.tick")
            assert [t.get_attribute("data-run") for t in ticks] == [str(again), str(fired)]
            assert all(t.get_attribute("data-manual") == "true" for t in ticks)
            assert "Not fired yet" in browser.find_element(By.ID, "ticks-dash_yearly").text
            browser.save_screenshot(str(SCREENSHOTS / "schedules.png"))
            ticks[1].find_element(By.TAG_NAME, "a").click()
            WebDriverWait(browser, 5).until(lambda d: d.current_url.endswith(f"/runs/{fired}"))
            assert "dash_nightly" in browser.find_element(By.TAG_NAME, "h1").text
    finally:
        databases.drop(url)


def test_schedules_page_reads_by_index(db_url: str) -> None:
    """The latest ticks of every schedule in one query, on the primary key: a
    schedule with thousands of ticks costs no more than one with ten."""
    from pgflow_sa.dashboard.schedules import TICKS_SHOWN
    from pgflow_sa.schema.schedules import recent_ticks_statement

    deploy_flows(db_url, [nightly])
    _sql(
        db_url,
        "INSERT INTO pgflow_sa.schedule_runs (schedule_name, tick, flow_slug, error)"
        " SELECT 'dash_nightly_report', now() - i * interval '1 day', 'dash_nightly', 'e' || i"
        " FROM generate_series(1, 5000) AS i",
    )
    query = recent_ticks_statement(TICKS_SHOWN)
    sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ANALYZE pgflow_sa.schedule_runs")
        rows = conn.execute(sql).fetchall()
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql))
    assert [r[0] for r in rows] == ["dash_nightly_report"] * TICKS_SHOWN
    assert "schedule_runs_pkey" in plan and "Seq Scan on schedule_runs" not in plan, plan
    assert "Index Scan Backward using schedule_runs_pkey" in plan, plan


def test_schedules_page_without_the_schedules_tables(db_url: str) -> None:
    """A pgflow another tool installed has no schedules tables: the page says so."""
    _sql(db_url, "DROP TABLE pgflow_sa.schedule_runs, pgflow_sa.schedules")
    with serve_asgi(dashboard_app(db_url)) as base:
        status, body = http("GET", base + "/schedules")
    assert status == 200, body
    assert 'class="muted missing"' in body and "pgflow-sa install" in body


# --- mounts, safety ------------------------------------------------------------------


def test_fastapi_mount(dash_db: dict[str, Any]) -> None:
    from fastapi import FastAPI
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(to_sqlalchemy_url(dash_db["url"], "asyncpg"))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()  # in the loop that made its connections

    app = FastAPI(lifespan=lifespan)
    app.mount("/pgflow", dashboard_app(engine))

    @app.get("/")
    def home() -> dict[str, str]:
        return {"app": "mine"}

    run_id = dash_db["ids"]["completed"]
    with serve_asgi(app) as base:
        assert http("GET", base + "/") == (200, '{"app":"mine"}')
        status, body = http("GET", base + "/pgflow/runs")
        assert status == 200
        assert f'href="/pgflow/runs/{run_id}"' in body  # links stay inside the mount
        status, body = http("GET", f"{base}/pgflow/runs/{run_id}")
        assert status == 200 and 'data-step="double"' in body
        assert http("GET", base + "/pgflow/workers")[0] == 200


def test_flask_mount(dash_db: dict[str, Any]) -> None:
    from flask import Flask

    app = Flask(__name__)

    @app.get("/")
    def home() -> str:
        return "my flask app"

    engine = sync_engine(dash_db["url"])
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/pgflow": ASGIMiddleware(dashboard_app(engine))}
    )
    run_id = dash_db["ids"]["failed"]
    with serve_wsgi(app) as base:
        assert http("GET", base + "/") == (200, "my flask app")
        status, body = http("GET", base + "/pgflow/")
        assert status == 200 and 'data-flow="dash_orders"' in body
        status, body = http("GET", base + "/pgflow/runs?status=failed")
        assert status == 200 and f'href="/pgflow/runs/{run_id}"' in body
        status, body = http("GET", f"{base}/pgflow/runs/{run_id}")
        assert status == 200 and "the dashboard shows this error" in body
    engine.dispose()


def test_read_only_by_default(dash_db: dict[str, Any]) -> None:
    """No action buttons, and an action's POST is a 403 saying how to enable them."""
    app = dashboard_app(dash_db["url"])
    posts = {
        getattr(r, "path", None) for r in app.routes if "POST" in (getattr(r, "methods", 0) or ())
    }
    assert posts == {"/runs/{run_id}/actions/{action}"}
    ids = dash_db["ids"]
    with serve_asgi(app) as base:
        for name in ("cancel", "retry", "retry_reusing_outputs", "nonsense"):
            for run_id in (ids["failed"], ids["completed"]):
                status, body = http("POST", f"{base}/runs/{run_id}/actions/{name}", data=b"")
                assert status == 403 and "allow_actions=True" in body, (name, body)
        for path in (f"/runs/{ids['failed']}", "/runs", "/"):
            assert http("POST", base + path, data=b"")[0] == 405, path
        for run_id in ids.values():
            status, body, headers = http_response("GET", f"{base}/runs/{run_id}")
            assert status == 200
            assert "<form" not in body.replace('<form class="filters"', "")
            assert "data-action" not in body and "csrf" not in body
            assert headers.get("set-cookie") is None


def _form(base: str, run_id: uuid.UUID) -> tuple[str, str, list[str]]:
    """A run page's token cookie, its forms' token, and its action buttons."""
    status, body, headers = http_response("GET", f"{base}/runs/{run_id}")
    assert status == 200, body
    cookie = headers.get("set-cookie") or ""
    tokens = set(re.findall(r'name="csrf_token" value="([^"]+)"', body))
    assert len(tokens) <= 1, tokens
    return cookie, next(iter(tokens), ""), re.findall(r'data-action="([^"]+)"', body)


def test_actions_when_enabled_refuse_cross_site_posts(dash_db: dict[str, Any]) -> None:
    """With actions enabled: Cancel on a started run, Retry (and reusing outputs) on a
    failed one, nothing on a completed one; a POST needs the form's token and the
    cookie it came with, and no browser saying it comes from another site. (The
    actions themselves: tests/test_dashboard_actions.py, with run control.)"""
    ids = dash_db["ids"]
    idle = _idle_run(dash_db["url"])
    app = dashboard_app(dash_db["url"], allow_actions=True)
    with serve_asgi(app) as base:
        cookie, token, buttons = _form(base, idle)
        assert buttons == ["cancel"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/;" in cookie
        assert token and f"pgflow_sa_csrf={token};" in cookie
        assert _form(base, ids["failed"])[2] == ["retry", "retry_reusing_outputs"]
        assert _form(base, ids["completed"])[2] == []
        # a browser that sent the cookie back gets the same token, and no new cookie
        status, body, headers = http_response(
            "GET", f"{base}/runs/{idle}", {"Cookie": f"pgflow_sa_csrf={token}"}
        )
        assert f'value="{token}"' in body and headers.get("set-cookie") is None

        def post(name: str, form: str, headers: dict[str, str]) -> tuple[int, str]:
            url = f"{base}/runs/{idle}/actions/{name}"
            kinds = {"Content-Type": "application/x-www-form-urlencoded"}
            return http("POST", url, {**kinds, **headers}, form.encode())

        with_cookie = {"Cookie": f"pgflow_sa_csrf={token}"}
        for form, headers in (
            ("", with_cookie),  # no token
            (f"csrf_token={token}", {}),  # no cookie
            ("csrf_token=" + "x" * 43, with_cookie),  # another token
            (f"csrf_token={token}", {**with_cookie, "Sec-Fetch-Site": "cross-site"}),
            (f"csrf_token={token}", {**with_cookie, "Sec-Fetch-Site": "same-site"}),
        ):
            status, body = post("cancel", form, headers)
            assert status == 403, (form, headers, body)
        status, body = post("cancel", f"csrf_token={token}&x=" + "y" * 5000, with_cookie)
        assert status == 403 and "too large" in body
        # the token accepted: an unknown action is the next thing said
        status, body = post(
            "explode", f"csrf_token={token}", {**with_cookie, "Sec-Fetch-Site": "same-origin"}
        )
        assert status == 404 and "no run action &#39;explode&#39;" in body, body
    assert _status(dash_db["url"], idle) == "started"

    # the authentication hook comes first, for actions too
    guarded = dashboard_app(dash_db["url"], allow_actions=True, auth=lambda request: False)
    with serve_asgi(guarded) as base:
        status, body = http(
            "POST",
            f"{base}/runs/{idle}/actions/cancel",
            {"Cookie": f"pgflow_sa_csrf={token}"},
            f"csrf_token={token}".encode(),
        )
        assert (status, body) == (403, "Forbidden")


def test_actions_in_a_mount_keep_to_the_mount(dash_db: dict[str, Any]) -> None:
    """Mounted at /pgflow: the forms post under it and the token's cookie is the
    mount's only (the host app's other paths never see it)."""
    from fastapi import FastAPI

    app = FastAPI()
    app.mount("/pgflow", dashboard_app(dash_db["url"], allow_actions=True))
    idle = _idle_run(dash_db["url"])
    with serve_asgi(app) as base:
        status, body, headers = http_response("GET", f"{base}/pgflow/runs/{idle}")
        assert status == 200
        assert f'action="/pgflow/runs/{idle}/actions/cancel"' in body
        assert "Path=/pgflow/" in headers["set-cookie"], headers["set-cookie"]


def test_install_check_on_another_tools_schema_says_how_to_add_the_index() -> None:
    status = SchemaStatus(
        SchemaState.INSTALLED, "0.8.1", "0.8.1", "external", (), "x", "y", runs_index="missing"
    )
    assert status.describe()[-1].endswith(
        "read every run; to add it: CREATE INDEX IF NOT EXISTS pgflow_sa_runs_started_at"
        " ON pgflow.runs (started_at, run_id))"
    )


def _status(url: str, run_id: uuid.UUID) -> str:
    return str(_sql(url, "SELECT status FROM pgflow.runs WHERE run_id = %s", run_id)[0][0])


def test_auth_hook_and_hidden_payloads(dash_db: dict[str, Any]) -> None:
    async def only_with_token(request: Any) -> bool:
        return (
            request.headers.get("x-token") == "let-me-in"
            or request.query_params.get("token") == "let-me-in"
        )

    run_id = dash_db["ids"]["completed"]
    app = dashboard_app(dash_db["url"], auth=only_with_token, show_payloads=False)
    with serve_asgi(app) as base:
        assert http("GET", f"{base}/runs/{run_id}")[0] == 403
        status, body = http("GET", f"{base}/runs/{run_id}?token=let-me-in")
        assert status == 200 and 'data-step="total"' in body
        assert "&#34;n&#34;: 3" not in body and "<h2>Input</h2>" not in body
    with serve_asgi(dashboard_app(dash_db["url"])) as base:
        assert "&#34;n&#34;: 3" in http("GET", f"{base}/runs/{run_id}")[1]  # the run input


def test_a_large_run_input_is_cut_with_show_all(
    dash_db: dict[str, Any], browser: webdriver.Chrome
) -> None:
    """A run's input of half a megabyte: its page has the start of it and a "show
    all" link to the whole; without payloads neither the page nor a route has it."""
    big = {"rows": [{"id": i, "text": "x" * 40} for i in range(8000)]}  # ~500 KB pretty
    run_id = _idle_run(dash_db["url"], json.dumps(big))
    completed = dash_db["ids"]["completed"]
    with serve_asgi(dashboard_app(dash_db["url"])) as base:
        status, body = http("GET", f"{base}/runs/{run_id}")
        assert status == 200 and len(body) < 50_000, len(body)
        assert '"text": "xxxx' in body.replace("&#34;", '"')
        assert f'<a class="show-all" href="/runs/{run_id}/input">show all (' in body
        status, whole = http("GET", f"{base}/runs/{run_id}/input")
        assert status == 200 and len(whole) > 490_000 and json.loads(whole) == big
        assert json.loads(http("GET", f"{base}/runs/{completed}/output")[1]) == {"total": 6}
        assert http("GET", f"{base}/runs/{uuid.uuid4()}/input")[0] == 404
        # a task's input as its handler received it, and its output
        for path, value in (
            ("tasks/double/2/input", 2),
            ("tasks/double/2/output", 4),
            ("tasks/total/0/input", {"double": [0, 2, 4]}),
            ("tasks/total/0/output", 6),
        ):
            status, text = http("GET", f"{base}/runs/{completed}/{path}")
            assert status == 200 and json.loads(text) == value, (path, text)
        for path in ("tasks/double/7/input", "tasks/nope/0/input", "tasks/total/x/input"):
            assert http("GET", f"{base}/runs/{completed}/{path}")[0] == 404, path
        browser.get(f"{base}/runs/{run_id}")
        browser.find_element(By.CSS_SELECTOR, "#run-input a.show-all").click()
        WebDriverWait(browser, 5).until(lambda d: d.current_url.endswith("/input"))
        assert json.loads(browser.find_element(By.TAG_NAME, "body").text) == big
    with serve_asgi(dashboard_app(dash_db["url"], show_payloads=False)) as base:
        status, body = http("GET", f"{base}/runs/{run_id}")
        assert status == 200 and "xxxx" not in body and "show-all" not in body
        assert "run-input" not in body and "run-output" not in body
        for which in ("input", "output"):
            assert http("GET", f"{base}/runs/{run_id}/{which}")[0] == 404
            assert http("GET", f"{base}/runs/{completed}/{which}")[0] == 404
            assert http("GET", f"{base}/runs/{completed}/tasks/total/0/{which}")[0] == 404


def test_install_check_reports_the_runs_index(db_url: str) -> None:
    """`pgflow-sa install --check` says when the runs index is missing (and how to
    add it); `install` adds it."""
    line = "index pgflow.pgflow_sa_runs_started_at: "
    assert line + "installed" in check_schema(db_url).describe()
    _sql(db_url, f"DROP INDEX pgflow.{RUNS_BY_START}")
    command = [str(Path(sys.executable).parent / "pgflow-sa"), "install", "--database-url", db_url]
    checked = subprocess.run(
        [*command, "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr  # pgflow itself is fine
    assert (
        line + "missing (without it, listing runs and the dashboard's runs page read every run: "
        "run pgflow-sa install)"
    ) in checked.stdout.splitlines()
    installed = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert f"pgflow-sa: index pgflow.{RUNS_BY_START} (runs newest first)" in installed.stdout
    assert line + "installed" in installed.stdout.splitlines()
    assert line + "installed" in check_schema(db_url).describe()


def test_bad_requests_get_clear_pages(dashboard: str) -> None:
    status, body = http("GET", dashboard + "/runs?status=lost")
    assert status == 400 and "status must be one of" in body
    status, body = http("GET", dashboard + "/runs?after=nonsense")
    assert status == 400 and "next_cursor" in body
    assert http("GET", f"{dashboard}/runs/{uuid.uuid4()}")[0] == 404
    assert http("GET", dashboard + "/runs/not-a-uuid")[0] == 404


def test_without_the_extra_the_error_says_what_to_install() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('starlette', 'jinja2'):
            raise ImportError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, Block())
import pgflow_sa, pgflow_sa.cli, pgflow_sa.dashboard
from pgflow_sa.dashboard import dashboard_app, DashboardUnavailableError
try:
    dashboard_app('postgresql://localhost/x')
except DashboardUnavailableError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'pgflow-sa[dashboard]'" in result.stdout


def test_dag_layout_is_pure_svg() -> None:
    svg = render_dag(
        [
            StepNode("a", "single", ()),
            StepNode("b", "map", ("a",)),
            StepNode("c", "single", ("a",)),
            StepNode("d<&>", "single", ("b", "c")),
        ],
        {"a": "completed", "b": "started"},
    )
    assert svg.count('class="edge"') == 4
    assert '<g class="step s-completed" data-step="a">' in svg
    assert '<g class="step map s-started" data-step="b">' in svg
    assert '<g class="step" data-step="c">' in svg  # no status: no colour
    assert "d&lt;&amp;&gt;" in svg and "d<&>" not in svg


def test_installer_indexes_runs_newest_first(db_url: str) -> None:
    """pgflow 0.8.1 has no index for runs newest first: the runs page scanned and
    sorted every run. The installer adds one (and says so when it was missing)."""
    name = f"pgflow.{RUNS_BY_START}"
    assert _sql(db_url, "SELECT to_regclass(%s) IS NOT NULL", name) == [(True,)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"DROP INDEX {name}")
    report = install_schema(db_url)
    assert f"pgflow-sa: index {name} (runs newest first)" in report.actions
    assert _sql(db_url, "SELECT to_regclass(%s) IS NOT NULL", name) == [(True,)]
    assert install_schema(db_url).actions == []  # once is enough
    query = _page_query(None, None, None, None, None, 50)
    sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql))
    assert RUNS_BY_START in plan and "Sort" not in plan.split("SubPlan")[0], plan
    assert indexes.SCRIPT in install_script(pgmq=None, realtime_send=False)  # Alembic's path


def test_the_cli_serves_it_on_loopback(dash_db: dict[str, Any]) -> None:
    port = _free_port()
    command = [str(Path(sys.executable).parent / "pgflow-sa"), "dashboard", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--database-url", dash_db["url"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def answers() -> bool:
            try:
                return http("GET", f"http://127.0.0.1:{port}/runs")[0] == 200
            except OSError:
                assert proc.poll() is None, proc.communicate()[0]
                return False

        _wait_for(answers, 30, "pgflow-sa dashboard")
        # the listening socket's local address (Linux's table: hex address:port, state 0A)
        listening = [
            fields[1]
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if (fields := line.split())[3] == "0A" and fields[1].endswith(f":{port:04X}")
        ]
        assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1 only
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output
    assert f"at http://127.0.0.1:{port}/" in output


def test_an_unreachable_database_is_a_clear_503() -> None:
    app = dashboard_app("postgresql://postgres@127.0.0.1:1/nowhere")
    with serve_asgi(app) as base:
        for path in ("/", "/runs", "/workers", f"/runs/{uuid.uuid4()}"):
            status, body = http("GET", base + path)
            assert status == 503, (path, body)
            assert "cannot use the database" in body, body


def test_hidden_payloads_hide_what_errors_quote(dash_db: dict[str, Any]) -> None:
    """An error may quote the data (a validation error repeats the value it refused):
    without payloads the pages show only its kind."""
    run_id = dash_db["ids"]["failed"]
    with serve_asgi(dashboard_app(dash_db["url"], show_payloads=False)) as base:
        for path in (f"/runs/{run_id}", "/runs?status=failed"):
            status, body = http("GET", base + path)
            assert status == 200
            assert "the dashboard shows this error" not in body, path
            assert "RuntimeError: (details hidden with the payloads)" in body, path


def _idle_run(url: str, input: str = "{}") -> uuid.UUID:
    """A run that stays started whatever the tests' order: no worker serves its flow
    (the "running" run of dash_db finishes once test_running_run_turns_green_live has
    opened its gates)."""
    if not _sql(url, "SELECT 1 FROM pgflow.flows WHERE flow_slug = 'dash_idle'"):
        _sql(url, "SELECT pgflow.create_flow('dash_idle')")
        _sql(url, "SELECT pgflow.add_step('dash_idle', 'wait')")
    query = "SELECT run_id FROM pgflow.start_flow('dash_idle', %s::jsonb)"
    run_id: uuid.UUID = _sql(url, query, input)[0][0]
    return run_id


def _stream_lines(url: str, seconds: float) -> list[str]:
    """What a server-sent events stream sends within ``seconds``."""
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    with urllib.request.urlopen(url, timeout=seconds + 5) as response:
        while time.monotonic() < deadline:
            line = response.readline().decode()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    return lines


def test_a_quiet_stream_keeps_writing_and_reads_only_statuses(
    dash_db: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that does not change still gets a comment every safety interval (a WSGI
    server learns only by writing that its client left: a silent stream was read for
    ever), and the stream reads statuses, never the run's tasks."""
    import pgflow_sa.dashboard.live as live_module
    import pgflow_sa.waiting as waiting_module

    monkeypatch.setattr(live_module, "SAFETY_INTERVAL", 0.3)
    reads: list[str] = []
    original = waiting_module.RunWatcher._read

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append("run with steps and tasks")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(waiting_module.RunWatcher, "_read", counted)
    run_id = _idle_run(dash_db["url"])
    with serve_asgi(dashboard_app(dash_db["url"])) as base:
        lines = _stream_lines(f"{base}/runs/{run_id}/events", 1.5)
    assert lines[0].startswith("data: ")
    assert lines.count(": keep-alive") >= 2, lines
    assert reads == []


def test_a_big_map_run_page_shows_a_bounded_window_of_tasks(
    dash_db: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map of hundreds of tasks: the page shows TASKS_SHOWN of them per step (and
    as many timeline bars), the step's counts by status, and pages through the rest
    by task index."""
    import pgflow_sa.dashboard.app as dashboard_module

    monkeypatch.setattr(dashboard_module, "TASKS_SHOWN", 20)
    url = dash_db["url"]
    _sql(url, "SELECT pgflow.create_flow('dash_big')")
    _sql(url, "SELECT pgflow.add_step('dash_big', 'items', step_type => 'map')")
    _sql(url, "SELECT pgflow.add_step('dash_big', 'after_items', ARRAY['items'])")
    run_id = _sql(
        url, "SELECT run_id FROM pgflow.start_flow('dash_big', %s::jsonb)", str(list(range(300)))
    )[0][0]
    with serve_asgi(dashboard_app(url)) as base:
        status, body = http("GET", f"{base}/runs/{run_id}")
        assert status == 200, body
        assert body.count('<tr class="task"') == 20
        assert body.count('class="row"') == 20
        assert "300 queued" in body
        assert f'href="/runs/{run_id}?tasks_after=19"' in body
        status, body = http("GET", f"{base}/runs/{run_id}?tasks_after=19")
        assert status == 200 and body.count('<tr class="task"') == 20
        assert "<td>20</td>" in body and "<td>39</td>" in body and "<td>19</td>" not in body
        assert "<pre>25</pre>" in body  # task 25's input: its element
        status, body = http("GET", f"{base}/runs/{run_id}?tasks_after=279")
        assert body.count('<tr class="task"') == 20 and "tasks_after=299" not in body
        status, body = http("GET", f"{base}/runs/{run_id}?tasks_after=many")
        assert status == 400 and "tasks_after" in body


def test_input_the_database_refuses_is_a_clear_400(dashboard: str) -> None:
    late = "9999-12-31T23:59:59-14:00"
    for query, says in (
        ("flow=%00", "flow"),
        ("status=%00", "status"),
        (f"since={late}", "since"),
        (f"until={urllib.parse.quote(late)}", "until"),
        (f"after={urllib.parse.quote(late)}|{uuid.uuid4()}", "after"),
    ):
        status, body = http("GET", f"{dashboard}/runs?{query}")
        assert status == 400, (query, body)
        assert says in body and "database" not in body, (query, body)


def test_links_trust_no_host_header(dash_db: dict[str, Any]) -> None:
    run_id = _idle_run(dash_db["url"])
    with serve_asgi(dashboard_app(dash_db["url"])) as base:
        for path in ("/", "/runs", f"/runs/{run_id}", "/workers"):
            status, body = http("GET", base + path, {"Host": "evil.example"})
            assert status == 200 and "evil.example" not in body, path
        body = http("GET", f"{base}/runs/{run_id}")[1]
        assert f'new EventSource("/runs/{run_id}/events")' in body
        assert '<a href="/runs"' in body and 'href="http' not in body


def test_the_cli_warns_when_listening_beyond_loopback(dash_db: dict[str, Any]) -> None:
    command = [str(Path(sys.executable).parent / "pgflow-sa"), "dashboard", "--host", "0.0.0.0"]
    proc = subprocess.Popen(
        [*command, "--port", str(_free_port()), "--database-url", dash_db["url"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert "no authentication" in first and "auth" in first, first
