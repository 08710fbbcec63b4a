"""Names of the database objects pgflow-sa talks to, defined once."""

from __future__ import annotations

#: Schema of the pgflow tables and functions. pgflow's SQL functions refer to it
#: by name, so the database objects always live here; a SQLAlchemy
#: ``schema_translate_map`` can still point the typed tables elsewhere.
PGFLOW_SCHEMA = "pgflow"
#: Schema of pgmq's functions and queue tables.
PGMQ_SCHEMA = "pgmq"
#: pgflow-sa's own bookkeeping (which pgflow migrations it applied).
PGFLOW_SA_SCHEMA = "pgflow_sa"
#: LISTEN/NOTIFY channel of pgflow-sa's realtime.send publisher.
NOTIFY_CHANNEL = "pgflow"
