"""Fetch the pinned upstream pgflow SQL with npm and vendor it as package data.

This module is used by the build (``hatch_build.py`` loads it by path, before
any dependency is installed), so it imports nothing but the standard library.

Each pinned ``@pgflow/core`` release is one entry in :data:`RELEASES`. The
build runs ``npm pack`` for it, checks the tarball against the pinned sha512
integrity and copies the migration files into ``pgflow_sa/_vendor/``, with a
manifest of their sha256 digests that the installer checks at run time.

Run ``python pgflow_sa/_upstream.py`` in a source checkout to vendor the files by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "@pgflow/core"
MIGRATIONS_PREFIX = "package/dist/supabase/migrations/"
MANIFEST = "manifest.json"
VENDOR_ROOT = Path(__file__).resolve().parent / "_vendor"


@dataclass(frozen=True)
class Release:
    """A pinned ``@pgflow/core`` release."""

    version: str
    integrity: str
    migration_count: int


RELEASES: dict[str, Release] = {
    "0.8.1": Release(
        version="0.8.1",
        integrity=(
            "sha512-ElLPkKGPjttBsjlLJfn4CcMeiFwtuUhUNuFADwhQjdrg+netkeONY12oxcbPSBMqBWXVAuKriLq+1T1dCPEWPQ=="
        ),
        migration_count=12,
    ),
}
LATEST = "0.8.1"


class UpstreamFetchError(RuntimeError):
    """The pinned pgflow SQL could not be fetched or verified."""


def release_dir(version: str, root: Path | None = None) -> Path:
    return (root or VENDOR_ROOT) / f"pgflow-core-{version}"


def sri_sha512(data: bytes) -> str:
    """Subresource-integrity string, the form npm prints as ``dist.integrity``."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(version: str, root: Path | None = None) -> dict[str, object] | None:
    """The manifest of a vendored release, or None when it is missing or does not verify."""
    folder = release_dir(version, root)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        release = RELEASES[version]
        if manifest.get("integrity") != release.integrity:
            return None
        files = manifest["migrations"]
        if len(files) != release.migration_count:
            return None
        for entry in files:
            if _sha256((folder / entry["name"]).read_bytes()) != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(manifest)


def _npm_pack(version: str, workdir: Path, npm: str) -> Path:
    spec = f"{PACKAGE}@{version}"
    try:
        proc = subprocess.run(
            [npm, "pack", spec, "--pack-destination", str(workdir), "--silent"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except OSError as exc:
        raise UpstreamFetchError(f"could not run npm ({npm}): {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise UpstreamFetchError(f"`npm pack {spec}` did not finish within 300 s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise UpstreamFetchError(f"`npm pack {spec}` failed: {last}")
    tarballs = sorted(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise UpstreamFetchError(f"`npm pack {spec}` produced no tarball in {workdir}")
    return tarballs[0]


def fetch(version: str = LATEST, root: Path | None = None, npm: str | None = None) -> Path:
    """Download, verify and vendor one pinned release; returns its folder."""
    if version not in RELEASES:
        known = ", ".join(sorted(RELEASES))
        raise UpstreamFetchError(f"pgflow {version} is not pinned (pinned: {known})")
    release = RELEASES[version]
    npm_path = npm or shutil.which("npm")
    if npm_path is None:
        raise UpstreamFetchError(
            f"npm was not found on PATH; the build fetches {PACKAGE}@{version} with it. "
            "Install Node.js (which ships npm) and build again."
        )
    with tempfile.TemporaryDirectory(prefix="pgflow-sa-npm-") as tmp:
        tarball = _npm_pack(version, Path(tmp), npm_path)
        data = tarball.read_bytes()
        actual = sri_sha512(data)
        if actual != release.integrity:
            raise UpstreamFetchError(
                f"{PACKAGE}@{version} failed its integrity check: expected {release.integrity}, "
                f"got {actual}. The tarball was not used; check your npm registry or mirror."
            )
        migrations: dict[str, bytes] = {}
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if not (member.isfile() and name.startswith(MIGRATIONS_PREFIX)):
                    continue
                base = name[len(MIGRATIONS_PREFIX) :]
                if "/" in base or not base.endswith(".sql"):
                    continue
                extracted = tar.extractfile(member)
                if extracted is not None:
                    migrations[base] = extracted.read()
    if len(migrations) != release.migration_count:
        raise UpstreamFetchError(
            f"{PACKAGE}@{version} holds {len(migrations)} migrations, "
            f"expected {release.migration_count}"
        )
    folder = release_dir(version, root)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    entries = []
    for name in sorted(migrations):
        (staging / name).write_bytes(migrations[name])
        entries.append({"name": name, "sha256": _sha256(migrations[name])})
    manifest = {
        "package": PACKAGE,
        "version": version,
        "integrity": release.integrity,
        "migrations": entries,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def ensure_vendored(root: Path | None = None, npm: str | None = None) -> list[Path]:
    """Vendor every pinned release that is not already present and verified."""
    folders = []
    for version in sorted(RELEASES):
        if read_manifest(version, root) is None:
            fetch(version, root, npm)
        folders.append(release_dir(version, root))
    return folders


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=VENDOR_ROOT, help="vendor folder")
    parser.add_argument("--force", action="store_true", help="fetch even when present")
    args = parser.parse_args(argv)
    try:
        if args.force:
            for version in sorted(RELEASES):
                fetch(version, args.dest)
        folders = ensure_vendored(args.dest)
    except UpstreamFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for folder in folders:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
