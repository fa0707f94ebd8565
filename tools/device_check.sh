#!/usr/bin/env bash
# The GPU checks of the runtime in one run, for a machine with a CUDA GPU (a lent one is timed by the
# minute, so everything is prepared here and each step is bounded):
#   1. tests/test_triton_kernels.py compiled for CUDA (TRITON_INTERPRET unset),
#   2. tools/bench_decode_cuda.py -> $OUT/decode-cuda.json (batch-1 GEMV against cuBLAS, CUDA graphs),
#   3. tools/bench_launch_host.py --cuda -> $OUT/launch-host-cuda.json (the host's cost a call).
# A step that fails is reported and the next one runs; the exit status is the number of failed steps.
# Uses ${PYTHON:-python3}, which must have a CUDA build of torch (with triton), transformers and numba.
#   OUT=/tmp/gpu bash tools/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-out/device}
# bounds in seconds: 300 + 150 + 150 fit one 600 s call of a lent machine
TEST_SECONDS=${TEST_SECONDS:-300}
BENCH_SECONDS=${BENCH_SECONDS:-150}
mkdir -p "$OUT"
unset TRITON_INTERPRET

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "device_check: $PY sees no CUDA GPU (or no torch); run it where one is" >&2
  exit 2
fi
"$PY" -c "import torch, triton; print('gpu:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__)"

failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time bound, report how it ended
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  if timeout "$limit" "$@"; then
    echo "device_check: $name passed in $((SECONDS - start)) s"
  else
    echo "device_check: $name FAILED (status $?) after $((SECONDS - start)) s" >&2
    failed=$((failed + 1))
  fi
}
step "triton kernels compiled for CUDA" "$TEST_SECONDS" "$PY" -m pytest -q -x tests/test_triton_kernels.py
step "GEMV against cuBLAS" "$BENCH_SECONDS" "$PY" tools/bench_decode_cuda.py --out "$OUT/decode-cuda.json"
step "host cost a call" "$BENCH_SECONDS" "$PY" tools/bench_launch_host.py --cuda --out "$OUT/launch-host-cuda.json"
echo "device_check: $failed step(s) failed; results in $OUT"
exit "$failed"
