#!/usr/bin/env bash
# GPU checks of the training package, for a session lent an H100/H200.
#
# Run from the repository root through the device tool, e.g. (one call,
# timeout_s=540; it finishes in well under 8 minutes):
#
#   DROPCHECK_GIT_COMMIT=<sha of the checkout> bash training/scripts/gpu_check.sh
#
# Nothing needs installing there: the image's python3 has torch and tqdm, and
# the packages are imported from the copied tree.  Writes into $OUT (default
# results/bench): nvidia-smi.txt, cuda-bench.json + bench.log (every update
# rule timed side by side at the paper's AWD-LSTM size, `dropcheck bench
# --config ptb --device cuda`), fd_check.json + fd_check.log (do the
# finite-difference estimators agree with the exact ones within their
# statistical error in float32 / TF32 on cuDNN?  `python -m training.studies.fd_check`),
# cuda-bench-gpt2.json + bench-gpt2.log (every rule on the GPT-2 of the Table 2
# study, `dropcheck bench --config cpu-ptb-gpt2 --device cuda`; transformers is in
# the device image).
# Copy cuda-bench.json to results/bench/cuda-ptb.json and cuda-bench-gpt2.json to
# results/bench/cuda-ptb-gpt2.json to commit them.
#
# Budget: the bench is every arm of `dropcheck bench --list` (18) x (5 warm-up
# + 20 timed + 1 memory) steps; the slowest arm (loop LSTM, double backward)
# took 0.52 s/step on an H100 (an earlier measurement), 9 arms then about 1.1 s per
# round; three loop-LSTM arms and DROPOUT_4 with its variants now make a round
# a few seconds, so about 2 min plus start-up (an estimate, not measured); the fd check is 200 samples x 4 precision settings on a tiny
# model, launch-bound, about 1 min, after a float64 reference on the CPU
# (about 10 s on one core here); the GPT-2 bench is 13 arms of a small model
# (an estimate: under a minute).  Each part has its own timeout (270 s + 150 s
# + 90 s), so even a hung part leaves the script inside 9 minutes.
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# DRY_RUN=1: the same plumbing on CPU at a tiny size (tests/training/test_bench.py)
if [ "${DRY_RUN:-0}" = 1 ]; then
    DEV=cpu
    BENCH=(--config smoke --warmup 1 --repeats 2 --vocab 50 emb=8 hidden=8 layers=2 bptt=5 batch_size=2)
    BENCH_GPT2=(--config smoke-gpt2 --warmup 1 --repeats 1 --vocab 50 emb=8 heads=2 layers=1 bptt=5 batch_size=2)
    FD=(--samples 4 --tiny)
else
    DEV=cuda
    BENCH=(--config ptb --warmup 5 --repeats 20)
    BENCH_GPT2=(--config cpu-ptb-gpt2 --warmup 5 --repeats 20)
    FD=(--samples 200 --threads 8)
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' \
    2>&1 | tee -a "$OUT/nvidia-smi.txt"

status=0
timeout 270 $PY -m dropcheck bench --device "$DEV" "${BENCH[@]}" --no-progress \
    --out "$OUT/$DEV-bench.json" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}; echo "bench exit status $rc"; [ "$rc" -eq 0 ] || status=1

timeout 90 $PY -m dropcheck bench --device "$DEV" "${BENCH_GPT2[@]}" --no-progress \
    --out "$OUT/$DEV-bench-gpt2.json" 2>&1 | tee "$OUT/bench-gpt2.log"
rc=${PIPESTATUS[0]}; echo "gpt2 bench exit status $rc"; [ "$rc" -eq 0 ] || status=1

timeout 150 $PY -m training.studies.fd_check --device "$DEV" "${FD[@]}" --out "$OUT/fd_check.json" 2>&1 | tee "$OUT/fd_check.log"
rc=${PIPESTATUS[0]}; echo "fd_check exit status $rc"; [ "$rc" -eq 0 ] || status=1

exit $status
