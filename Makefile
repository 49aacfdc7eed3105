# make demo : set up, then the quick study (configs/study/fmnist_quick.yaml): learned APE and RoPE-Mixed trained side
#             by side (two processes, one thread each), swept, compared with intervals, plots written
# make test : set up, run the test suite
PY := .venv/bin/python
# test processes: one per core of a 2-core CI machine (each worker runs torch on one thread)
TEST_WORKERS ?= 2

.PHONY: setup demo test bench gpu-check
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m visionpe.study run --config configs/study/fmnist_quick.yaml --workers 2
	@echo "The full Fashion-MNIST study (every encoding, 3 seeds, a fixed 2,000-image test subset; its first line says"
	@echo "how many of its jobs have finished): benchmarks/results/fmnist_study/report/leaderboard.md,"
	@echo "  anchors.md (published claims) and recipes.md (which training recipe helps which encoding)"

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

bench: setup
	$(PY) benchmarks/throughput.py

# one CUDA GPU, <= 8 min: every backend vs math, bf16 training, speed and memory vs timm -> benchmarks/results/gpu
gpu-check: setup
	$(PY) benchmarks/gpu_check.py
