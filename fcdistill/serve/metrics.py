"""Prometheus metrics of one server: requests, tokens, latency, grammar compile time, cache hits, forced closes."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fcd_requests", "HTTP requests", ["path", "status"], registry=r)
        self.latency = Histogram("fcd_request_latency_seconds", "HTTP request latency", ["path"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.prompt_tokens = Counter("fcd_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("fcd_completion_tokens", "Completion tokens generated", registry=r)
        self.compile = Histogram("fcd_grammar_compile_seconds", "Grammar compile time (cache misses)", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
        self.cache_hits = Counter("fcd_grammar_cache_hits", "Grammar cache hits", registry=r)
        self.cache_misses = Counter("fcd_grammar_cache_misses", "Grammar cache misses", registry=r)
        self.rejected_calls = Counter("fcd_rejected_calls", "Completions whose calls failed a schema rule the grammar cannot express", registry=r)
        self.cache_size = Gauge("fcd_grammar_cache_entries", "Compiled grammars held", registry=r)
        self.cache_bytes = Gauge("fcd_grammar_cache_bytes", "Approximate memory of the compiled grammars held "
                                 "(bounded by --grammar-cache-mb)", registry=r)
        self.index_compiles = Gauge("fcd_grammar_index_compiles", "llguidance backend: outlines Indexes compiled "
                                    "because a budget or the loop guard could narrow a sequence's choice", registry=r)
        self.forced_close = Counter("fcd_forced_close", "Constrained answers the token budget or the loop guard closed",
                                    ["reason"], registry=r)
        for reason in ("budget", "loop"):
            self.forced_close.labels(reason)  # exported at 0 before the first one
        self.prefill = Gauge("fcd_prefill_tokens", "Prompt tokens since start: computed by the model, or reused "
                             "from the hf engine's prefix cache", ["kind"], registry=r)
        self.prefix_cache_bytes = Gauge("fcd_prefix_cache_bytes", "Memory of the prompts' keys and values held "
                                        "(bounded by --prefix-cache-mb)", registry=r)
        self.in_flight = Gauge("fcd_requests_in_flight", "Requests admitted and not yet answered (streams: until "
                               "their last event), bounded by --max-concurrent-requests", registry=r)
        self.jumped = Gauge("fcd_jump_forward_tokens", "Tokens since start that the grammar forced and the hf engine "
                            "appended without sampling them (jump-forward)", registry=r)
        self.draft = Gauge("fcd_prompt_lookup_tokens", "Tokens since start that the hf engine guessed by prompt lookup "
                           "(drafted) and, of them, the ones the model agreed with (accepted)", ["kind"], registry=r)

    def request(self, route: str, status: int, seconds: float) -> None:
        """`route`: one of the app's own paths, or "other" (labels never come from what clients send)."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    def grammar(self, compile_seconds: float, hit: bool) -> None:
        if hit:
            self.cache_hits.inc()
        else:
            self.cache_misses.inc()
            self.compile.observe(compile_seconds)

    def render(self, cache_info: dict[str, Any], engine: dict[str, int] | None = None,
               in_flight: int = 0) -> tuple[bytes, str]:
        """The exposition; `engine`: the engine's own counters (Engine.stats), those it keeps."""
        self.cache_size.set(cache_info.get("size", 0))
        self.cache_bytes.set(cache_info.get("bytes", 0))
        self.index_compiles.set(cache_info.get("exact_compiles", 0))
        self.in_flight.set(in_flight)
        engine = engine or {}
        for kind in ("computed", "reused"):
            if f"prefill_{kind}" in engine:
                self.prefill.labels(kind).set(engine[f"prefill_{kind}"])
        if "prefix_cache_bytes" in engine:
            self.prefix_cache_bytes.set(engine["prefix_cache_bytes"])
        if "jump_forward_tokens" in engine:
            self.jumped.set(engine["jump_forward_tokens"])
        for kind in ("drafted", "accepted"):
            if f"prompt_lookup_{kind}" in engine:
                self.draft.labels(kind).set(engine[f"prompt_lookup_{kind}"])
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
