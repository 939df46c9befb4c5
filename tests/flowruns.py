"""Reading a finished flow run's task states from the Prefect API (tests only)."""

from __future__ import annotations

import asyncio

STAGES = ("prepare_dataset", "load_base_model", "train_qlora", "calibrate", "merge_adapter", "evaluate", "publish")


def task_states(flow_run_id) -> dict[str, str]:
    """Task name (without Prefect's suffix) -> state name of its last run, for one flow run (a
    stage whose cached result was stale runs twice: Cached, then Completed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def go():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            runs = sorted(runs, key=lambda r: r.start_time or r.expected_start_time)
            return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

    return asyncio.run(go())


def stage_states(state) -> dict[str, str]:
    states = task_states(state.state_details.flow_run_id)
    return {s: states.get(s) for s in STAGES}
