#!/usr/bin/env bash
# The cpu-ptb study on one CUDA GPU in one device call (plan cpu-ptb-cuda of
# training/studies/study.py: the cpu-ptb config and arms, device=cuda).
#
# From the repository root, through the device tool (timeout_s=600):
#
#   bash training/scripts/gpu_study.sh
#
# with the PTB folder at $DATA (default .data/ptb: copy the corpus there, keep
# .data out of git with .git/info/exclude, and name it in the call's carry).
# Nothing needs installing there: the image's python3 has torch and tqdm.
#
# Two `dropcheck reproduce` drivers run side by side for $BUDGET seconds:
#   A: the DROPOUT_k family (k = 2, 4, 8; + ξ̃_drop; + ξ_approx), the costliest
#      (k forward passes a step) and the arms a CPU session cannot finish;
#   B: everything else but the R̃_approx ablation (loss-jacobian: the loop LSTM
#      with a double backward, launch-bound on a GPU), in plan order.
# A background loop prints every running log's last evaluation each minute.
# At the end every log (*.jsonl, and the runs' *.out) is packed into
# $OUT/runs.tgz; a run cut off by the budget (SIGTERM: it checkpoints at its next
# step and exits) leaves a log without a final line, which `dropcheck reproduce`
# starts again (its checkpoint stays behind on the device machine).
# The complete logs committed under results/runs/cpu-ptb-cuda are copied in
# first, so a later session runs only what is missing.  Unpack the new complete
# logs into that folder and draw them with
# `dropcheck reproduce --plan cpu-ptb-cuda --draw-only`.
#
# PLAN=cpu-ptb-gpt2-cuda: the Table 2 / C7 plan instead (GPT-2 at all of PTB and
# a fifth of it; driver A the DROPOUT_2/4 arms, driver B the rest; transformers is
# in the device image).
#
# DRY_RUN=1: the same plumbing on the CPU with the tiny plan and $DATA's
# corpus (tests/training/test_reproduce.py).
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/gpu-study}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ARMS_A / ARMS_B (space-separated glob patterns of arm names) and JOBS_A / JOBS_B override the defaults
if [ "${DRY_RUN:-0}" = 1 ]; then
    PLAN=tiny BUDGET=${BUDGET:-300} EVERY=5  # a cap: the tiny plan takes about a minute on an idle machine
    : "${ARMS_A:=dropout-*}" "${ARMS_B:=none explicit*}" "${JOBS_A:=1}" "${JOBS_B:=1}"
elif [ "${PLAN:-cpu-ptb-cuda}" = cpu-ptb-gpt2-cuda ]; then
    BUDGET=${BUDGET:-530} EVERY=60
    : "${ARMS_A:=*-dropout-k[24]}" "${ARMS_B:=*-none *-dropout-k1 *-explicit*}"
    : "${JOBS_A:=4}" "${JOBS_B:=8}"
else
    PLAN=cpu-ptb-cuda BUDGET=${BUDGET:-530} EVERY=60
    : "${ARMS_A:=dropout-k[248] inject-k4 dropout-implicit-k*}" "${ARMS_B:=none dropout-k1 l2-* explicit* identity-*}"
    : "${JOBS_A:=7}" "${JOBS_B:=7}"
fi
read -r -a ARMS_A <<< "$ARMS_A"   # no glob expansion: the patterns go to --arms as they are
read -r -a ARMS_B <<< "$ARMS_B"
RUNS=${RUNS:-/tmp/runs-$PLAN}
mkdir -p "$RUNS"
# the committed complete logs ($DONE) come along, so the drivers skip what is done
DONE=${DONE:-results/runs/$PLAN}
if compgen -G "$DONE/*.jsonl" > /dev/null; then cp -n "$DONE"/*.jsonl "$RUNS"/; fi
COMMON=(--plan "$PLAN" --runs "$RUNS" --out "$RUNS/drawn" --data "${DATA:-.data/ptb}" --seeds 2 --no-progress)

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>&1
  nproc; } | tee "$OUT/machine.txt"

timeout "$BUDGET" $PY -m dropcheck reproduce "${COMMON[@]}" --jobs "$JOBS_A" --arms "${ARMS_A[@]}" \
    > "$OUT/driver-a.log" 2>&1 &
A=$!
timeout "$BUDGET" $PY -m dropcheck reproduce "${COMMON[@]}" --jobs "$JOBS_B" --arms "${ARMS_B[@]}" \
    > "$OUT/driver-b.log" 2>&1 &
B=$!
(   # progress: the state of every run that has started, each $EVERY seconds
    while sleep "$EVERY"; do
        echo "--- $(date +%T)"
        $PY -m dropcheck reproduce --plan "$PLAN" --runs "$RUNS" --status 2>&1 | grep -v '^todo' | cut -c1-110
    done
) &
M=$!
wait $A; ra=$?
wait $B; rb=$?
kill $M 2>/dev/null
echo "driver A exit $ra, driver B exit $rb (124: stopped at the budget of ${BUDGET}s)"
tail -n 40 "$OUT/driver-a.log" "$OUT/driver-b.log"
(cd "$RUNS" && tar czf "$OUT/runs.tgz" $(ls *.jsonl *.out 2>/dev/null))
$PY -m dropcheck reproduce --plan "$PLAN" --runs "$RUNS" --status 2>&1 | tee "$OUT/status.txt"
