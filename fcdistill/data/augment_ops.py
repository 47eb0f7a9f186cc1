"""The label-preserving transforms of `fcd data augment`, one function each: record in, record out.

Each takes a train record with a usable target, the pools built from the whole train split, and a
seeded RNG, and returns a new record (id and checks are the caller's), or raises NotApplicable with a
reason code when the record offers nothing to transform (no value stated in the query, one tool only).
Distractor tools are drawn from other train records and must be unrelated to the request: a tool
sharing a name word or two description words with the query (or with the tools it calls) could
serve it, which would make the target wrong.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from fcdistill.data.augment_names import (function_map, param_map, property_names, rename_in_text,
                                          rename_schema, rename_value)
from fcdistill.data.augment_values import Slot, find_slots, leaves, replace_values, replacement, rewrite
from fcdistill.data.bfcl import IRRELEVANT_ANSWER, Record, category_language
from fcdistill.tools import ToolCall, ToolSpec

MAX_TOOLS = 6  # tools in one augmented prompt: prompt length is the main training cost on CPU
MAX_CALLS = 6  # calls in one composed target
_STOP = frozenset("""the and for with from that this into given based using specified specific provide
provides information details data value values number type list name names function parameter parameters
return returns default optional required whether which their about other each more than over when
what where also only such used uses user users string integer array object boolean float""".split())
_GENERIC_NAME = frozenset("get find calcul comput retrie fetch search create update check info detail".split())
_STARTERS = frozenset("find calculate compute get what how can could please tell give show list search "
                      "retrieve determine book fetch convert estimate check look identify provide".split())


class NotApplicable(Exception):
    """The transform has nothing to work on in this record; `args[0]` is the reason code."""


# BFCL's language hint, which every description carries: it relates no tool to a request
_LANGUAGE_HINT = re.compile(r"Note that the provided function is in [\w .]+? syntax\.")


def stems(text: str) -> frozenset[str]:
    """Content-word stems (6-letter prefixes) of text and identifiers, for a cheap relatedness test."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", _LANGUAGE_HINT.sub(" ", text)).replace("_", " ").replace(".", " ")
    return frozenset(w[:6] for w in re.findall(r"[a-z]+", spaced.lower()) if len(w) >= 4 and w not in _STOP)


def user_text(rec: Record) -> str:
    """The request: the one user message (BFCL single-turn items have exactly one)."""
    users = [m for m in rec.messages if m.get("role") == "user"]
    if len(rec.messages) != 1 or len(users) != 1 or not isinstance(users[0].get("content"), str):
        raise NotApplicable("not_single_user_turn")
    return users[0]["content"]


def language(rec: Record) -> str:
    return category_language(rec.category)


def shape_category(lang: str, source_category: str, calls: list[ToolCall] | None, n_tools: int) -> str:
    """The BFCL category a python record now has by its shape (java/javascript keep theirs: the
    category carries the language, and these transforms keep their one-call shape)."""
    if lang != "python":
        return source_category
    if calls is None:
        return "irrelevance"
    if len(calls) >= 2:
        return "parallel" if len({c.name for c in calls}) == 1 else "parallel_multiple"
    return "simple_python" if n_tools == 1 else "multiple"


def derived(sources: list[Record], transforms: list[str], text: str, tools: list[ToolSpec],
            calls: list[ToolCall] | None) -> Record:
    """A new train record from `sources`: mix-in only when every source is, so `--labels labeled`
    never trains on BFCL answers the teacher was meant to replace."""
    lang = language(sources[0])
    mixin = all(s.label_source == "ground_truth" for s in sources)
    return Record(id="", category=shape_category(lang, sources[0].category, calls, len(tools)), split="train",
                  messages=[{"role": "user", "content": text}], tools=tools, ground_truth=calls,
                  target_content=IRRELEVANT_ANSWER if calls is None else None,
                  label_source="ground_truth" if mixin else "teacher",
                  source_ids=list(dict.fromkeys(s.id for s in sources)), transforms=transforms)


def _spec_key(tool: ToolSpec) -> str:
    return json.dumps(tool.model_dump(), sort_keys=True)


@dataclass
class Pools:
    """What transforms draw from: the train split's tools, callers, tool groups and literal values."""

    tools: dict[str, list[tuple[ToolSpec, frozenset[str], frozenset[str]]]] = field(default_factory=dict)
    callers: dict[str, list[Record]] = field(default_factory=dict)
    same_tool: dict[str, list[Record]] = field(default_factory=dict)
    strings: dict[tuple[str, str], list[tuple[str, frozenset[str]]]] = field(default_factory=dict)

    @classmethod
    def build(cls, sources: list[Record]) -> Pools:
        """Pools of the usable train records. Distractors: one tool per name and language (the first by
        record id: names recur with different schemas)."""
        pools = cls()
        seen: set[tuple[str, str]] = set()
        strings: dict[tuple[str, str], set[tuple[str, frozenset[str]]]] = {}
        for rec in sorted(sources, key=lambda r: r.id):
            lang = language(rec)
            for t in rec.tools:
                if (lang, t.name) not in seen:
                    seen.add((lang, t.name))
                    pools.tools.setdefault(lang, []).append((t, stems(t.name), stems(f"{t.name} {t.description}")))
            if not rec.ground_truth or len(rec.messages) != 1:
                continue
            pools.callers.setdefault(lang, []).append(rec)
            names = {c.name for c in rec.ground_truth}
            if len(names) == 1:
                spec = next(t for t in rec.tools if t.name in names)
                pools.same_tool.setdefault(_spec_key(spec), []).append(rec)
            query = rec.messages[0].get("content") or ""
            specs = {t.name: t.parameters for t in rec.tools}
            for c in rec.ground_truth:
                for value, schema, param in leaves(c.arguments, specs.get(c.name)):
                    if isinstance(value, str) and len(value) >= 2 and not schema.get("enum") and value in query:
                        strings.setdefault((lang, param), set()).add((value, stems(schema.get("description", ""))))
        pools.strings = {k: sorted(v, key=lambda e: (e[0], sorted(e[1]))) for k, v in strings.items()}
        return pools

    def literals(self, lang: str, param: str, schema: dict[str, Any]) -> list[str]:
        """Values other records gave a parameter of this name and a similar description (stem Jaccard
        >= 0.3): a `type` of window is not a `type` of area, a `unit` of mass is not one of length."""
        mine = stems(schema.get("description", ""))
        return list(dict.fromkeys(v for v, theirs in self.strings.get((lang, param), [])
                                  if len(mine & theirs) >= 0.3 * max(1, len(mine | theirs))))

    def distractors(self, lang: str, present: set[str], context: frozenset[str], k: int,
                    rng: random.Random) -> list[ToolSpec]:
        """`k` tools of the language, none named like a present one, none related to the context."""
        options = [t for t, name_stems, all_stems in self.tools.get(lang, [])
                   if t.name not in present and not (name_stems - _GENERIC_NAME) & context
                   and len(all_stems & context) < 2]
        if len(options) < k:
            raise NotApplicable("no_unrelated_tool")
        return rng.sample(options, k)


def _context(text: str, tools: list[ToolSpec]) -> frozenset[str]:
    return stems(" ".join([text, *(f"{t.name} {t.description}" for t in tools)]))


def _called(rec: Record) -> list[ToolSpec]:
    names = {c.name for c in rec.ground_truth or []}
    return [t for t in rec.tools if t.name in names]


# -- the transforms ----------------------------------------------------------------------------------
def mask(rec: Record, pools: Pools, rng: random.Random) -> Record:
    """Function and parameter names replaced in tools, target and (where it quotes them) the query;
    a name the target also passes as a value (`task=task`) stays in the query, as the value does."""
    text = user_text(rec)
    fnames = [t.name for t in rec.tools]
    pnames = [n for t in rec.tools for n in property_names(t.parameters)]
    taken = set(fnames) | set(pnames)
    camel = language(rec) != "python"
    fmap = function_map(fnames, rng, taken, camel)
    pmap = param_map(pnames, rng, taken, camel)
    schemas = {t.name: t.parameters for t in rec.tools}
    tools = [ToolSpec(name=fmap[t.name], description=t.description, parameters=rename_schema(t.parameters, pmap))
             for t in rec.tools]
    calls = None if rec.ground_truth is None else [
        ToolCall(name=fmap[c.name], arguments=rename_value(c.arguments, schemas[c.name], pmap))
        for c in rec.ground_truth]
    values = {v for c in rec.ground_truth or [] for v, _, _ in leaves(c.arguments, None) if isinstance(v, str)}
    quoted = {k: v for k, v in {**pmap, **fmap}.items() if k not in values}
    return derived([rec], ["mask"], rename_in_text(text, quoted), tools, calls)


def shuffle(rec: Record, pools: Pools, rng: random.Random) -> Record:
    """The same tools in another order: the position of the right tool carries no signal."""
    if len(rec.tools) < 2:
        raise NotApplicable("one_tool")
    order = list(range(len(rec.tools)))
    while order == sorted(order):
        rng.shuffle(order)
    return derived([rec], ["shuffle"], user_text(rec), [rec.tools[i] for i in order], rec.ground_truth)


def distract(rec: Record, pools: Pools, rng: random.Random) -> Record:
    """One to three unrelated tools from other train records, at random positions."""
    text = user_text(rec)
    room = min(3, MAX_TOOLS - len(rec.tools))
    if room < 1:
        raise NotApplicable("max_tools")
    extra = pools.distractors(language(rec), {t.name for t in rec.tools}, _context(text, _called(rec)),
                              rng.randint(1, room), rng)
    tools = list(rec.tools)
    for t in extra:
        tools.insert(rng.randint(0, len(tools)), t)
    return derived([rec], ["distract"], text, tools, rec.ground_truth)


def delete(rec: Record, pools: Pools, rng: random.Random) -> Record:
    """Irrelevance: the called tools removed, the others kept (BFCL's own near-miss tools where the
    item had them, else unrelated distractors); the target becomes the no-call text answer."""
    text = user_text(rec)
    if not rec.ground_truth:
        raise NotApplicable("no_call")
    if language(rec) != "python":
        raise NotApplicable("not_python")
    called = {c.name for c in rec.ground_truth}
    tools = [t for t in rec.tools if t.name not in called]
    steps = ["delete"]
    if not tools:
        tools = pools.distractors("python", {t.name for t in rec.tools}, _context(text, rec.tools),
                                  rng.randint(1, 2), rng)
        steps.append("distract")
    return derived([rec], steps, text, tools, None)


def _in_description(slot: Slot) -> bool:
    """The value is the example its parameter's description gives ("The city, e.g. San Francisco, CA")."""
    return slot.kind == "string" and slot.text.lower() in str(slot.schema.get("description") or "").lower()


def copies_an_example(rec: Record) -> bool:
    """The target repeats a string its parameter's description gives as an example, and the query
    states it too. BFCL's train targets do that for 3 of 4 string arguments whose description has an
    example, which teaches a small student to copy examples instead of reading the request (seen:
    `San Francisco, CA` asked for Mariposa); `fcd data augment` substitutes these values first."""
    if not rec.ground_truth:
        return False
    schemas = {t.name: t.parameters for t in rec.tools}
    return any(_in_description(slot) for slot in find_slots(
        user_text(rec), [leaf for c in rec.ground_truth for leaf in leaves(c.arguments, schemas.get(c.name))]))


def substitute(rec: Record, pools: Pools, rng: random.Random) -> Record:
    """One or two values the query states verbatim, swapped in query and target alike; a value that is
    also its description's example goes first."""
    text = user_text(rec)
    if not rec.ground_truth:
        raise NotApplicable("no_call")
    schemas = {t.name: t.parameters for t in rec.tools}
    slots = find_slots(text, [leaf for c in rec.ground_truth for leaf in leaves(c.arguments, schemas.get(c.name))])
    if not slots:
        raise NotApplicable("no_value_in_query")
    rng.shuffle(slots)
    slots.sort(key=lambda slot: not _in_description(slot))  # stable: the seeded order otherwise
    want = rng.randint(1, min(2, len(slots)))
    swaps: dict[str, Any] = {}
    edits: list[tuple[tuple[int, int], str]] = []
    for slot in slots:
        new = replacement(slot, text, pools.literals(language(rec), slot.param, slot.schema), rng)
        if new is not None and new[1] not in [e[1] for e in edits]:
            swaps[slot.text] = new[0]
            edits.append((slot.span, new[1]))
        if len(swaps) == want:
            break
    if not swaps:
        raise NotApplicable("no_replacement_value")
    calls = [ToolCall(name=c.name, arguments=replace_values(c.arguments, swaps)) for c in rec.ground_truth]
    return derived([rec], ["substitute"], rewrite(text, edits), list(rec.tools), calls)


def _join(texts: list[str], rng: random.Random) -> str:
    """Requests joined as one message, the way users chain asks ("... Also, find ...")."""
    texts = [t.strip() for t in texts]
    texts = [t[1:-1].strip() if len(t) > 2 and t[0] == t[-1] and t[0] in "\"'" and t.count(t[0]) == 2 else t
             for t in texts]  # BFCL wraps some requests in quotes; inside one message they would read oddly
    out = texts[0]
    for t in texts[1:]:
        out = out if out[-1:] in ".?!" else out + "."
        first = t.split(" ", 1)[0]
        lower = first.lower() in _STARTERS and first[:1].isupper() and first[1:].islower()
        joiner = rng.choice([" ", "\n"] + ([" Also, ", " Then ", " After that, "] if lower else []))
        out += joiner + (t[0].lower() + t[1:] if joiner.strip() else t)
    return out


def _merge_tools(parts: list[Record]) -> list[ToolSpec] | None:
    """All tools of the parts, each name once; None when one name has two different schemas."""
    tools: dict[str, ToolSpec] = {}
    for p in parts:
        for t in p.tools:
            if tools.setdefault(t.name, t) != t:
                return None
    return list(tools.values())


def _partners(rec: Record, pools: Pools, mode: str, rng: random.Random) -> list[Record]:
    """One or two other train requests: calling the anchor's one tool (parallel), or tools the
    anchor does not have (parallel_multiple)."""
    text = user_text(rec)
    if mode == "parallel":
        if len({c.name for c in rec.ground_truth or []}) != 1:
            raise NotApplicable("several_functions")
        tool = _called(rec)[0]
        group = [r for r in pools.same_tool.get(_spec_key(tool), []) if r.id != rec.id and user_text(r) != text]
    else:
        names = {t.name for t in rec.tools}
        group = [r for r in pools.callers.get("python", []) if not names & {t.name for t in r.tools}]
    rng.shuffle(group)
    want = rng.randint(1, 2)
    picked: list[Record] = []
    calls = list(rec.ground_truth or [])
    for r in group:
        if len(picked) == want:
            break
        merged = _merge_tools([rec, *picked, r])
        if merged is None or len(merged) > MAX_TOOLS or len(calls) + len(r.ground_truth or []) > MAX_CALLS \
                or any(c in calls for c in r.ground_truth or []):
            continue
        if mode == "parallel_multiple" and any({t.name for t in r.tools} & {t.name for t in p.tools} for p in picked):
            continue
        picked.append(r)
        calls += r.ground_truth or []
    if not picked and mode == "parallel" and 2 * len(calls) <= MAX_CALLS:
        picked = [substitute(rec, pools, rng)]  # no other request uses this tool: the same one, other values
    if not picked:
        raise NotApplicable("no_partner")
    return picked


def compose(rec: Record, pools: Pools, rng: random.Random) -> Record:
    """Two or three requests as one; the target is all their calls (parallel or parallel_multiple)."""
    if not rec.ground_truth:
        raise NotApplicable("no_call")
    if language(rec) != "python":
        raise NotApplicable("not_python")
    modes = ["parallel", "parallel_multiple"]
    rng.shuffle(modes)
    reasons = []
    for mode in modes:
        try:
            parts = [rec, *_partners(rec, pools, mode, rng)]
        except NotApplicable as exc:
            reasons.append(str(exc))
            continue
        tools = _merge_tools(parts)
        assert tools is not None  # _partners kept only parts whose tools merge
        rng.shuffle(tools)
        sources = [p for p in parts if p.id]  # a substituted copy of the anchor has no id of its own
        steps = ["compose"] if len(sources) == len(parts) else ["substitute", "compose"]
        return derived(sources, steps, _join([user_text(p) for p in parts], rng), tools,
                       [c for p in parts for c in p.ground_truth or []])
    raise NotApplicable("+".join(sorted(set(reasons))))


TRANSFORMS: dict[str, Callable[[Record, Pools, random.Random], Record]] = {
    "mask": mask, "shuffle": shuffle, "distract": distract, "compose": compose, "delete": delete,
    "substitute": substitute,
}
