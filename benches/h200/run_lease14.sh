#!/bin/bash
# Codec-only call (carry .gpu-stage/wheels and .gpudata/gemma3_1k.npz): the v2 GPU tests and
# bench_packed_gpu.py (shipped, serial parameter pass, legacy codec) without the ORT parts.
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-stage/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout ${TT:-150} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_gpu_v2.py tests/test_vectors_v2.py \
  tests/test_vectors_profile.py tests/test_packed_params.py tests/test_compact_directory.py} > $OUT/pytest_gpu.log 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^ERROR" $OUT/pytest_gpu.log | tail -8
echo "== t=$(( $(date +%s)-t0 ))"
timeout ${BT:-120} python3 benches/bench_packed_gpu.py --models gemma3 --preset tiny-p --tokens 1024 8192 \
  --variants shipped,serial=defer=0,legacy=packed_params=0+compact_directory=0+tables_per_class=16 \
  --reps 20 --out $OUT/packed_gpu_r3.json 2>&1 | grep -v '^{' | tail -8
echo "== t=$(( $(date +%s)-t0 ))"
