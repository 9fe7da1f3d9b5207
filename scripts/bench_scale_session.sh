#!/usr/bin/env bash
# Issue 15's scale session on one 4-GPU host, started detached (it outlives the command that starts it):
#   scripts/bench_scale_session.sh start [WHEELS_DIR]   # copies this tree to /tmp/repo, runs detached
#   scripts/bench_scale_session.sh collect OUT [WAIT_S] # waits, prints progress, copies results to OUT
#   scripts/bench_scale_session.sh one WHEELS_DIR NAME BENCH_ARGS...  # one detached job on the visible GPUs
#       (e.g. `one .whl 8b --sizes 8b --profile threads=20`: quantfix overrides after the last flag;
#       results in /tmp/res/NAME.json, log NAME.log)
# GPU 0: 8B alone (its row is the 8B timing); GPU 1: 1B then 3B; GPUs 2+3: the 70B shape cut to 2 and
# 4 layers with model.device_map=auto (per-layer costs, extrapolated to 80). Needs a tokenizer dir in
# .tok (any HF tokenizer whose ids fit the vocabulary: the demo's) and the data in .data (QUANTFIX_DATA).
set -u
R=/tmp/res
if [ "${1:-}" = "collect" ]; then
  out=${2:?usage: collect OUT [WAIT_S]}; sleep "${3:-0}"
  ls $R; for f in $R/*.log; do echo "== $f"; tail -c 600 "$f" | tr '\r' '\n' | grep -v '^\s*$' | tail -4; done
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader
  mkdir -p "$out"; cp $R/*.json "$out"/ 2>/dev/null
  for d in /tmp/w*/*/; do n=$(echo "$d" | tr '/' '_'); tail -c 3000 "$d/run.log" > "$out/${n}tail.log" 2>/dev/null
    cp "$d/run.prof.txt" "$out/${n}prof.txt" 2>/dev/null; cp "$d/run/diagnosis.json" "$out/${n}diagnosis.json" 2>/dev/null; done
  exit 0
fi
if [ -n "${2:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$2"/*.whl \
    >/dev/null 2>&1 || exit 3
fi
# a copy: the detached runs must not read a tree that the next command replaces
if [ "${1:-}" = "one" ]; then  # keep earlier results of this machine: several jobs one after another
  mkdir -p $R; rm -rf /tmp/repo /tmp/w-$3; mkdir -p /tmp/repo
else
  rm -rf /tmp/repo $R /tmp/w0 /tmp/w1 /tmp/w2; mkdir -p /tmp/repo $R
fi
cp -r quantfix scripts conf pyproject.toml .tok .data /tmp/repo/ && cd /tmp/repo || exit 3
export PYTHONPATH=/tmp/site:$PWD QUANTFIX_DATA=$PWD/.data QUANTFIX_CACHE=/tmp/qc HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
B="python3 scripts/bench_scale.py --trials 3 --tokenizer /tmp/repo/.tok --budget-s 1500"; T=threads=20
if [ "${1:-}" = "one" ]; then
  name=$3; shift 3
  setsid bash -c "$B --work /tmp/w-$name --out $R/$name.json $* > $R/$name.log 2>&1; touch $R/done-$name" < /dev/null > /dev/null 2>&1 &
  sleep 5; ls $R; exit 0
fi
setsid bash -c "CUDA_VISIBLE_DEVICES=0 $B --sizes 8b --work /tmp/w0 --out $R/scale_8b.json $T > $R/g0.log 2>&1; touch $R/done0" < /dev/null > /dev/null 2>&1 &
setsid bash -c "CUDA_VISIBLE_DEVICES=1 $B --sizes 1b 3b --work /tmp/w1 --out $R/scale_1b3b.json $T > $R/g1.log 2>&1; touch $R/done1" < /dev/null > /dev/null 2>&1 &
setsid bash -c "CUDA_VISIBLE_DEVICES=2,3 $B --sizes 70b --layers 2 4 --work /tmp/w2 --out $R/scale_70b_slices.json model.device_map=auto $T > $R/g2.log 2>&1; touch $R/done2" < /dev/null > /dev/null 2>&1 &
sleep 5; ls $R
