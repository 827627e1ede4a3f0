#!/bin/bash
# lease step: kernel sweep (real chunks) + restore vs recompute
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 150 python3 benches/bench_decode_v2.py --tokens 1024 8192 32768 --cps 4 8 --sweep 32x1,64x2,128x4 --gemma --reps 10 --check-max 8192 --out $OUT/decode_v2.json 2>&1 | grep "^|" 
echo "== t=$(( $(date +%s)-t0 ))"
timeout 400 python3 benches/bench_restore.py --reps 5 --sweep-reps 3 --out $OUT/restore_results.json > $OUT/restore.log 2>&1
echo "restore rc=$?"; tail -45 $OUT/restore.log
echo "== t=$(( $(date +%s)-t0 ))"
