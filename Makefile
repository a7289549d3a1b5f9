# slotlab: `make demo` trains the CPU demo, `make test` runs the test suite. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# A second `make demo` resumes (or, when finished, just re-evaluates) the run in runs/demo.
demo: $(STAMP)
	if [ -f runs/demo/checkpoints/last.pt ]; then $(BIN)/slotlab train --resume runs/demo; \
	else $(BIN)/slotlab train --preset sprites-cpu --out runs/demo; fi
	$(BIN)/slotlab eval runs/demo
	$(BIN)/slotlab report runs/demo
	@echo "demo run: runs/demo -- curves.png, eval/val-best/ (metrics.json, masks.png, slots.png), report.html"

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs/demo
