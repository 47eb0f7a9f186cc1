"""Shared fixtures: offline hub, the real SmolLM2 student, its tokenizer, a real LoRA adapter."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from fcdistill.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    from fcdistill.models import ensure_fc_token

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ensure_fc_token(tok, "<tool_call>")
    return tok


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A real PEFT LoRA adapter with non-zero weights, so selecting it changes the output. It also
    trains a reused token's row (`<jupyter_code>`, id 13) the way `fcd train` trains a reused FC
    token: the vllm engine must serve it through vLLM's LoRA, without that row."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, trainable_token_indices=[13]))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


# A tool SmolLM2 loops inside (rooms of 100, 200, 300... beds): the budget and loop-guard tests use it.
BOOKING = {"type": "function", "function": {
    "name": "book_rooms", "description": "Book hotel rooms for a guest.",
    "parameters": {"type": "object", "properties": {
        "guest": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                  "required": ["name"]},
        "rooms": {"type": "array", "items": {"type": "object", "properties": {
            "kind": {"type": "string"}, "beds": {"type": "integer"}}, "required": ["kind", "beds"]}}},
        "required": ["guest", "rooms"]}}}


# The key of the shared server below; its clients send it.
SERVE_KEY = "fcd-test-key"


@pytest.fixture(scope="session")
def hf_server(tmp_path_factory, smollm2_dir) -> str:
    """One `fcd serve` (hf engine, SmolLM2-135M, an API key) for the end-to-end modules that need nothing
    more (eval, teacher): each pytest worker starts it at most once. Its base URL, without /v1."""
    from fcdistill.serve.process import start_server

    # --grammar-timeout: on a 2-core AVX2-only machine busy with the suite, a compile can outlast the
    # default 60 s; the server then answers 503 and clients retry, but a long timeout spares their retries
    with start_server(["--model", "smollm2-135m", "--api-key", SERVE_KEY, "--grammar-timeout", "600"],
                      tmp_path_factory.mktemp("serve") / "serve.log",
                      env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}) as srv:
        yield srv.url


# The modules that take minutes (a training run, the GPU check's dry run, a quickstart, servers on both
# engines), longest first. scripts/test.sh runs two workers that take whole modules in collection order:
# starting the long ones first keeps one of them from running alone at the end.
LONGEST_FIRST = ["test_serve.py", "test_train_sft.py", "test_eval_endpoint.py", "test_gpu_check.py",
                 "test_quickstart.py", "test_recipe.py", "test_serve_shutdown.py", "test_serve_limits.py", "test_teacher_serve_e2e.py",
                 "test_engine_hf.py"]


# Fixtures that load the real model, serve it or train: a test using one is `slow` wherever it lives.
MODEL_FIXTURES = {"engine", "serving", "server", "hf_server", "adapter_dir"}


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
