#!/bin/bash
# lease step (2026-12-03, seventh session; after run_build.sh): greedy agreement of the new
# `high` (K10/V10, per-channel steps) and of `fine` (the former high) on the fp16 CUDA graphs
# first (issue 12's target), then high's teacher-forced rows. Resumable through /root/quality_gpu.json.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
Q=/root/quality_gpu.json
[ -f $Q ] || python3 - <<'PY'
import json
d = json.load(open("benches/quality_gpu.json"))
# window rows from before the rename (they record no config): the old high is today's fine;
# greedy rows record their config, so the old high ones would not count: drop them
for r in d["windows"]:
    if r["preset"] == "high":
        r["preset"] = "fine"
d["greedy"] = [r for r in d["greedy"] if r["preset"] != "high"]
json.dump(d, open("/root/quality_gpu.json", "w"), indent=1)
PY
timeout ${GT:-300} python3 benches/bench_quality_gpu.py --device cuda --presets high,fine --windows 0 --out $Q > $OUT/greedy.log 2>&1
echo "greedy rc=$?"; grep -v "^ *$" $OUT/greedy.log | tail -25
timeout ${QT:-240} python3 benches/bench_quality_gpu.py --device cuda --presets high --out $Q > $OUT/quality.log 2>&1
echo "quality rc=$?"; cp $Q /root/quality_gpu.md $OUT/ 2>/dev/null; tail -30 $OUT/quality.log
