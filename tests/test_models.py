"""The offline student: alias resolution, FC-token handling, and a real chat answer."""

import pytest

from fcdistill.chat_format import ChatFormat
from fcdistill.models import ModelResolveError, ensure_fc_token, resolve_model


def test_alias_resolves_to_an_hf_directory(smollm2_dir):
    import json
    from pathlib import Path

    d = Path(smollm2_dir)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    assert resolve_model("smollm2-135m") == smollm2_dir  # converted once, then reused
    assert resolve_model(d) == str(d.resolve())
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_bad_names_are_refused(tmp_path):
    with pytest.raises(ModelResolveError, match="no config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelResolveError, match="unknown model"):
        resolve_model("not-a-model")


def test_fc_token_added_or_reused(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    n = len(tok)
    first = ensure_fc_token(tok, "<tool_call>")
    assert first.added and len(tok) == n + 1
    again = ensure_fc_token(tok, "<tool_call>")
    assert not again.added and again.token_id == first.token_id and len(tok) == n + 1
    reused = ensure_fc_token(tok, "<jupyter_code>")  # a StarCoder-era single token SmolLM2 keeps
    assert not reused.added and reused.token_id == 13


def test_smollm2_answers_a_simple_question(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    prompt = ChatFormat(tok).render_prompt([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
