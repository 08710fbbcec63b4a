"""The typed tables match an installed pgflow 0.8.1 schema exactly."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pgflow_sa._db import sync_engine
from pgflow_sa.schema import functions as fn
from pgflow_sa.schema import tables

SCHEMAS = {"pgflow", "pgflow_sa"}


def _diff(url: str) -> list[object]:
    engine = sync_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_schemas": True,
                "include_name": lambda name, type_, parent: (
                    name in SCHEMAS if type_ == "schema" else True
                ),
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        diff = compare_metadata(context, tables.metadata)
    engine.dispose()
    return list(diff)


def test_compare_metadata_reports_no_difference(db_url: str) -> None:
    assert _diff(db_url) == []


def test_compare_metadata_sees_drift(db_url: str) -> None:
    engine = sync_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE pgflow.workers ADD COLUMN extra text"))
        conn.execute(sa.text("DROP INDEX pgflow.idx_runs_status"))
    engine.dispose()
    diff = _diff(db_url)
    kinds = sorted(str(d[0][0] if isinstance(d, list) else d[0]) for d in diff)  # type: ignore[index]
    assert kinds == ["add_index", "remove_column"]


def test_tables_read_and_write_typed_values(db_url: str) -> None:
    engine = sync_engine(db_url)
    with engine.begin() as conn:
        fn.create_flow("typed").one(conn)
        fn.add_step("typed", "only").one(conn)
        run = fn.start_flow("typed", {"n": 0}).one(conn)
        worker_id = uuid.uuid4()
        conn.execute(
            sa.insert(tables.workers).values(
                worker_id=worker_id, queue_name="typed", function_name="tests"
            )
        )
        row = conn.execute(
            sa.select(tables.runs.c.run_id, tables.runs.c.input, tables.runs.c.status).where(
                tables.runs.c.flow_slug == "typed"
            )
        ).one()
        task = conn.execute(
            sa.select(tables.step_tasks).where(tables.step_tasks.c.run_id == run.run_id)
        ).one()
        worker = conn.execute(sa.select(tables.workers.c.started_at)).scalar_one()
    engine.dispose()
    assert row.run_id == run.run_id
    assert isinstance(row.run_id, uuid.UUID)
    assert row.input == {"n": 0}
    assert row.status == "started"
    assert task.status == "queued"
    assert task.task_index == 0
    assert isinstance(task.message_id, int)
    assert worker.tzinfo is not None
