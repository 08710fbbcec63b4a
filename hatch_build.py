"""Build hook: vendor the pinned pgflow SQL (fetched with npm) into the package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _load_upstream(root: Path) -> Any:
    path = root / "pgflow_sa" / "_upstream.py"
    spec = importlib.util.spec_from_file_location("_pgflow_sa_upstream", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


class VendorPgflowSql(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        upstream = _load_upstream(Path(self.root))
        try:
            upstream.ensure_vendored(Path(self.root) / "pgflow_sa" / "_vendor")
        except upstream.UpstreamFetchError as exc:
            raise SystemExit(f"pgflow-sa build: {exc}") from None
