"""Indexes pgflow-sa adds to a pgflow table for its own reads. pgflow 0.8.1 has
none on ``runs.started_at``, ``completed_at`` or ``failed_at``, so these were
sequential or per-flow scans of every run:

- runs newest first (``list_runs`` and the dashboard's runs page, keyset-paginated
  on ``(started_at, run_id)``);
- runs of a flow by status and by when they finished (``flow_status``, ``pgflow-sa
  status``: runs in progress, completed and failed in the last hour), on
  ``coalesce(completed_at, failed_at)``, a column only a finished run has.

An index changes no table's meaning and TypeScript workers never see it; it lives
beside the table (an index cannot live in another schema) under a ``pgflow_sa_``
name, and is dropped with the table. Neither indexes a column pgflow updates while a
run is in progress (``remaining_steps``), so those updates stay HOT."""

from __future__ import annotations

from .names import PGFLOW_SCHEMA

RUNS_BY_START = "pgflow_sa_runs_started_at"
RUNS_FINISHED = "pgflow_sa_runs_finished"

CREATE = f"CREATE INDEX IF NOT EXISTS {RUNS_BY_START} ON {PGFLOW_SCHEMA}.runs (started_at, run_id)"

#: idempotent, and a no-op while pgflow.runs does not exist (a staged install)
SCRIPT = (
    "DO $pgflow_sa$ BEGIN\n"
    f"  IF to_regclass('{PGFLOW_SCHEMA}.runs') IS NOT NULL THEN\n"
    f"    {CREATE};\n"
    f"    CREATE INDEX IF NOT EXISTS {RUNS_FINISHED} ON {PGFLOW_SCHEMA}.runs\n"
    "      (flow_slug, status, (coalesce(completed_at, failed_at)));\n"
    "  END IF;\n"
    "END $pgflow_sa$;"
)
