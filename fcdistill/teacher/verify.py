"""Verification, stage by stage, of examples from `fcd synth` or from elsewhere (`fcd verify`).

Stages, in this order (the only one that pays a teacher comes last, on fewer examples):
- format: data/checks.py (every call against its tool's JSON Schema, the query style's call count);
- execution (optional): execute.py, each call run against user-given implementations;
- duplicates: exact and near duplicates (data/dedup.py), the first occurrence kept;
- contamination (optional): ids and 13-grams of a data dir's eval split;
- semantic (optional): the teacher as judge (judge.py).

Each failure has a stage, a code and a detail. `StageTable` counts outcomes like APIGen's table:
generated, failures per stage with reasons, kept.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcdistill.client.cache import ResponseCache
from fcdistill.client.http import gather_bounded, progress_bar
from fcdistill.data.checks import Failure, format_failures, style_failures
from fcdistill.jsonl import write_json_atomic, write_jsonl_atomic
from fcdistill.teacher.ask import TeacherClient
from fcdistill.teacher.config import TeacherConfig, TeacherError, check_teacher
from fcdistill.teacher.inputs import Example, VerifyOptions, load_examples, load_tools
from fcdistill.teacher.judge import judge_answer
from fcdistill.teacher.templates import Templates

STAGES = ("format", "execution", "duplicates", "contamination", "semantic")


# -- counting ----------------------------------------------------------------------------------------
@dataclass
class StageTable:
    """Generated, per-stage failures (with reason codes) and kept, as in APIGen's table."""

    generated: int = 0
    failed: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STAGES})
    reasons: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in STAGES})
    kept: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # stages not run, e.g. no --exec-module

    def fail(self, failures: list[Failure]) -> None:
        """Count one rejected item at its first failing stage; every reason code is tallied."""
        if not failures:
            return
        stage = failures[0].stage
        self.failed[stage] += 1
        for f in failures:
            if f.stage == stage:
                self.reasons[stage][f.code] += 1

    def count(self, example: Example) -> None:
        """One more generated example: kept, or rejected at its first failing stage."""
        self.generated += 1
        if example.ok:
            self.kept += 1
        else:
            self.fail(example.failures)

    def as_dict(self) -> dict[str, Any]:
        return {"generated": self.generated, "failed": dict(self.failed),
                "reasons": {s: dict(sorted(c.items())) for s, c in self.reasons.items() if c},
                "kept": self.kept, "skipped_stages": self.skipped,
                "consistent": self.generated == self.kept + sum(self.failed.values())}

    def row(self) -> dict[str, int]:
        return {"generated": self.generated, "fail format": self.failed["format"],
                "fail execution": self.failed["execution"], "fail semantic": self.failed["semantic"],
                "duplicates": self.failed["duplicates"], "contaminated": self.failed["contamination"],
                "kept": self.kept}

    def markdown(self, title: str | None = None) -> str:
        row = self.row()
        lines = [f"### {title}", ""] if title else []
        lines += ["| " + " | ".join(row) + " |", "|" + "---:|" * len(row),
                  "| " + " | ".join(str(v) for v in row.values()) + " |", ""]
        for stage in STAGES:
            if self.reasons[stage]:
                lines.append(f"- {stage}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons[stage].items())))
        for stage, why in self.skipped.items():
            lines.append(f"- {stage}: not run ({why})")
        return "\n".join(lines) + "\n"


# -- the stages ------------------------------------------------------------------------------------
class Verifier:
    """The verification stages in order: format -> execution -> duplicates -> contamination -> semantic.

    Each example keeps its failures (the first names the stage it was dropped at). Examples whose
    judge call failed at the transport are removed and counted, not judged as data. Judge calls run
    under the client's one concurrency limit, executions under the executor's process limit.
    """

    def __init__(self, client: TeacherClient | None, templates: Templates, executor: Any, eval_index: Any,
                 judge: bool, progress: bool = True):
        if judge and client is None:
            raise TeacherError("the semantic check needs a teacher (--base-url and --model), or pass --no-judge")
        self.client, self.templates, self.executor = client, templates, executor
        self.eval_index, self.use_judge, self.progress = eval_index, judge, progress

    async def run(self, examples: list[Example], dedup: Any) -> tuple[list[Example], list[Example]]:
        """Check every example in place; returns those kept for counting and those a teacher error left out."""
        for ex in examples:
            if ex.ok:
                ex.failures += style_failures(ex.calls, ex.style) + format_failures(ex.calls, ex.tools)
        if self.executor is not None:
            todo = [e for e in examples if e.ok]
            bar = progress_bar(len(todo), "execute", self.progress)
            try:
                await gather_bounded(todo, self.execute, self.executor.limit, bar)
            finally:
                bar.close()
        for ex in examples:  # in order: the first occurrence is the one kept
            if ex.ok:
                dedup_and_contamination(ex, dedup, self.eval_index)
        if self.use_judge:
            await self.judge_all([e for e in examples if e.ok], "judge")
        errors = [e for e in examples if e.failures and e.failures[0].code == "teacher_error"]
        return [e for e in examples if e not in errors], errors

    async def execute(self, ex: Example) -> None:
        results, fails = await self.executor.check(ex.calls)
        ex.exec_results = [r.as_dict() for r in results]
        ex.failures += fails

    async def judge_all(self, examples: list[Example], desc: str, irrelevance: bool = False) -> None:
        """The judge on each example, as many at once as the client allows."""
        assert self.client is not None

        async def one(ex: Example) -> None:
            await self.judge(ex, irrelevance)
        await self.client.gather(examples, one, desc)

    async def judge(self, ex: Example, irrelevance: bool = False) -> None:
        assert self.client is not None
        _, failure, ex.verdict = await judge_answer(self.client, self.templates, ex.query, ex.tools, ex.calls,
                                                    ex.exec_results, irrelevance=irrelevance)
        if failure is not None:
            ex.failures.append(failure)


def dedup_and_contamination(ex: Example, index: Any, eval_index: Any) -> None:
    """The duplicates stage, then (for a unique example) the contamination stage."""
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


def load_eval_index(eval_data: Path | None, ngram: int) -> Any:
    """The contamination index of --eval-data (None without it); a bad data dir is a TeacherError."""
    if eval_data is None:
        return None
    from fcdistill.data.bfcl import DataError, eval_index

    try:
        return eval_index(eval_data, n=ngram)
    except DataError as exc:
        raise TeacherError(f"--eval-data: {exc}") from None


def check_exec_module(exec_module: str | None) -> None:
    """Fail fast on a bad --exec-module path, before any teacher call."""
    if exec_module is not None:
        from fcdistill.teacher.execute import Executor

        Executor(exec_module)


def skipped_stages(table: StageTable, executor: Any, eval_index: Any, judge: bool) -> None:
    """Name the optional stages that will not run, and why (they show in the report)."""
    if executor is None:
        table.skipped["execution"] = "no --exec-module"
    if eval_index is None:
        table.skipped["contamination"] = "no --eval-data"
    if not judge:
        table.skipped["semantic"] = "--no-judge"


# -- `fcd verify`: the stages on examples from elsewhere ----------------------------------------------
def run_verify(cfg: TeacherConfig | None, opts: VerifyOptions, templates: Templates) -> StageTable:
    """Verify examples from a file; writes verified.jsonl, rejected.jsonl and report.{json,md} to opts.out."""
    default_tools = load_tools(opts.tools) if opts.tools is not None else None
    examples = load_examples(opts.input, default_tools)
    eval_index = load_eval_index(opts.eval_data, opts.ngram)
    if opts.judge and cfg is None:
        raise TeacherError("--judge needs a teacher: --base-url and --model (or --teacher-config)")
    check_exec_module(opts.exec_module)
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
    from fcdistill.data.dedup import DuplicateIndex

    cache = ResponseCache(cfg.cache) if cfg is not None and cfg.cache else None
    executor = None
    if opts.exec_module is not None:
        from fcdistill.teacher.execute import Executor

        executor = Executor(opts.exec_module, timeout_s=opts.exec_timeout_s, cache=cache)
    table = StageTable()
    skipped_stages(table, executor, eval_index, opts.judge)
    client_stats: dict[str, Any] = {}
    client = TeacherClient(cfg, cache=cache) if cfg is not None and opts.judge else None
    try:
        verifier = Verifier(client, templates, executor, eval_index, opts.judge, opts.progress)
        _, errors = await verifier.run(examples, DuplicateIndex(threshold=opts.dedup_threshold))
        if errors:
            raise TeacherError(f"{len(errors)} judge requests failed at the teacher after retries (first: "
                               f"{errors[0].failures[0].detail[:200]}); rerun to resume")
        if client is not None and cfg is not None:
            client_stats = client.stats.as_dict(cfg)
    finally:
        if client is not None:
            await client.aclose()
        if cache is not None:
            cache.close()
    for ex in examples:
        table.count(ex)
    return table, client_stats
