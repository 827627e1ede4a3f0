#!/bin/bash
# lease step (2026-12-05, twelfth session, third lease; after NOTEST=1 run_build.sh): Gemma-3
# tiny-p restore at 8K: shipped (packed + compact, deferred parameter pass) three times,
# interleaved with the serial pass and the legacy codec twice each, then SmolLM2 tiny-p: medians
# over runs, not one run.
# PART=a|b|c runs a third of it (about 3 min each), so a call that dies with its machine loses
# one third, not all (2026-12-04: the machine stopped answering 6 min into the whole script and
# nothing came back). Without PART: all of it.
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=/root/l15; mkdir -p $D; FINAL=$OUT; OUT=$D
trap 'tar czf $FINAL/lease15${PART}.tgz -C $D .' EXIT
t0=$(date +%s)
run() {  # name model preset [codec] [flag]
  timeout ${RT:-60} python3 benches/bench_restore.py --models $2 --preset $3 ${4:+--codec $4} $5 --reps ${REPS:-9} --no-sweep \
    --contexts 8128 --out $OUT/restore_$1.json > $OUT/restore_$1.log 2>&1
  echo "restore $1 rc=$?"; grep "^| $2 | 8128 | [0-9]" $OUT/restore_$1.log | head -2
  echo "== t=$(( $(date +%s)-t0 ))"
}
L=packed_params=0,compact_directory=0,tables_per_class=16
# shipped (deferred parameter pass), the serial pass (--serial-params) and the legacy codec,
# interleaved: is the deferred pass's longer 8K call (bench_packed_gpu, RESULTS 17) real?
part() { [ -z "$PART" ] || [ "$PART" = "$1" ]; }
if part a; then run g_ship1 gemma3 tiny-p; run g_serial1 gemma3 tiny-p "" --serial-params; run g_legacy1 gemma3 tiny-p $L; fi
if part b; then run g_ship2 gemma3 tiny-p; run g_serial2 gemma3 tiny-p "" --serial-params; run g_legacy2 gemma3 tiny-p $L; fi
if part c; then run g_ship3 gemma3 tiny-p; run g_after gemma3 tiny-p "" --params-after; run s_tiny smollm2 tiny-p; run g_default gemma3 default-p; fi
