"""Alembic autogenerate picks up added, changed and removed schedules (the real
`alembic` command, end to end)."""

from __future__ import annotations

from pathlib import Path

import psycopg

from pgflow_sa import Flow, deploy_flows

from .test_alembic import Project, _upgrade_part
from .test_alembic_safety import _failed_line

FLOWS = """
from pgflow_sa import Flow, FlowRegistry
orders = Flow("orders", timeout=30)
orders.step(slug="load")(lambda i, c: i)
orders.step(slug="ship", depends_on=["load"])(lambda i, c: i)
{schedule}
registry = FlowRegistry(orders)
"""
NIGHTLY = (
    'orders.schedule("{cron}", name="nightly", input={{"kind": "daily"}}, timezone="Europe/Paris")'
)


def _flows(project: Project, schedule: str) -> None:
    (project.root / "app_flows.py").write_text(FLOWS.format(schedule=schedule))


def _stored(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT name, cron, timezone, input, next_fire_at FROM pgflow_sa.schedules"
        ).fetchall()


def _ops(migration: str) -> list[str]:
    return [line.strip() for line in _upgrade_part(migration).splitlines() if "op.invoke" in line]


def test_autogenerate_adds_changes_and_removes_schedules(empty_db_url: str, tmp_path: Path) -> None:
    project = Project(tmp_path, "generic", empty_db_url)
    _flows(project, "")
    project.revision("pgflow")
    project.run("upgrade", "head")
    with psycopg.connect(empty_db_url) as conn:  # as installed before schedules existed
        conn.execute("DROP TABLE pgflow_sa.schedules, pgflow_sa.schedule_runs")

    # a schedule added to the code: the table comes with the upgrade op, then the schedule
    _flows(project, NIGHTLY.format(cron="0 3 * * *"))
    added = project.revision("schedule")
    created = (
        "op.invoke(pgflow_ops.CreateScheduleOp('nightly', 'orders', '0 3 * * *', "
        "timezone='Europe/Paris', input={'kind': 'daily'}, input_function=None, "
        "catch_up='latest', catch_up_limit=10))"
    )
    ops = _ops(added)
    assert len(ops) == 2
    assert ops[0].startswith("op.invoke(pgflow_ops.UpgradePgflowOp('0.8.1', previous='0.8.1'")
    assert ops[1] == created
    downgrade = added.split("def downgrade()", 1)[1]
    assert created.replace("CreateScheduleOp", "DropScheduleOp") in downgrade
    project.run("upgrade", "head")
    assert _stored(empty_db_url) == [
        ("nightly", "0 3 * * *", "Europe/Paris", {"kind": "daily"}, None)
    ]
    check = project.run("check")
    assert "No new upgrade operations detected" in check.stdout + check.stderr

    # the cron expression changes: exactly that change
    _flows(project, NIGHTLY.format(cron="0 4 * * *"))
    proc = project.run("revision", "--autogenerate", "-m", "cron")
    assert (
        "Detected changed cron of pgflow schedule 'nightly': '0 3 * * *' -> '0 4 * * *'"
        in proc.stdout + proc.stderr
    )
    [path] = (tmp_path / "migrations" / "versions").glob("*_cron.py")
    assert _ops(path.read_text()) == [
        "op.invoke(pgflow_ops.AlterScheduleOp('nightly', {'cron': '0 4 * * *'}, "
        "previous={'cron': '0 3 * * *'}))"
    ]
    project.run("upgrade", "head")
    assert _stored(empty_db_url)[0][1] == "0 4 * * *"
    project.run("downgrade", "-1")
    assert _stored(empty_db_url)[0][1] == "0 3 * * *"
    project.run("upgrade", "head")

    # removed from the code: dropped, and the downgrade adds it back
    _flows(project, "")
    removed = project.revision("removed")
    assert _ops(removed) == [
        created.replace("CreateScheduleOp", "DropScheduleOp").replace("0 3", "0 4")
    ]
    project.run("upgrade", "head")
    assert _stored(empty_db_url) == []
    project.run("downgrade", "-1")
    assert [row[:2] for row in _stored(empty_db_url)] == [("nightly", "0 4 * * *")]


def test_autogenerate_refuses_a_schedule_name_another_flow_owns(
    empty_db_url: str, tmp_path: Path
) -> None:
    """A name another flow's stored schedule has: autogenerate says so and writes no
    migration (a CreateScheduleOp would only be refused when the migration runs)."""
    project = Project(tmp_path, "generic", empty_db_url)
    _flows(project, "")
    project.revision("pgflow")
    project.run("upgrade", "head")
    billing = Flow("billing")
    billing.step(slug="charge")(lambda i, c: i)
    billing.schedule("0 1 * * *", name="nightly")
    deploy_flows(empty_db_url, billing)  # another app's flow, deployed on its own

    _flows(project, NIGHTLY.format(cron="0 3 * * *"))
    versions = set((tmp_path / "migrations" / "versions").glob("*.py"))
    refused = project.run("revision", "--autogenerate", "-m", "taken", ok=False)
    failed = _failed_line(refused, "schedule 'nightly' belongs to flow 'billing', not 'orders'")
    assert "rename this one" in failed
    assert set((tmp_path / "migrations" / "versions").glob("*.py")) == versions
    assert [row[:2] for row in _stored(empty_db_url)] == [("nightly", "0 1 * * *")]


def test_a_schedule_input_with_dollar_quotes_round_trips(empty_db_url: str, tmp_path: Path) -> None:
    """The SQL a CreateScheduleOp runs is a DO block in dollar quotes: an input
    containing the quote's tag (or any other) is stored as it is."""
    project = Project(tmp_path, "generic", empty_db_url)
    tricky = {"note": "$pgflow_sa$; DROP TABLE notes; $pgflow_sa$", "cost": "$$5 or $1$"}
    _flows(project, f'orders.schedule("0 3 * * *", name="nightly", input={tricky!r})')
    project.revision("pgflow")
    project.run("upgrade", "head")
    assert [(name, value) for name, _, _, value, _ in _stored(empty_db_url)] == [
        ("nightly", tricky)
    ]
    check = project.run("check")
    assert "No new upgrade operations detected" in check.stdout + check.stderr
