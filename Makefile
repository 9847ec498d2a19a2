# One command sets up and runs the tests; one sets up and runs the demo.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean

RUN ?= runs/digits

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev,test,metrics,plot,nir]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP) lint
	$(BIN)/pytest -q

# Trains the digits preset on this machine's CPU (minutes), samples 64 images, writes the grid.
demo: $(STAMP)
	$(BIN)/sddpm train --preset digits --out $(RUN) --force
	$(BIN)/sddpm sample --run $(RUN) --num 64 --sampler ddim --steps 50 --out $(RUN)/samples.png
	@echo "demo: samples in $(RUN)/samples.png, checkpoints in $(RUN)/checkpoints"

clean:
	rm -rf $(VENV) runs
