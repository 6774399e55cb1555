#!/usr/bin/env bash
# Compression cost at scale on a bare GPU machine (Python 3.12, torch + transformers, no llmcompressor/lm-eval):
# builds a random-weight Qwen3-MoE of a real shape, then `python -m benchmarks.perf.compress_scale` runs the
# audit grid given as arguments and writes one record per checkpoint to $OUT/NAME.json (+ .outcomes.jsonl,
# the run log and a sampled stack profile). llmcompressor, lm-eval and their pure-Python dependencies come
# as wheels in .whl/ (docs/performance.md says how they were fetched), the data as a copy of the local mirror
# in .perfdata/. Usage: SHAPE=qwen3-moe-3b [LAYERS=4 FULL_LAYERS=48] NAME=... BUDGET=540 \
#   bash benchmarks/perf/compress_scale.sh <pytest audits options>
set -o pipefail
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
pip_install .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=8
out=${OUT:-compress-scale-out}
name=${NAME:-compress-scale}
shape=${SHAPE:-qwen3-moe-3b}
model=/tmp/model-$shape-${LAYERS:-all}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$out/$name.log"
python3 -m benchmarks.perf.random_model --shape "$shape" --out "$model" --device cuda ${LAYERS:+--layers $LAYERS} \
    2>&1 | tee -a "$out/$name.log" || exit 1
MOE_FBS_STACK_PROFILE="$out/$name-profile.txt" python3 -m benchmarks.perf.compress_scale --model "$model" \
    --out "$out/$name.json" --machine "${MACHINE:-h200}" ${BUDGET:+--budget-s $BUDGET} \
    ${FULL_LAYERS:+--full-layers $FULL_LAYERS} --cache-dir "/tmp/cache-$name" --report-dir "/tmp/report-$name" \
    -- --data-dir .perfdata --device cuda "$@" 2>&1 \
    | grep --line-buffered -v "it/s\]\|s/it\]\|examples/s\|Grid search\|Smoothing:\|Quantizing [0-9]* module" >> "$out/$name.log"
du -sh "/tmp/cache-$name" | tee -a "$out/$name.log"
tail -5 "$out/$name.log"
