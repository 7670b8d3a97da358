#!/usr/bin/env bash
# One call on a GPU machine: install the carried ucxx wheels (.whl), then run the named
# phases, each with a time limit, logs under $OUT. Stops at the first phase that fails.
#   bash benchmarks/gpu_session.sh tests e2e-1gpu
# Phases:
#   tests        the GPU tests (tests/gpu) and the CUDA cases of the node/stream tests
#   kernels      the kernels' CUDA tests and benchmarks/kernels.py
#   eager        benchmarks/kernels.py --eager (FlashInfer as a peer where carried)
#   signal       benchmarks/graph_signal.py
#   node-host    benchmarks/node_host.py and node_append.py
#   transport    benchmarks/transport.py (CUDA buffers)
#   example      examples/captured_decode.py on the GPU (captured)
#   demo         kflume demo --device cuda
#   e2e-1gpu     benchmarks/e2e.py with the node on the weight node's GPU (functional;
#                with MPS=1 the processes share the GPU at once instead of in turns)
#   e2e          benchmarks/e2e.py on 2 GPUs (all sizes, a node joining)
#   e2e-join4    benchmarks/e2e.py on 4 GPUs: the joining node on a GPU of its own
set -u
export PYTHONPATH=$PWD:$PWD/.site PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
unset PYTORCH_CUDA_ALLOC_CONF  # expandable segments lose cuda_ipc in UCX 1.21
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import ucxx" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/*.whl
fi
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
git log -1 --format='commit %h %s' 2>/dev/null || true
run() {  # run NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  # SIGABRT at the limit: python -X faulthandler then prints where every thread was
  timeout -s ABRT -k 10 "$secs" env PYTHONFAULTHANDLER=1 "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "--- rc=$rc ($(date +%T))"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || { echo "stopping: $name failed"; exit $rc; }  # save the device time
}
mps_start() {  # the processes started from here on: clients of one MPS server (once)
  [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && return 0
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/kflume-mps CUDA_MPS_LOG_DIRECTORY=/tmp/kflume-mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d || { echo "no MPS here"; exit 1; }
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
}
[ "${MPS:-0}" = 1 ] && mps_start  # MPS=1: processes sharing a GPU run at once, not in turns
for phase in "$@"; do
  case $phase in
    tests) run tests 300 python3 -m pytest -q -x -s -p no:cacheprovider -o timeout=240 \
        tests/gpu tests/remote/test_node_graph.py tests/remote/test_streams.py ;;
    kernels)
      run kernels-tests 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels -k cuda
      run kernels 240 python3 benchmarks/kernels.py ;;
    eager) run eager 240 python3 benchmarks/kernels.py --eager ;;
    signal) run signal 120 python3 benchmarks/graph_signal.py ;;
    node-host)
      run node-host 120 python3 benchmarks/node_host.py
      run node-append 120 python3 benchmarks/node_append.py ;;
    transport) run transport 150 python3 benchmarks/transport.py --device cuda --iters 2000 ;;
    example) run example 180 python3 examples/captured_decode.py --device cuda ;;
    demo) run demo 300 python3 -m kflume demo --device cuda --quiet ;;
    e2e-1gpu) run e2e-1gpu 400 python3 benchmarks/e2e.py --configs ${E2E_CONFIGS:-8x8192} \
        --steps 40 --warmup 10 --node-gpu 0 ${E2E_ARGS:-} ;;
    e2e) run e2e 500 python3 benchmarks/e2e.py --steps 40 --warmup 20 ${E2E_ARGS:-} ;;
    e2e-join4) run e2e-join4 300 python3 benchmarks/e2e.py --configs 8x32768 --steps 40 \
        --warmup 20 --join-gpu 2 ${E2E_ARGS:-} ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
