"""The local service stack end to end: `slmforge up` from nothing → the worker runs finetune/nightly
(triggered through the API, as the UI's Run button does) → artifacts and task results in the
SeaweedFS bucket → the second run is served from the cache → a killed run is re-run once and
resumes from its checkpoint → a failed run reaches the webhook → a comparison of two models runs
one model on each of the two gpu workers → `slmforge down` leaves no process behind and keeps the data.

Real processes on 127.0.0.1 with ports of their own, a state dir under the test's tmp dir and a
tiny random Llama. The stack is shared with tests/test_ui.py through the `stack` fixture below
(test_ui imports it); tests here run in file order.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from ports import free_block  # tests/ports.py
from deployments.stack import StackSettings, alive, port_open, process_tree, running_processes

e2e = pytest.mark.e2e

STAGES = ["prepare_dataset", "load_base_model", "train_qlora", "calibrate", "merge_adapter", "evaluate", "publish"]
RUN_TIMEOUT = 420
WORKERS = 2  # gpu workers of the shared stack: the fan-out test needs two


class Webhook:
    """A local HTTP endpoint that records what the notification block posts."""

    def __init__(self):
        self.posts: list[dict] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.posts.append({"path": self.path, "body": body.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slmforge-hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


class Stack:
    """`slmforge up/down` as a user runs them, on ports of its own, plus ways to look inside."""

    def __init__(self, root: Path, webhook: Webhook, tiny_model_dir: Path):
        self.state_dir = root / "stack"
        self.webhook = webhook
        self.tiny_model_dir = tiny_model_dir
        self.port = free_block(1)
        self.s3_port = free_block(9, also=(10008,))  # SeaweedFS: see StackSettings.weed_ports
        while self.port in StackSettings(s3_port=self.s3_port).weed_ports().values():
            self.s3_port = free_block(9, also=(10008,))
        self.bucket = "slmforge"
        self.completed_run_id: str | None = None
        self.cli_seconds: dict[str, float] = {}

    # -- the commands ---------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        env["PREFECT_API_URL"] = self.api_url
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env["PREFECT_HOME"] = str(self.state_dir / "client-home")
        return env

    def run(self, cmd: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        bindir = Path(sys.executable).parent
        exe = bindir / cmd[0]
        full = [str(exe) if exe.exists() else cmd[0], *cmd[1:]]
        t0 = time.monotonic()
        r = subprocess.run(full, env=self.env(), capture_output=True, text=True, timeout=timeout)
        self.cli_seconds[" ".join(cmd[:2])] = round(time.monotonic() - t0, 1)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
                                 f"\n{self.logs()}")
        return r

    def nightly_settings(self) -> list[str]:
        """The nightly deployment's own settings, small enough for a test: what `slmforge up
        --nightly-set` makes its default parameters (the scheduled run and the UI form use them)."""
        return [f"model.source={self.tiny_model_dir}", "data.train_limit=16", "data.test_limit=4",
                "data.max_length=128", "train.max_steps=2", "train.batch_size=4", "eval.max_new_tokens=4",
                "eval.batch_size=4", "eval.samples=2", "merge.min_answer_agreement=0"]

    def up(self, cron: str = "0 2 * * *", workers: bool = True) -> subprocess.CompletedProcess:
        return self.run(["slmforge", "up", "--state-dir", str(self.state_dir), "--port", str(self.port),
                         "--s3-port", str(self.s3_port), "--webhook-url", self.webhook.url, "--cron", cron,
                         *(["--workers", str(WORKERS)] if workers else []),
                         *(a for x in self.nightly_settings() for a in ("--nightly-set", x))])

    def down(self) -> subprocess.CompletedProcess:
        return self.run(["slmforge", "down", "--state-dir", str(self.state_dir)])

    # -- looking inside -------------------------------------------------------------------------
    @property
    def settings(self) -> StackSettings:
        return StackSettings(state_dir=self.state_dir, port=self.port, s3_port=self.s3_port, workers=WORKERS)

    def processes(self):
        return running_processes(self.settings)

    def is_up(self) -> bool:
        return set(self.processes()) == set(self.settings.services())

    def ensure_up(self) -> None:
        if not self.is_up():
            self.up()

    def logs(self, n: int = 40) -> str:
        out = []
        for name in (*self.settings.services()[2:], "prefect-server", "seaweedfs"):
            p = self.state_dir / "logs" / f"{name}.log"
            if p.exists():
                out.append(f"--- {p} (last {n} lines)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    @contextmanager
    def api(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            with get_client(sync_client=True) as client:
                yield client

    def s3(self):
        from deployments.stack import s3fs_for

        return s3fs_for(self.settings)

    def cfg(self, tiny_model_dir: Path, prefix: str = "e2e", **sections) -> dict:
        """The small config a test run takes: the tiny model, few rows, two steps, the stack's bucket."""
        cfg = {
            "model": {"source": str(tiny_model_dir)},
            "data": {"train_limit": 16, "test_limit": 4, "max_length": 128},
            "train": {"max_steps": 2, "batch_size": 4},
            "eval": {"max_new_tokens": 4, "batch_size": 4, "samples": 2},
            # a random model's near-tied logits flip greedy answers under bf16 rounding: logits only
            "merge": {"min_answer_agreement": 0.0},
            "storage": {"url": f"s3://{self.bucket}/{prefix}", "endpoint_url": self.s3_endpoint},
        }
        for k, v in sections.items():
            cfg[k] = {**cfg.get(k, {}), **v}
        return cfg

    def trigger(self, parameters: dict, timeout: float = RUN_TIMEOUT):
        """What the UI's Run button does: create a flow run of the deployment; wait for its end."""
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # _sync: Playwright's sync API runs an event loop in this thread, where Prefect's dispatch
        # would otherwise hand back a coroutine (tests/test_ui.py run on its own hit that)
        with temporary_settings({PREFECT_API_URL: self.api_url}):
            return run_deployment("finetune/nightly", parameters=parameters, timeout=timeout, poll_interval=2,
                                  _sync=True)

    def task_states(self, flow_run_id) -> dict[str, str]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with self.api() as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


_SHARED: dict[str, Stack] = {}


@pytest.fixture(scope="session")
def stack(tmp_path_factory, tiny_model_dir):
    """One stack for test_stack.py and test_ui.py (which imports this fixture): `slmforge up` once,
    `slmforge down` at the end whatever happened."""
    if "stack" not in _SHARED:
        webhook = Webhook()
        s = Stack(tmp_path_factory.mktemp("e2e"), webhook, tiny_model_dir)
        _SHARED["stack"] = s
        t0 = time.monotonic()
        try:
            s.up()
        except BaseException:
            s.down()
            raise
        s.cli_seconds["first up"] = round(time.monotonic() - t0, 1)
    s = _SHARED["stack"]
    yield s
    if _SHARED.get("stack") is s:
        del _SHARED["stack"]
        s.down()
        s.webhook.close()
        print(f"\nstack command timings (s): {s.cli_seconds}")


# -- quick checks of the pieces (no stack) -------------------------------------------------------

def test_stop_process_stops_the_whole_tree_even_children_in_their_own_session(tmp_path):
    from deployments.stack import Proc, start_time, stop_process

    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], " \
             "start_new_session=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 20
    while len(process_tree(p.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = process_tree(p.pid)
    assert len(tree) == 2
    proc = Proc("t", p.pid, start_time(p.pid), [sys.executable], str(tmp_path / "log"))
    assert proc.running()
    assert sorted(stop_process(proc, timeout=5)) == sorted(tree)
    assert not any(alive(x) for x in tree) and not proc.running()
    assert Proc("t", p.pid, 1, [sys.executable], "").running() is False  # another start time: not ours


def test_pool_env_carries_gpu_and_storage_settings_but_no_key_values():
    from deployments.deploy import base_job_template, job_env

    env = job_env("http://127.0.0.1:8333", "us-east-1", "0", credentials_in_secrets=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333"
    assert env["AWS_ACCESS_KEY_ID"].startswith("{{ prefect.blocks.secret.") and env["SLMFORGE_GPU_LIMIT"] == "gpu"
    assert "AWS_ACCESS_KEY_ID" not in job_env(None, None, None, credentials_in_secrets=False)
    template = base_job_template("process", env)
    assert template["variables"]["properties"]["env"]["default"] == env
    assert template["job_configuration"]["env"] == "{{ env }}"


def test_seaweedfs_ports_do_not_overlap():
    ports = StackSettings(s3_port=8333).weed_ports()
    assert ports["s3"] == 8333 and ports["admin.grpc"] == 8341 + 10000
    assert len(set(ports.values())) == len(ports) == 10


# -- the stack, in order -------------------------------------------------------------------------

@e2e
def test_up_creates_everything_once_and_is_idempotent(stack):
    from prefect.exceptions import ObjectNotFound

    before = {name: p.pid for name, p in stack.processes().items()}
    assert set(before) == {"seaweedfs", "prefect-server", "worker-control", "worker", "worker-2"}
    out = stack.up().stdout  # again: nothing new starts, the configuration is re-applied
    assert "already running" in out and stack.ui_url in out and "prefect deployment run finetune/nightly" in out
    assert {name: p.pid for name, p in stack.processes().items()} == before
    stack.up(workers=False)  # without --workers: the stack keeps its two workers and their slots
    assert {name: p.pid for name, p in stack.processes().items()} == before

    with stack.api() as client:
        pool = client.read_work_pool("gpu")
        assert pool.type == "process" and pool.concurrency_limit == WORKERS
        env = pool.base_job_template["variables"]["properties"]["env"]["default"]
        assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["AWS_ENDPOINT_URL"] == stack.s3_endpoint
        assert env["AWS_SECRET_ACCESS_KEY"] == "{{ prefect.blocks.secret.slmforge-aws-secret-access-key }}"
        assert [p.name for p in client.read_work_pools()].count("gpu") == 1
        assert client.read_global_concurrency_limit_by_name("gpu").limit == WORKERS
        control = client.read_work_pool("control")
        assert control.type == "process" and control.concurrency_limit is None
        assert "CUDA_VISIBLE_DEVICES" not in control.base_job_template["variables"]["properties"]["env"]["default"]
        deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        assert set(deployments) == {"finetune/nightly", "compare/on-demand", "compare-model/fan-out"}, deployments.keys()
        assert deployments["compare/on-demand"].work_pool_name == "control"
        assert deployments["compare-model/fan-out"].work_pool_name == "gpu"
        nightly = deployments["finetune/nightly"]
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        assert nightly.schedules[0].schedule.timezone == "UTC"
        assert nightly.work_pool_name == "gpu" and "nightly" in nightly.tags and nightly.description
        params = json.dumps(nightly.parameters)
        assert "AWS" not in params and nightly.parameters["cfg"]["storage"]["url"] == "s3://slmforge/store"
        # `--nightly-set` made the nightly's own settings small: they are its default parameters
        assert nightly.parameters["cfg"]["model"]["source"] == str(stack.tiny_model_dir)
        assert nightly.parameters["cfg"]["train"]["max_steps"] == 2
        assert "cfg" in nightly.parameter_openapi_schema["properties"]  # the form the UI draws
        assert len(client.read_automations_by_name("slmforge: nightly finetune failed or crashed")) == 1
        workers = client.read_workers_for_work_pool("gpu")
        assert [w.status.value for w in workers] == ["ONLINE"] * WORKERS
        assert [w.status.value for w in client.read_workers_for_work_pool("control")] == ["ONLINE"]
        try:
            client.read_block_document_by_name("slmforge-aws-access-key-id", "secret")
        except ObjectNotFound:
            pytest.fail("the S3 key is not in a Secret block")
    # the worker itself has no S3 keys: a run reaches the bucket only through the pool's env job variables
    worker_env = Path(f"/proc/{before['worker']}/environ").read_bytes().split(b"\0")
    assert not any(v.startswith(b"AWS_") for v in worker_env)


@e2e
def test_nightly_run_completes_with_artifacts_in_the_bucket(stack, tiny_model_dir):
    run = stack.trigger({"cfg": stack.cfg(tiny_model_dir)})
    assert run.state.is_completed(), f"{run.state}\n{stack.logs()}"
    stack.completed_run_id = str(run.id)
    states = stack.task_states(run.id)
    assert all(states[s] == "Completed" for s in STAGES), states

    fs = stack.s3()
    files = fs.find(f"{stack.bucket}/e2e")
    top = {f.split("/")[2] for f in files}
    assert {"datasets", "models", "adapters", "merged", "eval", "prefect-results"} <= top, top
    manifests = [f for f in files if f.endswith("MANIFEST.json")]
    assert any(f.split("/")[2] == "adapters" for f in manifests)
    assert any(f.endswith("adapter_model.safetensors") for f in files)
    # the task results (JSON records) are in the bucket, through the saved RemoteFileSystem block
    results = [f for f in files if f.split("/")[2] == "prefect-results"]
    assert len(results) >= len(STAGES)
    with stack.api() as client:
        blocks = {b.name: b for b in client.read_block_documents() if b.name.startswith("slmforge-results-")}
        assert any(b.data.get("basepath") == f"s3://{stack.bucket}/e2e/prefect-results" for b in blocks.values())


@e2e
def test_second_trigger_is_served_from_the_cache(stack, tiny_model_dir):
    assert stack.completed_run_id is not None, "the first run did not complete (see the test before this one)"
    # the README's command, with the same small config: a new process on the worker, cache in S3
    r = stack.run(["prefect", "deployment", "run", "finetune/nightly", "--params",
                   json.dumps({"cfg": stack.cfg(tiny_model_dir)}), "--watch", "--watch-timeout", str(RUN_TIMEOUT)],
                  check=False, timeout=RUN_TIMEOUT + 60)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert r.returncode == 0 and run_id, f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}\n{stack.logs()}"
    states = stack.task_states(run_id.group(1))
    assert all(states[s] == "Cached" for s in STAGES), states


@e2e
def test_crashed_run_is_rerun_once_and_resumes_from_its_checkpoint(stack, tiny_model_dir):
    """SIGKILL of the flow-run process after the first checkpoint: the worker marks the run Crashed,
    the automation schedules the same run again, and the re-run resumes training from the store."""
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg = stack.cfg(tiny_model_dir, prefix="e2e-crash", train={"max_steps": 4, "save_steps": 2})
    with stack.api() as client:
        env = dict(client.read_work_pool("gpu").base_job_template["variables"]["properties"]["env"]["default"])
    env["SLMFORGE_INJECT_FAULT"] = "kill-after-checkpoint"  # kills a fresh run only, never the resumed one
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        run = run_deployment("finetune/nightly", parameters={"cfg": cfg}, job_variables={"env": env}, timeout=0)
    deadline = time.monotonic() + 2 * RUN_TIMEOUT
    with stack.api() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run.id)
            if run.state.type == StateType.COMPLETED or (run.state.is_final() and run.run_count > 1):
                break
            time.sleep(2)
        history = [s.name for s in client.read_flow_run_states(run.id)]
    assert run.state.is_completed(), f"{run.state} {history}\n{stack.logs()}"
    assert "Crashed" in history and "Resuming" in history, history
    assert run.run_count == 2, (run.run_count, " > ".join(history))
    fs = stack.s3()
    metrics = [f for f in fs.find(f"{stack.bucket}/e2e-crash/adapters") if f.endswith("train_metrics.json")]
    assert metrics, "no adapter in the bucket"
    train = json.loads(fs.cat(metrics[0]))
    assert train["steps"] == 4 and train["resumed_from_step"] == 2, train


@e2e
def test_failed_nightly_run_is_posted_to_the_webhook(stack, tiny_model_dir):
    run = stack.trigger({"cfg": stack.cfg(tiny_model_dir, model={"source": "/nonexistent/model-dir"})})
    assert run.state.is_failed(), run.state
    # Other tests' runs (a crashed one, say) post to the same hook, so look for this run's post.
    deadline = time.monotonic() + 60
    ours = []
    while time.monotonic() < deadline and not ours:
        ours = [p for p in stack.webhook.posts if run.name in p["body"]]
        time.sleep(1)
    assert ours, f"no notification for {run.name} within 60 s: {stack.webhook.posts}\n{stack.logs()}"
    post = ours[-1]
    assert post["path"] == "/slmforge-hook"
    assert "Failed" in post["body"], post


@e2e
def test_the_schedule_fires_and_the_worker_runs_the_deployments_own_parameters(stack):
    """`slmforge up --cron` for the coming minute: Prefect's scheduler creates the run (auto-scheduled,
    with the deployment's default parameters, nothing passed by the test), the worker picks it up
    when it is due and it completes. The 02:00 schedule is put back afterwards."""
    from datetime import datetime, timedelta, timezone

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    soon = datetime.now(timezone.utc) + timedelta(seconds=20)
    fire = soon.replace(second=0, microsecond=0) + timedelta(minutes=1)
    run = None
    try:
        stack.up(cron=f"{fire.minute} {fire.hour} * * *")
        with stack.api() as client:
            nightly = client.read_deployment_by_name("finetune/nightly")
            deadline = time.monotonic() + (fire - datetime.now(timezone.utc)).total_seconds() + RUN_TIMEOUT
            while time.monotonic() < deadline:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[nightly.id])))
                due = [r for r in runs if r.auto_scheduled and r.expected_start_time == fire]
                if due and due[0].state.is_final():
                    run = due[0]
                    break
                time.sleep(2)
            history = [s.name for s in client.read_flow_run_states(run.id)] if run else []
    finally:
        stack.up()  # the 02:00 schedule again, and no more runs at this minute
    assert run is not None, f"no scheduled run for {fire} completed in time\n{stack.logs()}"
    assert run.state.is_completed(), f"{run.state} {history}\n{stack.logs()}"
    assert history[0] == "Scheduled" and "Running" in history, history
    assert run.parameters == nightly.parameters, "the scheduled run ran the deployment's own parameters"
    assert run.parameters["cfg"]["model"]["source"] == str(stack.tiny_model_dir)
    states = stack.task_states(run.id)
    assert all(states[s] in ("Completed", "Cached") for s in STAGES), states


def worker_of_each_run(stack, since: str, run_ids: list[str], timeout: float = 30) -> dict[str, str]:
    """Which worker submitted each flow run, from the workers' own `prefect.worker.submitted-flow-run`
    events (a flow run records no worker; the event names both)."""
    import urllib.request

    body = json.dumps({"filter": {"event": {"name": ["prefect.worker.submitted-flow-run"]},
                                  "occurred": {"since": since}}, "limit": 50}).encode()
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # events are written a moment after they are emitted
        req = urllib.request.Request(f"{stack.api_url}/events/filter", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            events = json.loads(r.read())["events"]
        for e in events:
            for rel in e.get("related", []):
                run = rel["prefect.resource.id"].removeprefix("prefect.flow-run.")
                if rel.get("prefect.resource.role") == "flow-run" and run in run_ids:
                    found[run] = e["resource"]["prefect.resource.name"]
        if len(found) == len(run_ids):
            break
        time.sleep(1)
    return found


def gpu_pool_busy(stack) -> list[str]:
    """What could keep a gpu worker from taking a new run: a worker not ONLINE, or a run of the gpu
    pool still pending or running (an earlier test's, which also holds one of the pool's slots)."""
    import urllib.request

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    req = urllib.request.Request(f"{stack.api_url}/work_pools/gpu/workers/filter", data=b"{}",
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        workers = {w["name"]: w.get("status") for w in json.loads(r.read())}
    busy = [f"worker {n}: {st}" for n, st in sorted(workers.items()) if st != "ONLINE"]
    if len(workers) < WORKERS:
        busy.append(f"{len(workers)} gpu worker(s) registered, {WORKERS} expected")
    with stack.api() as client:
        active = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]))))
    return busy + [f"run {r.name} ({r.id}): {r.state.name}" for r in active if r.work_pool_name == "gpu"]


def compare_on_pool(stack, cfg: dict):
    """compare/on-demand once; its compare-model runs and the worker that submitted each."""
    from datetime import datetime, timezone

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    since = datetime.now(timezone.utc).isoformat()
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        parent = run_deployment("compare/on-demand", parameters={"cfg": cfg}, timeout=RUN_TIMEOUT, poll_interval=2)
    assert parent.state.is_completed(), (parent.state, stack.logs())
    with stack.api() as client:
        per_model = client.read_deployment_by_name("compare-model/fan-out")
        children = [r for r in client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[per_model.id])),
            flow_run_filter=FlowRunFilter()) if r.parameters.get("part_key", "").startswith(f"compare/parts/{parent.id}/")]
    return parent, children, worker_of_each_run(stack, since, [str(r.id) for r in children])


@e2e
def test_compare_runs_one_model_on_each_worker_and_writes_one_report(stack, tiny_model_dir, tmp_path):
    """compare/on-demand (on the control pool) starts one compare-model/fan-out run per model on the
    gpu pool; with two gpu workers each measures one model at the same time, and the comparison
    collects both rows into one report in the bucket.

    Workers poll (every 2 s here), and the comparison creates its model runs a few seconds apart:
    when a model run is shorter than that, the worker that finished the first can take the second
    too. That happened once in CI with runs of 4-5 s. So the runs here decode for about 10 s more
    (they overlapped by 4 s on this machine), the test first waits for both workers to be idle,
    and a comparison that went to one worker, or whose runs did not overlap, is tried once more,
    with the first try's logs in the message if that fails too. A fan-out that never spreads (runs
    started one after the other, a pool limit of 1) fails both tries."""
    import shutil

    second = tmp_path / "tiny-llama-copy"
    shutil.copytree(tiny_model_dir, second)
    cfg = {"models": [str(tiny_model_dir), str(second)], "modes": ["bf16"], "threads": 1,
           "prompts": ["What is 2+2?"], "answer_max_new_tokens": 4,
           "eval": {"items": 2, "max_new_tokens": 4, "batch_size": 2},
           # about 10 s of decoding in each model run, so the two overlap by more than the seconds
           # between their creation (2-5 s on 2 busy cores) and the workers' polls (2 s)
           "speed": {"batch_sizes": [1], "new_tokens": 250, "runs": 6, "warmup": 0},
           "storage": {"endpoint_url": stack.s3_endpoint}}
    tries = []
    for attempt in range(2):
        cfg["storage"]["url"] = f"s3://{stack.bucket}/fan-out-{attempt}"  # one report per try
        deadline = time.monotonic() + 120
        while (busy := gpu_pool_busy(stack)) and time.monotonic() < deadline:
            time.sleep(2)
        assert not busy, f"the gpu pool is not idle before the comparison: {busy}\n{stack.logs()}"
        parent, children, workers = compare_on_pool(stack, cfg)
        states = {r.parameters["spec"]: r.state.name for r in children}
        assert states == {str(tiny_model_dir): "Completed", str(second): "Completed"}, states
        spread = len(workers) == 2 and len(set(workers.values())) == 2
        overlapped = max(r.start_time for r in children) < min(r.end_time for r in children)
        tries.append(f"workers {workers}; runs (created, start, end): "
                     f"{[(str(r.created), str(r.start_time), str(r.end_time)) for r in children]}\n{stack.logs(80)}")
        if spread and overlapped:
            break
    assert spread, "both models on one worker, twice:\n" + "\n".join(tries)
    assert overlapped, "the two model runs did not run at the same time, twice:\n" + "\n".join(tries)
    assert set(workers.values()) <= {f"slmforge-127.0.0.1-{stack.port}", f"slmforge-127.0.0.1-{stack.port}-2"}
    # the comparison started both model runs before either ended: it waits for them together
    assert max(r.created for r in children) < min(r.end_time for r in children), [(r.created, r.end_time) for r in children]

    fs = stack.s3()  # the comparison's own result is not persisted: its report in the bucket is
    reports = [f for f in fs.find(f"{stack.bucket}/fan-out-{attempt}/compare") if f.endswith("/results.json")]
    assert len(reports) == 1, reports
    rows = json.loads(fs.cat(reports[0]))["rows"]
    assert sorted((r["model"], r["mode"], r["status"]) for r in rows) == sorted(
        [(tiny_model_dir.name, "bf16", "ok"), (second.name, "bf16", "ok")]), rows


@e2e
def test_down_stops_exactly_what_up_started_and_keeps_the_data(stack):
    procs = stack.processes()
    assert set(procs) == set(stack.settings.services())
    pids = {pid for p in procs.values() for pid in process_tree(p.pid)}
    ports = [stack.port] + list(stack.settings.weed_ports().values())
    out = stack.down().stdout
    assert "stopped" in out
    left = [p for p in pids if alive(p)]
    assert not left, f"still running after down: {left}"
    assert not [p for p in ports if port_open(p)]
    assert not stack.processes()
    assert (stack.state_dir / "prefect" / "prefect.db").is_file()
    assert any((stack.state_dir / "seaweedfs").iterdir())
    assert "nothing was running" in stack.down().stdout  # twice: a no-op


def test_nightly_settings_are_validated_and_keep_the_deployments_store():
    from deployments.deploy import nightly_settings
    from slmforge.config import ConfigError

    assert nightly_settings(None, ["train.max_steps=3"])["train"]["max_steps"] == 3
    assert "storage" not in nightly_settings(None, [])
    with pytest.raises(ConfigError, match=r"^train.epochs:"):
        nightly_settings(None, ["train.epochs=-1"])
    with pytest.raises(ConfigError, match=r"--nightly-set storage\.\*"):
        nightly_settings(None, ["storage.url=s3://elsewhere/x"])
