#!/bin/bash
# The measurements of one GPU session, as stages run in the order given, each under its own timeout:
#   bash benchmarks/dev/gpu_session.sh tests decode generate        # one device call
#   bash benchmarks/dev/gpu_session.sh train-compile official        # the next one
# Stages:
#   tests          python -m pytest -m gpu (the GPU correctness tests; TESTS="FILE ..." limits it to those files)
#   decode         tpa bench decode at d_model 2048 (H=32, d_h=64; DECODE_DMODEL="2048 2176" adds H=34), ranks
#                  (16,1,1) (6,2,2) (16,2,2), B 1 4 16 (DECODE_BATCH), lengths 4K-512K or DECODE_LENGTHS, baselines
#                  gqa4 mqa mla (DECODE_BASELINES; empty: none), DECODE_EXTRA (e.g. --grid-only) passed on
#   decode-h34     tpa bench decode, B 16 8 1, L 512K 128K 32K, ranks (16,1,1) (6,2,2), graph replay and plain
#                  launches of each point per variant (the suspects of H=34's slowness: masked head rows or
#                  unaligned A rows): decode-h34/blocks, H=32 (d_model 2048) then H=34 (2176) per head block
#                  16/32/64 in both grid orders; decode-h34/pads, H=34 at head block 64 per A-cache pad 1/8/16,
#                  the loads reading the padding or not
#   decode-pads    decode-h34's second part alone: H=34 at head block 64 per A-cache pad 1/8/16
#   waves          benchmarks/dev/decode_waves.py (WAVES_ARGS="--pipeline" or "--registers": the small preset's
#                  decode shapes; "--small-heads": H = 16 at B = 1 and 2, the launch configurations)
#   gap            benchmarks/dev/decode_gap.py: where a decode call of 200-800 MB spends its time (isolated and
#                  back-to-back graph replay, split and merge kernels, the plain-read roofline; GAP_ARGS passed on)
#   ncu            benchmarks/dev/decode_ncu.py: Nsight Compute's counters (ncu --set full) of the split kernel at
#                  201 and 805 MB beside a plain read of 201 MB (NCU_ARGS passed on, e.g. "--points r16-b1-512k")
#   host-parts     benchmarks/dev/decode_host_parts.py: an eager tpa_decode call's host time, part by part
#   step-kernels   benchmarks/dev/step_kernels.py: the small preset's residual add + RMSNorm and SwiGLU activation
#                  in one launch each, beside the torch ops, and the TPA projection's GEMM; B 1 and 8, graph replay
#   generate       tpa bench generate, small preset, TPA / MHA / GQA / MQA / MLA beside transformers' Llama matched to
#                  GQA, MHA and MQA (llama, llama-mha, llama-mqa), 32K prompts (GEN_TYPES picks the types), and
#                  tpa-pad16: T6Config.tpa_cache_head_multiple=16 (GEN_PAD, default "1 16", lists the multiples)
#   profile-generate benchmarks/dev/profile_generate.py: where a generate() decode step goes (torch.profiler),
#                  small preset, 32K prompt, B 1 and 8, for PROF_GEN_TYPES (default "tpa")
#   host-step      benchmarks/dev/host_step.py at 32K (real replays, then --replay fake: host work only), then
#                  tpa bench generate at B=1 three times (TPA, MHA, MLA, Llama: the run-to-run spread; issue 12)
#   train-compile  tpa bench train, the whole-model-compile loop for every type (TRAIN_TYPES), transformers'
#                  Llama first; PROFILE=1 adds a torch.profiler table per model (also for `official`)
#                  COMPILE_MODE=reduce-overhead: torch.compile(model, mode=...) (CUDA graphs), into train-compile-MODE
#   train-trainer  tpa bench train, our trainer (compiled blocks) for every type
#   official       benchmarks/dev/official_train.py: the paper's official T6 and LLaMA-MHA in the same loop
#                  (needs OFFICIAL=DIR, a checkout of tensorgi/T6; default .official/T6)
#   official-decode benchmarks/dev/official_decode.py: the official FlashTPA decode kernel (tensorgi/T6,
#                  tpa_decode_parallel_bn_triton) beside tpa_decode on the same inputs, per point of the Figure 5
#                  grid: both outputs against the reference twin, plain launches, do_bench, graph replay, eager host
#                  time (needs OFFICIAL=DIR; OFFDEC_ARGS, default "--d-model 2048", picks the part of the grid;
#                  OFFDEC_BUDGET, default 140 s, ends it before the stage's T_OFFICIAL_DECODE, default 170 s)
#   profile-train  tpa train --profile-steps 3, small preset, micro-batch 16 x 1,024, compiled blocks, for
#                  PROFILE_TYPES (default "tpa mha"): RUN_DIR/profile.txt, kernels by GPU time (issue 13)
#   convert        tpa bench convert, mini preset, ranks 1 and 2
# BASE=DIR: the gap and ncu stages run first with DIR ahead on PYTHONPATH (a copy of an earlier `tpa` package, e.g.
# `mkdir -p .baseline && git archive HEAD tpa | tar -x -C .baseline`, carried), into gap-base and ncu-base: the
# earlier kernels and the tree's in one call (GAP_BASE_ARGS, default GAP_ARGS, for the first).
# Run from the repository root (the script puts it first on PYTHONPATH, so that the scripts under benchmarks/dev import
# this tree's `tpa`). DATA: token shards of
# `tpa data prepare shakespeare` (default .carry/shakespeare). Logs and results go under $OUT: log.txt
# and results.tar.gz, rewritten after every stage, so that a stage cut by its timeout keeps what came before.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# bitsandbytes, where the device lacks it: the wheel's package unpacked into .carry/bnb (benchmarks/dev/README.md)
if [ -d .carry/bnb/bitsandbytes ]; then export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/.carry/bnb"; fi
DATA=${DATA:-.carry/shakespeare}; OFFICIAL=${OFFICIAL:-.official/T6}; PY=${PY:-python3}
R=$OUT/r; mkdir -p "$R"
pack() { tar czf "$OUT/results.tar.gz" --exclude=checkpoints --exclude='*.pt' --exclude='*.safetensors' -C "$OUT" r; }
stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s) $(date -u +%T)"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$R/$name.log"
    echo "== $name rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s"
    pack
}
H34_GRID="--batch 16 8 1 --lengths 524288 131072 32768 --ranks 16,1,1 6,2,2 --baselines --reference-max-len 0 \
  --reps 10 --grid-only"
TRAIN="--preset small --data $DATA --micro-batch 16 --seq-len 1024 --steps 20 --warmup 5"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, transformers, triton, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, triton.__version__)"
  for s in "$@"; do
    case $s in
      tests) stage tests "${T_TESTS:-240}" $PY -m pytest -m gpu -q -rfEs -p no:cacheprovider --continue-on-collection-errors \
                ${TESTS:-} ;;
      decode) stage decode "${T_DECODE:-170}" $PY -m tpa.cli bench decode --d-model ${DECODE_DMODEL:-2048} \
                --batch ${DECODE_BATCH:-1 4 16} ${DECODE_LENGTHS:+--lengths $DECODE_LENGTHS} ${DECODE_EXTRA:-} \
                --ranks 16,1,1 6,2,2 16,2,2 --baselines ${DECODE_BASELINES-gqa4 mqa mla} --reference-max-len 0 \
                --output "$R/decode" ;;
      decode-h34) stage decode-h34 "${T_DECODE_H34:-160}" bash -c "
                timeout -k 5 95 $PY -m tpa.cli bench decode --d-model 2048 2176 $H34_GRID --block-h 16 32 64 \
                  --head-order both --output '$R/decode-h34/blocks'
                timeout -k 5 55 $PY -m tpa.cli bench decode --d-model 2176 $H34_GRID --block-h 64 \
                  --pad-a-heads 1 8 16 --pad-loads both --output '$R/decode-h34/pads'" ;;
      decode-pads) stage decode-pads "${T_DECODE_PADS:-90}" $PY -m tpa.cli bench decode --d-model 2176 $H34_GRID \
                --block-h 64 --pad-a-heads 1 8 16 --pad-loads both --output "$R/decode-pads" ;;
      waves) stage waves "${T_WAVES:-200}" $PY benchmarks/dev/decode_waves.py ${WAVES_ARGS:-} --out "$R/waves" ;;
      step-kernels) stage step-kernels "${T_STEP_KERNELS:-90}" $PY benchmarks/dev/step_kernels.py --out "$R/step-kernels" ;;
      gap) [ -n "${BASE:-}" ] && PYTHONPATH="$BASE:$PYTHONPATH" stage gap-base "${T_GAP:-240}" $PY \
                benchmarks/dev/decode_gap.py ${GAP_BASE_ARGS-${GAP_ARGS:-}} --out "$R/gap-base"
           stage gap "${T_GAP:-240}" $PY benchmarks/dev/decode_gap.py ${GAP_ARGS:-} --out "$R/gap" ;;
      ncu) [ -n "${BASE:-}" ] && PYTHONPATH="$BASE:$PYTHONPATH" stage ncu-base "${T_NCU:-240}" $PY \
                benchmarks/dev/decode_ncu.py ${NCU_ARGS:-} --out "$R/ncu-base"
           stage ncu "${T_NCU:-240}" $PY benchmarks/dev/decode_ncu.py ${NCU_ARGS:-} --out "$R/ncu" ;;
      host-parts) stage host-parts "${T_HOST_PARTS:-90}" $PY benchmarks/dev/decode_host_parts.py --out "$R/host-parts" ;;
      generate) stage generate "${T_GENERATE:-280}" $PY -m tpa.cli bench generate --preset small \
                --types ${GEN_TYPES:-tpa mha gqa mqa mla llama llama-mha llama-mqa} --contexts 32K --batch-sizes 1 8 \
                --new-tokens 64 --short-tokens 8 --cache-head-multiple ${GEN_PAD:-1 16} --time-budget "${GEN_BUDGET:-250}" \
                --output "$R/generate" ;;
      profile-generate) stage profile-generate "${T_PROF_GEN:-120}" $PY benchmarks/dev/profile_generate.py \
                --types ${PROF_GEN_TYPES:-tpa} --context 32768 --batch 1 8 --top 12 --out "$R/profile-generate" ;;
      host-step) stage host-step "${T_HOSTSTEP:-240}" bash -c "$PY benchmarks/dev/host_step.py --context 32768 --repeats 3 \
                --out $R/host_step && $PY benchmarks/dev/host_step.py --context 32768 --repeats 3 --replay fake --out $R/host_step_fake \
                && for i in 1 2 3; do $PY -m tpa.cli bench generate --preset small --types tpa mha mla llama --contexts 32K \
                --batch-sizes 1 --new-tokens 64 --short-tokens 8 --output $R/generate_b1_\$i; done" ;;
      train-compile) stage train-compile "${T_TRAIN:-420}" $PY -m tpa.cli bench train $TRAIN --loops model-compile \
                --reference llama --types ${TRAIN_TYPES:-all} --time-budget "${TRAIN_BUDGET:-400}" ${PROFILE:+--profile} \
                ${COMPILE_MODE:+--compile-mode $COMPILE_MODE} --output "$R/train-compile${COMPILE_MODE:+-$COMPILE_MODE}" ;;
      train-trainer) stage train-trainer "${T_TRAIN:-420}" $PY -m tpa.cli bench train $TRAIN --loops trainer \
                --compile on --types all --time-budget "${TRAIN_BUDGET:-400}" --output "$R/train-trainer" ;;
      official) stage official "${T_OFFICIAL:-160}" $PY benchmarks/dev/official_train.py --official-dir "$OFFICIAL" \
                --micro-batch 16 --seq-len 1024 --steps 20 --warmup 5 --out "$R/official" ${PROFILE:+--profile} ;;
      official-decode) stage official-decode "${T_OFFICIAL_DECODE:-170}" $PY benchmarks/dev/official_decode.py \
                --official-dir "$OFFICIAL" ${OFFDEC_ARGS:---d-model 2048} --time-budget "${OFFDEC_BUDGET:-140}" \
                --out "$R/official-decode" ;;
      profile-train) for t in ${PROFILE_TYPES:-tpa mha}; do
                stage profile-train-$t "${T_PROFILE:-150}" $PY -m tpa.cli train --preset small --attention-type $t \
                  --data-dir "$DATA" --vocab-size 50304 --global-batch-size 16 --micro-batch-size 16 --seq-len 1024 --max-steps 16 \
                  --warmup-steps 2 --eval-every 1000 --log-every 4 --compile --profile-steps 3 --no-export \
                  --run-dir "$R/profile-train-$t"; done ;;
      convert) stage convert "${T_CONVERT:-240}" $PY -m tpa.cli bench convert --data "$DATA" --preset mini \
                --ranks 1,2 --teacher-steps "${TEACHER_STEPS:-2000}" --output "$R/convert" ;;
      *) echo "unknown stage $s" ;;
    esac
  done
  date -u
} 2>&1 | tee "$OUT/log.txt"
