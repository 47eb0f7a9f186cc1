"""Tool definitions and calls, normalized to one shape.

Tools arrive in three dialects: OpenAI (`{"type":"function","function":{...}}` or the bare function
object), BFCL (types `dict`, `float`, `tuple`, `any`, Java/JavaScript type names) and Amazon Bedrock
(`{"toolSpec": {"inputSchema": {"json": ...}}}`). Every stage works on `ToolSpec`, whose
`parameters` is checked against the JSON Schema meta-schema, so grammars and validators can trust it.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

# BFCL's Python-flavoured type names -> JSON Schema types.
_BFCL_TYPES: dict[str, str | None] = {
    "dict": "object",
    "object": "object",
    "float": "number",
    "number": "number",
    "double": "number",
    "integer": "integer",
    "int": "integer",
    "boolean": "boolean",
    "bool": "boolean",
    "string": "string",
    "str": "string",
    "array": "array",
    "list": "array",
    "tuple": "array",
    "any": None,  # no type constraint
    "null": "null",
}

# Java type names (simple_java) when a Java tool is read as plain JSON Schema, as BFCL maps them.
_JAVA_TYPES: dict[str, str | None] = {
    "byte": "integer", "short": "integer", "long": "integer", "double": "number", "char": "string",
    "String": "string", "Boolean": "boolean", "ArrayList": "array", "Array": "array", "Queue": "array",
    "Stack": "array", "HashMap": "object", "Hashtable": "object", "Any": None,
}

_SCHEMA_KEYS_KEPT = ("description", "enum", "default", "minimum", "maximum", "exclusiveMinimum",
                     "exclusiveMaximum", "minItems", "maxItems", "minLength", "maxLength", "pattern",
                     "format", "title", "const", "additionalProperties", "nullable", "examples")


class ToolSchemaError(ValueError):
    """A tool definition that cannot be turned into a valid JSON Schema function."""


class ToolSpec(BaseModel):
    """One function a model may call; `parameters` is a JSON Schema object schema."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": self.model_dump()}

    def to_bedrock(self) -> dict[str, Any]:
        return {"toolSpec": {"name": self.name, "description": self.description,
                             "inputSchema": {"json": self.parameters}}}


class ToolCall(BaseModel):
    """A call as the wire format carries it: a function name and a JSON object of arguments."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)

    def to_bfcl(self) -> dict[str, dict[str, Any]]:
        """BFCL's decoded-call shape, `{"fn": {"arg": value}}`, as its ast_checker takes it."""
        return {self.name: dict(self.arguments)}


def _source_string_schema(node: dict[str, Any], language: str) -> dict[str, Any]:
    """A Java/JavaScript parameter: BFCL passes its value as source code in a string, and its checker
    converts that string back, so the schema is `string` with the language type in the description."""
    lang = "Java" if language == "java" else "JavaScript"
    t = node.get("type") or "any"
    desc = node.get("description", "")
    if t == "any":
        note = f"This parameter can be of any type of {lang} object in string representation."
    else:
        note = f"This is {lang} {t} type parameter in string representation."
    items = node.get("items")
    if isinstance(items, dict) and items.get("type"):
        note += f" The list elements are of type {items['type']}; they are not in string representation."
    out: dict[str, Any] = {"type": "string", "description": f"{desc} {note}".strip()}
    if "default" in node:
        out["default"] = node["default"]
    return out


def _convert_schema(node: Any, path: str) -> dict[str, Any]:
    """Map one BFCL/OpenAI schema node (recursively) to JSON Schema."""
    if not isinstance(node, dict):
        raise ToolSchemaError(f"{path}: expected a schema object, got {type(node).__name__}")
    out: dict[str, Any] = {}
    raw_type = node.get("type")
    types = raw_type if isinstance(raw_type, list) else [raw_type] if raw_type is not None else []
    json_types: list[str] = []
    for t in types:
        if not isinstance(t, str):
            raise ToolSchemaError(f"{path}: type must be a string, got {t!r}")
        mapped = _BFCL_TYPES.get(t, _JAVA_TYPES.get(t, "?"))
        if mapped == "?":
            raise ToolSchemaError(f"{path}: unknown parameter type {t!r}")
        if mapped is None:  # "any"
            json_types = []
            break
        json_types.append(mapped)
    json_types = list(dict.fromkeys(json_types))
    if len(json_types) == 1:
        out["type"] = json_types[0]
    elif json_types:
        out["type"] = json_types
    for key in _SCHEMA_KEYS_KEPT:
        if key in node:
            out[key] = copy.deepcopy(node[key])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = list(dict.fromkeys([*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]))
    if "properties" in node and ("object" in json_types or not json_types):
        props = node["properties"]
        if not isinstance(props, dict):
            raise ToolSchemaError(f"{path}.properties: expected an object")
        out["properties"] = {k: _convert_schema(v, f"{path}.{k}") for k, v in props.items()}
        if "required" in node:
            out["required"] = _required(node["required"], out["properties"], path)
    if "items" in node and ("array" in json_types or not json_types):
        items = node["items"]
        if isinstance(items, list):  # tuple-style positional items
            out["prefixItems"] = [_convert_schema(v, f"{path}[{i}]") for i, v in enumerate(items)]
        else:
            out["items"] = _convert_schema(items, f"{path}[]")
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in node:
            out[combinator] = [_convert_schema(v, f"{path}.{combinator}[{i}]") for i, v in enumerate(node[combinator])]
    if "enum" in out and out.get("type") == "integer":
        out["enum"] = [int(v) if isinstance(v, float) and v.is_integer() else v for v in out["enum"]]
    return out


def _required(required: Any, properties: dict[str, Any], path: str) -> list[str]:
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolSchemaError(f"{path}.required: expected a list of names")
    missing = [r for r in required if r not in properties]
    if missing:
        raise ToolSchemaError(f"{path}.required names undefined properties: {missing}")
    return list(required)


def _parameters_schema(params: Any, language: str, name: str) -> dict[str, Any]:
    if params is None:
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise ToolSchemaError(f"{name}: parameters must be an object")
    if params.get("type") not in (None, "dict", "object"):
        raise ToolSchemaError(f"{name}: parameters must have type object, got {params.get('type')!r}")
    props = params.get("properties") or {}
    if not isinstance(props, dict):
        raise ToolSchemaError(f"{name}.properties: expected an object")
    if language in ("java", "javascript"):
        converted = {k: _source_string_schema(v, language) if isinstance(v, dict) else _convert_schema(v, f"{name}.{k}")
                     for k, v in props.items()}
    else:
        converted = {k: _convert_schema(v, f"{name}.{k}") for k, v in props.items()}
    schema: dict[str, Any] = {"type": "object", "properties": converted}
    if "required" in params:
        schema["required"] = _required(params["required"], converted, name)
    if "additionalProperties" in params:
        schema["additionalProperties"] = params["additionalProperties"]
    return schema


def normalize_tool(tool: Any, language: str = "python") -> ToolSpec:
    """Turn an OpenAI, BFCL or Bedrock tool definition into a ToolSpec with checked JSON Schema.

    `language` is BFCL's (`python`, `java`, `javascript`); it decides how Java/JS type names map.
    """
    if isinstance(tool, ToolSpec):
        return tool
    if not isinstance(tool, dict):
        raise ToolSchemaError(f"a tool must be an object, got {type(tool).__name__}")
    if "toolSpec" in tool:
        spec = tool["toolSpec"]
        schema = (spec.get("inputSchema") or {}).get("json")
        fn = {"name": spec.get("name"), "description": spec.get("description", ""), "parameters": schema}
    elif tool.get("type") == "function" and "function" in tool:
        fn = tool["function"]
    else:
        fn = tool
    if not isinstance(fn, dict):
        raise ToolSchemaError("the function definition must be an object")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ToolSchemaError(f"a tool needs a non-empty string name, got {name!r}")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ToolSchemaError(f"{name}: description must be a string")
    parameters = _parameters_schema(fn.get("parameters"), language, name)
    check_schema(parameters, name)
    return ToolSpec(name=name, description=description, parameters=parameters)


def normalize_tools(tools: list[Any] | None, language: str = "python") -> list[ToolSpec]:
    """Normalize a list of tools; duplicate names are an error (calls could not be told apart)."""
    specs = [normalize_tool(t, language) for t in tools or []]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ToolSchemaError(f"duplicate tool name {s.name!r}")
        seen.add(s.name)
    return specs


def check_schema(schema: dict[str, Any], name: str = "tool") -> None:
    """Raise ToolSchemaError unless `schema` is valid against the JSON Schema 2020-12 meta-schema."""
    problem = _schema_problem(json.dumps(schema, sort_keys=True))
    if problem:
        raise ToolSchemaError(f"{name}: invalid JSON Schema: {problem}")


@functools.lru_cache(maxsize=4096)
def _schema_problem(schema_text: str) -> str | None:
    """Meta-schema check, cached by text: BFCL and clients repeat the same tools many times."""
    try:
        jsonschema.Draft202012Validator.check_schema(json.loads(schema_text))
    except jsonschema.SchemaError as exc:
        return exc.message
    return None


# -- argument validation: ONE implementation, used by the server, the verifier and the data checks ----
def _is_bfcl_integer(checker: Any, instance: Any) -> bool:
    """JSON Schema `integer` as BFCL's checker reads it: a Python int, never 3.0 and never True.

    bfcl_eval/eval_checker/ast_eval/ast_checker.py, `simple_function_checker` and `type_checker`:
    a value passes when `type(value) == PYTHON_TYPE_MAPPING[type]` (`"integer": int`), so 3.0 (a
    float) and True (a bool) fail an integer parameter; the only conversion it allows is the other
    way ("Allow python auto conversion from int to float": an int passes a `float` parameter), which
    JSON Schema's `number` already accepts. Plain JSON Schema would accept 3.0 as an integer; a
    target we accept must be one BFCL scores as correct, so this rule wins.
    """
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.lru_cache(maxsize=1)
def _validator_class() -> Any:
    """Draft 2020-12 with BFCL's integer rule (built once, on first use)."""
    base = jsonschema.Draft202012Validator
    return jsonschema.validators.extend(base, type_checker=base.TYPE_CHECKER.redefine("integer", _is_bfcl_integer))


@functools.lru_cache(maxsize=2048)
def _validators(tools_text: str) -> dict[str, Any]:
    """name -> validator of the closed schema (no unknown arguments), with formats asserted; cached per
    tool set, keyed by its canonical JSON: the server, labeling and augmentation check the same tools
    thousands of times."""
    cls = _validator_class()
    return {name: cls(closed_schema(params), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
            for name, params in json.loads(tools_text)}


def _tools_key(tools: list[ToolSpec]) -> str:
    return json.dumps([[t.name, t.parameters] for t in tools], sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Violation:
    """One way a call does not fit its tools: the JSON Schema keyword that failed (`unknown_function`
    when the name is not among the tools), where in the arguments, and jsonschema's message."""

    keyword: str
    path: str
    message: str


def call_violations(call: ToolCall, tools: list[ToolSpec], validators: dict[str, Any] | None = None) -> list[Violation]:
    """Every schema violation of one call, ordered by path then keyword; empty when it fits.

    `validators` (from `tool_validators`) saves rebuilding the key when many calls share one tool set."""
    v = (validators if validators is not None else tool_validators(tools)).get(call.name)
    if v is None:
        return [Violation("unknown_function", "", f"{call.name!r} is not among the tools")]
    errors = sorted(v.iter_errors(call.arguments), key=lambda e: (list(map(str, e.absolute_path)), str(e.validator)))
    return [Violation(str(e.validator), "/".join(map(str, e.absolute_path)) or "<arguments>", e.message)
            for e in errors]


def tool_validators(tools: list[ToolSpec]) -> dict[str, Any]:
    """The cached validators of a tool set (see `_validators`)."""
    return _validators(_tools_key(tools))


def call_errors(call: ToolCall, tools: list[ToolSpec]) -> list[str]:
    """Why `call` does not fit `tools` (unknown function, schema violations); empty when it fits."""
    return [f"unknown function {call.name!r}" if v.keyword == "unknown_function" else f"{call.name}: {v.path}: {v.message}"
            for v in call_violations(call, tools)]


def closed_schema(schema: Any) -> Any:
    """A copy of `schema` where objects with listed properties admit no others (no unknown arguments)."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) if k not in ("enum", "default", "const", "examples") else v
           for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: closed_schema(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


_UNSAFE_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_-]")


def is_api_safe_name(name: str) -> bool:
    """Whether OpenAI's and Bedrock's tool-name rule (^[a-zA-Z0-9_-]{1,64}$) accepts `name` as it is."""
    return 0 < len(name) <= 64 and not _UNSAFE_NAME_CHARS.search(name)


def safe_tool_names(tools: Iterable[ToolSpec | str]) -> dict[str, str]:
    """original -> API-safe name (OpenAI and Bedrock allow ^[a-zA-Z0-9_-]{1,64}$; BFCL has `math.factorial`).

    The mapping is one-to-one, so it can be reversed: names that are already safe keep themselves, and
    a name that would collide after replacing its characters gets a numbered suffix."""
    names = list(dict.fromkeys(t if isinstance(t, str) else t.name for t in tools))
    out = {n: n for n in names if is_api_safe_name(n)}
    used = set(out)
    for n in names:
        if n in out:
            continue
        base = _UNSAFE_NAME_CHARS.sub("_", n)[:64] or "fn"
        name, i = base, 1
        while name in used:
            suffix = f"_{i}"
            name, i = base[: 64 - len(suffix)] + suffix, i + 1
        used.add(name)
        out[n] = name
    return {n: out[n] for n in names}
