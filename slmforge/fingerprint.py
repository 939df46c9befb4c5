"""A fingerprint of the code and libraries a stage runs, for its store key and its cache key.

A stage's key is derived from its inputs; without this, a fix in `slmforge/training.py` or a trl or
peft upgrade would be served the artifacts the old code wrote. Coarse on purpose: any edit to the
core or the tasks, or any change of the ML stack's versions, gives every stage a new key.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Mapping

PROJECT = Path(__file__).resolve().parent.parent
SOURCES = (PROJECT / "slmforge", PROJECT / "tasks")
"""The packages the stages run: the core and the Prefect tasks over it."""

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")
"""The ML stack whose versions change what a stage writes."""


@lru_cache(maxsize=None)
def code_fingerprint(roots: tuple[Path, ...] = SOURCES) -> str:
    """sha256 over every `*.py` under `roots`, sorted by path relative to the root's parent, path
    then bytes. Computed once per process: a worker runs the code it imported."""
    files = sorted((f.relative_to(root.parent).as_posix(), f) for root in roots for f in root.rglob("*.py"))
    h = hashlib.sha256()
    for rel, f in files:
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions from package metadata (nothing is imported); None where one is absent."""
    return dict(_versions(names))


@lru_cache(maxsize=None)
def _versions(names: tuple[str, ...]) -> tuple[tuple[str, str | None], ...]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return tuple((name, version(name)) for name in names)


def fingerprint(code: str | None = None, versions: Mapping[str, str | None] | None = None, n: int = 16) -> str:
    """Short hex of the code fingerprint and the library versions (the installed ones unless given)."""
    payload = {"code": code if code is not None else code_fingerprint(),
               "libraries": dict(versions if versions is not None else library_versions())}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:n]
