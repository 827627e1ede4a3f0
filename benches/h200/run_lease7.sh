#!/bin/bash
# codec-only lease step (no ORT parts: carry .gpu-stage/wheels' two binary wheels + one
# .gpudata npz): where a profile restore's GPU time goes for MODEL, then (TESTS) the GPU test
# files that need no ORT session.
cd "$(dirname "$0")/../.."
t0=$(date +%s)
timeout ${PT:-90} python3 benches/h200/prof_untransform.py ${MODEL:-smollm2} > $OUT/prof_${MODEL:-smollm2}.log 2>&1
echo "prof rc=$?"; grep -E "^==|^  [a-z]|tolerance" $OUT/prof_${MODEL:-smollm2}.log | head -30
grep -E "v2_decode|untransform_store|gemm|bmm|sm80|sm90" $OUT/prof_${MODEL:-smollm2}.log | cut -c1-70,150-200 | head -6
echo "== t=$(( $(date +%s)-t0 ))"
[ -z "$TESTS" ] && exit 0
timeout ${TT:-200} python3 -m pytest -q -p no:cacheprovider -rs $TESTS > $OUT/pytest_gpu.log 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^ERROR" $OUT/pytest_gpu.log | tail -15
echo "== t=$(( $(date +%s)-t0 ))"
