"""Tools + tool_choice -> compiled outlines-core Index (cached), and the per-sequence state machine.

The call grammar is one JSON Schema, an array of `{"name": const, "arguments": <tool schema>}`
alternatives, turned into a regex by outlines-core and compiled into an Index over the student's
vocabulary. No whitespace between JSON tokens: the wire format renders calls compactly, a model
gets no room to loop on whitespace, and the regex compiles about a quarter faster than with `[ ]?`.

Every constrained answer closes within its token budget: the compiled grammar carries each state's
distance to a complete answer (`closing.CloseTable`), and a sequence given its max_tokens allows only
tokens after which the rest still fits (this token, the shortest way to close, end-of-turn). A value
the model loops in (`guard.ValueTracker`) is narrowed to tokens that close it.

Two mask backends over the same regex. `outlines` (the default) compiles the Index and the close
table up front. `llguidance` (llguidance_masks.py) builds a matcher in about a millisecond and masks
lazily; the Index and close table, which only the budget and the loop guard need, are compiled in the
background and waited for only when one of them could narrow the choice: the budget once the tokens
left come within `close_bound` (regex_bound.py: no state is farther than that from a complete answer),
the loop guard once a value loops. The sequence's tokens are then replayed through the Index, which
masks from there on, so every guarantee is the outlines backend's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from fcdistill.grammars.closing import CloseTable, build_close_table
from fcdistill.grammars.guard import STRICT, LoopGuard, ValueTracker
from fcdistill.grammars.regex_bound import close_bound
from fcdistill.grammars.vocabulary import TokenVocabulary
from fcdistill.tools import ToolSpec

log = logging.getLogger(__name__)
ToolChoice = Literal["none", "auto", "required"] | str  # any other string names a function
WHITESPACE = ""
# outlines-core's number has unbounded digits and exponent: `4e+836045` is valid JSON but overflows to
# inf, which no client can read back. Bounded, the largest number is about 1e115.
BOUNDED_NUMBER = r"((-)?(0|[1-9][0-9]{0,15}))(\.[0-9]{1,16})?([eE][+-]?[0-9]{1,2})?"
DEFAULT_CACHE_MB = 256.0  # compiled grammars kept (LRU); a small tool set's takes about 1 MB
Backend = Literal["outlines", "llguidance"]
BACKENDS: tuple[str, ...] = ("outlines", "llguidance")
PREFETCH_TOKENS = 32  # llguidance: start the Index's compile this many tokens before the budget could bind
_exact_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fcd-grammar")  # one: decoding keeps a core


class GrammarError(ValueError):
    """A request whose constraint cannot be built (absent tool named, schema outlines cannot compile)."""


class ExactLater:
    """The outlines Index and close table of a grammar llguidance masks: compiled once, in the
    background, on first want, and kept (the cache's size for the grammar is updated then)."""

    def __init__(self, regex: str, vocab: TokenVocabulary, key: tuple[Any, ...]):
        self.regex, self.vocab, self.key = regex, vocab, key
        self._future: Future | None = None
        self._lock = threading.Lock()

    def start(self) -> Future:
        with self._lock:
            if self._future is None:
                self._future = _exact_pool.submit(self._build)
            return self._future

    def result(self) -> tuple[Any, CloseTable]:
        """Blocks until built; GrammarError if outlines cannot compile the regex."""
        return self.start().result()

    def built(self) -> tuple[Any, CloseTable] | None:
        """The Index and table if already compiled, else None (never waits, never starts a compile)."""
        with self._lock:
            future = self._future
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return future.result()

    def seed(self, exact: tuple[Any, CloseTable]) -> None:
        """Take an Index and table compiled elsewhere (vLLM's engine process gets the API process's)."""
        with self._lock:
            if self._future is None:
                self._future = Future()
                self._future.set_result(exact)

    def _build(self) -> tuple[Any, CloseTable]:
        start = time.perf_counter()
        index, table = _compile_exact(self.regex, self.vocab)
        size = _exact_bytes(index, table)  # pickles the Index: not under the lock
        with _cache_lock:
            _stats["exact_compiles"] += 1
            _stats["exact_ms"] += int((time.perf_counter() - start) * 1000)
            hit = _cache.get(self.key)
            if hit is not None:
                _cache[self.key] = (hit[0], hit[1] + size)
                _evict()
        return index, table


@dataclass(frozen=True)
class CompiledGrammar:
    """What one (tokenizer, tools, mode, backend) compiles to; shared by every request that asks for it."""

    mode: Literal["none", "auto", "forced", "json", "free"]
    index: Any  # outlines_core.Index for the calls (or JSON) part; None for none/free and under llguidance
    vocab: TokenVocabulary
    compile_ms: float
    table: CloseTable | None = None  # distances to a complete answer; None for none/free and under llguidance
    matcher: Any = None  # llguidance: the matcher at the start, copied for each sequence
    close_bound: int | None = None  # llguidance: no state is farther from a complete answer (None: unknown)
    later: ExactLater | None = None  # llguidance: the Index and table, built when first wanted

    def exact(self) -> tuple[Any, CloseTable | None]:
        """The outlines Index and close table; under llguidance this compiles them (blocking) on first call."""
        return (self.index, self.table) if self.later is None else self.later.result()

    def may_bind(self, left: int | None) -> bool:
        """Whether a budget of `left` tokens (this step's included) could narrow the choice or mask FC:
        only then is the close table read. Always true for outlines, where the table is at hand."""
        if left is None:
            return False
        return self.later is None or self.close_bound is None or left - 2 < self.close_bound

    @property
    def min_tokens(self) -> int:
        """Completion tokens of the shortest complete constrained answer: FC (for calls), the shortest
        call list or JSON value, end-of-turn. 0 when nothing is constrained."""
        table = self.exact()[1]
        if table is None:
            return 0
        return table.start + (2 if self.mode in ("auto", "forced") else 1)

    def fits(self, max_tokens: int) -> bool:
        """Whether the shortest complete answer fits max_tokens; under llguidance decided from
        `close_bound` when it can be, without compiling the Index."""
        return not self.may_bind(max_tokens) or max_tokens >= self.min_tokens


_cache: OrderedDict[tuple, tuple[CompiledGrammar, int]] = OrderedDict()  # key -> (grammar, approximate bytes)
_cache_limit = [int(DEFAULT_CACHE_MB * 2**20)]
_cache_lock = threading.Lock()
_compiling: dict[tuple[Any, ...], Future] = {}  # grammars being compiled now, by cache key
_stats = {"hits": 0, "misses": 0, "compile_ms": 0, "exact_compiles": 0, "exact_ms": 0}  # compile_ms: the misses


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


def _exact_bytes(index: Any, table: CloseTable | None) -> int:
    """What an Index and close table hold in memory, roughly: the Index as serialized (every state's
    token transitions) and the table (the token array plus a few dict entries a state)."""
    import pickle

    size = len(pickle.dumps(index)) if index is not None else 0
    if table is not None:
        size += table.tokens.nbytes + 200 * len(table.groups)
    return size


def _approx_bytes(g: CompiledGrammar) -> int:
    """What a cached grammar holds in memory, roughly; an llguidance grammar's Index is added when built."""
    size = 1024 + (len(g.later.regex) * 8 if g.later is not None else 0)  # llguidance: regex and lazy state
    return size + _exact_bytes(g.index, g.table)


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


def _grammar_key(vocab: TokenVocabulary, tools: list[ToolSpec], tool_choice: ToolChoice, parallel: bool,
                 json_schema: dict[str, Any] | None, backend: Backend) -> tuple[tuple[Any, ...], Any, dict[str, Any] | None, Backend]:
    """The cache key of a request's constraint, its mode, schema and effective backend; GrammarError
    for a constraint that cannot be built."""
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
    if backend not in BACKENDS:
        raise ValueError(f"unknown grammar backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if schema is None:
        backend = "outlines"  # nothing to mask but FC: no backend is involved
    key = (vocab.key, mode, json.dumps(schema, sort_keys=True) if schema is not None else "", backend)
    return key, mode, schema, backend


def compile_pending(vocab: TokenVocabulary, tools: list[ToolSpec], tool_choice: ToolChoice = "auto",
                    parallel: bool = True, json_schema: dict[str, Any] | None = None,
                    backend: Backend = "outlines") -> Future | None:
    """The compile of this constraint that is running now, if one is (None: cached, or not started).
    A caller on an event loop awaits it there rather than parking a worker thread on it."""
    key = _grammar_key(vocab, tools, tool_choice, parallel, json_schema, backend)[0]
    with _cache_lock:
        return None if key in _cache else _compiling.get(key)


def compile_grammar(vocab: TokenVocabulary, tools: list[ToolSpec], tool_choice: ToolChoice = "auto",
                    parallel: bool = True, json_schema: dict[str, Any] | None = None,
                    backend: Backend = "outlines") -> tuple[CompiledGrammar, bool]:
    """The constraint for one request, and whether it came from the cache."""
    key, mode, schema, backend = _grammar_key(vocab, tools, tool_choice, parallel, json_schema, backend)
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
        compiled = _build(mode, schema, vocab, backend, key, start)
    except BaseException as exc:
        with _cache_lock:
            del _compiling[key]
        compiling.set_exception(exc)
        raise
    size = _approx_bytes(compiled)
    with _cache_lock:
        _stats["misses"] += 1
        _stats["compile_ms"] += int(compiled.compile_ms)
        _cache[key] = (compiled, size)
        del _compiling[key]
        _evict()
    compiling.set_result(compiled)
    return compiled, False


def _build(mode: Any, schema: dict[str, Any] | None, vocab: TokenVocabulary, backend: Backend, key: tuple[Any, ...],
           start: float) -> CompiledGrammar:
    if schema is not None and backend == "llguidance":
        from fcdistill.grammars.llguidance_masks import build_matcher

        regex = _regex(schema)
        try:
            matcher = build_matcher(regex, vocab)
        except ValueError as exc:  # past llguidance's limits: this grammar is compiled by outlines instead
            log.warning("llguidance cannot build this grammar (%s); outlines-core compiles it", str(exc)[:200])
        else:
            return CompiledGrammar(mode=mode, index=None, vocab=vocab, compile_ms=(time.perf_counter() - start) * 1000,
                                   matcher=matcher, close_bound=close_bound(regex, vocab.single_bytes),
                                   later=ExactLater(regex, vocab, key))
    index, table = _compile_exact(_regex(schema), vocab) if schema is not None else (None, None)
    return CompiledGrammar(mode=mode, index=index, vocab=vocab, compile_ms=(time.perf_counter() - start) * 1000,
                           table=table)


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


def _regex(schema: dict[str, Any]) -> str:
    """The regex both backends compile: compact JSON, bounded numbers."""
    from outlines_core.json_schema import NUMBER, build_regex_from_schema

    try:
        return build_regex_from_schema(json.dumps(compilable_schema(schema)), WHITESPACE).replace(NUMBER, BOUNDED_NUMBER)
    except Exception as exc:  # outlines-core raises ValueError/RuntimeError subclasses from Rust
        raise GrammarError(f"cannot compile a grammar for these tools: {exc}") from None


def _compile_exact(regex: str, vocab: TokenVocabulary) -> tuple[Any, CloseTable]:
    """outlines-core's Index over the vocabulary and its close table: up front (outlines backend) or
    when first wanted (llguidance, ExactLater)."""
    from outlines_core import Index

    try:
        index = Index(regex, vocab.vocabulary)
    except Exception as exc:
        raise GrammarError(f"cannot compile a grammar for these tools: {exc}") from None
    return index, build_close_table(index, vocab.eot_id)


class SequenceConstraint:
    """Per-sequence state: free text (maybe with FC masked), forced FC, inside the grammar, done.

    `max_tokens` (the request's completion budget) turns on the budget: every token counts, FC
    included, and inside the grammar only tokens after which the shortest completion and end-of-turn
    still fit are allowed; under `auto`, FC is masked once even the shortest call no longer fits.
    `guard` turns on the loop guard. `forced_close` says whether either narrowed the choice ("budget"
    or "loop", the latter winning), computed in `advance` so that a copy fed the same tokens (the vllm
    engine's API process) knows it too. Under llguidance a matcher masks until the budget or the loop
    guard could narrow; then the outlines Index takes over from the same point (module docstring).
    """

    def __init__(self, grammar: CompiledGrammar, max_tokens: int | None = None, guard: LoopGuard | None = None):
        from outlines_core import Guide

        self._guide_cls = Guide
        self.grammar = grammar
        self.vocab = grammar.vocab
        self.guide: Any = None  # outlines: the Index's state
        self.matcher: Any = None  # llguidance: the matcher, until the Index takes over
        self._grammar_tokens: list[int] = []  # what the matcher consumed, to replay through the Index
        self._no_index = False  # outlines could not compile what llguidance masks: no hand-over
        self.max_tokens = max_tokens
        self.left = max_tokens  # completion tokens left, this step's included; None: no budget
        constrained = grammar.table is not None or grammar.later is not None
        self.guard = guard if constrained else None
        if self.guard is not None and not self.vocab.pieces:
            raise ValueError("the loop guard reads token bytes: build the vocabulary with token_pieces")
        self.tracker: ValueTracker | None = None
        self.forced_close: str | None = None
        self.phase = {"none": "text", "free": "text", "auto": "text", "forced": "fc", "json": "grammar"}[grammar.mode]
        self._bitmask: Any = None
        self._filled_at = -1  # the step `_bitmask` was filled at (`forced` and `mask_` share one fill a step)
        self._step = 0
        self._prefetch()
        if self.phase == "grammar":
            self._enter_grammar()

    def _prefetch(self) -> None:
        """llguidance: start compiling the Index in the background before the budget could bind."""
        later = self.grammar.later
        if later is not None and self.left is not None and self.grammar.may_bind(self.left - PREFETCH_TOKENS):
            later.start()

    def _enter_grammar(self) -> None:
        self.phase = "grammar"
        if self.guard is not None:
            self.tracker = ValueTracker(self.guard, calls=self.grammar.mode != "json")
        if self.grammar.matcher is not None:
            self.matcher = self.grammar.matcher.deep_copy()
            self._hand_over()
        else:
            self.guide = self._guide_cls(self.grammar.index)

    def _hand_over(self) -> None:
        """While the matcher masks: hand masking over to the Index, at the same point, once the budget or
        the loop guard could narrow this step's choice. If outlines cannot compile the grammar, the
        matcher goes on without them (logged): this sequence, not its batch, loses the guarantee."""
        if self.matcher is None or self._no_index:
            return
        looping = self.tracker is not None and self.tracker.narrowing is not None
        if not looping and not self.grammar.may_bind(self.left):
            return
        try:
            index = self.grammar.exact()[0]
        except GrammarError as exc:
            log.warning("no budget or loop guard for this answer: %s", exc)
            self._no_index = True
            return
        guide = self._guide_cls(index)
        for token in self._grammar_tokens:
            guide.advance(token)
        self.guide, self.matcher, self._filled_at = guide, None, -1

    @property
    def _fc_masked(self) -> bool:
        """FC is banned in free text: always under `none`; under `auto` once a call would not fit."""
        mode = self.grammar.mode
        return mode == "none" or (mode == "auto" and self.grammar.may_bind(self.left)
                                  and self.left < self.grammar.min_tokens)

    @property
    def in_grammar(self) -> bool:
        return self.phase in ("grammar", "done")

    def _narrowing(self) -> tuple[int | None, str | None]:
        """This step's bound on the next state's distance to a complete answer, and what imposes it
        (None, None: every token the grammar allows is fine). Only called in the grammar phase."""
        if self.left is None and self.tracker is None:
            return None, None
        self._hand_over()
        if self.matcher is not None:
            return None, None
        table = self.grammar.exact()[1]
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

    def _fill(self) -> Any:
        """This step's grammar mask as a (1, words) int32 bitmask, from whichever backend masks now."""
        import torch

        if self._bitmask is None:
            self._bitmask = torch.zeros((1, (self.vocab.size + 31) // 32), dtype=torch.int32)
        if self._filled_at == self._step:
            return self._bitmask
        self._filled_at = self._step
        if self.matcher is not None:
            from fcdistill.grammars.llguidance_masks import fill_bitmask

            fill_bitmask(self.matcher, self._bitmask)
        else:
            from outlines_core.kernels.torch import fill_next_token_bitmask

            fill_next_token_bitmask(self.guide, self._bitmask)
        return self._bitmask

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
            table = self.grammar.exact()[1]
            banned = np.ones(width, dtype=bool)
            banned[table.within(state, bound)] = False
            if table.dist[state] == 0:
                banned[self.vocab.eot_id] = False
            logits.masked_fill_(torch.from_numpy(banned).to(logits.device), -torch.inf)
            return
        # bit j of little-endian word i is token 32*i + j; unpacking bytes is ~25x faster than torch shifts
        banned = np.unpackbits(self._fill().numpy().view(np.uint8), bitorder="little") == 0
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
        self._hand_over()  # a step the budget could narrow is not the matcher's, forced or not
        if self.matcher is not None:
            import numpy as np

            words = self._fill().numpy()[0]
            nonzero = np.flatnonzero(words)
            if len(nonzero) != 1:
                return None
            word = int(words[nonzero[0]]) & 0xFFFFFFFF
            return int(nonzero[0]) * 32 + word.bit_length() - 1 if word & (word - 1) == 0 else None
        allowed = self.guide.get_tokens()
        return int(allowed[0]) if len(allowed) == 1 else None

    def advance(self, token_id: int) -> None:
        """Move the state machine past a sampled token."""
        phase = self.phase
        self._step += 1
        if phase == "grammar" and token_id != self.vocab.eot_id:
            _, reason = self._narrowing()  # what this step's mask was, from the state before the token
            if reason is not None and self.forced_close != "loop":
                self.forced_close = reason
        if self.left is not None:
            self.left -= 1
            self._prefetch()
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
            if self.matcher is not None:
                if not self.matcher.consume_token(token_id):
                    raise ValueError(f"token {token_id} is not allowed here: {self.matcher.get_error()}")
                self._grammar_tokens.append(token_id)
                finished = self.matcher.is_accepting()
            else:
                self.guide.advance(token_id)
                finished = self.guide.is_finished()
            if self.tracker is not None:
                self.tracker.feed(token_id, self.vocab.pieces[token_id])
                if self.matcher is not None and self.grammar.later is not None and self.tracker.may_repeat:
                    self.grammar.later.start()  # llguidance: a copy would hand over to the Index: compile it now
            if finished:
                self.phase = "done"
