"""Changes that make packed LoRA training cheaper without changing what it computes (beyond bf16 rounding).

A profile of one packed 1024-token step of SmolLM2-135M on CPU (bf16 base, LoRA r=16, TRL 1.16)
put about 40% of the time in TRL's fused LM head and 25% in attention:

- **The LM head scored every position.** TRL's fused head projects only the positions that carry a
  label when it runs its Triton kernel, and every position elsewhere (a fixed tile shape keeps
  compiled graphs on devices such as Neuron from recompiling). On CPU nothing is compiled, so the
  prompt positions (about 85% of a row) went through a 49k-wide projection, its softmax and two
  fp32 gradient matmuls for nothing. `score_only_labelled_positions` makes the head compact there:
  the loss and its gradients are the same, computed on the labelled rows only.
- **Packed rows were attended as one masked 1024x1024 block.** Transformers turns the restarting
  position_ids of a packed row into a block-diagonal mask for SDPA; the kernel then works through
  the whole causal triangle and, with a mask, repeats the grouped key/value heads.
  `PACKED_SDPA` attends each example on its own (causal, grouped heads kept grouped): the cost
  falls from the square of the row to the sum of the squares of its examples. Anything that is not
  a packed row (padding masks, generation with a cache) goes to transformers' own SDPA path.

A later profile of the same step with a bf16 base on an AVX512-BF16 CPU found three more costs:

- **LoRA ran in fp32 on a bf16 base.** PEFT casts each adapter's input to the adapter weights' dtype,
  so every LoRA module converted its bf16 activations to fp32, ran two fp32 matmuls and added an fp32
  result that was cast back: about twice the base layer's own forward and backward.
  `lora_in_activation_dtype` runs the adapter's matmuls in the activations' dtype instead, casting
  the (small) fp32 LoRA weights per forward: what autocast does on a GPU. The parameters and
  optimizer state stay fp32; their gradients pass through bf16 matmuls, as under GPU autocast.
- **CPU SDPA in bf16 was slower than its own math.** For one example's attention (9 query heads over
  3 key/value heads, 150-700 tokens) PyTorch's CPU flash kernel took 1.9-3.5x the time of two bf16
  matmuls with an fp32 softmax between them (transformers' eager attention numerics), the query heads
  of a group stacked so keys and values are not repeated. In fp32 the flash kernel is the faster one
  and stays.
- **TRL's tiled LM head was built for GPUs.** On CPU its torch fallback folds each 32k-wide tile in
  several fp32 passes, and because the FC token's row is trained, the head's whole 49k x 576 weight
  gradient was accumulated to keep one row of it. `dense_cpu_lm_head` scores the (few, labelled)
  positions with one matmul and a log-softmax, and hands the trained rows their own gradient only.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("fcdistill.train")

PACKED_SDPA = "fcd_packed_sdpa"
# bf16/fp16 packed examples attend through two matmuls and an fp32 softmax (faster than CPU SDPA there);
# benchmarks/train_bench.py turns it off to measure it
LOW_PRECISION_MATMUL_ATTENTION = True
# the dense LM head holds N x vocab fp32 log-probabilities for the backward: above this many it leaves
# the positions to TRL's tiles, which hold none
DENSE_HEAD_MAX_ELEMENTS = 64 * 2**20


def _segments(position_ids: Any) -> list[tuple[int, int]] | None:
    """[start, end) of each example in a single packed row (positions restart at every example)."""
    import torch

    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *starts, pos.shape[0]]
    return list(zip(bounds[:-1], bounds[1:]))


def packed_sdpa_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                        scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """SDPA run per packed example; everything else goes to transformers' SDPA unchanged."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    segments = _segments(kwargs.get("position_ids")) if q_len == kv_len > 1 else None
    plain = (segments is None or len(segments) < 2 or query.shape[0] != 1 or kwargs.get("position_bias") is not None
             or getattr(module, "sliding_window", None) or kwargs.get("output_attentions")
             or not (is_causal if is_causal is not None else getattr(module, "is_causal", True)))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if (LOW_PRECISION_MATMUL_ATTENTION and query.dtype in (torch.bfloat16, torch.float16)
            and query.device.type == "cpu" and not dropout):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        outs = [grouped_causal_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], scale)
                for s, e in segments]
    else:
        gqa = getattr(module, "num_key_value_groups", 1) > 1
        outs = [torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True,
            enable_gqa=gqa) for s, e in segments]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def grouped_causal_attention(query: Any, key: Any, value: Any, scale: float) -> Any:
    """Causal attention of one example as transformers' eager attention computes it (matmuls in the
    inputs' dtype, softmax in fp32), with the query heads that share a key/value head stacked into one
    matmul instead of repeating keys and values. [batch, heads, n, dim] in and out."""
    import torch

    b, h, n, d = query.shape
    kv = key.shape[1]
    q = query.reshape(b, kv, (h // kv) * n, d)
    scores = (torch.matmul(q, key.transpose(-1, -2)) * scale).view(b, kv, h // kv, n, n)
    future = torch.ones(n, n, dtype=torch.bool, device=query.device).triu_(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs.view(b, kv, (h // kv) * n, n), value).view(b, h, n, d)


def register_packed_sdpa() -> str:
    """Register PACKED_SDPA with transformers (its mask is SDPA's, used only on the fallback path)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def score_only_labelled_positions() -> bool:
    """Make TRL's fused LM head project only labelled positions on CPU too; False if TRL changed.

    TRL 1.16 decides with `trl.trainer.utils._use_triton(device)` whether the head is compact (that
    name is used only for this choice in that module; the kernel module keeps its own reference, so
    the CPU fold stays the torch one). Process-wide and idempotent.
    """
    import trl.trainer.utils as trl_utils

    current = getattr(trl_utils, "_use_triton", None)
    if current is None:
        log.warning("TRL no longer has trainer.utils._use_triton: the LM head scores every position on CPU")
        return False
    if getattr(current, "_fcd_compact", False):
        return True

    def compact_everywhere_but_neuron(device: Any) -> bool:
        return device.type == "cpu" or current(device)

    compact_everywhere_but_neuron._fcd_compact = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_everywhere_but_neuron
    return True


def trainable_tokens_without_copies(model: Any) -> int:
    """Train PEFT's trainable-token rows (the FC token's) without a copy of the whole matrix a forward.

    PEFT builds the weight it uses as `base.index_copy(rows)`: a fresh copy of the 49k x 576 embedding
    for the input embedding and another for the (tied) LM head on every forward, and the embedding's
    backward then fills a dense 49k-row gradient of which one row is kept. In a profile of packed
    fp32 steps on a 2-core AVX2 CPU those copies, fills and the dense gradient took about 9% of a step.

    Instead the trained rows are written into the frozen base matrix in place (it takes no gradient;
    a 1-row write), the embedding looks up the base matrix and puts the rows back in as the only
    differentiable part (`torch.where` over the FC positions), and the LM head gets the base matrix
    itself through an autograd function that hands the rows their slice of its gradient. Values
    and gradients are those of PEFT's path; what is saved (the deltas) is unchanged. Training only:
    the base matrix then holds the trained rows, so a model patched here must not be asked for its
    base outputs with adapters disabled (training never does; serving loads adapters afresh). Not
    under DeepSpeed ZeRO-3 or FSDP, whose partitioned matrices cannot be written a row at a time.
    Returns the number of layers patched.
    """
    import types

    import torch
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    class RowsInBase(torch.autograd.Function):
        """`weight` (already holding `rows` at `index`) as an output whose gradient reaches `rows`."""

        @staticmethod
        def forward(ctx: Any, weight: Any, index: Any, rows: Any) -> Any:
            ctx.save_for_backward(index)
            return weight.view_as(weight)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[None, None, Any]:
            (index,) = ctx.saved_tensors
            return None, None, grad.index_select(0, index)

    def rows_written(layer: Any, active: list[str]) -> tuple[Any, Any, Any] | None:
        weight = layer.base_layer.weight
        names = [a for a in active if a in layer.trainable_tokens_delta]
        if not names:
            return None
        index = torch.tensor([i for a in names for i in layer.token_indices[a]], device=weight.device)
        rows = torch.cat([layer.trainable_tokens_delta[a] for a in names]).to(weight.dtype)
        with torch.no_grad():
            # written only when the rows moved (an optimizer step): a second forward before the backward
            # (the head after the embedding, an eval) leaves alone the matrix the first one's graph holds
            if not torch.equal(weight.index_select(0, index), rows):
                weight.index_copy_(0, index, rows)
        return weight, index, rows

    def get_merged_weights(self: Any, active_adapters: list[str]) -> Any:
        written = rows_written(self, list(active_adapters))
        if written is None:
            return self.base_layer.weight
        merged = RowsInBase.apply(*written)
        merged.fcd_trained_rows = written[1:]  # (index, rows): dense_cpu_lm_head's gradient goes to these alone
        return merged

    def forward_adapters(self: Any, x: Any, active_adapters: list[str], *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters or not active_adapters or self.merged:
            return TrainableTokensLayer.forward_adapters(self, x, active_adapters, *args, **kwargs)
        self._check_overlapping_tokens(active_adapters)
        base = self.base_layer
        if not isinstance(base, torch.nn.Embedding):  # an LM head: the weight TRL's fused head reads, too
            return torch.nn.functional.linear(x, get_merged_weights(self, active_adapters))
        written = rows_written(self, list(active_adapters))
        if written is None:
            return base(x, *args, **kwargs)
        weight, index, rows = written
        out = torch.nn.functional.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                                            base.scale_grad_by_freq, base.sparse)
        for i, token in enumerate(index.tolist()):
            out = torch.where((x == token).unsqueeze(-1), rows[i].to(out.dtype), out)
        scale = self._get_embed_scale()
        return out if scale is None else out * scale.to(out.dtype)

    patched = 0
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and not getattr(module, "_fcd_no_copies", False):
            module.get_merged_weights = types.MethodType(get_merged_weights, module)
            module.forward_adapters = types.MethodType(forward_adapters, module)
            module._fcd_no_copies = True
            patched += 1
    return patched


def lora_in_activation_dtype(model: Any) -> int:
    """Run each LoRA adapter's matmuls in its input's dtype where the base layer is bf16/fp16.

    PEFT would cast the activations to the fp32 adapter weights and back (module docstring); here the
    weights are cast instead (a rank x width matrix per forward) and autograd carries their gradients
    back to the fp32 parameters, which the optimizer updates in fp32. Only plain LoRA layers (no DoRA
    or other variants) are changed. Returns the number of LoRA layers changed.
    """
    import types

    import torch
    from peft.tuners.lora import LoraLayer

    def linear_in_input_dtype(self: Any, x: Any) -> Any:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or module.lora_variant:
            continue
        base = getattr(module.get_base_layer(), "weight", None)
        if base is None or base.dtype not in (torch.bfloat16, torch.float16):
            continue
        adapters = [m for d in (module.lora_A, module.lora_B) for m in d.values()]
        if not adapters or not all(type(m) is torch.nn.Linear for m in adapters):
            continue
        module.cast_input_dtype_enabled = False  # PEFT's own switch (peft.helpers.disable_input_dtype_casting)
        for m in adapters:
            m.forward = types.MethodType(linear_in_input_dtype, m)
        changed += 1
    return changed


def _dense_log_probs(original: Any, hidden: Any, weight: Any, bias: Any, targets: Any, temperature: float,
                     chunk_size: int, final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
                     outputs: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """TRL's ChunkedLogProbFunction.apply, computed as one matmul and a log-softmax on the CPU.

    Same arguments and results: per-position log-probabilities of `targets` under `hidden @ weight.T`,
    and those of entropy, log_sum_sq_probs, mean_logits and is_top1 that `outputs` names (computed
    without gradient: SFT logs them). A head whose weight carries `fcd_trained_rows` (the FC token's
    rows, trainable_tokens_without_copies) is projected through the frozen matrix with those rows put
    back as the only differentiable part. Elsewhere, or past DENSE_HEAD_MAX_ELEMENTS, TRL's own tiles.
    """
    import torch
    import torch.nn.functional as F

    if hidden.device.type != "cpu" or hidden.shape[0] * weight.shape[0] > DENSE_HEAD_MAX_ELEMENTS:
        return original.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                              logit_scale, outputs)
    dtype = hidden.dtype
    trained = getattr(weight, "fcd_trained_rows", None)
    logits = F.linear(hidden, (weight.detach() if trained else weight).to(dtype),
                      None if bias is None else bias.to(dtype))
    if trained:
        index, rows = trained
        row_bias = None if bias is None else bias[index].to(dtype)
        logits = logits.index_copy(1, index, F.linear(hidden, rows.to(dtype), row_bias))
    z = logits.float() * logit_scale
    if final_logit_softcapping is not None:
        z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
    z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    log_probs = log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in outputs else None
        log_sum_sq = torch.logsumexp(2 * log_p, dim=-1) if "log_sum_sq_probs" in outputs else None
        mean_logits = z.mean(-1) if "mean_logits" in outputs else None
        is_top1 = z.argmax(-1) == targets if "is_top1" in outputs else None
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def dense_cpu_lm_head() -> bool:
    """Have TRL's fused LM head (trl.trainer.utils) score CPU positions with `_dense_log_probs`.

    TRL 1.16 calls its kernel through the module name `_ChunkedLogProbFunction` (trainer.utils), used
    there only by the fused head. Process-wide and idempotent; False (and a warning) if TRL changed.
    """
    import functools

    import trl.trainer.utils as trl_utils

    current = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if current is None or not hasattr(current, "apply"):
        log.warning("TRL no longer has trainer.utils._ChunkedLogProbFunction: the LM head runs TRL's tiles on CPU")
        return False
    if getattr(current, "_fcd_dense", False):
        return True

    class DenseOnCpu:
        _fcd_dense = True
        apply = staticmethod(functools.partial(_dense_log_probs, current))

    trl_utils._ChunkedLogProbFunction = DenseOnCpu
    return True
