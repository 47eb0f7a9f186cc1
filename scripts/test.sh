#!/usr/bin/env bash
# Set up both environments (idempotent) and run the whole test suite offline, on CPU.
# Two pytest workers, one file each at a time (module fixtures such as a training run or a server are
# made once), one math thread each: most tests wait on one small model's decoding or on a process
# starting, so two of them share the two cores better than one test with two threads does.
# Pass `-n 0` to run in one process; `-m "not slow"` skips what loads the model, trains or serves.
set -euo pipefail
cd "$(dirname "$0")/.."
# Both environments at once (each is mostly unpacking wheels): about half the set-up time of one after
# the other on a fresh clone. The vllm engine's environment is there because the serve tests run on both.
bash scripts/setup.sh & main=$!
bash scripts/setup_vllm.sh & vllm=$!
wait "$main" || { echo "scripts/setup.sh failed" >&2; exit 1; }
wait "$vllm" || { echo "scripts/setup_vllm.sh failed" >&2; exit 1; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
