"""benchmarks/gpu.sh cannot rot unseen: its set-up and the run's imports and training path, on a CPU.
`--dry-run` installs into a fresh venv over this interpreter's base Python as it does on a bare GPU
machine (torch at the locked version where the base has none, the rest under requirements.lock),
imports what the run imports, then trains each variant of benchmarks/train_throughput.py 2 steps on
a tiny random Llama."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_imports_what_it_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--check-imports"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "versions: torch" in out.stdout and "tenacity" in out.stdout


def test_the_benchmark_needs_no_prefect():
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--print-requirements"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    names = [line.split(">")[0].split("<")[0].split("=")[0] for line in out.stdout.split()]
    assert out.returncode == 0 and "transformers" in names and "tenacity" in names
    assert "prefect" not in names and "torch" not in names


@pytest.mark.slow
def test_gpu_sh_dry_run_from_a_fresh_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "OUT")}
    env["PYTHON"] = getattr(sys, "_base_executable", sys.executable)
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert "== no torch in" in out.stdout, "the fresh venv's base has no torch: the script installed it"
    assert "versions: torch 2.13.0" in out.stdout and "== dry run passed" in out.stdout
