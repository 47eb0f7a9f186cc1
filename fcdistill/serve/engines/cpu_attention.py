"""The hf engine's attention on a CPU: plain (eager) attention for one or two rows in bf16, transformers'
SDPA otherwise.

benchmarks/attention_bench.py (SmolLM2-135M, 2-core AVX512-BF16 EPYC, median of 9, both paths interleaved):
in bf16, one row after 1,900 cached tokens, SDPA took 68.5 ms a decode step and eager 44.9 ms (0.66x);
a 100-token prefill there 274.6 vs 195.7 ms (0.71x); 2 rows with 7 new tokens each 65.1 vs 45.5 ms (0.70x).
But 8 rows took 91.3 vs 147.4 ms (eager 1.6x slower), and in fp32 eager was no faster anywhere. An agent
with one conversation decodes and prefills one row at a time over a long context, so that is where the
eager path runs. Registered with transformers' AttentionInterface under NAME, with SDPA's boolean masks.
"""

from __future__ import annotations

from typing import Any

NAME = "fcd_cpu"
EAGER_MAX_ROWS = 2


def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
              dropout: float = 0.0, **kwargs: Any) -> tuple[Any, Any]:
    """transformers' attention-function signature; [rows, heads, positions, dim] in, [rows, positions, heads, dim] out."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if query.dtype != torch.bfloat16 or query.shape[0] > EAGER_MAX_ROWS or query.device.type != "cpu" or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    keys, values = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, keys.transpose(2, 3)) * scale
    q, n = query.shape[-2], keys.shape[-2]
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is not None:  # SDPA's: boolean, True where a query may look
        scores = scores.masked_fill(~attention_mask[..., :n], lowest)
    elif q > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True)):  # causal, the queries last
        causal = torch.ones((q, n), dtype=torch.bool, device=scores.device).tril(n - q)
        scores = scores.masked_fill(~causal, lowest)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, values).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make NAME an attention implementation transformers can load a model with; returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
