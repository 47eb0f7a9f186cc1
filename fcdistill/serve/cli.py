"""`fcd serve`: the OpenAI-compatible endpoint over the hf (default) or vllm engine."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
from typing import Annotated

import typer

from fcdistill.errors import fail


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
        jump_forward: Annotated[bool, typer.Option("--jump-forward/--no-jump-forward", help=(
            "hf: where the grammar admits one token only (JSON punctuation, the rest of a name, end-of-turn), "
            "append it without sampling it and run it in the next forward pass with the token before it."))] = True,
        prompt_lookup: Annotated[int, typer.Option(min=0, help=(
            "hf: speculative decoding by prompt lookup for greedy requests (temperature 0): guess up to N tokens "
            "from where the latest tokens occurred before in the prompt or the answer (argument values copied from "
            "the request, a tool result repeated) and check them in the same forward pass; answers stay greedy's. "
            "0 turns it off."))] = 6,
        prompt_lookup_max_batch: Annotated[int, typer.Option(min=1, help=(
            "hf: draft only while at most this many requests decode together (wider batches keep the CPU busy "
            "without drafts)."))] = 2,
        prefix_cache_mb: Annotated[float, typer.Option(min=0, help=(
            "hf: memory for recent prompts' keys and values, reused by requests that start the same way (the "
            "tools, earlier turns); 0 turns it off. vllm: its own prefix caching, always on."))] = 512.0,
        dtype: Annotated[str, typer.Option(help=(
            "Weights and activations: auto (bf16 on a GPU, fp32 on a CPU), fp32, or bf16 (on a CPU only with "
            "native bf16: AVX512-BF16 or AMX)."))] = "auto",
        batching: Annotated[str, typer.Option(
            help="hf: continuous (requests join a running batch) or static (each batch runs to the end first).")] = "continuous",
        merge_adapters: Annotated[str, typer.Option(help=(
            "hf: serve each adapter as a copy of the base with it merged in, so neither the base nor the adapter "
            "pays PEFT's per-layer cost: auto (while the copies take at most half the free memory), on, or off "
            "(PEFT layers, one copy of the weights)."))] = "auto",
        gpu_memory_utilization: Annotated[float | None, typer.Option(
            help="vllm: fraction of GPU memory (on CPU: of RAM) for weights and KV cache [GPU 0.9, CPU 0.3].")] = None,
        max_model_len: Annotated[int | None, typer.Option(help="vllm: context length (default: the model's).")] = None,
        guard: Annotated[bool, typer.Option("--guard/--no-guard", help=(
            "Close every constrained answer within max_tokens and steer looping values to close; --no-guard "
            "only to measure what that changes."))] = True,
        value_token_limit: Annotated[int | None, typer.Option(help=(
            "Loop guard: tokens one string, array or object value inside a call may take before it is closed "
            "[default 256: BFCL's longest is 92]."), min=1)] = None,
        same_call_limit: Annotated[int, typer.Option(min=1, help=(
            "Loop guard: copies of one call (the same text, name and arguments) an answer may hold; the next copy closes "
            "the answer and is dropped [default 1; raise it for tools such as dice that one answer may call "
            "twice alike; not used with --no-guard]."))] = 1,
        log_requests: Annotated[bool, typer.Option("--log-requests", help=(
            "Access log on stderr: client, method, path, status, seconds, model and tokens of each request."))] = False,
        enforce_eager: Annotated[bool, typer.Option("--enforce-eager", help=(
            "vllm: skip torch.compile (starts about a minute sooner on CPU, decodes slower)."))] = False,
        max_concurrent_requests: Annotated[int, typer.Option(min=1, help=(
            "Requests in flight at once (waiting or generating); one more gets a 429 with Retry-After."))] = 64,
        max_tools: Annotated[int, typer.Option(min=1, help="Tools one request may carry (400 above).")] = 128,
        max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body (413 above).")] = 8 * 1024 * 1024,
        max_tokens: Annotated[int | None, typer.Option(min=1, help=(
            "Cap on a request's max_tokens (400 above; the default when a request gives none) [default: the context].")
        )] = None,
        max_prompt_tokens: Annotated[int | None, typer.Option(min=1, help=(
            "Longest prompt in tokens (400 above) [default: the context length less one]."))] = None,
        grammar_timeout: Annotated[float, typer.Option(min=0.001, help=(
            "Seconds a request waits for a new tool set's grammar to compile; longer is a 503 with "
            "Retry-After (the compile goes on, is cached, and a retry joins it)."))] = 60.0,
        grammar_backend: Annotated[str, typer.Option(help=(
            "What masks constrained tokens. outlines compiles each new tool set's automaton up front "
            "(0.1-3 s on a CPU); llguidance builds a matcher in ~1 ms and masks lazily, compiling outlines' "
            "automaton in the background only when max_tokens or the loop guard could narrow an answer."))] = "outlines",
        grammar_cache_mb: Annotated[float, typer.Option(min=1, help=(
            "Memory for compiled grammars, least recently used dropped first (a small tool set's takes ~1 MB)."))] = 256.0,
        on_engine_failure: Annotated[str, typer.Option(help=(
            "exit: stop the server with exit code 3 when the engine dies (a supervisor restarts it); restart "
            "(hf engine): start a new scheduler, at most 3 times a minute, then exit."))] = "exit",
    ) -> None:
        """Serve a student behind /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
        from fcdistill.serve.memory import tune_malloc

        tune_malloc()  # before anything allocates much: bounded RSS, no page faults a decode step (serve/memory.py)

        adapters: dict[str, str] = {}
        for item in adapter:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                fail(f"--adapter expects NAME=PATH, got {item!r}")
            if not os.path.isdir(path):
                fail(f"--adapter {name}: {path} is not a directory")
            adapters[name] = path
        if batching not in ("continuous", "static"):
            fail(f"unknown --batching {batching!r}; choose continuous or static")
        if engine not in ("hf", "vllm"):
            fail(f"unknown --engine {engine!r}; choose hf or vllm")
        from fcdistill.grammars.constraint import BACKENDS

        if grammar_backend not in BACKENDS:
            fail(f"unknown --grammar-backend {grammar_backend!r}; choose {' or '.join(BACKENDS)}")
        if grammar_backend == "llguidance" and importlib.util.find_spec("llguidance") is None:
            fail("--grammar-backend llguidance needs llguidance in this environment: pip install llguidance")
        if on_engine_failure not in ("exit", "restart"):
            fail(f"unknown --on-engine-failure {on_engine_failure!r}; choose exit or restart")
        if on_engine_failure == "restart" and engine == "vllm":
            fail("--on-engine-failure restart is for the hf engine; vLLM's engine core cannot be restarted in "
                 "place (use exit and a supervisor)")
        from fcdistill.serve.limits import ServeLimits

        limits = ServeLimits(max_concurrent_requests=max_concurrent_requests, max_tools=max_tools,
                             max_body_bytes=max_body_bytes, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                             grammar_timeout_s=grammar_timeout)
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            fail("--engine vllm needs vLLM in this environment: on GPU `pip install vllm`; on CPU run "
                 "scripts/setup_vllm.sh and use .venv-vllm/bin/fcd")
        from fcdistill.models import ModelResolveError, cache_dir

        if engine == "vllm":
            from fcdistill.serve.engines.vllm_env import ENV_FLAG, die_with_parent_after_fork, quiet_vllm_environment

            quiet_vllm_environment(cache_dir())  # before vLLM is imported: its processes read it at start
            os.environ[ENV_FLAG] = str(os.getpid())  # vLLM's processes die with this one (engines/vllm_env.py)
            die_with_parent_after_fork()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars: the start-up line says what loaded

        from fcdistill.grammars import LoopGuard, set_grammar_cache_limit
        from fcdistill.serve.app import create_app
        from fcdistill.serve.lifecycle import serve as run_server
        from fcdistill.serve.lifecycle import start_line

        try:
            if engine == "vllm":
                from fcdistill.serve.engines.vllm import VLLMEngine

                eng = VLLMEngine(model, adapters, fc_token=fc_token, served_name=served_model_name or model,
                                 max_batch=max_batch, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                                 max_model_len=max_model_len, enforce_eager=enforce_eager)
            else:
                from fcdistill.serve.engines.hf import HFEngine

                eng = HFEngine(model, adapters, fc_token=fc_token, served_name=served_model_name or model, max_batch=max_batch,
                               continuous=batching == "continuous", restart_on_failure=on_engine_failure == "restart",
                               dtype=dtype, prefix_cache_mb=prefix_cache_mb, jump_forward=jump_forward,
                               merge_adapters=merge_adapters, prompt_lookup=prompt_lookup,
                               prompt_lookup_max_batch=prompt_lookup_max_batch)
        except (ModelResolveError, OSError, ValueError) as exc:
            fail(str(exc).splitlines()[0])
        set_grammar_cache_limit(grammar_cache_mb)
        key = api_key or os.environ.get("FCD_API_KEY") or None
        limits_of_values = {"value_tokens": value_token_limit} if value_token_limit else {}
        loop_guard = LoopGuard(**limits_of_values, same_calls=same_call_limit) if guard else None
        shown_host = f"[{host}]" if ":" in host else host
        announce = start_line(f"http://{shown_host}:{port}", engine, eng.model_name, eng.adapters, bool(key))
        failed: list[str] = []

        def engine_failed(reason: str) -> None:  # the server stops as on SIGTERM, then exits 3
            failed.append(reason)
            print(f"fcd serve: {reason}; stopping", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

        run_server(create_app(eng, api_key=key, guard=loop_guard, limits=limits, on_engine_failure=engine_failed,
                              grammar_backend=grammar_backend),
                   host, port, announce, log_requests=log_requests, stop_engine=lambda: asyncio.run(eng.shutdown()))
        if failed:
            raise typer.Exit(3)
