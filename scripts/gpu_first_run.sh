#!/usr/bin/env bash
# The first device run: one command of at most 9 minutes on one GPU that checks numbers, not
# just that the code starts.  Steps in priority order, each under its own `timeout` and all of
# them under BUDGET seconds, so a slow machine cuts only the tail; every step writes its log
# (and the benchmarks their JSON after every run) to $OUT as it goes.
#
#   1. env           GPU, driver, CUDA, cuDNN, torch, flash-attn, host memory -> env.json
#   2. install       the carried wheels (scripts/gpu_bundle.sh) checked and installed
#   3. cuda_tests    tests/cuda without the trainer: every kernel against math, UPipe and
#                    Ulysses against float32 SDPA, offload and its pinned bytes, the FA2
#                    offset guard at 2^31, the 80 GB cap                    -> cuda_tests.xml
#   4. trainer       one GPU, debug model, memory stack on vs off, same seed, same losses
#   5. bench_128k    Llama3-8B as rank 0 of 8 (fake backend, under the configs' 80 GB cap),
#                    128K tokens, 2 layers: upipe U=8, ulysses, ring       -> bench_128k.json
#   6. bench_1m      the same at 1M tokens, upipe U=8                       -> bench_1m.json
#   7. estimate_*    the CPU estimator's peak and host memory for the runs of 5 and 6 (not ring:
#                    TorchTitan's ring has no CPU path)
#                    (its figures can be recomputed on any CPU: it comes last)
#   $OUT/steps.tsv   one line per step: status (ok | rc=N | timeout | skipped), seconds
#
# On the GPU machine, with the wheels built here first (scripts/gpu_bundle.sh, into .whl/):
#   device run: command "bash scripts/gpu_first_run.sh", carry [".whl"], timeout_s 600
# On CPU, the dry run (tests/integration/test_gpu_first_run.py): DRY_RUN=1 builds and checks
# the bundle instead of installing it, runs the CUDA tests (all skipped), and has the
# benchmarks parse and validate every command line (sweep --dry-run) instead of running them.
#
# Environment: OUT (default gpu_first_run_out), BUDGET (seconds, default 540), DRY_RUN (0/1),
# WHL_DIR (default .whl), SITE (install target, default /tmp/site), PY (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_first_run_out}
BUDGET=${BUDGET:-540}
DRY_RUN=${DRY_RUN:-0}
WHL_DIR=${WHL_DIR:-.whl}
SITE=${SITE:-/tmp/site}
PY=${PY:-python3}
CONFIG=train_configs/llama3_8b_8xh100_upipe.toml   # device_memory_gib = 80: an H100's memory
mkdir -p "$OUT"
START=$SECONDS
printf 'step\tstatus\tseconds\tlimit\n' > "$OUT/steps.tsv"

step() {  # step NAME LIMIT CMD...: CMD under min(LIMIT, what is left of BUDGET)
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$OUT/steps.tsv"
        echo "=== $name: skipped, the budget is spent"
        return 0
    fi
    echo "=== $name (at $((SECONDS - START)) s, limit $limit s)"
    local t0=$SECONDS rc status
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="rc=$rc" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" >> "$OUT/steps.tsv"
    tail -n 8 "$OUT/$name.log"
    echo "--- $name: $status in $((SECONDS - t0)) s"
}

env_report() {
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv
    free -g | head -2
    "$PY" - "$OUT/env.json" << 'EOF'
import importlib.util, json, platform, sys
import torch
cuda = torch.cuda.is_available()
env = {
    "python": platform.python_version(), "torch": torch.__version__,
    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
    "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
    "flash_attn": importlib.util.find_spec("flash_attn") is not None,
}
print(json.dumps(env, indent=1))
json.dump(env, open(sys.argv[1], "w"), indent=1)
EOF
}

install() {
    if [[ $DRY_RUN == 1 ]]; then
        WHL_DIR=$WHL_DIR VENV_PY=$PY bash scripts/gpu_bundle.sh || return
        "$PY" scripts/check_bundle.py "$WHL_DIR"
        return
    fi
    "$PY" scripts/check_bundle.py "$WHL_DIR" || return
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHL_DIR"/*.whl
}

export OUT DRY_RUN WHL_DIR SITE PY
export -f env_report install   # run by `timeout` through bash -c
[[ $DRY_RUN == 1 ]] && DRY=(--dry-run) || DRY=()
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs -m cuda)
BENCH=("$PY" scripts/bench_one_rank.py --config "$CONFIG" --ngpu 8 --layers 2 --steps 3
       --warmup 1 --timeout 200)
TRAIN=(-- --parallelism.context_parallel_rotate_method alltoall)   # as scripts/gpu_bench.sh

step env 60 bash -c env_report
step install 120 bash -c install
step cuda_tests 200 "${PYTEST[@]}" tests/cuda --ignore=tests/cuda/test_cuda_trainer.py \
    --junitxml "$OUT/cuda_tests.xml"
step trainer 150 "${PYTEST[@]}" -s tests/cuda/test_cuda_trainer.py
step bench_128k 240 "${BENCH[@]}" --styles upipe:8 ulysses ring --seq-lens 128K \
    --out "$OUT/bench_128k.json" "${DRY[@]}" "${TRAIN[@]}"
step bench_1m 180 "${BENCH[@]}" --styles upipe:8 --seq-lens 1M --out "$OUT/bench_1m.json" \
    "${DRY[@]}" "${TRAIN[@]}"
step estimate_128k 150 "${BENCH[@]}" --styles upipe:8 ulysses --seq-lens 128K --estimate \
    --jobs 2 --out "$OUT/estimate_128k.json" "${DRY[@]}" "${TRAIN[@]}"
step estimate_1m 150 "${BENCH[@]}" --styles upipe:8 --seq-lens 1M --estimate \
    --out "$OUT/estimate_1m.json" "${DRY[@]}" "${TRAIN[@]}"
echo "=== done in $((SECONDS - START)) s"
cat "$OUT/steps.tsv"
