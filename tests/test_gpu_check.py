"""The GPU check's dry run: `scripts/gpu/prepare.sh` and `scripts/gpu/check.sh --cpu-dry-run` at toy size.

The GPU box is offline and lent for minutes, so the check has to run first time there; this runs the
same steps here (accelerate-launched training of both architectures, the real server at two
concurrency levels, grammar on and off) so that neither script can rot between loans.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def carried(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("carry")
    proc = subprocess.run(["bash", "scripts/gpu/prepare.sh", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_prepare_carries_what_the_image_lacks_and_fits_one_call(carried: Path) -> None:
    manifest = json.loads((carried / "manifest.json").read_text())
    names = {w.split("-")[0].lower() for w in manifest["wheels"]}
    for needed in ("trl", "datasets", "outlines_core", "fastapi", "uvicorn", "openai", "pydantic_core", "jsonschema"):
        assert needed in names, f"{needed} is not carried"
    for kept in ("torch", "transformers", "numpy", "peft", "accelerate", "tokenizers"):
        assert kept not in names, f"{kept} would shadow the image's own"
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import parse_wheel_filename

    from gpu_check import WHEEL_PLATFORMS

    image = {*cpython_tags((3, 12), platforms=WHEEL_PLATFORMS), *compatible_tags((3, 12), platforms=WHEEL_PLATFORMS)}
    for wheel in (carried / "wheels").glob("*.whl"):
        assert parse_wheel_filename(wheel.name)[3] & image, f"{wheel.name} does not install on CPython 3.12 x86-64"
        assert zipfile.ZipFile(wheel).testzip() is None
    assert manifest["size_mb"] < 48
    assert manifest["train_pairs"] > 500 and manifest["serve_items"] > 0
    assert (carried / "smollm2" / "tokenizer.json").is_file()


def test_cpu_dry_run_runs_every_step(carried: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "scripts/gpu/check.sh", "--cpu-dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**__import__("os").environ, "FCD_GPU_CARRY": str(carried)})
    result = json.loads((out / "gpu_check.json").read_text())
    failed = {k: v for k, v in result["steps"].items() if not v.get("ok")}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    trains = [v for k, v in result["steps"].items() if k.startswith("train ")]
    assert len(trains) == 3 and trains[-1]["packing"] is True
    # the packed variant is profiled in the dry run (steps 3-4 of 4): its table travels back beside the JSON
    assert trains[-1]["profile"]["steps"] == [3, 4] and trains[-1]["profile"]["top_ops"]
    assert (out / "profile-qwen2.5-0.5b-arch-shipped-packed.txt").is_file()
    for t in trains:
        assert t["steps"] == 4 and t["train_tokens_per_second"] > 0 and t["flops_per_token_6n"] > 0
        assert t["command"].startswith("accelerate launch --config_file configs/accelerate/single_gpu.yaml")
    for name in ("serve smollm2-135m-arch", "serve qwen2.5-0.5b-arch"):
        served = result["steps"][name]
        for key in ("unconstrained_c1", "unconstrained_c2", "constrained_c1", "constrained_c2"):
            assert served[key]["completion_tokens"] > 0
        # random weights never choose to stop: only the budget-aware grammar closes their calls
        checks = served["constrained_answers"]
        assert checks["answers"] == 4 and checks["valid_calls"] == 4, checks


def test_flops_per_token_matches_the_parameter_count() -> None:
    """6N: for a model without attention context the count is six times the matmul weights."""
    from transformers import Qwen2Config

    from gpu_check import QWEN05_ARCH, flops_per_token

    config = Qwen2Config(**{k: v for k, v in QWEN05_ARCH.items() if k not in ("architectures", "model_type")})
    flops = flops_per_token(config, context=0)
    # Qwen2.5-0.5B: 494M parameters, 136M of them the (tied) embedding that lm_head reuses as a matmul
    assert 6 * 480e6 < flops["model_6n"] < 6 * 500e6
    assert flops["lora_work"] == pytest.approx(flops["model_6n"] * 2 / 3)
    with_context = flops_per_token(config, context=1000)
    assert with_context["forward"] - flops["forward"] == 4 * 24 * 14 * 64 * 1000
