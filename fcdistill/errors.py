"""One-line messages for pydantic validation errors, shared by every stage's config and options.

Every problem is listed, not only the first, so a config with three mistakes is fixed in one round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn


def validation_problems(exc: Any, names: Mapping[str, str] | None = None) -> list[str]:
    """Each error of a pydantic ValidationError (or of its `.errors()` list, e.g. FastAPI's with the
    leading `body` stripped) as `loc: message` (our own text where we raised it).

    `names` maps a model's field to what the user typed for it (a CLI maps `optional_args` to
    `--optional-args`), so the message names the flag, not the model's field."""
    errors = exc if isinstance(exc, list) else getattr(exc, "errors", lambda: [])()
    if not errors:
        return [str(exc).splitlines()[0]]
    out = []
    for err in errors:
        parts = [str(p) for p in err.get("loc", ())]
        if parts and names and parts[0] in names:
            parts[0] = names[parts[0]]
        loc = ".".join(parts)
        inner = (err.get("ctx") or {}).get("error")
        if inner is not None:
            msg = str(inner)  # our own validators name their field or flag themselves
        else:
            msg = str(err.get("msg", "invalid"))
            if err.get("type") == "extra_forbidden":
                msg = "unknown field (check the spelling; see configs/ for the known fields)"
            elif err.get("type") == "missing":
                msg = "required field is missing"
            elif isinstance(err.get("input"), (str, int, float)) and not isinstance(err.get("input"), bool):
                shown = repr(err["input"])  # the refused value, cut short: a request body can be megabytes
                msg += f", not {shown if len(shown) <= 60 else shown[:57] + '...'}"
            msg = f"{loc}: {msg}" if loc else msg
        if msg not in out:
            out.append(msg)
    return out


def validation_message(exc: Any, names: Mapping[str, str] | None = None) -> str:
    """All problems on one line: the problem itself when there is one, else `N problems: a; b; c`."""
    problems = validation_problems(exc, names)
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr naming the problem, then exit (2: bad input, as click does; 1: a run that
    stopped and can be resumed). Every command reports bad input through this one function."""
    import typer

    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
