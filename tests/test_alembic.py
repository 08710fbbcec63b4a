"""End to end with the real `alembic` command: autogenerate installs pgflow and picks up
flow changes, on the generic and the async env.py templates."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from pgflow_sa import SchemaState, check_schema
from pgflow_sa._db import sync_engine
from pgflow_sa.schema import read_flow_shape

from .helpers import BIN

ALEMBIC = str(BIN / "alembic")

FLOWS = {
    "v1": """
from pgflow_sa import Flow, FlowRegistry
orders = Flow("orders", timeout=30)
orders.step(slug="load")(lambda i, c: i)
orders.step(slug="ship", depends_on=["load"])(lambda i, c: i)
registry = FlowRegistry(orders)
""",
    "v2": """
from pgflow_sa import Flow, FlowRegistry
orders = Flow("orders", timeout=45)
orders.step(slug="load")(lambda i, c: i)
orders.step(slug="ship", depends_on=["load"], max_attempts=5)(lambda i, c: i)
returns = Flow("returns")
returns.map(slug="each")(lambda i, c: i)
registry = FlowRegistry(orders, returns)
""",
    "v3": """
from pgflow_sa import Flow, FlowRegistry
orders = Flow("orders", timeout=45)
orders.step(slug="load")(lambda i, c: i)
orders.step(slug="ship", depends_on=["load"], max_attempts=5)(lambda i, c: i)
orders.step(slug="invoice", depends_on=["ship"])(lambda i, c: i)
returns = Flow("returns")
returns.map(slug="each")(lambda i, c: i)
registry = FlowRegistry(orders, returns)
""",
}

ENV_HOOK = """
import os as _os
import sys as _sys

import sqlalchemy as _sa

import alembic_ext

_sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
from app_flows import registry as _registry  # noqa: E402

alembic_ext.register_flows(
    _registry, recreate=[s for s in _os.environ.get("RECREATE_FLOWS", "").split(",") if s]
)
"""


class Project:
    def __init__(self, root: Path, template: str, url: str) -> None:
        self.root = root
        self.url = url
        driver = "asyncpg" if template == "async" else "psycopg"
        self.run("init", "-t", template, "migrations")
        ini = root / "alembic.ini"
        sa_url = make_url(url).set(drivername=f"postgresql+{driver}")
        rendered = sa_url.render_as_string(hide_password=False).replace("%", "%%")
        ini.write_text(
            "\n".join(
                f"sqlalchemy.url = {rendered}" if line.startswith("sqlalchemy.url") else line
                for line in ini.read_text().splitlines()
            )
            + "\n"
        )
        env = root / "migrations" / "env.py"
        text = env.read_text().replace(
            "target_metadata = None",
            "target_metadata = _sa.MetaData()\n"
            "_sa.Table('notes', target_metadata, _sa.Column('id', _sa.Integer, primary_key=True))",
        )
        env.write_text(
            text.replace(
                "from alembic import context\n", "from alembic import context\n" + ENV_HOOK, 1
            )
        )
        self.flows("v1")

    def flows(self, version: str) -> None:
        (self.root / "app_flows.py").write_text(FLOWS[version])

    def run(
        self, *args: str, env: dict[str, str] | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [ALEMBIC, *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")},
                **(env or {}),
            },
            check=False,
        )
        if ok:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def revision(self, message: str, env: dict[str, str] | None = None) -> str:
        before = set((self.root / "migrations" / "versions").glob("*.py"))
        self.run("revision", "--autogenerate", "-m", message, env=env)
        [new] = set((self.root / "migrations" / "versions").glob("*.py")) - before
        return new.read_text()


def _upgrade_part(migration: str) -> str:
    return migration.split("def upgrade()", 1)[1].split("def downgrade()", 1)[0]


def _assert_matches(url: str, version: str) -> None:
    """The flows in the database are exactly the flows of this version of the code."""
    namespace: dict[str, object] = {}
    exec(FLOWS[version], namespace)
    registry = namespace["registry"]
    engine = sync_engine(url)
    with engine.connect() as conn:
        for flow in registry:  # type: ignore[attr-defined]
            assert read_flow_shape(conn, flow.slug) == flow.shape()
    engine.dispose()


@pytest.mark.parametrize("template", ["generic", "async"])
def test_autogenerate_round_trip(
    empty_db_url: str, tmp_path: Path, template: str, server_kind: str
) -> None:
    project = Project(tmp_path, template, empty_db_url)

    first = project.revision("pgflow")
    assert "from alembic_ext import ops as pgflow_ops" in first
    upgrade = _upgrade_part(first)
    pgmq = "'extension'" if server_kind == "extension" else "'sql'"
    assert (
        f"op.invoke(pgflow_ops.InstallPgflowOp('0.8.1', pgmq={pgmq}, realtime_send=True))"
        in upgrade
    )
    assert "op.invoke(pgflow_ops.CreateFlowOp('orders', [" in upgrade
    assert "\"SELECT pgflow.create_flow('orders', timeout => 30);\"," in upgrade
    assert upgrade.index("InstallPgflowOp") < upgrade.index("CreateFlowOp")
    assert "op.create_table('notes'" in upgrade  # the app's own tables are still compared
    downgrade = first.split("def downgrade()", 1)[1]
    assert downgrade.index("DropFlowOp('orders'") < downgrade.index("UninstallPgflowOp")
    assert "], delete_runs=False))" in downgrade
    assert f"UninstallPgflowOp('0.8.1', pgmq={pgmq}, realtime_send=True, cascade=False))" in (
        downgrade
    )

    project.run("upgrade", "head")
    assert check_schema(empty_db_url).state is SchemaState.INSTALLED
    _assert_matches(empty_db_url, "v1")

    # nothing changed: no false diffs
    empty = project.revision("nothing")
    assert "pgflow_ops" not in _upgrade_part(empty)
    for path in (tmp_path / "migrations" / "versions").glob("*nothing*.py"):
        path.unlink()
    check = project.run("check")
    assert "No new upgrade operations detected" in check.stdout + check.stderr

    # options changed and a flow added: exactly those ops
    project.flows("v2")
    assert project.run("check", ok=False).returncode != 0
    second = _upgrade_part(project.revision("options"))
    ops = [line.strip() for line in second.splitlines() if "op.invoke" in line]
    assert ops == [
        "op.invoke(pgflow_ops.SetFlowOptionOp('orders', None, 'timeout', 45, previous=30))",
        "op.invoke(pgflow_ops.SetFlowOptionOp('orders', 'ship', 'max_attempts', 5, previous=None))",
        "op.invoke(pgflow_ops.CreateFlowOp('returns', [",
    ]
    project.run("upgrade", "head")
    _assert_matches(empty_db_url, "v2")

    # a structural change is refused with the ways out...
    project.flows("v3")
    refused = project.run("revision", "--autogenerate", "-m", "structure", ok=False)
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert (
        "flow 'orders' changed structure (step 'invoice' is in code but not in the database)"
        in output
    )
    assert "pgflow flows are immutable" in output
    assert "orders_v2" in output
    assert "recreate={'orders'}" in output
    # ...and the opt-in drops and recreates it
    third = _upgrade_part(project.revision("recreate", env={"RECREATE_FLOWS": "orders"}))
    assert "DropFlowOp('orders'" in third and third.index("DropFlowOp") < third.index(
        "CreateFlowOp"
    )
    assert "], delete_runs=True))" in third  # the opt-in, written where it is seen
    project.run("upgrade", "head")
    _assert_matches(empty_db_url, "v3")

    # everything reverses
    project.run("downgrade", "base")
    assert check_schema(empty_db_url).state is SchemaState.MISSING
    engine = sync_engine(empty_db_url)
    with engine.connect() as conn:
        leftovers = (
            conn.exec_driver_sql(
                "SELECT nspname FROM pg_namespace WHERE nspname IN ('pgflow', 'pgflow_sa', 'pgmq', 'realtime')"
            )
            .scalars()
            .all()
        )
        notes = conn.exec_driver_sql("SELECT to_regclass('public.notes')").scalar()
    engine.dispose()
    assert leftovers == []
    assert notes is None


def test_an_outdated_install_is_upgraded_by_a_migration(empty_db_url: str, tmp_path: Path) -> None:
    """A pgflow-sa install missing pinned migrations (as after pinning a newer pgflow)
    gets one UpgradePgflowOp applying exactly those; its downgrade keeps the schema
    (pgflow has no down migrations) and says so."""
    from pgflow_sa import install_schema
    from pgflow_sa.schema import migrations

    pinned = migrations()
    install_schema(empty_db_url, upto=pinned[9].name)
    missing = [m.name for m in pinned[10:]]
    project = Project(tmp_path, "generic", empty_db_url)
    first = _upgrade_part(project.revision("upgrade pgflow"))
    assert "pgflow_ops.UpgradePgflowOp('0.8.1', previous=None, migrations=[" in first
    assert all(repr(name) in first for name in missing)
    assert "InstallPgflowOp" not in first and "CreateFlowOp('orders'" in first
    project.run("upgrade", "head")
    assert check_schema(empty_db_url).state is SchemaState.INSTALLED
    assert project.run("check").returncode == 0
    down = project.run("downgrade", "-1")
    assert "pgflow has no down migrations: the pgflow schema stays at 0.8.1" in down.stderr
    assert check_schema(empty_db_url).state is SchemaState.INSTALLED


def _ops(url: str, **opts: object) -> list[tuple[object, ...]]:
    import sqlalchemy as sa
    from alembic.autogenerate import produce_migrations
    from alembic.migration import MigrationContext

    engine = sync_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=dict(opts))
        script = produce_migrations(context, sa.MetaData())
    engine.dispose()
    return [op.to_diff_tuple() for op in script.upgrade_ops.ops]  # type: ignore[union-attr]


def test_include_hooks_and_dropping_unregistered_flows(db_url: str) -> None:
    import alembic_ext
    from pgflow_sa import Flow, FlowRegistry, deploy_flows

    kept, skipped, stray = Flow("kept"), Flow("skipped"), Flow("stray")
    for flow in (kept, skipped, stray):
        flow.step(slug="only")(lambda i, c: i)
    deploy_flows(db_url, stray)
    try:
        alembic_ext.register_flows(FlowRegistry(kept, skipped))
        assert _ops(db_url) == [("create_flow", "kept"), ("create_flow", "skipped")]
        assert _ops(db_url, include_name=lambda name, type_, parent: name != "skipped") == [
            ("create_flow", "kept")
        ]
        assert _ops(
            db_url, include_object=lambda obj, name, type_, reflected, compare_to: name != "kept"
        ) == [("create_flow", "skipped")]
        alembic_ext.register_flows(FlowRegistry(kept, skipped), drop_unregistered=True)
        assert _ops(db_url) == [
            ("create_flow", "kept"),
            ("create_flow", "skipped"),
            ("drop_flow", "stray"),
        ]
    finally:
        from alembic_ext.comparator import _registration

        _registration.registry = None  # later autogenerate runs in this process see no flows
