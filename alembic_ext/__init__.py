"""Alembic integration for pgflow-sa (autogenerate support for pgflow flows).

Importing this package registers pgflow-sa's comparator, operations and
renderers with Alembic. It depends on pgflow_sa; pgflow_sa never imports it.
"""

from __future__ import annotations

__all__: list[str] = []
