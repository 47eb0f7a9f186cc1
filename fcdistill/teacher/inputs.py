"""What `fcd synth` and `fcd verify` are given: options, a tool domain with seed examples, example files.

Everything read here is checked when read: tools are normalized to JSON Schema, every seed must fit
its tools (a bad seed teaches the generator a bad example), and an example line that cannot be read
is kept as an example failing format (it is data under test), not an input error. `Example` is the
unit every later stage (plan, verify, judge, synth) works on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from fcdistill.data.checks import Failure, format_failures
from fcdistill.teacher.config import TeacherError
from fcdistill.tools import ToolCall, ToolSchemaError, ToolSpec, normalize_tools

RELEVANT_STYLES = ("simple", "multiple", "parallel", "parallel_multiple")
SYNTH_LABEL_SOURCE = "synthetic"


class SeedExample(BaseModel):
    id: str
    query: str
    calls: list[ToolCall]


@dataclass
class Domain:
    tools: list[ToolSpec]
    seeds: list[SeedExample]
    implementations: Path | None = None


def load_tools(path: Path) -> list[ToolSpec]:
    """OpenAI tool JSON: a list of tools (or {"tools": [...]}), normalized and schema-checked."""
    if not Path(path).is_file():
        raise TeacherError(f"--tools {path} not found")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TeacherError(f"--tools {path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list) or not data:
        raise TeacherError(f"--tools {path} must hold a non-empty JSON list of tools")
    try:
        return normalize_tools(data)
    except ToolSchemaError as exc:
        raise TeacherError(f"--tools {path}: {exc}") from None


def read_calls(raw: Any, where: str) -> list[ToolCall]:
    """Calls as seed and example files write them ({"name" | "function_name", "arguments": obj | JSON text})."""
    if not isinstance(raw, list):
        raise TeacherError(f"{where}: calls must be a list")
    calls = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise TeacherError(f"{where}: call {i} is not an object")
        name = c.get("name") or c.get("function_name")  # the synthesizer's seed files say function_name
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise TeacherError(f"{where}: call {i} arguments are not JSON") from None
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            raise TeacherError(f"{where}: call {i} needs a name and an arguments object")
        calls.append(ToolCall(name=name, arguments=args))
    return calls


def load_seeds(path: Path, tools: list[ToolSpec]) -> list[SeedExample]:
    """Seed JSONL: {"query", "calls" | "function_calls" | "answers", "id"?}; each seed must verify."""
    if not Path(path).is_file():
        raise TeacherError(f"--seeds {path} not found")
    seeds = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--seeds {path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TeacherError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not row["query"].strip():
            raise TeacherError(f"{where}: needs a non-empty \"query\"")
        raw = next((row[k] for k in ("calls", "function_calls", "answers") if k in row), None)
        if raw is None:
            raise TeacherError(f"{where}: needs \"calls\" (or \"function_calls\" / \"answers\")")
        calls = read_calls(raw, where)
        bad = format_failures(calls, tools)
        if bad:
            raise TeacherError(f"{where}: seed does not fit the tools: {bad[0].detail}")
        seeds.append(SeedExample(id=str(row.get("id") or f"seed-{n}"), query=row["query"], calls=calls))
    if not seeds:
        raise TeacherError(f"--seeds {path} holds no examples")
    return seeds


def example_domain() -> Domain:
    """The shipped travel domain (package data): six tools, twelve seeds, executable implementations."""
    base = resources.files("fcdistill.teacher").joinpath("examples")
    tools_path = Path(str(base.joinpath("travel_tools.json")))
    tools = load_tools(tools_path)
    return Domain(tools=tools, seeds=load_seeds(Path(str(base.joinpath("travel_seeds.jsonl"))), tools),
                  implementations=Path(str(base.joinpath("travel_impl.py"))))


# -- options -----------------------------------------------------------------------------------------
class SynthOptions(BaseModel):
    out: Path
    count: int = Field(24, gt=0, description="examples to ask the generator for")
    per_request: int = Field(4, ge=1, le=50)
    styles: dict[str, float] = Field(default_factory=lambda: {"simple": 0.4, "multiple": 0.2, "parallel": 0.2,
                                                              "parallel_multiple": 0.2})
    irrelevance_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    answer: Literal["joint", "teacher"] = "joint"
    shots: int = Field(3, ge=0, le=20)
    gen_temperature: float = Field(0.8, ge=0.0, le=2.0)
    gen_max_tokens: int = Field(1024, gt=0)
    exec_module: str | None = None
    exec_timeout_s: float = Field(5.0, gt=0)
    judge: bool = True
    eval_data: Path | None = None
    dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)
    ngram: int = Field(13, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    export: list[str] = Field(default_factory=lambda: ["openai"])
    model: str = "smollm2-135m"  # whose chat template renders the trl export
    fc_token: str = "<tool_call>"

    @field_validator("styles")
    @classmethod
    def _styles(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(RELEVANT_STYLES)
        if unknown:
            raise TeacherError(f"--styles: unknown style(s) {sorted(unknown)}; choose from {', '.join(RELEVANT_STYLES)}"
                               " (irrelevance comes from --irrelevance-ratio)")
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise TeacherError("--styles: weights must be >= 0 with a positive sum")
        return {k: w for k, w in v.items() if w > 0}

    @field_validator("export")
    @classmethod
    def _export(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f not in ("openai", "trl")]
        if bad:
            raise TeacherError(f"--export: unknown format(s) {bad}; choose openai and/or trl")
        return v


class VerifyOptions(BaseModel):
    """`fcd verify`: the verification stages on examples from elsewhere."""

    input: Path
    out: Path
    tools: Path | None = None  # default tools for lines without their own
    exec_module: str | None = None
    exec_timeout_s: float = Field(5.0, gt=0)
    judge: bool = False
    eval_data: Path | None = None
    dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)
    ngram: int = Field(13, ge=1)
    progress: bool = True


# -- examples ----------------------------------------------------------------------------------------
@dataclass
class Example:
    """One query with its tools and answer, as it passes the stages; failures say where it was dropped."""

    id: str
    style: str | None  # None: no call-count rule (verified input that names no style)
    query: str
    tools: list[ToolSpec]
    calls: list[ToolCall] = field(default_factory=list)
    content: str | None = None
    seed_ids: list[str] = field(default_factory=list)
    source_id: str | None = None  # irrelevance: the example it was masked from
    masked: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    exec_results: list[dict[str, Any]] | None = None
    verdict: dict[str, Any] | None = None
    duplicate_of: str | None = None
    split: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def audit(self) -> dict[str, Any]:
        return {"id": self.id, "style": self.style, "query": self.query, "tools": [t.name for t in self.tools],
                "calls": [c.model_dump() for c in self.calls], "content": self.content, "seed_ids": self.seed_ids,
                "source_id": self.source_id, "masked": self.masked, "status": "kept" if self.ok else "rejected",
                "stage": self.failures[0].stage if self.failures else None,
                "reasons": [f.as_dict() for f in self.failures], "exec_results": self.exec_results,
                "verdict": self.verdict, "duplicate_of": self.duplicate_of, "split": self.split}

    def record(self) -> dict[str, Any]:
        """The example as a data-stage Record row (what `fcd data export` and training read)."""
        from fcdistill.data.bfcl import IRRELEVANT_ANSWER

        row: dict[str, Any] = {"id": self.id, "category": f"synth_{self.style or 'unknown'}", "split": self.split,
                               "messages": [{"role": "user", "content": self.query}],
                               "tools": [t.model_dump() for t in self.tools], "label_source": SYNTH_LABEL_SOURCE}
        if self.calls:
            row["ground_truth"] = [c.model_dump() for c in self.calls]
        else:
            row["target_content"] = self.content or IRRELEVANT_ANSWER
        return row


def load_examples(path: Path, default_tools: list[ToolSpec] | None) -> list[Example]:
    """JSONL {"id"?, "query", "calls" | "function_calls" | "answers", "tools"?, "style"?, "content"?}.

    A line that cannot be read as an example becomes an example failing format (it is data under test);
    only a line without any tools to check against is an input error.
    """
    if not Path(path).is_file():
        raise TeacherError(f"--input {path} not found")
    out: list[Example] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        ident = f"line-{n:06d}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append(Example(id=ident, style=None, query="", tools=[],
                               failures=[Failure("format", "unparsable_line", f"line {n}: {exc.msg}")]))
            continue
        if not isinstance(row, dict):
            out.append(Example(id=ident, style=None, query="", tools=[],
                               failures=[Failure("format", "malformed_example", f"line {n}: not an object")]))
            continue
        ident = str(row.get("id") or ident)
        try:
            tools = normalize_tools(row["tools"]) if "tools" in row else default_tools
        except ToolSchemaError as exc:
            raise TeacherError(f"--input {path} line {n}: {exc}") from None
        if tools is None:
            raise TeacherError(f"--input {path} line {n} has no \"tools\"; pass --tools for lines without them")
        style = row.get("style")
        ex = Example(id=ident, style=style, query=str(row.get("query") or ""), tools=tools,
                     content=row.get("content"))
        raw = next((row[k] for k in ("calls", "function_calls", "answers") if k in row), None)
        try:
            ex.calls = read_calls(raw if raw is not None else [], f"line {n}")
        except TeacherError as exc:
            ex.failures.append(Failure("format", "malformed_example", str(exc)))
        if not ex.query.strip():
            ex.failures.append(Failure("format", "malformed_example", f"line {n}: no query"))
        if style is None and raw is not None and not ex.calls and not ex.failures:
            ex.style = "irrelevance"  # an empty call list is a no-call answer
        elif style is not None and style not in (*RELEVANT_STYLES, "irrelevance"):
            ex.failures.append(Failure("format", "unknown_style", f"line {n}: style {style!r}"))
        out.append(ex)
    if not out:
        raise TeacherError(f"--input {path} holds no examples")
    return out
