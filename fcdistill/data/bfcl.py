"""BFCL v4 data from the installed bfcl_eval: records with canonical targets, seeded splits, a manifest.

Every record carries the question (as chat messages), its tools normalized to JSON Schema, and a
target where one is known: canonical calls from the possible answers (first acceptable value per
parameter; an optional parameter is omitted, or with `optional_args="given"` filled with the first
value its answer lists, or with `"stated"` only where the question says that value), a plain-text
answer for irrelevance items, none for
relevance items. Live categories are eval-only by default: they are the out-of-distribution check.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from fcdistill.bfcl_env import bfcl_data_dir, bfcl_version, with_language_hint
from fcdistill.data.dedup import EvalIndex, normalize, question_text
from fcdistill.tools import ToolCall, ToolSpec, call_errors, normalize_tools

SINGLE_TURN_CATEGORIES = (
    "simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
    "irrelevance", "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
    "live_irrelevance", "live_relevance",
)
NO_CALL_CATEGORIES = ("irrelevance", "live_irrelevance")  # correct answer: no call
MULTI_TURN_CATEGORIES = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
KNOWN_CATEGORIES = (*SINGLE_TURN_CATEGORIES, *MULTI_TURN_CATEGORIES)
RELEVANCE_CATEGORIES = ("live_relevance",)  # correct answer: any call; no ground truth
IRRELEVANT_ANSWER = "None of the available functions can be used to answer this request."
# Multi-turn targets: BFCL's ground truth holds each turn's calls, not the words that close the turn.
TURN_DONE = "Done."
TURN_CANNOT = "I can't do that with the functions and details I have; tell me what is missing."


class DataError(ValueError):
    """Bad data-stage input; the CLI prints it as one line and exits 2."""


def category_language(category: str) -> str:
    return "java" if category.endswith("_java") else "javascript" if category.endswith("_javascript") else "python"


OptionalArgs = Literal["omit", "given", "stated"]


class SplitOptions(BaseModel):
    categories: list[str]
    eval_only: list[str] = Field(default_factory=list)
    live_eval_only: bool = True
    eval_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    mix_in_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_per_category: dict[str, int] = Field(default_factory=dict)
    # eval items of a category in place of eval_fraction: the first N of its seeded order, so the eval
    # set stays the same items whether the rest trains (live_eval_only false) or not, and whatever cap
    # at or above N; the rest trains unless the category is eval-only
    eval_per_category: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    seed: int = 42
    # optional parameters in the canonical targets: "omit" every one BFCL's answer lets go unsaid, or
    # "given": keep the value the answer lists (`["km/h", ""]` -> km/h), omitting only those it
    # gives no value (`[""]`). bfcl's checker accepts the target either way where BFCL's answer is
    # consistent with its schema; "given" also keeps required parameters BFCL lists with `""`.
    # "stated": keep the listed value only where the question says it (a word-bounded string or
    # number in the user text), so the student learns to fill what it was told and not to invent
    # defaults ("all", "metric", 2023) that BFCL's answer may not list; required ones stay as given.
    optional_args: OptionalArgs = "omit"

    def check(self) -> None:
        if not self.categories:
            raise DataError("no categories given")
        named = [*self.categories, *self.eval_only, *self.max_per_category, *self.eval_per_category]
        for c in named:
            if c not in KNOWN_CATEGORIES:
                raise DataError(f"unknown BFCL category {c!r}; known: {', '.join(KNOWN_CATEGORIES)}")

    def is_eval_only(self, category: str) -> bool:
        return category in self.eval_only or (self.live_eval_only and category.startswith("live_")) \
            or category in RELEVANCE_CATEGORIES


class Record(BaseModel):
    """One BFCL question as every later stage sees it."""

    id: str
    category: str
    split: str
    messages: list[dict[str, Any]]
    tools: list[ToolSpec]
    ground_truth: list[ToolCall] | None = None  # canonical calls; None: no call is correct / unknown
    target_content: str | None = None  # plain-text target (irrelevance)
    label_source: str | None = None  # ground_truth (mix-in) | teacher (awaits labels) | teacher_labeled | synthetic | None
    possible_answer: list[dict[str, Any]] | None = None  # BFCL's raw possible answer, for scoring
    label_errors: list[str] = Field(default_factory=list)  # ground truth that fails its own schema
    # `fcd data augment`: the train records this one was made from, and the transforms applied in order
    # (None on BFCL's own records, so files written before augmentation read and write unchanged)
    source_ids: list[str] | None = None
    transforms: list[str] | None = None
    # BFCL multi-turn: every turn's user messages (`messages` holds the first); None on single-turn records
    turns: list[list[dict[str, Any]]] | None = None
    # ... and the target: each turn as OpenAI messages (its user messages, then one assistant call a step
    # with the tool result bfcl's backends return, then a closing text), replayed from the ground truth;
    # the tools a turn adds (miss_func's held-back functions), by turn index
    conversation: list[list[dict[str, Any]]] | None = None
    added_tools: dict[str, list[ToolSpec]] | None = None

    @property
    def user_text(self) -> str:
        """Every user message of the record, what contamination checks compare."""
        return question_text([m for turn in self.turns for m in turn] if self.turns else self.messages)

    @property
    def has_target(self) -> bool:
        return self.ground_truth is not None or self.target_content is not None or self.conversation is not None


def stated_in(value: Any, question: str) -> bool:
    """Whether the question says this value: a string or number as a whole word (case-insensitive;
    `10000` also as `10,000`, `5.0` also as `5`), a non-empty list whose every item is said. A boolean,
    an object or None is never said in so many words."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, list):
        return bool(value) and all(stated_in(v, question) for v in value)
    if isinstance(value, str):
        text = value.strip().lower()
        return bool(text) and re.search(rf"(?<!\w){re.escape(text)}(?!\w)", question.lower()) is not None
    if isinstance(value, (int, float)):
        forms = {str(value), f"{value:,}"}
        if isinstance(value, float) and value.is_integer():
            forms |= {str(int(value)), f"{int(value):,}"}
        # not a piece of a longer figure: 10 is not said by "10,000" or "1.10", nor 5 by "2.5"
        return any(re.search(rf"(?<![\w.])(?<!\d,){re.escape(f)}(?!\w|[.,]\d)", question) for f in forms)
    return False


def canonical_value(value: Any, optional: OptionalArgs = "omit", question: str = "",
                    required: frozenset[str] = frozenset()) -> Any:
    """A possible-answer value with nested option lists reduced to their first acceptable choice.

    An optional parameter (`""` among its options) is omitted, unless `optional` keeps a value its
    options list other than `None` (BFCL's "the default"): "given" keeps the first such value,
    "stated" the first one `question` says (any, for a parameter in `required`: the schema wants it)."""
    if isinstance(value, dict):
        out = {}
        for k, options in value.items():
            if isinstance(options, list):
                given = [o for o in options if o != "" and o is not None] if optional != "omit" else []
                if optional == "stated" and k not in required:
                    given = [o for o in given if stated_in(o, question)]
                if given:
                    out[k] = canonical_value(given[0], optional, question)
                elif options and "" not in options:
                    out[k] = canonical_value(options[0], optional, question)
                # else optional: omitted
            else:
                out[k] = canonical_value(options, optional, question)
        return out
    if isinstance(value, list):
        return [canonical_value(v, optional, question) for v in value]
    return value


_JAVA_LITERAL_SUFFIX = {"long": "L", "float": "f"}  # BFCL's Java checker reads `1500L`, `2.5f`


def _source_string(value: Any, java_type: str | None = None) -> Any:
    """A Java/JavaScript argument as BFCL's checker reads it: source text in a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value}{_JAVA_LITERAL_SUFFIX.get(java_type or '', '')}"
    return value


def canonical_calls(ground_truth: list[dict[str, Any]], language: str = "python",
                    functions: list[dict[str, Any]] | None = None, optional: OptionalArgs = "omit",
                    question: str = "") -> list[ToolCall]:
    """BFCL ground truth (`[{fn: {param: [acceptable...]}}]`) -> canonical ToolCalls.

    `functions` (BFCL's own docs) give Java parameter types, which decide literal suffixes, and the
    parameters each requires; `optional` and `question` decide optional parameters (see canonical_value)."""
    types = {f["name"]: {k: v.get("type") for k, v in (f.get("parameters") or {}).get("properties", {}).items()}
             for f in functions or []}
    required = {f["name"]: frozenset((f.get("parameters") or {}).get("required") or []) for f in functions or []}
    calls = []
    for entry in ground_truth:
        for name, params in entry.items():
            args = canonical_value(params, optional, question, required.get(name, frozenset()))
            if language != "python":
                java = types.get(name, {}) if language == "java" else {}
                args = {k: _source_string(v, java.get(k)) for k, v in args.items()}
            calls.append(ToolCall(name=name, arguments=args))
    return calls


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _multi_turn_target(entry: dict[str, Any], answer: list[list[str]], category: str,
                       tools: list[ToolSpec]) -> tuple[list[list[dict[str, Any]]], list[str]]:
    """The ground truth replayed against bfcl's backends as the conversation a model should have had,
    and the calls that fail their schema (label errors)."""
    from fcdistill.bfcl_backends import Backends, is_long_context, turn_start

    backends = Backends(entry["involved_classes"], entry.get("initial_config") or {}, is_long_context(category))
    tools = list(tools)
    turns, errors = [], []
    for t in range(len(entry["question"])):
        added, messages = turn_start(entry, t)
        tools += normalize_tools(added)
        calls = answer[t] if t < len(answer) else []
        for k, text in enumerate(calls):
            try:
                name, arguments = backends.named_call(text)
            except ValueError as exc:
                errors.append(str(exc))
                continue
            call = ToolCall(name=name, arguments=arguments)
            errors += call_errors(call, tools)
            call_id = f"call_{t}_{k}"
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]})
            messages.append({"role": "tool", "tool_call_id": call_id, "name": name,
                             "content": backends.call(name, kwargs=arguments)})
        messages.append({"role": "assistant", "content": TURN_DONE if calls else TURN_CANNOT})
        turns.append(messages)
    return turns, errors


def _multi_turn_records(category: str) -> list[Record]:
    """Multi-turn entries as records: the tools shown at the start (bfcl's loader, language hint
    included), every turn's user messages, and the ground truth replayed as the target conversation."""
    from fcdistill.bfcl_env import multi_turn_entries, multi_turn_ground_truth

    answers = multi_turn_ground_truth(category)
    records = []
    for e in multi_turn_entries(category).values():
        tools = normalize_tools(e["function"])
        conversation, errors = _multi_turn_target(e, answers[e["id"]], category, tools)
        added = {t: normalize_tools(docs) for t, docs in (e.get("missed_function") or {}).items()}
        records.append(Record(id=e["id"], category=category, split="", messages=e["question"][0] if e["question"] else [],
                              tools=tools, turns=e["question"], conversation=conversation, added_tools=added or None,
                              label_errors=errors))
    return records


def load_category(category: str, optional_args: OptionalArgs = "omit") -> tuple[list[Record], dict[str, str]]:
    """All records of one category (split unset) and the hashes of the files read; `optional_args`
    as in SplitOptions."""
    data_dir = bfcl_data_dir()
    qpath = data_dir / f"BFCL_v4_{category}.json"
    if not qpath.is_file():
        raise DataError(f"bfcl_eval has no data file for {category!r} ({qpath})")
    hashes = {qpath.name: _sha256(qpath)}
    if category in MULTI_TURN_CATEGORIES:
        apath = data_dir / "possible_answer" / qpath.name
        hashes[f"possible_answer/{apath.name}"] = _sha256(apath)
        return _multi_turn_records(category), hashes
    answers: dict[str, Any] = {}
    apath = data_dir / "possible_answer" / qpath.name
    if apath.is_file():
        hashes[f"possible_answer/{apath.name}"] = _sha256(apath)
        answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(apath)}
    language = category_language(category)
    records = []
    for item in _read_jsonl(qpath):
        turns = item["question"]
        messages = turns[0] if turns and isinstance(turns[0], list) else turns
        # descriptions as evaluation shows them (bfcl_eval's language hint), so that training and
        # serving render the same prompt for the same question
        shown = {f["name"]: f.get("description", "") for f in with_language_hint(item["id"], item.get("function", []))}
        tools = [t.model_copy(update={"description": shown.get(t.name, t.description)})
                 for t in normalize_tools(item.get("function", []), language)]
        rec = Record(id=item["id"], category=category, split="", messages=messages, tools=tools)
        if category in NO_CALL_CATEGORIES:
            rec.target_content = IRRELEVANT_ANSWER
            rec.label_source = "ground_truth"
        elif item["id"] in answers:
            rec.possible_answer = answers[item["id"]]
            rec.ground_truth = canonical_calls(rec.possible_answer, language, item.get("function"),
                                               optional_args, question_text(messages))
            rec.label_errors = [e for c in rec.ground_truth for e in call_errors(c, tools)]
        records.append(rec)
    return records, hashes


class PrepareResult(BaseModel):
    out: Path
    counts: dict[str, dict[str, int]]
    warnings: list[str] = Field(default_factory=list)  # options that did nothing, or left the mix-in empty

    def summary(self) -> str:
        lines = [f"{'category':<24}{'train':>7}{'mix-in':>8}{'eval':>7}{'dropped':>9}"]
        for cat, c in self.counts.items():
            lines.append(f"{cat:<24}{c['train']:>7}{c['mix_in']:>8}{c['eval']:>7}{c['dropped_eval_overlap']:>9}")
        lines.append("dropped: train questions that repeat an eval question (BFCL reuses questions across categories)")
        lines.append(f"wrote {self.out}/manifest.json, train.jsonl, eval.jsonl, test_case_ids_to_generate.json")
        return "\n".join(lines)


def _dump_jsonl(path: Path, rows: list[BaseModel]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.model_dump(mode="json", exclude_none=True), ensure_ascii=False, sort_keys=True) + "\n")


def _drop_eval_overlap(train: list[Record], evals: list[Record]) -> tuple[list[Record], list[Record]]:
    """Train records whose question is an eval question or shares a 13-word span with one, left out.

    BFCL repeats questions across categories (many `multiple` items ask a `simple_python` question
    with more tools), so a per-category split would train on held-out questions. The rule is the
    one every later stage applies to new data (data/dedup.py's contamination check).
    """
    index = EvalIndex({r.id for r in evals}, {r.id: r.user_text for r in evals})
    same = {normalize(r.user_text) for r in evals}  # short questions too: no 13-word span
    kept, dropped = [], []
    for r in train:
        text = r.user_text
        (dropped if normalize(text) in same or index.check([r.id], text) else kept).append(r)
    return kept, dropped


def prepare_bfcl(opts: SplitOptions, out: Path) -> PrepareResult:
    """Read, split (seeded, stratified by category), choose the mix-in, and write everything to `out`."""
    opts.check()
    version = bfcl_version()
    train: list[Record] = []
    evals: list[Record] = []
    hashes: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for category in dict.fromkeys([*opts.categories, *opts.eval_only]):
        records, h = load_category(category, opts.optional_args)
        hashes.update(h)
        records.sort(key=lambda r: r.id)
        rng = random.Random(f"{opts.seed}:{category}")
        rng.shuffle(records)
        if category in opts.max_per_category:
            records = records[: opts.max_per_category[category]]
        if category in opts.eval_per_category:
            n_eval = opts.eval_per_category[category]
        else:
            n_eval = len(records) if opts.is_eval_only(category) else round(len(records) * opts.eval_fraction)
        cat_eval, cat_train = records[:n_eval], records[n_eval:]
        if opts.is_eval_only(category):
            cat_train = []
        n_mix = round(len(cat_train) * opts.mix_in_fraction)
        for i, rec in enumerate(cat_train):
            rec.split = "train"
            if rec.label_source is None and rec.has_target:
                rec.label_source = "ground_truth" if i < n_mix else "teacher"
            elif rec.label_source == "ground_truth" and i >= n_mix:
                rec.label_source = "teacher"  # irrelevance outside the mix-in is teacher-labeled too
        for rec in cat_eval:
            rec.split = "eval"
            rec.label_source = None
        counts[category] = {"train": len(cat_train), "eval": len(cat_eval)}
        train += sorted(cat_train, key=lambda r: r.id)
        evals += sorted(cat_eval, key=lambda r: r.id)
    train, overlapping = _drop_eval_overlap(train, evals)
    for category, c in counts.items():
        c["dropped_eval_overlap"] = sum(1 for r in overlapping if r.category == category)
        c["train"] -= c["dropped_eval_overlap"]
        c["mix_in"] = sum(1 for r in train if r.category == category and r.label_source == "ground_truth")

    warnings = _split_warnings(opts, counts)
    out.mkdir(parents=True, exist_ok=True)
    _dump_jsonl(out / "train.jsonl", train)
    _dump_jsonl(out / "eval.jsonl", evals)
    eval_ids: dict[str, list[str]] = {}
    for r in evals:
        eval_ids.setdefault(r.category, []).append(r.id)
    (out / "test_case_ids_to_generate.json").write_text(json.dumps(eval_ids, indent=2, sort_keys=True) + "\n")
    manifest = {
        "bfcl_eval_version": version,
        "seed": opts.seed,
        "options": opts.model_dump(),
        "source_files": dict(sorted(hashes.items())),
        "counts": counts,
        "splits": {"train": [r.id for r in train], "eval": [r.id for r in evals]},
        "mix_in": [r.id for r in train if r.label_source == "ground_truth"],
        "dropped_eval_overlap": [r.id for r in overlapping],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return PrepareResult(out=out, counts=counts, warnings=warnings)


def _split_warnings(opts: SplitOptions, counts: dict[str, dict[str, int]]) -> list[str]:
    """What the options asked for but the split did not do: caps of categories that are not read, and
    a mix-in that rounds to nothing (then `fcd label` has no ground truth to score the teacher on)."""
    out = []
    read = {*opts.categories, *opts.eval_only}
    for flag, given in (("--max-per-category", opts.max_per_category), ("--eval-per-category", opts.eval_per_category)):
        ignored = [f"{c}={n}" for c, n in given.items() if c not in read]
        if ignored:
            out.append(f"{flag} {','.join(ignored)} ignored: not in --categories or --eval-only")
    short = [f"{c} ({v['eval']} of {n})" for c, n in opts.eval_per_category.items() if (v := counts.get(c)) and v["eval"] < n]
    if short:
        out.append(f"--eval-per-category asks for more eval items than there are: {', '.join(short)}")
    capped = [f"{c}={n}" for c, n in opts.eval_per_category.items() if c in read and opts.is_eval_only(c)]
    if capped:
        out.append(f"--eval-per-category {','.join(capped)}: eval-only categories, so the items past the count are "
                   "dropped, not trained on (--no-live-eval-only trains on live ones)")
    trained = {c: v for c, v in counts.items() if v["train"] > 0}
    empty = [f"{c} ({v['train']} train x {opts.mix_in_fraction:g})" for c, v in trained.items() if v["mix_in"] == 0]
    if trained and len(empty) == len(trained):
        out.append(f"the mix-in is empty: {opts.mix_in_fraction:g} of each category's train items rounds to 0 "
                   f"({', '.join(empty)}), so `fcd label` has no ground-truth items to score the teacher on; "
                   "raise --mix-in or the --max-per-category caps")
    elif empty:
        out.append(f"the mix-in of {', '.join(empty)} rounds to 0 items: `fcd label` cannot score the teacher "
                   "on these categories; raise --mix-in or their caps")
    return out


def read_records(data_dir: Path, split: str) -> list[Record]:
    """Records of one split written by prepare_bfcl."""
    if split not in ("train", "eval"):
        raise DataError(f"unknown split {split!r}; choose train or eval")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: run `fcd data bfcl --out {data_dir}` first")
    return [Record.model_validate(row) for row in _read_jsonl(path)]


def read_manifest(data_dir: Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run `fcd data bfcl --out {data_dir}` first")
    return json.loads(path.read_text())


def eval_index(data_dir: Path, n: int = 13, min_words: int = 8) -> EvalIndex:
    """What a data dir's eval split holds, for contamination checks: ids from the manifest, questions
    (user turns) from eval.jsonl."""
    ids = set(read_manifest(data_dir).get("splits", {}).get("eval", []))
    path = Path(data_dir) / "eval.jsonl"
    rows = _read_jsonl(path) if path.is_file() else []
    texts = {r["id"]: question_text([m for turn in r.get("turns") or [r.get("messages", [])] for m in turn]) for r in rows}
    return EvalIndex(ids, texts, n=n, min_words=min_words)
