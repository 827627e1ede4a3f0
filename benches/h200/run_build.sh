#!/bin/bash
# lease step: unpack staged ORT + models, build the fp16 CUDA graphs, run the GPU test files
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 .gpu-stage/unpack.py 2>&1 | tail -4
t0=$(date +%s)
python3 - <<'PY'
import time
from cachegen.ort import export_model
for m in ("smollm2", "gemma3"):
    t = time.perf_counter(); p = export_model(m, "fp16", "cuda", progress=False); print(m, p, f"{time.perf_counter()-t:.1f} s", flush=True)
PY
echo "== build t=$(( $(date +%s)-t0 ))"
[ -n "$NOTEST" ] && exit 0
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs ${TESTS:-tests/test_gpu_v2.py tests/test_vectors_v2.py tests/test_gpu.py tests/test_io.py tests/test_ort_cuda.py tests/test_profile.py tests/test_vectors_profile.py} > $OUT/pytest_gpu.log 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^ERROR" $OUT/pytest_gpu.log | tail -25
echo "== t=$(( $(date +%s)-t0 ))"
