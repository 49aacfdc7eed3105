# make demo : set up, train the default Fashion-MNIST model, sweep resolutions, print the table, write the plot
# make test : set up, run the test suite
PY := .venv/bin/python
# test processes: one per core of a 2-core CI machine (each worker runs torch on one thread)
TEST_WORKERS ?= 2

.PHONY: setup demo test bench gpu-check
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) train.py
	$(PY) eval_resolution.py

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

bench: setup
	$(PY) benchmarks/throughput.py

# one CUDA GPU, <= 8 min: every backend vs math, bf16 training, speed and memory vs timm -> benchmarks/results/gpu
gpu-check: setup
	$(PY) benchmarks/gpu_check.py
