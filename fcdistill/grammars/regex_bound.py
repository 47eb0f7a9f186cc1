"""An upper bound on how far any prefix of a regex's language is from a complete match, read off the
regex itself, without compiling an automaton.

The budget guarantee needs, at each step, the distance to a complete answer (`closing.CloseTable`,
built from the outlines Index: hundreds of milliseconds to seconds a tool set). With a backend that
masks lazily (llguidance), that table is only needed once the budget could bind: while the tokens
left exceed every state's distance, no token the grammar allows can strand the answer. This module
gives that threshold cheaply. For every node of the parsed regex it computes the shortest match
(`min`) and the largest "shortest completion" from any position inside a match (`ub`), in bytes:

- a sequence `A B C`: from inside A, finish A (at most ub(A)) then the shortest B and C;
- an alternation: the worst branch;
- a repeat `A{m,n}`: from inside the first copy, finish it and add m-1 shortest copies; once m copies
  are done the match may end, so n does not matter;
- a character class: 1 byte shortest, 4 from inside (a UTF-8 character is at most 4 bytes).

Bytes bound tokens when each byte of that shortest completion is a token of its own: the caller
passes the vocabulary's single-byte tokens, and the bound is given only if they hold printable ASCII,
UTF-8 continuation bytes (to finish a started character) and every byte the regex spells literally
(byte-level BPE and sentencepiece's byte fallback have them). A regex Python's parser cannot read gets
no bound (None) either: the caller then builds the exact table from the start.
"""

from __future__ import annotations

from typing import Any

_CHAR_MAX = 4  # bytes of the longest UTF-8 character
_NEEDED = frozenset(range(0x20, 0x7F)) | frozenset(range(0x80, 0xC0))  # printable ASCII, continuation bytes


class _NoBound(ValueError):
    pass


def close_bound(regex: str, single_bytes: frozenset[int]) -> int | None:
    """Tokens that always suffice to complete a match from any viable prefix; None if unknown.
    `single_bytes`: the byte values the vocabulary has a one-byte token for."""
    from re import _parser  # the stdlib's own regex parser: one AST for every construct outlines emits

    if not _NEEDED <= single_bytes:
        return None
    try:
        return _sequence(_parser.parse(regex), single_bytes)[1]
    except Exception:  # a construct Python's re does not share with Rust's regex: no bound, not a wrong one
        return None


def _char_bytes(code: int, single_bytes: frozenset[int]) -> int:
    raw = chr(code).encode()
    if not set(raw) <= single_bytes:
        raise _NoBound(f"no one-byte token for a byte of {chr(code)!r}")
    return len(raw)


def _sequence(items: Any, single_bytes: frozenset[int]) -> tuple[int, int]:
    """(shortest match, largest shortest-completion) of a sequence of parsed nodes."""
    bounds = [_node(op, arg, single_bytes) for op, arg in items]
    shortest = sum(lo for lo, _ in bounds)
    worst, tail = shortest, 0
    for lo, up in reversed(bounds):
        worst = max(worst, up + tail)
        tail += lo
    return shortest, worst


def _node(op: Any, arg: Any, single_bytes: frozenset[int]) -> tuple[int, int]:
    name = str(op)
    if name == "LITERAL":
        n = _char_bytes(arg, single_bytes)
        return n, n
    if name == "IN":  # the class's shortest member
        kinds = {str(k) for k, _ in arg}
        members = [(str(k), v) for k, v in arg if str(k) in ("LITERAL", "RANGE")]
        if "NEGATE" in kinds:  # shortest is one byte only if some printable ASCII character is left
            if "CATEGORY" in kinds:
                raise _NoBound("a negated class with a category")
            out = {v for k, v in members if k == "LITERAL"} | {c for k, v in members if k == "RANGE"
                                                               for c in range(max(v[0], 0x20), min(v[1], 0x7E) + 1)}
            if set(range(0x20, 0x7F)) <= out:
                raise _NoBound("a negated class without printable ASCII")
            return 1, _CHAR_MAX
        if "CATEGORY" in kinds or not members:  # \d, \w, \s: ASCII members
            return 1, _CHAR_MAX
        return min(_char_bytes(v if k == "LITERAL" else v[0], single_bytes) for k, v in members), _CHAR_MAX
    if name in ("ANY", "NOT_LITERAL", "CATEGORY"):
        return 1, _CHAR_MAX
    if name == "SUBPATTERN":
        if arg[1] or arg[2]:  # scoped flags: (?i:k) also matches the 3-byte KELVIN SIGN
            raise _NoBound("a group with flags")
        return _sequence(arg[-1], single_bytes)
    if name == "BRANCH":
        branches = [_sequence(b, single_bytes) for b in arg[1]]
        return min(lo for lo, _ in branches), max(up for _, up in branches)
    if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        least, most, body = arg
        if most == 0:
            return 0, 0
        lo, up = _sequence(body, single_bytes)
        return least * lo, up + max(least - 1, 0) * lo
    if name == "AT":  # anchors match no bytes
        return 0, 0
    raise _NoBound(f"no bound for regex node {name}")
