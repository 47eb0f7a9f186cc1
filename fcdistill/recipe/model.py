"""The recipe: one YAML file that describes a whole distillation run, validated before any work.

A recipe names the stages it wants (data is always there; the others are optional sections) and the
options of each. Options that a stage's own command already validates (`fcd label`, `fcd synth`,
`fcd data augment`, `fcd verify`, a training config) are checked here by that stage's own model, so a
recipe accepts exactly what the commands accept, with the fields the runner owns (input and output
paths, the seed) left out. Every problem is reported at load, all at once, each naming its field:
an unknown stage or field, a stage whose input is missing, a teacher whose key variable is unset.

Paths in a recipe are taken relative to the current directory, as everywhere in fcdistill.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, FilePath, PrivateAttr, ValidationError, field_validator, model_validator

from fcdistill.configfile import existing_file
from fcdistill.data.bfcl import OptionalArgs
from fcdistill.errors import validation_message

# The order stages run in. `serve` has no outputs of its own: the eval stage starts and stops the
# server(s) it describes.
STAGES = ("data", "label", "synth", "verify", "augment", "train", "export", "eval", "report")
# Marks a field added after run directories existed: a stage's key counts it only when it is set away
# from its default (which keeps the earlier behaviour), so an upgrade does not rerun finished stages.
WHEN_SET = "identity_when_set"


class RecipeError(ValueError):
    """A recipe that cannot run as written; the CLI prints it as one line and exits 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _stage_options(model: type[BaseModel], given: dict[str, Any], owned: dict[str, Any]) -> dict[str, Any]:
    """`given` checked by a stage's own options model: unknown fields and the runner's own are refused,
    values are validated with the runner's values filled in."""
    known = set(model.model_fields) - set(owned)
    unknown = sorted(set(given) - known)
    if unknown:
        taken = [k for k in unknown if k in owned]
        if taken:
            raise ValueError(f"{', '.join(taken)}: set by the recipe runner, not in a recipe")
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        model.model_validate({**given, **owned})
    except ValidationError as exc:
        raise ValueError(validation_message(exc)) from None
    except ValueError as exc:  # the stages' own errors (TeacherError, DataError) are ValueErrors
        raise ValueError(str(exc)) from None
    return given


class BfclSpec(_Strict):
    """`fcd data bfcl`: which categories, how they split."""

    categories: list[str] = Field(min_length=1)
    eval_only: list[str] = Field(default_factory=list)
    eval_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    mix_in: float = Field(0.1, ge=0.0, le=1.0, description="share of train that keeps BFCL's labels")
    live_eval_only: bool = Field(True, description="every live_* category goes wholly to eval",
                                 json_schema_extra={WHEN_SET: True})
    max_per_category: dict[str, int] = Field(default_factory=dict)
    eval_per_category: dict[str, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict, description="eval items of a category in place of eval_fraction",
        json_schema_extra={WHEN_SET: True})
    optional_args: OptionalArgs = Field("omit", description="optional parameters in the targets: omitted, "
                                        "the value BFCL's answer lists kept (given), or kept only where the "
                                        "question says it (stated)",
                                                    json_schema_extra={WHEN_SET: True})

    @field_validator("categories", "eval_only")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from fcdistill.data.bfcl import KNOWN_CATEGORIES

        bad = [c for c in v if c not in KNOWN_CATEGORIES]
        if bad:
            raise ValueError(f"unknown BFCL categories {', '.join(bad)}; known: {', '.join(KNOWN_CATEGORIES)}")
        return v


class DataSpec(_Strict):
    """BFCL items, the user's own tools and seed examples (synth reads them), or both."""

    bfcl: BfclSpec | None = None
    tools: Path | None = Field(None, description="the user's tools, OpenAI tool JSON")
    seeds: Path | None = Field(None, description="seed examples JSONL {query, calls}")

    @model_validator(mode="after")
    def _some_data(self) -> DataSpec:
        if self.bfcl is None and self.tools is None:
            raise ValueError("data: give bfcl (categories), tools and seeds (your own), or both")
        if (self.tools is None) != (self.seeds is None):
            raise ValueError("data: give tools and seeds together")
        for path, what in ((self.tools, "data.tools"), (self.seeds, "data.seeds")):
            if path is not None:
                existing_file(path, what)
        return self


class LabelSpec(_Strict):
    """Where train targets come from: BFCL's own answers, or the teacher (`fcd label` options)."""

    source: Literal["ground-truth", "teacher"] = "ground-truth"
    options: dict[str, Any] = Field(default_factory=dict, description="fcd label: samples, min_agreement, judge, ...")

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fcdistill.teacher.label import LabelOptions

        return _stage_options(LabelOptions, v, {"data": ".", "out": ".", "overwrite": False})


class SynthSpec(_Strict):
    """`fcd synth` over data.tools and data.seeds (count, styles, exec_module, judge, ...)."""

    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fcdistill.teacher.inputs import SynthOptions

        return _stage_options(SynthOptions, v, {"out": ".", "eval_data": None, "seed": 0, "export": ["trl"],
                                                "model": "x", "fc_token": "x"})


class VerifySpec(_Strict):
    """`fcd verify` over examples from elsewhere; what passes is trained on."""

    input: FilePath
    options: dict[str, Any] = Field(default_factory=dict, description="tools, exec_module, judge, ...")

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        from fcdistill.teacher.inputs import VerifyOptions

        return _stage_options(VerifyOptions, v, {"input": ".", "out": ".", "eval_data": None, "progress": False})


class AugmentSpec(_Strict):
    """`fcd data augment` of the (labeled) BFCL train split."""

    multiplier: int = Field(2, ge=1, le=20)
    transforms: list[str] | None = None  # None: all of them
    dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)
    ngram: int = Field(13, ge=1)
    # no augmented record over this many student tokens (set it to the training config's max_length)
    max_length: int | None = Field(None, ge=8, json_schema_extra={WHEN_SET: True})

    @field_validator("transforms")
    @classmethod
    def _transforms(cls, v: list[str] | None) -> list[str] | None:
        from fcdistill.data.augment_ops import TRANSFORMS

        bad = [t for t in v or [] if t not in TRANSFORMS]
        if bad or v == []:
            raise ValueError(f"unknown transforms {', '.join(bad) or '(none)'}; choose from {', '.join(TRANSFORMS)}")
        return v


class SampleSpec(_Strict):
    """Train on a seeded sample, stratified by BFCL category (a quick run), instead of every example."""

    examples: int = Field(gt=0)
    categories: list[str] | None = None  # None: every category present


class TrainSpec(_Strict):
    """A training config plus overrides; trained by a child `python -m fcdistill.train`, or under
    `accelerate launch` on GPUs."""

    config: Path
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides, as `fcd train --set`")
    sample: SampleSpec | None = None
    launcher: Literal["auto", "python", "accelerate"] = Field(
        "auto", description="auto: accelerate when accelerate_config is given and a GPU is present, else python "
                            "(a child process of this interpreter)")
    accelerate_config: Path | None = None
    num_processes: int | None = Field(None, ge=1)
    _finetune: str = PrivateAttr("lora")  # the config's `finetune` after the overrides (lora | full)

    @property
    def finetune(self) -> str:
        return self._finetune

    @field_validator("set", mode="before")
    @classmethod
    def _dotted(cls, v: Any) -> Any:
        """`optim: {learning_rate: ...}` (what `fcd run --set train.set.optim.learning_rate=...` makes) and
        `optim.learning_rate: ...` are the same override."""
        return flatten(v) if isinstance(v, dict) else v

    @field_validator("config", "accelerate_config")
    @classmethod
    def _files(cls, v: Path | None, info: Any) -> Path | None:
        return None if v is None else existing_file(v, f"train.{info.field_name}")

    @model_validator(mode="after")
    def _config_loads(self) -> TrainSpec:
        from fcdistill.train.config import ConfigError, load_config

        owned = sorted(k for k in self.set if k in ("output_dir", "data.train", "student", "fc_token", "seed"))
        if owned:
            raise ValueError(f"train.set: {', '.join(owned)} set by the recipe runner (student, fc_token and seed "
                             "are recipe fields)")
        if self.launcher == "accelerate" and self.accelerate_config is None:
            raise ValueError("train: launcher accelerate needs accelerate_config (see configs/accelerate/)")
        # data.train does not exist before the run: the config is checked against a stand-in file
        try:
            cfg = load_config(self.config, [f"{k}={_yaml_scalar(v)}" for k, v in self.set.items()]
                              + [f"data.train={self.config}"])
        except ConfigError as exc:
            raise ValueError(f"train: {exc}") from None
        self._finetune = cfg.finetune
        return self


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys (`{optim: {lr: 1}}` -> `{"optim.lr": 1}`)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


class ExportSpec(_Strict):
    """Merge the adapter into a full model (vLLM serves the tuned student merged); a full fine-tune's
    model is written in `dtype`."""

    merge: bool = True
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class ServeSpec(_Strict):
    """The server the eval stage starts and stops: `fcd serve --engine ENGINE ARGS...`."""

    engine: Literal["hf", "vllm"] = "hf"
    args: list[str] = Field(default_factory=list, description="more `fcd serve` flags")
    port: int | None = Field(None, ge=1, le=65535)
    start_timeout_s: float = Field(900.0, gt=0)


class EvalModel(_Strict):
    """One model to evaluate. `base`, `tuned` and `merged` are shorthands for the run's own."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    model: str | None = None  # a model alias, directory or hub id (default: the recipe's student)
    adapter: Path | None = None  # a LoRA adapter directory served on top of `model` (hf engine)
    tuned: bool = False  # this run's trained student (on hf its adapter or full model, on vllm the export)
    endpoint: str | None = None  # an outside OpenAI-compatible endpoint: asked as it is, nothing served
    api_key_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EvalModel:
        if self.endpoint and (self.adapter or self.tuned):
            raise ValueError(f"eval.models.{self.name}: an endpoint is asked as it is; drop adapter/tuned")
        if self.endpoint and not self.model:
            raise ValueError(f"eval.models.{self.name}: give the model name the endpoint serves")
        return self


_SHORTHANDS = {"base": {"name": "base"}, "tuned": {"name": "tuned", "tuned": True}}


class EvalSpec(_Strict):
    """Evaluate models on the held-out split: BFCL's eval split, or the synth stage's val split."""

    split: Literal["bfcl", "synth"] = "bfcl"
    categories: list[str] | None = None  # None: every category of the split
    limit_per_category: int | None = Field(None, ge=1)
    max_tokens: int = Field(256, ge=1)
    concurrency: int = Field(8, ge=1)
    mode: Literal["fc", "prompt"] = "fc"
    models: list[EvalModel] = Field(default_factory=lambda: [EvalModel(**_SHORTHANDS["base"]),
                                                             EvalModel(**_SHORTHANDS["tuned"])], min_length=1)

    @field_validator("models", mode="before")
    @classmethod
    def _shorthands(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        out = []
        for m in v:
            if isinstance(m, str):
                if m not in _SHORTHANDS:
                    raise ValueError(f"eval.models: {m!r} is not a shorthand (base, tuned); write "
                                     "{name: ..., model: ...} for other models")
                m = dict(_SHORTHANDS[m])
            out.append(m)
        names = [m.get("name") if isinstance(m, dict) else getattr(m, "name", None) for m in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"eval.models: names must differ, {', '.join(map(str, dup))} is given twice")
        return out


class ReportSpec(_Strict):
    """report.md with the comparison, charts and links to every stage's outputs."""

    baseline: str | None = None  # the eval model others are compared with (default: the first)


class Recipe(_Strict):
    """A whole distillation run. Sections left out are stages that do not run."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    description: str = ""
    seed: int = 42
    student: str = "smollm2-135m"
    fc_token: str = "<tool_call>"
    teacher: dict[str, Any] | None = None  # a teacher endpoint: TeacherConfig's fields
    data: DataSpec
    label: LabelSpec = Field(default_factory=LabelSpec)
    synth: SynthSpec | None = None
    verify: VerifySpec | None = None
    augment: AugmentSpec | None = None
    train: TrainSpec | None = None
    export: ExportSpec | None = None
    serve: ServeSpec = Field(default_factory=ServeSpec)
    eval: EvalSpec | None = None
    report: ReportSpec | None = None

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        from fcdistill.teacher.config import TeacherConfig

        _stage_options(TeacherConfig, v, {})
        env = v.get("api_key_env", TeacherConfig.model_fields["api_key_env"].default)
        if env and not os.environ.get(env):
            raise ValueError(f"teacher.api_key_env: the variable {env} is not set (export it, or set api_key_env: "
                             "null for an endpoint that needs no key)")
        return v

    @model_validator(mode="after")
    def _inputs_present(self) -> Recipe:
        """Every stage that runs has what it reads."""
        problems = []
        needs_teacher = [s for s, on in (("label (source: teacher)", self.label.source == "teacher"),
                                         ("synth", self.synth is not None),
                                         ("verify (judge)", bool(self.verify and self.verify.options.get("judge"))))
                         if on]
        if needs_teacher and self.teacher is None:
            problems.append(f"teacher: {' and '.join(needs_teacher)} need(s) a teacher section (base_url, model)")
        if self.label.source == "teacher" and self.data.bfcl is None:
            problems.append("label: source teacher labels BFCL train items; add data.bfcl")
        if self.synth is not None and self.data.tools is None:
            problems.append("synth: needs data.tools and data.seeds")
        if self.augment is not None and self.data.bfcl is None:
            problems.append("augment: transforms BFCL train items; add data.bfcl")
        if self.train is not None and self.data.bfcl is None and self.synth is None and self.verify is None:
            problems.append("train: nothing to train on; add data.bfcl, synth or verify")
        if self.export is not None and self.train is None:
            problems.append("export: writes the trained student as one model; add a train section")
        if self.eval is not None:
            tuned = [m.name for m in self.eval.models if m.tuned]
            if tuned and self.train is None:
                problems.append(f"eval.models: {', '.join(tuned)} is the tuned student; add a train section")
            if tuned and self.serve.engine == "vllm" and not (self.export and self.export.merge):
                problems.append("eval: the vllm engine serves the tuned student merged (vLLM's LoRA cannot add the "
                                "FC token); add export: {merge: true}")
            adapters = [m.name for m in self.eval.models if m.adapter is not None]
            if adapters and self.serve.engine == "vllm":
                problems.append(f"eval.models: {', '.join(adapters)} load adapters, which the vllm engine cannot "
                                "serve with the FC token; merge them (fcd export --merge) and give model:")
            if self.eval.split == "bfcl" and self.data.bfcl is None:
                problems.append("eval: split bfcl needs data.bfcl")
            if self.eval.split == "synth" and self.synth is None:
                problems.append("eval: split synth evaluates the synth stage's val split; add a synth section")
            if self.eval.split == "bfcl" and self.eval.categories and self.data.bfcl is not None:
                missing = [c for c in self.eval.categories if c not in self.data.bfcl.categories + self.data.bfcl.eval_only]
                if missing:
                    problems.append(f"eval.categories: {', '.join(missing)} not in data.bfcl")
        if self.report is not None and self.eval is None:
            problems.append("report: compares eval results; add an eval section")
        elif self.report is not None and self.report.baseline is not None and \
                self.report.baseline not in [m.name for m in self.eval.models]:
            problems.append(f"report.baseline: {self.report.baseline!r} is not one of the eval models "
                            f"({', '.join(m.name for m in self.eval.models)})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def eval_order(self) -> list[str]:
        """The eval models' names, the report's baseline (default: the first) first."""
        names = [m.name for m in self.eval.models] if self.eval else []
        first = self.report.baseline if self.report and self.report.baseline in names else names[0]
        return [first] + [n for n in names if n != first]

    def enabled(self) -> list[str]:
        """The stages this recipe runs, in order."""
        on = {"data": True, "label": self.label.source == "teacher", "synth": self.synth is not None,
              "verify": self.verify is not None, "augment": self.augment is not None,
              "train": self.train is not None, "export": self.export is not None and self.export.merge,
              "eval": self.eval is not None, "report": self.report is not None}
        return [s for s in STAGES if on[s]]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`key.sub=value`, value read as YAML) and validate a recipe; one RecipeError
    naming every problem otherwise."""
    from fcdistill.configfile import read_yaml_mapping
    from fcdistill.train.config import ConfigError, apply_overrides

    path = Path(path)
    tree = read_yaml_mapping(path, "recipe", RecipeError)
    unknown = [k for k in tree if k not in Recipe.model_fields]
    if unknown:
        raise RecipeError(f"{path}: unknown stage or field {', '.join(map(repr, unknown))}; a recipe has "
                          f"{', '.join(Recipe.model_fields)}")
    try:
        tree = apply_overrides(tree, overrides or [])
        return Recipe.model_validate(tree)
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None
    except ValidationError as exc:
        raise RecipeError(f"{path}: {validation_message(exc)}") from None
