#!/bin/bash
# lease step: the first decode step (ORT profile, host profiles) + the pipelined-decode A/B
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 200 python3 benches/bench_step.py --models smollm2 gemma3 --reps 20 --out $OUT/step.json --profile-dir $OUT/prof > $OUT/step.log 2>&1
echo "step rc=$?"; grep '^{"model' $OUT/step.log | cut -c1-900
echo "== t=$(( $(date +%s)-t0 ))"
for v in --no-pipeline ""; do
timeout 150 python3 benches/bench_restore.py --models smollm2 --contexts 8128 --no-sweep --reps 5 $v --out $OUT/r${v:-pipe}.json > $OUT/r${v:-pipe}.log 2>&1
echo "restore $v rc=$?"; grep "^|" $OUT/r${v:-pipe}.log | tail -12
done
echo "== t=$(( $(date +%s)-t0 ))"
