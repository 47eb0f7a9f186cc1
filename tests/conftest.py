"""Shared fixtures: offline hub, the real SmolLM2 student, its tokenizer."""

from __future__ import annotations

import os

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
