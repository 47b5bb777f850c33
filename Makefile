# The README's two commands:   make run    (set up + main job on the embedded default)
#                              make test   (set up + the test suite, network cut off but loopback)
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/tiny.yaml
PYTEST_ARGS ?=
export PATH := $(abspath $(BIN)):$(PATH)
export DS_ACCELERATOR ?= cpu

.PHONY: setup run build train concepts test test-fast test-rebuild world world-check bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# main job on the embedded default: the synthetic world's models (kept in git), a check of every role, then the
# CAFE loop: round 0 → train → evaluate → round 1 (Eq. 4) → train on the union → evaluate → report. Re-running
# skips every finished stage (`cafe pipeline plan $(CONFIG)` says what would run and why).
run: setup
	$(BIN)/cafe models check $(CONFIG)
	$(BIN)/cafe pipeline run $(CONFIG)

# the round-0 build alone (its report shows the oracle beside the filter)
build: setup
	$(BIN)/cafe build $(CONFIG)

# after `make build`: train PromptNet, the MLLM and the conditioned diffusion model on the build's dataset
# (a couple of minutes each on 2 cores), then ask the assistant for one image
train: setup
	$(BIN)/cafe train promptnet $(CONFIG)
	$(BIN)/cafe train mllm $(CONFIG)
	$(BIN)/cafe train diffusion $(CONFIG)
	$(BIN)/cafe generate --config $(CONFIG) --image "models/world/sources/circle/red-circle-none__striped-left-large-solid.png" \
	  --text "Can you generate an image for this circle on the right?" --out outputs/generate

# per-concept jobs on the world's t2i (ICO + Infusion, ~30 s on 2 cores), then images with and without DCI and two
# Infusion concepts in one prompt, and the metrics of one concept; then EM concept masks on two world scenes
concepts: setup
	$(BIN)/cafe concepts run configs/concepts/tiny.yaml
	$(BIN)/cafe concepts generate --concept cyan-circle --method ico --prompt "a {} on the right"
	$(BIN)/cafe concepts generate --concept cyan-circle --method ico --prompt "a {} on the right" --dci --lambda 0.5
	$(BIN)/cafe concepts generate --concept cyan-circle --concept blue-star --method infusion --prompt "a circle and a star"
	$(BIN)/cafe concepts eval --concept cyan-circle --method ico
	$(BIN)/cafe concepts run configs/concepts/em.yaml
	$(BIN)/cafe concepts masks --config configs/concepts/em.yaml --concept heart-triangle
	$(BIN)/cafe concepts generate --config configs/concepts/em.yaml --concept heart-triangle --prompt "a photo of [v1] and [v2]"

# the synthetic world: retrain what changed (about 20 min on 2 cores from scratch) / re-measure every gate
world: setup
	$(BIN)/cafe world make models/world --threads 2

world-check: setup
	$(BIN)/cafe world check models/world

# the slow reproduction test: `cafe world make` from scratch must reproduce the shipped gate figures
test-rebuild: setup
	$(BIN)/python -m pytest -m rebuild $(PYTEST_ARGS)

# the whole suite inside a network namespace that has only loopback (needs root; else the
# in-process guard in tests/conftest.py still refuses non-loopback connections)
test: setup
	@if unshare -n true 2>/dev/null; then \
	  echo "running tests in a loopback-only network namespace"; \
	  unshare -n sh -c 'ip link set lo up 2>/dev/null || true; exec "$$@"' _ $(BIN)/python -m pytest -m "not rebuild" $(PYTEST_ARGS); \
	else \
	  echo "unshare unavailable: running tests with the in-process network guard only"; \
	  $(BIN)/python -m pytest -m "not rebuild" $(PYTEST_ARGS); \
	fi

test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not slow and not rebuild" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/bench_scoring.py
	$(BIN)/python bench/bench_build.py
	$(BIN)/python bench/bench_memory.py
	$(BIN)/python bench/bench_storage.py
	$(BIN)/python bench/bench_sink.py
	$(BIN)/python bench/bench_plan.py
	$(BIN)/python bench/bench_train.py

clean:
	rm -rf outputs models/tiny .pytest_cache
