"""The teacher as judge: does an answer do what the query asks? (APIGen's semantic check.)

The judge answers a strict JSON verdict `{"thought": str, "pass": bool}` that is parsed as JSON and
validated; an unparsable or invalid verdict is a failure with that reason (never `"yes" in text`).
Used by `fcd synth`, `fcd verify --judge` and `fcd label --judge`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fcdistill.data.checks import Failure
from fcdistill.errors import validation_message
from fcdistill.teacher.ask import TeacherClient
from fcdistill.teacher.templates import Templates, calls_json, tools_text
from fcdistill.tools import ToolCall, ToolSpec


class Verdict(BaseModel):
    """The judge's verdict; `pass` must be a JSON boolean ("yes", 1 or "true" are not verdicts)."""

    model_config = ConfigDict(strict=True, populate_by_name=True, extra="ignore")

    thought: str
    passed: bool = Field(alias="pass")


VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"thought": {"type": "string", "maxLength": 400, "description": "one or two sentences of reasoning"},
                   "pass": {"type": "boolean"}},
    "required": ["thought", "pass"],
}


def parse_verdict(value: Any) -> tuple[Verdict | None, str | None]:
    """A decoded JSON value -> Verdict, or the reason it is not one (every problem, on one line)."""
    if not isinstance(value, dict):
        return None, f"verdict is not a JSON object (got {type(value).__name__})"
    try:
        return Verdict.model_validate(value), None
    except ValidationError as exc:
        return None, f"verdict: {validation_message(exc)}"


async def judge_answer(client: TeacherClient, templates: Templates, query: str, tools: list[ToolSpec],
                       calls: list[ToolCall], exec_results: list[dict[str, Any]] | None,
                       irrelevance: bool = False) -> tuple[bool, Failure | None, dict[str, Any] | None]:
    """(passed, failure, verdict). An unparsable or invalid verdict fails with that reason; a transport
    failure comes back as code `teacher_error`, which callers do not count as a data failure."""
    if irrelevance:
        user = templates.render("judge.irrelevance_user", query=query, tools=tools_text(tools))
    else:
        results = json.dumps(exec_results, ensure_ascii=False, default=str) if exec_results is not None else "(not run)"
        user = templates.render("judge.user", query=query, tools=tools_text(tools), calls=calls_json(calls),
                                results=results)
    ans = await client.ask_json([{"role": "system", "content": templates.judge.system},
                                 {"role": "user", "content": user}], VERDICT_SCHEMA, "submit_verdict")
    if ans.transport_error:
        return False, Failure("semantic", "teacher_error", ans.transport_error), None
    if ans.error:
        return False, Failure("semantic", "unparsable_verdict", ans.error), None
    verdict, why = parse_verdict(ans.value)
    if verdict is None:
        return False, Failure("semantic", "invalid_verdict", why or "invalid"), None
    v = {"thought": verdict.thought, "pass": verdict.passed}
    if not verdict.passed:
        return False, Failure("semantic", "judge_rejected", verdict.thought[:300] or "(no thought given)"), v
    return True, None, v

