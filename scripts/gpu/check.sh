#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): accelerate-launched LoRA training throughput and MFU on
# random-init Qwen2.5-0.5B and SmolLM2-135M architectures, then `fcd serve` on GPU (hf engine, bf16)
# at 1, 8 and 32 concurrent requests, grammar on and off. Writes OUT_DIR/gpu_check.json.
#   bash scripts/gpu/check.sh OUT_DIR                 on the GPU box: installs .gpu/wheels, no index
#   bash scripts/gpu/check.sh --cpu-dry-run OUT_DIR   here: the same steps at toy size, with .venv
#   bash scripts/gpu/check.sh OUT_DIR --profile       only Qwen2.5-0.5B: training under torch.profiler, then serving
# Needs .gpu/ from scripts/gpu/prepare.sh. Finishes within ~8 minutes (--budget-s, default 450).
set -euo pipefail
cd "$(dirname "$0")/../.."
dry=()
if [ "${1:-}" = "--cpu-dry-run" ]; then
  dry=(--cpu-dry-run)
  shift
fi
out=${1:?usage: check.sh [--cpu-dry-run] OUT_DIR [--budget-s N] [--profile]}
shift
carry=${FCD_GPU_CARRY:-.gpu}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ ${#dry[@]} -eq 0 ]; then
  PY=${PYTHON:-python3}
  site=${FCD_GPU_SITE:-/tmp/fcd-site}
  ls "$carry"/wheels/*.whl >/dev/null  # prepared with wheels?
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$carry"/wheels/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  PY=${PYTHON:-.venv/bin/python}
fi
exec "$PY" benchmarks/gpu_check.py run --carry "$carry" --out "$out" "${dry[@]}" "$@"
