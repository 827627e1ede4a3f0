#!/bin/bash
# lease step (after run_build.sh): model-profile containers restored on the GPU (issue 13's
# restore target): the untransform A/B on profile-shaped caches, then bench_restore with default-p.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout ${UT:-90} python3 benches/rd_profile_gpu.py --device cuda --tokens 1024 8192 32768 --reps 7 2>&1 | tail -9
echo "== t=$(( $(date +%s)-t0 ))"
timeout ${RT:-200} python3 benches/bench_restore.py --preset ${PRESET:-default-p} --reps 5 --no-sweep ${RARGS:-} --out $OUT/restore_profile.json > $OUT/restore_profile.log 2>&1
echo "restore rc=$?"; grep "^|\|failed\|Error" $OUT/restore_profile.log | head -40
echo "== t=$(( $(date +%s)-t0 ))"
