"""An index pgflow-sa adds to a pgflow table for its own reads: runs newest first
(``list_runs`` and the dashboard's runs page, keyset-paginated on
``(started_at, run_id)``). pgflow 0.8.1 has no index on ``runs.started_at``, so
that page was a sequential scan and sort of every run. An index changes no
table's meaning and TypeScript workers never see it; it lives beside the table
(an index cannot live in another schema) under a ``pgflow_sa_`` name, and is
dropped with the table."""

from __future__ import annotations

from .names import PGFLOW_SCHEMA

RUNS_BY_START = "pgflow_sa_runs_started_at"

CREATE = f"CREATE INDEX IF NOT EXISTS {RUNS_BY_START} ON {PGFLOW_SCHEMA}.runs (started_at, run_id)"

#: idempotent, and a no-op while pgflow.runs does not exist (a staged install)
SCRIPT = (
    "DO $pgflow_sa$ BEGIN\n"
    f"  IF to_regclass('{PGFLOW_SCHEMA}.runs') IS NOT NULL THEN\n"
    f"    {CREATE};\n"
    "  END IF;\n"
    "END $pgflow_sa$;"
)
