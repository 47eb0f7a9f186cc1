"""Train/serve parity: a BFCL question becomes the same prompt tokens through the training export and
through the evaluation request path (the OpenAI tools `fcd eval run` sends, read back as the server
reads them), in every language BFCL has."""

from __future__ import annotations

import json

import pytest

from fcdistill.chat_format import ChatFormat
from fcdistill.data.bfcl import SplitOptions, prepare_bfcl, read_records
from fcdistill.data.export import export_split
from fcdistill.eval.dataset import EvalItem, bfcl_functions
from fcdistill.eval.runner import fc_request
from fcdistill.bfcl_env import with_language_hint
from fcdistill.models import ensure_fc_token
from fcdistill.tools import normalize_tools


@pytest.mark.parametrize("category", ["simple_python", "simple_java", "parallel_multiple"])
def test_train_export_and_eval_request_render_the_same_prompt(tmp_path, smollm2_tokenizer, category):
    data = tmp_path / "data"
    prepare_bfcl(SplitOptions(categories=[category], seed=3), data)
    path, written, _ = export_split(data, "train", "trl", None, labels="ground-truth")
    exported = {r["id"]: r["prompt"] for r in map(json.loads, path.read_text().splitlines())}
    records = [r for r in read_records(data, "train") if r.id in exported][:5]
    assert records
    tok = smollm2_tokenizer
    ensure_fc_token(tok, "<tool_call>")
    fmt = ChatFormat(tok, fc_token="<tool_call>")
    docs = bfcl_functions(category, {r.id for r in records})
    for rec in records:
        item = EvalItem(record=rec, functions=docs[rec.id], shown_functions=with_language_hint(rec.id, docs[rec.id]))
        tools, _ = fc_request(item, safe=False)
        served = fmt.render_prompt(rec.messages, normalize_tools(tools))
        assert tok(served)["input_ids"] == tok(exported[rec.id])["input_ids"], rec.id
        assert "Note that the provided function is in" in exported[rec.id]  # BFCL's hint reaches training
