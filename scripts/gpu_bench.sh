#!/usr/bin/env bash
# Measure every context-parallel style of Llama3-8B as an 8xH100 job, on ONE GPU: each run is
# rank 0 of the 8-rank job (TorchTitan's fake backend: real compute and memory, no-op
# collectives; see benchmarks/runner.py).
#
# Before: on a machine with network, scripts/gpu_bundle.sh (fills .whl/, git-ignored).
# On the GPU machine, from the repo root, with .whl/ carried along:
#
#   scripts/gpu_bench.sh smoke                       # then one phase per command (each < 10 min)
#   scripts/gpu_bench.sh full128k
#   STYLES="upipe:8 upipe:16" scripts/gpu_bench.sh fitcheck
#   STYLES="ulysses ring" scripts/gpu_bench.sh fitcheck
#   scripts/gpu_bench.sh report                      # or run the report on CPU afterwards
#
# Phases (time estimates for an H100, from the paper's tokens/s and ~30 s start-up per run;
# check the wall times the smoke phase prints and adjust):
#   smoke     install + checks; 128K at 1 layer, every style                    ~3 min
#   full128k  128K at full depth (32 layers), every style                        ~5 min
#   fitcheck  128K, 256K, 512K at 1 and 2 layers (fit error vs full depth)       ~12 min (split STYLES)
#   full      256K and 512K at full depth                                        ~17 min (split STYLES)
#   fit       1M ... 8M at 1 and 2 layers (memory -> maximum context)            hours: a 1-layer step
#             at 4M is ~4.5 min, at 8M ~18 min; give it its own long session, or
#             SEQ_LENS="1M 2M" for a budget (~10 min for two styles).  TorchTitan's ring
#             is also run as rank 7, the other end of its causal zigzag.
#   report    markdown + PNGs from every JSON in $OUT                            seconds
#
# Every phase writes $OUT/llama3_8b_8xh100_<phase>.json after each run, so a command cut off
# by its time limit keeps what it measured.  A run that goes out of memory or exceeds
# TIMEOUT seconds stops that style's longer lengths (scripts/bench_one_rank.py).
# Environment: OUT (default docs/results), STYLES, SEQ_LENS, TIMEOUT (per run, default 540),
# ROTATE (TorchTitan ring's K/V rotation, default alltoall), SITE (where the wheels are
# installed, default /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-docs/results}
SITE=${SITE:-/tmp/site}
TIMEOUT=${TIMEOUT:-540}
STYLES=${STYLES:-"upipe:8 upipe:16 ulysses ring"}
# one config for every style: the memory stack ([memory], full AC, bf16, batch 1) is identical
# in the 8xH100 configs, and bench_one_rank.py resets UPipe's chunk heads for other styles
CONFIG=train_configs/llama3_8b_8xh100_upipe.toml
# style "ring" (TorchTitan's ring) rotates K/V with all-to-alls as the paper's "Native PyTorch"
# baseline did (TorchTitan's default "allgather" holds every rank's K/V at once); no effect on
# the other styles
ROTATE=${ROTATE:-alltoall}
NAME=llama3_8b_8xh100
mkdir -p "$OUT"

setup() {
    if ! PYTHONPATH=$SITE python3 -c "import torchtitan, tyro, datasets, torchdata" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
    fi
    export PYTHONPATH=$SITE:$PWD
}

bench() {  # bench PHASE ARGS...: one sweep of bench_one_rank.py over $STYLES
    local phase=$1
    shift
    # shellcheck disable=SC2086  # STYLES and SEQ_LENS are word lists
    python3 scripts/bench_one_rank.py --config "$CONFIG" --ngpu 8 --styles $STYLES \
        --timeout "$TIMEOUT" --out "$OUT/${NAME}_${phase}.json" "$@" \
        -- --parallelism.context_parallel_rotate_method "$ROTATE"
}

setup
for phase in "${@:-smoke}"; do
    echo "=== $phase ($(date +%T))"
    case $phase in
    smoke)
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        free -g | head -2
        python3 -c "import torch, torchtitan, torchtitan_upipe; print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); import torchtitan_upipe.train_spec"
        bench smoke --seq-lens 128K --layers 1 --steps 2 --warmup 1
        ;;
    full128k)
        bench full128k --seq-lens 128K --layers 0 --steps 3 --warmup 1
        ;;
    fitcheck)
        # shellcheck disable=SC2086
        bench fitcheck --seq-lens ${SEQ_LENS:-128K 256K 512K} --layers 1 2 --steps 3 --warmup 1
        ;;
    full)
        # shellcheck disable=SC2086
        bench full --seq-lens ${SEQ_LENS:-256K 512K} --layers 0 --steps 2 --warmup 1
        ;;
    fit)
        # two steps: the second one holds the optimizer state, part of the per-layer memory.
        # A causal ring's ranks differ in memory (tests/tools/test_estimate.py): TorchTitan's ring is
        # also measured as the job's last rank, and its maximum context is the lower of the two
        fit_styles=$STYLES
        [[ " $STYLES " == *" ring "* ]] && fit_styles="$STYLES ring:r=7"
        # shellcheck disable=SC2086
        STYLES=$fit_styles bench fit --seq-lens ${SEQ_LENS:-1M 2M 3M 4M 5M 6M 8M} --layers 1 2 \
            --steps 2 --warmup 1
        ;;
    report)
        python3 -m benchmarks.report "$OUT"/${NAME}_*.json --out "$OUT/$NAME.md"
        python3 scripts/plot_benchmarks.py "$OUT"/${NAME}_*.json --out-dir "$OUT" --prefix "$NAME"
        ;;
    *)
        echo "unknown phase $phase (smoke | full128k | fitcheck | full | fit | report)" >&2
        exit 2
        ;;
    esac
done
