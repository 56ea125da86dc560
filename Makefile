# Two commands on a fresh machine: `make demo` and `make test`. The commands they install
# (gradwatch, tensorboard) live in .venv/bin: run them from there, or activate the venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test lint typecheck pytest browser bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The runtime install (torch pinned for development; the package itself allows torch>=2.1).
$(VENV)/.installed: $(BIN)/python setup.cfg setup.py pyproject.toml gradwatch/_kernels.c
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e . "$(TORCH_SPEC)"
	touch $@

# The plot extra (matplotlib): what `gradwatch plot`, which the demo suggests, needs.
$(VENV)/.plot: $(VENV)/.installed
	$(PIP) install -e ".[plot]" "$(TORCH_SPEC)"
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

demo: $(VENV)/.plot
	$(BIN)/gradwatch demo --logdir runs

lint: $(VENV)/.dev
	$(BIN)/ruff check $(wildcard gradwatch tests examples benchmarks)

typecheck: $(VENV)/.dev
	$(BIN)/mypy gradwatch

# the dashboard test drives a headless Chromium: installed when missing (apt's output goes
# to a log file; one line here, the log only when it fails)
browser:
	@.ci/install-chromium

pytest: $(VENV)/.dev browser
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile

test: lint typecheck pytest

bench: $(VENV)/.dev
	$(PIP) install -r benchmarks/requirements-peers.txt "$(TORCH_SPEC)" || echo "peers not installed: their rows are skipped"
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/modules.py
	$(BIN)/python benchmarks/interleaved.py --table
	$(BIN)/python benchmarks/breakdown.py
	$(BIN)/python benchmarks/anomaly.py
	$(BIN)/python benchmarks/flush.py
	$(BIN)/python benchmarks/compiled.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache build gradwatch/*.so
