"""Running behind a connection pooler in transaction mode (PgBouncer's
``pool_mode = transaction``): each transaction may run on another server
connection, so nothing that lives in a session works through it — prepared
statements kept from one transaction to the next, session settings, LISTEN.

``PGFLOW_SA_POOLER=transaction`` says that the database URL goes through such a
pooler. Then:

- asyncpg engines pgflow-sa makes (``async_engine_from_url``, the worker's) keep no
  prepared statements (``statement_cache_size=0``) and prepare each one as the
  unnamed statement, which leaves nothing behind on the server connection; psycopg
  engines it makes never prepare (``prepare_threshold=None``); the worker runs its
  claims and settles each in a transaction (asyncpg prepares and executes in two
  exchanges, which the pooler could otherwise send to two server connections);
- the worker sends no session settings (``plan_cache_mode``,
  ``enable_bitmapscan``): set them on its role instead;
- LISTEN goes to ``PGFLOW_SA_LISTEN_URL``, a direct connection to the server, when
  it is set; without it the worker polls every ``fallback_poll_interval`` and waits
  poll once a second.
"""

from __future__ import annotations

import os
from typing import Any

from .exceptions import ConfigurationError

POOLER_ENV = "PGFLOW_SA_POOLER"
LISTEN_URL_ENV = "PGFLOW_SA_LISTEN_URL"
_MODES = ("", "none", "session", "transaction")


def transaction_pooling() -> bool:
    """Whether the database URL goes through a pooler in transaction mode."""
    mode = os.environ.get(POOLER_ENV, "").strip().lower()
    if mode not in _MODES:
        raise ConfigurationError(
            f"{POOLER_ENV}={mode!r} is not a pooler mode: use 'transaction' for a pooler "
            "in transaction mode (PgBouncer's pool_mode = transaction), or leave it unset"
        )
    return mode == "transaction"


def listen_url() -> str | None:
    """The direct URL to LISTEN on when the database URL goes through a pooler."""
    return os.environ.get(LISTEN_URL_ENV, "").strip() or None


def _statement_name() -> str:
    # the unnamed statement: the next one replaces it on its server connection, so
    # nothing is left behind there (a named one's close would go to whichever
    # connection the pooler picks then). SQLAlchemy's asyncpg dialect prepares and
    # executes within a transaction, which keeps both on one server connection.
    return ""


def asyncpg_connect_args() -> dict[str, Any]:
    """connect_args for SQLAlchemy's asyncpg dialect behind a transaction pooler."""
    return {
        "statement_cache_size": 0,  # asyncpg's own cache
        "prepared_statement_cache_size": 0,  # SQLAlchemy's
        "prepared_statement_name_func": _statement_name,
    }


def psycopg_connect_args() -> dict[str, Any]:
    """connect_args for psycopg engines: none, or never prepare behind a pooler."""
    return {"prepare_threshold": None} if transaction_pooling() else {}
