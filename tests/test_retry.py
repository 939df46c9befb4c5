"""The one retry policy: decided by exception type, never by message text; the store client retries
its own transient faults (tenacity) and a stage is retried only for what a fresh attempt can fix."""

from __future__ import annotations

import errno
import logging

import pytest
import torch

import slmforge.store_calls as S
from slmforge.store_calls import StoreError, with_retries

pytestmark = pytest.mark.faults


def _client_error(status: int, code: str = "Err"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def _caused_by(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError("reset"), True),
    (TimeoutError(), True),
    (OSError(errno.ECONNREFUSED, "refused"), True),
    (OSError(errno.ENOSPC, "no space left on device"), False),
    (FileNotFoundError("s3://b/k"), False),
    (PermissionError("403"), False),
    (_client_error(503, "SlowDown"), True),
    (_client_error(500), True),
    (_client_error(429), True),
    (_client_error(403, "AccessDenied"), False),
    (_caused_by(OSError(errno.EIO, "s3fs"), _client_error(502)), True),  # how s3fs raises a ClientError
    (_caused_by(OSError(errno.EIO, "s3fs"), _client_error(400)), False),
    (RuntimeError("500 Timeout Connection SlowDown 503"), False),  # words are not a type
])
def test_store_faults_are_classified_by_type_and_status(exc, transient):
    assert S._transient(exc) is transient


def test_botocore_connection_errors_are_transient():
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    for exc in (EndpointConnectionError(endpoint_url="http://s3"), ReadTimeoutError(endpoint_url="http://s3"),
                ConnectTimeoutError(endpoint_url="http://s3")):
        assert S._transient(exc), exc


def test_the_store_client_retries_transient_faults_then_gives_up_marked_transient(monkeypatch):
    monkeypatch.setattr(S, "STORE_BASE_DELAY", 0.001)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert with_retries(flaky, "reading s3://b/k") == "ok" and calls["n"] == 3

    calls["n"] = 0

    def down():
        calls["n"] += 1
        raise ConnectionRefusedError("refused")

    with pytest.raises(StoreError, match="reading s3://b/k: still failing after 5 attempts") as err:
        with_retries(down, "reading s3://b/k")
    assert err.value.transient and calls["n"] == 5

    calls["n"] = 0

    def denied():
        calls["n"] += 1
        raise PermissionError("Access Denied")

    with pytest.raises(StoreError, match="reading s3://b/k: PermissionError") as err:
        with_retries(denied, "reading s3://b/k")
    assert not err.value.transient and calls["n"] == 1, "a refusal is not retried"


def test_a_stage_is_retried_only_for_what_a_fresh_attempt_can_fix():
    from slmforge.config import ConfigError
    from slmforge.data import DataError
    from slmforge.publishing import PublishError
    from tasks.retry import decide, is_transient
    from tasks.train import TrainingMemoryError

    assert is_transient(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_transient(MemoryError())
    assert is_transient(StoreError("uploading s3://b/k: still failing after 5 attempts", transient=True))
    assert not is_transient(StoreError("uploading s3://b/k: PermissionError: Access Denied"))
    assert not is_transient(ConfigError("train.epochs: bad"))
    assert not is_transient(DataError("bad.jsonl: line 2"))
    assert not is_transient(PublishError("Hub rejected the token"))  # the push retried on its own
    assert not is_transient(TrainingMemoryError("out of memory even at micro-batch 1"))
    # a message that reads like a transient fault is still a RuntimeError of unknown cause
    assert not is_transient(RuntimeError("CUDA error: out of memory; NCCL Connection Timeout 503"))
    # a CUDA error is never retried in the same process (see crash_on_device_error)
    retry, why = decide(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert not retry and "not a transient fault" in why


def test_a_device_error_becomes_a_crash_and_the_decision_is_logged(caplog):
    from tasks.retry import DeviceUnusable, crash_on_device_error, retry_transient

    with pytest.raises(DeviceUnusable, match="illegal memory access.*fresh one"):
        with crash_on_device_error():
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(torch.OutOfMemoryError):  # OOM is not a poisoned context: retried in process
        with crash_on_device_error():
            raise torch.OutOfMemoryError("CUDA out of memory")

    class Task:
        name = "train_qlora"

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    with caplog.at_level(logging.WARNING, logger="slmforge.retry"):
        assert retry_transient(Task(), None, State(torch.OutOfMemoryError("CUDA out of memory")))
        assert not retry_transient(Task(), None, State(ValueError("bad")))
    assert "train_qlora: retrying after OutOfMemoryError: out of memory" in caplog.text
    assert "train_qlora: not retrying after ValueError: ValueError is not a transient fault" in caplog.text


def test_compare_keeps_an_error_row_but_lets_device_errors_and_retryable_faults_out():
    from tasks.retry import must_propagate

    assert not must_propagate(ValueError("this model cannot be quantized"))  # a row with its error
    assert must_propagate(torch.OutOfMemoryError("CUDA out of memory"))
    assert must_propagate(torch.AcceleratorError("CUDA error: device-side assert triggered"))


def test_a_retried_failure_is_replaced_by_one_that_holds_nothing_of_the_attempt():
    from tasks.retry import fresh_failure

    def attempt():
        model = bytearray(10)  # noqa: F841 - what the traceback would keep alive
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    try:
        attempt()
    except torch.OutOfMemoryError as exc:
        fresh = fresh_failure(exc)
        assert exc.__traceback__ is not None
    assert type(fresh) is torch.OutOfMemoryError and str(fresh) == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert fresh.__traceback__ is None and fresh.__context__ is None
    gone = fresh_failure(StoreError("s3://b/k: still failing", transient=True))
    assert isinstance(gone, StoreError) and gone.transient
    other = ValueError("bad")
    assert fresh_failure(other) is other


def test_a_gpu_stage_returns_its_value_re_raises_a_transient_fault_fresh_and_others_as_they_are():
    from tasks.retry import run_gpu_stage

    assert run_gpu_stage(lambda a, b=0: a + b, 1, b=2) == 3

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError) as err:
        run_gpu_stage(oom)
    assert err.value.__context__ is None  # not the original: its traceback would keep the failed attempt alive
    frames = []
    tb = err.value.__traceback__
    while tb:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "oom" not in frames, frames

    bad = ValueError("a wrong setting")

    def wrong():
        raise bad

    with pytest.raises(ValueError) as err:
        run_gpu_stage(wrong)
    assert err.value is bad
