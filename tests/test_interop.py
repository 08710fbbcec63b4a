"""Python and TypeScript workers serve the same flow: a Node worker built on
PgflowSqlClient from @pgflow/core 0.8.1 (npm) beside the pgflow-sa worker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from pgflow_sa import (
    Context,
    Flow,
    RunStatus,
    start_flow_async,
    to_sqlalchemy_url,
    wait_for_run_async,
)

from .helpers import npm_package_dir
from .worker_harness import deploy, running_worker

ROOT = Path(__file__).resolve().parent.parent
CORE_VERSION = "0.8.1"

interop = Flow("interop")
python_done: list[tuple[str, str, int]] = []


@interop.step
def double(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    python_done.append((str(ctx.run_id), ctx.step_slug, ctx.task_index))
    return {"value": input["i"] * 2, "by": "python"}


@interop.step(depends_on=[double])
def label(input: dict[str, Any], ctx: Context) -> dict[str, Any]:
    python_done.append((str(ctx.run_id), ctx.step_slug, ctx.task_index))
    return {"text": f"n{input['double']['value']}", "by": "python"}


@pytest.fixture(scope="session")
def node_core_dir() -> Path:
    """A folder with @pgflow/core installed by npm, and our Node worker script."""
    folder = npm_package_dir("@pgflow/core", CORE_VERSION)
    shutil.copyfile(
        Path(__file__).parent / "interop" / "node_worker.mjs", folder / "node_worker.mjs"
    )
    return folder


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    deploy(db_url, interop)
    engine = create_async_engine(to_sqlalchemy_url(db_url, "asyncpg"))
    yield engine
    await engine.dispose()


def _node(folder: Path, url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["node", "node_worker.mjs", *args],
        cwd=folder,
        env={**os.environ, "DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _node_worker_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stderr is not None
    line = await asyncio.to_thread(proc.stderr.readline)
    assert "ready" in line, line


def _stop_node(proc: subprocess.Popen[str]) -> list[tuple[str, str, int]]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    items = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [(i["run_id"], i["step_slug"], i["task_index"]) for i in items]


async def _start_python(engine: AsyncEngine, count: int, offset: int) -> list[str]:
    async with engine.begin() as conn:
        return [
            str(
                (
                    await start_flow_async(conn, interop, {"i": offset + i, "source": "python"})
                ).run_id
            )
            for i in range(count)
        ]


def _start_node(folder: Path, url: str, count: int) -> list[str]:
    proc = _node(folder, url, "start", "interop", str(count))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    ids: list[str] = json.loads(out)
    return ids


async def _finish(engine: AsyncEngine, ids: list[str]) -> list[Any]:
    return await asyncio.gather(*[wait_for_run_async(engine, rid, timeout=60) for rid in ids])


async def test_node_and_python_workers_serve_the_same_flow(
    node_core_dir: Path, engine: AsyncEngine, db_url: str
) -> None:
    python_done.clear()
    # 1. runs started from Node finish in Python
    node_started = _start_node(node_core_dir, db_url, 8)
    async with running_worker(interop, db_url):
        finished = await _finish(engine, node_started)
    assert all(r.status is RunStatus.COMPLETED for r in finished)
    assert {r.input["source"] for r in finished} == {"node"}
    assert {r.output["label"]["by"] for r in finished} == {"python"}
    assert finished[3].output == {"label": {"text": "n6", "by": "python"}}

    # 2. runs started from Python finish in Node
    node = _node(node_core_dir, db_url, "work", "interop")
    await _node_worker_ready(node)
    python_started = await _start_python(engine, 8, 100)
    finished = await _finish(engine, python_started)
    node_done = _stop_node(node)
    assert {r.output["label"]["by"] for r in finished} == {"node"}
    assert finished[0].output == {"label": {"text": "n200", "by": "node"}}
    assert len(node_done) == 16

    # 3. both at once, runs started from both sides: every task completed exactly once
    python_done.clear()
    node = _node(node_core_dir, db_url, "work", "interop")
    await _node_worker_ready(node)
    async with running_worker(interop, db_url):
        ids = await _start_python(engine, 20, 1000) + _start_node(node_core_dir, db_url, 20)
        finished = await _finish(engine, ids)
    node_done = _stop_node(node)
    assert all(r.status is RunStatus.COMPLETED for r in finished)
    mine = [t for t in python_done if t[0] in set(ids)]
    theirs = [t for t in node_done if t[0] in set(ids)]
    assert len(mine) + len(theirs) == 40 * 2
    assert len(set(mine) | set(theirs)) == 40 * 2  # no task ran in both
    for run in finished:
        assert all(s.attempts == 1 for s in run.steps)
        expected = (run.input["i"]) * 2
        assert run.output["label"]["text"] == f"n{expected}"
