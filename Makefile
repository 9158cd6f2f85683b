# nest_ssl developer commands. Every target installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

DEMO_DIR ?= demo_out
# One intra-op thread: the tiny demo model gains nothing from more, and on a busy machine two spinning threads
# made 100 steps 8-15x slower (README, Quick start).
DEMO_THREADS ?= 1

.PHONY: install test test-numerics lint demo probe-demo bench bench-train bench-data kernel-report gpu-check clean

install: $(STAMP)

# Re-runs only when setup.py or the pins change, so a second `make install` takes seconds. Not quiet: the first
# install downloads ~4.8 GB (torch's CUDA build), and pip's lines and progress bars show that it is alive.
$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Kernel tests run on CPU through Triton's interpreter.
test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS) tests

# The numerics tests (-m numerics: golden losses, NeMo parity, kernel vs torch) again under another CPU dispatch than
# `make test` used, so a tolerance that only holds for this CPU's rounding fails here and not on a user's machine.
# With AVX-512 the default is AVX-512 and AVX2 differs; without it the default is AVX2, so drop to no ATen SIMD
# kernels and SSE4.1 oneDNN convolutions instead.
test-numerics: install
	@if grep -q avx512f /proc/cpuinfo 2>/dev/null; \
	then dispatch="ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"; \
	else dispatch="ATEN_CPU_CAPABILITY=default DNNL_MAX_CPU_ISA=SSE41"; fi; \
	env $$dispatch $(BIN)/python -c 'import torch; print("numerics tests under '"$$dispatch"' (ATen:", \
		torch.backends.cpu.get_cpu_capability() + ")")' && \
	env $$dispatch TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2 -m numerics $(PYTEST_ARGS) tests

lint: install
	$(BIN)/ruff check .

# A bare machine to a pretrained tiny model: synthetic corpus + noise, then a few minutes of CPU pretraining.
demo: install
	$(BIN)/python scripts/make_demo_data.py --out $(DEMO_DIR)/data
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/python scripts/pretrain.py --config configs/nest_tiny_cpu.yaml \
		model.train_ds.manifest_filepath=$(DEMO_DIR)/data/train_manifest.json \
		model.train_ds.noise_manifest=$(DEMO_DIR)/data/noise_manifest.json \
		model.validation_ds.manifest_filepath=$(DEMO_DIR)/data/val_manifest.json \
		model.validation_ds.noise_manifest=$(DEMO_DIR)/data/noise_manifest.json \
		exp_manager.exp_dir=$(DEMO_DIR)/experiments
	@echo "TensorBoard: $(BIN)/tensorboard --logdir $(DEMO_DIR)/experiments"

# Frozen-encoder probe on a synthetic labelled corpus: a random-init encoder vs the `make demo` model (trained first
# when there is none), CTC character CER/WER and speaker accuracy.
probe-demo: install
	test -n "$$(find $(DEMO_DIR)/experiments -name '*.nemo' 2>/dev/null)" || $(MAKE) demo
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/python scripts/probe.py --demo --demo-dir $(DEMO_DIR)/probe \
		--demo-runs $(DEMO_DIR)/experiments

# Kernel micro-benchmarks (Triton rows need a CUDA GPU; on CPU only the torch providers run).
bench: install
	$(BIN)/python kernels/bench.py

# Whole NEST training step, eager vs Triton kernels (needs a GPU for the headline figures).
BENCH_TRAIN_ARGS ?= --modes eager,triton,triton+compile
bench-train: install
	$(BIN)/python scripts/benchmark_train.py $(BENCH_TRAIN_ARGS)

# Data paths on generated files: native manifest / tarred loaders vs Lhotse cuts / Shar (and NeMo's Lhotse path where
# NeMo is installed), interleaved repeats; the stages table too by default.
bench-data: install
	$(BIN)/python scripts/benchmark_data.py $(BENCH_DATA_ARGS)

# sm_90 compile report of every kernel launch the shipped configs make (no GPU needed; tens of minutes of CPU):
# kernels/results/sm90_static.csv
kernel-report: install
	PYTHONPATH=. $(BIN)/python kernels/static_report.py

# The one GPU check (CUDA GPU, no network, no install: installed torch/triton, repo root on PYTHONPATH); < 8 minutes.
GPU_CHECK_OUT ?= gpu_check_out
gpu-check:
	PYTHON=$${PYTHON:-python3} scripts/gpu_check.sh $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
