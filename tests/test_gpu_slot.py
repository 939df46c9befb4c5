"""The GPU slot: GPU-heavy task bodies hold one slot of a real Prefect global concurrency limit,
so two of them never overlap; a configured limit that is missing fails at once (strict)."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.gpu import GPU_LIMIT_ENV, gpu_slot


def _create_limit(name: str, limit: int) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def _spans(n: int, hold_s: float) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def body():
        try:
            with gpu_slot():
                start = time.monotonic()
                time.sleep(hold_s)
                spans.append((start, time.monotonic()))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=body) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return sorted(spans)


def test_without_the_variable_no_slot_is_taken(monkeypatch):
    monkeypatch.delenv(GPU_LIMIT_ENV, raising=False)
    spans = _spans(2, 0.5)
    assert spans[1][0] < spans[0][1], "without a limit configured the bodies run side by side"


def test_one_slot_serialises_gpu_tasks(prefect_api, monkeypatch):
    _create_limit("gpu-slot-test", 1)
    monkeypatch.setenv(GPU_LIMIT_ENV, "gpu-slot-test")
    spans = _spans(3, 0.6)
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.05, f"two GPU tasks overlapped: {spans}"


def test_missing_limit_fails_instead_of_running_unguarded(prefect_api, monkeypatch):
    monkeypatch.setenv(GPU_LIMIT_ENV, "no-such-limit")
    ran = []
    with pytest.raises(Exception, match="no-such-limit|not found|Concurrency"):
        with gpu_slot():
            ran.append(True)
    assert not ran


def test_limit_exists_asks_the_server(prefect_api):
    from tasks.gpu import limit_exists

    _create_limit("gpu-exists-test", 1)
    assert limit_exists("gpu-exists-test")
    assert not limit_exists("gpu-missing-test")
