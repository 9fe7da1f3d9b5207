#!/usr/bin/env bash
# The quality benchmark on ONE GPU as concurrent streams (bench_repair.py processes side by side):
#   QUANTFIX_CACHE=... QUANTFIX_DATA=... scripts/bench_repair_streams.sh OUT [SECONDS] [MODELS...]
# Per model: uniform RTN/GPTQ/AWQ; AutoScheme iters=0 and quantfix (search alone) from W4g64 at every
# budget (two streams each); at each TUNED budget (3.5 and 4.5) one stream each for quantfix from
# W3g64, AutoScheme iters=200 and quantfix + AutoRound tuning. Streams of one model share the GPU and its CPU
# cores, so seconds are comparable between rows of the same run only (the peer's rows run in the
# same contention). PER_BUDGET=1: one stream per budget for those rows; TUNED="": no slow rows.
# A quantfix stream waits for its peer stream's AutoScheme row (--peers-from) and runs again at the bits the
# peer landed at (matched bits). Each stream is cut at SECONDS; rows end in OUT/part_*.json as they finish;
# OUT/repair_<model>.json merges them; OUT/done at the end (run it under setsid).
# MARGIN=m: quantfix streams start at AutoScheme's accounting of the budget less m bits (autoscheme_bits in
# bench_repair.py), so the matched-bits row needs no wait for the peer. ONLY_TUNED=1: the TUNED rows only.
# UNIFORM_ALGS="gptq": which uniform roundings. W3="3.5 4.5": budgets of the W3g64-start rows.
# QF_OVERRIDE="loop.ladder=[2/64s,3/64s,...]": Hydra overrides for every quantfix row (space-separated).
set -u
out=$(realpath -m "${1:?usage: bench_repair_streams.sh OUT [SECONDS] [MODELS...]}")
limit=${2:-1500}
shift 2 2>/dev/null || shift $#
models=("${@:-demo}")
[ ${#models[@]} -eq 0 ] && models=(demo)
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
read -r -a budgets <<< "${BUDGETS:-3.0 3.5 4.0 4.5 5.0}"
read -r -a tuned <<< "${TUNED-3.5 4.5}"  # TUNED="" leaves the slow rows out
# W3="...": the budgets of the W3g64-start rows (default: the TUNED budgets; none with ONLY_TUNED=1)
w3_default="${TUNED-3.5 4.5}"; [ "${ONLY_TUNED:-0}" = 1 ] && w3_default=""
read -r -a w3 <<< "${W3-$w3_default}"
for m in "${models[@]}"; do  # convert each GGUF once, before parallel jobs read it
  $py -c "from quantfix import source, cache; print(source.resolve('$m', cache.cache_dir()).path)"
done

stream() {  # stream MODEL NAME ARGS...
  local m=$1 name=$2 extra=(); shift 2
  # a large vocabulary (Gemma: 262k) makes every window's log-probs 0.5 GB in float32: small batches,
  # and a top-1024 reference (the exact one would take 4.3 GB of RAM in each of seven processes);
  # so seven processes fit one card beside each other
  [ "$m" != demo ] && extra=(--eval-bs 4 --full-max-mb 1024 --override eval.batch_size=4)
  # the demo's 16-window batches hold 1.6 GB of log-probs each: 17 such processes filled an 80 GB card
  # (one died out of memory, 2026-12-05), so 8 windows a batch
  [ "$m" = demo ] && extra=(--eval-bs "${DEMO_EVAL_BS:-8}" --override "eval.batch_size=${DEMO_EVAL_BS:-8}")
  [ -n "${QF_OVERRIDE:-}" ] && read -r -a more <<< "$QF_OVERRIDE" && extra+=(--override "${more[@]}")
  AR_AUTO_SCHEME_CACHE=/tmp/ar-cache-$m-$name timeout "$limit" \
    $py "$here/scripts/bench_repair.py" --model "$m" --device cuda --out "$out/part_${m}_$name.json" "$@" "${extra[@]}" \
    > "$out/${m}_$name.log" 2>&1
  echo "$m $name exit $? at $(date +%T)" >> "$out/streams.txt"
}
# the streams start STAGGER seconds apart: 17 Gemma-3-270M streams computing their float reference at
# once need ~8 GB each for a moment, and six of them died out of memory on a 139 GB H200 (2026-12-05)
launch() { stream "$@" & sleep "${STAGGER:-8}"; }
half=$(( (${#budgets[@]} + 1) / 2 ))
for m in "${models[@]}"; do
  match=(); [ -n "${MARGIN:-}" ] && match=(--at-peer-accounting "$MARGIN")
  [ "${ONLY_TUNED:-0}" != 1 ] && launch "$m" uniform --sections uniform --budgets "${budgets[@]}" \
    --algs ${UNIFORM_ALGS:-rtn gptq awq}
  if [ "${ONLY_TUNED:-0}" = 1 ]; then
    :
  elif [ "${PER_BUDGET:-0}" = 1 ]; then  # a short lease: one stream per budget and row
    for b in "${budgets[@]}"; do
      launch "$m" "as0_$b" --sections autoscheme0 --budgets "$b"
      launch "$m" "qf_$b" --sections quantfix --ladders quantfix --starts W4g64 --budgets "$b" "${match[@]}" \
        --peers-from "$out/part_${m}_as0_$b.json"
    done
  else
    launch "$m" as0_lo --sections autoscheme0 --budgets "${budgets[@]:0:$half}"
    launch "$m" as0_hi --sections autoscheme0 --budgets "${budgets[@]:$half}"
    launch "$m" qf_lo --sections quantfix --ladders quantfix --starts W4g64 --budgets "${budgets[@]:0:$half}" "${match[@]}" \
      --peers-from "$out/part_${m}_as0_lo.json"
    launch "$m" qf_hi --sections quantfix --ladders quantfix --starts W4g64 --budgets "${budgets[@]:$half}" "${match[@]}" \
      --peers-from "$out/part_${m}_as0_hi.json"
  fi
  for b in "${w3[@]}"; do  # quantfix from the W3g64 start, against the AutoScheme iters=200 stream of its budget if any
    peer=(); [[ " ${tuned[*]} " == *" $b "* ]] && peer=(--peers-from "$out/part_${m}_as200_$b.json")
    launch "$m" "qf_w3_$b" --sections quantfix --ladders quantfix --starts W3g64 --budgets "$b" "${match[@]}" "${peer[@]}"
  done
  for b in "${tuned[@]}"; do  # the slow rows: one stream each
    launch "$m" "as200_$b" --sections autoscheme200 --budgets "$b"
    launch "$m" "qf_tuned_$b" --sections quantfix --ladders "quantfix + AutoRound tuning" --starts W4g64 --budgets "$b" \
      "${match[@]}" \
      --peers-from "$out/part_${m}_as200_$b.json"
  done
done
wait
cat "$out/streams.txt"
for m in "${models[@]}"; do
  ls "$out"/part_"${m}"_*.json >/dev/null 2>&1 && \
    $py "$here/scripts/bench_repair.py" --merge "$out"/part_"${m}"_*.json --out "$out/repair_$m.json" | tee "$out/table_$m.md"
done
touch "$out/done"
