#!/usr/bin/env bash
# One GPU check for the day a CUDA GPU is lent: `make gpu-check` or `scripts/gpu_check.sh OUTDIR [--dry-run]`.
#
# Runs from the repository root with the installed torch and triton (no network, no `make install`): PYTHONPATH=.
# 1. the Triton kernels import and are the ones the encoder runs (fails, never falls back);
# 2. the GPU tests (pytest -m gpu: kernels vs the torch path at NEST-L/XL sizes, fp32 and bf16, and the first
#    backward of a fresh autotune key: caches cleared, so the call that benchmarks is the one checked);
# 3. kernels/bench.py at T = 250 and 750 (torch vs triton, fwd / bwd / fwd+bwd, bf16);
# 4. scripts/benchmark_train.py, eager vs triton, NEST-L with 20 s utterances, a few steps.
# Every CSV and log goes under OUTDIR. NEST_SSL_PIN_KERNEL_CONFIGS=1 pins one autotune configuration per attention
# kernel (the conv kernels have fixed blocks), so each (kernel, dtype, head-dim block, dropout) specialisation
# compiles once; each step has its own time limit so the whole check stays under 8 minutes on one H100/H200.
# --dry-run lists the steps, their limits and the compile estimate, and runs nothing (tested on CPU); --help prints
# this text.
set -euo pipefail

OUTDIR=""
DRY=0
usage() {  # the header comment above, without its leading '# '
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg (usage: scripts/gpu_check.sh OUTDIR [--dry-run] [--help])" >&2; exit 2 ;;
        *) OUTDIR="$arg" ;;
    esac
done
if [ -z "$OUTDIR" ]; then
    echo "usage: scripts/gpu_check.sh OUTDIR [--dry-run]" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export NEST_SSL_PIN_KERNEL_CONFIGS=1
unset TRITON_INTERPRET

# name | time limit (s) | command. Limits sum to 450 s (7.5 min) plus start-up.
STEPS=(
  "kernels_used|60|$PY scripts/gpu_kernels_used.py --out $OUTDIR/kernels_used.json"
  "gpu_tests|180|$PY -m pytest -q -m gpu -p no:cacheprovider --junitxml=$OUTDIR/gpu_tests.xml tests/test_rel_pos_attention.py tests/test_conv_module_kernel.py tests/test_encoder_kernels.py"
  "bench|90|$PY kernels/bench.py --kernel all --providers torch,triton --dtype bf16 --T 250,750 --tokens 12000 --out $OUTDIR/bench.csv"
  "train|120|$PY scripts/benchmark_train.py --config configs/nest_fast-conformer_l.yaml --modes eager,triton --batch 8 --seconds 20 --dtype bf16 --steps 3 --warmup 2 --csv $OUTDIR/train.csv"
)
# Compiles with pinned configs: attention fwd (dropout on/off) + preprocess + dkdv + dq per (dtype, head-dim block):
# tests 2 dtypes x 2 blocks (d 44/64 share 64, d 128) + bench and train bf16 d64 (shared) -> 5 x 4 = 20; conv: 5
# kernels x 2 dtypes = 10 (channel counts are runtime arguments). Integer-argument specialisation (T % 16) can double
# a kernel: at most 60.
COMPILES_EST="30-60"

if [ "$DRY" = 1 ]; then
    echo "gpu-check dry run: OUTDIR=$OUTDIR, PYTHONPATH=$ROOT, NEST_SSL_PIN_KERNEL_CONFIGS=1"
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit cmd <<< "$step"
        echo "step $name (limit ${limit}s): $cmd"
    done
    echo "Triton compiles (estimate): $COMPILES_EST"
    exit 0
fi

mkdir -p "$OUTDIR"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU visible')"
start=$(date +%s)
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $cmd" | tee -a "$OUTDIR/gpu_check.log"
    if ! timeout "$limit" bash -c "$cmd" > "$OUTDIR/$name.log" 2>&1; then
        echo "FAILED: $name after $(( $(date +%s) - t0 ))s; tail of $OUTDIR/$name.log:" | tee -a "$OUTDIR/gpu_check.log"
        tail -n 40 "$OUTDIR/$name.log" | tee -a "$OUTDIR/gpu_check.log"
        exit 1
    fi
    echo "   ok in $(( $(date +%s) - t0 ))s" | tee -a "$OUTDIR/gpu_check.log"
done
echo "gpu-check passed in $(( $(date +%s) - start ))s; results in $OUTDIR" | tee -a "$OUTDIR/gpu_check.log"
