# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# --isolated skips a local pip config (a CPU-only torch wheel) that clashes with the registry's
# torchvision; constraints.txt pins a matching torch/torchvision pair.
PIP := $(BIN)/pip install --isolated --progress-bar off

.PHONY: install demo lint test bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) -c constraints.txt -e ".[dev]"
	$(BIN)/python -c "import liaf_lab; print('liaf_lab', liaf_lab.__version__, 'with working torchvision ops')"
	touch $@

demo: install
	$(BIN)/liaf-lab demo --out runs/demo

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_liaf_loss.py

clean:
	rm -rf $(VENV) runs
