#!/usr/bin/env bash
# Runs benchmarks.perf.gpu_suite on a bare GPU machine (Python 3.12, torch + transformers, no lm-eval):
# lm-eval and its pure-Python dependencies come as wheels in .whl/ (docs/performance.md says how they were
# fetched), the benchmark data as a copy of the local mirror in .perfdata/. Arguments go to gpu_suite.
set -o pipefail
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
pip_install .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c "import sacrebleu" 2>/dev/null || pip_install .whl/extra/*.whl || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
out=${OUT:-perf-out}
mkdir -p "$out"
python3 -m benchmarks.perf.gpu_suite --data-dir .perfdata --out "$out" "$@" 2>&1 \
    | grep --line-buffered -v "it/s\]\|s/it\]\|examples/s" | tee "$out/log.txt"
