"""`fcd serve`: the OpenAI-compatible endpoint over the hf (default) or vllm engine."""

from __future__ import annotations

import os
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: Annotated[str, typer.Option(help="Base model: alias (smollm2-135m), local directory or hub id.")],
        adapter: Annotated[list[str], typer.Option(help="LoRA adapter as NAME=PATH; repeatable. Requests select it by model=NAME.")] = [],  # noqa: B006
        engine: Annotated[str, typer.Option(help="hf (embedded, default) or vllm.")] = "hf",
        host: Annotated[str, typer.Option(help="Interface to bind; loopback unless you mean otherwise.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port.")] = 8000,
        api_key: Annotated[str | None, typer.Option(help="Require this Bearer key on /v1/* (default: $FCD_API_KEY).")] = None,
        served_model_name: Annotated[str | None, typer.Option(help="Name clients use for the base model (default: --model).")] = None,
        fc_token: Annotated[str, typer.Option(help="Function-call token text.")] = "<tool_call>",
        max_batch: Annotated[int, typer.Option(help="Most sequences decoded together.")] = 16,
    ) -> None:
        """Serve a student behind /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
        from fcdistill.cli import fail

        adapters: dict[str, str] = {}
        for item in adapter:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                fail(f"--adapter expects NAME=PATH, got {item!r}")
            if not os.path.isdir(path):
                fail(f"--adapter {name}: {path} is not a directory")
            adapters[name] = path
        if engine != "hf":
            fail(f"unknown --engine {engine!r}; this build has: hf")
        import uvicorn

        from fcdistill.models import ModelResolveError
        from fcdistill.serve.app import create_app
        from fcdistill.serve.engines.hf import HFEngine

        try:
            eng = HFEngine(model, adapters, fc_token=fc_token, served_name=served_model_name or model, max_batch=max_batch)
        except (ModelResolveError, OSError, ValueError) as exc:
            fail(str(exc).splitlines()[0])
        key = api_key or os.environ.get("FCD_API_KEY") or None
        uvicorn.run(create_app(eng, api_key=key), host=host, port=port, log_level="warning")
