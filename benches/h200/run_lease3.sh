#!/bin/bash
# lease step (after run_build.sh): kernel A/B (nested / nested-wide / flat), restore vs recompute
# with the default (nested) kernel, and the 8K A/B of bench_restore with the flat kernel.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout ${KT:-170} python3 benches/bench_decode_v2.py --tokens 1024 8192 --cps 4 8 --sweep 32x1,64x2 \
  --kernels nested,nested-wide,flat --gemma --reps 10 --check-max 8192 --out $OUT/decode_v2_kernels.json 2>&1 | grep "^|" | tail -60
echo "== t=$(( $(date +%s)-t0 ))"
timeout ${RT:-200} python3 benches/bench_restore.py --reps 5 --sweep-reps 3 --out $OUT/restore_results.json > $OUT/restore.log 2>&1
echo "restore rc=$?"; grep "^|\|failed\|Error" $OUT/restore.log | head -40
echo "== t=$(( $(date +%s)-t0 ))"
timeout 60 python3 benches/bench_restore.py --models smollm2 --contexts 8128 --no-sweep --reps 5 --kernel flat --out $OUT/r_flat_s.json > $OUT/r_flat_s.log 2>&1
timeout 60 python3 benches/bench_restore.py --models gemma3 --contexts 8192 --no-sweep --reps 5 --kernel flat --out $OUT/r_flat_g.json > $OUT/r_flat_g.log 2>&1
echo "flat rc=$?"; grep -h "^|" $OUT/r_flat_s.log $OUT/r_flat_g.log | head -8
echo "== t=$(( $(date +%s)-t0 ))"
