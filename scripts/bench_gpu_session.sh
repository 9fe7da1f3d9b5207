#!/usr/bin/env bash
# One GPU session of the quality benchmark: quantfix vs its peers at every budget
# (scripts/bench_repair.py sections spread over the visible GPUs, all on one host, same card type)
# and the demo loop on a GPU. Writes OUT/repair.json (merged), the per-section JSON and logs.
#   QUANTFIX_CACHE=... QUANTFIX_DATA=... scripts/bench_gpu_session.sh OUT [SECONDS_PER_STREAM]
# With 4 GPUs: quantfix | quantfix 4/8-bit + uniform | AutoScheme iters=0 + AutoRound iters=200 at
# 4.5 | AutoRound iters=200 at 5.0 + the demo. With fewer GPUs the streams run one after another.
# BUDGETS (default "4.5 5.0") sets the budgets.
set -u
out=$(realpath -m "${1:?usage: bench_gpu_session.sh OUT [SECONDS_PER_STREAM]}")
limit=${2:-560}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"  # python -m quantfix must import this tree's package, not another one in the caller's cwd
py=${PYTHON:-python3}
ngpu=$(nvidia-smi -L | wc -l)
# convert the demo GGUF once, before parallel jobs read it
$py -c "from quantfix import model as M; print(M.resolve('demo', M.cache_dir()).path)"

stream() {  # stream GPU NAME ARGS...: one bench_repair section set on one GPU, bounded in time
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu AR_AUTO_SCHEME_CACHE=/tmp/ar-cache-$name timeout "$limit" \
    $py "$here/scripts/bench_repair.py" --device cuda --out "$out/part_$name.json" "$@" > "$out/$name.log" 2>&1
  echo "stream $name (GPU $gpu) exit $?" >> "$out/streams.txt"
}
demo() {
  local run=/tmp/quantfix-demo-$$  # the checkpoint stays out of OUT; its report is copied
  CUDA_VISIBLE_DEVICES=$1 timeout 240 $py -m quantfix device=cuda hydra.run.dir="$run" > "$out/demo.log" 2>&1
  echo "demo (GPU $1) exit $?" >> "$out/streams.txt"
  cp "$run/report.json" "$out/demo_report.json" 2>/dev/null; cp "$run/report.md" "$out/demo_report.md" 2>/dev/null
}

budgets=${BUDGETS:-4.5 5.0}
if [ "$ngpu" -ge 4 ]; then
  stream 0 quantfix --sections quantfix --ladders quantfix --budgets $budgets &
  stream 1 quantfix48 --sections quantfix uniform --ladders "quantfix 4/8-bit" --budgets $budgets &
  (stream 2 as0 --sections autoscheme0 --budgets $budgets
   stream 2 ar200a --sections autoscheme200 --budgets ${budgets%% *}) &
  (stream 3 ar200b --sections autoscheme200 --budgets ${budgets#* }; demo 3) &
  wait
else
  stream 0 quantfix --sections quantfix --budgets $budgets
  stream 0 peers0 --sections uniform autoscheme0 --budgets $budgets
  demo 0
  stream 0 ar200 --sections autoscheme200 --budgets $budgets
fi
cat "$out/streams.txt"
$py "$here/scripts/bench_repair.py" --merge "$out"/part_*.json --out "$out/repair.json"
