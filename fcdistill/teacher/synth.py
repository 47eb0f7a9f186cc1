"""`fcd synth`: APIGen-style synthetic query/call pairs from tool definitions and seed examples, verified.

Generation: each request shows the generator the tools of one query style (simple: one function;
multiple: the target among distractors; parallel: several calls of one function; parallel_multiple:
several calls across functions), a few seed examples, and asks for n examples as JSON. In `joint`
mode the generator writes the calls too; in `teacher` mode it writes only queries, which the teacher
then answers with the tools (as `fcd label` does).

Verification, in this order (the only stage that pays a teacher comes last, on fewer examples):
format -> execution (optional) -> duplicates -> contamination (optional) -> semantic (optional).
Irrelevance examples are then made by function masking: a kept example's query with the functions
it calls removed from its tools, target: no call; they are judged too, until their share of the
kept data reaches --irrelevance-ratio (Hammer found about 10% best).

Everything the teacher answered (and every execution) is cached, so a killed run resumes for free;
outputs are written atomically at the end.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from fcdistill.teacher.cache import ResponseCache, write_json_atomic, write_jsonl_atomic
from fcdistill.teacher.client import TeacherClient, check_teacher
from fcdistill.teacher.config import TeacherConfig, TeacherError
from fcdistill.teacher.templates import Templates
from fcdistill.teacher.verify import (VERDICT_SCHEMA, Failure, StageTable, format_failures, parse_verdict,
                                      style_failures)
from fcdistill.tools import ToolCall, ToolSchemaError, ToolSpec, normalize_tools

RELEVANT_STYLES = ("simple", "multiple", "parallel", "parallel_multiple")
SYNTH_LABEL_SOURCE = "synthetic"


# -- inputs ------------------------------------------------------------------------------------------
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


def _seed_calls(raw: Any, where: str) -> list[ToolCall]:
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
        calls = _seed_calls(raw, where)
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


# -- examples ----------------------------------------------------------------------------------------
@dataclass
class Example:
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


@dataclass
class Job:
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


def _tools_text(tools: list[ToolSpec]) -> str:
    return "\n".join(json.dumps(t.model_dump(), ensure_ascii=False, separators=(",", ":")) for t in tools)


def _calls_json(calls: list[ToolCall]) -> str:
    return json.dumps([c.model_dump() for c in calls], ensure_ascii=False)


def _examples_schema(job: Job, joint: bool) -> dict[str, Any]:
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
    targets = ", ".join(job.targets)
    style = templates.render(f"styles.{job.style}", targets=targets)
    if joint:
        shots = "\n".join(json.dumps({"query": s.query, "calls": [c.model_dump() for c in s.calls]}, ensure_ascii=False)
                          for s in job.shots)
        user = templates.render("generate.user", tools=_tools_text(job.tools), examples=shots or "(none)",
                                style_instruction=style, n=job.n, targets=targets)
    else:
        shots = "\n".join(json.dumps(s.query, ensure_ascii=False) for s in job.shots)
        user = templates.render("generate.queries_user", tools=_tools_text(job.tools), examples=shots or "(none)",
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
            calls = _seed_calls(raw if raw is not None else [], f"item {j}")
        except TeacherError as exc:
            out.append(bad(j, "malformed_example", str(exc)))
            continue
        out.append(Example(id=f"{job.id}-{j}", style=job.style, query=item["query"].strip(), tools=job.tools,
                           calls=calls, seed_ids=[s.id for s in job.shots]))
    return out


# -- the judge ---------------------------------------------------------------------------------------
async def judge_answer(client: TeacherClient, templates: Templates, query: str, tools: list[ToolSpec],
                       calls: list[ToolCall], exec_results: list[dict[str, Any]] | None,
                       irrelevance: bool = False) -> tuple[bool, Failure | None, dict[str, Any] | None]:
    """(passed, failure, verdict). An unparsable or invalid verdict fails with that reason; a transport
    failure comes back as code `teacher_error`, which callers do not count as a data failure."""
    if irrelevance:
        user = templates.render("judge.irrelevance_user", query=query, tools=_tools_text(tools))
    else:
        results = json.dumps(exec_results, ensure_ascii=False, default=str) if exec_results is not None else "(not run)"
        user = templates.render("judge.user", query=query, tools=_tools_text(tools), calls=_calls_json(calls),
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


class Bounded:
    """Run coroutines with at most `limit` alive, behind a progress bar."""

    def __init__(self, limit: int, progress: bool, client: TeacherClient | None = None):
        self.limit = limit
        self.progress = progress
        self.client = client

    async def __call__(self, coros: list[Any], desc: str) -> list[Any]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(coros), desc=desc, disable=not self.progress, unit="item", dynamic_ncols=True, leave=False)
        sem = asyncio.Semaphore(self.limit)

        async def run(c: Any) -> Any:
            async with sem:
                r = await c
            bar.update(1)
            if self.client is not None:
                bar.set_postfix(self.client.postfix(), refresh=False)
            return r
        try:
            return await asyncio.gather(*(run(c) for c in coros))
        finally:
            bar.close()


class Verifier:
    """The verification stages in order: format -> execution -> duplicates -> contamination -> semantic.

    Each example keeps its failures (the first names the stage it was dropped at). Examples whose
    judge call failed at the transport are removed and counted, not judged as data.
    """

    def __init__(self, client: TeacherClient | None, templates: Templates, executor: Any, eval_index: Any,
                 judge: bool, bounded: Bounded):
        if judge and client is None:
            raise TeacherError("the semantic check needs a teacher (--base-url and --model), or pass --no-judge")
        self.client, self.templates, self.executor = client, templates, executor
        self.eval_index, self.use_judge, self.bounded = eval_index, judge, bounded

    async def run(self, examples: list[Example], dedup: Any) -> tuple[list[Example], int]:
        for ex in examples:
            if ex.ok:
                ex.failures += style_failures(ex.calls, ex.style) + format_failures(ex.calls, ex.tools)
        if self.executor is not None:
            await self.bounded([self.execute(e) for e in examples if e.ok], "execute")
        for ex in examples:  # in order: the first occurrence is the one kept
            if ex.ok:
                _dedup_and_contamination(ex, dedup, self.eval_index)
        if self.use_judge:
            await self.bounded([self.judge(e) for e in examples if e.ok], "judge")
        errors = [e for e in examples if e.failures and e.failures[0].code == "teacher_error"]
        return [e for e in examples if e not in errors], len(errors)

    async def execute(self, ex: Example) -> None:
        results, fails = await self.executor.check(ex.calls)
        ex.exec_results = [r.as_dict() for r in results]
        ex.failures += fails

    async def judge(self, ex: Example, irrelevance: bool = False) -> None:
        assert self.client is not None
        _, failure, ex.verdict = await judge_answer(self.client, self.templates, ex.query, ex.tools, ex.calls,
                                                    ex.exec_results, irrelevance=irrelevance)
        if failure is not None:
            ex.failures.append(failure)


# -- the run -----------------------------------------------------------------------------------------
@dataclass
class SynthResult:
    out: Path
    relevant: StageTable
    irrelevance: StageTable
    total: StageTable
    irrelevance_target: int
    splits: dict[str, int]
    teacher_errors: int
    client: dict[str, Any]
    files: list[str]

    def text(self) -> str:
        lines = [self.total.markdown("all examples"), self.relevant.markdown("relevant (generated)"),
                 self.irrelevance.markdown(f"irrelevance (function masking; target {self.irrelevance_target})"),
                 f"split: {self.splits}"]
        c = self.client
        cost = f", cost ${c['cost_usd']:.4f}" if c.get("cost_usd") is not None else ""
        lines.append(f"requests {c['requests']} (cache hits {c['cache_hits']}, retries {c['retries']}), "
                     f"tokens {c['prompt_tokens']}+{c['completion_tokens']}{cost}")
        if self.teacher_errors:
            lines.append(f"{self.teacher_errors} examples hit teacher errors and were left out; rerun to resume")
        lines.append(f"wrote {self.out}: {', '.join(self.files)}")
        return "\n".join(lines)


def run_synth(cfg: TeacherConfig, opts: SynthOptions, templates: Templates, domain: Domain) -> SynthResult:
    if opts.exec_module is not None:
        from fcdistill.teacher.execute import Executor

        Executor(opts.exec_module)  # fail fast on a bad path, before any teacher call
    eval_index = None
    if opts.eval_data is not None:
        from fcdistill.data.bfcl import DataError
        from fcdistill.teacher.dedup import EvalIndex

        try:
            eval_index = EvalIndex.from_data_dir(opts.eval_data, n=opts.ngram)
        except DataError as exc:
            raise TeacherError(f"--eval-data: {exc}") from None
    check_teacher(cfg)  # a teacher that cannot be reached is reported now, before anything is written
    opts.out.mkdir(parents=True, exist_ok=True)
    if cfg.cache is None:
        cfg = cfg.model_copy(update={"cache": opts.out / "cache.sqlite"})
    write_json_atomic(opts.out / "config.json", {"teacher": cfg.identity(), "base_url": cfg.base_url,
                                                 "options": opts.model_dump(mode="json")})
    return asyncio.run(_synth_async(cfg, opts, templates, domain, eval_index))


async def _synth_async(cfg: TeacherConfig, opts: SynthOptions, templates: Templates, domain: Domain,
                       eval_index: Any) -> SynthResult:
    from fcdistill.teacher.dedup import DuplicateIndex, stratified_split, stratum

    cache = ResponseCache(cfg.cache) if cfg.cache else None
    executor = None
    if opts.exec_module is not None:
        from fcdistill.teacher.execute import Executor

        executor = Executor(opts.exec_module, timeout_s=opts.exec_timeout_s, cache=cache)
    joint = opts.answer == "joint"
    jobs = plan_jobs(domain, opts)
    rel, irr = StageTable(), StageTable()
    if executor is None:
        rel.skipped["execution"] = irr.skipped["execution"] = "no --exec-module"
    if eval_index is None:
        rel.skipped["contamination"] = irr.skipped["contamination"] = "no --eval-data"
    if not opts.judge:
        rel.skipped["semantic"] = irr.skipped["semantic"] = "--no-judge"
    teacher_errors = 0

    async with TeacherClient(cfg, cache=cache) as client:
        bounded = Bounded(2 * cfg.concurrency, cfg.progress, client)
        verifier = Verifier(client, templates, executor, eval_index, opts.judge, bounded)

        # 1. generate
        async def generate(job: Job) -> tuple[Job, Any]:
            schema = _examples_schema(job, joint)
            ans = await client.ask_json(generation_messages(job, templates, joint), schema, "submit_examples",
                                        temperature=opts.gen_temperature, max_tokens=opts.gen_max_tokens)
            return job, ans

        examples: list[Example] = []
        for job, ans in await bounded([generate(j) for j in jobs], "generate"):
            if ans.transport_error:
                teacher_errors += job.n
                continue
            examples += parse_generation(ans.value, job, joint, ans.error)

        # 1b. teacher mode: the teacher answers each generated query with the tools
        if not joint:
            async def answer(ex: Example) -> None:
                if not ex.ok:
                    return
                # the style asks for calls, so the teacher must call (tool_choice "required")
                a = await client.ask_calls([{"role": "user", "content": ex.query}], ex.tools, record_id=ex.id,
                                           system=templates.label.system or None, tool_choice="required")
                if a.transport_error:
                    ex.failures.append(Failure("teacher", "teacher_error", a.transport_error))
                elif a.error:
                    ex.failures.append(Failure("format", "truncated" if a.truncated else "malformed_calls", a.error))
                else:
                    ex.calls, ex.content = a.calls, (None if a.calls else a.content)
            await bounded([answer(e) for e in examples], "answer")
            dropped = [e for e in examples if e.failures and e.failures[0].code == "teacher_error"]
            teacher_errors += len(dropped)
            examples = [e for e in examples if e not in dropped]

        examples.sort(key=lambda e: e.id)
        dedup_rel = DuplicateIndex(threshold=opts.dedup_threshold)
        for s in domain.seeds:  # a copy of a few-shot seed is a duplicate, not new data
            dedup_rel.check(f"seed:{s.id}", s.query)
        examples, errors = await verifier.run(examples, dedup_rel)
        teacher_errors += errors
        rel.generated = len(examples)
        for ex in examples:
            if ex.ok:
                rel.kept += 1
            else:
                rel.fail(ex.failures)

        # 7. irrelevance by function masking, in rounds until the target share is kept
        kept_rel = [e for e in examples if e.ok]
        target = round(len(kept_rel) * opts.irrelevance_ratio / (1 - opts.irrelevance_ratio))
        rng = random.Random(f"{opts.seed}:irrelevance")
        sources = kept_rel[:]
        rng.shuffle(sources)
        masked_examples: list[Example] = []
        dedup_irr = DuplicateIndex(threshold=opts.dedup_threshold)
        rounds = 0
        irr_unused = 0  # judged after the target was met (a round asks for 25% extra)
        while irr.kept < target and sources and rounds < 4:
            rounds += 1
            need = target - irr.kept
            batch, sources = sources[: math.ceil(need * 1.25)], sources[math.ceil(need * 1.25):]
            cands = [c for c in (_mask(src, domain.tools, rng) for src in batch) if c is not None]
            for ex in cands:
                ex.failures += style_failures(ex.calls, "irrelevance")
                if ex.ok:
                    _dedup_and_contamination(ex, dedup_irr, eval_index)
            if opts.judge:
                await bounded([verifier.judge(e, irrelevance=True) for e in cands if e.ok], "judge irrelevance")
            for ex in cands:  # in order; once the target is met, later candidates go unused
                if irr.kept >= target:
                    irr_unused += 1
                    continue
                if ex.failures and ex.failures[0].code == "teacher_error":
                    teacher_errors += 1
                    continue
                irr.generated += 1
                if ex.ok:
                    irr.kept += 1
                else:
                    irr.fail(ex.failures)
                masked_examples.append(ex)
        client_stats = client.stats.as_dict(cfg)
    if cache is not None:
        cache.close()

    # 8. split (irrelevance follows its source: the same query never lands on both sides) and write
    kept = [e for e in examples if e.ok]
    assignment = stratified_split([(e.id, stratum(e.calls)) for e in kept], opts.val_fraction, opts.seed)
    for e in kept:
        e.split = assignment[e.id]
    by_id = {e.id: e for e in kept}
    for e in masked_examples:
        if e.ok:
            e.split = by_id[e.source_id].split if e.source_id in by_id else "train"
    final = sorted(kept + [e for e in masked_examples if e.ok], key=lambda e: e.id)
    total = _sum_tables(rel, irr)
    files = _write_outputs(opts, examples + masked_examples, final)
    splits = dict(sorted(Counter(e.split for e in final).items()))
    result = SynthResult(out=opts.out, relevant=rel, irrelevance=irr, total=total, irrelevance_target=target,
                         splits=splits, teacher_errors=teacher_errors, client=client_stats, files=files)
    report = {"stage_table": total.as_dict(), "relevant": rel.as_dict(), "irrelevance": irr.as_dict(),
              "irrelevance_target": target, "irrelevance_ratio_target": opts.irrelevance_ratio,
              "irrelevance_ratio_kept": (irr.kept / len(final)) if final else None,
              "splits": splits, "strata": dict(sorted(Counter(stratum(e.calls) for e in final).items())),
              "irrelevance_unused": irr_unused, "teacher_errors": teacher_errors, "client": client_stats,
              "stage_order": ["format", "execution", "duplicates", "contamination", "semantic"]}
    write_json_atomic(opts.out / "report.json", report)
    (opts.out / "report.md").write_text(result.text() + "\n", encoding="utf-8")
    return result


def _dedup_and_contamination(ex: Example, index: Any, eval_index: Any) -> None:
    key = ex.query if not ex.masked else f"{ex.query}\n[tools] {' '.join(sorted(t.name for t in ex.tools))}"
    kind, other, j = index.check(ex.id, key)
    if kind != "unique":
        ex.duplicate_of = other
        ex.failures.append(Failure("duplicates", kind, f"{kind} duplicate of {other} (Jaccard {j:.2f})"))
        return
    if eval_index is not None:
        why = eval_index.check([ex.id, *ex.seed_ids, *([ex.source_id] if ex.source_id else [])], ex.query)
        if why is not None:
            ex.failures.append(Failure("contamination", "eval_overlap", why))


def _mask(src: Example, all_tools: list[ToolSpec], rng: random.Random) -> Example | None:
    """The source's query with every function it calls removed from its tools (Hammer's masking)."""
    from fcdistill.data.bfcl import IRRELEVANT_ANSWER

    called = sorted({c.name for c in src.calls})
    remaining = [t for t in src.tools if t.name not in called]
    if not remaining:  # a one-function example: show other functions instead, so the list is not empty
        others = [t for t in all_tools if t.name not in called]
        if not others:
            return None
        remaining = rng.sample(others, min(len(others), rng.randint(1, 2)))
    return Example(id=f"{src.id}-irr", style="irrelevance", query=src.query, tools=remaining,
                   content=IRRELEVANT_ANSWER, seed_ids=src.seed_ids, source_id=src.id, masked=called)


def _sum_tables(a: StageTable, b: StageTable) -> StageTable:
    t = StageTable(generated=a.generated + b.generated, kept=a.kept + b.kept, skipped=dict(a.skipped))
    for s in t.failed:
        t.failed[s] = a.failed[s] + b.failed[s]
        t.reasons[s] = a.reasons[s] + b.reasons[s]
    return t


def _write_outputs(opts: SynthOptions, audited: list[Example], final: list[Example]) -> list[str]:
    out = opts.out
    write_jsonl_atomic(out / "generated.jsonl", [e.audit() for e in sorted(audited, key=lambda e: e.id)])
    write_jsonl_atomic(out / "rejected.jsonl", [e.audit() for e in sorted(audited, key=lambda e: e.id) if not e.ok])
    files = ["generated.jsonl", "rejected.jsonl"]
    records = {s: [e.record() for e in final if e.split == s] for s in ("train", "val")}
    for split, rows in records.items():
        write_jsonl_atomic(out / f"{split}.jsonl", rows)
        files.append(f"{split}.jsonl")
    if "openai" in opts.export or "trl" in opts.export:
        from fcdistill.data.bfcl import Record
        from fcdistill.data.export import to_openai, trl_record

        chat = None
        if "trl" in opts.export:
            from fcdistill.chat_format import ChatFormat
            from fcdistill.models import ensure_fc_token, load_tokenizer

            tokenizer = load_tokenizer(opts.model)
            ensure_fc_token(tokenizer, opts.fc_token)
            chat = ChatFormat(tokenizer, fc_token=opts.fc_token)
        for split, rows in records.items():
            recs = [Record.model_validate(r) for r in rows]
            if "openai" in opts.export:
                write_jsonl_atomic(out / "export" / f"{split}.openai.jsonl", [to_openai(r, True) for r in recs])
                files.append(f"export/{split}.openai.jsonl")
            if chat is not None:
                write_jsonl_atomic(out / "export" / f"{split}.trl.jsonl", [trl_record(chat, r) for r in recs])
                files.append(f"export/{split}.trl.jsonl")
    return files


# -- `fcd verify`: the same stages on examples from elsewhere ------------------------------------------
class VerifyOptions(BaseModel):
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
            ex.calls = _seed_calls(raw if raw is not None else [], f"line {n}")
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


def run_verify(cfg: TeacherConfig | None, opts: VerifyOptions, templates: Templates) -> StageTable:
    """Verify examples from a file; writes verified.jsonl, rejected.jsonl and report.{json,md} to opts.out."""
    default_tools = load_tools(opts.tools) if opts.tools is not None else None
    examples = load_examples(opts.input, default_tools)
    eval_index = None
    if opts.eval_data is not None:
        from fcdistill.data.bfcl import DataError
        from fcdistill.teacher.dedup import EvalIndex

        try:
            eval_index = EvalIndex.from_data_dir(opts.eval_data, n=opts.ngram)
        except DataError as exc:
            raise TeacherError(f"--eval-data: {exc}") from None
    if opts.judge and cfg is None:
        raise TeacherError("--judge needs a teacher: --base-url and --model (or --teacher-config)")
    if opts.exec_module is not None:
        from fcdistill.teacher.execute import Executor

        Executor(opts.exec_module)
    if cfg is not None and opts.judge:
        check_teacher(cfg)
    opts.out.mkdir(parents=True, exist_ok=True)
    if cfg is not None and cfg.cache is None:
        cfg = cfg.model_copy(update={"cache": opts.out / "cache.sqlite"})
    table, client_stats = asyncio.run(_verify_async(cfg, opts, templates, examples, eval_index))
    kept = [e for e in examples if e.ok]
    for e in kept:
        e.split = "train"
    write_jsonl_atomic(opts.out / "verified.jsonl", [e.record() for e in kept])
    write_jsonl_atomic(opts.out / "rejected.jsonl", [e.audit() for e in examples if not e.ok])
    write_json_atomic(opts.out / "report.json", {"stage_table": table.as_dict(), "client": client_stats})
    (opts.out / "report.md").write_text(table.markdown("verified examples"), encoding="utf-8")
    return table


async def _verify_async(cfg: TeacherConfig | None, opts: VerifyOptions, templates: Templates,
                        examples: list[Example], eval_index: Any) -> tuple[StageTable, dict[str, Any]]:
    from fcdistill.teacher.dedup import DuplicateIndex

    cache = ResponseCache(cfg.cache) if cfg is not None and cfg.cache else None
    executor = None
    if opts.exec_module is not None:
        from fcdistill.teacher.execute import Executor

        executor = Executor(opts.exec_module, timeout_s=opts.exec_timeout_s, cache=cache)
    table = StageTable()
    if executor is None:
        table.skipped["execution"] = "no --exec-module"
    if eval_index is None:
        table.skipped["contamination"] = "no --eval-data"
    if not opts.judge:
        table.skipped["semantic"] = "--no-judge"
    client_stats: dict[str, Any] = {}
    client = TeacherClient(cfg, cache=cache) if cfg is not None and opts.judge else None
    try:
        limit = 2 * (cfg.concurrency if cfg is not None else 4)
        verifier = Verifier(client, templates, executor, eval_index, opts.judge, Bounded(limit, opts.progress, client))
        kept, errors = await verifier.run(examples, DuplicateIndex(threshold=opts.dedup_threshold))
        if errors:
            raise TeacherError(f"{errors} judge requests failed at the teacher after retries; rerun to resume")
        if client is not None and cfg is not None:
            client_stats = client.stats.as_dict(cfg)
    finally:
        if client is not None:
            await client.aclose()
        if cache is not None:
            cache.close()
    table.generated = len(examples)
    for ex in examples:
        if ex.ok:
            table.kept += 1
        else:
            table.fail(ex.failures)
    return table, client_stats
