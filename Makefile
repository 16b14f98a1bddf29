# The two commands of the README:
#   make run    install (if needed) and run the main job: train, evaluate, sample
#   make test   install (if needed) and run the test suite
# Both create or refresh .venv; with nothing changed a second call starts at once.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.glm-installed
WORKDIR ?= runs/default
GIN_FILE ?= configs/runs/default.gin
PYTEST_ARGS ?=

.PHONY: run eval test test-slow install clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/glm train --gin_file $(GIN_FILE) --workdir $(WORKDIR)

# glm's local zero-shot suite (lm-evaluation-harness) on the make-run model.
eval: $(STAMP)
	$(BIN)/glm eval --checkpoint $(WORKDIR)/model --tasks glm_zero_shot \
	    --output $(WORKDIR)/eval_zero_shot.json

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache runs
