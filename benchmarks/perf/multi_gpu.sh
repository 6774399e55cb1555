#!/usr/bin/env bash
# The multi-GPU audit run (issue 11, docs/performance.md): `pytest audits -n 2` and `-n 1` over the same grid of a
# mid-size random-weight Qwen3-MoE, each from an empty cache, then `python -m reports.compare` on the two reports.
# Runs on a bare GPU machine (Python 3.12, torch + transformers + pytest-xdist, no lm-eval): lm-eval and its
# pure-Python dependencies come as wheels in .whl/, the data as a copy of the local mirror (with the calibration
# pools) in the folder given by DATA (default .perfdata). Usage: bash benchmarks/perf/multi_gpu.sh [WORKERS...]
# (default "2 1"); extra pytest arguments in AUDIT_EXTRA. Writes to $OUT at most 8 flat files (what the device
# tool returns): summary.txt, pytest-nN.log, smi-nN.csv and results-nN.json per run; full reports under /tmp.
set -o pipefail
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
pip_install .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c "import sacrebleu" 2>/dev/null || pip_install .whl/extra/*.whl || exit 1
# NVLink multicast stays off on shared several-GPU hosts (KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
out=${OUT:-multi-gpu-out}
data=${DATA:-.perfdata}
model=${MODEL_DIR:-/tmp/qwen3-moe-3b}
mkdir -p "$out"
summary="$out/summary.txt"
nvidia-smi -L | tee "$summary"
python3 -m benchmarks.perf.random_model --shape qwen3-moe-3b --out "$model" --device cuda || exit 1
# The grid: REAP and HC-SMoE at 50%, each calibrated with 0% and 100% safety data (4 checkpoints).
grid=(--methods reap,hcsmoe --ratios 0.5 --safety-fractions 0,1.0 --calibration small --limit 100
      --benchmarks bbq,crows_pairs,xstest,advbench,drift --drift-prompts 4 --drift-tokens 50)
for workers in "${@:-2 1}"; do
    for n in $workers; do
        rm -rf "/tmp/cache-n$n" "/tmp/report-n$n"
        nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -lms 1000 \
            > "$out/smi-n$n.csv" &
        smi=$!
        started=$(date +%s.%N)
        python3 -m pytest audits -p no:cacheprovider --model "$model" --data-dir "$data" "${grid[@]}" \
            --cache-dir "/tmp/cache-n$n" --report-dir "/tmp/report-n$n" -n "$n" -rN $AUDIT_EXTRA 2>&1 \
            | grep --line-buffered -v "it/s\]\|s/it\]\|examples/s" > "$out/pytest-n$n.log"
        status=$?
        ended=$(date +%s.%N)
        kill "$smi"
        cp "/tmp/report-n$n/results.json" "$out/results-n$n.json"
        echo "workers $n: exit $status, wall $(python3 -c "print(round($ended - $started, 1))") s" | tee -a "$summary"
        grep "^worker \|moe-fbs-audit: " "$out/pytest-n$n.log" | tee -a "$summary"
        python3 -m benchmarks.perf.smi_summary "$out/smi-n$n.csv" | tee -a "$summary"
        python3 -m benchmarks.perf.cache_times "/tmp/cache-n$n" | tee -a "$summary"
    done
done
if [ -f "$out/results-n1.json" ] && [ -f "$out/results-n2.json" ]; then
    python3 -m reports.compare "$out/results-n2.json" "$out/results-n1.json" | tee -a "$summary"
fi
