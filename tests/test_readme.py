"""The README's commands are commands: each `fcd ...` line names a real command and only options it
has, and gives values where it shows a flag (no `fcd verify ...` placeholders)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

README = Path(__file__).resolve().parents[1] / "README.md"


def _command_lines() -> list[str]:
    """`fcd` invocations in the README's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("#", 1)[0].strip()
                m = re.match(r"(?:\S*/)?fcd\s+(.*)", part)
                if m:
                    lines.append(m.group(1))
    return lines


LINES = _command_lines()


def test_the_readme_shows_commands():
    assert len(LINES) >= 12, LINES


@pytest.mark.parametrize("line", LINES)
def test_readme_command_exists_with_its_options(line):
    from fcdistill.cli import app

    cmd = typer.main.get_command(app)
    tokens = line.split()
    path = []
    while hasattr(cmd, "commands") and tokens and tokens[0] in cmd.commands:  # a group: descend
        path.append(tokens[0])
        cmd = cmd.commands[tokens.pop(0)]
    assert not hasattr(cmd, "commands"), f"`fcd {line}` names no command"
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    flags = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(tokens))
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"`fcd {' '.join(path)}` has no {unknown}"
    for i, tok in enumerate(tokens):
        if tok.strip("[]") == "...":
            assert i > 0 and not tokens[i - 1].strip("[").startswith("--"), \
                f"`fcd {line}`: a placeholder where arguments or a flag's value belong"
