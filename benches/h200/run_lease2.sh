#!/bin/bash
# lease step: first-step / CUDA-graph bench + restore vs recompute (all contexts) + the A/Bs
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 240 python3 benches/bench_step.py --models smollm2 gemma3 --reps 20 --out $OUT/step.json --profile-dir $OUT/prof > $OUT/step.log 2>&1
echo "step rc=$?"; grep '^{"model\|graph_error\|Error' $OUT/step.log | cut -c1-1500
tar czf $OUT/prof.tgz -C $OUT prof && rm -rf $OUT/prof
echo "== t=$(( $(date +%s)-t0 ))"
timeout ${RT:-330} python3 benches/bench_restore.py --reps 5 --sweep-reps 3 --out $OUT/restore_results.json > $OUT/restore.log 2>&1
echo "restore rc=$?"; grep "^|\|failed" $OUT/restore.log | head -40
echo "== t=$(( $(date +%s)-t0 ))"
timeout 100 python3 benches/bench_restore.py --models smollm2 --contexts 8128 --no-sweep --reps 5 --no-graph --out $OUT/r_nograph.json > $OUT/r_nograph.log 2>&1
echo "nograph rc=$?"; grep "^|" $OUT/r_nograph.log | head -4
echo "== t=$(( $(date +%s)-t0 ))"
