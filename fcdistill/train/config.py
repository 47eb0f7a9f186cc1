"""The training config: one YAML file, validated by pydantic before anything heavy is imported.

Everything that can be checked without the model is checked here or in `sft.prepare` (which needs
only the tokenizer): unknown fields, missing data files, impossible LoRA or schedule values, and
examples longer than `max_length`. A bad config therefore fails in seconds (field errors in well
under one) with one line naming the problem, instead of after a model load.

Relative paths in the YAML are taken relative to the current directory, like every other `fcd`
path option.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fcdistill.chat_format import DEFAULT_FC_TOKEN
from fcdistill.configfile import existing_file, read_yaml_mapping
from fcdistill.errors import validation_message


class ConfigError(ValueError):
    """A bad training config or its data; the CLI prints it as one line and exits 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ProfileSettings(_Strict):
    """Optimizer steps torch.profiler records (fcdistill/train/profiling.py); the first ones pay for
    allocation and kernel selection, so the default starts at the fifth."""

    start_step: Annotated[int, Field(ge=1)] = 5
    steps: Annotated[int, Field(ge=1, le=50)] = 3
    trace: bool = False


class DataSettings(_Strict):
    """Prompt-completion JSONL files (`fcd data export --format trl`) and how eval is split off."""

    train: Path
    eval: Path | None = None
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # held out of `train` when `eval` is not given
    drop_overlength: bool = False  # False: an example longer than max_length is an error

    @field_validator("train")
    @classmethod
    def _train_exists(cls, v: Path) -> Path:
        return existing_file(v, "data.train file")

    @field_validator("eval")
    @classmethod
    def _eval_exists(cls, v: Path | None) -> Path | None:
        return None if v is None else existing_file(v, "data.eval file")

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSettings:
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("data: give either eval (a file) or eval_fraction, not both")
        return self


class LoraSettings(_Strict):
    """LoRA on the linear layers; the FC token's embedding row is trained separately (trainable tokens)."""

    r: Annotated[int, Field(ge=1)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "all-linear":
            raise ValueError(f"lora.target_modules: 'all-linear' or a list of module names, got {v!r}")
        if isinstance(v, list):
            if not v:
                raise ValueError("lora.target_modules: give module names or 'all-linear', not an empty list")
            if "lm_head" in v:
                # TRL computes log-probs from lm_head.weight directly, so a LoRA on it would never train.
                raise ValueError("lora.target_modules: lm_head cannot be a LoRA target (TRL's fused LM head "
                                 "reads its weight directly); the FC token's output row is trained anyway")
        return v


class OptimSettings(_Strict):
    """Optimizer and learning-rate schedule, passed to transformers' Trainer by name."""

    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    optimizer: str = "adamw_torch"
    scheduler: str = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0

    def check_names(self) -> None:
        """Optimizer and scheduler names against transformers' own lists (after the cheap checks)."""
        optimizers, schedulers = trainer_names()
        if self.optimizer not in optimizers:
            raise ConfigError(f"optim.optimizer: unknown optimizer {self.optimizer!r}; e.g. adamw_torch, adamw_torch_fused, sgd")
        if self.scheduler not in schedulers:
            raise ConfigError(f"optim.scheduler: unknown scheduler {self.scheduler!r}; choose one of {', '.join(schedulers)}")


def trainer_names() -> tuple[list[str], list[str]]:
    """The optimizer and scheduler names the installed transformers knows.

    Reading them imports torch and transformers' training arguments (about 4 s), which every `fcd run`
    would pay just to validate a recipe, even one whose training is done and skipped. So the lists are
    kept per transformers version in the fcdistill cache and imported once."""
    from importlib.metadata import version

    from fcdistill.jsonl import write_json_atomic
    from fcdistill.models import cache_dir

    path = cache_dir() / "names" / f"transformers-{version('transformers')}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        return list(cached["optimizers"]), list(cached["schedulers"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    names = {"optimizers": [o.value for o in OptimizerNames], "schedulers": [s.value for s in SchedulerType]}
    try:
        write_json_atomic(path, names)
    except OSError:
        pass  # a read-only cache only costs the import next time
    return names["optimizers"], names["schedulers"]


class TrainConfig(_Strict):
    """One training run of one student: what `fcd train --config` and `accelerate launch` both read."""

    student: str = "smollm2-135m"
    fc_token: str = DEFAULT_FC_TOKEN
    data: DataSettings
    # lora: LoRA adapters plus the FC token's rows (the result is a PEFT adapter); full: every weight
    # trains in fp32 master weights (the result is a plain model directory; `lora` is not used)
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)

    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: Annotated[int, Field(ge=1)] | None = None  # overrides epochs when set
    max_length: Annotated[int, Field(ge=8)] = 1024
    batch_size: Annotated[int, Field(ge=1)] = 4  # per device
    grad_accum: Annotated[int, Field(ge=1)] = 1
    # packing: batch_size rows of max_length tokens, several examples a row (TRL best-fit decreasing);
    # auto: on when the attention implementation keeps packed examples apart (sdpa, eager, flash)
    packing: bool | Literal["auto"] = "auto"
    # group_by_length: batches of similar lengths (less padding; on CPU, attention memory grows with the
    # square of the padded length); random: plain shuffling
    sampling: Literal["random", "group_by_length"] = "random"
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on a bf16 GPU, else fp32
    attn_implementation: str = "sdpa"
    num_threads: Annotated[int, Field(ge=1)] | None = None  # CPU torch threads per process (None: torch's default)
    seed: int = 42

    output_dir: Path = Path("runs/train")
    logging_steps: Annotated[int, Field(ge=1)] = 10
    eval_steps: Annotated[int, Field(ge=1)] | None = None  # None: evaluate once per epoch (when there is eval data)
    save_steps: Annotated[int, Field(ge=1)] = 100
    save_total_limit: Annotated[int, Field(ge=1)] | None = 2
    tensorboard: bool | Literal["auto"] = "auto"  # auto: log to TensorBoard when it is installed
    profile: ProfileSettings | None = None  # torch.profiler over a few steps into output_dir/profile/

    @field_validator("packing", "tensorboard", mode="before")
    @classmethod
    def _bool_or_auto(cls, v: Any, info: Any) -> Any:
        if v is True or v is False or v == "auto":
            return v
        raise ValueError(f"{info.field_name}: expected true, false or auto, got {v!r}")

    @field_validator("fc_token")
    @classmethod
    def _fc_token(cls, v: str) -> str:
        if not v or v.strip() != v or any(c.isspace() for c in v):
            raise ValueError(f"fc_token must be non-empty text without spaces, got {v!r}")
        return v

    @field_validator("student")
    @classmethod
    def _student(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("student: give a model alias, local directory or hub id")
        return v

    @model_validator(mode="after")
    def _eval_needs_data(self) -> TrainConfig:
        if self.eval_steps is not None and self.data.eval is None and self.data.eval_fraction == 0:
            raise ValueError("eval_steps is set but there is no eval data (set data.eval or data.eval_fraction)")
        return self

    @property
    def has_eval(self) -> bool:
        return self.data.eval is not None or self.data.eval_fraction > 0

    @property
    def final_dir(self) -> Path:
        """Where the result is written: `adapter/` (PEFT format) or, for a full fine-tune, `model/`
        (a transformers model directory); either with the tokenizer, chat template and fcdistill.json."""
        return self.output_dir / final_dir_name(self.finetune)


def final_dir_name(finetune: str) -> str:
    """The run directory's result folder for a finetune method."""
    return "model" if finetune == "full" else "adapter"


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.get(p)
        if child is None:  # absent, or `null` as a saved config.yaml writes an unset section
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
        node = child
    node[leaf] = value


_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` pairs (value parsed as YAML) applied on top of the file's mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. max_steps=20), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value):
            value = float(value)  # YAML 1.1 (PyYAML) reads 5e-4 as text; YAML 1.2 and users read a number
        _set_path(tree, key.strip(), value)
    return tree


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a YAML config; every failure is a one-line ConfigError."""
    path = Path(path)
    tree = apply_overrides(read_yaml_mapping(path, "config file", ConfigError), overrides or [])
    try:
        cfg = TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_message(exc)}") from None
    try:
        cfg.optim.check_names()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written into the run directory next to its outputs)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
