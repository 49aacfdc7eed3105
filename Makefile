# make demo : set up, train the default Fashion-MNIST model, sweep resolutions, print the table, write the plot
# make test : set up, run the test suite
PY := .venv/bin/python

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) train.py
	$(PY) eval_resolution.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/throughput.py
