"""The FC token's rows through TRL + PEFT on a model with untied output embeddings, and a full fine-tune.

SmolLM2 (tied) is covered by test_train_sft.py. Here a small randomly initialised llama with
`tie_word_embeddings=False` and SmolLM2's tokenizer takes the added-token path: both the input row
and the lm_head row must be trained (independently), saved in the adapter, and merged. The same
small model is fine-tuned whole (`finetune: full`): trained, checkpointed, resumed and exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fcdistill.chat_format import ChatFormat
from fcdistill.train import synthetic
from fcdistill.train.throughput import PACKED_SDPA


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, smollm2_dir) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("untied-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, smollm2_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("untied-data") / "train.trl.jsonl"
    return synthetic.write_jsonl(path, synthetic.trl_records(ChatFormat(smollm2_tokenizer),
                                                             synthetic.examples(16, seed=3, chat_share=0)))


def _config(model_dir: Path, data: Path, out: Path, **extra):
    from fcdistill.train.config import TrainConfig

    return TrainConfig.model_validate({
        "student": str(model_dir), "data": {"train": str(data)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"learning_rate": 5e-2, "warmup_ratio": 0.0, "scheduler": "constant"}, "max_steps": 4,
        "max_length": 512, "batch_size": 4, "packing": False, "logging_steps": 1, "save_steps": 100,
        "output_dir": str(out), "tensorboard": False, "seed": 0, **extra})


@pytest.fixture(scope="module")
def trained(untied_dir, data, tmp_path_factory):
    from fcdistill.train.sft import train

    out = tmp_path_factory.mktemp("untied-run") / "run"
    # a profile window (steps 3-7) the run ends inside (max_steps 4): the steps recorded are still written
    result = train(_config(untied_dir, data, out, profile={"start_step": 3, "steps": 5}))
    return result


def test_a_profile_window_cut_by_the_end_of_training_keeps_its_steps(trained):
    ops = json.loads((trained.output_dir / "profile" / "ops.json").read_text())
    assert ops["steps"] == [3, 4] and ops["wall_seconds_per_step"] > 0 and ops["device_seconds_per_step"] is None
    assert ops["ops"] and all(o["calls"] > 0 for o in ops["ops"])


def test_untied_model_trains_both_fc_rows(trained, untied_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    info = json.loads((trained.output_dir / "run_info.json").read_text())
    assert info["tied_embeddings"] is False and info["fc_token_added"] and info["embeddings_resized"]
    fc_id = info["fc_token_id"]
    assert fc_id == 49152

    cfg = json.loads((trained.final_dir / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"model.embed_tokens": [fc_id], "lm_head": [fc_id]}
    saved = load_file(str(trained.final_dir / "adapter_model.safetensors"))
    emb_key = next(k for k in saved if "embed_tokens.token_adapter.trainable_tokens_delta" in k)
    out_key = next(k for k in saved if "lm_head.token_adapter.trainable_tokens_delta" in k)
    assert not any(k.endswith("base_layer.weight") for k in saved)  # no full-matrix copies

    # the rows the training started from: the mean of the pieces `<tool_call>` was spelled with
    base = AutoModelForCausalLM.from_pretrained(str(untied_dir))
    pieces = [44, 19324, 79, 4350, 46]
    start_in = base.get_input_embeddings().weight[pieces].mean(0)
    start_out = base.get_output_embeddings().weight[pieces].mean(0)
    trained_in, trained_out = saved[emb_key][0].float(), saved[out_key][0].float()
    assert (trained_in - start_in).norm() > 1e-2 * start_in.norm()
    assert (trained_out - start_out).norm() > 1e-2 * start_out.norm()
    assert not torch.allclose(trained_in, trained_out)  # two rows, trained separately
    assert saved[emb_key].dtype == torch.float32


def test_untied_adapter_and_merged_agree(trained, tmp_path, smollm2_tokenizer):
    from fcdistill.train.export import greedy_completions, load_trained, merge_adapter

    model, tok, meta = load_trained(trained.output_dir)  # a run directory is accepted too
    assert meta["fc_token"] == "<tool_call>" and meta["tied_embeddings"] is False
    merged_dir = merge_adapter(trained.final_dir, tmp_path / "merged")
    merged, mtok, mmeta = load_trained(merged_dir)
    assert mmeta["format"] == "merged" and len(mtok) == len(tok) == 49153
    from safetensors.torch import load_file

    saved = load_file(str(trained.final_dir / "adapter_model.safetensors"))
    out_key = next(k for k in saved if "lm_head.token_adapter.trainable_tokens_delta" in k)
    assert torch.allclose(merged.get_output_embeddings().weight[49152], saved[out_key][0], atol=1e-6)

    fmt = ChatFormat(tok)
    prompts = [fmt.render_prompt(e.messages, synthetic.TOOLS) for e in synthetic.examples(3, seed=9, held_out=True)]
    ids = tok(prompts[0], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        a, b = model(**ids).logits, merged(**ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert greedy_completions(model, tok, prompts, max_new_tokens=12) == \
        greedy_completions(merged, mtok, prompts, max_new_tokens=12)


def test_prompt_is_masked_and_completion_starts_with_the_fc_token(untied_dir, data, tmp_path):
    """Completion-only loss: every prompt position is -100; the first learned label is the FC token."""
    from fcdistill.train.sft import build_trainer, prepare

    cfg = _config(untied_dir, data, tmp_path / "labels")
    prep = prepare(cfg)
    trainer, info = build_trainer(cfg, prep)
    row = trainer.train_dataset[0]
    prompt_len = len(prep.tokenizer(prep.train_rows[0]["prompt"])["input_ids"])
    labels = row["labels"]
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == row["input_ids"][prompt_len:]
    assert labels[prompt_len] == info["fc_token_id"] == 49152
    assert labels[-1] == prep.tokenizer.convert_tokens_to_ids("<|im_end|>")  # the model learns to stop


def test_trl_fused_lm_head_still_needs_the_bias_fix(untied_dir, data, tmp_path):
    """Canary: TRL's fused LM head reads lm_head.bias, which PEFT's TrainableTokensWrapper lacks.

    Our trainer with the fix undone fails the way the bare combination does; if a TRL or PEFT
    upgrade makes this pass, the workaround in sft.fit_trainable_tokens_to_fused_lm_head can go.
    """
    from fcdistill.train.sft import build_trainer, prepare

    cfg = _config(untied_dir, data, tmp_path / "canary", max_steps=1)
    trainer, _ = build_trainer(cfg, prepare(cfg))
    head = trainer.model.get_output_embeddings()
    assert type(head).__name__ == "TrainableTokensWrapper" and vars(head).pop("bias", "missing") is None
    with pytest.raises(AttributeError, match="object has no attribute 'bias'"):
        trainer.train()


def test_packed_rows_keep_examples_apart(untied_dir, data, tmp_path):
    """Packing (TRL best-fit decreasing) with SDPA: several examples share a row without attending
    to each other; position_ids restart per example and attention runs per example (throughput.py)."""
    from fcdistill.train.sft import build_trainer, prepare

    # fp32, so that any difference is the mask's, not bf16 rounding over a longer row
    cfg = _config(untied_dir, data, tmp_path / "packed", packing=True, batch_size=1, max_length=1024, precision="fp32")
    trainer, info = build_trainer(cfg, prepare(cfg))
    assert info["packing"] is True and info["attn_implementation"] == PACKED_SDPA
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3, starts  # ~270-token examples, 1024-token rows
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for s, e in zip(starts, [*starts[1:], len(pos)]):
            alone = model(input_ids=batch["input_ids"][:, s:e], use_cache=False).logits
            assert torch.allclose(packed[:, s:e], alone, atol=1e-4), (s, e)


def test_full_finetune_trains_every_layer_resumes_and_exports(untied_dir, data, tmp_path):
    """`finetune: full`: no PEFT; every layer and both FC rows train in fp32; the result is a plain
    model directory (`model/`) that loads, resumes from its checkpoints and exports in another dtype."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fcdistill.train.export import greedy_completions, load_trained, merge_adapter
    from fcdistill.train.sft import find_checkpoint, train

    out = tmp_path / "full"
    cfg = _config(untied_dir, data, out, finetune="full", save_steps=2, save_total_limit=None, precision="fp32",
                  optim={"learning_rate": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant"})
    result = train(cfg)
    assert result.final_dir == out / "model" and result.global_step == 4
    assert not (out / "adapter").exists() and not (result.final_dir / "adapter_config.json").exists()
    info = json.loads((out / "run_info.json").read_text())
    assert info["finetune"] == "full" and info["precision"] == "fp32" and info["fc_token_id"] == 49152
    base = AutoModelForCausalLM.from_pretrained(str(untied_dir))
    base.resize_token_embeddings(49153, mean_resizing=False)
    assert info["trainable_parameters"] == sum(p.numel() for p in base.parameters())

    saved = load_file(str(result.final_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    before = dict(base.named_parameters())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert not torch.allclose(saved[name], before[name]), name  # not only the FC rows: every layer
    pieces = [44, 19324, 79, 4350, 46]
    start_in = base.get_input_embeddings().weight[pieces].mean(0)
    fc_in, fc_out = saved["model.embed_tokens.weight"][49152], saved["lm_head.weight"][49152]
    assert (fc_in - start_in).norm() > 1e-3 * start_in.norm() and not torch.allclose(fc_in, fc_out)

    model, tok, meta = load_trained(out)  # the run directory is accepted, as for adapters
    assert meta["format"] == "full" and len(tok) == 49153 and not hasattr(model, "peft_config")

    # a checkpoint is model weights plus trainer state; a run killed after step 2 resumes from it
    assert find_checkpoint(out).name == "checkpoint-4" and (out / "checkpoint-2" / "model.safetensors").is_file()
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(result.final_dir)
    (out / "train_result.json").unlink()
    resumed = train(cfg, resume=True)
    assert resumed.resumed_from == str(out / "checkpoint-2") and resumed.global_step == 4
    again = load_file(str(resumed.final_dir / "model.safetensors"))
    assert torch.allclose(again["model.layers.0.self_attn.q_proj.weight"],
                          saved["model.layers.0.self_attn.q_proj.weight"], atol=1e-5)

    from fcdistill.train.config import ConfigError

    with pytest.raises(ConfigError, match="holds a finetune: full run"):  # a LoRA config cannot resume it
        train(_config(untied_dir, data, out), resume=True)

    exported = merge_adapter(out, tmp_path / "export", dtype="bf16")
    assert json.loads((exported / "fcdistill.json").read_text())["format"] == "merged"
    assert {t.dtype for t in load_file(str(exported / "model.safetensors")).values()} == {torch.bfloat16}
    fmt = ChatFormat(tok)
    prompts = [fmt.render_prompt(e.messages, synthetic.TOOLS) for e in synthetic.examples(2, seed=9, held_out=True)]
    first = greedy_completions(model, tok, prompts, max_new_tokens=4)
    assert len(first) == 2 and greedy_completions(load_trained(resumed.final_dir)[0], tok, prompts, max_new_tokens=4) == first
