#!/usr/bin/env bash
# Sets up .venv with the project, the pipeline tools and the test tools.
# On a machine without an NVIDIA GPU it installs PyTorch's CPU build (torch==2.13.0) first, so nothing
# pulls the multi-GB CUDA build. Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0" or "torch".
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${PIP[@]}" install "${TORCH_SPEC:-torch}"
    else
        "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
    fi
fi
"${PIP[@]}" install -e ".[pipeline,test,atari,s3,cluster]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# Atari ground truth: ocatari without its metadata's numpy<2 pin (see pyproject.toml's atari extra).
"${PIP[@]}" install --no-deps "ocatari==2.2.1" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# DVC would otherwise start a background process that tries to reach the network.
# The tracked .dvc/config already says so; `dvc config` would rewrite it (dropping its comments), so only
# when it does not.
if [ -f .dvc/config ] && ! grep -Eq "^\s*analytics\s*=\s*false" .dvc/config; then
    .venv/bin/dvc config core.analytics false >/dev/null 2>&1 || true
fi
echo "set up: . .venv/bin/activate" >&2
