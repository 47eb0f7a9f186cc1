#!/usr/bin/env bash
# Set up (idempotent) and run the quickstart on CPU: BFCL data -> LoRA-train SmolLM2-135M ->
# serve base + adapter -> evaluate both -> comparison table. Extra arguments go to `fcd quickstart`
# (e.g. --full for the real measurement). A rerun resumes where a killed run stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/fcd quickstart "$@"
