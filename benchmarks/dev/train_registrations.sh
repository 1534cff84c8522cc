#!/bin/bash
# Training throughput of the small preset with the fused Q/K/V op under each registration and host-sync
# mode, then `tpa bench generate` at 128K for GQA and MLA (the 2026-11-23 runs under
# benchmarks/train-h100-2026-11-23/inductor_launch_deferred_reads/). From the repository root, on one GPU:
#   OUT=DIR DATA=data/shakespeare bash benchmarks/dev/train_registrations.sh
# DATA: token shards of `tpa data prepare shakespeare --output data/shakespeare`. The op's correctness on
# the GPU is a test: python -m pytest -m gpu tests/ops/test_gpu_kernels.py
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DATA=${DATA:-data/shakespeare}
C="--preset small --data-dir $DATA --vocab-size 50304 --micro-batch-size 16 --global-batch-size 16 --max-steps 70 --warmup-steps 10 --compile --precision bf16 --log-every 10 --eval-every 1000 --eval-sequences 16 --checkpoint-every 1000 --no-export --no-tensorboard --progress false"
run() {  # registration dir args...
  reg=$1; dir=$2; shift 2
  timeout -k 10 150 python3 -c "import sys; from tpa.ops import fused_materialize as fm; fm._REGISTRATION='$reg'; from tpa.cli import main; sys.exit(main(sys.argv[1:]))" train $C --run-dir $OUT/$dir "$@" 2>&1 | grep -v Warning | tail -n 2
}
run auto r_tpa --attention-type tpa
run auto r_mha --attention-type mha
run auto r_tpa_sync_step --attention-type tpa --host-sync step
run custom_op r_tpa_custom_op --attention-type tpa
rm -rf $OUT/r_*/checkpoints
python3 - <<'PY'
import json, os, statistics, glob
for d in sorted(glob.glob(os.path.join(os.environ["OUT"], "r_*"))):
    f = os.path.join(d, "metrics.jsonl")
    if not os.path.exists(f):
        print(d, "no metrics"); continue
    rows = [json.loads(l) for l in open(f)]
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    mfu = [r["mfu"] for r in rows if r.get("mfu")]
    mem = [r["memory_gb"] for r in rows if r.get("memory_gb")]
    print(os.path.basename(d), "windows", [round(x) for x in tps], "median after first", round(statistics.median(tps[1:])) if len(tps) > 1 else None, "mfu", round(statistics.median(mfu[1:]), 4) if len(mfu) > 1 else None, "mem", max(mem) if mem else None)
PY
timeout -k 10 200 python3 -m tpa.cli bench generate --preset small --types gqa mla --contexts 131072 --batch-sizes 8 --prefill-chunk 1024 --max-prompt-tokens 1048576 --time-budget 190 --output $OUT/gen 2>&1 | grep -v Warning | tail -n 8
