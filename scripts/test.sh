#!/usr/bin/env bash
# Set up .venv with the dev extras and run the whole test suite offline. .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "dev,langchain,llamaindex,eval,train"
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
set +e
python -m pytest -q -p no:cacheprovider --durations=10 "$@"
code=$?
set -e
echo "test suite took $(( $(date +%s) - start ))s" >&2
# pytest exits 5 when no test was collected: that is a broken suite here, so say so and fail.
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: the suite is broken" >&2
  exit 1
fi
exit "$code"
