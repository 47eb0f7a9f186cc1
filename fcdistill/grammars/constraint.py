"""Tools + tool_choice -> compiled outlines-core Index (cached), and the per-sequence state machine.

The call grammar is one JSON Schema, an array of `{"name": const, "arguments": <tool schema>}`
alternatives, turned into a regex by outlines-core and compiled into an Index over the student's
vocabulary. No whitespace between JSON tokens: the wire format renders calls compactly, a model
gets no room to loop on whitespace, and the regex compiles about a quarter faster than with `[ ]?`.

Every constrained answer closes within its token budget: the compiled grammar carries each state's
distance to a complete answer (`closing.CloseTable`), and a sequence given its max_tokens allows only
tokens after which the rest still fits (this token, the shortest way to close, end-of-turn). A value
the model loops in (`guard.ValueTracker`) is narrowed to tokens that close it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from fcdistill.grammars.closing import CloseTable, build_close_table
from fcdistill.grammars.guard import STRICT, LoopGuard, ValueTracker
from fcdistill.grammars.vocabulary import TokenVocabulary
from fcdistill.tools import ToolSpec

ToolChoice = Literal["none", "auto", "required"] | str  # any other string names a function
WHITESPACE = ""
# outlines-core's number has unbounded digits and exponent: `4e+836045` is valid JSON but overflows to
# inf, which no client can read back. Bounded, the largest number is about 1e115.
BOUNDED_NUMBER = r"((-)?(0|[1-9][0-9]{0,15}))(\.[0-9]{1,16})?([eE][+-]?[0-9]{1,2})?"
DEFAULT_CACHE_MB = 256.0  # compiled grammars kept (LRU); a small tool set's takes about 1 MB


class GrammarError(ValueError):
    """A request whose constraint cannot be built (absent tool named, schema outlines cannot compile)."""


@dataclass(frozen=True)
class CompiledGrammar:
    """What one (tokenizer, tools, mode) compiles to; shared by every request that asks for it."""

    mode: Literal["none", "auto", "forced", "json", "free"]
    index: Any  # outlines_core.Index for the calls (or JSON) part; None for none/free
    vocab: TokenVocabulary
    compile_ms: float
    table: CloseTable | None = None  # distances to a complete answer; None for none/free

    @property
    def min_tokens(self) -> int:
        """Completion tokens of the shortest complete constrained answer: FC (for calls), the shortest
        call list or JSON value, end-of-turn. 0 when nothing is constrained."""
        if self.table is None:
            return 0
        return self.table.start + (2 if self.mode in ("auto", "forced") else 1)


_cache: OrderedDict[tuple, tuple[CompiledGrammar, int]] = OrderedDict()  # key -> (grammar, approximate bytes)
_cache_limit = [int(DEFAULT_CACHE_MB * 2**20)]
_cache_lock = threading.Lock()
_compiling: dict[tuple[Any, ...], Future] = {}  # grammars being compiled now, by cache key
_stats = {"hits": 0, "misses": 0}


def grammar_cache_info() -> dict[str, int]:
    with _cache_lock:
        return {**_stats, "size": len(_cache), "bytes": sum(n for _, n in _cache.values()), "limit_bytes": _cache_limit[0]}


def set_grammar_cache_limit(megabytes: float) -> None:
    """Bound the compiled-grammar cache by memory (`fcd serve --grammar-cache-mb`); the least recently
    used grammars go first. The newest one always stays, however large."""
    with _cache_lock:
        _cache_limit[0] = int(megabytes * 2**20)
        _evict()


def _evict() -> None:
    total = sum(n for _, n in _cache.values())
    while len(_cache) > 1 and total > _cache_limit[0]:
        total -= _cache.popitem(last=False)[1][1]


def _approx_bytes(g: CompiledGrammar) -> int:
    """What a cached grammar holds in memory, roughly: its Index as serialized (every state's token
    transitions) and its close table (the token array plus a few dict entries a state)."""
    import pickle

    size = len(pickle.dumps(g.index)) if g.index is not None else 0
    if g.table is not None:
        size += g.table.tokens.nbytes + 200 * len(g.table.groups)
    return size + 1024


def calls_schema(tools: list[ToolSpec], only: str | None = None, parallel: bool = True) -> dict[str, Any]:
    """JSON Schema of the FC payload: a non-empty array of calls to the given tools."""
    chosen = [t for t in tools if only is None or t.name == only]
    alternatives = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                     "required": ["name", "arguments"]} for t in chosen]
    items = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel or only is not None:
        schema["maxItems"] = 1
    return schema


def compile_grammar(vocab: TokenVocabulary, tools: list[ToolSpec], tool_choice: ToolChoice = "auto",
                    parallel: bool = True, json_schema: dict[str, Any] | None = None) -> tuple[CompiledGrammar, bool]:
    """The constraint for one request, and whether it came from the cache."""
    if json_schema is not None:
        mode, schema = "json", json_schema
    elif not tools or tool_choice == "none":
        mode, schema = ("none" if tools else "free"), None
    else:
        names = {t.name for t in tools}
        if tool_choice in ("auto", "required"):
            only = None
        elif tool_choice in names:
            only = tool_choice
        else:
            raise GrammarError(f"tool_choice names function {tool_choice!r}, which is not among the tools")
        mode = "auto" if tool_choice == "auto" else "forced"
        schema = calls_schema(tools, only, parallel)
    if vocab.fc_id is None and mode in ("auto", "forced"):
        raise GrammarError("the model's tokenizer has no function-call token")
    key = (vocab.key, mode, json.dumps(schema, sort_keys=True) if schema is not None else "")
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return hit[0], True
        # one compile per new grammar: requests that bring it while it compiles wait for that one
        compiling = _compiling.get(key)
        if compiling is None:
            compiling = _compiling[key] = Future()
            owner = True
        else:
            owner = False
            _stats["hits"] += 1
    if not owner:
        return compiling.result(), True  # raises the compile's GrammarError too
    try:
        start = time.perf_counter()
        index = _compile_index(schema, vocab) if schema is not None else None
        table = build_close_table(index, vocab.eot_id) if index is not None else None
        compiled = CompiledGrammar(mode=mode, index=index, vocab=vocab, compile_ms=(time.perf_counter() - start) * 1000,
                                   table=table)
    except BaseException as exc:
        with _cache_lock:
            del _compiling[key]
        compiling.set_exception(exc)
        raise
    size = _approx_bytes(compiled)
    with _cache_lock:
        _stats["misses"] += 1
        _cache[key] = (compiled, size)
        del _compiling[key]
        _evict()
    compiling.set_result(compiled)
    return compiled, False


_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"})
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "contains")


# What the grammar lets an unconstrained value (`{}`) be: a scalar or a flat list of scalars. outlines-core
# compiles `{}` into arbitrarily nested JSON, whose Index over a real vocabulary takes minutes and GBs.
_SCALAR = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_ANY_VALUE = {"anyOf": [*_SCALAR["anyOf"], {"type": "null"}, {"type": "array", "items": _SCALAR}]}


def compilable_schema(schema: Any) -> Any:
    """The schema minus keywords that do not constrain values; an empty schema becomes `_ANY_VALUE`,
    and a free-form object's values or array's items are bounded the same way.

    outlines-core rejects a schema node that holds only annotations (BFCL's `any` parameters become
    `{"description": ...}`).
    """
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
    if not out:
        return _ANY_VALUE
    # A free-form object or array (BFCL's `dict` with no properties, `array` with no items) gets the same
    # bound: outlines-core would allow nested JSON to depth 3 (`{"type": "object"}`: 13 kB of regex,
    # ~6 s to compile against SmolLM's vocabulary, vs ~1 s with flat values).
    if out.get("type") == "object" and not any(k in out for k in ("properties", "additionalProperties", "patternProperties")):
        out["additionalProperties"] = _ANY_VALUE
    if out.get("type") == "array" and not any(k in out for k in ("items", "prefixItems")):
        out["items"] = _SCALAR
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: compilable_schema(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [compilable_schema(sub) for sub in out[key]]
    for key in _SUBSCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = compilable_schema(out[key])
    return out


# Keywords whose every constraint the compiled grammar enforces by itself (with the annotations): a
# value the grammar admits under a schema of only these passes jsonschema too. Anything else (numeric
# bounds, patterns, lengths, formats, oneOf's exclusivity) is checked after generation.
_ENFORCED = frozenset({"type", "properties", "required", "items", "enum", "const", "anyOf", "additionalProperties"})


def grammar_enforces(schema: Any) -> bool:
    """Whether a value the grammar lets through can never fail `schema`: then a call to this tool may
    stream before it is checked (`fcd serve` streams its arguments as they are generated)."""
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, dict):
        return False
    if any(k not in _ENFORCED and k not in _ANNOTATIONS for k in schema):
        return False
    subs = list((schema.get("properties") or {}).values()) + list(schema.get("anyOf") or [])
    subs += [schema[k] for k in ("items", "additionalProperties") if isinstance(schema.get(k), dict)]
    return all(grammar_enforces(sub) for sub in subs)


def _compile_index(schema: dict[str, Any], vocab: TokenVocabulary) -> Any:
    from outlines_core import Index
    from outlines_core.json_schema import NUMBER, build_regex_from_schema

    try:
        regex = build_regex_from_schema(json.dumps(compilable_schema(schema)), WHITESPACE).replace(NUMBER, BOUNDED_NUMBER)
        return Index(regex, vocab.vocabulary)
    except Exception as exc:  # outlines-core raises ValueError/RuntimeError subclasses from Rust
        raise GrammarError(f"cannot compile a grammar for these tools: {exc}") from None


class SequenceConstraint:
    """Per-sequence state: free text (maybe with FC masked), forced FC, inside the grammar, done.

    `max_tokens` (the request's completion budget) turns on the budget: every token counts, FC
    included, and inside the grammar only tokens after which the shortest completion and end-of-turn
    still fit are allowed; under `auto`, FC is masked once even the shortest call no longer fits.
    `guard` turns on the loop guard. `forced_close` says whether either narrowed the choice ("budget"
    or "loop", the latter winning), computed in `advance` so that a copy fed the same tokens (the vllm
    engine's API process) knows it too.
    """

    def __init__(self, grammar: CompiledGrammar, max_tokens: int | None = None, guard: LoopGuard | None = None):
        from outlines_core import Guide

        self._guide_cls = Guide
        self.grammar = grammar
        self.vocab = grammar.vocab
        self.guide: Any = None
        self.max_tokens = max_tokens
        self.left = max_tokens  # completion tokens left, this step's included; None: no budget
        self.guard = guard if grammar.table is not None else None
        if self.guard is not None and not self.vocab.pieces:
            raise ValueError("the loop guard reads token bytes: build the vocabulary with token_pieces")
        self.tracker: ValueTracker | None = None
        self.forced_close: str | None = None
        self.phase = {"none": "text", "free": "text", "auto": "text", "forced": "fc", "json": "grammar"}[grammar.mode]
        if self.phase == "grammar":
            self._enter_grammar()
        self._bitmask: Any = None

    def _enter_grammar(self) -> None:
        self.phase, self.guide = "grammar", self._guide_cls(self.grammar.index)
        if self.guard is not None:
            self.tracker = ValueTracker(self.guard, calls=self.grammar.mode != "json")

    @property
    def _fc_masked(self) -> bool:
        """FC is banned in free text: always under `none`; under `auto` once a call would not fit."""
        mode = self.grammar.mode
        return mode == "none" or (mode == "auto" and self.left is not None and self.left < self.grammar.min_tokens)

    @property
    def in_grammar(self) -> bool:
        return self.phase in ("grammar", "done")

    def _narrowing(self) -> tuple[int | None, str | None]:
        """This step's bound on the next state's distance to a complete answer, and what imposes it
        (None, None: every token the grammar allows is fine). Only called in the grammar phase."""
        table = self.grammar.table
        if table is None or (self.left is None and self.tracker is None):
            return None, None
        state = self.guide.get_state()
        farthest = table.farthest_next(state)
        bound, reason = None, None
        if self.left is not None and self.left - 2 < farthest:  # this token, then end-of-turn must fit
            bound, reason = self.left - 2, "budget"
        mode = self.tracker.narrowing if self.tracker is not None else None
        if mode is not None:
            closer = table.dist[state] - (1 if mode == STRICT else 0)
            if closer < farthest:
                bound, reason = closer if bound is None else min(bound, closer), "loop"
        if bound is None:
            return None, None
        return max(bound, table.dist[state] - 1), reason  # a shortest way on always stays open

    def mask_(self, logits: Any) -> None:
        """Set the logits of disallowed tokens to -inf, in place (a 1-D row)."""
        import numpy as np
        import torch

        if self.phase == "text":
            if self.vocab.fc_id is not None and self._fc_masked:
                logits[self.vocab.fc_id] = -torch.inf
            return
        if self.phase == "fc":
            keep = logits[self.vocab.fc_id].clone()
            logits.fill_(-torch.inf)
            logits[self.vocab.fc_id] = keep
            return
        if self.phase == "done":
            keep = logits[self.vocab.eot_id].clone()
            logits.fill_(-torch.inf)
            logits[self.vocab.eot_id] = keep
            return
        width = logits.shape[-1]
        bound, _ = self._narrowing()
        if bound is not None:
            state = self.guide.get_state()
            banned = np.ones(width, dtype=bool)
            banned[self.grammar.table.within(state, bound)] = False
            if self.grammar.table.dist[state] == 0:
                banned[self.vocab.eot_id] = False
            logits.masked_fill_(torch.from_numpy(banned).to(logits.device), -torch.inf)
            return
        from outlines_core.kernels.torch import fill_next_token_bitmask

        if self._bitmask is None:
            self._bitmask = torch.zeros((1, (self.vocab.size + 31) // 32), dtype=torch.int32)
        fill_next_token_bitmask(self.guide, self._bitmask)
        # bit j of little-endian word i is token 32*i + j; unpacking bytes is ~25x faster than torch shifts
        banned = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little") == 0
        banned = banned[:width] if banned.size >= width else np.pad(banned, (0, width - banned.size), constant_values=True)
        logits.masked_fill_(torch.from_numpy(banned).to(logits.device), -torch.inf)

    def forced(self) -> int | None:
        """The one token this step admits, when only one is admitted (JSON punctuation, the rest of a key or
        of a unique name, end-of-turn once the calls are complete): an engine may append it without a forward
        pass and without sampling (jump-forward). None when there is a choice, or in free text."""
        if self.phase == "fc":
            return self.vocab.fc_id
        if self.phase == "done":
            return self.vocab.eot_id
        if self.phase != "grammar":
            return None
        allowed = self.guide.get_tokens()
        return int(allowed[0]) if len(allowed) == 1 else None

    def advance(self, token_id: int) -> None:
        """Move the state machine past a sampled token."""
        phase = self.phase
        if phase == "grammar" and token_id != self.vocab.eot_id:
            _, reason = self._narrowing()  # what this step's mask was, from the state before the token
            if reason is not None and self.forced_close != "loop":
                self.forced_close = reason
        if self.left is not None:
            self.left -= 1
        if phase == "text":
            if token_id == self.vocab.fc_id and self.grammar.mode == "auto":
                self._enter_grammar()
            return
        if phase == "fc":
            self._enter_grammar()
            return
        if phase == "grammar":
            if token_id == self.vocab.eot_id:
                self.phase = "done"
                return
            self.guide.advance(token_id)
            if self.tracker is not None:
                self.tracker.feed(token_id, self.vocab.pieces[token_id])
            if self.guide.is_finished():
                self.phase = "done"
