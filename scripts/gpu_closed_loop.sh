#!/usr/bin/env bash
# The closed loop at full scale on a CUDA machine: the full fine-tune (--freeze 0, every source
# photo), the recipes compared on one export (the sweep), the loop's iterations, then the gain
# curve against data and epochs; every figure, JSON and log goes under $OUT.
#
#   bash scripts/gpu_closed_loop.sh [--smoke] [curve] [sweep]     (no stage named: both)
#
# OUT        where the results go (default /tmp/facemine-gpu-closed-loop): env.txt, sweep_loop.json,
#            curve.json, one log per stage (8 files at most: what the device tool brings back).
# WORK       the store both stages share (default /tmp/facemine-gpu-work): mined once, the held-out
#            faces detected once; a second call on the same machine reuses it.
# EPOCHS     epochs of the sweep and the loop (default 10); CURVE: the curve's PHOTOS:EPOCHS points.
# PYTHON     default .venv/bin/python (bash scripts/setup.sh gpu), else python3.
# FACEMINE_BENCH_DATA, FACEMINE_SHARED_MODELS_DIR: the photos and SFace, default ../shared beside the
#            checkout, or ./shared inside it where that exists (a machine the checkout was copied to).
# --smoke    a few photos on the CPU, one epoch, to check the whole script end to end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/facemine-gpu-closed-loop}
WORK=${WORK:-/tmp/facemine-gpu-work}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
if [ -d shared/data ]; then
  export FACEMINE_BENCH_DATA=${FACEMINE_BENCH_DATA:-$PWD/shared/data}
  export FACEMINE_SHARED_MODELS_DIR=${FACEMINE_SHARED_MODELS_DIR:-$PWD/shared/models}
fi
export PYTHONUNBUFFERED=1

smoke=0
stages=()
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    curve|sweep) stages+=("$arg") ;;
    *) echo "gpu_closed_loop.sh: unknown argument '$arg' (--smoke, sweep, curve)" >&2; exit 2 ;;
  esac
done
# The curve first: it never promotes, so the loop after it starts from SFace on the same store (the
# curve refuses a store whose model a loop replaced).
[ ${#stages[@]} -gt 0 ] || stages=(curve sweep)

if [ $smoke = 1 ]; then
  # Tiny and on the CPU: whole identities of ~40 photos, 60 held-out photos, 40 LFW pairs.
  common=(--device cpu --freeze 0 --batch-size 16 --workers 0 --holdout-limit 60 --pairs-limit 40)
  sweep=(--limit 40 --epochs 1 --recipes distill margin --iterations 1)
  curve=(${CURVE:-40:1} --recipes distill)
else
  # GPU: all source photos, all held-out CelebA people and all 2,200 LFW pairs; loader processes
  # for the degradations (CPU work) that feed the GPU.
  common=(--device cuda --freeze 0 --batch-size 256 --workers 8 --holdout-limit 0 --pairs-limit 0)
  sweep=(--limit 0 --epochs "${EPOCHS:-10}" --recipes distill distill_pairs margin --iterations 2 --patience 2)
  curve=(${CURVE:-500:2 1000:2 0:1 0:2 0:5 0:10 0:20} --recipes distill margin)
fi

mkdir -p "$OUT" "$WORK"
{
  date -u
  git log -1 --format='commit %H' 2>/dev/null
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  echo "python $PYTHON; data ${FACEMINE_BENCH_DATA:-../shared/data}; store $WORK; smoke $smoke; stages ${stages[*]}"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
for stage in "${stages[@]}"; do
  if [ "$stage" = sweep ]; then
    # Recipes compared on one export (each judged against SFace), then the loop with the best one.
    args=("${sweep[@]}" --loop-name gpu --json "$OUT/sweep_loop.json")
  else
    # Gain over SFace against data (whole identities; 0: all source photos) and epochs.
    args=(--curve "${curve[@]}" --json "$OUT/curve.json")
  fi
  echo "== $stage: benchmarks/closed_loop.py ${common[*]} ${args[*]}"
  "$PYTHON" benchmarks/closed_loop.py "${common[@]}" --data-dir "$WORK" "${args[@]}" >"$OUT/$stage.log" 2>&1
  code=$?
  # The tables (the log keeps the training and gate lines too).
  grep -v -E '^[0-9:.]+ \| (INFO|DEBUG)' "$OUT/$stage.log" | tail -n 60
  echo "== $stage: exit status $code"
  [ $code = 0 ] || status=$code
done
echo "results in $OUT"
exit $status
