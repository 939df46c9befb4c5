"""Retries for GPU-heavy stages: only transient faults (out of memory, driver/NCCL hiccups,
storage timeouts) are retried, with exponential backoff and jitter; bad config or data fails
at once, since retrying cannot fix it."""

from __future__ import annotations

from prefect.tasks import exponential_backoff

TRANSIENT = ("out of memory", "CUDA error", "NCCL", "cudaError", "Connection", "Timeout", "timed out",
             "503", "502", "500 ", "SlowDown", "temporarily unavailable")
PERMANENT = ("ConfigError", "DataError", "ModelSourceError", "MergeError", "ValueError", "KeyError",
             "TypeError", "FileNotFoundError")


def is_transient(exc: BaseException) -> bool:
    flagged = getattr(exc, "retryable", None)  # e.g. TrainingMemoryError: out of memory at the floor
    if flagged is not None:
        return bool(flagged)
    name = type(exc).__name__
    if name in PERMANENT and "out of memory" not in str(exc):
        return False
    if name in ("OutOfMemoryError",):
        return True
    text = f"{name}: {exc}"
    return any(s in text for s in TRANSIENT)


def retry_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001
        return is_transient(exc)
    return False


def gpu_retry(retries: int = 2) -> dict:
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=5),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": retry_transient,
    }
