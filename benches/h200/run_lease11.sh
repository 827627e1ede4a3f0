#!/bin/bash
# lease step (2026-12-03, eighth session; after run_build.sh with the GPU tests): restore of the
# new SmolLM2 default-p profile (70a81cc4) next to default, 1K and 8K. One tarball back.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=/root/l11; mkdir -p $D; FINAL=$OUT; OUT=$D
cp $FINAL/pytest_gpu.log $D/ 2>/dev/null
trap 'tar czf $FINAL/lease11.tgz -C $D .' EXIT
t0=$(date +%s)
for P in default default-p; do
  timeout ${RT:-100} python3 benches/bench_restore.py --models smollm2 --preset $P --reps 5 --no-sweep --contexts 1024 8128 \
    --out $OUT/restore_smollm2_$P.json > $OUT/restore_smollm2_$P.log 2>&1
  echo "restore smollm2 $P rc=$?"; grep "^|\|failed\|Error" $OUT/restore_smollm2_$P.log | grep -v "^|---" | head -4
  echo "== t=$(( $(date +%s)-t0 ))"
done
