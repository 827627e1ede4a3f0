#!/bin/bash
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
[ -f /root/quality_gpu.json ] || cp benches/quality_gpu.json /root/quality_gpu.json   # resume: finished rows are skipped
timeout ${QT:-540} python3 benches/bench_quality_gpu.py --device cuda --out /root/quality_gpu.json > $OUT/quality.log 2>&1
echo "quality rc=$?"; cp /root/quality_gpu.json* /root/quality_gpu.md $OUT/ 2>/dev/null; tail -60 $OUT/quality.log
