#!/bin/bash
# lease step (after run_build.sh): bench_restore for default and default-p side by side in one
# lease, then where a model-profile restore's GPU time goes
# (prof_untransform: stream-interleaved coefficient scratch vs natural order, vectorised store).
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
for P in ${PRESETS:-default default-p}; do
  timeout ${RT:-150} python3 benches/bench_restore.py --preset $P --reps 5 --no-sweep ${RARGS:-} --out $OUT/restore_$P.json > $OUT/restore_$P.log 2>&1
  echo "restore $P rc=$?"; grep "^|\|failed\|Error" $OUT/restore_$P.log | head -40
  echo "== t=$(( $(date +%s)-t0 ))"
done
timeout ${PT:-120} python3 benches/h200/prof_untransform.py smollm2 gemma3 > $OUT/prof_untransform.log 2>&1
echo "prof rc=$?"; grep -v "_warn\|UserWarn\|^---\|^ *Name\|Self CPU\|Self CUDA" $OUT/prof_untransform.log | grep -v "^ *$" | grep -v "cuda\|Memcpy\|Activity\|vectorized" | head -50
echo "== t=$(( $(date +%s)-t0 ))"
