# Set-up and the everyday jobs. Every target creates .venv if it is missing and installs what it needs.
#
# One install story for every target: the interpreter, then torch pinned, then fastdit with the extra that
# target needs (`demo`, `test`, `app`, `notebook`). Because torch is already there when an extra is
# installed, pip keeps it, and no resolver pulls a multi-GB CUDA build where a CPU wheel is wanted; an
# environment that already has torch keeps its own (TORCH_SPEC= to skip, or set your own).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: install test test-kernels demo app notebook bench gpu-check clean

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || [ -z "$(TORCH_SPEC)" ] || $(PY) -m pip install -q "$(TORCH_SPEC)"
	touch $@

# .venv/.installed-demo, -test, -app, -notebook: fastdit (editable) with that extra, again when pyproject.toml changes
$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[$*]"
	touch $@

install: $(VENV)/.installed-test

# pytest exits 5 when it collected no test: that is neither a pass nor an ordinary failure, and is
# reported as such (and fails the target, since this project always has tests).
test: $(VENV)/.installed-test
	@$(PY) -m pytest -q -rs $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests (exit 5) - the suite is missing"; fi; \
	exit $$status
	@$(MAKE) --no-print-directory test-kernels

# The numerics tests again with PyTorch's scalar and AVX2 kernels forced (on x86; elsewhere the setting
# falls back to what the CPU has): a tolerance that only this machine's vector width meets fails here.
NUMERICS_TESTS := tests/test_model_parity.py tests/test_diffusion_parity.py tests/test_sampling.py tests/test_inception_parity.py tests/test_sit_parity.py tests/test_sit_paths.py tests/test_rae_model_parity.py tests/test_train_decoder_parity.py tests/test_rae_latent_decoder.py tests/test_rae_latent_space.py tests/test_flow.py tests/test_objectives.py tests/test_meanflow.py tests/test_evaluate_guards.py tests/test_evaluate_more_metrics.py
test-kernels: $(VENV)/.installed-test
	@for capability in default avx2; do \
	  echo "make test-kernels: ATEN_CPU_CAPABILITY=$$capability"; \
	  ATEN_CPU_CAPABILITY=$$capability $(PY) -m pytest -q -p no:cacheprovider $(wildcard $(NUMERICS_TESTS)) || exit $$?; \
	done

demo: $(VENV)/.installed-demo
	$(PY) -m fastdit demo --out $(DEMO_OUT)

# The page, on the digits model `make demo` wrote (run that first; the page says so otherwise).
app: $(VENV)/.installed-app
	$(PY) -m fastdit app --demo-out $(DEMO_OUT)

# Jupyter on the quick-start notebook, which loads the demo's checkpoint from $(DEMO_OUT) when it is there.
notebook: $(VENV)/.installed-notebook
	$(PY) -m jupyter notebook notebooks/quickstart.ipynb

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_train.py

# One CUDA GPU, under 8 minutes: the gpu tests, a compiled bf16 training run with a resume, sample-ddp, a
# 2-process DDP run where two GPUs are visible, and the bench figures; one report, markdown and JSON
# (benchmarks/gpu_check.sh; GPU_CHECK_ARGS="--dry-run" shows the plan).
GPU_CHECK_REPORT ?= gpu-check-report.md
gpu-check: install
	bash benchmarks/gpu_check.sh --python $(PY) --out $(GPU_CHECK_REPORT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
