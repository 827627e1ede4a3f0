#!/bin/bash
# Codec-only lease (carry .gpu-stage/wheels and .gpudata): packed parameters (EXT_PACKED) on the
# GPU: the v2 GPU tests, then bench_packed_gpu.py side by side (shipped / packed / packed + more tables).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-stage/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
if [ -z "$NOTEST" ]; then
  timeout ${TT:-200} python3 -m pytest -q -x ${TESTS:-tests/test_gpu_v2.py tests/test_vectors_v2.py tests/test_vectors_profile.py} 2>&1 | tail -5
  echo "== t=$(( $(date +%s)-t0 ))"
fi
timeout ${BT:-300} python3 benches/bench_packed_gpu.py --models ${MODELS:-gemma3} --preset ${PRESET:-tiny-p} \
  --tokens ${TOKS:-1024 8192} --variants ${VARS:-shipped,packed=packed_params=1,packed32=packed_params=1+tables_per_class=32,packed64=packed_params=1+tables_per_class=64} \
  --reps 20 --out $OUT/packed_gpu_${PRESET:-tiny-p}.json 2>&1 | grep -v '^{' | tail -30
echo "== t=$(( $(date +%s)-t0 ))"
