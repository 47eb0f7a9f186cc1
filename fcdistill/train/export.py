"""Load a trained student (adapter, full fine-tune or merged) and export it as one full model.

An adapter directory (written by `fcd train`) holds PEFT's files (adapter_config.json with the
FC token as `trainable_token_indices`, adapter_model.safetensors), the tokenizer with the FC token,
its chat template, and `fcdistill.json` naming the base student. When the FC token was added and
the vocabulary grew, the base model must be resized to the adapter's tokenizer before the adapter
is attached: the adapter holds the FC token's trained row(s) as trainable-token values, not the
whole matrix (sft.prune_embedding_copies). `load_trained` does this; so does the hf serve engine.

The merged export is a plain transformers directory (no PEFT, no quantization_config) that
transformers, vLLM and `fcd serve --model` load like any other model; the FC token is then part of
the vocabulary. vLLM cannot take a LoRA adapter that adds tokens, so added-token students are
served merged.

A full fine-tune (`finetune: full`) writes `model/`, already a plain model directory; exporting it
only writes it in the requested dtype.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fcdistill.models import ADAPTER_META, read_meta


class ExportError(ValueError):
    """A directory that is not an fcdistill adapter/merged export; the CLI prints it as one line."""


def trained_dir_of(path: str | Path) -> Path:
    """The adapter directory, a full fine-tune's model directory, or the run directory holding either."""
    p = Path(path)
    for d in (p, p / "adapter", p / "model"):
        if (d / "adapter_config.json").is_file() or ((d / "config.json").is_file() and (d / ADAPTER_META).is_file()):
            return d
    raise ExportError(f"{p} is not a trained student: no adapter directory (adapter_config.json), no model "
                      "directory of `fcd train` (config.json with fcdistill.json), nor a run directory with adapter/ "
                      "or model/")


def _base_dir(meta: dict[str, Any]) -> str:
    """The base weights: the student alias/name when it resolves here, else the recorded path."""
    from fcdistill.models import ModelResolveError, resolve_model

    for name in (meta.get("student"), meta.get("base_model")):
        if not name:
            continue
        try:
            return resolve_model(name)
        except ModelResolveError:
            continue
    raise ExportError(f"cannot find the base model of this adapter (student {meta.get('student')!r})")


def load_trained(path: str | Path, *, dtype: Any = None, device: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, meta) for an adapter directory, a run directory or a model directory (merged,
    or a full fine-tune's).

    Adapters come back as a PeftModel in eval mode (not merged, so the adapter's own forward is what
    runs); merged directories as a plain transformers model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    dtype = dtype or torch.float32
    try:
        p = trained_dir_of(p)
    except ExportError:
        if not (p / "config.json").is_file():
            raise ExportError(f"{p} is neither an adapter, a run directory, nor a model directory") from None
    adapter = p if (p / "adapter_config.json").is_file() else None
    if adapter is None:
        tokenizer = AutoTokenizer.from_pretrained(str(p))
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
        meta = read_meta(p)
    else:
        from fcdistill.models import load_peft_adapter

        meta = read_meta(adapter)
        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        base = AutoModelForCausalLM.from_pretrained(_base_dir(meta), dtype=dtype)
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = load_peft_adapter(base, adapter)
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer, meta


def merge_adapter(adapter: str | Path, out: str | Path, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write base + adapter (LoRA deltas and the FC token rows) as one plain transformers model; a
    full fine-tune's model directory (or its run directory) is written as it is, in `dtype`.

    dtype: auto keeps the base checkpoint's dtype (fp32 for the converted SmolLM2, bf16 for Qwen);
    merging itself runs in fp32 so the low-rank update is not rounded twice.
    """
    import torch
    from transformers import AutoConfig

    adapter_dir = trained_dir_of(adapter)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
        shutil.rmtree(out)
    meta = read_meta(adapter_dir)
    if dtype == "auto":
        base_cfg = AutoConfig.from_pretrained(_base_dir(meta))
        saved = getattr(base_cfg, "dtype", None) or getattr(base_cfg, "torch_dtype", None) or torch.float32
        target = getattr(torch, saved) if isinstance(saved, str) else saved
    else:
        names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in names:
            raise ExportError(f"unknown --dtype {dtype!r}; choose auto, fp32, bf16 or fp16")
        target = names[dtype]
    model, tokenizer, meta = load_trained(adapter_dir, dtype=torch.float32)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged = merged.to(target)
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config  # vLLM refuses a config that names one
    merged.config.vocab_size = merged.get_input_embeddings().weight.shape[0]
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    meta = {**meta, "format": "merged", "merged_from": str(adapter_dir.resolve()), "dtype": str(target).split(".")[-1]}
    (out / ADAPTER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
    return out


def greedy_completions(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 64,
                       batch_size: int = 8) -> list[str]:
    """Greedy completions of rendered prompts, decoded with special tokens kept (the FC token is one).

    Batched with left padding; the text after end-of-turn (padding) is left for `ChatFormat.parse`,
    which ignores everything after end-of-turn.
    """
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(next(model.parameters()).device)
            with torch.inference_mode():
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            new = ids[:, batch["input_ids"].shape[1]:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=False))
    finally:
        tokenizer.padding_side = side
    return out
