"""Planning and prompting `fcd synth`'s generation requests, and reading the examples back out of replies.

Each request shows the generator the tools of one query style (simple: one function; multiple: the
target among distractors; parallel: several calls of one function; parallel_multiple: several calls
across functions) and a few seed examples, and asks for n examples as JSON. The plan is seeded: the
same options give the same requests, so cached replies are found again on resume.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any

from fcdistill.data.checks import Failure
from fcdistill.teacher.config import TeacherError
from fcdistill.teacher.inputs import Domain, Example, SeedExample, SynthOptions, read_calls
from fcdistill.teacher.templates import Templates, tools_text
from fcdistill.tools import ToolSpec


@dataclass
class Job:
    """One generation request: its style, the functions to call, the tools shown, the seeds shown."""

    index: int
    style: str
    targets: list[str]
    tools: list[ToolSpec]
    shots: list[SeedExample]
    n: int

    @property
    def id(self) -> str:
        return f"g{self.index:04d}"


def _allocate(total: int, weights: dict[str, float]) -> list[str]:
    """`total` style slots in proportion to weights (largest remainder), in a fixed order."""
    s = sum(weights.values())
    raw = {k: total * w / s for k, w in weights.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), k))[: total - sum(counts.values())]:
        counts[k] += 1
    return [k for k in weights for _ in range(counts[k])]


def plan_jobs(domain: Domain, opts: SynthOptions) -> list[Job]:
    """Seeded generation requests: style, target functions, tools shown, few-shot seeds."""
    tools = domain.tools
    if len(tools) < 2:
        for style in ("multiple", "parallel_multiple"):
            if style in opts.styles:
                raise TeacherError(f"--styles {style} needs at least 2 tools; the domain has {len(tools)}")
    rng = random.Random(opts.seed)
    n_req = math.ceil(opts.count / opts.per_request)
    styles = _allocate(n_req, opts.styles)
    rng.shuffle(styles)
    names = [t.name for t in tools]
    by_name = {t.name: t for t in tools}
    rotation: list[str] = []
    jobs = []
    for i, style in enumerate(styles):
        if not rotation:  # cycle through the functions so every one gets generated for
            rotation = names[:]
            rng.shuffle(rotation)
        target = rotation.pop()
        if style in ("simple", "parallel"):
            targets, shown = [target], [target]
        elif style == "multiple":
            others = [n for n in names if n != target]
            targets = [target]
            shown = [target, *rng.sample(others, min(len(others), rng.randint(1, 3)))]
        else:
            others = [n for n in names if n != target]
            targets = [target, *rng.sample(others, min(len(others), rng.randint(1, 2)))]
            rest = [n for n in names if n not in targets]
            shown = targets + (rng.sample(rest, 1) if rest and rng.random() < 0.5 else [])
        rng.shuffle(shown)
        n = min(opts.per_request, opts.count - i * opts.per_request)
        jobs.append(Job(i, style, targets, [by_name[s] for s in shown], _shots(domain.seeds, targets, opts.shots, rng), n))
    return jobs


def _shots(seeds: list[SeedExample], targets: list[str], k: int, rng: random.Random) -> list[SeedExample]:
    """Seeds that call the target functions first, then others, k in all (seeded)."""
    related = [s for s in seeds if any(c.name in targets for c in s.calls)]
    other = [s for s in seeds if s not in related]
    rng.shuffle(related)
    rng.shuffle(other)
    return (related + other)[:k]


def examples_schema(job: Job, joint: bool) -> dict[str, Any]:
    """The JSON Schema of a generator reply (queries, or queries with calls in joint mode)."""
    if not joint:
        item: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 400}
    else:
        item = {"type": "object", "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 400},
            "calls": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                "name": {"type": "string", "enum": [t.name for t in job.tools]},
                "arguments": {"type": "object"}}, "required": ["name", "arguments"]}}},
            "required": ["query", "calls"]}
    return {"type": "object", "properties": {"examples": {"type": "array", "items": item, "minItems": 1,
                                                          "maxItems": job.n}}, "required": ["examples"]}


def generation_messages(job: Job, templates: Templates, joint: bool) -> list[dict[str, str]]:
    """The generator's prompt for one job (joint: it writes the calls too; else queries only)."""
    targets = ", ".join(job.targets)
    style = templates.render(f"styles.{job.style}", targets=targets)
    if joint:
        shots = "\n".join(json.dumps({"query": s.query, "calls": [c.model_dump() for c in s.calls]}, ensure_ascii=False)
                          for s in job.shots)
        user = templates.render("generate.user", tools=tools_text(job.tools), examples=shots or "(none)",
                                style_instruction=style, n=job.n, targets=targets)
    else:
        shots = "\n".join(json.dumps(s.query, ensure_ascii=False) for s in job.shots)
        user = templates.render("generate.queries_user", tools=tools_text(job.tools), examples=shots or "(none)",
                                style_instruction=style, n=job.n, targets=targets)
    return [{"role": "system", "content": templates.generate.system}, {"role": "user", "content": user}]


def parse_generation(value: Any, job: Job, joint: bool, error: str | None) -> list[Example]:
    """Examples from a generator reply; a reply or item of the wrong shape is one example failing format."""
    def bad(j: int, code: str, detail: str) -> Example:
        return Example(id=f"{job.id}-{j}", style=job.style, query="", tools=job.tools,
                       seed_ids=[s.id for s in job.shots], failures=[Failure("format", code, detail)])

    if error is not None:
        return [bad(0, "unparsable_reply", f"generator reply {error}")]
    items = value.get("examples") if isinstance(value, dict) else value
    if not isinstance(items, list) or not items:
        return [bad(0, "unparsable_reply", "generator reply is not a non-empty JSON list of examples")]
    out = []
    for j, item in enumerate(items[: 2 * job.n]):
        if not joint:
            query = item.get("query") if isinstance(item, dict) else item
            if not isinstance(query, str) or not query.strip():
                out.append(bad(j, "malformed_example", f"item {j} is not a query string"))
                continue
            out.append(Example(id=f"{job.id}-{j}", style=job.style, query=query.strip(), tools=job.tools,
                               seed_ids=[s.id for s in job.shots]))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("query"), str) or not item["query"].strip():
            out.append(bad(j, "malformed_example", f"item {j} has no query string"))
            continue
        raw = next((item[k] for k in ("calls", "function_calls", "answers") if k in item), None)
        try:
            calls = read_calls(raw if raw is not None else [], f"item {j}")
        except TeacherError as exc:
            out.append(bad(j, "malformed_example", str(exc)))
            continue
        out.append(Example(id=f"{job.id}-{j}", style=job.style, query=item["query"].strip(), tools=job.tools,
                           calls=calls, seed_ids=[s.id for s in job.shots]))
    return out
