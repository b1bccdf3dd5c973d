#!/usr/bin/env bash
# The training side on a CUDA GPU: steps, kill -9 + exact resume, stacked K-member training, 150M tokens/s and MFU.
# Needs PyTorch, transformers, safetensors, pyarrow, numpy (no vLLM or Ray). `--dry-run`: the same on the CPU.
# Uses .venv when there is one, else the machine's python3 (a GPU box with PyTorch installed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec "$PY" -m bench.perf.gpu_check "$@"
