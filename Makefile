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

.PHONY: run eval test test-slow test-numerics install clean reproduce

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

# Both suites under other CPU numerics, as another machine would compute
# them: XLA's own dot kernels instead of YNNPACK's (whose kernels are picked
# per CPU at run time), fast-math reassociation (NaN and Inf kept), one core
# per test worker, and no persistent compilation cache (CACHE=true keeps
# it). A test that passes only by this machine's rounding fails here.
NUMERICS_XLA_FLAGS ?= --xla_cpu_experimental_ynn_fusion_type= --xla_cpu_enable_fast_math=true
CACHE ?= false
test-numerics: $(STAMP)
	XLA_FLAGS="$(NUMERICS_XLA_FLAGS)" GLM_TEST_ONE_CORE=1 \
	    JAX_ENABLE_COMPILATION_CACHE=$(CACHE) $(MAKE) -k test test-slow

# REPRODUCTION.md: every claim's sweep (configs/ablations/<name>.yaml) into
# runs/ablations/<name>/, its table and plots copied to reproduction/<name>/,
# then INT8 / INT4 on the models the sweeps trained. CLAIMS picks some;
# SWEEP_ARGS scales them (e.g. SWEEP_ARGS="--gin.TRAIN_STEPS=4000").
CLAIMS ?= positions embedding_stability deepnorm glm_vs_causal ul2_vs_causal isoflop
PARALLEL ?= 2
SWEEP_ARGS ?=
reproduce: $(STAMP)
	@for c in $(CLAIMS); do \
	  $(BIN)/glm sweep --sweep configs/ablations/$$c.yaml \
	      --workdir runs/ablations/$$c --parallel $(PARALLEL) $(SWEEP_ARGS) \
	    && mkdir -p reproduction/$$c \
	    && cp runs/ablations/$$c/results.md runs/ablations/$$c/results.jsonl \
	          runs/ablations/$$c/*.png reproduction/$$c/ \
	    && if [ -f runs/ablations/$$c/isoflop.json ]; then \
	         cp runs/ablations/$$c/isoflop.json reproduction/$$c/; fi \
	    || exit 1; \
	done
	$(BIN)/python benchmarks/quantize.py --seq_len 64 \
	    --out reproduction/quantization/quantize.json \
	    --model bloom_seed0=runs/ablations/positions/position=alibi_seed=0/model:causal_lm \
	    --model bloom_seed1=runs/ablations/positions/position=alibi_seed=1/model:causal_lm \
	    --model glm_seed0=runs/ablations/glm_vs_causal/mixture=GLM-VS-CAUSAL_seed=0/model:glm_blank_infilling \
	    --model glm_seed1=runs/ablations/glm_vs_causal/mixture=GLM-VS-CAUSAL_seed=1/model:glm_blank_infilling \
	    --model ul2_seed0=runs/ablations/ul2_vs_causal/mixture=UL2-VS-CAUSAL_seed=0/model:causal_lm

clean:
	rm -rf $(VENV) .cache runs
