#!/usr/bin/env bash
# One-shot check on a lent GPU (an H100 or H200), in under 8 minutes:
#   1. the package installed (`pip install -e .[dev,bench]` into a venv; on a machine with no
#      registry, VENV=system installs the package alone into python3 and the peers from the wheels
#      in $WHEELS, with no index),
#   2. the kernel tests compiled (no TRITON_INTERPRET; bf16 cases run): the gate,
#   3. the device tests with real CUDA tensors (tests/test_devices.py: every influence method,
#      the solvers, the engine and the commutator keep their results on the GPU) and the input
#      guards (tests/test_guards.py),
#   4. the per-sample and kernel benchmark suites, only if the kernel tests passed
#      (a speedup is never reported on a red gate; FORCE_BENCH=1 overrides), a profile of the
#      per-sample methods' kernels, and a dense projection with its blocks drawn on the GPU
#      against on the CPU,
#   5. optional: EK-FAC influence vs Kronfluence, influx-score end to end, the whole test suite,
#   6. logs and the results written by this run packed into $OUT/gpu_check.tar.gz when OUT is set.
# Every step has its own time limit and all of them share a deadline (DEADLINE seconds, 450 = 7.5
# minutes), so the script ends in time even when a step hangs; the optional steps take what is left.
# On a copy of the tree (a lent machine), commit first and pass INFLUX_SOURCE_SHA=<that commit>: the
# copy's own git metadata may be stale, and the results record the sha they were measured at.
# Usage: bash benchmarks/gpu_check.sh   (env: VENV=.venv|system PYTHON=python3 WHEELS=.whl
#        FORCE_BENCH=0 DEADLINE=450 PERSAMPLE_RUNS=1 WITH_INFLUENCE=0 WITH_SCORE=0 WITH_ALL_TESTS=0)
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
DEADLINE=${DEADLINE:-450}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOGS=benchmarks/results/gpu_check-$STAMP
mkdir -p "$LOGS"
touch "$LOGS/.started"
unset TRITON_INTERPRET INFLUX_KERNELS
export PYTHONUNBUFFERED=1
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

# The logs and every results file this run wrote, in one archive (a lent machine returns few files).
pack_results() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        find benchmarks/results -path "$LOGS" -prune -o -type f -newer "$LOGS/.started" -print0 \
            | tar -czf "$OUT/gpu_check.tar.gz" --null -T - "$LOGS" 2>/dev/null
        log "packed $(tar -tzf "$OUT/gpu_check.tar.gz" | wc -l) entries into $OUT/gpu_check.tar.gz"
    fi
}
trap pack_results EXIT

# --- 1. environment ---------------------------------------------------------------------------
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || log "nvidia-smi unavailable"
PIP_FLAGS=(-q --no-build-isolation --no-compile)
if [ "$VENV" = system ]; then
    PY=$PYTHON
    if [ -d "$WHEELS" ]; then
        step install-peers 60 "$PY" -m pip install "${PIP_FLAGS[@]}" --no-index --no-deps \
            --target /tmp/influx-peers "$WHEELS"/*.whl || log "peer wheels failed to install"
        export PYTHONPATH=/tmp/influx-peers${PYTHONPATH:+:$PYTHONPATH}
    fi
    step install 60 "$PY" -m pip install "${PIP_FLAGS[@]}" --no-index --no-deps -e . \
        || { log "the package did not install"; exit 1; }
else
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
    PY="$VENV/bin/python"
    step install 120 "$PY" -m pip install "${PIP_FLAGS[@]}" --retries 1 --timeout 10 \
        -e ".[dev,bench]" || { log "install failed (offline? use VENV=system)"; exit 1; }
fi
"$PY" - >"$LOGS/versions.txt" 2>&1 <<'PYEOF'
import importlib.metadata as m
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("opacus", "backpack-for-pytorch", "kronfluence", "traker", "captum"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
PYEOF
log "$(tr '\n' ' ' <"$LOGS/versions.txt")"

# --- 2. kernel tests, compiled ----------------------------------------------------------------
step kernel-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels
TESTS_RC=$?
if [ $TESTS_RC -ne 0 ] && [ "${FORCE_BENCH:-0}" != "1" ]; then
    log "kernel tests failed: benchmarks skipped (FORCE_BENCH=1 runs them anyway)"
    exit 1
fi

# --- 3. every public path on CUDA tensors -----------------------------------------------------
# (the static scan of factory calls needs no GPU: the CPU suite runs it)
step device-tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_devices.py \
    tests/test_guards.py -k "not every_tensor_factory"
DEVICE_RC=$?

# --- 4. benchmarks ----------------------------------------------------------------------------
step bench-persample 150 "$PY" benchmarks/run.py --suite persample --device cuda \
    --models resnet18 --batch-sizes 64 128 --runs "${PERSAMPLE_RUNS:-1}"
PERSAMPLE_RC=$?
step bench-kernels 90 "$PY" benchmarks/run.py --suite kernels --device cuda
KERNELS_RC=$?
# where the per-sample time goes on the GPU (norms against full gradients): kernel time per operator
step profile-persample 60 "$PY" benchmarks/profile_persample.py --device cuda --models resnet18 \
    --batches 64 128

# dense projection of ResNet-18-sized gradients: blocks drawn on the GPU against on the CPU
# (K = 512 and 1,024, 2 timed calls each: the CPU-drawn rows take seconds per call)
step bench-dense-draws 120 "$PY" benchmarks/dense_draws.py --device cuda --dims 512 1024 \
    --repeats 2

# --- 5. optional steps, each taking what the deadline leaves ----------------------------------
left() { echo $((DEADLINE - (SECONDS - START))); }

# WITH_INFLUENCE=1: EK-FAC influence vs Kronfluence on a CIFAR-shaped ResNet-18, pairwise and
# self-influence, at a size that fits the step (the suite's CUDA default is 50k x 2,000).
INFLUENCE_RC=0
if [ "${WITH_INFLUENCE:-0}" = "1" ]; then
    export INFLUX_SCALE_TRAIN=${INFLUX_SCALE_TRAIN:-10000}
    export INFLUX_SCALE_QUERIES=${INFLUX_SCALE_QUERIES:-500}
    export INFLUX_SCALE_RUNS=${INFLUX_SCALE_RUNS:-1}
    export INFLUX_SCALE_NORMS=${INFLUX_SCALE_NORMS:-0}
    step bench-influence-scale "$(left)" "$PY" benchmarks/run.py --suite influence_scale \
        --device cuda
    INFLUENCE_RC=$?
fi

# WITH_SCORE=1: influx-score on a CIFAR-10 training set with ResNet-18 end to end
# (train, score, report). With CIFAR-10 under $INFLUX_DATA_DIR it scores all 50,000 examples;
# without, the CIFAR-shaped synthetic set of the same size.
SCORE_RC=0
if [ "${WITH_SCORE:-0}" = "1" ]; then
    DATASET=synthetic
    [ -f "${INFLUX_DATA_DIR:-data}/cifar-10-batches-py/data_batch_1" ] && DATASET=cifar10
    step influx-score 300 "$PY" -m influx.cli --dataset "$DATASET" --model resnet18 \
        --device cuda --epochs "${SCORE_EPOCHS:-2}" --scores loss,margin,grad_norm,tracin \
        --out "$LOGS/score-$DATASET-resnet18" --no-progress
    SCORE_RC=$?
fi

# WITH_ALL_TESTS=1: the rest of the test suite with a GPU visible (CUDA-only cases run), spread
# over the cores when pytest-xdist is there.
ALL_RC=0
if [ "${WITH_ALL_TESTS:-0}" = "1" ]; then
    XDIST=()
    "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${TEST_WORKERS:-8}")
    step all-tests "$(left)" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
        --ignore tests/kernels --ignore tests/test_devices.py --ignore tests/test_guards.py
    ALL_RC=$?
fi

log "done: kernel tests rc=$TESTS_RC, device tests rc=$DEVICE_RC, persample bench rc=$PERSAMPLE_RC, kernels bench rc=$KERNELS_RC, influence rc=$INFLUENCE_RC, score rc=$SCORE_RC, all tests rc=$ALL_RC"
[ $TESTS_RC -eq 0 ] && [ $DEVICE_RC -eq 0 ] && [ $PERSAMPLE_RC -eq 0 ] && [ $KERNELS_RC -eq 0 ] \
    && [ $INFLUENCE_RC -eq 0 ] && [ $SCORE_RC -eq 0 ] && [ $ALL_RC -eq 0 ]
