import json

import jsonschema
import pytest

from fcdistill.bfcl_env import bfcl_data_dir
from fcdistill.data.bfcl import category_language
from fcdistill.tools import (ToolCall, ToolSchemaError, call_errors, call_violations, normalize_tool, normalize_tools,
                             tool_validators)

BFCL_FN = {
    "name": "math.factorial",
    "description": "Factorial.",
    "parameters": {
        "type": "dict",
        "properties": {
            "n": {"type": "integer", "description": "number"},
            "scale": {"type": "float", "default": 1.0},
            "pair": {"type": "tuple", "items": {"type": "string"}},
            "meta": {"type": "dict", "properties": {"unit": {"type": "string", "enum": ["a", "b"]}},
                     "required": ["unit"]},
            "anything": {"type": "any"},
            "flags": {"type": "array", "items": {"type": "boolean"}},
        },
        "required": ["n"],
    },
}


def test_bfcl_types_map_to_json_schema():
    spec = normalize_tool(BFCL_FN)
    props = spec.parameters["properties"]
    assert spec.name == "math.factorial"  # dots stay
    assert spec.parameters["type"] == "object"
    assert props["n"]["type"] == "integer"
    assert props["scale"] == {"type": "number", "default": 1.0}
    assert props["pair"] == {"type": "array", "items": {"type": "string"}}
    assert props["meta"]["type"] == "object" and props["meta"]["required"] == ["unit"]
    assert props["meta"]["properties"]["unit"]["enum"] == ["a", "b"]
    assert "type" not in props["anything"]
    assert props["flags"]["items"] == {"type": "boolean"}
    jsonschema.Draft202012Validator.check_schema(spec.parameters)


def test_three_dialects_agree():
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    openai = normalize_tool({"type": "function", "function": {"name": "weather", "description": "d", "parameters": params}})
    bare = normalize_tool({"name": "weather", "description": "d", "parameters": params})
    bedrock = normalize_tool({"toolSpec": {"name": "weather", "description": "d", "inputSchema": {"json": params}}})
    assert openai == bare == bedrock
    assert normalize_tool(openai.to_bedrock()) == openai
    assert normalize_tool(openai.to_openai()) == openai


def test_java_types_become_source_strings():
    fn = {"name": "X.y", "description": "d", "parameters": {"type": "dict", "properties": {
        "n": {"type": "long", "description": "count"},
        "items": {"type": "ArrayList", "items": {"type": "String"}, "description": "list"}}, "required": ["n"]}}
    spec = normalize_tool(fn, language="java")
    assert spec.parameters["properties"]["n"]["type"] == "string"
    assert "Java long" in spec.parameters["properties"]["n"]["description"]
    assert "String" in spec.parameters["properties"]["items"]["description"]
    # read as plain schema, the Java names map the way BFCL maps them
    plain = normalize_tool(fn)
    assert plain.parameters["properties"]["n"]["type"] == "integer"
    assert plain.parameters["properties"]["items"]["type"] == "array"


@pytest.mark.parametrize("bad,why", [
    ({"name": "", "parameters": {}}, "name"),
    ({"name": "f", "parameters": {"type": "dict", "properties": {"a": {"type": "complex"}}}}, "unknown parameter type"),
    ({"name": "f", "parameters": {"type": "dict", "properties": {}, "required": ["ghost"]}}, "undefined properties"),
    ({"name": "f", "parameters": {"type": "string"}}, "type object"),
    ({"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}}, "invalid JSON Schema"),
])
def test_invalid_tools_name_the_problem(bad, why):
    with pytest.raises(ToolSchemaError, match=why):
        normalize_tool(bad)


def test_duplicate_names_rejected():
    with pytest.raises(ToolSchemaError, match="duplicate"):
        normalize_tools([{"name": "f"}, {"name": "f"}])


def test_call_errors_cover_unknown_functions_and_arguments():
    tools = [normalize_tool(BFCL_FN)]
    assert call_errors(ToolCall(name="math.factorial", arguments={"n": 5}), tools) == []
    assert call_errors(ToolCall(name="nope", arguments={}), tools) == ["unknown function 'nope'"]
    assert any("required" in e for e in call_errors(ToolCall(name="math.factorial", arguments={}), tools))
    assert any("Additional properties" in e for e in call_errors(ToolCall(name="math.factorial", arguments={"n": 1, "zzz": 2}), tools))
    assert any("integer" in e for e in call_errors(ToolCall(name="math.factorial", arguments={"n": 1.5}), tools))


# value for `n` (BFCL "integer") / `scale` (BFCL "float"); BFCL's own checker decides what is right
NUMBER_CASES = [({"n": 5}, True), ({"n": 5.0}, False), ({"n": True}, False), ({"n": 5.5}, False),
                ({"n": 5, "scale": 2}, True), ({"n": 5, "scale": 2.5}, True), ({"n": 5, "scale": False}, False)]


@pytest.mark.parametrize("args,fits", NUMBER_CASES)
def test_integer_and_float_follow_bfcls_checker(args, fits):
    """Our one validator and bfcl_eval's ast_checker agree on integer-valued floats (rejected for an
    integer), ints for a float (accepted) and booleans (never numbers): a target we accept is one BFCL
    scores as correct."""
    from fcdistill.bfcl_env import bfcl_import

    checker = bfcl_import("bfcl_eval.eval_checker.ast_eval.ast_checker", "simple_function_checker")
    language = bfcl_import("bfcl_eval.constants.enums", "Language")
    fn = {"name": "f", "parameters": {"type": "dict", "required": ["n"], "properties": {
        "n": {"type": "integer"}, "scale": {"type": "float"}}}}
    scale = args.get("scale")
    answer = {"f": {"n": [5], "scale": [float(scale) if type(scale) in (int, float) else "", ""]}}  # correct values
    bfcl = checker(fn, {"f": args}, answer, language.PYTHON, "gorilla-openfunctions-v2")
    ours = call_errors(ToolCall(name="f", arguments=args), [normalize_tool(fn)])
    assert (not ours) == fits, ours
    assert bfcl["valid"] == fits, bfcl


def test_validators_are_built_once_per_tool_set():
    tools = [normalize_tool(BFCL_FN)]
    same = [normalize_tool(BFCL_FN)]  # equal content, another object
    assert tool_validators(tools) is tool_validators(same)
    other = [normalize_tool({**BFCL_FN, "name": "g"})]
    assert tool_validators(other) is not tool_validators(tools)
    (v,) = call_violations(ToolCall(name="math.factorial", arguments={"n": 2.0}), tools)
    assert (v.keyword, v.path) == ("type", "n")


def _all_bfcl_functions():
    data = bfcl_data_dir()
    for path in sorted(data.glob("BFCL_v4_*.json")):
        category = path.stem.removeprefix("BFCL_v4_")
        if category == "format_sensitivity":  # a JSON document of id lists, not question records
            continue
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if isinstance(item, dict) and "function" in item:
                for fn in item["function"]:
                    yield category, item["id"], fn
    for path in sorted((data / "multi_turn_func_doc").glob("*.json")):
        for line in path.read_text().splitlines():
            if line.strip():
                yield "multi_turn", path.name, json.loads(line)


def test_every_bfcl_function_normalizes_to_valid_json_schema():
    n = 0
    categories = set()
    for category, item_id, fn in _all_bfcl_functions():
        spec = normalize_tool(fn, category_language(category))
        jsonschema.Draft202012Validator.check_schema(spec.parameters)
        assert spec.name == fn["name"], item_id
        n += 1
        categories.add(category)
    assert {"simple_python", "simple_java", "simple_javascript", "live_multiple", "multi_turn"} <= categories
    assert n > 5000
