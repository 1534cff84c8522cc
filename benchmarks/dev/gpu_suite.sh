#!/bin/bash
# The 2026-11-22 results under benchmarks/eval-h100-2026-11-22/ were made on one H100, from the
# repository root, with DATA=data/shakespeare (`tpa data prepare shakespeare --output data/shakespeare`):
#   OUT=DIR T_TRAIN=190 T_GEN=130 T_ABL=120 TRAIN_ARGS="--types tpa mha gqa mla mqa tpa_kvonly --steps 15 --warmup 5 --compile both --time-budget 150" GEN_ARGS="--prefill-chunk 1024 --max-prompt-tokens 262144 --time-budget 90" bash benchmarks/dev/gpu_suite.sh
# One device call: tpa bench memory / train / generate at PRESET, then a shortened tpa ablate.
# Results (tables, JSON, CSV, logs) go into $OUT/results.tar.gz after every step; the log to $OUT/log.txt.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PRESET=${PRESET:-small}; ABL_PRESET=${ABL_PRESET:-mini}; DATA=${DATA:-data/shakespeare}
T_TRAIN=${T_TRAIN:-210}; T_GEN=${T_GEN:-150}; T_ABL=${T_ABL:-140}
TRAIN_ARGS=${TRAIN_ARGS:-"--steps 15 --warmup 5 --compile both --time-budget 165"}
GEN_ARGS=${GEN_ARGS:-"--prefill-chunk 1024 --max-prompt-tokens 262144 --time-budget 105"}
ABL_ARGS=${ABL_ARGS:-"--steps 200 --batch-size 32 --seq-len 256 --lr 1e-3 --warmup-steps 20 --eval-every 20 --eval-sequences 32"}
MEM_ARGS=${MEM_ARGS:-"--measure-preset $PRESET --measure-tokens 4096"}
R=$OUT/r; mkdir -p "$R"
pack() { tar czf "$OUT/results.tar.gz" --exclude=checkpoints --exclude='profile_trace*' -C "$OUT" r; }
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.is_available())"
  echo "== bench memory"; timeout -k 10 60 python3 -m tpa.cli bench memory $MEM_ARGS --output "$R/memory"; echo "rc=$?"; pack
  echo "== bench train"; timeout -k 20 "$T_TRAIN" python3 -m tpa.cli bench train --preset "$PRESET" --data "$DATA" $TRAIN_ARGS --output "$R/train"; echo "rc=$?"; pack
  echo "== bench generate"; timeout -k 20 "$T_GEN" python3 -m tpa.cli bench generate --preset "$PRESET" $GEN_ARGS --output "$R/generate"; echo "rc=$?"; pack
  echo "== ablate"; timeout -k 20 "$T_ABL" python3 -m tpa.cli ablate --data "$DATA" --preset "$ABL_PRESET" $ABL_ARGS --no-plot --output "$R/ablate"; echo "rc=$?"; pack
  date -u
} 2>&1 | tee "$OUT/log.txt"
