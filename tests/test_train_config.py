"""Training config: bad input fails in one line before any model loads; shipped configs validate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fcdistill.train.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A few real prompt-completion records rendered by the wire format."""
    from fcdistill.chat_format import ChatFormat
    from fcdistill.train import synthetic

    path = tmp_path_factory.mktemp("data") / "train.trl.jsonl"
    return synthetic.write_jsonl(path, synthetic.trl_records(ChatFormat(smollm2_tokenizer),
                                                             synthetic.examples(6, seed=1)))


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _good(pairs: Path, tmp_path: Path, **extra) -> dict:
    return {"student": "smollm2-135m", "data": {"train": str(pairs)}, "max_length": 512,
            "output_dir": str(tmp_path / "run"), **extra}


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if anything loads model weights (tokenizers are allowed)."""
    import transformers

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    return calls


def _cli(*args: str):
    from typer.testing import CliRunner

    from fcdistill.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t.update(learning_rate=1e-3), "learning_rate: unknown field"),
    (lambda t: t["lora"].update(rank=8), "lora.rank: unknown field"),
    (lambda t: t["data"].update(train="/nonexistent/train.jsonl"), "data.train file not found: /nonexistent/train.jsonl"),
    (lambda t: t["lora"].update(r=0), "lora.r: Input should be greater than or equal to 1, not 0"),
    (lambda t: t.update(max_length=64), "max_length 64 is shorter than a prompt"),
    (lambda t: t["lora"].update(target_modules=["q_proj", "lm_head"]), "lm_head cannot be a LoRA target"),
    (lambda t: t.update(eval_steps=5), "eval_steps is set but there is no eval data"),
    (lambda t: t["optim"].update(scheduler="cosine_forever"), "unknown scheduler 'cosine_forever'"),
    (lambda t: t.update(packing="sometimes"), "packing: expected true, false or auto, got 'sometimes'"),
    (lambda t: t.update(profile={"start_step": 0}), "profile.start_step: Input should be greater than or equal to 1"),
    (lambda t: t.update(profile={"step": 3}), "profile.step: unknown field"),
], ids=["unknown-field", "unknown-nested-field", "missing-data-file", "r-zero", "max-length-short",
        "lm-head-target", "eval-steps-without-eval", "bad-scheduler", "bad-packing", "profile-step-zero",
        "profile-unknown-field"])
def test_bad_config_exits_2_with_one_line_before_any_model(pairs, tmp_path, no_model_load, mutate, needle):
    tree = _good(pairs, tmp_path, lora={"r": 8}, optim={})
    mutate(tree)
    result = _cli("train", "--config", str(_write(tmp_path, tree)))
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and needle in err, err
    assert not no_model_load


def test_every_config_error_is_listed_on_one_line(pairs, tmp_path, no_model_load):
    tree = _good(pairs, tmp_path, lora={"r": 0, "rank": 8}, epochs=0)
    result = _cli("train", "--config", str(_write(tmp_path, tree)))
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "3 problems: " in err, err
    for needle in ("lora.r: Input should be greater than or equal to 1, not 0", "lora.rank: unknown field",
                   "epochs: Input should be greater than 0, not 0"):
        assert needle in err, err


def test_bad_config_message_from_a_real_process(pairs, tmp_path):
    """The installed entry point path: stderr carries one line, exit status 2."""
    path = _write(tmp_path, _good(pairs, tmp_path, lora={"r": 0}))
    code = "from fcdistill.cli import app; import sys; sys.argv = ['fcd', *sys.argv[1:]]; app()"
    proc = subprocess.run([sys.executable, "-c", code, "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {path}: lora.r: Input should be greater than or equal to 1, not 0"]


def test_missing_or_broken_config_file(tmp_path, no_model_load):
    result = _cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "config file not found" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("student: [unclosed\n")
    result = _cli("train", "--config", str(broken))
    assert result.exit_code == 2 and "not valid YAML (line" in result.stderr


def test_overlong_examples_can_be_dropped_instead(pairs, tmp_path, no_model_load):
    from fcdistill.train.sft import prepare

    lengths_cfg = load_config(_write(tmp_path, _good(pairs, tmp_path)))
    longest = prepare(lengths_cfg).stats["train"]["max_tokens"]
    cfg = load_config(_write(tmp_path, _good(pairs, tmp_path, max_length=longest - 1)),
                      overrides=["data.drop_overlength=true"])
    prep = prepare(cfg)
    assert 0 < len(prep.train_rows) < 6 and prep.stats["train"]["over_max_length"] >= 1


def test_check_reports_added_and_reused_fc_token(pairs, tmp_path, no_model_load):
    path = _write(tmp_path, _good(pairs, tmp_path))
    added = _cli("train", "--config", str(path), "--check")
    assert added.exit_code == 0, added.output
    assert "FC token '<tool_call>' id 49152 (added)" in added.stdout
    stats = json.loads(added.stdout.strip().splitlines()[-1])
    assert stats["train"]["examples"] == 6 and stats["train"]["max_tokens"] <= 512
    reused = _cli("train", "--config", str(path), "--check", "--set", "fc_token=<jupyter_code>")
    assert reused.exit_code == 0, reused.output
    assert "FC token '<jupyter_code>' id 13 (reused)" in reused.stdout


def test_override_fills_a_section_a_saved_config_left_null(pairs, tmp_path):
    """A run's config.yaml writes unset sections as null (`profile: null`); --set still reaches into them."""
    tree = TrainConfig.model_validate(_good(pairs, tmp_path)).model_dump(mode="json")
    assert tree["profile"] is None
    cfg = load_config(_write(tmp_path, tree), overrides=["profile.start_step=7"])
    assert cfg.profile is not None and (cfg.profile.start_step, cfg.profile.steps) == (7, 3)


def test_overrides_and_eval_split(pairs, tmp_path):
    from fcdistill.train.sft import prepare

    cfg = load_config(_write(tmp_path, _good(pairs, tmp_path)),
                      overrides=["lora.r=4", "max_steps=3", "data.eval_fraction=0.34", "optim.learning_rate=5e-4"])
    assert (cfg.lora.r, cfg.max_steps, cfg.optim.learning_rate) == (4, 3, 5e-4)
    prep = prepare(cfg)
    assert len(prep.eval_rows) == 2 and len(prep.train_rows) == 4
    assert not {r["id"] for r in prep.eval_rows} & {r["id"] for r in prep.train_rows}
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        load_config(_write(tmp_path, _good(pairs, tmp_path)), overrides=["max_steps"])


def test_existing_checkpoint_needs_resume(pairs, tmp_path, no_model_load):
    run = tmp_path / "run"
    ckpt = run / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "adapter_model.safetensors").write_bytes(b"")
    result = _cli("train", "--config", str(_write(tmp_path, _good(pairs, tmp_path))))
    assert result.exit_code == 2
    assert "already has checkpoint-2; pass --resume" in result.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_student_configs_validate(path, pairs):
    cfg = load_config(path, overrides=[f"data.train={pairs}"])
    assert isinstance(cfg, TrainConfig) and cfg.fc_token == "<tool_call>"
    if path.stem.endswith("-cpu"):
        assert cfg.precision == "auto" and cfg.packing is True and cfg.batch_size == 1 and cfg.student == "smollm2-135m"
    else:
        assert cfg.precision == "bf16"


def test_shipped_configs_cover_the_students():
    students = {load_config.__module__ and yaml.safe_load(p.read_text())["student"]
                for p in (ROOT / "configs" / "train").glob("*.yaml")}
    assert {"smollm2-135m", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"} <= students
    assert any("SmolLM2-1.7B" in s for s in students)  # a GPU student whose FC token must be added


@pytest.mark.parametrize("name, kind", [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("fsdp2", "FSDP"),
                                        ("deepspeed_zero3", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert str(cfg.distributed_type).endswith(kind)
    if name == "fsdp2":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if name == "deepspeed_zero3":
        assert cfg.deepspeed_config["zero_stage"] == 3
        assert "gradient_accumulation_steps" not in cfg.deepspeed_config  # stays "auto": grad_accum decides


def test_cli_import_stays_light():
    code = "import sys, fcdistill.cli; heavy = {'torch', 'trl', 'peft', 'transformers'} & set(sys.modules); print(sorted(heavy))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_optimizer_names_are_read_from_transformers_once_per_version(tmp_path):
    """Validating a config (every `fcd run`) must not import transformers' training arguments (~4 s)
    once the installed version's names are cached; the cached lists are transformers' own."""
    code = ("import sys; from fcdistill.train.config import OptimSettings, trainer_names\n"
            "OptimSettings(optimizer='adamw_torch', scheduler='cosine').check_names()\n"
            "print(len(trainer_names()[0]), 'transformers.training_args' in sys.modules)")
    env = {**os.environ, "FCD_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    n, imported = first.stdout.split()
    assert int(n) > 10 and imported == "True"
    assert second.stdout.split() == [n, "False"]
    from transformers.training_args import OptimizerNames

    cached = json.loads(next((tmp_path / "names").glob("transformers-*.json")).read_text())
    assert cached["optimizers"] == [o.value for o in OptimizerNames]
    bad = subprocess.run([sys.executable, "-c", "from fcdistill.train.config import OptimSettings\n"
                          "OptimSettings(optimizer='adamw_nope').check_names()"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown optimizer 'adamw_nope'" in bad.stderr
