"""pgflow-sa's realtime.send publisher: pg_notify, trimmed when large, never an error."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgflow_sa.schema import NOTIFY_CHANNEL


@pytest.fixture
def listener(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        yield conn


def _events(listener: psycopg.Connection) -> list[dict[str, object]]:
    return [json.loads(n.payload) for n in listener.notifies(timeout=0.5, stop_after=None)]


def _send(url: str, payload: object, event: str = "step:x:completed", setup: str = "") -> None:
    with psycopg.connect(url) as conn:
        if setup:
            conn.execute(setup)
        conn.execute(
            "SELECT realtime.send(%s, %s, %s, false)", [Jsonb(payload), event, "pgflow:run:abc"]
        )


def test_small_event_is_published_whole(db_url: str, listener: psycopg.Connection) -> None:
    payload = {"event_type": "step:completed", "run_id": "abc", "output": {"n": 1}}
    _send(db_url, payload)
    assert _events(listener) == [
        {"topic": "pgflow:run:abc", "event": "step:x:completed", "payload": payload}
    ]


def test_large_event_is_trimmed_not_an_error(db_url: str, listener: psycopg.Connection) -> None:
    payload = {
        "event_type": "step:completed",
        "run_id": "abc",
        "step_slug": "x",
        "status": "completed",
        "output": ["y" * 100] * 200,
    }
    _send(db_url, payload)
    [event] = _events(listener)
    assert event["payload"] == {
        "event_type": "step:completed",
        "run_id": "abc",
        "step_slug": "x",
        "status": "completed",
        "trimmed": True,
    }


def test_publishing_can_be_turned_off(db_url: str, listener: psycopg.Connection) -> None:
    _send(db_url, {"n": 1}, setup="SET pgflow_sa.notify = 'off'")
    assert _events(listener) == []
    _send(db_url, {"n": 2})
    assert len(_events(listener)) == 1


def test_pgflow_events_near_the_notify_limit_never_fail(
    db_url: str, listener: psycopg.Connection
) -> None:
    """A root map over 3,000 items (about 20 kB of input in the run:started event)
    and a task output of 50 kB both go through."""
    with psycopg.connect(db_url) as conn:
        conn.execute("SELECT pgflow.create_flow('big_map')")
        conn.execute("SELECT pgflow.add_step('big_map', 'each', step_type => 'map')")
        conn.execute("SELECT pgflow.create_flow('big_output')")
        conn.execute("SELECT pgflow.add_step('big_output', 'only')")
        run_id = uuid.uuid4()
        conn.execute("SELECT pgflow.start_flow('big_map', %s)", [Jsonb(list(range(3000)))])
        conn.execute("SELECT pgflow.start_flow('big_output', '{}', %s)", [run_id])
        worker = uuid.uuid4()
        conn.execute(
            "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES (%s, 'big_output', 't')",
            [worker],
        )
        msg_ids = [r[0] for r in conn.execute("SELECT msg_id FROM pgmq.read('big_output', 30, 1)")]
        conn.execute("SELECT pgflow.start_tasks('big_output', %s, %s)", [msg_ids, worker])
        conn.execute(
            "SELECT pgflow.complete_task(%s, 'only', 0, %s)",
            [run_id, Jsonb({"blob": "z" * 50_000})],
        )
        status = conn.execute(
            "SELECT status FROM pgflow.runs WHERE run_id = %s", [run_id]
        ).fetchone()
    assert status == ("completed",)
    events = _events(listener)
    started = [e for e in events if e["event"] == "run:started"]
    assert len(started) == 2
    assert all(len(json.dumps(e)) < 8000 for e in events)
    completed = [e for e in events if e["event"] == "run:completed"]
    assert completed[0]["payload"]["run_id"] == str(run_id)  # type: ignore[index]
    assert completed[0]["payload"]["trimmed"] is True  # type: ignore[index]
