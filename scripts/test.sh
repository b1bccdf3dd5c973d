#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the default (not slow) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the slow suites.
# Three tiers: `-m fast` (pure tests, seconds), the default (everything not slow), `-m slow` (minutes each).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
