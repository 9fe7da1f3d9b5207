# The issue-15 GPU session on a 4-GPU host: 8B on GPU 0; 1B then 3B on GPU 1; a 70B-shaped model
# cut to 2 and 4 layers over GPUs 2+3 (model.device_map=auto). Started detached; poll with
#   bash scripts/.gpu_scale.sh poll
R=/tmp/res
if [ "$1" = "poll" ]; then
  sleep "${2:-500}"
  ls $R; for f in $R/*.log; do echo "== $f"; tail -c 600 $f | tr '\r' '\n' | grep -v '^\s*$' | tail -4; done
  nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader
  mkdir -p $OUT/r; cp $R/*.json $OUT/r/ 2>/dev/null
  for d in /tmp/w*/*/; do n=$(echo $d | tr '/' '_'); tail -c 3000 $d/run.log > $OUT/r/${n}tail.log 2>/dev/null; done
  cd $OUT && tar czf r.tgz r && rm -rf r
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 3
rm -rf /tmp/repo /tmp/res /tmp/w0 /tmp/w1 /tmp/w2; mkdir -p /tmp/repo && cp -r quantfix scripts conf pyproject.toml .tok .data /tmp/repo/ && cd /tmp/repo
export PYTHONPATH=/tmp/site:$PWD QUANTFIX_DATA=$PWD/.data QUANTFIX_CACHE=/tmp/qc HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p $R
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
free -g | head -2
B="python3 scripts/bench_scale.py --trials 3 --tokenizer /tmp/repo/.tok --budget-s 1500"; T=threads=20
setsid bash -c "CUDA_VISIBLE_DEVICES=0 $B --sizes 8b --work /tmp/w0 --out $R/scale_8b.json $T > $R/g0.log 2>&1; touch $R/done0" < /dev/null &
setsid bash -c "CUDA_VISIBLE_DEVICES=1 $B --sizes 1b 3b --work /tmp/w1 --out $R/scale_1b3b.json $T > $R/g1.log 2>&1; touch $R/done1" < /dev/null &
setsid bash -c "CUDA_VISIBLE_DEVICES=2,3 $B --sizes 70b --layers 2 4 --work /tmp/w2 --out $R/scale_70b_slices.json model.device_map=auto $T > $R/g2.log 2>&1; touch $R/done2" < /dev/null &
sleep 5; ls $R
