#!/bin/bash
# lease step (after run_build.sh; 2026-12-03): the profile presets' new codec layout
# (1,024-token chunks, one channel per stream) on the H200:
#  1. decode kernel A/B at 8K: cps 4 / chunk 256 (the standard presets) vs cps 1 / chunk 1024
#     (the profile presets), SmolLM2 and Gemma-3, bit-exact checked;
#  2. bench_restore for default and default-p side by side (the shipped profiles);
#  3. where a profile restore's GPU time goes (prof_untransform);
#  4. quality of default and the -p presets on the fp16 CUDA graphs (StaticKV restore).
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# at most 8 files come back: everything goes into one tarball (also when a step times out)
D=/root/l8; mkdir -p $D; FINAL=$OUT; OUT=$D
trap 'tar czf $FINAL/lease8.tgz -C $D .' EXIT
t0=$(date +%s)
timeout ${DT:-90} python3 benches/bench_decode_v2.py --tokens 8192 --cps 4 1 --chunk 256 1024 --sweep 32x1,64x2 \
  --reps 10 --gemma --out $OUT/decode_v2_chunk.json > $OUT/decode_v2_chunk.log 2>&1
echo "decode rc=$?"; grep "^|" $OUT/decode_v2_chunk.log | head -20
echo "== t=$(( $(date +%s)-t0 ))"
for P in ${PRESETS:-default default-p}; do
  timeout ${RT:-120} python3 benches/bench_restore.py --preset $P --reps 5 --no-sweep --contexts 1024 4096 8128 \
    --out $OUT/restore_$P.json > $OUT/restore_$P.log 2>&1
  echo "restore $P rc=$?"; grep "^|\|failed\|Error" $OUT/restore_$P.log | head -30
  echo "== t=$(( $(date +%s)-t0 ))"
done
timeout ${PT:-90} python3 benches/h200/prof_untransform.py smollm2 gemma3 > $OUT/prof_untransform.log 2>&1
echo "prof rc=$?"; grep -v "_warn\|UserWarn\|^---\|^ *Name\|Self CPU\|Self CUDA" $OUT/prof_untransform.log | grep -v "^ *$" | grep -v "cuda\|Memcpy\|Activity\|vectorized" | head -30
echo "== t=$(( $(date +%s)-t0 ))"
timeout ${QT:-300} python3 benches/bench_quality_gpu.py --device cuda --presets default,default-p,small-p,tiny-p \
  --contexts 1024,4096 --windows 4 --greedy-windows 0 --out $OUT/quality_p.json > $OUT/quality_p.log 2>&1
echo "quality rc=$?"; tail -30 $OUT/quality_p.log
echo "== t=$(( $(date +%s)-t0 ))"
