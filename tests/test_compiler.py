"""compile_flow emits exactly what @pgflow/dsl 0.8.1's compileFlow emits, and what it
emits creates the same flow in a real database."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from pgflow_sa import Flow, compile_flow, diff_shapes
from pgflow_sa._db import sync_engine
from pgflow_sa.schema import read_flow_shape

from .helpers import npm_package_dir
from .interop.flows import registry

ROOT = Path(__file__).resolve().parent.parent
DSL_VERSION = "0.8.1"


@pytest.fixture(scope="session")
def node_dsl_dir() -> Path:
    """A folder with @pgflow/dsl installed by npm."""
    return npm_package_dir("@pgflow/dsl", DSL_VERSION)


def test_python_and_typescript_compile_identical_sql(node_dsl_dir: Path) -> None:
    script = node_dsl_dir / "compile_flows.mjs"
    shutil.copyfile(Path(__file__).parent / "interop" / "compile_flows.mjs", script)
    proc = subprocess.run(
        ["node", str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    from_typescript = json.loads(proc.stdout)
    from_python = {flow.slug: compile_flow(flow) for flow in registry}

    assert len(from_python) >= 10
    assert max(len(f.steps) for f in registry) >= 20
    assert list(from_typescript) == list(from_python)
    for slug, statements in from_python.items():
        assert statements == from_typescript[slug], slug


def test_compiled_text_examples() -> None:
    flow = registry.get("every_option")
    assert compile_flow(flow) == [
        "SELECT pgflow.create_flow('every_option', max_attempts => 5, base_delay => 2, timeout => 30);",
        "SELECT pgflow.add_step('every_option', 'first', max_attempts => 7, base_delay => 3, "
        "timeout => 11, start_delay => 0);",
        "SELECT pgflow.add_step('every_option', 'second', ARRAY['first'], start_delay => 120);",
        "SELECT pgflow.add_step('every_option', 'third', ARRAY['second'], max_attempts => 1, "
        "base_delay => 1, timeout => 3, start_delay => 9, step_type => 'map');",
    ]
    assert compile_flow(registry.get("defaults_omitted")) == [
        "SELECT pgflow.create_flow('defaults_omitted');",
        "SELECT pgflow.add_step('defaults_omitted', 'only');",
    ]


def test_compiled_flows_round_trip_through_the_database(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        for flow in registry:
            for statement in compile_flow(flow):
                conn.execute(statement)
    engine = sync_engine(db_url)
    with engine.connect() as conn:
        for flow in registry:
            stored = read_flow_shape(conn, flow.slug)
            assert stored == flow.shape(), flow.slug
            assert not diff_shapes(flow.shape(), stored)
        assert read_flow_shape(conn, "absent") is None
    engine.dispose()


def test_shape_diff_separates_options_from_structure(db_url: str) -> None:
    flow = registry.get("diamond")
    with psycopg.connect(db_url) as conn:
        for statement in compile_flow(flow):
            conn.execute(statement)
        conn.execute("UPDATE pgflow.flows SET opt_timeout = 99 WHERE flow_slug = 'diamond'")
        conn.execute("UPDATE pgflow.steps SET opt_max_attempts = NULL WHERE step_slug = 'right'")
    engine = sync_engine(db_url)
    with engine.connect() as conn:
        stored = read_flow_shape(conn, "diamond")
    engine.dispose()
    assert stored is not None
    diff = diff_shapes(flow.shape(), stored)
    assert diff.structural == ()
    assert diff.describe() == [
        "options: flow option timeout: database has 99, code has 10",
        "options: step 'right' option max_attempts: database has None, code has 5",
    ]

    changed = Flow("diamond", timeout=10)
    changed.step(slug="start")(lambda i, c: i)
    changed.map(slug="left", depends_on="start")(lambda i, c: i)
    changed.step(slug="join", depends_on=["left"])(lambda i, c: i)
    changed.step(slug="extra")(lambda i, c: i)
    structural = diff_shapes(changed.shape(), stored)
    assert structural.structural == (
        "step 'extra' is in code but not in the database",
        "step 'right' is in the database but not in code",
        "step 'left' is a single step in the database, a map step in code",
        "step 'join' depends on ['left', 'right'] in the database, on ['left'] in code",
    )


def test_compile_refuses_a_flow_without_steps() -> None:
    with pytest.raises(
        ValueError, match=r"Flow 'empty' has no steps; add at least one with @flow\.step"
    ):
        compile_flow(Flow("empty"))


def test_statements_are_what_create_flow_runs(db_url: str) -> None:
    """Compiled options land in the columns pgflow reads them from."""
    with psycopg.connect(db_url) as conn:
        for statement in compile_flow(registry.get("every_option")):
            conn.execute(statement)
    engine = sync_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT step_slug, opt_max_attempts, opt_base_delay, opt_timeout, opt_start_delay "
                "FROM pgflow.steps WHERE flow_slug = 'every_option' ORDER BY step_index"
            )
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("first", 7, 3, 11, 0),
        ("second", None, None, None, 120),
        ("third", 1, 1, 3, 9),
    ]
