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


MALLINFO_PROBE = """
import ctypes, json, sys
from fcdistill.models import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2()
block = libc.malloc(8 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"kept": kept, "mmapped": during.hblkhd - before.hblkhd, "free_in_heap": after.fordblks - before.fordblks}))
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_serves_blocks_from_the_heap_and_keeps_them_there_when_freed():
    """The hf engine's decoding frees and reallocates the same blocks every step: with glibc's defaults
    an 8 MiB block is mapped for itself and unmapped on free (its pages faulted in again next time);
    after keep_freed_memory() it comes from the heap and stays there, free, for the next one."""
    import json
    import subprocess
    import sys

    def probe(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", MALLINFO_PROBE, mode], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    default, kept = probe("default"), probe("keep")
    assert default["mmapped"] >= 8 << 20 and default["free_in_heap"] < 1 << 20
    assert kept["kept"] is True
    assert kept["mmapped"] == 0 and kept["free_in_heap"] >= 8 << 20
