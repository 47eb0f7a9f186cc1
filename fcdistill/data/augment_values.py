"""Value substitution: argument values the query states verbatim, and plausible replacements for them.

A slot is one value text that occurs exactly once in the query (whole, not inside a longer number or
word) and is the text of every target scalar equal to it, so swapping it in both places keeps query and
target consistent. Replacements keep the kind: another member of the enum, a number of similar
magnitude with the same decimals, or a string another train record used for a parameter of the same
name (stated verbatim in its own query, so it is a literal value, not a paraphrase).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Iterator

Leaf = tuple[Any, Any, str]  # (value, its schema node, the nearest parameter name)


@dataclass(frozen=True)
class Slot:
    """One value to swap: its kind, its value, its text in the query, where that text is, its schema."""

    kind: str  # enum | number | string
    value: Any
    text: str
    span: tuple[int, int]
    schema: dict[str, Any]
    param: str


def leaves(value: Any, schema: Any, param: str = "") -> Iterator[Leaf]:
    """Every scalar of an argument value with its schema node, through properties and items."""
    schema = schema if isinstance(schema, dict) else {}
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for k, v in value.items():
            yield from leaves(v, props.get(k), k)
    elif isinstance(value, list):
        for v in value:
            yield from leaves(v, schema.get("items"), param)
    else:
        yield value, schema, param


def _number_pattern(text: str) -> re.Pattern[str]:
    """The number whole: not part of a longer number, word, date or path (`10` is not in `2010-10-05`)."""
    return re.compile(r"(?<![\w.,/:-])" + re.escape(text) + r"(?![\w]|[.,/:-]\w)")


def _string_pattern(text: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(text) + r"(?!\w)")


def value_text(value: Any) -> list[str]:
    """How a value can read in a query: `5.0` may be written `5`."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [str(value)]
    if isinstance(value, float):
        return [str(int(value)), repr(value)] if value.is_integer() else [repr(value)]
    return [value] if isinstance(value, str) and len(value.strip()) >= 2 else []


def find_once(query: str, value: Any) -> tuple[str, tuple[int, int]] | None:
    """The text and span of `value` when exactly one of its forms occurs exactly once in the query."""
    found = []
    for text in value_text(value):
        pat = _number_pattern(text) if isinstance(value, (int, float)) else _string_pattern(text)
        hits = [m.span() for m in pat.finditer(query)]
        if len(hits) == 1:
            found.append((text, hits[0]))
        elif hits:
            return None  # stated more than once: which occurrence is the argument is unknown
    return found[0] if len(found) == 1 else None


def occurs(query: str, value: Any) -> bool:
    """Whether any form of `value` occurs whole in the query."""
    pat = _number_pattern if isinstance(value, (int, float)) and not isinstance(value, bool) else _string_pattern
    return any(pat(t).search(query) for t in value_text(value))


def _kind(value: Any, schema: dict[str, Any]) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if value in (schema.get("enum") or []):
        return "enum"
    if isinstance(value, (int, float)):
        return "number"
    return "string" if isinstance(value, str) else None


def find_slots(query: str, all_leaves: list[Leaf]) -> list[Slot]:
    """Values that can be swapped: stated once in the query, and every target scalar with that text
    is the same value of the same kind (`10` as a number and as a string would be ambiguous)."""
    by_text: dict[str, list[Leaf]] = {}
    for leaf in all_leaves:
        for text in value_text(leaf[0]):
            by_text.setdefault(text, []).append(leaf)
    slots: dict[str, Slot] = {}
    for value, schema, param in all_leaves:
        kind = _kind(value, schema)
        hit = find_once(query, value) if kind else None
        if hit is None or hit[0] in slots:
            continue
        text, span = hit
        same = by_text[text]
        if all(type(v) is type(value) and v == value for v, _, _ in same) and \
                all(_kind(v, s) == kind for v, s, _ in same):
            slots[text] = Slot(kind, value, text, span, schema, param)
    ordered = sorted(slots.values(), key=lambda s: s.span)
    return [s for i, s in enumerate(ordered) if i == 0 or ordered[i - 1].span[1] <= s.span[0]]


def _new_int(n: int, rng: random.Random, year: bool) -> int:
    if year and 1900 <= n <= 2100:  # a year stays a nearby year ($2000 is an amount, not a year)
        return n + rng.choice([-1, 1]) * rng.randint(1, 5)
    if abs(n) < 10:
        return int(math.copysign(rng.randint(1, 9), n or 1))
    zeros = len(str(abs(n))) - len(str(abs(n)).rstrip("0"))
    scale = 10 ** min(zeros, len(str(abs(n))) - 1)
    lo, hi = sorted((int(n * 0.5), int(n * 1.5)))
    m = round(rng.randint(lo, hi) / scale) * scale  # 5000 becomes 3000 or 7000, not 7426
    return max(scale, m) if n > 0 else m


def new_number(value: int | float, text: str, rng: random.Random, year: bool = False) -> tuple[int | float, str]:
    """A number of similar magnitude written the way the query wrote the old one (same decimals)."""
    decimals = len(text.partition(".")[2])
    if isinstance(value, int) or decimals == 0:  # `5000.0` written `5000` is a round number too
        n = _new_int(int(value), rng, year)
        return (n if isinstance(value, int) else float(n)), str(n)
    lo, hi = value * 0.5, value * 1.5
    if 0 < value < 1:
        hi = min(hi, 0.99)  # a probability or a rate stays below 1
    x = round(rng.uniform(min(lo, hi), max(lo, hi)), decimals)
    return x, f"{x:.{decimals}f}"


def _distinct(a: Any, b: Any) -> bool:
    """Neither text holds the other: `Apple Inc.` is not another `Apple`, and the old one must vanish."""
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() not in b.lower() and b.lower() not in a.lower()
    return a != b


def replacement(slot: Slot, query: str, pool: list[str], rng: random.Random) -> tuple[Any, str] | None:
    """A different value of the slot's kind that the query does not already state, with its text."""
    if slot.kind == "enum":
        options = [v for v in slot.schema["enum"]
                   if _distinct(v, slot.value) and value_text(v) and not occurs(query, v)]
        if not options:
            return None
        v = rng.choice(options)
        return v, value_text(v)[-1]
    if slot.kind == "number":
        year = any(w in f"{slot.param} {slot.schema.get('description', '')}".lower() for w in ("year", "date"))
        for _ in range(10):
            v, text = new_number(slot.value, slot.text, rng, year)
            if v != slot.value and not occurs(query, v):
                return v, text
        return None
    ratio = (1 / 3, 3)
    options = [s for s in pool if _distinct(s, slot.value) and not occurs(query, s)
               and ratio[0] <= len(s) / len(slot.value) <= ratio[1]]
    if not options:
        return None
    v = rng.choice(options)
    return v, v


def replace_values(value: Any, swaps: dict[str, Any]) -> Any:
    """Every scalar whose text is a swapped slot's text takes the slot's new value."""
    if isinstance(value, dict):
        return {k: replace_values(v, swaps) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_values(v, swaps) for v in value]
    for text in value_text(value):
        if text in swaps:
            return swaps[text]
    return value


def rewrite(query: str, edits: list[tuple[tuple[int, int], str]]) -> str:
    """The query with non-overlapping spans replaced, right to left so earlier spans stay valid."""
    for (start, end), text in sorted(edits, reverse=True):
        query = query[:start] + text + query[end:]
    return query
