"""Keeping the store bounded: each finetune run records what it used; gc removes what nothing kept names.

Every night adds a dataset, an adapter, a calibrated copy, a merged model and an evaluation, and a
merged 7B is ~15 GB. A run writes `runs/<start>-<id>.json` when it starts and adds the store keys of
each stage's output as the stage ends. `collect` keeps:

- everything the last `keep_last_runs` runs that ended used or wrote, and what a run still going has;
- every published entry (or the newest K per target) with the adapter, merged model and evaluation
  it was made from;
- whatever a kept output's manifest names (a calibrated adapter's trained adapter, a merged model's
  4-bit base), transitively;
- anything younger than `min_age_hours`, or written since a run that is still going started: a run
  may have found it in the cache and not recorded it yet.

The rest is removed through the store's commit protocol (manifest first, so a removed output never
looks complete), with the Prefect cache records that point at it: a later run with the same inputs
computes it again instead of reading a missing path.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable

from slmforge import publish_record
from slmforge.storage import MANIFEST, ArtifactStore
from slmforge.store_calls import with_retries

RUNS = "runs"
RESULTS = "prefect-results"
# What gc may remove: each child of these prefixes is one output (a manifested directory, a JSON file,
# a checkpoint directory). Listed longest first, so `eval/base/x` is not read as output `base` of `eval`.
PREFIXES = ("models/quantized", "models/base", "checkpoints/adapters", "eval/base", "datasets", "validation",
            "adapters", "calibrated", "merged", "eval", "jobs")
_KEY = re.compile(r"(?:^|/)((?:" + "|".join(re.escape(p) for p in PREFIXES) + r")/[A-Za-z0-9_.-]+)")
# A run still marked running with no update for this long crashed: its record protects nothing.
STALE_RUN_S = 48 * 3600


def references(obj: Any) -> set[str]:
    """Store keys named anywhere in a JSON-able value (as keys, paths or URIs)."""
    found: set[str] = set()

    def walk(v):
        if isinstance(v, str):
            found.update(m.group(1) for m in _KEY.finditer(v))
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(obj)
    return found


def present(store: ArtifactStore, key: str) -> bool:
    """Whether an output is complete in the store: its manifest, or the file for JSON outputs."""
    if key.startswith(("eval/base/", "jobs/", "validation/")):
        return with_retries(lambda: store.fs.exists(store.path(key)), f"checking {store.uri(key)}")
    return store.exists(key)


# -- run records --------------------------------------------------------------------------------

def begin_run(store: ArtifactStore, run_id: str, name: str | None = None) -> str:
    """Record a run as started; returns the record's key. A retried flow run keeps its record."""
    for existing in store.children(RUNS):
        if existing.endswith(f"-{run_id}.json"):
            key = f"{RUNS}/{existing}"
            record = store.read_json(key) or {}
            store.write_json(key, {**record, "status": "running", "updated_at": time.time()})
            return key
    now = time.time()
    key = f"{RUNS}/{int(now)}-{run_id}.json"
    store.write_json(key, {"run_id": run_id, "name": name, "status": "running", "started_at": now,
                           "updated_at": now, "outputs": []})
    return key


def record_outputs(store: ArtifactStore, run_key: str, value: Any, status: str | None = None) -> None:
    """Add the store keys a stage's record names to the run's record (and set its status)."""
    record = store.read_json(run_key) or {}
    outputs = sorted(set(record.get("outputs", [])) | references(value))
    update = {"outputs": outputs, "updated_at": time.time()}
    if status:
        update["status"] = status
    store.write_json(run_key, {**record, **update})


def runs(store: ArtifactStore) -> list[dict]:
    """Every run record, newest first."""
    out = []
    for name in store.children(RUNS):
        record = store.read_json(f"{RUNS}/{name}")
        if isinstance(record, dict):
            out.append({**record, "key": f"{RUNS}/{name}"})
    return sorted(out, key=lambda r: r.get("started_at") or 0, reverse=True)


# -- collection ---------------------------------------------------------------------------------

@dataclass
class Output:
    key: str
    size: int
    created: float  # the manifest's commit time, else the newest file's modification time
    committed: bool


@dataclass
class Collection:
    removed: list[Output] = field(default_factory=list)
    kept: int = 0
    too_young: list[Output] = field(default_factory=list)
    runs_removed: int = 0
    published_removed: list[str] = field(default_factory=list)
    cache_records_removed: int = 0
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(o.size for o in self.removed)

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        by_prefix: dict[str, list[Output]] = {}
        for o in self.removed:
            by_prefix.setdefault(o.key.rsplit("/", 1)[0], []).append(o)
        lines = [f"gc: {verb} {len(self.removed)} outputs ({_mb(self.freed)}), kept {self.kept}"
                 + (f", left {len(self.too_young)} unreferenced ones too young to remove" if self.too_young else "")]
        lines += [f"  {p}/: {len(os)} ({_mb(sum(o.size for o in os))})" for p, os in sorted(by_prefix.items())]
        if self.published_removed:
            lines.append(f"  published/: {len(self.published_removed)} entries beyond retention.keep_published")
        if self.runs_removed or self.cache_records_removed:
            lines.append(f"  and {self.runs_removed} old run records, {self.cache_records_removed} Prefect cache records "
                         "that pointed at removed outputs")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _modified(info: dict) -> float:
    t = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created") or 0
    if isinstance(t, datetime):
        return t.timestamp()
    try:
        return float(t)
    except (TypeError, ValueError):
        return 0.0


def _outputs(store: ArtifactStore) -> list[Output]:
    """Every output under the collectable prefixes, committed or not."""
    out = []
    nested = {p for p in PREFIXES if "/" in p}
    for prefix in PREFIXES:
        for name in store.children(prefix):
            key = f"{prefix}/{name}"
            if key in nested:  # `eval/base` is a prefix of its own
                continue
            path = store.path(key)
            files = with_retries(lambda path=path: store.fs.find(path, detail=True), f"listing {store.uri(key)}")
            if not files and with_retries(lambda path=path: store.fs.isfile(path), f"checking {store.uri(key)}"):
                files = {path: with_retries(lambda path=path: store.fs.info(path), f"checking {store.uri(key)}")}
            size = sum(int(i.get("size") or 0) for i in files.values())
            manifest_path = f"{path}/{MANIFEST}"
            manifest = store.read_json(f"{key}/{MANIFEST}") if manifest_path in files or any(
                p.endswith("/" + MANIFEST) and p.rsplit("/", 1)[0] == path for p in files) else None
            created = manifest.get("created") if isinstance(manifest, dict) else None
            out.append(Output(key, size, float(created or max((_modified(i) for i in files.values()), default=0)),
                              manifest is not None))
    return out


def _published_kept(store: ArtifactStore, keep: int | str) -> tuple[dict[str, dict], list[str]]:
    """(entries kept by content hash, hashes to remove): the newest `keep` per target, or all."""
    entries = publish_record.entries(store)
    if keep == "all":
        return entries, []
    by_target: dict[str, list[tuple[str, dict]]] = {}
    for h, e in entries.items():
        by_target.setdefault(publish_record.target_of(e), []).append((h, e))
    kept, dropped = {}, []
    for items in by_target.values():
        items.sort(key=lambda he: he[1].get("published_at") or 0, reverse=True)
        kept.update(dict(items[:keep]))
        dropped += [h for h, _ in items[keep:]]
    return kept, dropped


def _closure(store: ArtifactStore, keys: Iterable[str]) -> set[str]:
    """The keys and whatever their manifests name, transitively (a calibrated adapter names its
    trained adapter, a merged model its adapter and 4-bit base)."""
    seen: set[str] = set()
    todo = list(keys)
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        manifest = store.read_json(f"{key}/{MANIFEST}") if not key.endswith(".json") else None
        if isinstance(manifest, dict):
            todo += [k for k in references(manifest.get("meta")) if k not in seen]
    return seen


def collect(store: ArtifactStore, keep_last_runs: int, keep_published: int | str = "all",
            min_age_hours: float = 24.0, dry_run: bool = False, now: float | None = None, log=print) -> Collection:
    """Remove what no kept run, published entry or kept output names (see the module docstring)."""
    now = time.time() if now is None else now
    guard = min_age_hours * 3600
    all_runs = runs(store)
    running = [r for r in all_runs if r.get("status") == "running" and now - (r.get("updated_at") or 0) < STALE_RUN_S]
    ended = [r for r in all_runs if r not in running]
    kept_runs = ended[:keep_last_runs]
    protect_after = min((r.get("started_at") or now for r in running), default=float("inf"))
    published, dropped = _published_kept(store, keep_published)
    roots = {k for r in kept_runs + running for k in r.get("outputs", [])}
    roots |= {k for e in published.values() for k in references(e)}
    keep = _closure(store, roots)

    result = Collection(dry_run=dry_run)
    doomed: list[Output] = []
    for out in _outputs(store):
        if out.key in keep:
            result.kept += 1
        elif now - out.created < guard or out.created >= protect_after:
            result.too_young.append(out)
        else:
            doomed.append(out)
    old_runs = [r for r in ended[keep_last_runs:] if now - (r.get("updated_at") or r.get("started_at") or 0) >= guard]
    if dry_run:
        result.removed, result.runs_removed, result.published_removed = doomed, len(old_runs), dropped
        log(result.summary())
        return result

    for h in dropped:
        store.remove(f"{publish_record.PREFIX}/{h}")
        result.published_removed.append(h)
    if dropped:
        publish_record.write_index(store)
    for out in doomed:
        _remove(store, out)
        result.removed.append(out)
    for r in old_runs:
        with_retries(lambda r=r: store.fs.rm(store.path(r["key"])), f"removing {store.uri(r['key'])}")
        result.runs_removed += 1
    result.cache_records_removed = _forget_cache_records(store, {o.key for o in result.removed})
    log(result.summary())
    return result


def _remove(store: ArtifactStore, out: Output) -> None:
    if out.committed:
        store.remove(out.key)  # manifest first: never complete-looking while half deleted
    else:
        path = store.path(out.key)
        with_retries(lambda: store.fs.rm(path, recursive=True), f"removing {store.uri(out.key)}")
    if store.scheme != "file":  # this machine's downloaded copy of it
        shutil.rmtree(store.cache_dir / out.key, ignore_errors=True)


def _forget_cache_records(store: ArtifactStore, removed: set[str]) -> int:
    """Delete Prefect's persisted task results (under `prefect-results/`) that name a removed output,
    so a cache lookup misses and the stage runs again."""
    if not removed:
        return 0
    n = 0
    for name in store.children(RESULTS):
        path = store.path(f"{RESULTS}/{name}")
        try:
            text = with_retries(lambda path=path: store.fs.cat_file(path), f"reading {path}").decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - a record another run is writing: leave it
            continue
        try:  # the record is JSON whose `result` is the stage's JSON record, escaped
            named = references(json.loads(text))
            named |= references(json.loads(json.loads(text).get("result") or "null"))
        except (ValueError, AttributeError, TypeError):
            named = references(text)
        if named & removed:
            with_retries(lambda path=path: store.fs.rm(path), f"removing {path}")
            n += 1
    return n
