"""`fcd synth`: APIGen-style synthetic query/call pairs from tool definitions and seed examples, verified.

The run, stage by stage (each stage in its own module):
1. plan (plan.py): seeded generation requests over the domain's tools and seeds (inputs.py);
2. generate: the generator writes n examples per request as JSON; in `joint` mode it writes the
   calls too, in `teacher` mode only queries, which the teacher then answers with the tools (as
   `fcd label` does);
3. verify (verify.py): format -> execution (optional) -> duplicates -> contamination (optional) ->
   semantic (judge.py, optional);
4. irrelevance by function masking: a kept example's query with the functions it calls removed
   from its tools, target: no call; they are judged too, until their share of the kept data reaches
   --irrelevance-ratio (Hammer found about 10% best);
5. a stratified train/val split, records and exports written.

Everything the teacher answered (and every execution) is cached, so a killed run resumes for free;
outputs are written atomically at the end.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcdistill.client.cache import ResponseCache
from fcdistill.data.checks import Failure, style_failures
from fcdistill.jsonl import write_json_atomic, write_jsonl_atomic
from fcdistill.teacher.ask import TeacherClient
from fcdistill.teacher.config import TeacherConfig, check_teacher
from fcdistill.teacher.inputs import Domain, Example, SynthOptions
from fcdistill.teacher.plan import Job, examples_schema, generation_messages, parse_generation, plan_jobs
from fcdistill.teacher.templates import Templates
from fcdistill.teacher.verify import (StageTable, Verifier, check_exec_module, dedup_and_contamination,
                                      load_eval_index, skipped_stages)


@dataclass
class SynthResult:
    """What a synth run kept and dropped, per stage, and what it wrote."""

    out: Path
    relevant: StageTable
    irrelevance: StageTable
    total: StageTable
    irrelevance_target: int
    splits: dict[str, int]
    teacher_errors: int
    client: dict[str, Any]
    files: list[str]
    error_samples: list[str] = field(default_factory=list)  # the first distinct teacher errors, as the teacher said them

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
            lines += [f"  teacher error: {m}" for m in self.error_samples]
        lines.append(f"wrote {self.out}: {', '.join(self.files)}")
        return "\n".join(lines)


def run_synth(cfg: TeacherConfig, opts: SynthOptions, templates: Templates, domain: Domain) -> SynthResult:
    """Generate, verify, mask, split and write; see the module docstring. Writes into opts.out."""
    check_exec_module(opts.exec_module)  # fail fast on a bad path, before any teacher call
    eval_index = load_eval_index(opts.eval_data, opts.ngram)
    check_teacher(cfg)  # a teacher that cannot be reached is reported now, before anything is written
    opts.out.mkdir(parents=True, exist_ok=True)
    if cfg.cache is None:
        cfg = cfg.model_copy(update={"cache": opts.out / "cache.sqlite"})
    write_json_atomic(opts.out / "config.json", {"teacher": cfg.identity(), "base_url": cfg.base_url,
                                                 "options": opts.model_dump(mode="json")})
    return asyncio.run(_synth_async(cfg, opts, templates, domain, eval_index))


async def _synth_async(cfg: TeacherConfig, opts: SynthOptions, templates: Templates, domain: Domain,
                       eval_index: Any) -> SynthResult:
    from fcdistill.data.dedup import DuplicateIndex, stratified_split, stratum

    cache = ResponseCache(cfg.cache) if cfg.cache else None
    executor = None
    if opts.exec_module is not None:
        from fcdistill.teacher.execute import Executor

        executor = Executor(opts.exec_module, timeout_s=opts.exec_timeout_s, cache=cache)
    joint = opts.answer == "joint"
    jobs = plan_jobs(domain, opts)
    rel, irr = StageTable(), StageTable()
    for table in (rel, irr):
        skipped_stages(table, executor, eval_index, opts.judge)
    teacher_errors = 0
    error_samples: list[str] = []

    def sample(message: str) -> None:  # what the user needs to fix a failing teacher, not just a count
        if message and message[:300] not in error_samples and len(error_samples) < 3:
            error_samples.append(message[:300])

    async with TeacherClient(cfg, cache=cache) as client:
        verifier = Verifier(client, templates, executor, eval_index, opts.judge, cfg.progress)

        # 1. generate
        async def generate(job: Job) -> tuple[Job, Any]:
            schema = examples_schema(job, joint)
            ans = await client.ask_json(generation_messages(job, templates, joint), schema, "submit_examples",
                                        temperature=opts.gen_temperature, max_tokens=opts.gen_max_tokens)
            return job, ans

        examples: list[Example] = []
        for job, ans in await client.gather(jobs, generate, "generate"):
            if ans.transport_error:
                teacher_errors += job.n
                sample(ans.transport_error)
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
            await client.gather(examples, answer, "answer")
            dropped = [e for e in examples if e.failures and e.failures[0].code == "teacher_error"]
            teacher_errors += len(dropped)
            for e in dropped:
                sample(e.failures[0].detail)
            examples = [e for e in examples if e not in dropped]

        examples.sort(key=lambda e: e.id)
        dedup_rel = DuplicateIndex(threshold=opts.dedup_threshold)
        for s in domain.seeds:  # a copy of a few-shot seed is a duplicate, not new data
            dedup_rel.check(f"seed:{s.id}", s.query)
        examples, errors = await verifier.run(examples, dedup_rel)
        teacher_errors += len(errors)
        for e in errors:
            sample(e.failures[0].detail)
        for ex in examples:
            rel.count(ex)

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
                    dedup_and_contamination(ex, dedup_irr, eval_index)
            if opts.judge:
                await verifier.judge_all([e for e in cands if e.ok], "judge irrelevance", irrelevance=True)
            for ex in cands:  # in order; once the target is met, later candidates go unused
                if irr.kept >= target:
                    irr_unused += 1
                    continue
                if ex.failures and ex.failures[0].code == "teacher_error":
                    teacher_errors += 1
                    sample(ex.failures[0].detail)
                    continue
                irr.count(ex)
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
                         splits=splits, teacher_errors=teacher_errors, client=client_stats, files=files,
                         error_samples=error_samples)
    report = {"stage_table": total.as_dict(), "relevant": rel.as_dict(), "irrelevance": irr.as_dict(),
              "irrelevance_target": target, "irrelevance_ratio_target": opts.irrelevance_ratio,
              "irrelevance_ratio_kept": (irr.kept / len(final)) if final else None,
              "splits": splits, "strata": dict(sorted(Counter(stratum(e.calls) for e in final).items())),
              "irrelevance_unused": irr_unused, "teacher_errors": teacher_errors, "teacher_error_samples": error_samples,
              "client": client_stats,
              "stage_order": ["format", "execution", "duplicates", "contamination", "semantic"]}
    write_json_atomic(opts.out / "report.json", report)
    (opts.out / "report.md").write_text(result.text() + "\n", encoding="utf-8")
    return result


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
