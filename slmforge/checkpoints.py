"""Training checkpoints in the store: `checkpoints/<adapter key>/checkpoint-N/`, each a manifested
output, uploaded as the trainer finishes it and restored into a work directory by a retry or a
re-run, here or on another machine. Used by the train stage and by rank 0 of a multi-process run."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from slmforge import training as T
from slmforge.storage import MANIFEST, ArtifactStore, StoreError

KEEP_CHECKPOINTS = 2  # complete checkpoints kept in the store per adapter while it trains


def checkpoint_prefix(key: str) -> str:
    return f"checkpoints/{key}"


@contextmanager
def one_trainer_per_machine(work: Path, log=print, remind_every_s: float = 600) -> Iterator[None]:
    """Hold the lock of an adapter's local work directory. Two runs of the same settings on one
    machine share that directory (a retry or re-run resumes from it), so the second waits for the
    first and then takes the adapter it committed, instead of training into the same checkpoints.
    A waiting run says so again every `remind_every_s`, so its log shows it is alive (and how long
    the other one has held the lock, should that one hang)."""
    Path(work).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{work}.lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        log(f"waiting for another process on this machine that trains this adapter ({work.name}); "
            "its result is used when it is done")
        started = time.monotonic()
        while True:
            try:
                lock.acquire(timeout=remind_every_s)
                break
            except Timeout:
                log(f"still waiting for the other process that trains adapter {work.name} "
                    f"({(time.monotonic() - started) / 60:.0f} min; lock file {work}.lock)")
    try:
        yield
    finally:
        lock.release()


def store_checkpoints(store: ArtifactStore, prefix: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(complete checkpoints as (step, name), oldest first; names without a manifest)."""
    complete, partial = [], []
    for name in store.children(prefix):
        step = T.checkpoint_step(name)
        if step is None:
            continue
        (complete.append((step, name)) if store.exists(f"{prefix}/{name}") else partial.append(name))
    return sorted(complete), partial


def restore_checkpoint(store: ArtifactStore, prefix: str, work: Path, log=print) -> int | None:
    """Put the newest complete checkpoint into the work dir, from the store unless the work dir
    already has one at least as new (a retry on the same machine). Upload leftovers of a crash
    (no manifest) are removed. Returns the step training will resume from, or None."""
    complete, partial = store_checkpoints(store, prefix)
    for name in partial:
        store.discard_partial(f"{prefix}/{name}")
    local = T.latest_checkpoint(work)
    local_step = T.checkpoint_step(local) if local else None
    if complete and (local_step is None or complete[-1][0] > local_step):
        step, name = complete[-1]
        src = store.get_dir(f"{prefix}/{name}", verify="full")
        tmp = work / f".{name}.restoring"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MANIFEST))
        shutil.rmtree(work / name, ignore_errors=True)
        os.replace(tmp, work / name)
        log(f"resuming from checkpoint {step} in {store.uri(f'{prefix}/{name}')}")
        return step
    if local_step is not None:
        log(f"resuming from checkpoint {local_step} in {local}")
    return local_step


def checkpoint_uploader(store: ArtifactStore, key: str, work: Path, micro: int, accum: int, log=print,
                        after_upload: Callable[[int], None] | None = None):
    """`on_checkpoint` for `training.train`: each finished checkpoint to the store (training goes on if
    the store is down), keeping the newest KEEP_CHECKPOINTS. `after_upload(step)`: the fault hook."""
    prefix = checkpoint_prefix(key)

    def upload(path: Path, step: int) -> None:
        ckpt_key = f"{prefix}/{path.name}"
        done = json.loads((path / T.CHECKPOINT_DONE).read_text())
        if 0 < done.get("max_steps", 0) <= step:
            return  # the final state: the adapter itself is committed next; a local copy serves a retry
        try:
            store.upload_dir(path, ckpt_key, meta={"step": step, "adapter": key, "micro_batch": micro,
                                                   "grad_accum": accum})
            complete, partial = store_checkpoints(store, prefix)
            for _, name in complete[:-KEEP_CHECKPOINTS]:
                store.remove(f"{prefix}/{name}")
            for name in partial:
                if T.checkpoint_step(name) < step:
                    store.discard_partial(f"{prefix}/{name}")
        except StoreError as e:  # a checkpoint that did not reach the store must not stop training
            log(f"checkpoint {step} not saved to the store (training goes on; a copy is in {work}): {e}")
            return
        log(f"checkpoint {step} saved: {store.uri(ckpt_key)}")
        if after_upload is not None:
            after_upload(step)

    return upload
