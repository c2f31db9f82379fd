# Set-up and the everyday jobs. `make demo` and `make test` create .venv if it is missing.
#
# torch is installed first, pinned, so that no resolver pulls a multi-GB CUDA build where a CPU wheel
# is wanted; an environment that already has torch keeps it (TORCH_SPEC= to skip, or set your own).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: install test test-kernels demo bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || [ -z "$(TORCH_SPEC)" ] || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# pytest exits 5 when it collected no test: that is neither a pass nor an ordinary failure, and is
# reported as such (and fails the target, since this project always has tests).
test: install
	@$(PY) -m pytest -q -rs $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests (exit 5) - the suite is missing"; fi; \
	exit $$status
	@$(MAKE) --no-print-directory test-kernels

# The numerics tests again with PyTorch's scalar and AVX2 kernels forced (on x86; elsewhere the setting
# falls back to what the CPU has): a tolerance that only this machine's vector width meets fails here.
NUMERICS_TESTS := tests/test_model_parity.py tests/test_diffusion_parity.py tests/test_sampling.py tests/test_inception_parity.py tests/test_sit_parity.py tests/test_flow.py tests/test_objectives.py tests/test_meanflow.py
test-kernels: install
	@for capability in default avx2; do \
	  echo "make test-kernels: ATEN_CPU_CAPABILITY=$$capability"; \
	  ATEN_CPU_CAPABILITY=$$capability $(PY) -m pytest -q -p no:cacheprovider $(wildcard $(NUMERICS_TESTS)) || exit $$?; \
	done

demo: install
	$(PY) -m fastdit demo --out $(DEMO_OUT)

bench: install
	$(PY) benchmarks/bench_train.py

# One CUDA GPU, under 8 minutes: the gpu tests, the bench rows, DiT-XL/2's memory with checkpointing, a
# compiled bf16 training run with a resume, and sample-ddp; one report (benchmarks/gpu_check.sh).
GPU_CHECK_REPORT ?= gpu-check-report.md
gpu-check: install
	bash benchmarks/gpu_check.sh --python $(PY) --out $(GPU_CHECK_REPORT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
