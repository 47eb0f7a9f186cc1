"""A real 2-process DDP training of SmolLM2 on CPU (gloo), launched the way GPU runs are.

`accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 -m fcdistill.train`
starts two processes through torchrun; without CUDA, fcdistill.train asks the Trainer for CPU and
accelerate forms a MULTI_CPU process group over gloo. Each rank sees half the data, gradients are
all-reduced, and rank 0 alone writes the adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fcdistill.chat_format import ChatFormat
from fcdistill.serve.process import free_port
from fcdistill.train import synthetic

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_on_cpu_with_gloo(tmp_path, smollm2_tokenizer, smollm2_dir):
    n_train, batch, steps = 24, 2, 3
    data = synthetic.write_jsonl(tmp_path / "train.trl.jsonl",
                                 synthetic.trl_records(ChatFormat(smollm2_tokenizer), synthetic.examples(n_train, seed=5)))
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "student": "smollm2-135m", "data": {"train": str(data)}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"learning_rate": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant"},
        "max_steps": steps, "max_length": 512, "batch_size": batch, "packing": False, "num_threads": 1, "seed": 0,
        "output_dir": str(out), "logging_steps": 1, "save_steps": 100, "tensorboard": False}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch",
           "--config_file", str(ROOT / "configs" / "accelerate" / "multi_gpu.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "-m", "fcdistill.train", "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo" and info["distributed_type"] == "MULTI_CPU"
    assert info["device"].startswith("cpu")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r for r in log if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, steps + 1))  # one log line per step: rank 0 only
    # two ranks each take `batch` examples a step: the epoch advances twice as fast as one process's would
    assert losses[-1]["epoch"] == pytest.approx(steps * batch * 2 / n_train)
    result = json.loads((out / "train_result.json").read_text())
    assert result["global_step"] == steps

    from safetensors.torch import load_file

    from fcdistill.train.export import load_trained

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    row = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"][0]
    base_emb = load_file(str(Path(smollm2_dir) / "model.safetensors"))["model.embed_tokens.weight"]
    start = base_emb[[44, 19324, 79, 4350, 46]].mean(0)  # the pieces `<tool_call>` was spelled with
    assert (row - start).norm() > 1e-3 * start.norm()
    model, tok, meta = load_trained(out / "adapter")
    assert meta["fc_token_id"] == 49152 and torch.equal(model.get_input_embeddings().weight[49152], row)
