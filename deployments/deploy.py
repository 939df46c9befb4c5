"""Deployments as code: `finetune/nightly` (cron), `compare/on-demand` and `compare-model/fan-out`.

Everything here is an upsert against whatever Prefect API `api_url` (or PREFECT_API_URL) names,
so running it twice changes nothing, and the same call targets the local stack (`slmforge up`)
or a remote server:

    python -m deployments.deploy --api-url http://prefect.example:4200/api \\
        --storage-url s3://my-bucket/slmforge --timezone Europe/Berlin --gpu-slots 4

What it creates:
- the work pool `gpu` (type `process`, `docker` or `kubernetes`; at most `--gpu-slots` flow runs
  at once, one per GPU machine: start each machine's worker with `--limit 1`); its base job
  template's `env` passes the S3 endpoint/region, CUDA_VISIBLE_DEVICES only when given (else a run
  uses every GPU its machine or container has: train.processes=auto, one rank each) and — when given — the S3
  keys as references to Secret blocks (`{{ prefect.blocks.secret.… }}`, resolved by the worker),
  so no credential is a flow parameter;
- the work pool `control` (type `process`, no GPU): the comparison's own flow run, which only
  starts one `compare-model` run per model on `gpu` and waits for them (on `gpu` it would hold a
  GPU worker while waiting, and with one worker wait forever);
- the global concurrency limit `gpu` (`--gpu-slots` slots) that the GPU-heavy tasks take;
- the saved RemoteFileSystem result-storage block for the store (the flow saves the same block);
- the deployments, whose only parameter is the typed config the UI draws as a form;
- an automation that re-runs a crashed run once (it resumes from its last checkpoint);
- optionally, an automation that posts failed/crashed nightly runs to a webhook block.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from deployments.pools import IMAGE, POOL_TYPES, base_job_template
from tasks.gpu import GPU_LIMIT_ENV
from tasks.secrets import STORE_SECRETS_ENV

PROJECT_DIR = Path(__file__).resolve().parent.parent

POOL = "gpu"
CONTROL_POOL = "control"
GPU_LIMIT = "gpu"
NIGHTLY = "nightly"
ON_DEMAND = "on-demand"
FAN_OUT = "fan-out"  # compare-model/fan-out: CompareConfig.per_model_deployment's default
TAGS = ["slmforge", "gpu"]
SECRET_KEY_ID = "slmforge-aws-access-key-id"
SECRET_KEY = "slmforge-aws-secret-access-key"
WEBHOOK_BLOCK = "slmforge-failures"
AUTOMATION = "slmforge: nightly finetune failed or crashed"
RERUN_AUTOMATION = "slmforge: re-run a crashed run once"
RERUN_STATE = "Resuming"
RERUN_AFTER_S = 15

NOTIFY_BODY = (
    "slmforge: flow run {{ flow_run.name }} of {{ flow.name }}/{{ deployment.name }} "
    "entered {{ flow_run.state.name }}: {{ flow_run.state.message }}\n{{ flow_run|ui_url }}"
)


def check_visible_devices(value: str | None) -> None:
    """An empty CUDA_VISIBLE_DEVICES hides every GPU: the gpu pool's runs would train on the CPU, silently."""
    if value is not None and value.strip() in ("", "-1"):
        raise ValueError(f"--cuda-visible-devices {value!r}: hides every GPU, so the gpu pool's runs would train on "
                         "the CPU; leave it out to give each run every GPU of its machine, or name GPUs (0,1)")


def job_env(endpoint_url: str | None, region: str | None, cuda_visible_devices: str | None,
            credentials_in_secrets: bool, pool_type: str = "process") -> dict[str, str]:
    """The `env` job variable of the work pool: what every flow run on it starts with. The store's
    keys, when kept in Secret blocks: a process worker resolves the block references into the run's
    environment; a container's job definition (docker, kubernetes) would hold the resolved values,
    so there it names the blocks and the flow reads them when it starts."""
    env: dict[str, str] = {GPU_LIMIT_ENV: GPU_LIMIT}
    check_visible_devices(cuda_visible_devices)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    if region:
        env["AWS_DEFAULT_REGION"] = region
    if credentials_in_secrets and pool_type != "process":
        env[STORE_SECRETS_ENV] = f"{SECRET_KEY_ID},{SECRET_KEY}"
    elif credentials_in_secrets:
        env["AWS_ACCESS_KEY_ID"] = "{{ prefect.blocks.secret.%s }}" % SECRET_KEY_ID
        env["AWS_SECRET_ACCESS_KEY"] = "{{ prefect.blocks.secret.%s }}" % SECRET_KEY
    return env


def ensure_work_pool(client, name: str, env: dict[str, str], limit: int | None = 1, pool_type: str = "process",
                     description: str | None = None, **template_options) -> None:
    """Create the pool, or update its template and limit. A pool's type cannot change: a pool of
    another type is refused with what to do."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    template = base_job_template(pool_type, env, **template_options)
    description = description or (f"slmforge GPU machines ({pool_type}): one flow run at a time per worker "
                                  f"(`prefect worker start --pool {name} --type {pool_type} --limit 1`)")
    try:
        current = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template,
                                               concurrency_limit=limit, description=description))
        return
    if current.type != pool_type:
        raise ValueError(f"--pool-type {pool_type}: work pool {name!r} exists with type {current.type!r}; "
                         f"delete it (`prefect work-pool delete {name}`) or choose another --pool name")
    client.update_work_pool(name, WorkPoolUpdate(base_job_template=template, concurrency_limit=limit,
                                                 description=description))


def ensure_global_limit(client, name: str = GPU_LIMIT, limit: int = 1) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        current = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        return
    if current.limit != limit or not current.active:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))


def ensure_automation(client, deployment_id, webhook_url: str | None, log=print) -> str | None:
    """A webhook notification for failed/crashed runs of the nightly deployment. Without a URL: skip."""
    from prefect.automations import AutomationCore
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    if not webhook_url:
        log("notifications: no webhook URL configured (--webhook-url or SLMFORGE_WEBHOOK_URL); "
            "failed nightly runs are not reported")
        return None
    block = CustomWebhookNotificationBlock(
        name="slmforge", url=webhook_url, method="POST",
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"})
    block_id = block.save(WEBHOOK_BLOCK, overwrite=True)
    for old in client.read_automations_by_name(AUTOMATION):
        client.delete_automation(old.id)
    automation = AutomationCore(
        name=AUTOMATION,
        description="Posts a failed or crashed finetune/nightly run to the slmforge-failures webhook block.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive, threshold=1, within=0),
        actions=[SendNotification(block_document_id=block_id,
                                  subject="slmforge nightly finetune: {{ flow_run.state.name }}",
                                  body=NOTIFY_BODY)],
    )
    created = client.create_automation(automation)
    log(f"notifications: failed/crashed nightly runs are posted to {webhook_url}")
    return str(created)


def ensure_crash_rerun(client, deployment_ids: list[str], log=print) -> str:
    """Re-run a crashed run of our deployments once, in place.

    A run whose process was killed (SIGKILL, OOM killer, machine lost) ends `Crashed`, which task
    `retries` cannot catch. This automation moves such a run back to `Scheduled` (named
    `Resuming`), so the worker starts the same flow run again with the same parameters: finished
    stages are cache hits and training resumes from its last checkpoint in the store. Only a
    crash on the first run (`prefect.run-count` 1) matches, so a run that crashes again stays
    `Crashed` (and the failure automation reports it) instead of looping.

    It waits RERUN_AFTER_S of quiet first (a proactive trigger: it fires when no other state
    change of the run follows the crash in that time). A worker reports a killed process as
    crashed twice, seconds apart (its runner, then the worker itself); re-run on the first report,
    another worker could claim the run in between and the late report would crash that new
    attempt, re-run it again and leave two processes training the same run (seen with two
    workers, tests/test_stack.py). Someone re-running it by hand in that time also wins.
    """
    from prefect.automations import AutomationCore
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    for old in client.read_automations_by_name(RERUN_AUTOMATION):
        client.delete_automation(old.id)
    automation = AutomationCore(
        name=RERUN_AUTOMATION,
        description="Moves a crashed finetune/compare run back to Scheduled once; training resumes from "
                    "its last checkpoint.",
        trigger=EventTrigger(
            after={"prefect.flow-run.Crashed"},
            expect={"!prefect.flow-run.Crashed"},  # anything else that happens to the run calls it off
            match={"prefect.resource.id": "prefect.flow-run.*", "prefect.run-count": "1"},
            match_related={"prefect.resource.id": [f"prefect.deployment.{d}" for d in deployment_ids]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1, within=timedelta(seconds=RERUN_AFTER_S)),
        actions=[ChangeFlowRunState(
            state=StateType.SCHEDULED, name=RERUN_STATE,
            message="slmforge: re-run once after a crash; finished stages are cached, training resumes")],
    )
    created = client.create_automation(automation)
    log(f"crashed runs: re-run once automatically, {RERUN_AFTER_S} s after the crash (training resumes from its "
        "last checkpoint)")
    return str(created)


def deploy_all(api_url: str | None = None, pool: str = POOL, cron: str = "0 2 * * *", timezone: str = "UTC",
               storage_url: str = "s3://slmforge/store", endpoint_url: str | None = None,
               region: str | None = None, cuda_visible_devices: str | None = None,
               aws_access_key_id: str | None = None, aws_secret_access_key: str | None = None,
               webhook_url: str | None = None, gpu_slots: int = 1, source: Path | str = PROJECT_DIR,
               nightly_config: str | Path | None = None, nightly_overrides: list[str] | tuple[str, ...] = (),
               pool_type: str = "process", pool_options: dict | None = None, log=print) -> dict[str, Any]:
    """Create or update the pool, limits, blocks, deployments and automation. Returns their ids/names.

    `nightly_config` (YAML) and `nightly_overrides` (`key=value`) are the finetune settings the
    nightly deployment runs with (its default parameters: what a scheduled run and the UI's Run
    button use), read and validated by the same `load_config` as `slmforge finetune`; the store
    is always `storage_url`.
    `pool_type`: process, docker or kubernetes (`deployments.pools`); `pool_options`: that template's
    options (image, gpus, node_selector, tolerations, credentials_secret).
    `gpu_slots`: GPUs the pool has (machines × GPUs per flow run): the `gpu` pool runs that many
    flow runs at once and the global `gpu` limit has that many slots.
    `endpoint_url`/`region` default to AWS_ENDPOINT_URL/AWS_DEFAULT_REGION of this process.
    Credentials: given keys go into Secret blocks that the pool's env references; without them the
    flow runs use whatever the worker's environment provides (an instance role, AWS_* variables).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    nightly = nightly_settings(nightly_config, nightly_overrides)  # a bad setting fails before anything changes
    if gpu_slots < 1:
        raise ValueError(f"--gpu-slots {gpu_slots}: must be 1 or more")
    check_visible_devices(cuda_visible_devices)
    endpoint_url = endpoint_url if endpoint_url is not None else os.environ.get("AWS_ENDPOINT_URL")
    region = region if region is not None else os.environ.get("AWS_DEFAULT_REGION")
    if api_url:
        with temporary_settings({PREFECT_API_URL: api_url}):
            return _deploy_all(pool, cron, timezone, storage_url, endpoint_url or None, region or None,
                               cuda_visible_devices, aws_access_key_id, aws_secret_access_key, webhook_url,
                               gpu_slots, Path(source), nightly, pool_type, pool_options or {}, log)
    return _deploy_all(pool, cron, timezone, storage_url, endpoint_url or None, region or None,
                       cuda_visible_devices, aws_access_key_id, aws_secret_access_key, webhook_url, gpu_slots,
                       Path(source), nightly, pool_type, pool_options or {}, log)


def nightly_settings(path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> dict:
    """The nightly's finetune settings as data (validated; ConfigError names the field). The store is
    the deployment's, so `storage.*` cannot be set here."""
    from slmforge.config import ConfigError, load_config

    if any(o.strip().startswith("storage.") for o in overrides):
        raise ConfigError("--nightly-set storage.*: the nightly deployment's store is --storage-url / the stack's bucket")
    cfg = load_config(path, list(overrides))
    return cfg.model_dump(mode="json", exclude={"storage"})


def _deploy_all(pool, cron, timezone, storage_url, endpoint_url, region, cuda_visible_devices, key_id, key,
                webhook_url, gpu_slots, source: Path, nightly: dict, pool_type: str, pool_options: dict,
                log) -> dict[str, Any]:
    from prefect import flow as prefect_flow
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.schedules import Cron

    from slmforge.config import FinetuneConfig, StorageConfig
    from tasks.caching import result_storage

    storage = StorageConfig(url=storage_url, endpoint_url=endpoint_url)
    with_secrets = bool(key_id and key)
    if with_secrets:
        Secret(value=key_id).save(SECRET_KEY_ID, overwrite=True)
        Secret(value=key).save(SECRET_KEY, overwrite=True)
    env = job_env(endpoint_url, region, cuda_visible_devices, with_secrets, pool_type)
    control_env = {k: v for k, v in job_env(endpoint_url, region, None, with_secrets).items() if k != GPU_LIMIT_ENV}
    out: dict[str, Any] = {"pool": pool, "control_pool": CONTROL_POOL, "env": env, "deployments": {}}
    with get_client(sync_client=True) as client:
        ensure_work_pool(client, pool, env, limit=gpu_slots, pool_type=pool_type, **pool_options)
        ensure_work_pool(client, CONTROL_POOL, control_env, limit=None, description=(
            "slmforge flow runs that only start and wait for others (a comparison fanned out over the gpu "
            f"pool); no GPU: `prefect worker start --pool {CONTROL_POOL} --type process`"))
        ensure_global_limit(client, GPU_LIMIT, gpu_slots)
        # The block the flow saves at start; saved here too so it is in the UI before the first run.
        # s3fs needs the endpoint in the block's settings (credentials stay in the environment).
        out["result_storage"] = result_storage(storage).basepath

        def deploy(entrypoint: str, name: str, work_pool: str, cfg, tags: list[str], description: str, **kw):
            """One deployment of a flow in this checkout (`source`); its parameter is the typed config."""
            deployment_id = prefect_flow.from_source(source=str(source), entrypoint=entrypoint).deploy(
                name=name, work_pool_name=work_pool, parameters={"cfg": cfg.model_dump(mode="json")},
                tags=TAGS + tags, description=description, version=_version(), build=False, push=False,
                print_next_steps=False, ignore_warnings=True, **kw)
            out["deployments"][f"{entrypoint.rsplit(':', 1)[1].replace('_', '-')}/{name}"] = str(deployment_id)
            return deployment_id

        from slmforge.compare_config import CompareConfig

        nightly_id = deploy(
            "flows/finetune.py:finetune", NIGHTLY, pool, FinetuneConfig.model_validate({**nightly, "storage": storage}),
            ["nightly"], schedules=[Cron(cron, timezone=timezone)],
            description=f"Nightly QLoRA fine-tune ({cron}, {timezone}): prepare → 4-bit base → train → calibrate → merge → "
                        "evaluate → publish if it beats the base. Unchanged stages are cache hits. Edit `cfg` "
                        "to change the model, data or store for one run.")
        log(f"deployment finetune/{NIGHTLY}: cron {cron!r} ({timezone}) on work pool {pool!r}")
        compare_id = deploy(
            "flows/compare.py:compare", ON_DEMAND, CONTROL_POOL, CompareConfig(storage=storage), ["compare"],
            description="Compare small LMs in bf16 / 8-bit / 4-bit on quality, memory and speed; "
                        "report, CSV/JSON and chart in the store. Each model runs as its own compare-model/"
                        f"{FAN_OUT} flow run on the {pool!r} pool (all at once when it has several workers); "
                        "this run waits on the control pool. Run it from the UI or "
                        "`prefect deployment run compare/on-demand`.")
        log(f"deployment compare/{ON_DEMAND}: on demand, work pool {CONTROL_POOL!r} (it fans out over {pool!r})")
        per_model_id = deploy(
            "flows/compare.py:compare_model", FAN_OUT, pool, CompareConfig(storage=storage), ["compare"],
            description="One model of a comparison, every precision, on one GPU worker; started by compare/"
                        f"{ON_DEMAND} for each of its models, not by hand.")
        log(f"deployment compare-model/{FAN_OUT}: one model per flow run, work pool {pool!r} ({gpu_slots} at once)")
        if pool_type != "process":  # the code is in the image, not at this machine's path
            for deployment_id in (nightly_id, per_model_id):
                run_from_image(client, deployment_id, pool_options.get("image") or IMAGE)
            log(f"GPU deployments run in image {pool_options.get('image') or IMAGE!r} from {IMAGE_WORKDIR}")

        # A crashed model run is not re-run: its comparison has already recorded the row's error.
        out["rerun_automation"] = ensure_crash_rerun(client, [str(nightly_id), str(compare_id)], log=log)
        out["automation"] = ensure_automation(client, nightly_id, webhook_url, log=log)
    return out


IMAGE_WORKDIR = "/opt/slmforge"  # the project's place in deployments/Dockerfile


def run_from_image(client, deployment_id, image: str) -> None:
    """A docker or kubernetes pool runs the flow from the image: its pull step changes into the
    project's directory there (not this machine's checkout), and the image is a job variable."""
    from prefect.client.schemas.actions import DeploymentUpdate

    client.update_deployment(deployment_id, DeploymentUpdate(
        pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_WORKDIR}}],
        job_variables={"image": image}))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("slmforge")
    except Exception:  # noqa: BLE001 - not installed: a source checkout
        return "dev"


def pool_options(args) -> dict:
    """The chosen pool type's template options from the command line."""
    if args.pool_type == "process":
        return {}
    options = {"image": args.image}
    if args.pool_type == "kubernetes":
        options.update(gpus=args.gpus, node_selector=args.node_selector, tolerations=args.tolerations,
                       credentials_secret=args.credentials_secret)
    return options


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL"), help="Prefect API (default PREFECT_API_URL)")
    p.add_argument("--pool", default=POOL)
    p.add_argument("--cron", default="0 2 * * *")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--storage-url", default="s3://slmforge/store")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default AWS_ENDPOINT_URL; empty for AWS)")
    p.add_argument("--region", default=None, help="default AWS_DEFAULT_REGION")
    p.add_argument("--cuda-visible-devices", default=None,
                   help="GPUs each flow run sees (default: all of its machine's or container's; with "
                        "train.processes=auto, one training process each)")
    p.add_argument("--gpu-slots", type=int, default=1,
                   help="GPUs in the pool (machines x GPUs per flow run): flow runs of the gpu pool at once and "
                        "slots of the global `gpu` limit (default 1)")
    p.add_argument("--credentials-from-env", action="store_true",
                   help="store this shell's AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in Secret blocks that the "
                        "work pool passes to flow runs (default: the worker's own environment provides them)")
    p.add_argument("--webhook-url", default=os.environ.get("SLMFORGE_WEBHOOK_URL"))
    p.add_argument("--nightly-config", metavar="FILE.yaml", help="finetune settings of the nightly runs (YAML)")
    p.add_argument("--pool-type", choices=POOL_TYPES, default="process",
                   help="process (a worker on each GPU machine), docker (a container per run, GPUs through "
                        "device requests) or kubernetes (a Job per run requesting nvidia.com/gpu)")
    p.add_argument("--image", default=IMAGE, help="docker/kubernetes: the image flow runs use (deployments/Dockerfile)")
    p.add_argument("--gpus", type=int, default=1, help="kubernetes: nvidia.com/gpu per flow run")
    p.add_argument("--node-selector", type=json.loads, default=None, metavar="JSON",
                   help='kubernetes: e.g. \'{"nvidia.com/gpu.present": "true"}\'')
    p.add_argument("--tolerations", type=json.loads, default=None, metavar="JSON",
                   help='kubernetes: e.g. \'[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]\'')
    p.add_argument("--credentials-secret", default=None,
                   help="kubernetes: a Secret in the job's namespace with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                        "(and HF_TOKEN), passed as the container's envFrom")
    p.add_argument("--nightly-set", dest="nightly_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="one finetune setting of the nightly runs (repeatable), e.g. train.epochs=3")
    args = p.parse_args(argv)
    key_id = os.environ.get("AWS_ACCESS_KEY_ID") if args.credentials_from_env else None
    key = os.environ.get("AWS_SECRET_ACCESS_KEY") if args.credentials_from_env else None
    from slmforge.config import ConfigError

    try:  # a wrong setting or a missing worker package: one line naming it
        deploy_all(args.api_url, pool=args.pool, cron=args.cron, timezone=args.timezone, storage_url=args.storage_url,
                   endpoint_url=args.endpoint_url, region=args.region, cuda_visible_devices=args.cuda_visible_devices,
                   gpu_slots=args.gpu_slots,
                   aws_access_key_id=key_id, aws_secret_access_key=key, webhook_url=args.webhook_url,
                   nightly_config=args.nightly_config, nightly_overrides=args.nightly_overrides,
                   pool_type=args.pool_type, pool_options=pool_options(args))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
