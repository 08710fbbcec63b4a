"""pgflow-sa's realtime.send publisher: hints by default, whole payloads only when opted
in, trimmed when large, never an error; installs upgrade an older publisher of ours."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from pgflow_sa import SchemaState, check_schema, install_schema
from pgflow_sa.schema import NOTIFY_CHANNEL

from .helpers import run_cli, snapshot

HINT_KEYS = {"event_type", "run_id", "flow_slug", "step_slug", "status", "task_index"}

# the publisher pgflow-sa installed before hints (it published every payload whole)
OLD_PUBLISHER = """
CREATE OR REPLACE FUNCTION realtime.send(
    payload jsonb, event text, topic text, private boolean DEFAULT true
) RETURNS void LANGUAGE plpgsql SET search_path = '' AS $function$
BEGIN
    PERFORM pg_notify('pgflow', jsonb_build_object(
        'topic', topic, 'event', event, 'payload', payload)::text);
END;
$function$;
COMMENT ON FUNCTION realtime.send(jsonb, text, text, boolean)
    IS 'pgflow-sa: publishes pgflow events with pg_notify on channel "pgflow"';
"""


@pytest.fixture
def listener(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        yield conn


def _raw_events(listener: psycopg.Connection) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=0.5, stop_after=None)]


def _events(listener: psycopg.Connection) -> list[dict[str, Any]]:
    return [json.loads(text) for text in _raw_events(listener)]


def _send(url: str, payload: object, event: str = "step:x:completed", setup: str = "") -> None:
    with psycopg.connect(url) as conn:
        if setup:
            conn.execute(setup)
        conn.execute(
            "SELECT realtime.send(%s, %s, %s, false)", [Jsonb(payload), event, "pgflow:run:abc"]
        )


def _publisher_source(url: str) -> tuple[str, str | None]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT prosrc, obj_description(oid, 'pg_proc') FROM pg_proc "
            "WHERE oid = to_regprocedure('realtime.send(jsonb,text,text,boolean)')"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


FULL_PAYLOAD = {
    "event_type": "step:completed",
    "run_id": "abc",
    "flow_slug": "orders",
    "step_slug": "x",
    "status": "completed",
    "task_index": 0,
    "input": {"card": "4111"},
    "output": {"n": 1},
    "error_message": "boom",
    "remaining_tasks": 0,
    "started_at": "2025-01-01T00:00:00Z",
}
HINTS = {k: v for k, v in FULL_PAYLOAD.items() if k in HINT_KEYS}


def test_small_event_is_published_as_hints(db_url: str, listener: psycopg.Connection) -> None:
    _send(db_url, FULL_PAYLOAD)
    assert _events(listener) == [
        {"topic": "pgflow:run:abc", "event": "step:x:completed", "payload": HINTS}
    ]


@pytest.mark.parametrize("value", ["", "hints", "bogus", "FULL"])
def test_other_settings_mean_hints(db_url: str, listener: psycopg.Connection, value: str) -> None:
    _send(db_url, FULL_PAYLOAD, setup=f"SET pgflow_sa.notify = '{value}'")
    [event] = _events(listener)
    assert event["payload"] == HINTS


def test_hints_leave_out_missing_keys_and_non_scalars(
    db_url: str, listener: psycopg.Connection
) -> None:
    _send(db_url, {"run_id": "abc", "status": {"input": "nested"}, "step_slug": None})
    _send(db_url, ["not", "an", "object"])
    assert [e["payload"] for e in _events(listener)] == [{"run_id": "abc"}, {}]


def test_full_payload_when_opted_in(db_url: str, listener: psycopg.Connection) -> None:
    _send(db_url, FULL_PAYLOAD, setup="SET pgflow_sa.notify = 'full'")
    assert _events(listener) == [
        {"topic": "pgflow:run:abc", "event": "step:x:completed", "payload": FULL_PAYLOAD}
    ]


def test_large_full_event_is_trimmed_not_an_error(
    db_url: str, listener: psycopg.Connection
) -> None:
    payload = {
        "event_type": "step:completed",
        "run_id": "abc",
        "step_slug": "x",
        "status": "completed",
        "remaining_tasks": 0,
        "output": ["y" * 100] * 200,
    }
    _send(db_url, payload, setup="SET pgflow_sa.notify = 'full'")
    [event] = _events(listener)
    assert event["payload"] == {
        "event_type": "step:completed",
        "run_id": "abc",
        "step_slug": "x",
        "status": "completed",
        "trimmed": True,
    }


@pytest.mark.parametrize("setup", ["", "SET pgflow_sa.notify = 'full'"])
def test_oversized_hints_fall_back_to_topic_and_event(
    db_url: str, listener: psycopg.Connection, setup: str
) -> None:
    _send(db_url, {"run_id": "abc", "step_slug": "s" * 9000}, setup=setup)
    _send(db_url, {"run_id": "abc"}, event="e" * 9000, setup=setup)
    first, second = _events(listener)
    assert first == {
        "topic": "pgflow:run:abc",
        "event": "step:x:completed",
        "payload": {"trimmed": True},
    }
    assert second["event"] == "e" * 300
    assert second["payload"] == {"trimmed": True}


def test_publishing_can_be_turned_off(db_url: str, listener: psycopg.Connection) -> None:
    _send(db_url, {"n": 1}, setup="SET pgflow_sa.notify = 'off'")
    assert _events(listener) == []
    _send(db_url, {"n": 2})
    assert len(_events(listener)) == 1


@pytest.mark.parametrize("mode", ["hints", "full"])
def test_pgflow_events_near_the_notify_limit_never_fail(
    db_url: str, listener: psycopg.Connection, mode: str
) -> None:
    """A root map over 3,000 items (about 20 kB of input in the run:started event)
    and a task output of 50 kB both go through."""
    with psycopg.connect(db_url) as conn:
        conn.execute(f"SET pgflow_sa.notify = '{mode}'")
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
    [completed] = [
        e["payload"]
        for e in events
        if e["event"] == "run:completed" and e["topic"] == f"pgflow:run:{run_id}"
    ]
    assert completed["run_id"] == str(run_id)
    assert completed["flow_slug"] == "big_output"
    if mode == "full":
        assert completed["trimmed"] is True
    else:
        assert all(set(e["payload"]) <= HINT_KEYS for e in events)


@pytest.fixture
def stranger(db_url: str) -> Iterator[str]:
    """URL of a login role with no grants at all on the test database's server."""
    name = f"pgflow_sa_stranger_{uuid.uuid4().hex[:12]}"
    password = uuid.uuid4().hex
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    try:
        yield make_conninfo(db_url, user=name, password=password)
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {name}")


def test_unprivileged_listener_sees_no_run_data(db_url: str, stranger: str) -> None:
    """Any role that can connect can LISTEN: a whole run must tell it nothing but
    identifiers and statuses (issue #13)."""
    secret_input = f"input-secret-{uuid.uuid4()}"
    secret_output = f"output-secret-{uuid.uuid4()}"
    secret_error = f"error-secret-{uuid.uuid4()}"
    with psycopg.connect(stranger, autocommit=True) as spy:
        spy.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("SELECT pgflow.create_flow('leak_check', max_attempts => 1)")
            conn.execute("SELECT pgflow.add_step('leak_check', 'first')")
            conn.execute("SELECT pgflow.add_step('leak_check', 'second', ARRAY['first'])")
            [(run_id,)] = conn.execute(
                "SELECT run_id FROM pgflow.start_flow('leak_check', %s)",
                [Jsonb({"card": secret_input})],
            ).fetchall()
            worker = uuid.uuid4()
            conn.execute(
                "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) "
                "VALUES (%s, 'leak_check', 'test')",
                [worker],
            )

            def claim(step_slug: str) -> None:
                msg_ids = [
                    r[0] for r in conn.execute("SELECT msg_id FROM pgmq.read('leak_check', 30, 1)")
                ]
                claimed = conn.execute(
                    "SELECT step_slug FROM pgflow.start_tasks('leak_check', %s, %s)",
                    [msg_ids, worker],
                ).fetchall()
                assert claimed == [(step_slug,)]

            claim("first")
            conn.execute(
                "SELECT pgflow.complete_task(%s, 'first', 0, %s)",
                [run_id, Jsonb({"token": secret_output})],
            )
            claim("second")
            conn.execute(
                "SELECT pgflow.fail_task(%s, 'second', 0, %s)", [run_id, f"boom: {secret_error}"]
            )
            [(status,)] = conn.execute(
                "SELECT status FROM pgflow.runs WHERE run_id = %s", [run_id]
            ).fetchall()
        assert status == "failed"

        texts = _raw_events(spy)
        events = [json.loads(t) for t in texts]
        assert [e["event"] for e in events] == [
            "run:started",
            "step:first:started",
            "step:first:completed",
            "step:second:started",
            "step:second:failed",
            "run:failed",
        ]
        assert {e["topic"] for e in events} == {f"pgflow:run:{run_id}"}
        for text in texts:
            for secret in (secret_input, secret_output, secret_error):
                assert secret not in text
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            spy.execute("SELECT input FROM pgflow.runs")


def test_outdated_publisher_is_reported_and_replaced(
    db_url: str, listener: psycopg.Connection
) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(OLD_PUBLISHER.encode())
    _send(db_url, FULL_PAYLOAD)
    assert _events(listener)[0]["payload"] == FULL_PAYLOAD  # the leak being fixed

    status = check_schema(db_url)
    assert status.realtime_send == "pgflow-sa (outdated)"
    assert status.state is SchemaState.OUTDATED
    assert status.pending == ("realtime.send",)
    assert "realtime.send: pgflow-sa (outdated)" in status.describe()
    proc = run_cli("install", "--check", "--database-url", db_url)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "realtime.send: pgflow-sa (outdated)" in proc.stdout

    report = install_schema(db_url)
    assert [a for a in report.actions if a.startswith("realtime.send")] == [
        "realtime.send: updated pg_notify publisher (hints only unless pgflow_sa.notify = 'full')"
    ]
    assert report.status_after.state is SchemaState.INSTALLED
    assert report.status_after.realtime_send == "pgflow-sa"
    assert report.status_after.pending == ()
    _send(db_url, FULL_PAYLOAD)
    assert _events(listener)[0]["payload"] == HINTS
    assert not install_schema(db_url).changed


def test_alembic_autogenerate_replaces_an_outdated_publisher(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic.autogenerate import produce_migrations, render_python_code
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from sqlalchemy import MetaData

    import alembic_ext
    from alembic_ext import comparator
    from pgflow_sa import FlowRegistry
    from pgflow_sa._db import sync_engine

    with psycopg.connect(db_url) as conn:
        conn.execute(OLD_PUBLISHER.encode())
    monkeypatch.setattr(comparator, "_registration", comparator._Registration())
    alembic_ext.register_flows(FlowRegistry())
    engine = sync_engine(db_url)
    try:
        with engine.begin() as conn:
            context = MigrationContext.configure(conn)
            script = produce_migrations(context, MetaData())
            ops = script.upgrade_ops.ops if script.upgrade_ops else []
            assert len(ops) == 1
            assert isinstance(ops[0], alembic_ext.UpgradePgflowOp)
            assert ops[0].migrations == ["realtime.send"]
            assert "realtime.send" in render_python_code(script.upgrade_ops)  # type: ignore[arg-type]
            Operations(context).invoke(ops[0])
    finally:
        engine.dispose()
    status = check_schema(db_url)
    assert (status.state, status.realtime_send) == (SchemaState.INSTALLED, "pgflow-sa")


@pytest.mark.parametrize(
    "comment", ["'Supabase Realtime: broadcast'", "NULL", "'pgflow-sa-fork: other'"]
)
def test_external_publisher_is_left_alone(db_url: str, comment: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(
            OLD_PUBLISHER.replace(
                "'pgflow-sa: publishes pgflow events with pg_notify on channel \"pgflow\"'",
                comment,
            ).encode()
        )
    digest = snapshot(db_url)
    status = check_schema(db_url)
    assert (status.state, status.realtime_send, status.pending) == (
        SchemaState.INSTALLED,
        "external",
        (),
    )
    report = install_schema(db_url)
    assert not report.changed
    assert report.status_after.realtime_send == "external"
    assert snapshot(db_url) == digest


def test_newer_publisher_of_ours_is_not_downgraded(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "COMMENT ON FUNCTION realtime.send(jsonb, text, text, boolean) "
            "IS 'pgflow-sa: v99 a publisher from the future'"
        )
    source = _publisher_source(db_url)
    status = check_schema(db_url)
    assert (status.state, status.realtime_send) == (SchemaState.INSTALLED, "pgflow-sa")
    assert not install_schema(db_url).changed
    assert _publisher_source(db_url) == source


def test_outdated_publisher_beside_another_tools_pgflow_is_replaced(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(b"DROP SCHEMA pgflow_sa CASCADE")  # pgflow now looks hand-installed
        conn.execute(OLD_PUBLISHER.encode())
    status = check_schema(db_url)
    assert (status.state, status.managed_by, status.pending) == (
        SchemaState.OUTDATED,
        "external",
        ("realtime.send",),
    )
    report = install_schema(db_url)
    assert report.actions == [
        "realtime.send: updated pg_notify publisher (hints only unless pgflow_sa.notify = 'full')"
    ]
    assert (report.status_after.state, report.status_after.realtime_send) == (
        SchemaState.INSTALLED,
        "pgflow-sa",
    )
