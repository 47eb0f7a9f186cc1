"""SFT of a student around the FC token, with TRL's SFTTrainer: LoRA (PEFT) or a full fine-tune.

The run is split in two so that bad input fails fast: `prepare` needs only the tokenizer (it reads
and length-checks the data, adds or reuses the FC token), `train` then loads the model, grows its
embeddings when the FC token is new, and trains LoRA adapters plus the FC token's embedding row
(PEFT `trainable_token_indices`; with untied output embeddings the lm_head row too), or, with
`finetune: full`, every weight (the FC rows with them). The same code
runs under `fcd train` and `accelerate launch -m fcdistill.train` (DDP, FSDP2, DeepSpeed): the
launcher only sets the environment that transformers' Trainer reads.

A run directory holds `run_info.json`, `config.yaml`, `train_log.jsonl` (one line per log event:
loss, eval_loss, learning rate, tokens/s), TensorBoard events when installed, `checkpoint-N/`
(resumable with `--resume`), and finally `adapter/` (a full fine-tune: `model/`) and `train_result.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcdistill.data.export import example_lengths
from fcdistill.models import (ADAPTER_META, PEFT_CHECKPOINTING_NOTICE, FcTokenInfo, ModelResolveError,
                              avoid_cudnn_attention, cpu_has_native_bf16, ensure_fc_token, resolve_model)
from fcdistill.train.config import ConfigError, TrainConfig, config_to_yaml
from fcdistill.train.profiling import profile_callback
from fcdistill.train.throughput import (dense_cpu_lm_head, lora_in_activation_dtype, register_packed_sdpa,
                                         score_only_labelled_positions, trainable_tokens_without_copies)

log = logging.getLogger("fcdistill.train")

LOG_FILE = "train_log.jsonl"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Prepared:
    """Everything decided before the model loads: tokenizer with FC token, the data, its lengths."""

    cfg: TrainConfig
    model_dir: str
    tokenizer: Any
    fc: FcTokenInfo
    fc_pieces: list[int]  # ids the FC text had before it became one token (initialises a new row)
    train_rows: list[dict[str, str]]
    eval_rows: list[dict[str, str]] | None
    stats: dict[str, Any] = field(default_factory=dict)


# -- data ------------------------------------------------------------------------------------------
def read_pairs(path: Path) -> list[dict[str, str]]:
    """Prompt-completion records of a TRL export; the first malformed line is a ConfigError."""
    rows: list[dict[str, str]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}:{lineno}: expected an object with prompt and completion")
            for key in ("prompt", "completion"):
                if not isinstance(obj.get(key), str) or not obj[key]:
                    raise ConfigError(f"{path}:{lineno}: needs a non-empty string {key!r} "
                                      "(write it with `fcd data export --format trl`)")
            rows.append({"id": str(obj.get("id", f"{path.name}:{lineno}")), "prompt": obj["prompt"],
                         "completion": obj["completion"]})
    if not rows:
        raise ConfigError(f"{path}: no records")
    return rows


def _check_lengths(cfg: TrainConfig, tokenizer: Any, rows: list[dict[str, str]], source: Path,
                   stats: dict[str, Any], key: str) -> list[dict[str, str]]:
    """Refuse (or drop, when asked) examples longer than max_length: truncation would cut the target."""
    lengths = example_lengths(tokenizer, rows)
    over = [(n, r) for n, r in zip(lengths, rows) if n > cfg.max_length]
    stats[key] = {"examples": len(rows), "tokens": sum(lengths), "mean_tokens": round(sum(lengths) / len(rows), 1),
                  "max_tokens": max(lengths), "over_max_length": len(over)}
    if over and not cfg.data.drop_overlength:
        n, worst = max(over, key=lambda x: x[0])
        prompt_n = len(tokenizer(worst["prompt"])["input_ids"])
        what = "a prompt" if prompt_n > cfg.max_length else "a prompt plus its completion"
        raise ConfigError(f"max_length {cfg.max_length} is shorter than {what}: {len(over)} of {len(rows)} examples "
                          f"in {source} are longer (longest {n} tokens, id {worst['id']}); raise max_length or set "
                          "data.drop_overlength: true")
    if over:
        log.warning("dropping %d of %d examples longer than max_length %d", len(over), len(rows), cfg.max_length)
        rows = [r for n, r in zip(lengths, rows) if n <= cfg.max_length]
        if not rows:
            raise ConfigError(f"every example in {source} is longer than max_length {cfg.max_length}")
    return rows


def prepare(cfg: TrainConfig) -> Prepared:
    """Tokenizer, FC token and validated data; loads no model weights (a bad run fails here, fast)."""
    from transformers import AutoTokenizer

    try:
        model_dir = resolve_model(cfg.student)
    except ModelResolveError as exc:
        raise ConfigError(f"student: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except OSError as exc:
        raise ConfigError(f"student {cfg.student!r}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"student {cfg.student!r} has no chat template; the wire format needs one")
    pieces = tokenizer.encode(cfg.fc_token, add_special_tokens=False)
    fc = ensure_fc_token(tokenizer, cfg.fc_token)

    stats: dict[str, Any] = {}
    train_rows = read_pairs(cfg.data.train)
    eval_rows: list[dict[str, str]] | None = None
    if cfg.data.eval is not None:
        eval_rows = read_pairs(cfg.data.eval)
    elif cfg.data.eval_fraction > 0:
        shuffled = train_rows[:]
        random.Random(cfg.seed).shuffle(shuffled)
        n_eval = max(1, round(len(shuffled) * cfg.data.eval_fraction))
        if n_eval >= len(shuffled):
            raise ConfigError(f"data.eval_fraction {cfg.data.eval_fraction} leaves no training examples "
                              f"out of {len(shuffled)}")
        eval_rows, train_rows = shuffled[:n_eval], shuffled[n_eval:]
    train_rows = _check_lengths(cfg, tokenizer, train_rows, cfg.data.train, stats, "train")
    if eval_rows is not None:
        eval_rows = _check_lengths(cfg, tokenizer, eval_rows, cfg.data.eval or cfg.data.train, stats, "eval")
    with_fc = sum(cfg.fc_token in r["completion"] for r in train_rows)
    stats["train"]["with_fc_token"] = with_fc
    if with_fc == 0:
        log.warning("no training completion contains the FC token %r: was the data exported with another "
                    "--fc-token?", cfg.fc_token)
    return Prepared(cfg, model_dir, tokenizer, fc, pieces, train_rows, eval_rows, stats)


# -- model -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32
    load_dtype: Any  # torch dtype of the frozen base weights
    autocast: bool  # the Trainer's mixed precision; a bf16 base on CPU runs without it


def resolve_precision(requested: str, *, full: bool = False) -> Precision:
    """auto: bf16 on a GPU or CPU that has it natively, else fp32.

    On a GPU, bf16 is the Trainer's autocast over bf16 weights. On a CPU, autocast costs a cast per op
    and gains little; instead the frozen base is stored in bf16 and runs without autocast, while
    PEFT keeps the LoRA weights (and so the optimizer state) in fp32, and their matmuls run in bf16 on
    weights cast per forward (throughput.lora_in_activation_dtype): the trained parameters never round
    to bf16.

    `full`: every weight is trained, so every weight stays fp32 (an Adam step of ~1e-5 rounds away in
    bf16) and bf16/fp16 is the Trainer's autocast, on a CPU too.
    """
    import torch

    cuda = torch.cuda.is_available()
    name = requested
    if requested == "auto":
        native = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
        name = "bf16" if native else "fp32"
    if name == "fp16" and not cuda:
        raise ConfigError("precision fp16 needs a CUDA GPU; use fp32 (or auto) on CPU")
    # fp16 keeps fp32 master weights (the grad scaler refuses fp16 gradients); bf16 needs no scaler
    if full:
        return Precision(name, torch.float32, autocast=name in ("bf16", "fp16"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[name]
    return Precision(name, dtype, autocast=cuda and name in ("bf16", "fp16"))


def embeddings_tied(model: Any) -> bool:
    """True when lm_head shares the input embedding matrix (SmolLM2, Qwen2.5-0.5B/1.5B)."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def grow_for_fc_token(model: Any, tokenizer: Any, fc: FcTokenInfo, pieces: list[int]) -> bool:
    """Make room for an added FC token and start its row(s) at the mean of the text's old pieces.

    Returns True when the matrix was resized. A reused token keeps its trained row. A new token's
    row starts where the model already reads `<tool_call>` spelled out, which learns faster than a
    random row; with untied embeddings the lm_head row is initialised the same way.
    """
    import torch

    resized = False
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        resized = True
    if fc.added and pieces:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        index = torch.tensor(pieces)
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        weights = [emb] if out is None or out.weight is emb else [emb, out.weight]
        gather: Any = contextlib.nullcontext()
        if is_deepspeed_zero3_enabled():  # rows are partitioned across ranks: gather, edit on rank 0
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
        with gather, torch.no_grad():
            for w in weights:
                if w.device.type != "meta":  # FSDP's low-memory load: rank 0 holds the weights
                    w[fc.token_id] = w[index.to(w.device)].mean(0)
    return resized


def lora_config(cfg: TrainConfig, model: Any, fc_id: int) -> Any:
    """LoRA on the linear layers plus the FC token's rows as PEFT trainable tokens.

    Tied embeddings: the input embedding's rows are trained and PEFT ties lm_head to them. Untied:
    both the input embedding and lm_head get the FC row as trainable tokens, named by module path.
    """
    from peft import LoraConfig

    names = {id(m): n for n, m in model.named_modules()}
    if embeddings_tied(model):
        indices: Any = [fc_id]
    else:
        indices = {names[id(model.get_input_embeddings())]: [fc_id],
                   names[id(model.get_output_embeddings())]: [fc_id]}
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM", bias="none",
                      trainable_token_indices=indices)


def fit_trainable_tokens_to_fused_lm_head(model: Any, *, upcast: bool = True) -> None:
    """Let TRL's fused LM head work through a PEFT trainable-tokens lm_head; keep token rows fp32.

    TRL 1.16's SFTTrainer always patches the model with `add_fused_lm_head` (trl/trainer/utils.py;
    there is no switch to turn it off), whose forward reads `lm_head.weight` and `lm_head.bias`
    directly instead of calling lm_head. With `trainable_token_indices`, lm_head is a PEFT
    `TrainableTokensWrapper` (tied to the embedding's adapter, or its own for untied heads). Its
    `weight` attribute already resolves, via PEFT's `_getattr_wrapped`, to `get_merged_weights()`:
    the base matrix with the trained rows index-copied in, differentiable, so the fused kernel sees
    the trained FC row and its gradient reaches the delta. Only `bias` is missing, so the lookup
    fails ("'TrainableTokensWrapper' object has no attribute 'bias'"). The narrowest fix is to
    give the wrapper the wrapped layer's bias (None for every head we train; a real bias would be
    a parameter of the base layer and is refused rather than silently re-registered). No TRL code
    is overridden; the tests check that the FC row changes and is saved.

    `upcast`: trainable-token rows are created in the base weights' dtype; in bf16 an Adam step of
    ~1e-4 on values ~1e-2 rounds away, so they are kept in fp32 like PEFT keeps LoRA weights (not
    under DeepSpeed ZeRO-3, which needs one dtype and which TRL sets up itself).
    """
    import torch
    from peft.utils.other import TrainableTokensWrapper

    for wrapper in (model.get_input_embeddings(), model.get_output_embeddings()):
        if not isinstance(wrapper, TrainableTokensWrapper):
            continue
        base = wrapper.token_adapter.base_layer
        if wrapper is model.get_output_embeddings() and "bias" not in vars(wrapper):
            if getattr(base, "bias", None) is not None:
                raise NotImplementedError("an lm_head with a bias cannot be trained through TRL's fused LM head")
            wrapper.bias = None  # plain attribute (not a parameter): read by the fused head only
        if upcast:
            for p in wrapper.token_adapter.trainable_tokens_delta.parameters():
                if p.dtype != torch.float32:
                    p.data = p.data.float()


# -- logging, checkpoints --------------------------------------------------------------------------
def _trainer_callback_cls() -> type:
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Every Trainer log event as one JSON line, plus train tokens/s since the previous event."""

        def __init__(self, path: Path) -> None:
            self.path = path
            self._last: tuple[float, float] | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            rec: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3)}
            rec.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str, bool)) or v is None})
            tokens = logs.get("num_tokens")
            if isinstance(tokens, (int, float)) and "loss" in logs:
                now = time.perf_counter()
                if self._last is not None and now > self._last[0] and tokens > self._last[1]:
                    rec["train_tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 2)
                self._last = (now, float(tokens))
            import torch

            if torch.cuda.is_available():  # what a batch-size choice costs on the device
                rec["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self._last = None

        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.is_world_process_zero:
                prune_embedding_copies(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return JsonlLog


def _checkpointing_arg(args_cls: type) -> str:
    """The training arguments' name for activation checkpointing: `activation_checkpointing` since
    transformers 5.2x (the old `gradient_checkpointing` warns), `gradient_checkpointing` before."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_cls)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


@contextlib.contextmanager
def _quiet_preparation() -> Any:
    """No progress bars while the model loads and TRL tokenizes and packs the data (a dozen bars per
    run, each over in a second); the training bar itself stays."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_bars, hf_bars = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def _loss_on_the_bar(trainer: Any) -> None:
    """Trainer's progress callback writes every log dict to stdout under its bar; ours shows loss and
    eval loss on the bar instead (every record is in train_log.jsonl)."""
    from transformers.trainer_callback import ProgressCallback

    class LossOnTheBar(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss") if isinstance(logs.get(k), (int, float))}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LossOnTheBar())


def prune_embedding_copies(directory: Path) -> int:
    """Drop the full embedding matrices PEFT saves beside trainable tokens when the vocabulary grew.

    PEFT stores the whole resized embedding (and, tied, a second copy for lm_head: 226 MB for
    SmolLM2 in fp32) because a base model without the new row cannot take the adapter. Loaders
    here resize the base to the adapter's tokenizer first (`export.load_trained`), and the FC row's
    trained values are in `trainable_tokens_delta`, which replaces the row in every forward and in
    merges; the copies carry nothing else (the rest of the matrix is the base's, unchanged).
    Returns the number of tensors removed.
    """
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        return 0
    tensors = load_file(str(path))
    kept = {k: v for k, v in tensors.items() if not k.endswith("token_adapter.base_layer.weight")}
    if len(kept) != len(tensors):
        save_file(kept, str(path), metadata={"format": "pt"})
    return len(tensors) - len(kept)


def find_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last; a killed save lacks it)."""
    if not output_dir.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in output_dir.iterdir()
                    if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))), reverse=True)
    for _, path in found:
        # an adapter, a full model, or (full, sharded) DeepSpeed's or FSDP's own state
        weights = any(path.glob("adapter_model.*")) or any(path.glob("model*.safetensors")) \
            or any(path.glob("global_step*")) or any(path.glob("pytorch_model_fsdp*"))
        if (path / "trainer_state.json").is_file() and weights:
            return path
    return None


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines from after the checkpoint: those steps are trained again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def tensorboard_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


_PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def _resolve_packing(cfg: TrainConfig) -> bool:
    """auto: pack when the attention implementation keeps packed examples apart.

    TRL's padding-free packing passes position_ids that restart per example and no attention mask;
    flash attention reads them as variable-length sequences, SDPA is run per example
    (throughput.packed_sdpa_forward) and eager gets transformers' block-diagonal mask
    (tests/test_train_tokens.py checks that a packed row gives each example the logits it has
    alone). Other implementations are not trusted.
    """
    if cfg.packing != "auto":
        return bool(cfg.packing)
    impl = cfg.attn_implementation
    return impl in _PACKING_ATTENTION or "flash" in impl


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path  # adapter/ or, for a full fine-tune, model/
    global_step: int
    resumed_from: str | None
    metrics: dict[str, Any]


def build_trainer(cfg: TrainConfig, prep: Prepared, *, callbacks: list[Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """The SFTTrainer for a prepared run, the model loaded and adapted; plus facts for run_info.json."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    out = cfg.output_dir
    full = cfg.finetune == "full"
    precision = resolve_precision(cfg.precision, full=full)
    if cfg.tensorboard is True and not tensorboard_available():
        raise ConfigError("tensorboard: true, but tensorboard is not installed (pip install tensorboard)")
    # PEFT announces it will save the resized embeddings; prune_embedding_copies removes them again
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
    # PEFT and TRL read the model's deprecated `is_gradient_checkpointing` alias; the training arguments
    # below use the new name themselves
    warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_NOTICE, category=FutureWarning)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    packing = _resolve_packing(cfg)
    report_to = ["tensorboard"] if cfg.tensorboard is not False and tensorboard_available() else "none"
    if report_to != "none":
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    eval_strategy = "no" if prep.eval_rows is None else ("steps" if cfg.eval_steps else "epoch")
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay, optim=cfg.optim.optimizer,
        lr_scheduler_type=cfg.optim.scheduler, warmup_steps=cfg.optim.warmup_ratio,
        max_grad_norm=cfg.optim.max_grad_norm,
        max_length=cfg.max_length, packing=packing, packing_strategy="bfd", completion_only_loss=True,
        train_sampling_strategy=cfg.sampling,
        **{_checkpointing_arg(SFTConfig): cfg.gradient_checkpointing},
        bf16=precision.autocast and precision.name == "bf16", fp16=precision.autocast and precision.name == "fp16",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed, data_seed=cfg.seed,
        logging_steps=cfg.logging_steps, logging_first_step=True, report_to=report_to,
        eval_strategy=eval_strategy, eval_steps=cfg.eval_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        ddp_find_unused_parameters=False, dataloader_num_workers=0, disable_tqdm=False,
    )
    # The model loads after the training arguments: under DeepSpeed ZeRO-3 they register the config
    # that makes from_pretrained partition the weights as they load.
    attn = cfg.attn_implementation
    if packing and attn == "sdpa":  # the same attention, each packed example on its own (throughput.py)
        attn = register_packed_sdpa()
    compact_head = score_only_labelled_positions()
    dense_head = compact_head and not torch.cuda.is_available() and dense_cpu_lm_head()
    no_cudnn_attention = avoid_cudnn_attention()
    with _quiet_preparation():
        model = AutoModelForCausalLM.from_pretrained(prep.model_dir, dtype=precision.load_dtype,
                                                     attn_implementation=attn)
        resized = grow_for_fc_token(model, prep.tokenizer, prep.fc, prep.fc_pieces)
        tied = embeddings_tied(model)
        columns = ("prompt", "completion")
        train_ds = Dataset.from_list([{k: r[k] for k in columns} for r in prep.train_rows])
        eval_ds = Dataset.from_list([{k: r[k] for k in columns} for r in prep.eval_rows]) if prep.eval_rows else None
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=prep.tokenizer,
                             peft_config=None if full else lora_config(cfg, model, prep.fc.token_id),
                             callbacks=[_trainer_callback_cls()(out / LOG_FILE), *(callbacks or []),
                                        *([profile_callback(cfg.profile, out / "profile")] if cfg.profile else [])])
    _loss_on_the_bar(trainer)
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    copy_free = lora_low_precision = False
    if not full:
        fit_trainable_tokens_to_fused_lm_head(trainer.model, upcast=not trainer.is_deepspeed_enabled)
        copy_free = not sharded and trainable_tokens_without_copies(trainer.model) > 0
        lora_low_precision = not sharded and lora_in_activation_dtype(trainer.model) > 0
    state = trainer.accelerator.state
    kind = state.distributed_type
    info = {
        "student": cfg.student, "model_dir": prep.model_dir, "finetune": cfg.finetune,
        "fc_token": prep.fc.token, "fc_token_id": prep.fc.token_id, "fc_token_added": prep.fc.added,
        "embeddings_resized": resized, "tied_embeddings": tied, "vocab_size": len(prep.tokenizer),
        "precision": precision.name, "packing": packing, "attn_implementation": attn,
        "cudnn_attention_off": no_cudnn_attention,
        "lm_head_scores_labelled_only": compact_head, "lm_head_dense_on_cpu": dense_head,
        "trainable_tokens_copy_free": copy_free, "lora_in_activation_dtype": lora_low_precision,
        "device": str(trainer.args.device), "world_size": trainer.args.world_size,
        "distributed_type": str(getattr(kind, "value", kind)), "backend": state.backend, "report_to": report_to,
        "data": prep.stats,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "versions": _versions(),
    }
    return trainer, info


def train(cfg: TrainConfig, *, resume: bool = False, prepared: Prepared | None = None,
          callbacks: list[Any] | None = None) -> TrainResult:
    """Train (or resume) one run; returns where the result is. Every rank calls this under accelerate."""
    prep = prepared or prepare(cfg)
    out, final = cfg.output_dir, cfg.final_dir
    checkpoint = find_checkpoint(out)
    if checkpoint is not None and not resume:
        raise ConfigError(f"output_dir {out} already has {checkpoint.name}; pass --resume to continue that run "
                          "or choose another output_dir")
    if checkpoint is None and not resume and final.exists():
        raise ConfigError(f"output_dir {out} already holds a finished run ({final.name}/); choose another output_dir")
    finished = out / "train_result.json"
    if resume and finished.is_file() and (final / ADAPTER_META).is_file():
        done = json.loads(finished.read_text(encoding="utf-8"))
        log.warning("--resume: %s already finished (%s steps); nothing to do", out, done.get("global_step"))
        return TrainResult(out, final, int(done.get("global_step", 0)), done.get("resumed_from"), done)
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", out)
    if checkpoint is not None and resume and (out / "run_info.json").is_file():
        before = json.loads((out / "run_info.json").read_text(encoding="utf-8")).get("finetune", "lora")
        if before != cfg.finetune:
            raise ConfigError(f"--resume: {out} holds a finetune: {before} run; this config asks for finetune: "
                              f"{cfg.finetune} (choose another output_dir)")
    resumed_from = str(checkpoint) if resume and checkpoint else None

    trainer, info = build_trainer(cfg, prep, callbacks=callbacks)
    info["resumed_from"] = resumed_from
    main = trainer.is_world_process_zero()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
        (out / "run_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        if checkpoint is not None and resumed_from:
            _trim_log(out / LOG_FILE, int(_CHECKPOINT_RE.match(checkpoint.name).group(1)))

    result = trainer.train(resume_from_checkpoint=resumed_from)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:  # eval_loss of the final weights, unless the schedule just logged it
        done = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        metrics.update({k: v for k, v in done[-1].items() if k.startswith("eval_")} if done else trainer.evaluate())
    trainer.save_model(str(final))  # the adapter or the model (+ tokenizer, chat template) from the main process
    if main:
        prune_embedding_copies(final)
        prep.tokenizer.save_pretrained(str(final))
        write_meta(final, prep, kind="full" if cfg.finetune == "full" else "adapter", tied=info["tied_embeddings"])
        summary = {"global_step": trainer.state.global_step, "resumed_from": resumed_from,
                   "final_dir": str(final), **({"adapter_dir": str(final)} if cfg.finetune == "lora" else {}),
                   **metrics}
        (out / "train_result.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    trainer.accelerator.wait_for_everyone()
    return TrainResult(out, final, trainer.state.global_step, resumed_from, metrics)


def write_meta(directory: Path, prep: Prepared, *, kind: str, tied: bool) -> None:
    """What a loader needs besides PEFT's files: which student, which FC token, whether it was added."""
    meta = {"format": kind, "student": prep.cfg.student, "base_model": prep.model_dir,
            "fc_token": prep.fc.token, "fc_token_id": prep.fc.token_id, "fc_token_added": prep.fc.added,
            "vocab_size": len(prep.tokenizer), "tied_embeddings": tied}
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run(config_path: str | os.PathLike, *, resume: bool = False, overrides: list[str] | None = None,
        check_only: bool = False) -> TrainResult | Prepared:
    """Load, validate and train: the one entry point of `fcd train` and `python -m fcdistill.train`."""
    from fcdistill.train.config import load_config

    cfg = load_config(config_path, overrides)
    prep = prepare(cfg)
    if check_only:
        return prep
    return train(cfg, resume=resume, prepared=prep)
