"""A group of flows that the worker, CLI, client and Alembic hook all take, and
loading one from an import path such as ``myapp.flows:registry``."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Iterator

from sqlalchemy.engine import URL

from .dsl import Flow
from .exceptions import ConfigurationError, FlowDefinitionError
from .schedules.definition import Schedule


class FlowRegistry:
    """Flows by slug, in registration order::

    registry = FlowRegistry(article_flow, order_flow)
    registry.register(report_flow)

    ``database_url`` hands the app's own database to the commands given this
    registry as APP (``pgflow-sa worker``, ``flows deploy``, ``start --app``): they
    use it unless ``--database-url`` or ``PGFLOW_SA_DATABASE_URL`` says otherwise,
    e.g. ``FlowRegistry(signup, database_url=settings.database_url)``.
    """

    def __init__(self, *flows: Flow, database_url: str | URL | None = None) -> None:
        self._flows: dict[str, Flow] = {}
        self.database_url = (
            database_url.render_as_string(hide_password=False)
            if isinstance(database_url, URL)
            else database_url or None
        )
        for flow in flows:
            self.register(flow)

    def register(self, flow: Flow) -> Flow:
        """Add a flow (returned, so this can wrap a definition)."""
        if not isinstance(flow, Flow):
            raise FlowDefinitionError(f"only Flow objects can be registered, not {flow!r}")
        existing = self._flows.get(flow.slug)
        if existing is not None and existing is not flow:
            raise FlowDefinitionError(
                f"two different flows use the slug {flow.slug!r}; flow slugs must be unique"
            )
        self._flows[flow.slug] = flow
        return flow

    @property
    def schedules(self) -> dict[str, Schedule]:
        """The schedules of the registered flows, by name (unique across flows)."""
        found: dict[str, Schedule] = {}
        for flow in self._flows.values():
            for schedule in flow.schedules:
                other = found.get(schedule.name)
                if other is not None:
                    raise FlowDefinitionError(
                        f"flows {other.flow_slug!r} and {flow.slug!r} both have a schedule named "
                        f"{schedule.name!r}; schedule names must be unique"
                    )
                found[schedule.name] = schedule
        return found

    def get(self, slug: str) -> Flow:
        try:
            return self._flows[slug]
        except KeyError:
            known = ", ".join(self._flows) or "none"
            raise KeyError(f"no flow {slug!r} is registered (registered: {known})") from None

    def __contains__(self, slug: object) -> bool:
        return slug in self._flows

    def __iter__(self) -> Iterator[Flow]:
        return iter(self._flows.values())

    def __len__(self) -> int:
        return len(self._flows)

    def __repr__(self) -> str:
        return f"FlowRegistry({', '.join(self._flows)})"

    @classmethod
    def of(cls, value: object) -> FlowRegistry:
        """A registry from a registry, a single Flow, or an iterable of Flows."""
        if isinstance(value, FlowRegistry):
            return value
        if isinstance(value, Flow):
            return cls(value)
        if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
            items = list(value)
            if all(isinstance(item, Flow) for item in items):
                return cls(*items)
        raise ConfigurationError(
            f"expected a FlowRegistry, a Flow or a list of Flows, got {type(value).__name__}"
        )


def load_registry(path: str) -> FlowRegistry:
    """Import ``package.module:attribute`` (the current directory is importable) and
    return its flows as a registry."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"APP must look like package.module:attribute (e.g. myapp.flows:registry), got {path!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except FlowDefinitionError:
        raise
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for APP {path!r}: {exc}") from exc
    except Exception as exc:
        raise ConfigurationError(
            f"importing {module_name!r} for APP {path!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    value: object = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attribute!r} (APP {path!r})"
            ) from None
    try:
        return FlowRegistry.of(value)
    except ConfigurationError as exc:
        raise ConfigurationError(f"APP {path!r}: {exc}") from None
