#!/bin/bash
# lease step (2026-12-03, eighth session; after NOTEST=1 run_build.sh). STEP=1: the ulp-noise
# greedy floor (issue 12). STEP=2: restore of the new SmolLM2 default-p profile (277fdce0) next to
# default, Gemma-3 tiny-p at stream layouts 4/16 (shipped), 16/32, 32/32 (issue 13: x8 needs
# 32/32), and the decode kernel at cps 4/16/32. Everything goes into one tarball.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=/root/l10; mkdir -p $D; FINAL=$OUT; OUT=$D
trap 'tar czf $FINAL/lease10_step${STEP:-1}.tgz -C $D .' EXIT
t0=$(date +%s)
if [ "${STEP:-1}" = 1 ]; then
  Q=/root/quality_gpu.json; [ -f $Q ] || cp benches/quality_gpu.json $Q
  timeout ${GT:-300} python3 benches/bench_quality_gpu.py --device cuda --presets ulp-noise --windows 0 --out $Q > $OUT/ulp.log 2>&1
  echo "ulp rc=$?"; grep -v "^ *$" $OUT/ulp.log | tail -20; cp $Q /root/quality_gpu.md $OUT/ 2>/dev/null
  echo "== t=$(( $(date +%s)-t0 ))"
  exit 0
fi
for P in default default-p; do
  timeout ${RT:-100} python3 benches/bench_restore.py --models smollm2 --preset $P --reps 5 --no-sweep --contexts 1024 8128 \
    --out $OUT/restore_smollm2_$P.json > $OUT/restore_smollm2_$P.log 2>&1
  echo "restore smollm2 $P rc=$?"; grep "^|\|failed\|Error" $OUT/restore_smollm2_$P.log | grep -v "^|---" | head -12
  echo "== t=$(( $(date +%s)-t0 ))"
done
for L in 4/16 32/32 16/32; do
  timeout ${RT:-100} python3 benches/bench_restore.py --models gemma3 --preset tiny-p --layout $L --reps 5 --no-sweep --contexts 1024 8128 \
    --out $OUT/restore_gemma3_tinyp_${L/\//_}.json > $OUT/restore_gemma3_tinyp_${L/\//_}.log 2>&1
  echo "restore gemma3 tiny-p $L rc=$?"; grep "^|\|failed\|Error" $OUT/restore_gemma3_tinyp_${L/\//_}.log | grep -v "^|---" | head -12
  echo "== t=$(( $(date +%s)-t0 ))"
done
timeout ${DT:-60} python3 benches/bench_decode_v2.py --tokens 8192 --cps 4 16 32 --chunk 256 --sweep 32x1,64x2 \
  --reps 10 --gemma --out $OUT/decode_v2_cps.json > $OUT/decode_v2_cps.log 2>&1
echo "decode rc=$?"; grep "^|" $OUT/decode_v2_cps.log | head -20
echo "== t=$(( $(date +%s)-t0 ))"
