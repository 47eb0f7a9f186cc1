#!/usr/bin/env bash
# Run here, before borrowing a GPU box: gather what the offline GPU image lacks into .gpu/ (ignored):
# cp312 wheels (trl, datasets, outlines-core, fastapi, uvicorn, openai and their dependencies, never
# torch or transformers), SmolLM2's tokenizer and config, and BFCL training pairs rendered by the wire
# format. Stays under the 64 MiB one device call carries. Then, on the box:
#   bash scripts/gpu/check.sh OUT_DIR          (device tool: carry .gpu)
# Pass --no-wheels to prepare only what `check.sh --cpu-dry-run` needs.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 exec .venv/bin/python benchmarks/gpu_check.py prepare "$@"
