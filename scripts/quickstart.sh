#!/usr/bin/env bash
# Set up (idempotent) and run the main job on CPU: BFCL data split + training export for SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/fcd data bfcl --out runs/quickstart/data \
  --categories simple_python,multiple,parallel,parallel_multiple,irrelevance,live_simple,live_multiple,live_irrelevance \
  --max-per-category live_simple=50,live_multiple=50,live_irrelevance=50
.venv/bin/fcd data export --data runs/quickstart/data --split train --format trl --labels ground-truth
