"""The README as a user meets it: its CLI reference matches the CLI, and every code
block of its Reference runs, top to bottom, in a fresh project on a fresh database."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import psycopg
import pytest

from pgflow_sa.cli import cli
from pgflow_sa.testing.plugin import DatabaseFactory

from .helpers import BIN
from .readme_blocks import README, Block, blocks, setup_commands

ROOT = README.parent
TEXT = README.read_text()

# benchmarks/run.py runs for minutes at its defaults; the README test only checks that
# the command works, on small sizes (its figures are not looked at)
BENCH_SMOKE = [
    "--tasks", "200", "--seconds", "1", "--root-map-size", "50", "--backlog-small", "200",
    "--backlog", "400", "--idle-seconds", "1", "--idle-settle", "1", "--scale-tasks", "200",
    "--bulk-rounds", "1",
]  # fmt: skip


def _commands(command: click.Command, path: list[str]) -> Iterator[tuple[str, list[str]]]:
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, [*path, name])
    else:
        options = [
            opt
            for param in command.params
            if isinstance(param, click.Option)
            for opt in param.opts
            if opt.startswith("--")
        ]
        yield " ".join(path), options


def test_cli_reference_matches_the_cli() -> None:
    section = TEXT.split("### CLI reference", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `pgflow-sa ([a-z -]+?)(?: [A-Z\[].*?)?` \| (.*?) \|", line)
        if match:
            rows[match.group(1).strip()] = re.findall(r"`(--[a-z-]+)`", match.group(2))
    actual = dict(_commands(cli, []))
    assert set(rows) == set(actual)
    for name, options in actual.items():
        assert sorted(rows[name]) == sorted(options), name


def _section(title: str) -> str:
    return TEXT.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]


def test_every_environment_variable_is_documented() -> None:
    table = _section("Environment variables")
    sources = [*ROOT.glob("pgflow_sa/**/*.py"), *ROOT.glob("benchmarks/*.py")]
    used = {
        name
        for path in sources
        for name in re.findall(r"\bPGFLOW_SA_[A-Z_]+\b", path.read_text())
        if name != "PGFLOW_SA_SCHEMA"  # a constant (the schema's name), not a variable
    }
    documented = set(re.findall(r"`(PGFLOW_SA_[A-Z_]+)(?:<SETTING>)?`", table))
    assert "PGFLOW_SA_DATABASE_URL" in used
    # worker settings are covered by their prefix row (and the settings table below)
    assert "PGFLOW_SA_WORKER_" in documented
    missing = {n for n in used if not n.startswith("PGFLOW_SA_WORKER_")} - documented
    assert missing == set(), f"not in the README's Environment variables table: {missing}"


def test_worker_settings_table_matches_the_settings() -> None:
    """Every WorkerSettings field has a row with its env var and its real default."""
    from dataclasses import fields

    from pgflow_sa.worker import WorkerSettings
    from pgflow_sa.worker.settings import ENV_PREFIX

    rows = {}
    for line in _section("Running a worker").splitlines():
        match = re.match(r"\| `(\w+)`.*? \| `(\w+)` \| (\S+) \|$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    defaults = WorkerSettings()
    assert set(rows) == {f.name for f in fields(WorkerSettings)}
    for f in fields(WorkerSettings):
        env, shown = rows[f.name]
        assert env == ENV_PREFIX + f.name.upper(), f.name
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            assert shown == str(value).lower(), f.name
        elif isinstance(value, (int, float)):
            assert float(shown) == value, f.name
        else:
            assert shown == value, f.name


def test_every_code_block_is_run_by_a_test_or_ci() -> None:
    """Blocks live in "Set up" (run verbatim by .ci/run), "Examples" or "Reference" (run
    by the tests below); anything else would go unexercised."""
    found = blocks()
    assert found, "no code blocks found in README.md"
    elsewhere = [b for b in found if b.chapter not in ("Set up", "Examples", "Reference")]
    assert elsewhere == [], f"code blocks outside Set up, Examples and Reference: {elsewhere}"
    examples = {b.section for b in found if b.chapter == "Examples"}
    assert examples == set(EXAMPLE_SECTIONS), examples
    assert {b.lang for b in found} <= {"python", "sh"}, "only python and sh blocks are run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(setup_commands()) == 2
    for number in (1, 2):
        assert f'"$(python3 tests/readme_blocks.py setup {number})"' in ci, number


#: the example sections, and what each prints once its run completed
EXAMPLE_SECTIONS = {
    "FastAPI": '"status":"completed"',
    "Flask": '"output":{"welcome":"Welcome, ada@example.com!"},"status":"completed"',
}
#: the first line of each example: installing takes minutes (a build with npm), so the
#: test checks that what it installs is there instead of running it
EXAMPLE_INSTALL = "python3 -m venv .venv && .venv/bin/pip install -e '.[examples]'"


def _extra_requirements(extra: str) -> list[str]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"][extra])


def _unmet(requirements: list[str]) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    unmet = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            unmet.append(text)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{text} (installed: {installed})")
    return unmet


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("section", sorted(EXAMPLE_SECTIONS))
def test_example_runs_as_written(section: str, tmp_path: Path, databases: DatabaseFactory) -> None:
    """An example section's block, in a new shell from a checkout, with only the
    variables the README names: the app answers, the worker completes the run."""
    (block,) = [b for b in blocks() if b.chapter == "Examples" and b.section == section]
    first, *commands = block.code.strip().splitlines()
    assert first == EXAMPLE_INSTALL, first
    assert _unmet(_extra_requirements("examples")) == []
    assert "pgflow-sa[examples]" in _extra_requirements("dev")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    (checkout / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    # a new shell: nothing of the test's environment but a PATH without this venv
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN]
    env = {
        "PATH": os.pathsep.join(path),
        "HOME": str(tmp_path),
        "PGFLOW_SA_DATABASE_URL": databases.create(prefix="pgflow_sa_example"),
        "PORT": str(_free_port()),
    }
    proc = subprocess.Popen(
        ["bash", "-e", "-c", "\n".join(commands)],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its background jobs die with it, whatever happens
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    where = f"README.md:{block.line} ({section})"
    assert proc.returncode == 0, f"{where}: exited with {proc.returncode}\n{out}\n{err}"
    assert EXAMPLE_SECTIONS[section] in out, f"{where}:\n{out}\n{err}"


class ReadmeRun:
    """Runs the Reference's blocks in order in one project folder and namespace."""

    def __init__(self, project: Path, env: dict[str, str], alembic_url: str) -> None:
        self.project = project
        self.env = env
        self.alembic_url = alembic_url
        self.loop = asyncio.new_event_loop()
        self.namespace: dict[str, Any] = {"__name__": "readme"}
        self.background: list[tuple[Block, subprocess.Popen[str], Path]] = []
        self.modules: list[str] = []

    def where(self, block: Block) -> str:
        return f"README.md:{block.line} ({block.section})"

    def run(self, block: Block) -> None:
        began = time.monotonic()
        self._run(block)
        print(f"{self.where(block)}: {time.monotonic() - began:.1f} s")

    def _run(self, block: Block) -> None:
        target = block.target
        if target is not None:
            self.write(block, *target)
        elif block.lang == "python":
            self.python(block)
        elif block.lang == "sh":
            self.shell(block)
        else:  # pragma: no cover - guarded by test_every_code_block_is_run_by_a_test_or_ci
            raise AssertionError(f"{self.where(block)}: cannot run a {block.lang!r} block")

    # --- files -----------------------------------------------------------------

    def write(self, block: Block, path: str, fragment: bool) -> None:
        file = self.project / path
        if not fragment:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(block.body)
            if path.endswith(".py") and not path.startswith("tests/"):
                # an app module: later blocks use its names
                module = importlib.import_module(path[:-3].replace("/", "."))
                self.modules.append(module.__name__)
                self.namespace.update(
                    {k: v for k, v in vars(module).items() if not k.startswith("__")}
                )
            return
        assert path == "migrations/env.py", f"{self.where(block)}: no recipe to create {path}"
        if not file.exists():  # what the README says to do first: alembic init migrations
            self.check_call(block, f"{BIN / 'alembic'} init migrations")
            ini = self.project / "alembic.ini"
            ini.write_text(
                re.sub(
                    r"^sqlalchemy\.url = .*$",
                    # configparser: a literal % is written %%
                    f"sqlalchemy.url = {self.alembic_url}".replace("%", "%%"),
                    ini.read_text(),
                    flags=re.M,
                )
            )
        source = file.read_text()
        anchor = re.search(r"^target_metadata = .*\n", source, flags=re.M)
        assert anchor is not None, "alembic's env.py template has no target_metadata line"
        file.write_text(source[: anchor.end()] + block.body + source[anchor.end() :])

    # --- python ----------------------------------------------------------------

    def python(self, block: Block) -> None:
        # pad so that tracebacks show README line numbers
        source = "\n" * (block.line - 1) + block.code
        code = compile(source, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, self.namespace)
        if inspect.iscoroutine(result):
            self.loop.run_until_complete(result)

    # --- shell -----------------------------------------------------------------

    def shell(self, block: Block) -> None:
        for command in re.sub(r"\\\n", " ", block.code).splitlines():
            if not command.strip() or command.lstrip().startswith("#"):
                continue
            if command.startswith("pgflow-sa worker "):
                self.start_worker(block, command)
            elif command.startswith(".venv/bin/python benchmarks/run.py"):
                command = command.split("#", 1)[0].strip()
                argv = command.replace(".venv/bin/python", sys.executable, 1).split()
                self.check_call(block, " ".join([*argv, *BENCH_SMOKE]), cwd=ROOT, timeout=600)
            else:
                self.check_call(block, command)

    def check_call(
        self, block: Block, command: str, cwd: Path | None = None, timeout: float = 300
    ) -> str:
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=cwd or self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert proc.returncode == 0, (
            f"{self.where(block)}: `{command}` exited with {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
        return proc.stdout

    def start_worker(self, block: Block, command: str) -> None:
        log = self.project / f"worker-{len(self.background)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.project,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.background.append((block, proc, log))
        # go on once it has registered (its start-up checks have passed)
        deadline = time.monotonic() + 60
        with psycopg.connect(self.env["PGFLOW_SA_DATABASE_URL"], autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM pgflow.workers WHERE function_name LIKE 'pgflow-sa:%'"
                ).fetchone()
                if row and row[0] > 0:
                    return
                assert proc.poll() is None, (
                    f"{self.where(block)}: `{command}` exited with {proc.returncode}:\n"
                    + log.read_text()
                )
                assert time.monotonic() < deadline, (
                    f"{self.where(block)}: `{command}` did not register within 60 s:\n"
                    + log.read_text()
                )
                time.sleep(0.1)

    def stop_background(self) -> None:
        for block, proc, log in self.background:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(
                    f"{self.where(block)}: the worker did not stop on SIGTERM:\n" + log.read_text()
                ) from None
            assert code == 0, f"{self.where(block)}: the worker exited with {code}:\n" + (
                log.read_text()
            )

    def close(self) -> None:
        for process in self.background:
            if process[1].poll() is None:
                process[1].kill()
                process[1].wait()
        engine = self.namespace.get("async_engine")
        if engine is not None:
            self.loop.run_until_complete(engine.dispose())
        sync = self.namespace.get("engine")
        if sync is not None:
            sync.dispose()
        self.loop.close()
        for name in self.modules:
            sys.modules.pop(name, None)


def _wait_for_runs(url: str, timeout: float = 60) -> dict[str, int]:
    """Run counts by status once no run is in progress (or at the deadline)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            # a cancelled run (Run control) is 'failed' in pgflow's table: counted apart
            counts = dict(
                conn.execute(
                    "SELECT CASE WHEN c.run_id IS NULL THEN r.status ELSE 'cancelled' END, "
                    "count(*) FROM pgflow.runs r "
                    "LEFT JOIN pgflow_sa.run_cancellations c ON c.run_id = r.run_id GROUP BY 1"
                ).fetchall()
            )
            if "started" not in counts or time.monotonic() > deadline:
                return counts
            time.sleep(0.2)


def test_reference_blocks_run_top_to_bottom(
    tmp_path: Path,
    server_url: str,
    databases: DatabaseFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database_url = databases.create(prefix="pgflow_sa_readme")  # empty: the README installs
    alembic_url = databases.create(prefix="pgflow_sa_readme_alembic")
    project = tmp_path / "project"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLOW_SA_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(project),
        PGFLOW_SA_DATABASE_URL=database_url,
        PGFLOW_SA_DATA_DIR=str(tmp_path / "embedded"),
        PGFLOW_SA_TEST_DATABASE_URL=server_url,
        PGFLOW_SA_BENCH_DATABASE_URL=server_url,
    )
    for name in ("PGFLOW_SA_DATABASE_URL", "PGFLOW_SA_DATA_DIR"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.chdir(project)

    reference = [b for b in blocks() if b.chapter == "Reference"]
    assert len(reference) >= 20
    session = ReadmeRun(project, env, alembic_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        for block in reference:
            session.run(block)
        counts = _wait_for_runs(database_url)
        session.stop_background()
    finally:
        session.close()

    # every run the README started completed (5 from Python, 1 with functions.start_flow,
    # 3 from the command line, a retry), but the one Run control cancels
    assert counts.pop("cancelled") == 1, counts
    assert set(counts) == {"completed"}, counts
    assert counts["completed"] >= 9, counts
    # `alembic revision --autogenerate` wrote the install and the flow; upgrade applied them
    (migration,) = (project / "migrations" / "versions").glob("*.py")
    assert "pgflow_ops.InstallPgflowOp(" in migration.read_text()
    assert "pgflow_ops.CreateFlowOp(" in migration.read_text()
    assert "op.create_table('articles'" in migration.read_text()
    # the rendered operations are typed code: the migration passes mypy --strict
    typed = subprocess.run(
        [str(BIN / "mypy"), "--strict", "--cache-dir", str(ROOT / ".mypy_cache"), str(migration)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert typed.returncode == 0, typed.stdout + typed.stderr
    with psycopg.connect(alembic_url) as conn:
        flows = conn.execute("SELECT flow_slug FROM pgflow.flows").fetchall()
    assert flows == [("article_flow",)]
    with psycopg.connect(alembic_url) as conn:
        conn.execute("SELECT count(*) FROM articles")  # the app's table came with them
    with psycopg.connect(server_url) as conn:  # the benchmark dropped its databases
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'pgflow_sa_bench_%'"
        ).fetchall()
    assert left == []
