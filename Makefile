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
# pytest-xdist workers: most tests are single-threaded XLA compiles, so two
# workers on two cores take about half the time of one. The default suite
# keeps each file on one worker (several share module fixtures); the slow one
# spreads single tests (its wide sweeps are one file) and keeps only the
# xdist_group-marked files (tests/test_parallel.py) whole.
TEST_WORKERS ?= 2

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
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache runs
