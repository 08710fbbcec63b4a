"""Print pip constraints pinning every dependency in pyproject.toml to its lower bound,
so the oldest CI combination installs exactly what pyproject claims to support:
``python3 .ci/lowest_constraints.py > /tmp/lowest.txt; pip install -e . -c /tmp/lowest.txt``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - CI runs it on Python 3.11
    import tomli as tomllib

pyproject = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
    spec, _, marker = requirement.partition(";")
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][^,\s]*)\s*", spec)
    if match is None:
        sys.exit(f"no lower bound to pin in {requirement!r}")
    name, version = match.groups()
    print(f"{name}=={version}" + (f"; {marker.strip()}" if marker else ""))
