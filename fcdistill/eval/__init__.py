"""BFCL evaluation of any OpenAI-compatible endpoint, scored by bfcl_eval's own ast_checker.

Python API (imports stay light until called):
    run_eval(endpoint, model, data_dir, categories, out_dir, mode="fc", concurrency=4, api_key=None,
             max_tokens=512, **options) -> summary dict
    compare_runs(run_dirs, out_dir=None) -> Markdown table (also compare.{json,md,png} in out_dir)
    official_check(...), official_rescore(run_dir) -> cross-checks with bfcl-eval's own generate/evaluate
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalError", "compare_runs", "official_check", "official_rescore", "run_eval"]


def run_eval(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from fcdistill.eval.runner import run_eval as _run_eval

    return _run_eval(*args, **kwargs)


def compare_runs(*args: Any, **kwargs: Any) -> str:
    from fcdistill.eval.report import compare_runs as _compare_runs

    return _compare_runs(*args, **kwargs)


def official_check(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from fcdistill.eval.official import official_check as _official_check

    return _official_check(*args, **kwargs)


def official_rescore(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from fcdistill.eval.official import official_rescore as _official_rescore

    return _official_rescore(*args, **kwargs)


def __getattr__(name: str) -> Any:
    """EvalError on first use: importing the package (as `fcd --help` does) stays cheap."""
    if name == "EvalError":
        from fcdistill.eval.dataset import EvalError

        return EvalError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
