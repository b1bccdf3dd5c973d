#!/usr/bin/env bash
# The main job: set up .venv if needed, then run Chorus end to end on the default corpus.
# Arguments go to `python -m bench.pipeline` (see --help); finished stages are reused on a re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m bench.pipeline "$@"
