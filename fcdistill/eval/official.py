"""The official cross-check: bfcl-eval's own `generate` and `evaluate`, and our scorer on the same outputs.

`bfcl` only knows the models in its MODEL_CONFIG_MAPPING, so a small entry point (this module run as
`python -m fcdistill.eval.official`) registers our endpoint there in code, as a ModelConfig whose
handler is bfcl_eval's own OpenAI-compatible one, then hands the command line to bfcl's CLI. It
runs as a subprocess because bfcl_eval fixes BFCL_PROJECT_ROOT (where results and scores go) at
import time: each check gets its own root, the check's directory.

Two checks:
- `official_check`: bfcl generates answers from the endpoint for one category's eval ids
  (test_case_ids_to_generate.json) and evaluates them; we score BFCL's result file ourselves.
- `official_rescore`: our run's answers, written as BFCL result files, evaluated by bfcl.
Either way the accuracies (and the per-item verdicts) must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fcdistill.eval.dataset import EvalError, EvalItem, load_eval_set

REGISTRY = {"fc": "fcdistill-endpoint-FC", "prompt": "fcdistill-endpoint-prompt"}  # no "_": bfcl maps it to "/"
_ENV_MODEL, _ENV_MAX_TOKENS, _ENV_TOOL_CHOICE = "FCD_BFCL_MODEL", "FCD_BFCL_MAX_TOKENS", "FCD_BFCL_TOOL_CHOICE"
_ENV_MAX_STEPS = "FCD_BFCL_MAX_STEPS"  # multi-turn: bfcl's per-turn step limit, when a check sets another


# -- inside the subprocess ------------------------------------------------------------------------
def _handler_class() -> type:
    """bfcl_eval's OpenAI-compatible handler with a completion cap and an optional tool_choice.

    bfcl's handler sends no max_tokens; a local server then writes up to its context length, which on
    CPU means minutes per question of a small model's rambling. The cap is the only change.
    """
    from fcdistill.bfcl_env import bfcl_import

    base = bfcl_import("bfcl_eval.model_handler.api_inference.openai_completion", "OpenAICompletionsHandler")

    class FcdOpenAICompletionsHandler(base):  # type: ignore[misc, valid-type]
        def generate_with_backoff(self, **kwargs: Any) -> Any:
            if os.environ.get(_ENV_MAX_TOKENS):
                kwargs.setdefault("max_tokens", int(os.environ[_ENV_MAX_TOKENS]))
            if os.environ.get(_ENV_TOOL_CHOICE) and kwargs.get("tools"):
                kwargs.setdefault("tool_choice", os.environ[_ENV_TOOL_CHOICE])
            return super().generate_with_backoff(**kwargs)

    return FcdOpenAICompletionsHandler


def register_model(mode: str, model_name: str, names_as_sent: bool) -> str:
    """Register our endpoint in bfcl_eval's MODEL_CONFIG_MAPPING (this process only); returns its key.

    `names_as_sent`: the answers carry BFCL's names with their dots (our runs); otherwise bfcl's handler
    sent `math_factorial` for `math.factorial` and its checker must map names the same way.
    """
    from fcdistill.bfcl_env import bfcl_import

    model_config = bfcl_import("bfcl_eval.constants.model_config")
    key = REGISTRY[mode]
    model_config.MODEL_CONFIG_MAPPING[key] = model_config.ModelConfig(
        model_name=model_name, display_name=f"{model_name} via fcdistill ({mode})", url="https://example.invalid/fcdistill",
        org="fcdistill", license="Apache-2.0", model_handler=_handler_class(), input_price=None, output_price=None,
        is_fc_model=mode == "fc", underscore_to_dot=mode == "fc" and not names_as_sent)
    return key


def main(argv: list[str]) -> None:
    """`python -m fcdistill.eval.official MODE NAMES_AS_SENT BFCL-ARGS...` (BFCL_PROJECT_ROOT set by the caller)."""
    mode, names_as_sent, *bfcl_args = argv
    register_model(mode, os.environ.get(_ENV_MODEL, "model"), names_as_sent == "1")
    from fcdistill.bfcl_env import bfcl_import

    if os.environ.get(_ENV_MAX_STEPS):  # the inference loop reads this module global at each step
        bfcl_import("bfcl_eval.model_handler.base_handler").MAXIMUM_STEP_LIMIT = int(os.environ[_ENV_MAX_STEPS])

    cli = bfcl_import("bfcl_eval.__main__", "cli", project_root=os.environ["BFCL_PROJECT_ROOT"])
    sys.argv = ["bfcl", *bfcl_args]
    cli()


# -- the caller's side ----------------------------------------------------------------------------
def _bfcl(root: Path, mode: str, names_as_sent: bool, args: list[str], env: dict[str, str], timeout_s: float) -> None:
    log = root / "bfcl.log"
    cmd = [sys.executable, "-m", "fcdistill.eval.official", mode, "1" if names_as_sent else "0", *args]
    full_env = {**os.environ, "BFCL_PROJECT_ROOT": str(root), "PYTHONUNBUFFERED": "1", **env}
    full_env.setdefault("OPENAI_API_KEY", "EMPTY")  # bfcl's handler builds an OpenAI client even to evaluate
    with log.open("a", encoding="utf-8") as f:
        f.write(f"\n$ bfcl {' '.join(args)}\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise EvalError(f"`bfcl {args[0]}` ran past {timeout_s:g}s; see {log}") from None
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise EvalError(f"`bfcl {args[0]}` failed (exit {proc.returncode}): {tail[0][:200] if tail else ''}; see {log}")


def _find(root: Path, kind: str, key: str, category: str) -> Path:
    hits = sorted((root / kind / key).rglob(f"BFCL_v4_{category}_{kind}.json"))
    if not hits:
        raise EvalError(f"bfcl wrote no {kind} file for {category} under {root / kind / key}; see {root / 'bfcl.log'}")
    return hits[0]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def official_scores(root: Path, key: str, category: str) -> dict[str, Any]:
    """bfcl's score file: its header (accuracy, counts) and the ids it judged wrong."""
    rows = _read_jsonl(_find(root, "score", key, category))
    header, wrong = rows[0], rows[1:]
    return {"accuracy": header["accuracy"], "correct": header["correct_count"], "total": header["total_count"],
            "wrong_ids": sorted(r["id"] for r in wrong)}


def _step_from_bfcl(step: Any) -> dict[str, Any]:
    if isinstance(step, list) and all(isinstance(d, dict) for d in step):
        return {"content": None, "tool_calls": [{"name": k, "arguments": v if isinstance(v, str) else json.dumps(v)}
                                                for d in step for k, v in d.items()]}
    return {"content": None if step is None else str(step), "tool_calls": []}


def _step_to_bfcl(step: dict[str, Any]) -> Any:
    calls = step.get("tool_calls") or []
    if calls:
        return [{c["name"]: c.get("arguments") or "{}"} for c in calls]
    return step.get("content") or ""


def output_from_bfcl_result(result: Any, mode: str, item: EvalItem) -> dict[str, Any]:
    """bfcl's raw `result` as one of our output rows; bfcl's `.`->`_` renaming is mapped back."""
    if item.entry is not None:  # multi-turn: a list of turns, each a list of steps
        if not isinstance(result, list):
            return {"id": item.id, "category": item.category, "mode": mode, "error": str(result)}
        return {"id": item.id, "category": item.category, "mode": mode,
                "turns": [[_step_from_bfcl(s) for s in turn] for turn in result]}
    if mode == "prompt":
        return {"id": item.id, "category": item.category, "mode": mode, "content": result if isinstance(result, str) else str(result)}
    if isinstance(result, list) and all(isinstance(d, dict) for d in result):
        back = {f["name"].replace(".", "_"): f["name"] for f in item.functions if "." in f["name"]}
        calls = [{"name": k, "arguments": v if isinstance(v, str) else json.dumps(v)} for d in result for k, v in d.items()]
        return {"id": item.id, "category": item.category, "mode": mode, "content": None, "tool_calls": calls,
                "name_map": back}
    return {"id": item.id, "category": item.category, "mode": mode, "content": None if result is None else str(result)}


def bfcl_result_from_output(output: dict[str, Any]) -> Any:
    """One of our output rows as bfcl's handler would have written its `result` (names as BFCL has them)."""
    if output.get("error"):
        return f"Error during inference: {output['error']}"
    if "turns" in output:
        return [[_step_to_bfcl(s) for s in turn] for turn in output["turns"]]
    if output.get("mode") == "prompt":
        return output.get("content") or ""
    back = output.get("name_map") or {}
    calls = output.get("tool_calls") or []
    if calls:
        return [{back.get(c["name"], c["name"]): c.get("arguments") or "{}"} for c in calls]
    return output.get("content") or ""


def _compare(category: str, items: list[EvalItem], outputs: dict[str, dict[str, Any]],
             official: dict[str, Any]) -> dict[str, Any]:
    from fcdistill.eval.score import Scorer

    scorer = Scorer()
    scores = [scorer.score(it, outputs[it.id]) for it in items if it.id in outputs]
    ours_wrong = sorted(s.id for s in scores if not s.valid)
    correct = sum(s.valid for s in scores)
    ours = {"accuracy": correct / len(scores) if scores else None, "correct": correct, "total": len(scores),
            "wrong_ids": ours_wrong}
    differ = sorted(set(ours_wrong) ^ set(official["wrong_ids"]))
    return {"category": category, "official": official, "ours": ours,
            "same_accuracy": ours["correct"] == official["correct"] and ours["total"] == official["total"],
            "same_items": not differ, "disagreements": differ,
            "items": [{"id": s.id, "valid": s.valid, "error_type": s.error_type, "error": s.error} for s in scores]}


def official_check(endpoint: str, model: str, data_dir: str | Path, category: str, out_dir: str | Path,
                   mode: str = "fc", limit: int | None = None, max_tokens: int = 256, api_key: str | None = None,
                   tool_choice: str | None = None, temperature: float = 0.0, num_threads: int = 2,
                   timeout_s: float = 1800.0, max_steps: int | None = None) -> dict[str, Any]:
    """bfcl generate + evaluate against the endpoint for one category's eval ids; our score of the same outputs."""
    from fcdistill.eval.runner import check_endpoint, normalize_endpoint

    if mode not in REGISTRY:
        raise EvalError(f"--mode must be fc or prompt, got {mode!r}")
    endpoint = normalize_endpoint(endpoint)
    _, _, items = load_eval_set(data_dir, [category], limit)
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_case_ids_to_generate.json").write_text(json.dumps({category: [it.id for it in items]}, indent=2) + "\n")
    check_endpoint(endpoint, api_key)
    key = REGISTRY[mode]
    env = {"OPENAI_BASE_URL": endpoint, _ENV_MODEL: model, _ENV_MAX_TOKENS: str(max_tokens)}
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    if tool_choice:
        env[_ENV_TOOL_CHOICE] = tool_choice
    if max_steps is not None:
        env[_ENV_MAX_STEPS] = str(max_steps)
    t0 = time.time()
    _bfcl(root, mode, False, ["generate", "--model", key, "--run-ids", "--num-threads", str(num_threads),
                              "--temperature", str(temperature)], env, timeout_s)
    _bfcl(root, mode, False, ["evaluate", "--model", key, "--test-category", category, "--partial-eval"], env, timeout_s)
    official = official_scores(root, key, category)
    results = {r["id"]: r["result"] for r in _read_jsonl(_find(root, "result", key, category))}
    outputs = {it.id: output_from_bfcl_result(results[it.id], mode, it) for it in items if it.id in results}
    report = {**_compare(category, items, outputs, official), "mode": mode, "model": model, "endpoint": endpoint,
              "seconds": round(time.time() - t0, 1), "bfcl_root": str(root)}
    (root / "crosscheck.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def official_rescore(run_dir: str | Path, out_dir: str | Path | None = None, timeout_s: float = 900.0) -> dict[str, Any]:
    """bfcl evaluate on our run's own answers (written as bfcl result files), category by category."""
    from fcdistill.eval.runner import OUTPUTS, RUN_INFO, read_outputs

    run = Path(run_dir)
    info_path = run / RUN_INFO
    if not info_path.is_file():
        raise EvalError(f"{run} has no {RUN_INFO}: is it an `fcd eval run` output dir?")
    info = json.loads(info_path.read_text())
    mode = info["identity"]["mode"]
    outputs = read_outputs(run / OUTPUTS)
    if not outputs:
        raise EvalError(f"{run / OUTPUTS} holds no answers to evaluate")
    categories = list(dict.fromkeys(o["category"] for o in outputs.values()))
    _, _, items = load_eval_set(info["identity"]["data_dir"], categories)
    items = [it for it in items if it.id in outputs]
    root = Path(out_dir or run / "official").resolve()
    key = REGISTRY[mode]
    model_dir = root / "result" / key
    model_dir.mkdir(parents=True, exist_ok=True)
    for category in categories:
        rows = [{"id": it.id, "result": bfcl_result_from_output(outputs[it.id])} for it in items if it.category == category]
        (model_dir / f"BFCL_v4_{category}_result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _bfcl(root, mode, True, ["evaluate", "--model", key, "--test-category", ",".join(categories), "--partial-eval"],
          {_ENV_MODEL: info["identity"]["model"]}, timeout_s)
    reports = [_compare(c, [it for it in items if it.category == c], outputs, official_scores(root, key, c))
               for c in categories]
    report = {"run": str(run), "mode": mode, "categories": reports,
              "all_agree": all(r["same_accuracy"] and r["same_items"] for r in reports), "bfcl_root": str(root)}
    (root / "crosscheck.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
