#!/bin/bash
# Codec-only call (carry .gpu-stage/wheels and .gpudata/gemma3_1k.npz): where the deferred
# parameter pass's longer 8K call comes from: side stream vs the same order on one stream, and
# the parameter pass launched after the data kernel (GpuDecoder.params_after).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-stage/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout ${BT:-100} python3 benches/bench_packed_gpu.py --models gemma3 --preset tiny-p --tokens 8192 1024 \
  --variants shipped,oneside=side=0,after=after=1,serial=defer=0,shipped2 --reps 30 --out $OUT/packed_gpu_side.json 2>&1 | grep -v '^{' | tail -8
