#!/usr/bin/env bash
# One-shot check on a lent GPU (an H100), in under 8 minutes:
#   1. a venv with the package (`pip install -e .[dev,bench]`; offline machines fall back to the
#      system torch/triton with --system-site-packages and --no-deps),
#   2. the kernel tests compiled (no TRITON_INTERPRET; bf16 cases run),
#   2b. the device tests with real CUDA tensors (tests/test_devices.py: every influence method,
#      the solvers, the engine and the commutator keep their results on the GPU) and the input
#      guards (tests/test_guards.py),
#   3. the kernel and per-sample benchmark suites, only if the kernel tests passed
#      (a speedup is never reported on a red gate; FORCE_BENCH=1 overrides),
#   4. results and logs copied to benchmarks/results/ and, when set, to $OUT.
# Every step has its own time limit and all of them share a deadline (DEADLINE seconds, 450 = 7.5
# minutes), so the script ends in time even when a step hangs.
# Usage: bash benchmarks/gpu_check.sh   (env: VENV=.venv PYTHON=python3 FORCE_BENCH=0 DEADLINE=450
#        WITH_INFLUENCE=0 WITH_SCORE=0 WITH_ALL_TESTS=0; the optional steps need a larger DEADLINE)
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEADLINE=${DEADLINE:-450}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGS=benchmarks/results/gpu_check-$STAMP
mkdir -p "$LOGS"
unset TRITON_INTERPRET INFLUX_KERNELS
START=$SECONDS

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$LOGS/summary.txt"; }

# Run a step under a time limit, its output in $LOGS/<name>.log; record pass/fail.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -le 5 ]; then
        log "skip $name: deadline reached"
        return 124
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "start $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    log "end $name: rc=$rc"
    tail -n 25 "$LOGS/$name.log"
    return $rc
}

copy_results() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        cp -r benchmarks/results/. "$OUT/" 2>/dev/null || true
        log "copied benchmarks/results to $OUT"
    fi
}
trap copy_results EXIT

# --- 1. environment ---------------------------------------------------------------------------
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || log "nvidia-smi unavailable"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP_FLAGS=(-q --retries 1 --timeout 10 --no-build-isolation)
if ! step install 120 "$PY" -m pip install "${PIP_FLAGS[@]}" -e ".[dev,bench]"; then
    log "full install failed (offline?): installing the package alone over the system packages"
    step install-nodeps 45 "$PY" -m pip install "${PIP_FLAGS[@]}" --no-deps -e . \
        || log "editable install failed; relying on PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - >"$LOGS/versions.txt" 2>&1 <<'EOF'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
log "$(tr '\n' ' ' <"$LOGS/versions.txt")"

# --- 2. kernel tests, compiled ----------------------------------------------------------------
step kernel-tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/kernels
TESTS_RC=$?
if [ $TESTS_RC -ne 0 ] && [ "${FORCE_BENCH:-0}" != "1" ]; then
    log "kernel tests failed: benchmarks skipped (FORCE_BENCH=1 runs them anyway)"
    exit 1
fi

# --- 2b. every public path on CUDA tensors -----------------------------------------------------
# (the static scan of factory calls needs no GPU: the CPU suite runs it)
step device-tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_devices.py \
    tests/test_guards.py -k "not every_tensor_factory"
DEVICE_RC=$?

# --- 3. benchmarks ----------------------------------------------------------------------------
step bench-kernels 100 "$PY" benchmarks/run.py --suite kernels --device cuda
KERNELS_RC=$?
step bench-persample 100 "$PY" benchmarks/run.py --suite persample --device cuda \
    --models resnet18 --batch-sizes 64 128
PERSAMPLE_RC=$?

# Optional (WITH_INFLUENCE=1, give it DEADLINE=570): EK-FAC influence vs Kronfluence on a
# CIFAR-shaped ResNet-18, at a size that fits the step (the suite's CUDA default is 50k x 2,000).
INFLUENCE_RC=0
if [ "${WITH_INFLUENCE:-0}" = "1" ]; then
    export INFLUX_SCALE_TRAIN=${INFLUX_SCALE_TRAIN:-10000}
    export INFLUX_SCALE_QUERIES=${INFLUX_SCALE_QUERIES:-500}
    step bench-influence-scale 120 "$PY" benchmarks/run.py --suite influence_scale --device cuda
    INFLUENCE_RC=$?
fi

# Optional (WITH_SCORE=1): influx-score on a CIFAR-10 training set with ResNet-18 end to end
# (train, score, report). With CIFAR-10 under $INFLUX_DATA_DIR it scores all 50,000 examples;
# without, the CIFAR-shaped synthetic set of the same size.
SCORE_RC=0
if [ "${WITH_SCORE:-0}" = "1" ]; then
    DATASET=synthetic
    [ -f "${INFLUX_DATA_DIR:-data}/cifar-10-batches-py/data_batch_1" ] && DATASET=cifar10
    step influx-score 300 "$VENV/bin/influx-score" --dataset "$DATASET" --model resnet18 \
        --device cuda --epochs "${SCORE_EPOCHS:-2}" --scores loss,margin,grad_norm,tracin \
        --out "$LOGS/score-$DATASET-resnet18" --no-progress
    SCORE_RC=$?
fi

# Optional (WITH_ALL_TESTS=1): the whole test suite with a GPU visible (CUDA-only cases run).
ALL_RC=0
if [ "${WITH_ALL_TESTS:-0}" = "1" ]; then
    step all-tests 300 "$PY" -m pytest -q -p no:cacheprovider -x
    ALL_RC=$?
fi

log "done: score rc=$SCORE_RC, all tests rc=$ALL_RC"
log "done: tests rc=$TESTS_RC, device tests rc=$DEVICE_RC, kernels bench rc=$KERNELS_RC, persample bench rc=$PERSAMPLE_RC, influence rc=$INFLUENCE_RC"
[ $SCORE_RC -eq 0 ] && [ $ALL_RC -eq 0 ] && [ $TESTS_RC -eq 0 ] && [ $DEVICE_RC -eq 0 ] && [ $KERNELS_RC -eq 0 ] && [ $PERSAMPLE_RC -eq 0 ] && [ $INFLUENCE_RC -eq 0 ]
