#!/bin/bash
# lease step (after run_build.sh): kernel A/B with GPU-only kernel times (launches queued behind a
# GPU sleep), then restore vs recompute for every context with the default decoder.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout ${KT:-150} python3 benches/bench_decode_v2.py --tokens ${KTOK:-1024 8192} --cps 4 --sweep ${KSW:-32x1} \
  --kernels ${KK:-nested,nested-wide,flat} --gemma --reps 10 --check-max 8192 --out $OUT/decode_v2_kernels.json 2>&1 | grep "^|" | tail -40
echo "== t=$(( $(date +%s)-t0 ))"
timeout ${RT:-200} python3 benches/bench_restore.py --reps 5 --sweep-reps 3 ${RARGS:-} --out $OUT/restore_results.json > $OUT/restore.log 2>&1
echo "restore rc=$?"; grep "^|\|failed\|Error" $OUT/restore.log | head -40
echo "== t=$(( $(date +%s)-t0 ))"
