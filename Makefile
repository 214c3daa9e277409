# qoq: the two commands the README opens with.
#   make demo   set up the environment, train DRPO with vLLM rollouts on the embedded demo data, evaluate
#   make test   set up the environment, run the default test suite
VENV ?= .venv
QOQ = $(VENV)/bin/qoq
PY = $(VENV)/bin/python

.PHONY: setup lock demo test test-slow test-gpu bench clean

setup:
	@bash scripts/setup.sh $(VENV)

# Re-resolve the package ranges in a throwaway venv and rewrite requirements/lock-cpu.txt (deliberately).
lock:
	bash scripts/lock.sh

demo: setup
	$(QOQ) fit --config configs/demo_sft.yaml
	$(QOQ) fit --config configs/demo.yaml
	$(QOQ) test --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slow

test-gpu: setup
	$(PY) -m pytest -q -p no:cacheprovider -m gpu

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf runs lightning_logs
