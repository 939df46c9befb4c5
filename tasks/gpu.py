"""One GPU-heavy task at a time per GPU: the tasks that load, train, merge or evaluate a model
hold a slot of a Prefect global concurrency limit while their body runs.

The deployments' work pool sets `SLMFORGE_GPU_LIMIT` to the limit's name (`slmforge up` creates it
with one slot). `strict=True`: if that limit is missing on the server, the task fails at once
instead of running unguarded beside another model on the same GPU. Without the variable (a
local `slmforge finetune`, the tests) there is nothing to share and no slot is taken. Cache hits
never run the body, so they never wait for the GPU.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

GPU_LIMIT_ENV = "SLMFORGE_GPU_LIMIT"
LEASE_S = 60


@contextmanager
def gpu_slot(name: str | None = None, strict: bool = True):
    """Hold one slot of the limit `name` (default: `$SLMFORGE_GPU_LIMIT`; empty = no limit).

    The compare flow names its limit in its config, checks once that it exists (`limit_exists`)
    and passes strict=False: a comparison run by hand should not need a server set up for it.
    """
    name = (os.environ.get(GPU_LIMIT_ENV, "") if name is None else name).strip()
    if not name:
        yield
        return
    from prefect.concurrency.sync import concurrency

    # A background thread renews the lease every ~45 s while the body runs. When the process dies
    # (SIGKILL, machine lost) the server takes the slot back once the lease runs out, so the
    # automatic re-run of a crashed run waits about a minute, not forever. A failed renewal only
    # warns: losing the slot is better than killing hours of training over an API hiccup.
    with concurrency(name, occupy=1, strict=strict, lease_duration=LEASE_S, raise_on_lease_renewal_failure=False):
        yield


def limit_exists(name: str) -> bool:
    """Whether the Prefect server (of the current run) has the global concurrency limit `name`.

    The compare flow asks once, so a run without the limit logs one line instead of Prefect's
    warning in every task. Only a clear "not found" says no: if the API cannot answer now, the
    tasks still try the limit (and each warns if it is missing), rather than run unguarded.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return False
    except Exception:  # noqa: BLE001 - an API hiccup is not an answer
        return True
    return True
