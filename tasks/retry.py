"""One retry policy for the stages, decided by exception type (never by message text) and logged.

The layers do not nest: the store client retries its own transient faults (`slmforge.storage`,
tenacity, ~15 s) and the Hub push its own (`slmforge.publishing`); a stage is retried whole only
for what a fresh attempt of the stage can fix:

- out of memory (`torch.OutOfMemoryError`, `MemoryError`): the retry frees memory, and the train
  stage halves the micro-batch (same effective batch) and resumes from its last checkpoint;
- a store the client gave up on after its retries (`StoreError.transient`): later it may be back.

A CUDA error (`torch.AcceleratorError`: a device-side assert, an illegal address, an ECC error) or
an NCCL failure can leave the device context unusable for the rest of the process, so it is never
retried in it: the stage raises `DeviceUnusable`, which Prefect records as a crash, and the
deployments' crash re-run automation starts the run again in a fresh process (finished stages
cached, training resumed from its checkpoint). Everything else fails at once.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from prefect.tasks import exponential_backoff

from slmforge.store_calls import StoreError


class DeviceUnusable(BaseException):
    """A device error after which this process's GPU context cannot be trusted. A BaseException, so
    Prefect ends the task and the flow run `Crashed` (no in-process retry) and the crash re-run
    automation starts a fresh process."""


def _device_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [torch.AcceleratorError]
    try:
        from torch.distributed import DistBackendError  # NCCL/gloo failures inside a collective

        errors.append(DistBackendError)
    except ImportError:  # pragma: no cover - a torch built without distributed
        pass
    return tuple(errors)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


def decide(exc: BaseException) -> tuple[bool, str]:
    """(retry the stage?, why) for the exception a stage attempt raised."""
    name = type(exc).__name__
    flagged = getattr(exc, "retryable", None)  # e.g. TrainingMemoryError: out of memory at the floor
    if flagged is not None:
        return bool(flagged), f"{name} is marked {'retryable' if flagged else 'not retryable'}"
    if is_out_of_memory(exc):
        return True, "out of memory: a fresh attempt frees memory (training: half the micro-batch, same effective batch)"
    if isinstance(exc, StoreError):
        if exc.transient:
            return True, "the store stayed unreachable through the client's own retries: a later attempt may find it back"
        return False, "the store refused or holds something unusable: retrying cannot fix it"
    return False, f"{name} is not a transient fault: retrying cannot fix it"


def is_transient(exc: BaseException) -> bool:
    return decide(exc)[0]


def fresh_failure(exc: BaseException) -> BaseException:
    """For a stage that will be retried in this same process: an exception of the same kind with the
    same message but no traceback. The original's traceback holds the failed attempt's model,
    optimizer and batch (clearing its frames did not release them: measured in the train stage), so
    the caller raises this one outside its `except` block and the memory is free for the retry."""
    if is_out_of_memory(exc):
        return torch.OutOfMemoryError(str(exc))
    if isinstance(exc, StoreError):
        return StoreError(str(exc), transient=exc.transient)
    return exc


def must_propagate(exc: BaseException) -> bool:
    """For code that records an error and goes on (compare's rows): what must still leave the stage,
    a fault a retry can fix or a device error the process must not go on after."""
    return is_transient(exc) or isinstance(exc, _device_errors())


def _logger():
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("slmforge.retry")


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: the decision above, logged with its reason."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified by decide()
        retry, why = decide(exc)
        _logger().warning("%s: %s after %s: %s", task.name, "retrying" if retry else "not retrying",
                          type(exc).__name__, why)
        return retry
    return False


@contextmanager
def crash_on_device_error():
    """Turn a CUDA/NCCL error raised inside into DeviceUnusable (see the module docstring)."""
    try:
        yield
    except _device_errors() as exc:
        raise DeviceUnusable(
            f"{type(exc).__name__}: {exc} -- the device context may be unusable: not retried in this process; "
            "the crash re-run starts the run again in a fresh one") from exc


def run_gpu_stage(body, *args, **kwargs):
    """A GPU stage's body, holding the GPU slot. A transient failure leaves as `fresh_failure`, raised
    after the `except` block and `free_memory()`, so the retry in this process has the memory back."""
    from slmforge.modeling import free_memory
    from tasks.gpu import gpu_slot

    try:
        with gpu_slot(), crash_on_device_error():
            return body(*args, **kwargs)
    except Exception as exc:
        if not is_transient(exc):
            raise
        failure = fresh_failure(exc)
    free_memory()
    raise failure


def gpu_retry(retries: int = 2) -> dict:
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=5),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_transient,
    }
