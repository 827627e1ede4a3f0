#!/bin/bash
# Kernel-only lease step (codec profile: carry .gpu-stage/wheels and .gpudata): nested vs flat
# decode kernels side by side, the v2 GPU tests, then an ncu summary of the nested kernel.
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-stage/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout ${KT:-200} python3 benches/bench_decode_v2.py --tokens ${TOKS:-1024 8192 32768} --cps ${CPS:-4 8} \
  --sweep ${SWEEP:-32x1,64x2} --kernels ${KERNS:-nested,nested-wide,flat} --gemma --reps 10 --check-max 8192 \
  --out $OUT/decode_v2_kernels.json 2>&1 | grep -v "^case=" | tail -60
echo "== t=$(( $(date +%s)-t0 ))"
if [ -z "$NOTEST" ]; then
  timeout 150 python3 -m pytest -q -x tests/test_gpu_v2.py tests/test_vectors_v2.py tests/test_vectors_profile.py 2>&1 | tail -5
  echo "== t=$(( $(date +%s)-t0 ))"
fi
if [ -n "$NCU" ] && command -v ncu >/dev/null; then
  timeout ${NT:-120} ncu --clock-control none -k regex:v2_decode -c 2 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis \
    python3 benches/bench_decode_v2.py --tokens 8192 --cps 4 --sweep 32x1 --kernels nested,nested-wide,flat --reps 1 --check-max 0 \
    > $OUT/ncu.txt 2>&1
  echo "ncu rc=$?"; grep -E "v2_decode|Registers|Achieved Occupancy|Executed Ipc|Issue Slots|Warp Cycles Per Issued|Duration|L1/TEX Hit|L2 Hit|Executed Instructions " $OUT/ncu.txt | head -40
fi
echo "== t=$(( $(date +%s)-t0 ))"
