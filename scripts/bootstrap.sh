#!/usr/bin/env bash
# Creates the project's virtual environment (default .venv) and installs fusedsae into it, editable, with its
# development tools. Safe to re-run. It never replaces a torch that is already there:
#   * if the calling python already has torch (a CUDA build, say), the venv sees it (--system-site-packages);
#   * otherwise, on a machine without an NVIDIA GPU it installs torch==2.13.0, the CPU build, because a bare
#     `pip install torch` would pull several GB of CUDA wheels; with a GPU it installs the default build.
set -euo pipefail

venv=${1:-.venv}
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -x "$venv/bin/python" ]; then
  if "$py" -c "import torch" >/dev/null 2>&1; then
    "$py" -m venv --system-site-packages "$venv"
  else
    "$py" -m venv "$venv"
  fi
fi
vpy="$venv/bin/python"

if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$vpy" -m pip install torch
  else
    "$vpy" -m pip install "torch==2.13.0"
  fi
fi

if ! "$vpy" -c "import triton" >/dev/null 2>&1; then
  # triton 3.6 is what the GPU machines run, so the CPU interpreter checks the same front end; its interpreter
  # breaks on numpy 2.4 (int() of a 1-element array), hence the numpy bound.
  "$vpy" -m pip install "triton==3.6.0" "numpy<2.4"
fi

# dev: test and lint tools; hf: transformers + the offline MiniLM model for the attention-SAE tests and demo.
"$vpy" -m pip install -e "$root[dev,hf]"
