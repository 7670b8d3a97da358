#!/usr/bin/env bash
# One call on the GPU machine (see /work/.library/device): install the carried ucxx
# wheels, then run the named phases, each with a time limit, logs under $OUT.
#   bash benchmarks/gpu_session.sh tests signal transport e2e-smoke
# Phases: tests kernels signal node-host node-append transport demo e2e-smoke e2e-smoke1 e2e-8x32k e2e-eager
#         e2e-big e2e-stress transport-gpu transport-stream e2e-join4 (4 GPUs) e2e-rndv transport-busy e2e-profile
#         e2e-final e2e-compile e2e-mailbox e2e-pull e2e-join-mps e2e-ab (against ./old: git worktree add old COMMIT, carried, its .git removed)
# (stops at the first phase that fails)
set -u
export PYTHONPATH=$PWD:$PWD/.site PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
unset PYTORCH_CUDA_ALLOC_CONF  # expandable segments lose cuda_ipc in UCX 1.21
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import ucxx" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/*.whl
fi
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader
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
  trap 'echo quit | nvidia-cuda-mps-control; cp -r $CUDA_MPS_LOG_DIRECTORY/control.log $OUT/mps-control.log 2>/dev/null' EXIT
}
for phase in "$@"; do
  case $phase in
    tests) run tests 240 python3 -m pytest -q -x -s -p no:cacheprovider -o timeout=180 tests/gpu tests/remote/test_node_graph.py tests/remote/test_streams.py ;;
    kernels) run kernels 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels -k cuda ;;
    signal) run signal 120 python3 benchmarks/graph_signal.py ;;
    node-host) run node-host 120 python3 benchmarks/node_host.py ;;
    node-append) run node-append 120 python3 benchmarks/node_append.py --profile ;;
    transport)
      run transport-cuda 150 python3 benchmarks/transport.py --device cuda --iters 2000 --modes poll blocking
      run transport-cuda-b4 100 python3 benchmarks/transport.py --device cuda --batch 4 --iters 2000 --modes poll
      run transport-cpu 150 python3 benchmarks/transport.py --device cpu --iters 2000 ;;
    e2e-smoke) run e2e-smoke 300 python3 benchmarks/e2e.py --layers 4 --configs 8x32768 --steps 20 --warmup 5 ;;
    e2e-smoke1) run e2e-smoke1 300 python3 benchmarks/e2e.py --layers 4 --configs 8x8192 --steps 20 --warmup 5 --node-gpu 0 ;;
    demo) run demo 300 python3 -m kflume demo --device cuda --quiet ;;
    e2e-8x32k) run e2e-8x32k 300 python3 benchmarks/e2e.py --configs 8x32768 --stages device messages ;;
    e2e-join4) run e2e-join4 300 python3 benchmarks/e2e.py --configs 8x32768 --stages device messages --join-gpu 2 ;;
    e2e-rndv)  # who moves a rendezvous' bytes: the receiver (get, UCX's choice) or the sender
      run e2e-rndv-auto 150 python3 benchmarks/e2e.py --configs 8x32768 --add-node none --steps 40 --warmup 5
      run e2e-rndv-put 150 env UCX_RNDV_SCHEME=put_zcopy python3 benchmarks/e2e.py --configs 8x32768 --add-node none --steps 40 --warmup 5 ;;
    e2e-profile) run e2e-profile 240 python3 benchmarks/e2e.py --configs 8x32768 --add-node none --steps 20 --warmup 5 --profile ${E2E_ARGS:-} ;;
    e2e-eager) run e2e-eager 300 python3 benchmarks/e2e.py --configs 8x32768 --add-node none --eager-node 8x32768 ;;
    transport-gpu) run transport-cuda 120 python3 benchmarks/transport.py --device cuda --iters 1000 --modes poll blocking ;;
    transport-stream)
      run transport-stream-b4 120 python3 benchmarks/transport.py --device cuda --batch 4 --iters 1000 --modes poll --stream
      run transport-stream-b8 120 python3 benchmarks/transport.py --device cuda --batch 8 --iters 1000 --modes poll --stream
      run transport-stream-b8-same 120 python3 benchmarks/transport.py --device cuda --batch 8 --iters 1000 --modes --stream --same-reply ;;
    transport-busy)  # a stream layer's round trip while the weight node's GPU is busy
      run transport-busy-none 120 python3 benchmarks/transport.py --device cuda --batch 8 --iters 1000 --modes --stream
      run transport-busy-spin 120 python3 benchmarks/transport.py --device cuda --batch 8 --iters 1000 --modes --stream --busy spin
      run transport-busy-gemm 120 python3 benchmarks/transport.py --device cuda --batch 8 --iters 1000 --modes --stream --busy gemm ;;
    e2e-ab)  # this tree against ./old (a worktree of an older commit), alternated, one call;
      # MPS=1: every process a client of one MPS server (e.g. E2E_ARGS="--node-gpu 0" on one GPU)
      [ "${MPS:-0}" = 1 ] && mps_start
      for i in $(seq "${AB_RUNS:-2}"); do
        run e2e-new-$i 200 python3 benchmarks/e2e.py --configs 8x32768 --add-node none --steps 40 --warmup ${AB_WARMUP:-5} ${E2E_ARGS:-}
        run e2e-old-$i 200 env PYTHONPATH=$PWD/old:$PWD/.site bash -c "cd old && python3 benchmarks/e2e.py --configs 8x32768 --add-node none --steps 40 --warmup ${AB_WARMUP:-5} ${E2E_ARGS:-}"
      done ;;
    e2e-final)  # the headline runs of the current code: default and compiled model, each
      # with a node joining mid-run, then the larger sizes
      run e2e-final 160 python3 benchmarks/e2e.py --configs 8x32768 --steps 40 --warmup 20
      run e2e-final-compile 170 python3 benchmarks/e2e.py --configs 8x32768 --steps 40 --warmup 20 --compile
      run e2e-final-big 200 python3 benchmarks/e2e.py --configs 32x32768 8x131072 --add-node none --steps 30 --warmup 5 ;;
    e2e-mailbox)  # stream replies into mailboxes (default) against replies as messages, one run
      run e2e-mailbox 300 python3 benchmarks/e2e.py --configs 8x32768 --add-node none --steps 40 --warmup 5 --stages device replies ${E2E_ARGS:-} ;;
    e2e-pull)  # queries pulled by the node (default) against queries as messages and replies as messages
      run e2e-pull 420 python3 benchmarks/e2e.py --configs 8x32768 --add-node none --steps 40 --warmup 5 --stages device push replies ${E2E_ARGS:-} ;;
    e2e-join-mps)  # the join with both nodes of GPU1 as clients of one MPS server (no context switches)
      mps_start
      run e2e-join-mps 300 python3 benchmarks/e2e.py --configs 8x32768 --steps 40 --warmup 20 --stages device ${E2E_ARGS:-} ;;
    e2e-compile) run e2e-compile 300 python3 benchmarks/e2e.py --configs 8x32768 --add-node none --steps 40 --warmup 5 --compile ;;
    e2e-big) run e2e-big 400 python3 benchmarks/e2e.py --configs 32x32768 8x131072 --add-node none --stages device messages --steps 40 --warmup 5 ;;
    e2e-stress) run e2e-stress 500 python3 benchmarks/e2e.py --configs 8x32768 8x32768 8x32768 8x32768 --steps 30 --warmup 3 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
