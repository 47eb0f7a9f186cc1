"""The embedded engine: transformers on CPU (bf16 where the CPU has it, else fp32; attention from
cpu_attention.py) or GPU (bf16), PEFT adapters side by side.

One scheduler thread owns the model, from loading it on (`_start_scheduler` says why). Requests
waiting when a batch starts, and those arriving within a short window after the first (20 ms), are
prefilled together (each reusing what the prefix cache holds of its prompt; prompts with alike uncached
tails in one forward pass) and share one KV cache; finished or cancelled rows leave the cache as they
end. Continuous batching (the default): requests that arrive while a batch decodes are prefilled between
two decode steps and join it, their cache left-padded to the batch's width, so they do not wait for
the batch to finish. Rows leaving and joining change the cache's buffers in place (kv_buffer.py), and a
finished answer joins its prompt in the prefix cache for the conversation's next turn.
`continuous=False` (`--batching static`) runs each batch to the end first. A batch holds one adapter
(or the base), because PEFT trainable-token layers do not take mixed-adapter batches; while another
adapter's request waits, the running batch admits no one and drains, so a busy adapter cannot starve
the rest.

Adapters are merged by default (`merge_adapters="auto"`, while memory allows): each adapter gets its
own copy of the base with the adapter merged in (merged in fp32, then cast to the serving dtype), and
the base stays a plain model. PEFT's LoRA layers cost every forward pass, the base's included: with
one adapter loaded, base requests ran about 40% slower, and adapter requests at 40% of base speed. A
merged copy costs one model's memory (270 MB in bf16 for SmolLM2-135M) and runs at base speed.

Greedy rows draft by prompt lookup (`prompt_lookup` tokens, prompt_lookup.py) while the batch holds at
most `prompt_lookup_max_batch` rows: the drafts ride in the step's forward pass after the sampled token,
the longest prefix greedy decoding agrees with is kept, and the rest is masked out of the rows and cut
from the cache. On CPU a pass over several tokens costs little more than one in bf16 and about twice one
in fp32 (SmolLM2-135M, 2 cores), so a draft pays wherever a few of its tokens are kept: argument values
copied from the request, an agent's turn repeating a tool result.

The scheduler thread is supervised: a batch that raises fails only its own requests, and should the
thread itself die, every request it held or had waiting ends at once with an engine failure (a 503).
With `restart_on_failure` a new scheduler thread then takes over (at most MAX_RESTARTS in
RESTART_WINDOW_S); otherwise, or past that, `failure` says why: /health turns unhealthy, new
requests get a 503, and the server, watching `failure`, exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from tokenizers.decoders import DecodeStream

from fcdistill.serve.engines.base import (EngineRequestError, EngineUnavailable, GenerationEvent, GenerationRequest,
                                          check_fits, cut_at_stop)
from fcdistill.serve.engines.kv_buffer import GrowingCache, GrowingLayer, compaction
from fcdistill.serve.engines.prefix_cache import PrefixCache
from fcdistill.serve.engines.prompt_lookup import propose

log = logging.getLogger("fcdistill.serve")

MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0


class Detokenizer:
    """A sequence's text as its tokens arrive, through tokenizers' DecodeStream: a character split
    across tokens (an emoji, CJK in byte-level BPE) is held back until the token that completes it."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)  # the FC token is part of the text
        self._held: list[int] = []

    def step(self, token: int) -> str:
        """The text this token completes; "" while a character is still incomplete."""
        piece = self._stream.step(self._tokenizer, token)
        if piece is None:
            self._held.append(token)
            return ""
        self._held.clear()
        return piece

    def rest(self) -> str:
        """The held-back tokens' text (replacement characters for what they left incomplete): what a
        sequence that ends mid-character still owes."""
        return self._tokenizer.decode(self._held, skip_special_tokens=False) if self._held else ""


@dataclass(eq=False)  # compared and hashed by identity: the engine keeps a set of live ones
class _Seq:
    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    text: Detokenizer
    cancelled: threading.Event = field(default_factory=threading.Event)
    n_out: int = 0  # tokens generated
    out_ids: list[int] = field(default_factory=list)  # what prompt lookup searches, after the prompt
    ended: bool = False  # finished while its draft was verified: the next step drops the row
    sent_text: str = ""
    generator: Any = None

    def emit(self, ev: GenerationEvent) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, ev)


@dataclass
class _Rows:
    """The running batch: its sequences, their shared KV cache, attention mask, last positions and the
    logits each row samples its next token from."""

    seqs: list[_Seq]
    cache: Any  # GrowingCache (a transformers DynamicCache), [rows, heads, width, dim] per layer
    mask: Any  # [rows, width], 0 on left padding
    last_pos: Any  # [rows]
    logits: Any  # [rows, vocab]

    def select(self, keep: list[int]) -> list[int]:
        """Keep the rows in `keep` (ascending), then drop the leading columns no remaining row uses. The
        kept rows may change order (the engine's cache moves only the rows that fill a hole): the
        returned list is the old index of each new row."""
        import torch

        order = compaction(keep) if self.mergeable() else keep
        self.seqs = [self.seqs[i] for i in order]
        if not order:
            return order
        idx = torch.tensor(order)
        if self.mergeable():
            for layer in self.cache.layers:
                layer.keep_rows(order)
        else:
            self.cache.batch_select_indices(idx.to(self.cache.layers[0].keys.device))
        self.mask, self.last_pos, self.logits = self.mask[idx], self.last_pos[idx], self.logits[idx]
        unused = int((self.mask.sum(0) > 0).int().argmax())  # first column some row attends to
        if unused:
            for layer in self.cache.layers:
                if type(layer) is GrowingLayer:
                    layer.drop_leading(unused)
                else:
                    layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
            self.mask = self.mask[:, unused:]
        return order

    def mergeable(self) -> bool:
        """Plain full-attention layers only (the engine's own): sliding-window or static caches cannot be
        re-padded."""
        return all(type(layer) is GrowingLayer for layer in self.cache.layers)

    def merge(self, new: _Rows) -> None:
        """Append new rows, left-padding whichever cache is narrower."""
        import torch
        import torch.nn.functional as F

        if not self.seqs:
            self.seqs, self.cache, self.mask, self.last_pos, self.logits = new.seqs, new.cache, new.mask, new.last_pos, new.logits
            return
        width = max(self.mask.shape[1], new.mask.shape[1])
        if self.mergeable() and new.mergeable():  # into the running batch's spare rows: no copy of the batch
            for mine, theirs in zip(self.cache.layers, new.cache.layers):
                mine.merge_rows(theirs.keys, theirs.values)
        else:
            for mine, theirs in zip(self.cache.layers, new.cache.layers):
                a, b = width - mine.keys.shape[-2], width - theirs.keys.shape[-2]
                mine.keys = torch.cat([F.pad(mine.keys, (0, 0, a, 0)), F.pad(theirs.keys, (0, 0, b, 0))])
                mine.values = torch.cat([F.pad(mine.values, (0, 0, a, 0)), F.pad(theirs.values, (0, 0, b, 0))])
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(new.mask, (width - new.mask.shape[1], 0))])
        self.seqs = self.seqs + new.seqs
        self.last_pos = torch.cat([self.last_pos, new.last_pos])
        self.logits = torch.cat([self.logits, new.logits])


class HFEngine:
    """transformers + PEFT, batched decoding with per-sequence grammar constraints."""

    def __init__(self, model: str, adapters: dict[str, str] | None = None, fc_token: str = "<tool_call>",
                 served_name: str | None = None, device: str | None = None, max_batch: int = 16,
                 batch_window_ms: float = 20.0, continuous: bool = True, restart_on_failure: bool = False,
                 dtype: str = "auto", prefix_cache_mb: float = 512.0, jump_forward: bool = True,
                 merge_adapters: str = "auto", prompt_lookup: int = 6, prompt_lookup_max_batch: int = 2):
        import torch
        from transformers import AutoTokenizer

        from fcdistill.models import avoid_cudnn_attention, ensure_fc_token, resolve_model, serving_dtype
        from fcdistill.serve.memory import tune_malloc

        path = resolve_model(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[serving_dtype(dtype, self.device.startswith("cuda"))]
        if merge_adapters not in ("auto", "on", "off"):
            raise ValueError(f"merge_adapters must be auto, on or off, not {merge_adapters!r}")
        avoid_cudnn_attention()
        tune_malloc(export=False)  # `fcd serve` did it already; an engine made in process tunes that process
        self.model_name = served_name or str(model)
        self.adapters = dict(adapters or {})
        self.fc_token = fc_token
        self.max_batch = max_batch
        self.batch_window_s = batch_window_ms / 1000
        self.continuous = continuous
        # An adapter trained with an added FC token ships the tokenizer that has it; else the base's.
        with_tokenizer = [p for p in self.adapters.values() if os.path.isfile(os.path.join(p, "tokenizer_config.json"))]
        tokenizer = AutoTokenizer.from_pretrained(with_tokenizer[0] if with_tokenizer else path)
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(f"{model}: the hf engine streams text through a fast (tokenizers) tokenizer; this model has none")
        self.fc_info = ensure_fc_token(tokenizer, fc_token)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.restart_on_failure = restart_on_failure
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.jump_forward = jump_forward
        self.jumped = 0  # tokens placed by jump-forward: appended without a forward pass of their own
        self.prompt_lookup = prompt_lookup  # draft tokens a step, greedy rows only (0: no speculation)
        self.prompt_lookup_max_batch = prompt_lookup_max_batch  # wider batches are compute-bound: no drafts
        self.drafted = 0  # draft tokens fed for verification
        self.accepted = 0  # of them, kept: tokens placed without a forward pass of their own
        self._failure: str | None = None
        self._restarts: list[float] = []
        self._lock = threading.Lock()  # the pending queue and the live requests, across the loop and the scheduler
        self._live: set[_Seq] = set()  # submitted and not yet ended: what a dying scheduler must fail
        self._pending: queue.Queue[_Seq] = queue.Queue()
        self._stop = threading.Event()
        self._start_scheduler(load=lambda: self._load(path, merge_adapters))

    def _load(self, path: str, merge_adapters: str) -> None:
        """The model, its merged adapter copies or PEFT layers, and what generation reads from its config.
        Runs on the scheduler thread (see `_start_scheduler`)."""
        from transformers import AutoModelForCausalLM

        from fcdistill.models import cache_keyword, load_peft_adapter, resize_for_tokenizer

        from fcdistill.serve.engines.cpu_attention import register

        attention = {"attn_implementation": register()} if self.device == "cpu" else {}
        base = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, **attention)
        if len(self.tokenizer) > base.get_input_embeddings().weight.shape[0]:
            resize_for_tokenizer(base, len(self.tokenizer))
        self._cache_kw = cache_keyword(base)
        base.to(self.device).eval()
        self.merged: dict[str, Any] = {}  # adapter name -> the base with that adapter merged in
        if self.adapters and _merge_fits(merge_adapters, base, len(self.adapters)):
            for name, adapter_path in self.adapters.items():
                self.merged[name] = _merged_copy(base, adapter_path, self.dtype)
            self.model = base
        elif self.adapters:
            names = list(self.adapters)
            net = load_peft_adapter(base, self.adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                net.load_adapter(self.adapters[name], adapter_name=name)
            self.model = net.to(self.device).eval()
        else:
            self.model = base
        cfg = base.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.logits_size = base.get_output_embeddings().weight.shape[0]
        gen = getattr(base, "generation_config", None)
        self.default_temperature = float(getattr(gen, "temperature", None) or 1.0) if getattr(gen, "do_sample", False) else 1.0
        self.default_top_p = float(getattr(gen, "top_p", None) or 1.0) if getattr(gen, "do_sample", False) else 1.0
        self.stop_ids = {self.tokenizer.eos_token_id} | set(_as_list(getattr(gen, "eos_token_id", None)))

    # -- public ----------------------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        return self._failure

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if request.adapter is not None and request.adapter not in self.adapters:
            raise EngineRequestError(f"unknown adapter {request.adapter!r}", code="model_not_found")
        check_fits(request, self.context_length)
        seq = _Seq(req=request, loop=asyncio.get_running_loop(), events=asyncio.Queue(), text=Detokenizer(self.tokenizer))
        with self._lock:
            if self._failure is not None:
                raise EngineUnavailable(self._failure)
            self._live.add(seq)
            self._pending.put(seq)
        try:
            while True:
                ev = await seq.events.get()
                yield ev
                if ev.finish_reason:
                    return
        finally:
            seq.cancelled.set()  # client gone or consumer stopped: the scheduler drops the row
            with self._lock:
                self._live.discard(seq)

    def stats(self) -> dict[str, int]:
        out = {"jump_forward_tokens": self.jumped, "prompt_lookup_drafted": self.drafted,
               "prompt_lookup_accepted": self.accepted}
        if self.prefix_cache is not None:
            cache = self.prefix_cache.stats()
            out.update(prefill_computed=cache["computed"], prefill_reused=cache["reused"],
                       prefix_cache_bytes=cache["bytes"])
        return out

    async def shutdown(self) -> None:
        from fcdistill.serve.lifecycle import ENGINE_STOP_S

        if self._stop.is_set():
            return
        self._stop.set()
        self._pending.put(None)  # type: ignore[arg-type]
        await asyncio.to_thread(self._thread.join, ENGINE_STOP_S)  # a daemon thread: never holds the exit

    # -- supervision -----------------------------------------------------------------------------
    def _start_scheduler(self, load: Callable[[], None] | None = None) -> None:
        """Start the scheduler thread; with `load`, it first loads the model, and a load error is raised here.

        Every torch op of the engine runs on the scheduler thread, the model's loading included (a
        restarted scheduler's thread takes over; the dead one's OpenMP team ends with it). On a CPU,
        each thread that runs a parallel op keeps its own OpenMP team. Measured on a 2-core AVX512-BF16
        CPU, 64 greedy bf16 tokens with transformers' cache: 1.9-2.3 s on a second thread once the first
        had run any parallel op (loading the model is one), 1.26 s with loading and decoding on one
        thread. Likely cause: with more OpenMP threads than cores, libgomp cuts its spin-wait short, so
        each of the hundreds of small ops in a decode step waits for its helper to wake.
        Ctrl-C during the load interrupts the wait here; the daemon thread dies with the process."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._supervised, args=(load, ready), name="hf-engine", daemon=True)
        self._thread.start()
        ready.result()

    def _supervised(self, load: Callable[[], None] | None, ready: concurrent.futures.Future[None]) -> None:
        """The scheduler, and what happens when it dies: nothing it held may wait forever."""
        import torch

        try:
            if load is not None:
                load()
        except BaseException as exc:  # noqa: BLE001 - the constructor raises it
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            # inference_mode, not just no_grad: no autograd version counters or view tracking on the
            # tensors the scheduler makes (and the KV cache makes a view every layer, every step)
            with torch.inference_mode():
                self._run()
        except BaseException as exc:  # noqa: BLE001 - whatever ended the thread, requests must hear of it
            if self._stop.is_set():
                return
            self._scheduler_died(f"the hf engine's scheduler died: {type(exc).__name__}: {exc}")

    def _scheduler_died(self, reason: str) -> None:
        log.error("%s", reason)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        restart = self.restart_on_failure and len(self._restarts) < MAX_RESTARTS
        with self._lock:
            if not restart:
                self._failure = reason  # failed for good: the server sees it and exits non-zero
            doomed, self._live = self._live, set()
            self._pending = queue.Queue()  # what was waiting is failed below; later requests wait here
        for s in doomed:
            s.emit(GenerationEvent(finish_reason="error", error=reason, engine_failed=True))
        if restart:
            self._restarts.append(now)
            log.warning("restarting the hf engine's scheduler (%d of %d within %.0f s)", len(self._restarts),
                        MAX_RESTARTS, RESTART_WINDOW_S)
            self._start_scheduler()

    # -- scheduler -------------------------------------------------------------------------------
    def _run(self) -> None:
        backlog: list[_Seq] = []
        while not self._stop.is_set():
            if not backlog:
                first = self._pending.get()
                if first is None:
                    return
                backlog.append(first)
                # Requests sent together reach the queue a few ms apart: wait briefly for the rest so
                # they share one prefill (as TGI/Triton batch windows); later ones join mid-batch
                deadline = time.monotonic() + self.batch_window_s
                while len(backlog) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    try:
                        nxt = self._pending.get(timeout=left)
                    except queue.Empty:
                        break
                    if nxt is None:
                        return
                    backlog.append(nxt)
            if not self._drain(backlog):
                return
            backlog[:] = [s for s in backlog if not s.cancelled.is_set()]
            if not backlog:
                continue
            adapter = backlog[0].req.adapter
            batch = self._take(backlog, adapter, self.max_batch)
            try:
                self._run_batch(batch, adapter, backlog)
            except Exception as exc:  # never let one batch take the server down
                log.exception("generation failed")
                for s in batch:
                    s.emit(GenerationEvent(finish_reason="error", error=f"{type(exc).__name__}: {exc}"))

    def _drain(self, backlog: list[_Seq]) -> bool:
        """Move every queued request into the backlog; False when shutdown was asked for."""
        while True:
            try:
                nxt = self._pending.get_nowait()
            except queue.Empty:
                return True
            if nxt is None:
                self._stop.set()
                return False
            backlog.append(nxt)

    @staticmethod
    def _take(backlog: list[_Seq], adapter: str | None, n: int) -> list[_Seq]:
        """Remove and return up to n live requests for one adapter, oldest first."""
        taken = [s for s in backlog if s.req.adapter == adapter and not s.cancelled.is_set()][:n]
        backlog[:] = [s for s in backlog if s not in taken and not s.cancelled.is_set()]
        return taken

    def _forward(self, adapter: str | None, **kwargs: Any) -> Any:
        if adapter in self.merged:
            return self.merged[adapter](**kwargs)
        if adapter is None and self.adapters and not self.merged:
            with self.model.disable_adapter():
                return self.model(**kwargs)
        if adapter is not None:
            self.model.set_adapter(adapter)
        return self.model(**kwargs)

    def _prefill(self, seqs: list[_Seq], adapter: str | None) -> _Rows:
        """The prompt pass for new sequences: their KV cache and first next-token logits. With the prefix
        cache, each prompt reuses what it has of its start, and prompts whose uncached tails are alike
        share one forward pass (`prefill_groups`); without it, all share one left-padded pass."""
        import torch

        for s in seqs:
            if s.req.sampling.seed is not None:
                s.generator = torch.Generator(device="cpu").manual_seed(int(s.req.sampling.seed))
        if self.prefix_cache is None:
            return self._prefill_group([(s, 0, None) for s in seqs], adapter)
        found = [(s, *self.prefix_cache.lookup(adapter, s.req.prompt_ids)) for s in seqs]
        rows: _Rows | None = None
        for group in prefill_groups(found, key=lambda f: len(f[0].req.prompt_ids) - f[1]):
            part = self._prefill_group(group, adapter)
            if rows is None:
                rows = part
            else:
                rows.merge(part)
        assert rows is not None
        return rows

    def _prefill_group(self, group: list[tuple[_Seq, int, Any]], adapter: str | None) -> _Rows:
        """One forward pass over the last `tail` tokens of each prompt, `tail` being the longest uncached
        part among them: a prompt with a shorter one recomputes a few cached tokens, one shorter than
        `tail` is left-padded, and the cached keys and values before each row's tail are left-padded to
        a common width. So every row's tail lies in the same columns, and the rows need no holes.
        `group`: (sequence, cached tokens n, their per-layer keys and values or None)."""
        import torch
        import torch.nn.functional as F

        lengths = [len(s.req.prompt_ids) for s, _, _ in group]
        tail = max(length - n for length, (_, n, _) in zip(lengths, group))
        use = [max(0, length - tail) for length in lengths]  # cached tokens each row keeps (<= n)
        width = max(use)
        ids = torch.full((len(group), tail), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(group), width + tail), dtype=torch.long)
        for i, ((s, _, _), length, kept) in enumerate(zip(group, lengths, use)):
            part = s.req.prompt_ids[kept:]
            ids[i, tail - len(part):] = torch.tensor(part)
            mask[i, width + tail - length:] = 1
        positions = (torch.tensor(lengths).unsqueeze(1) - tail + torch.arange(tail)).clamp(min=0)
        cache = GrowingCache()
        if width:
            like = next(layers for _, _, layers in group if layers)
            for layer, (k0, v0) in enumerate(like):
                keys, values = [], []
                for (_, _, layers), kept in zip(group, use):
                    k, v = layers[layer] if kept else (k0[..., :0, :], v0[..., :0, :])
                    keys.append(F.pad(k[..., :kept, :], (0, 0, width - kept, 0)))
                    values.append(F.pad(v[..., :kept, :], (0, 0, width - kept, 0)))
                cache.update(torch.cat(keys), torch.cat(values), layer)
        out = self._forward(adapter, input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1,
                            **{self._cache_kw: cache})
        rows = _Rows([s for s, _, _ in group], cache, mask, positions[:, -1].clone(), out.logits[:, -1, :].float().cpu())
        if self.prefix_cache is not None:
            self.prefix_cache.computed += sum(min(length, tail) for length in lengths)
            self.prefix_cache.reused += sum(use)
            if rows.mergeable():  # plain full-attention layers: a sliding window's cache is not a prefix
                for i, (s, length) in enumerate(zip(rows.seqs, lengths)):
                    start = width + tail - length
                    self.prefix_cache.store(adapter, list(s.req.prompt_ids), [
                        (layer.keys[i:i + 1, :, start:, :], layer.values[i:i + 1, :, start:, :]) for layer in cache.layers])
        return rows

    def _run_batch(self, seqs: list[_Seq], adapter: str | None, backlog: list[_Seq]) -> None:
        """Decode until every row ends; with continuous batching, requests for the same adapter that
        arrive meanwhile are prefilled and join the running batch (their cache left-padded to its width)."""
        import torch

        rows = self._prefill(seqs, adapter)
        while rows.seqs:
            keep: list[int] = []
            feeds: dict[int, list[int]] = {}  # per kept row: its sampled token, then any tokens jumped after it
            drafts: dict[int, list[int]] = {}  # per kept row: prompt-lookup guesses at what follows the feed
            # drafts need a cache that can forget the rejected ones: plain full-attention layers (the engine's own)
            speculate = 0 < len(rows.seqs) <= self.prompt_lookup_max_batch and self.prompt_lookup > 0 and rows.mergeable()
            for i, s in enumerate(rows.seqs):
                if s.ended:  # on a draft it kept, last step
                    self._remember(rows, i, adapter)
                    continue
                if s.cancelled.is_set():
                    s.emit(GenerationEvent(finish_reason="cancelled"))
                    continue
                token = self._sample(s, rows.logits[i])
                ended = self._accept(s, token)
                feed = [token]
                while not ended and self.jump_forward and (forced := self._forced(s)) is not None:
                    ended = self._accept(s, forced)
                    feed.append(forced)
                    self.jumped += 1
                if not ended:
                    keep.append(i)
                    feeds[i] = feed
                    drafts[i] = self._draft(s) if speculate else []
                else:  # (its client, having the last event, may be gone already: not a cancellation)
                    self._remember(rows, i, adapter)
            order = rows.select(keep) if len(keep) < len(rows.seqs) else keep
            if rows.seqs:
                self._step(rows, [feeds[i] for i in order], [drafts[i] for i in order], adapter)
            if not self.continuous or not rows.mergeable():
                continue
            if not self._drain(backlog):
                break
            if any(s.req.adapter != adapter and not s.cancelled.is_set() for s in backlog):
                continue  # another adapter is waiting: let this batch drain, or a busy base would starve it
            joining = self._take(backlog, adapter, self.max_batch - len(rows.seqs))
            if joining:
                seqs.extend(joining)  # the caller's list: an error reaches every row that ever joined
                rows.merge(self._prefill(joining, adapter))

    def _remember(self, rows: _Rows, i: int, adapter: str | None) -> None:
        """Keep a finished row's prompt and answer in the prefix cache (replacing its prompt's entry): an
        agent's next turn starts with both, as vLLM's prefix caching also keeps generated tokens. The row's
        positions are its unmasked columns (rejected drafts and step padding are masked out), in order."""
        if self.prefix_cache is None or not rows.mergeable():
            return
        s = rows.seqs[i]
        ids = s.req.prompt_ids + s.out_ids
        cols = rows.mask[i].nonzero().squeeze(1)
        n = min(len(cols), len(ids))  # the last token sampled was never fed; an end-of-turn draft was, unrecorded
        if n <= len(s.req.prompt_ids):
            return
        cols = cols[:n].to(self.device)
        self.prefix_cache.store(adapter, list(ids[:n]), [
            (layer.keys[i:i + 1].index_select(2, cols), layer.values[i:i + 1].index_select(2, cols))
            for layer in rows.cache.layers], copy=False)

    def _step(self, rows: _Rows, feeds: list[list[int]], drafts: list[list[int]], adapter: str | None) -> None:
        """One forward pass over each row's new tokens: one a row, or more where tokens were jumped or
        drafted (the shorter rows right-padded, the padding masked out for good), each row's next logits
        taken after the last token it keeps. A draft is kept up to its first token that greedy decoding
        would not have chosen; the rejected tail is masked out, and columns no row kept are cut off."""
        import torch

        fed = [f + d for f, d in zip(feeds, drafts)]
        width = max(len(f) for f in fed)
        ids = torch.full((len(fed), width), self.tokenizer.pad_token_id, dtype=torch.long)
        step_mask = torch.zeros((len(fed), width), dtype=torch.long)
        for i, f in enumerate(fed):
            ids[i, :len(f)] = torch.tensor(f)
            step_mask[i, :len(f)] = 1
        positions = rows.last_pos.unsqueeze(1) + step_mask.cumsum(1).clamp(min=1)  # padding repeats the last one
        rows.mask = torch.cat([rows.mask, step_mask], dim=1)
        out = self._forward(adapter, input_ids=ids.to(self.device), attention_mask=rows.mask.to(self.device),
                            position_ids=positions.to(self.device), use_cache=True, **{self._cache_kw: rows.cache})
        if not any(drafts):  # only each row's last position is sampled from
            lengths = step_mask.sum(1)
            rows.last_pos = rows.last_pos + lengths
            last = (lengths - 1).to(out.logits.device)
            rows.logits = out.logits[torch.arange(len(fed), device=out.logits.device), last, :].float().cpu()
            return
        logits = out.logits.float().cpu()
        kept = [len(f) + self._verify(s, f, d, logits[i]) for i, (s, f, d) in enumerate(zip(rows.seqs, feeds, drafts))]
        lengths = torch.tensor(kept)
        rows.last_pos = rows.last_pos + lengths
        rows.logits = logits[torch.arange(len(fed)), lengths - 1, :]
        if any(k < len(f) for k, f in zip(kept, fed)):  # rejected drafts: no row attends to them again
            rows.mask[:, rows.mask.shape[1] - width:] *= torch.arange(width) < lengths.unsqueeze(1)
        if (used := max(kept)) < width:  # and the columns no row kept go
            rows.cache.crop(used - width)
            rows.mask = rows.mask[:, :rows.mask.shape[1] - (width - used)]

    def _draft(self, s: _Seq) -> list[int]:
        """Prompt-lookup guesses at the tokens after the ones just accepted; greedy rows only, since only
        there does keeping the guesses the model agrees with leave the output unchanged."""
        room = min(self.prompt_lookup, s.req.sampling.max_tokens - s.n_out)
        if self._temperature(s) > 1e-5 or room <= 0:
            return []
        draft = propose(s.req.prompt_ids + s.out_ids, room)
        self.drafted += len(draft)
        return draft

    def _verify(self, s: _Seq, feed: list[int], draft: list[int], logits: Any) -> int:
        """How many draft tokens to keep: each one the (grammar-masked) greedy choice after those before
        it. Kept tokens are accepted as if sampled; the sequence may end on one (`s.ended`)."""
        for j, token in enumerate(draft):
            if self._sample(s, logits[len(feed) - 1 + j].clone()) != token:
                return j
            self.accepted += 1
            if self._accept(s, token):
                s.ended = True
                return j + 1
        return len(draft)

    @staticmethod
    def _forced(s: _Seq) -> int | None:
        c = s.req.constraint
        return c.forced() if c is not None else None

    def _temperature(self, s: _Seq) -> float:
        sp = s.req.sampling
        return self.default_temperature if sp.temperature is None else sp.temperature

    def _sample(self, s: _Seq, logits: Any) -> int:
        import torch

        if s.req.constraint is not None:
            s.req.constraint.mask_(logits)
        sp = s.req.sampling
        temperature = self._temperature(s)
        top_p = self.default_top_p if sp.top_p is None else sp.top_p
        if temperature <= 1e-5:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cutoff = torch.cumsum(sorted_p, 0) - sorted_p > top_p
            sorted_p[cutoff] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=s.generator))

    def _accept(self, s: _Seq, token: int) -> bool:
        """Record a sampled token, stream its text; True when the sequence has ended."""
        c = s.req.constraint
        sp = s.req.sampling
        if token in self.stop_ids:  # the constraint only lets end-of-turn through where the grammar allows it
            s.emit(GenerationEvent(finish_reason="stop"))
            return True
        if c is not None:
            c.advance(token)
        s.n_out += 1
        s.out_ids.append(token)
        delta = s.text.step(token)
        if sp.stop and (c is None or not c.in_grammar):
            head = cut_at_stop(s.sent_text, delta, sp.stop)
            if head is not None:
                s.emit(GenerationEvent(text=head, token_ids=[token], finish_reason="stop"))
                return True
        s.sent_text += delta
        if s.n_out >= sp.max_tokens:
            s.emit(GenerationEvent(text=delta + s.text.rest(), token_ids=[token], finish_reason="length"))
            return True
        s.emit(GenerationEvent(text=delta, token_ids=[token]))
        return False


PREFILL_PASS_TOKENS = 64  # a forward pass's fixed cost on a CPU, in prompt tokens' worth (a pass over 1-9
# tokens costs about the same in bf16 on 2 cores)


def prefill_groups(items: list[Any], key: Callable[[Any], int]) -> list[list[Any]]:
    """Items (prompts, `key` their uncached length) in groups that share a prefill pass: shortest first,
    a group taking the next prompt while one pass over them all, each computing as many tokens as the
    longest, costs no more than separate passes (PREFILL_PASS_TOKENS each)."""
    groups: list[list[Any]] = []
    total = 0
    for item in sorted(items, key=key):
        t = key(item)
        if groups and (len(groups[-1]) + 1) * t <= total + t + PREFILL_PASS_TOKENS * len(groups[-1]):
            groups[-1].append(item)
            total += t
        else:
            groups.append([item])
            total = t
    return groups


def _merge_fits(mode: str, base: Any, count: int) -> bool:
    """Whether to merge: always with "on", never with "off"; with "auto" when `count` more copies of the
    base take at most half the memory available now (on a GPU, half its free memory)."""
    if mode != "auto":
        return mode == "on"
    import torch

    need = count * sum(p.numel() * p.element_size() for p in base.parameters())
    device = next(base.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need <= free / 2


def _merged_copy(base: Any, adapter_path: str, dtype: Any) -> Any:
    """A copy of `base` with the adapter (LoRA deltas and trained token rows) merged in, in fp32, then
    cast to the serving dtype: the low-rank update is rounded once, as `fcd export --merge` does."""
    import copy

    import torch

    from fcdistill.models import load_peft_adapter

    clone = copy.deepcopy(base).to(torch.float32)
    return load_peft_adapter(clone, adapter_path).merge_and_unload().to(dtype).eval()


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]
