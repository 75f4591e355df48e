#!/usr/bin/env bash
# Set up .venv and run the offline demo on the packaged default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
exec aligner demo "$@"
