"""The one fault-injection hook: what the fault tests set in `SLMFORGE_INJECT_FAULT` (unset in
production, where every function here is a no-op). Comma-separated:

- `oom:N`: the train stage's first N attempts raise an out-of-memory error once the base has loaded;
- `oom-in-step:S`: the first attempt raises it inside the forward pass of optimizer step S (after
  the checkpoints before S reached the store), the moment a real OOM strikes;
- `cuda-error`: the train stage raises a CUDA device-side assert (`torch.AcceleratorError`) once
  the base has loaded;
- `kill-after-checkpoint`: SIGKILL (the stage's process and, with torchrun, every rank) once the
  first checkpoint of a fresh (not resumed) run is stored;
- `kill-in-merge`, `kill-in-evaluate`: SIGKILL once the stage has written part of its output
  (weights, charts) into its staging directory, before the commit. Once per machine: a marker in
  the store's cache directory keeps the re-run from being killed again.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

FAULT_ENV = "SLMFORGE_INJECT_FAULT"


def injected() -> dict[str, int]:
    out: dict[str, int] = {}
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, n = item.strip().partition(":")
        if name:
            out[name] = int(n) if n.strip().isdigit() else 1
    return out


def at_model_loaded(attempt: int, micro: int) -> None:
    """The train stage, its base loaded: `oom:N` and `cuda-error`."""
    faults = injected()
    if attempt <= faults.get("oom", 0):
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {FAULT_ENV}, "
                                     f"attempt {attempt}, micro-batch {micro})")
    if "cuda-error" in faults:
        raise torch.AcceleratorError(f"CUDA error: device-side assert triggered (injected by {FAULT_ENV})")


def in_training_step(model, attempt: int, grad_accum: int, log=print):
    """`oom-in-step:S`: a forward pre-hook that raises out of memory in the first micro-batch of
    optimizer step S, on the first attempt. Returns the hook's handle (None when not injected)."""
    step = injected().get("oom-in-step")
    if not step or attempt > 1:
        return None
    at_forward = (step - 1) * grad_accum + 1
    seen = {"n": 0}

    def hook(module, args, kwargs):
        if not module.training:
            return None
        seen["n"] += 1
        if seen["n"] == at_forward:
            log(f"{FAULT_ENV}: out of memory inside optimizer step {step}")
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {FAULT_ENV} "
                                         f"in the forward pass of step {step})")
        return None

    # the input embeddings run in every forward pass, however the trainer computes the loss
    return model.get_input_embeddings().register_forward_pre_hook(hook, with_kwargs=True)


LAUNCHER_ENV = "SLMFORGE_LAUNCHER_PID"  # set by the train stage for its torchrun processes


def after_checkpoint(resume_step: int | None, log=print):
    """`kill-after-checkpoint`: a function that SIGKILLs the whole training (the train stage's process,
    torchrun and every rank: what a lost machine looks like) once a checkpoint of a fresh (not
    resumed) run is in the store. None when not injected."""
    if "kill-after-checkpoint" not in injected() or resume_step is not None:
        return None

    def kill(step: int) -> None:
        import psutil

        log(f"{FAULT_ENV}: killing this process after checkpoint {step}")
        root = psutil.Process(int(os.environ.get(LAUNCHER_ENV) or os.getpid()))
        for p in [root, *root.children(recursive=True)]:
            if p.pid != os.getpid():
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        os.kill(os.getpid(), signal.SIGKILL)

    return kill


def kill_point(name: str, marker_dir: Path, log=print) -> None:
    """`kill-in-<name>`: SIGKILL this process the first time it gets here on this machine."""
    if f"kill-in-{name}" not in injected():
        return
    marker = Path(marker_dir) / "injected-faults" / f"kill-in-{name}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    log(f"{FAULT_ENV}: killing this process in {name}, its output half-written")
    os.kill(os.getpid(), signal.SIGKILL)
