"""`fcd label`: the teacher labels the BFCL train items marked for teaching, resumably.

Per item: n samples (self-consistency), each verified (format: every call against its schema; style:
the call count its category needs), a majority vote over the valid samples' canonical calls (order
of parallel calls ignored), the agreement recorded, optionally the teacher as judge. A label that
fails any of it goes to rejected.jsonl with its reasons. Mix-in items (ground truth known) are asked
too and scored with bfcl_eval's own ast_checker: that is the teacher's accuracy.

Output is appended one item at a time and the teacher's answers are cached, so a killed run resumes
where it stopped: nothing is lost, duplicated, or paid for twice.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from fcdistill.client.cache import ResponseCache, request_key
from fcdistill.data.checks import Failure, category_style, format_failures, style_failures
from fcdistill.data.labels import ACCEPTED, LABELS_DIR, MIXIN, REJECTED, record_hash
from fcdistill.jsonl import JsonlLog, write_json_atomic
from fcdistill.teacher.ask import CallAnswer, TeacherClient
from fcdistill.teacher.config import TeacherConfig, TeacherError, check_teacher
from fcdistill.teacher.templates import Templates
from fcdistill.tools import ToolCall



class LabelOptions(BaseModel):
    data: Path
    out: Path | None = None  # default DATA/labels
    samples: int = Field(1, ge=1, le=64)
    min_agreement: float = Field(0.5, gt=0.0, le=1.0)
    judge: bool = False
    mix_in: bool = True  # also ask the teacher on mix-in items, to score it
    limit: int | None = Field(None, gt=0)  # first N teacher items (smoke runs)
    overwrite: bool = False

    def labels_dir(self) -> Path:
        return self.out or self.data / LABELS_DIR


# -- voting ------------------------------------------------------------------------------------------
def _canon(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canon(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canon(v) for v in value]
    return value


def canonical_key(calls: list[ToolCall]) -> str:
    """Equal for answers that mean the same: calls in any order, 3 == 3.0, key order ignored."""
    if not calls:
        return "<no call>"
    items = sorted(json.dumps([c.name, _canon(c.arguments)], sort_keys=True, ensure_ascii=False) for c in calls)
    return "[" + ",".join(items) + "]"


@dataclass
class Sample:
    """One of the n answers to an item, verified."""

    index: int
    answer: CallAnswer
    failures: list[Failure] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.answer.transport_error is None and not self.failures

    def summary(self) -> dict[str, Any]:
        a = self.answer
        return {"calls": [c.model_dump() for c in a.calls], "content": a.content,
                "failures": [f.as_dict() for f in self.failures]}


@dataclass
class Vote:
    winner: Sample | None
    votes: int
    agreement: float
    tally: dict[str, int]


def majority_vote(samples: list[Sample]) -> Vote:
    """The most common canonical answer among valid samples; ties go to the earliest sample.

    Agreement is winner votes / all samples (invalid ones count against it).
    """
    valid = [s for s in samples if s.valid]
    tally = Counter(canonical_key(s.answer.calls) for s in valid)
    if not tally:
        return Vote(None, 0, 0.0, {})
    first_seen = {}
    for s in valid:
        first_seen.setdefault(canonical_key(s.answer.calls), s)
    best = max(tally, key=lambda k: (tally[k], -first_seen[k].index))
    return Vote(first_seen[best], tally[best], tally[best] / len(samples), dict(tally))


# -- scoring against BFCL ----------------------------------------------------------------------------
class MixinScorer:
    """bfcl_eval's ast_checker on the teacher's answers, with BFCL's own function docs for each item."""

    def __init__(self, records: list[Any]):
        from fcdistill.bfcl_env import bfcl_data_dir

        wanted: dict[str, set[str]] = {}
        for r in records:
            wanted.setdefault(r.category, set()).add(r.id)
        self.functions: dict[str, list[dict[str, Any]]] = {}
        for category, ids in wanted.items():
            path = bfcl_data_dir() / f"BFCL_v4_{category}.json"
            with path.open(encoding="utf-8") as f:
                for line in f:
                    item = json.loads(line)
                    if item["id"] in ids:
                        self.functions[item["id"]] = item["function"]

    def score(self, rec: Any, calls: list[ToolCall]) -> tuple[bool, str | None]:
        from fcdistill.bfcl_env import ast_check
        from fcdistill.data.bfcl import category_language

        if category_style(rec.category) == "irrelevance":
            return (not calls), (f"made {len(calls)} call(s) on an irrelevance item" if calls else None)
        if rec.possible_answer is None:
            return False, "no possible answer to score against"
        if not calls:
            return False, "answered in text where a call was expected"
        valid, error_type, error = ast_check(self.functions[rec.id], [c.to_bfcl() for c in calls], rec.possible_answer,
                                             category_language(rec.category), rec.category)
        return valid, None if valid else f"{error_type}: {error or ''}"[:300]


# -- the stage ---------------------------------------------------------------------------------------
@dataclass
class LabelSummary:
    labels_dir: Path
    teacher_items: int = 0
    mixin_items: int = 0
    already_done: int = 0
    accepted: int = 0
    rejected: int = 0
    teacher_errors: int = 0
    reasons: Counter = field(default_factory=Counter)
    agreements: list[float] = field(default_factory=list)
    mixin_correct: int = 0
    mixin_scored: int = 0
    mixin_sample_correct: int = 0
    mixin_sample_total: int = 0
    mixin_by_category: dict[str, list[int]] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        ag = self.agreements
        return {
            "teacher_items": self.teacher_items, "mixin_items": self.mixin_items,
            "already_done": self.already_done, "accepted": self.accepted, "rejected": self.rejected,
            "teacher_errors": self.teacher_errors, "rejection_reasons": dict(sorted(self.reasons.items())),
            "agreement_mean": sum(ag) / len(ag) if ag else None,
            "agreement_histogram": dict(sorted(Counter(round(a, 2) for a in ag).items())),
            "mixin_accuracy": self.mixin_correct / self.mixin_scored if self.mixin_scored else None,
            "mixin_scored": self.mixin_scored, "mixin_correct": self.mixin_correct,
            "mixin_sample_accuracy": (self.mixin_sample_correct / self.mixin_sample_total
                                      if self.mixin_sample_total else None),
            "mixin_by_category": {k: {"correct": v[0], "scored": v[1]} for k, v in sorted(self.mixin_by_category.items())},
            "client": self.client,
        }

    def text(self) -> str:
        d = self.as_dict()
        lines = [f"teacher items {self.teacher_items} (already done {self.already_done}): accepted "
                 f"{self.accepted}, rejected {self.rejected}, teacher errors {self.teacher_errors}"]
        if self.reasons:
            lines.append("rejections: " + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())))
        if d["agreement_mean"] is not None:
            lines.append(f"agreement mean {d['agreement_mean']:.3f}")
        if self.mixin_scored:
            lines.append(f"teacher accuracy on mix-in (bfcl_eval ast_checker): {self.mixin_correct}/"
                         f"{self.mixin_scored} = {d['mixin_accuracy']:.3f}")
        c = self.client
        if c:
            cost = f", cost ${c['cost_usd']:.4f}" if c.get("cost_usd") is not None else ""
            lines.append(f"requests {c['requests']} (cache hits {c['cache_hits']}, retries {c['retries']}), "
                         f"tokens {c['prompt_tokens']}+{c['completion_tokens']}{cost}")
        for e in self.error_examples[:3]:
            lines.append(f"teacher error: {e}")
        lines.append(f"wrote {self.labels_dir}")
        return "\n".join(lines)


def _config_fingerprint(cfg: TeacherConfig, opts: LabelOptions, templates: Templates) -> dict[str, Any]:
    return {"teacher": cfg.identity(), "samples": opts.samples, "min_agreement": opts.min_agreement,
            "judge": opts.judge, "templates": request_key([templates.label.system, templates.judge.system,
                                                           templates.judge.user])}


def _prepare_dir(cfg: TeacherConfig, opts: LabelOptions, templates: Templates) -> Path:
    out = opts.labels_dir()
    out.mkdir(parents=True, exist_ok=True)
    fp = _config_fingerprint(cfg, opts, templates)
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        if old.get("fingerprint") != fp:
            if not opts.overwrite:
                changed = sorted(k for k in fp if old.get("fingerprint", {}).get(k) != fp[k])
                raise TeacherError(f"{out} holds labels made with different settings ({', '.join(changed)}); "
                                   "pass --overwrite to relabel, or --out for a new directory")
            for name in (ACCEPTED, REJECTED, MIXIN):
                (out / name).unlink(missing_ok=True)
    write_json_atomic(cfg_path, {"fingerprint": fp, "base_url": cfg.base_url, "data": str(opts.data)})
    return out


def run_label(cfg: TeacherConfig, opts: LabelOptions, templates: Templates) -> LabelSummary:
    """Label (and score on mix-in) the train records of `opts.data`; see the module docstring."""
    from fcdistill.data.bfcl import DataError, read_manifest, read_records

    if opts.samples > 1 and cfg.temperature == 0:
        raise TeacherError("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    try:
        records = read_records(opts.data, "train")
        manifest = read_manifest(opts.data)
    except DataError as exc:
        raise TeacherError(str(exc)) from None
    eval_ids = set(manifest.get("splits", {}).get("eval", []))
    leaked = [r.id for r in records if r.id in eval_ids]
    if leaked:
        raise TeacherError(f"{len(leaked)} train records are eval ids in the manifest (e.g. {leaked[0]}); refusing")
    # a multi-turn conversation needs the teacher to drive it against bfcl's backends: not labeled here
    # (it keeps awaiting labels, and the export skips it unless it trains on ground truth)
    teach = [r for r in records if r.label_source == "teacher" and r.turns is None]
    if opts.limit:
        teach = teach[: opts.limit]
    mixin = [r for r in records if r.label_source == "ground_truth" and r.turns is None] if opts.mix_in else []
    if opts.mix_in and not mixin:
        print(f"warning: {opts.data} has no mix-in items (ground-truth train items): the teacher's accuracy "
              "cannot be scored; split with a larger --mix-in or larger caps (fcd data bfcl)", file=sys.stderr)
    if teach or mixin:  # a teacher that cannot be reached is reported now, before anything is written
        check_teacher(cfg)
    out = _prepare_dir(cfg, opts, templates)
    if cfg.cache is None:
        cfg = cfg.model_copy(update={"cache": out / "cache.sqlite"})
    summary = LabelSummary(labels_dir=out, teacher_items=len(teach), mixin_items=len(mixin))
    asyncio.run(_label_async(cfg, opts, templates, teach, mixin, out, summary))
    return summary


async def _label_async(cfg: TeacherConfig, opts: LabelOptions, templates: Templates, teach: list[Any],
                       mixin: list[Any], out: Path, summary: LabelSummary) -> None:
    accepted, rejected, checks = JsonlLog(out / ACCEPTED), JsonlLog(out / REJECTED), JsonlLog(out / MIXIN)
    current = {r.id: record_hash(r) for r in [*teach, *mixin]}
    for log in (accepted, rejected, checks):  # labels of questions that changed or left the split
        log.drop([i for i, row in log.rows.items() if current.get(i) != row.get("record_hash")])
    done = accepted.done | rejected.done | checks.done
    todo = [r for r in [*teach, *mixin] if r.id not in done]
    summary.already_done = len(teach) + len(mixin) - len(todo)
    scorer = MixinScorer(mixin) if any(r.label_source == "ground_truth" for r in todo) else None
    cache = ResponseCache(cfg.cache) if cfg.cache else None
    async with TeacherClient(cfg, cache=cache) as client:
        async def one(rec: Any) -> dict[str, Any] | None:
            return await label_item(client, rec, opts, templates, scorer)

        def done_cb(rec: Any, row: dict[str, Any] | None) -> None:
            if row is None:
                return
            if row["status"] == "teacher_error":
                summary.teacher_errors += 1
                summary.error_examples.append(f"{rec.id}: {row['error']}")
                return  # not written: the next run asks again (answered samples come from the cache)
            log = checks if row["status"] == "mixin" else accepted if row["status"] == "ok" else rejected
            log.append(row)

        try:
            await client.each(todo, one, done_cb, "label")
        finally:
            summary.client = client.stats.as_dict(cfg)
            if cache is not None:
                cache.close()
    for log in (accepted, rejected, checks):
        log.compact()
        log.close()
    _tally(summary, accepted, rejected, checks)
    write_json_atomic(out / "summary.json", summary.as_dict())


def _tally(summary: LabelSummary, accepted: JsonlLog, rejected: JsonlLog, checks: JsonlLog) -> None:
    """Totals over the whole directory (this run and earlier, resumed ones)."""
    summary.accepted = len(accepted.rows)
    summary.rejected = len(rejected.rows)
    for row in accepted.rows.values():
        summary.agreements.append(row["agreement"])
    for row in rejected.rows.values():
        first = (row.get("reasons") or [{}])[0]
        summary.reasons[f"{first.get('stage')}/{first.get('code')}"] += 1
    for row in checks.rows.values():
        summary.mixin_scored += 1
        summary.mixin_correct += int(row["correct"])
        summary.mixin_sample_correct += sum(row["sample_correct"])
        summary.mixin_sample_total += len(row["sample_correct"])
        c = summary.mixin_by_category.setdefault(row["category"], [0, 0])
        c[0] += int(row["correct"])
        c[1] += 1


async def label_item(client: TeacherClient, rec: Any, opts: LabelOptions, templates: Templates,
                     scorer: MixinScorer | None) -> dict[str, Any]:
    """Ask, verify, vote (and judge, or score on mix-in) for one record; a row for the right log."""
    from fcdistill.data.bfcl import category_language

    n = opts.samples
    style = category_style(rec.category)
    answers = await asyncio.gather(*(client.ask_calls(
        rec.messages, rec.tools, sample=i if n > 1 else None, record_id=rec.id,
        language=category_language(rec.category), system=templates.label.system or None) for i in range(n)))
    errors = [a.transport_error for a in answers if a.transport_error]
    if errors:
        return {"id": rec.id, "status": "teacher_error", "error": errors[0]}
    samples = []
    for i, a in enumerate(answers):
        fails = [Failure("format", "truncated" if a.truncated else "malformed_calls", a.error)] if a.error else \
            style_failures(a.calls, style, a.note) + format_failures(a.calls, rec.tools)
        samples.append(Sample(i, a, fails))
    vote = majority_vote(samples)
    base = {"id": rec.id, "category": rec.category, "record_hash": record_hash(rec), "n_samples": n,
            "n_valid": sum(s.valid for s in samples), "votes": vote.votes, "agreement": vote.agreement,
            "teacher_model": client.cfg.model}
    if rec.label_source == "ground_truth":
        assert scorer is not None
        sample_correct = [scorer.score(rec, s.answer.calls)[0] if s.valid else False for s in samples]
        ok, why = scorer.score(rec, vote.winner.answer.calls) if vote.winner else (False, "no valid sample")
        return {**base, "status": "mixin", "correct": ok, "error": why, "sample_correct": sample_correct,
                "calls": [c.model_dump() for c in vote.winner.answer.calls] if vote.winner else None}
    reasons: list[Failure] = []
    if vote.winner is None:
        seen: set[str] = set()
        for s in samples:
            for f in s.failures[:1]:
                if str(f) not in seen:
                    seen.add(str(f))
                    reasons.append(f)
    elif vote.agreement < opts.min_agreement:
        reasons.append(Failure("vote", "low_agreement", f"{vote.votes}/{n} samples agree "
                                                        f"(< {opts.min_agreement:g}); tally {sorted(vote.tally.values(), reverse=True)}"))
    verdict = None
    if not reasons and opts.judge and vote.winner is not None:
        from fcdistill.teacher.judge import judge_answer

        ok, failure, verdict = await judge_answer(client, templates, _user_text(rec), rec.tools,
                                                  vote.winner.answer.calls, None)
        if failure is not None:
            reasons.append(failure)
    if reasons:
        return {**base, "status": "rejected", "reasons": [f.as_dict() for f in reasons], "verdict": verdict,
                "samples": [s.summary() for s in samples]}
    w = vote.winner
    assert w is not None
    return {**base, "status": "ok", "calls": [c.model_dump() for c in w.answer.calls] or None,
            "content": None if w.answer.calls else (w.answer.content or ""), "verdict": verdict}


def _user_text(rec: Any) -> str:
    return "\n".join(str(m.get("content") or "") for m in rec.messages if m.get("role") == "user")
