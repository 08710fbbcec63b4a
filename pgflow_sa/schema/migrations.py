"""The vendored upstream pgflow migrations (package data built in by npm)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .. import _upstream
from ..exceptions import SchemaFilesMissingError

LATEST_VERSION = _upstream.LATEST
PINNED_VERSIONS = tuple(sorted(_upstream.RELEASES))


@dataclass(frozen=True)
class Migration:
    """One upstream migration file, e.g. ``20250429164909_pgflow_initial``."""

    name: str
    release: str

    @property
    def version_id(self) -> str:
        return self.name.split("_", 1)[0]

    @property
    def sql(self) -> str:
        path = _upstream.release_dir(self.release) / f"{self.name}.sql"
        return path.read_text(encoding="utf-8")


@cache
def migrations(version: str = LATEST_VERSION) -> tuple[Migration, ...]:
    """The migrations of a pinned release, in the order they apply."""
    if version not in _upstream.RELEASES:
        pinned = ", ".join(PINNED_VERSIONS)
        raise SchemaFilesMissingError(
            f"pgflow {version} is not pinned by pgflow-sa (pinned: {pinned})"
        )
    manifest = _upstream.read_manifest(version)
    if manifest is None:
        raise SchemaFilesMissingError(
            f"the pgflow {version} SQL files are missing or damaged in "
            f"{_upstream.release_dir(version)}; reinstall pgflow-sa (`pip install .` fetches "
            "them with npm) or run `python pgflow_sa/_upstream.py` in a source checkout"
        )
    entries = manifest["migrations"]
    assert isinstance(entries, list)
    names = sorted(str(entry["name"]).removesuffix(".sql") for entry in entries)
    return tuple(Migration(name, version) for name in names)
