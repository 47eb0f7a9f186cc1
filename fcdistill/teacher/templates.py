"""Prompt templates (YAML, shipped defaults in templates/default.yaml), checked when loaded.

`string.Template` ($name) rather than str.format, so the JSON in prompts needs no brace escaping.
Each template may use only the placeholders its step fills in: a typo fails at load time with the
template's name, not as a silent literal `$tolls` in a thousand paid prompts.
"""

from __future__ import annotations

import json
import string
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fcdistill.errors import validation_message
from fcdistill.teacher.config import TeacherError
from fcdistill.tools import ToolCall, ToolSpec

_ALLOWED = {
    "generate.system": set(),
    "generate.user": {"tools", "examples", "style_instruction", "n", "targets"},
    "generate.queries_user": {"tools", "examples", "style_instruction", "n", "targets"},
    "styles.simple": {"targets"}, "styles.multiple": {"targets"}, "styles.parallel": {"targets"},
    "styles.parallel_multiple": {"targets"},
    "judge.system": set(),
    "judge.user": {"query", "tools", "calls", "results"},
    "judge.irrelevance_user": {"query", "tools"},
    "label.system": set(),
}


class _Generate(BaseModel):
    system: str
    user: str
    queries_user: str


class _Styles(BaseModel):
    simple: str
    multiple: str
    parallel: str
    parallel_multiple: str


class _Judge(BaseModel):
    system: str
    user: str
    irrelevance_user: str


class _Label(BaseModel):
    system: str = ""


class Templates(BaseModel):
    version: int = 1
    generate: _Generate
    styles: _Styles
    judge: _Judge
    label: _Label = _Label()

    def get(self, dotted: str) -> str:
        section, name = dotted.split(".")
        return getattr(getattr(self, section), name)

    def render(self, dotted: str, **values: Any) -> str:
        return string.Template(self.get(dotted)).substitute({k: str(v) for k, v in values.items()})


def tools_text(tools: list[ToolSpec]) -> str:
    """Tools as prompts show them ($tools): compact JSON, one tool a line."""
    return "\n".join(json.dumps(t.model_dump(), ensure_ascii=False, separators=(",", ":")) for t in tools)


def calls_json(calls: list[ToolCall]) -> str:
    """Calls as the judge's prompt shows them ($calls)."""
    return json.dumps([c.model_dump() for c in calls], ensure_ascii=False)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def default_templates_text() -> str:
    return resources.files("fcdistill.teacher").joinpath("templates/default.yaml").read_text(encoding="utf-8")


def load_templates(path: Path | None = None) -> Templates:
    """The shipped defaults, overridden key by key by the YAML file at `path` if given."""
    import yaml

    data = yaml.safe_load(default_templates_text())
    if path is not None:
        if not Path(path).is_file():
            raise TeacherError(f"templates file {path} not found")
        try:
            user = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise TeacherError(f"templates file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(user, dict):
            raise TeacherError(f"templates file {path} must be a mapping")
        data = _merge(data, user)
    try:
        templates = Templates.model_validate(data)
    except ValidationError as exc:
        raise TeacherError(f"templates: {validation_message(exc)}") from None
    for dotted, allowed in _ALLOWED.items():
        tmpl = string.Template(templates.get(dotted))
        if not tmpl.is_valid():
            raise TeacherError(f"templates: {dotted} has a malformed $placeholder (write $$ for a literal $)")
        unknown = set(tmpl.get_identifiers()) - allowed
        if unknown:
            raise TeacherError(f"templates: {dotted} uses unknown placeholder(s) {sorted(unknown)}; "
                               f"allowed: {sorted(allowed) or 'none'}")
    return templates
