"""Name masking (as Hammer does): plausible identifiers replace function and parameter names.

The new names come from word lists (`fetch_order_status`, `calc_mean`), in the style of the name they
replace (snake_case, camelCase, dotted `module.func`), so a masked tool still looks like a real one;
its description is kept, so the only way to pick the right tool and argument is to read it.
Parameter names are renamed at every nesting level reached through `properties` and `items`
(required lists follow); the target's argument keys are renamed through the same schema walk, so a
free-form dict argument keeps its own keys.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable

VERBS = ("fetch", "get", "compute", "calc", "find", "lookup", "resolve", "load", "build", "check", "list",
         "query", "estimate", "derive", "evaluate", "render", "convert", "sync", "scan", "track", "measure",
         "rank", "score", "filter", "merge", "parse", "plan", "send", "update", "apply", "count", "analyze",
         "predict", "locate", "record", "verify", "summarize", "format", "map", "run", "read", "make")
NOUNS = ("order", "status", "mean", "record", "account", "item", "route", "entry", "batch", "profile", "report",
         "signal", "metric", "asset", "ticket", "quote", "region", "index", "ledger", "sample", "vector",
         "event", "window", "channel", "segment", "token", "payload", "schedule", "forecast", "inventory",
         "invoice", "catalog", "session", "rating", "balance", "threshold", "matrix", "series", "volume",
         "budget", "margin", "shipment", "journey", "venue", "policy", "contract", "module", "cluster", "node",
         "packet", "frame", "layer", "grid", "zone", "unit", "label", "value", "amount", "level", "range",
         "limit", "rate", "ratio", "span", "delta", "offset", "weight", "factor", "total", "mode", "kind",
         "flag", "key", "code", "tag", "path", "field", "query", "result", "detail", "option", "period")
QUALIFIERS = ("max", "min", "base", "primary", "raw", "net", "target", "default", "local", "global", "current",
              "next", "prev", "input", "output", "avg", "start", "end", "first", "last", "new", "main", "extra",
              "final", "source", "ref")

_IDENTIFIER = re.compile(r"[_.]|[a-z][A-Z]")


def is_identifier_like(name: str) -> bool:
    """A name with `_`, `.` or an inner capital reads as code, not as an English word, so it can be
    replaced where a query quotes it; a bare word such as `sort` or `base` must stay in the query."""
    return bool(_IDENTIFIER.search(name))


def _join(words: list[str], camel: bool) -> str:
    return words[0] + "".join(w.capitalize() for w in words[1:]) if camel else "_".join(words)


def _camel(name: str) -> bool:
    return bool(re.search(r"[a-z][A-Z]", name))


def _function_name(old: str, rng: random.Random, camel: bool) -> str:
    """verb_noun[_noun], with a `module.` prefix when the original had one; camelCase when asked."""
    prefix, _, _ = old.rpartition(".")
    words = [rng.choice(VERBS), rng.choice(NOUNS)]
    if rng.random() < 0.5:
        words.append(rng.choice(NOUNS))
    name = _join(words, camel)
    if prefix:
        module = rng.choice(NOUNS)
        name = f"{module.capitalize() if prefix[:1].isupper() else module}.{name}"
    return name


def _param_name(old: str, rng: random.Random, camel: bool) -> str:
    words = [rng.choice(QUALIFIERS), rng.choice(NOUNS)] if rng.random() < 0.6 else [rng.choice(NOUNS)]
    return _join(words, camel)


def property_names(schema: Any) -> list[str]:
    """Every property name reachable through `properties` and `items`, in schema order."""
    out: list[str] = []
    if isinstance(schema, dict):
        for name, sub in (schema.get("properties") or {}).items():
            out.append(name)
            out += property_names(sub)
        if isinstance(schema.get("items"), dict):
            out += property_names(schema["items"])
    return out


def name_words(name: str) -> set[str]:
    """The words of an identifier: `getUserName`, `get_user.name` -> {get, user, name}."""
    return {w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])", name) if w}


def _fresh_names(olds: list[str], make: Callable[[str, random.Random, bool], str], rng: random.Random,
                 taken: set[str], camel: bool) -> dict[str, str]:
    """An injective old -> new map. New names avoid `taken` (which grows with them) and every word of
    `taken`'s old names, so `height` never becomes `base_value` beside a masked `base`. camelCase when
    `camel` (Java and JavaScript tools) or where the old name was."""
    avoid = {w for name in taken for w in name_words(name)}
    out: dict[str, str] = {}
    for old in dict.fromkeys(olds):
        style = camel or _camel(old.rpartition(".")[2])
        for _ in range(50):
            new = make(old, rng, style)
            if new not in taken and not name_words(new) & avoid:
                break
        else:
            new = f"{make(old, rng, style)}{len(taken)}"
        taken.add(new)
        out[old] = new
    return out


def function_map(names: list[str], rng: random.Random, taken: set[str], camel: bool = False) -> dict[str, str]:
    return _fresh_names(names, _function_name, rng, taken, camel)


def param_map(names: list[str], rng: random.Random, taken: set[str], camel: bool = False) -> dict[str, str]:
    return _fresh_names(names, _param_name, rng, taken, camel)


def rename_schema(schema: Any, names: dict[str, str]) -> Any:
    """The schema with property names (and required lists) renamed, through properties and items."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {names.get(k, k): rename_schema(v, names) for k, v in schema["properties"].items()}
        if isinstance(schema.get("required"), list):
            out["required"] = [names.get(k, k) for k in schema["required"]]
    if isinstance(schema.get("items"), dict):
        out["items"] = rename_schema(schema["items"], names)
    return out


def rename_value(value: Any, schema: Any, names: dict[str, str]) -> Any:
    """An argument value with the keys its schema names renamed, walking the (old) schema."""
    if not isinstance(schema, dict):
        return value
    props = schema.get("properties")
    if isinstance(value, dict) and isinstance(props, dict):
        return {(names.get(k, k) if k in props else k): rename_value(v, props.get(k), names)
                for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [rename_value(v, schema["items"], names) for v in value]
    return value


def rename_in_text(text: str, names: dict[str, str]) -> str:
    """Replace identifier-like names where the text quotes them whole (a query naming its function)."""
    quoted = sorted((n for n in names if is_identifier_like(n)), key=len, reverse=True)
    if not quoted:
        return text
    pattern = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, quoted)) + r")(?![\w]|\.\w)")
    return pattern.sub(lambda m: names[m.group(1)], text)
