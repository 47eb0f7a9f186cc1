"""The loop guard: notice a constrained answer looping inside one value, so the constraint can close it.

A small student under a grammar often never chooses to stop: it repeats a phrase inside a string,
adds array items forever, or emits the same call again and again. The grammar keeps all of that
valid and lets it run until max_tokens, which cuts the answer. `ValueTracker` follows the generated
JSON (compact, as the grammar emits it) token by token and trips a value when

- it is longer than `LoopGuard.value_tokens` tokens,
- its last tokens are one n-gram repeated at least `LoopGuard.repeats` times in a row, covering at
  least `LoopGuard.repeat_span` tokens, or
- (the call list) one call has been emitted once more than `LoopGuard.same_calls` allows (by
  default: a second time); the server drops that copy from the answer (serve/serving.py).

A tripped string is closed at once (`STRICT`: only tokens that bring the answer closer to its end);
a tripped array or object may finish the item it is in but gets no new one (`SOFT`: no token that
takes the answer farther from its end). The frames of the call structure itself (the call list, a
call, its name and its arguments object) and a JSON answer's top-level value are not values: the
token budget bounds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STRICT, SOFT = "strict", "soft"
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


@dataclass(frozen=True)
class LoopGuard:
    """Limits of one value inside a constrained answer.

    Defaults from BFCL's 2,501 single-turn ground-truth answers in SmolLM2 tokens
    (benchmarks/guard_bench.py `values`): the longest string value is 92 tokens, the longest array or
    object 76; one token repeats at most 5 times in a row (`00000`), a 2-gram at most 3 times, longer
    n-grams at most twice; one call appears at most 4 times in a list (parallel_180, whose optional
    arguments the canonical target drops). The defaults leave 2-3x room over each, except for calls:
    a small student that repeats a call never stops by itself, and an answer that states every
    argument rarely needs one call twice (BFCL: 3 of 2,501, e.g. two draws of the same random number),
    so by default one copy of a call is kept and the first repeat ends the list (`same_calls` 1;
    `fcd serve --same-call-limit N` keeps up to N).
    """

    value_tokens: int = 256
    repeats: int = 4
    repeat_span: int = 16
    longest_ngram: int = 32
    same_calls: int = 1  # copies of one call an answer may hold


@dataclass
class _Frame:
    kind: int  # the opening byte: `"`, `[` or `{`
    start: int  # index in ValueTracker.ids of the token that opened it
    offset: int  # byte offset of the opening byte in ValueTracker.text
    mode: str | None = None  # STRICT or SOFT once tripped


@dataclass
class ValueTracker:
    """JSON nesting, value lengths and repeats of one answer, fed one token at a time."""

    guard: LoopGuard
    calls: bool  # a call list (FC payload) rather than a response_format JSON value
    frames: list[_Frame] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    runs: list[int] = field(default_factory=list)  # runs[n]: consecutive latest tokens equal to the one n before
    escaped: bool = False
    calls_seen: dict[bytes, int] = field(default_factory=dict)
    tripped: dict[str, int] = field(default_factory=lambda: {STRICT: 0, SOFT: 0})
    roots: int = field(init=False)  # the outermost frames, which are structure, not values
    spans: list[int] = field(init=False)  # spans[n]: tokens an n-gram must repeat over to trip

    def __post_init__(self) -> None:
        g = self.guard
        self.runs = [0] * (g.longest_ngram + 1)
        self.spans = [0] + [n * max(g.repeats, -(-g.repeat_span // n)) for n in range(1, g.longest_ngram + 1)]
        self.roots = 3 if self.calls else 1

    @property
    def may_repeat(self) -> bool:
        """The call being generated still reads as one more copy of a call that has every copy it may
        have: if it ends so, the guard trips."""
        frames = self.frames
        if not self.calls or len(frames) < 2 or frames[0].kind != ord("["):
            return False
        head = bytes(self.text[frames[1].offset:])
        if b'"arguments"' not in head:  # the same function first (the wire format's key order: name, arguments)
            return False
        return any(n >= self.guard.same_calls and call.startswith(head) for call, n in self.calls_seen.items())

    @property
    def narrowing(self) -> str | None:
        """STRICT while a tripped string is open, SOFT while only tripped containers are, else None."""
        if self.tripped[STRICT]:
            return STRICT
        return SOFT if self.tripped[SOFT] else None

    def feed(self, token_id: int, piece: bytes) -> None:
        """Follow one generated token: its bytes move the JSON state, its id the repeat counters."""
        ids, runs = self.ids, self.runs
        ids.append(token_id)
        last = len(ids) - 1
        for n in range(1, min(self.guard.longest_ngram, last) + 1):
            runs[n] = runs[n] + 1 if ids[last - n] == token_id else 0
        base = len(self.text)
        self.text += piece
        frames = self.frames
        plain_text = frames and frames[-1].kind == _QUOTE and not self.escaped and _QUOTE not in piece and _BACKSLASH not in piece
        if not plain_text:
            for i, byte in enumerate(piece):
                self._byte(byte, last, base + i)
        self._check(last + 1)

    def _byte(self, byte: int, token_index: int, offset: int) -> None:
        frames = self.frames
        if frames and frames[-1].kind == _QUOTE:
            if self.escaped:
                self.escaped = False
            elif byte == _BACKSLASH:
                self.escaped = True
            elif byte == _QUOTE:
                self._pop(offset)
        elif byte == _QUOTE or byte in _OPEN:
            frames.append(_Frame(byte, token_index, offset))
        elif byte in _CLOSE and frames:
            self._pop(offset)

    def _pop(self, offset: int) -> None:
        frame = self.frames.pop()
        if frame.mode:
            self.tripped[frame.mode] -= 1
        if self.calls and len(self.frames) == 1 and frame.kind == ord("{"):
            call = bytes(self.text[frame.offset:offset + 1])
            self.calls_seen[call] = seen = self.calls_seen.get(call, 0) + 1
            if seen > self.guard.same_calls:
                self._trip(self.frames[0])

    def _check(self, length: int) -> None:
        """Trip the values that ran over their token budget or whose last tokens repeat one n-gram."""
        g, frames = self.guard, self.frames
        for frame in frames[self.roots:]:
            if frame.mode is None and length - frame.start > g.value_tokens:
                self._trip(frame)
        for n in range(1, len(self.runs)):
            span = self.spans[n]
            if self.runs[n] + n >= span:
                inner = next((f for f in reversed(frames[self.roots:]) if length - f.start >= span), None)
                if inner is not None and inner.mode is None:
                    self._trip(inner)

    def _trip(self, frame: _Frame) -> None:
        if frame.mode is None:
            frame.mode = STRICT if frame.kind == _QUOTE else SOFT
            self.tripped[frame.mode] += 1
