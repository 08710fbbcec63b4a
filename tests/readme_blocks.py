"""The README's fenced code blocks, for tests/test_readme.py and .ci/run.

    python3 tests/readme_blocks.py setup N    # print the Nth shell block of "Set up"

Standard library only: CI calls it before anything is installed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

FILE_HEADER = re.compile(r"# (in )?([\w./-]+\.\w+)$")


@dataclass(frozen=True)
class Block:
    line: int  # README line of the block's first code line
    lang: str
    code: str
    chapter: str  # the "## " heading the block is under
    section: str  # the "### " heading, or "" directly under the chapter

    @property
    def target(self) -> tuple[str, bool] | None:
        """(path, is a fragment) when the first line is ``# path`` or ``# in path``."""
        first = self.code.split("\n", 1)[0]
        match = FILE_HEADER.match(first)
        if match is None:
            return None
        return match.group(2), match.group(1) is not None

    @property
    def body(self) -> str:
        """The code without a ``# path`` first line."""
        return self.code.split("\n", 1)[1] if self.target else self.code


def blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    found: list[Block] = []
    chapter = section = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            chapter, section = line[3:].strip(), ""
        elif line.startswith("### "):
            section = line[4:].strip()
        elif line.startswith("```"):
            lang = line[3:].strip()
            start = index + 1
            end = start
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            if end == len(lines):
                raise ValueError(f"README.md:{index + 1}: code block is not closed")
            code = "\n".join(lines[start:end]) + "\n"
            found.append(Block(start + 1, lang, code, chapter, section))
            index = end
        index += 1
    return found


def setup_commands(text: str | None = None) -> list[str]:
    """The shell commands of the "Set up" chapter, in order."""
    return [b.code.strip() for b in blocks(text) if b.chapter == "Set up" and b.lang == "sh"]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "setup":
        sys.exit("usage: readme_blocks.py setup N")
    print(setup_commands()[int(sys.argv[2]) - 1])
