"""The README's CLI reference lists exactly the commands and options the CLI has."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click

from pgflow_sa.cli import cli

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


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
    section = README.split("### CLI reference", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `pgflow-sa ([a-z -]+?)(?: [A-Z\[].*?)?` \| (.*?) \|", line)
        if match:
            rows[match.group(1).strip()] = re.findall(r"`(--[a-z-]+)`", match.group(2))
    actual = dict(_commands(cli, []))
    assert set(rows) == set(actual)
    for name, options in actual.items():
        assert sorted(rows[name]) == sorted(options), name
