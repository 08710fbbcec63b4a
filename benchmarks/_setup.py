"""Databases for the benchmarks: a fresh one per measurement on the server under
test, pgflow installed, the benchmark flows deployed, runs started in bulk."""

from __future__ import annotations

import os
import uuid
from typing import Any

import psycopg
from psycopg import sql

from pgflow_sa import deploy_flows, install_schema
from pgflow_sa.config import to_sqlalchemy_url

DEFAULT_SERVER = os.environ.get(
    "PGFLOW_SA_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CREATED: set[str] = set()


def libpq(url: str) -> str:
    return to_sqlalchemy_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def fresh_database(server: str, name: str | None = None) -> str:
    """A new, empty database on ``server`` (dropped first if it exists); its URL."""
    name = name or f"pgflow_sa_bench_{uuid.uuid4().hex[:8]}"
    CREATED.add(name)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = to_sqlalchemy_url(server).set(database=name, drivername="postgresql")
    return url.render_as_string(hide_password=False)


def drop_databases(server: str) -> None:
    """Drop the databases this run created (the figures are printed by then)."""
    with psycopg.connect(server, autocommit=True) as conn:
        for name in sorted(CREATED):
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    CREATED.clear()
    _TEMPLATES.clear()


_TEMPLATES: dict[str, str] = {}


def pgflow_database(server: str, name: str | None = None) -> str:
    """A fresh database with pgflow installed and the benchmark flows deployed: a copy
    of one made once per server and run (CREATE DATABASE ... TEMPLATE)."""
    from bench_app import flows

    template = _TEMPLATES.get(server)
    if template is None:
        url = fresh_database(server)
        install_schema(url)
        deploy_flows(url, flows)
        template = _TEMPLATES[server] = to_sqlalchemy_url(url).database or ""
    name = name or f"pgflow_sa_bench_{uuid.uuid4().hex[:8]}"
    CREATED.add(name)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    url = to_sqlalchemy_url(server).set(database=name, drivername="postgresql")
    return url.render_as_string(hide_password=False)


def start_runs(url: str, flow: str, count: int, chunk: int = 10_000) -> None:
    """Start ``count`` runs of ``flow`` (input {"i": n}) with pgflow.start_flow, in
    transactions of ``chunk`` runs."""
    with psycopg.connect(url, autocommit=True) as conn:
        for first in range(0, count, chunk):
            conn.execute(
                "SELECT count(*) FROM generate_series(%s::int, %s::int) i, "
                "LATERAL pgflow.start_flow(%s, jsonb_build_object('i', i))",
                [first + 1, min(count, first + chunk), flow],
            )


def runs_with_status(conn: psycopg.Connection[Any], status: str) -> int:
    """Runs with this status (an index lookup: cheap with a backlog of started runs;
    each measurement has a database of its own)."""
    return conn.execute("SELECT count(*) FROM pgflow.runs WHERE status = %s", [status]).fetchone()[
        0
    ]


def connections(url: str, application_name: str | None = None) -> int:
    """Connections to ``url``'s database besides this one (of one application)."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND (%s::text IS NULL OR application_name = %s)",
            [application_name, application_name],
        ).fetchone()[0]
