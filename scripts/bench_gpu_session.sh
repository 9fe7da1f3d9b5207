#!/usr/bin/env bash
# One GPU session (4 GPUs of one host): the quality benchmark (quantfix vs its peers at every budget,
# scripts/bench_repair.py sections as parallel processes) and the scale benchmark (bench_scale.py).
#   QUANTFIX_CACHE=... QUANTFIX_DATA=... scripts/bench_gpu_session.sh OUT [SECONDS_PER_STREAM]
# GPU 0: quantfix + AutoRound tuning at 4.25 and 4.5, AutoScheme iters=0 at the same budgets
# GPU 1: the same at 5.0 and 6.0
# GPU 2: AutoRound AutoScheme iters=200 at every budget, uniform RTN/GPTQ/AWQ; then bench_scale 1b 3b
# GPU 3: bench_scale 8b (alone on its GPU: its timings are the 8B row)
# The 135M-model processes share a GPU (each uses a fraction of it); with fewer than 4 GPUs the
# streams run one after another. BUDGETS and SCALE_SIZES override the defaults. Streams end in
# OUT/streams.txt; OUT/done is written at the end (run it under setsid to outlive one command).
set -u
out=$(realpath -m "${1:?usage: bench_gpu_session.sh OUT [SECONDS_PER_STREAM]}")
limit=${2:-1500}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"  # python -m quantfix must import this tree's package, not another one in the caller's cwd
py=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
ngpu=$(nvidia-smi -L | wc -l)
# convert the demo GGUF once, before parallel jobs read it
$py -c "from quantfix import source, cache; print(source.resolve('demo', cache.cache_dir()).path)"

stream() {  # stream GPU NAME ARGS...: one bench_repair section set on one GPU, bounded in time
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu AR_AUTO_SCHEME_CACHE=/tmp/ar-cache-$name timeout "$limit" \
    $py "$here/scripts/bench_repair.py" --device cuda --out "$out/part_$name.json" "$@" > "$out/$name.log" 2>&1
  echo "stream $name (GPU $gpu) exit $? at $(date +%T)" >> "$out/streams.txt"
}
scale() {  # scale GPU NAME SIZES...
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" $py "$here/scripts/bench_scale.py" --sizes "$@" \
    --budget-s $((limit - 120)) --work /tmp/quantfix-scale-$name --out "$out/scale_$name.json" > "$out/scale_$name.log" 2>&1
  echo "scale $name (GPU $gpu) exit $? at $(date +%T)" >> "$out/streams.txt"
}

read -r -a budgets <<< "${BUDGETS:-4.25 4.5 5.0 6.0}"
qf=(--sections quantfix --ladders "quantfix + AutoRound tuning")
if [ "$ngpu" -ge 4 ]; then
  for i in 0 1 2 3; do
    gpu=$((i / 2))
    stream $gpu "qf_${budgets[$i]}" "${qf[@]}" --budgets "${budgets[$i]}" &
    stream $gpu "as0_${budgets[$i]}" --sections autoscheme0 --budgets "${budgets[$i]}" &
  done
  (for b in "${budgets[@]}"; do stream 2 "ar200_$b" --sections autoscheme200 --budgets "$b" & done
   stream 2 uniform --sections uniform --budgets "${budgets[@]}" &
   wait
   scale 2 small ${SCALE_SMALL:-1b 3b}) &
  scale 3 large ${SCALE_SIZES:-8b} &
  wait
else
  for b in "${budgets[@]}"; do stream 0 "qf_$b" "${qf[@]}" --budgets "$b"; done
  stream 0 peers --sections uniform autoscheme0 autoscheme200 --budgets "${budgets[@]}"
  scale 0 all ${SCALE_SMALL:-1b 3b} ${SCALE_SIZES:-8b}
fi
cat "$out/streams.txt"
$py "$here/scripts/bench_repair.py" --merge "$out"/part_*.json --out "$out/repair.json"
touch "$out/done"
