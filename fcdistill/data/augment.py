"""`fcd data augment`: more train records from the train split by label-preserving transforms.

Reads DATA/train.jsonl (the eval split only to check contamination against it) and writes OUT in the
layout of `fcd data bfcl`: train.jsonl (the originals, then the augmented records), eval.jsonl and
test_case_ids_to_generate.json copied unchanged, manifest.json extended with the options and the
source hashes, and augment_stats.json (per transform: records in, out, not applicable and rejected,
with reasons). Every augmented record names its sources (`source_ids`) and its transforms.

Each source record gets `multiplier` slots; a slot tries the transforms in a seeded order per record
and takes the first that applies. A record whose target copies its description's example
(`copies_an_example`) tries substitution first. Every candidate then passes, in this order:
- format: the tool schemas are valid JSON Schema, the names unique, the target valid against its
  tools (data/checks.py), its shape the category's, and every value the source query stated
  verbatim is still stated by the new query (a swap or a rename kept query and target in step);
- contamination: no eval id among its ids and sources, no 13-gram shared with an eval question
  (data/dedup.py); originals are checked too, and a contaminated original is dropped;
- duplicates: no exact copy of another record (prompt and target), no query that is an exact or
  near duplicate (MinHash, Jaccard >= 0.8) of a query from other sources. Variants of one source
  share its query on purpose (masking, shuffles, distractors, deletion) or nearly (substitution);
  how many there are is what `--multiplier` sets. Compositions of the same sources are duplicates.
The same seed gives byte-identical files: every RNG is seeded by (seed, record id, slot).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, Field

from fcdistill.chat_format import DEFAULT_FC_TOKEN
from fcdistill.data.augment_ops import TRANSFORMS, NotApplicable, Pools, copies_an_example, user_text
from fcdistill.data.augment_values import leaves, occurs
from fcdistill.data.bfcl import DataError, Record, _dump_jsonl, _sha256, eval_index, read_manifest, read_records
from fcdistill.data.checks import category_style, format_failures, style_failures
from fcdistill.data.dedup import DuplicateIndex, normalize, question_text
from fcdistill.jsonl import write_json_atomic
from fcdistill.tools import ToolCall, ToolSchemaError, check_schema

STATS_FILE = "augment_stats.json"


class AugmentOptions(BaseModel):
    data: Path
    out: Path
    seed: int = 42
    multiplier: int = Field(default=2, ge=1, le=20)
    transforms: list[str] = Field(default_factory=lambda: list(TRANSFORMS))
    dedup_threshold: float = 0.8
    ngram: int = 13
    # Augmented records longer than this many student tokens (prompt + target, as training counts them)
    # are not made: training would drop them, so the slot tries its next transform instead. Originals
    # are kept whatever their length (training decides about those, as for the eval split's).
    max_length: int | None = Field(default=None, ge=8)
    model: str = "smollm2-135m"  # whose tokenizer and chat template count the tokens
    fc_token: str = DEFAULT_FC_TOKEN

    def check(self) -> None:
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown or not self.transforms:
            raise DataError(f"unknown --transforms {', '.join(unknown) or '(none)'}; "
                            f"choose from {', '.join(TRANSFORMS)}")
        if self.out.resolve() == self.data.resolve():
            raise DataError("--out must differ from --data: the source split is read, never rewritten")


@dataclass
class TransformStats:
    """Per transform: slots tried (in), records kept (out), and why the others gave nothing."""

    tried: int = 0
    kept: int = 0
    not_applicable: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    categories: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        failed = sum(self.not_applicable.values()) + sum(self.rejected.values())
        return {"in": self.tried, "out": self.kept, "not_applicable": dict(sorted(self.not_applicable.items())),
                "rejected": dict(sorted(self.rejected.items())),
                "out_categories": dict(sorted(self.categories.items())), "consistent": self.tried == self.kept + failed}


class AugmentResult(BaseModel):
    out: Path
    stats: dict[str, dict[str, Any]]
    written: int
    seconds: float


def _failures(cand: Record, source: Record) -> list[str]:
    """Format stage: schemas, names, target against its tools, call shape, stated values kept."""
    out: list[str] = []
    names = [t.name for t in cand.tools]
    if not names:
        out.append("format/no_tools")
    if len(set(names)) != len(names):
        out.append("format/duplicate_tool")
    for t in cand.tools:
        try:
            check_schema(t.parameters, t.name)
        except ToolSchemaError:
            out.append("format/invalid_schema")
    calls = cand.ground_truth or []
    out += [f"{f.stage}/{f.code}" for f in format_failures(calls, cand.tools)]
    out += [f"{f.stage}/{f.code}" for f in style_failures(calls, category_style(cand.category))]
    if calls and not stated_values_kept(user_text(source), source.ground_truth or [], user_text(cand), calls):
        out.append("format/query_target_mismatch")
    return out


def stated_values_kept(old_query: str, old_calls: list[ToolCall], new_query: str, new_calls: list[ToolCall]) -> bool:
    """Every target value the old query stated, and the new target still has, the new query states:
    a rename or a swap in the query did not clobber another argument's text."""
    new = [v for c in new_calls for v, _, _ in leaves(c.arguments, None)]
    return all(occurs(new_query, v) for c in old_calls for v, _, _ in leaves(c.arguments, None)
               if v in new and occurs(old_query, v))


def _example_key(rec: Record) -> str:
    """The whole training example (prompt and target), for exact duplicates."""
    return normalize(json.dumps([rec.messages, [t.model_dump() for t in rec.tools], rec.target_content,
                                 [c.model_dump() for c in rec.ground_truth or []]], sort_keys=True))


class _Gate:
    """Contamination and duplicate checks over everything accepted so far, in a fixed order."""

    def __init__(self, data: Path, threshold: float, ngram: int):
        self.eval = eval_index(data, n=ngram)
        self.queries = DuplicateIndex(threshold=threshold)
        self.family: dict[str, frozenset[str]] = {}  # query-index id -> the sources it came from
        self.examples: set[str] = set()
        self.compositions: set[frozenset[str]] = set()

    def original(self, rec: Record) -> str | None:
        """Register an original record; why it is contaminated, or None."""
        text = question_text(rec.messages)
        why = self.eval.check([rec.id], text)
        if why is None:
            self.examples.add(_example_key(rec))
            if self.queries.check(rec.id, text)[0] == "unique":
                self.family[rec.id] = frozenset([rec.id])
        return why

    def reject(self, rec: Record, sources: list[str]) -> str | None:
        """Why `rec` may not join the output, or None (and it is admitted)."""
        text = user_text(rec)
        why = self.eval.check([rec.id, *sources], text)
        if why is not None:
            return "contamination/eval_overlap"
        key = _example_key(rec)
        if key in self.examples:
            return "duplicates/exact_example"
        group = frozenset(sources)
        if "compose" in (rec.transforms or []) and group in self.compositions:
            return "duplicates/same_sources"
        kind, other, _ = self.queries.check(rec.id, text, add=False)
        if kind != "unique" and not self.family[str(other)] & group:
            return f"duplicates/{kind}_query"
        if kind == "unique":
            self.queries.check(rec.id, text)
            self.family[rec.id] = group
        self.examples.add(key)
        if "compose" in (rec.transforms or []):
            self.compositions.add(group)
        return None


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("augment"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


def run_augment(opts: AugmentOptions, progress: bool = False) -> AugmentResult:
    """Augment DATA's train split into OUT; returns the per-transform stats."""
    start = time.perf_counter()
    opts.check()
    manifest = read_manifest(opts.data)
    train = read_records(opts.data, "train")
    gate = _Gate(opts.data, opts.dedup_threshold, opts.ngram)
    stats: dict[str, TransformStats] = {"original": TransformStats()}
    kept: list[Record] = []
    for rec in train:  # originals first: augmented records must not duplicate them
        stats["original"].tried += 1
        if gate.original(rec) is not None:
            stats["original"].rejected["contamination/eval_overlap"] += 1
            continue
        stats["original"].kept += 1
        stats["original"].categories[rec.category] += 1
        kept.append(rec)
    # single-turn questions only: a multi-turn conversation is kept as it is, never transformed
    sources = [r for r in kept if r.has_target and not r.label_errors and len(r.messages) == 1 and r.turns is None]
    pools = Pools.build(sources)
    fits = _token_budget(opts) if opts.max_length is not None else None
    stats.update({t: TransformStats() for t in opts.transforms})
    augmented: list[Record] = []
    counters: Counter = Counter()
    with _progress(progress) as bar:
        task = bar.add_task("augment", total=len(sources))
        for src in sources:
            order = list(opts.transforms)
            random.Random(f"{opts.seed}:{src.id}").shuffle(order)
            if "substitute" in order and copies_an_example(src):  # its first slot unlearns copying the example
                order.remove("substitute")
                order.insert(0, "substitute")
            used: set[str] = set()
            for slot in range(opts.multiplier):
                if len(used) == len(order):
                    used.clear()
                rng = random.Random(f"{opts.seed}:{src.id}:{slot}")
                for name in [t for t in order[slot % len(order):] + order[:slot % len(order)] if t not in used]:
                    used.add(name)
                    st = stats[name]
                    st.tried += 1
                    try:
                        cand = TRANSFORMS[name](src, pools, rng)
                        if fits is not None and not fits(cand):
                            raise NotApplicable("over_max_length")
                    except NotApplicable as exc:
                        st.not_applicable[str(exc)] += 1
                        continue
                    why = _admit(cand, src, name, gate, counters)
                    if why is None:
                        st.kept += 1
                        st.categories[cand.category] += 1
                        augmented.append(cand)
                    else:
                        st.rejected[why] += 1
                    break
            bar.advance(task)
    _write(opts, manifest, kept + augmented, stats)
    return AugmentResult(out=opts.out, stats={k: v.as_dict() for k, v in stats.items()},
                         written=len(kept) + len(augmented), seconds=round(time.perf_counter() - start, 2))


def _token_budget(opts: AugmentOptions) -> Callable[[Record], bool]:
    """Whether a record's training example (rendered by the wire format for `opts.model`) fits
    `opts.max_length` tokens, counted as training counts them (exact for the ground-truth targets
    augment writes; a teacher's label or `--tool-names safe` at export can change the count a little)."""
    from fcdistill.chat_format import ChatFormat
    from fcdistill.data.export import example_lengths, trl_record
    from fcdistill.models import ModelResolveError, ensure_fc_token, load_tokenizer

    try:
        tokenizer = load_tokenizer(opts.model)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("it has no chat template; the wire format needs one")
        ensure_fc_token(tokenizer, opts.fc_token)
        fmt = ChatFormat(tokenizer, fc_token=opts.fc_token)
    except (ModelResolveError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"--max-length counts tokens of {opts.model}, which failed: {first}") from None

    def fits(rec: Record) -> bool:
        return example_lengths(tokenizer, [trl_record(fmt, rec)])[0] <= opts.max_length

    return fits


def _admit(cand: Record, src: Record, transform: str, gate: _Gate, counters: Counter) -> str | None:
    """Name the candidate `<source>-aug-<transform>-<n>` and run its checks; the reason it fails, or None."""
    bad = _failures(cand, src)
    if bad:
        return bad[0]
    prefix = f"{src.id}-aug-{transform}"
    cand.id = f"{prefix}-{counters[prefix]}"
    why = gate.reject(cand, cand.source_ids or [])
    if why is None:
        counters[prefix] += 1
    return why


def _write(opts: AugmentOptions, manifest: dict[str, Any], records: list[Record],
           stats: dict[str, TransformStats]) -> None:
    """Every file whole (a temporary name, then a rename), manifest.json last: a directory with a
    manifest is complete, so a run killed anywhere is simply run again (stages look for the manifest)."""
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the completion marker goes first and comes back last
    tmp = out / "train.jsonl.tmp"
    _dump_jsonl(tmp, records)
    os.replace(tmp, out / "train.jsonl")
    for name in ("eval.jsonl", "test_case_ids_to_generate.json"):
        if (opts.data / name).is_file():
            shutil.copyfile(opts.data / name, out / f"{name}.tmp")
            os.replace(out / f"{name}.tmp", out / name)
    originals = set(manifest.get("splits", {}).get("train", []))
    kept_ids = {r.id for r in records}
    manifest = dict(manifest)
    manifest["splits"] = {**manifest.get("splits", {}), "train": [r.id for r in records]}
    manifest["mix_in"] = [r.id for r in records if r.label_source == "ground_truth"]
    manifest["augment"] = {
        "options": {"seed": opts.seed, "multiplier": opts.multiplier, "transforms": opts.transforms,
                    "dedup_threshold": opts.dedup_threshold, "ngram": opts.ngram,
                    **({"max_length": opts.max_length, "model": opts.model, "fc_token": opts.fc_token}
                       if opts.max_length is not None else {})},
        "source_files": {name: _sha256(opts.data / name) for name in ("manifest.json", "train.jsonl", "eval.jsonl")
                         if (opts.data / name).is_file()},
        "dropped_originals": sorted(originals - kept_ids),
        "counts": {k: v.kept for k, v in stats.items()},
    }
    write_json_atomic(out / STATS_FILE, {k: v.as_dict() for k, v in stats.items()})
    write_json_atomic(out / "manifest.json", manifest)


def stats_table(stats: dict[str, dict[str, Any]]) -> Any:
    """A rich table: per transform, in / out / not applicable / rejected, with the main reasons."""
    from rich.table import Table

    table = Table(title="fcd data augment", title_justify="left")
    for col in ("transform", "in", "out", "n/a", "rejected", "reasons (n/a; rejected)"):
        table.add_column(col, justify="left" if col in ("transform", "reasons (n/a; rejected)") else "right")
    for name, s in stats.items():
        na, rej = sum(s["not_applicable"].values()), sum(s["rejected"].values())
        reasons = "; ".join(filter(None, [", ".join(f"{k} {v}" for k, v in s["not_applicable"].items()),
                                          ", ".join(f"{k} {v}" for k, v in s["rejected"].items())]))
        table.add_row(name, str(s["in"]), str(s["out"]), str(na), str(rej), reasons)
    return table
