#!/bin/bash
# lease step (2026-12-05, twelfth session; after NOTEST=1 run_build.sh): the compact directory
# (EXT_COMPACT_DIR). GPU tests, then restore of the shipped profile presets (packed + compact
# + 64 tables) next to Gemma-3 tiny-p's earlier codec (stored parameters, u32 directory,
# 16 tables), then the decode call with and without the compact directory. One tarball back.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=/root/l13; mkdir -p $D; FINAL=$OUT; OUT=$D
trap 'tar czf $FINAL/lease13.tgz -C $D .' EXIT
t0=$(date +%s)
if [ -z "$NOTEST" ]; then
  timeout ${TT:-240} python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests/test_gpu_v2.py tests/test_vectors_v2.py \
    tests/test_vectors_profile.py tests/test_packed_params.py tests/test_compact_directory.py tests/test_ort_cuda.py} \
    > $OUT/pytest_gpu.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^ERROR" $OUT/pytest_gpu.log | tail -15
  echo "== t=$(( $(date +%s)-t0 ))"
fi
run() {  # name model preset [codec] [extra flag]
  timeout ${RT:-100} python3 benches/bench_restore.py --models $2 --preset $3 ${4:+--codec $4} $5 --reps 5 --no-sweep \
    --contexts 1024 8128 --out $OUT/restore_$1.json > $OUT/restore_$1.log 2>&1
  echo "restore $1 rc=$?"; grep "^|\|failed\|Error" $OUT/restore_$1.log | grep -v "^|---" | head -6
  echo "== t=$(( $(date +%s)-t0 ))"
}
if [ -n "$STEP2" ]; then   # second lease of the session: the deferred parameter pass A/B first
  run gemma3_tinyp gemma3 tiny-p
  run gemma3_tinyp_serial gemma3 tiny-p "" --serial-params
  run gemma3_tinyp_legacy gemma3 tiny-p packed_params=0,compact_directory=0,tables_per_class=16
  run gemma3_tinyp_b gemma3 tiny-p
  run gemma3_defaultp gemma3 default-p
else
run gemma3_tinyp gemma3 tiny-p
run gemma3_tinyp_legacy gemma3 tiny-p packed_params=0,compact_directory=0,tables_per_class=16
run gemma3_defaultp gemma3 default-p
run smollm2_defaultp smollm2 default-p
run smollm2_tinyp smollm2 tiny-p
fi
timeout ${BT:-120} python3 benches/bench_packed_gpu.py --models gemma3 --preset tiny-p --tokens 1024 8192 \
  --variants shipped,serial=defer=0,plaindir=compact_directory=0,legacy=packed_params=0+compact_directory=0+tables_per_class=16 \
  --reps 20 --out $OUT/packed_gpu_compact.json > $OUT/packed_gpu.log 2>&1
echo "packed_gpu rc=$?"; grep -v '^{' $OUT/packed_gpu.log | tail -8
echo "== t=$(( $(date +%s)-t0 ))"
