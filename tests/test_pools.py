"""The `gpu` pool's job definitions for a flow run, rendered by prefect-docker's and
prefect-kubernetes' own code (their job configuration classes, as their workers call them; no
docker daemon, no cluster): the GPU request, the image, the env, and no secret value anywhere."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from deployments.deploy import SECRET_KEY, SECRET_KEY_ID, job_env
from deployments.pools import GPU_REQUEST, SHM_GIB, base_job_template

FAKE_ID = "FAKEpoolKEYID0123456789"
FAKE_KEY = "FAKEpoolSECRET/0123456789+abcdefXYZ"
IMAGE = "registry.example.com/slmforge:1.2"
NODES = {"nvidia.com/gpu.product": "NVIDIA-H200"}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@pytest.fixture
def secret_blocks(prefect_api):
    from prefect.blocks.system import Secret

    Secret(value=FAKE_ID).save(SECRET_KEY_ID, overwrite=True)
    Secret(value=FAKE_KEY).save(SECRET_KEY, overwrite=True)


def _render(pool_type: str, cuda_visible_devices: str | None = None, **options):
    """What the worker does with a flow run: template + job variables -> configuration -> prepared."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun

    if pool_type == "docker":
        from prefect_docker.worker import DockerWorker as Worker
    else:
        from prefect_kubernetes.worker import KubernetesWorker as Worker
    env = job_env("http://s3.internal:8333", "us-east-1", cuda_visible_devices, credentials_in_secrets=True,
                  pool_type=pool_type)
    template = base_job_template(pool_type, env, image=IMAGE, **options)

    async def build():
        async with get_client() as client:
            return await Worker.job_configuration.from_template_and_values(template, {}, client=client)

    config = asyncio.run(build())
    run = FlowRun(id=uuid.uuid4(), name="quiet-otter", flow_id=uuid.uuid4())
    config.prepare_for_flow_run(run)
    return config, json.dumps(config.model_dump(mode="json"), default=str)


def test_docker_job_gets_the_gpus_the_image_and_no_secret(secret_blocks):
    config, rendered = _render("docker", cuda_visible_devices="0")
    assert config.image == IMAGE
    assert config.container_create_kwargs["device_requests"] == [GPU_REQUEST]
    assert config.container_create_kwargs["shm_size"] == f"{SHM_GIB}g", "NCCL needs more than docker's 64 MB /dev/shm"
    env = config.env
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["AWS_ENDPOINT_URL"] == "http://s3.internal:8333"
    assert env["SLMFORGE_GPU_LIMIT"] == "gpu" and env["SLMFORGE_STORE_SECRET_BLOCKS"] == f"{SECRET_KEY_ID},{SECRET_KEY}"
    assert "PREFECT__FLOW_RUN_ID" in env, "the worker's own variables are there: the run can report back"
    assert FAKE_ID not in rendered and FAKE_KEY not in rendered


def test_kubernetes_job_requests_gpus_on_the_chosen_nodes_with_no_secret(secret_blocks):
    config, rendered = _render("kubernetes", gpus=2, node_selector=NODES, tolerations=TOLERATIONS,
                               credentials_secret="slmforge-s3", shm_gib=32)
    pod = config.job_manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # NCCL's /dev/shm: a memory-backed emptyDir mounted there
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}}]
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert container["image"] == IMAGE
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 2
    assert pod["nodeSelector"] == NODES and pod["tolerations"] == TOLERATIONS
    assert container["envFrom"] == [{"secretRef": {"name": "slmforge-s3"}}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "CUDA_VISIBLE_DEVICES" not in env, "the pod's 2 GPUs stay visible (train.processes=auto: one rank each)"
    assert env["SLMFORGE_STORE_SECRET_BLOCKS"] == f"{SECRET_KEY_ID},{SECRET_KEY}"
    assert "PREFECT__FLOW_RUN_ID" in env
    assert FAKE_ID not in rendered and FAKE_KEY not in rendered


def test_the_flow_reads_the_named_secret_blocks_into_its_environment(secret_blocks, monkeypatch):
    from tasks.secrets import STORE_SECRETS_ENV, load_store_credentials

    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv(STORE_SECRETS_ENV, f"{SECRET_KEY_ID},{SECRET_KEY}")
    assert load_store_credentials()
    import os

    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == (FAKE_ID, FAKE_KEY)
    assert not load_store_credentials(), "keys already in the environment (an instance role, the platform) win"


def test_the_process_pool_keeps_resolving_block_references_in_the_worker():
    env = job_env(None, None, "0", credentials_in_secrets=True, pool_type="process")
    assert env["AWS_SECRET_ACCESS_KEY"] == "{{ prefect.blocks.secret.%s }}" % SECRET_KEY
    assert "SLMFORGE_STORE_SECRET_BLOCKS" not in env


def test_a_docker_pool_deployment_runs_the_flow_from_the_image(prefect_api, tmp_path):
    """`python -m deployments.deploy --pool-type docker`: the pool is a docker pool with the GPU
    request, and the GPU deployments change into the image's project directory, not this checkout;
    the comparison that only waits for them runs on the process pool `control`."""
    from prefect.client.orchestration import get_client

    from deployments.deploy import IMAGE_WORKDIR, main

    assert main(["--pool", "gpu-docker", "--pool-type", "docker", "--image", IMAGE, "--storage-url",
                 f"file://{tmp_path}/store", "--endpoint-url", ""]) == 0
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("gpu-docker")
        assert pool.type == "docker"
        props = pool.base_job_template["variables"]["properties"]
        assert props["container_create_kwargs"]["default"] == {"device_requests": [GPU_REQUEST],
                                                               "shm_size": f"{SHM_GIB}g"}
        for name in ("finetune/nightly", "compare-model/fan-out"):
            d = client.read_deployment_by_name(name)
            assert d.work_pool_name == "gpu-docker" and d.job_variables["image"] == IMAGE
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_WORKDIR}}]
            assert d.entrypoint in ("flows/finetune.py:finetune", "flows/compare.py:compare_model")
        parent = client.read_deployment_by_name("compare/on-demand")
        assert parent.work_pool_name == "control" and client.read_work_pool("control").type == "process"
        assert "image" not in (parent.job_variables or {})


def test_the_pool_leaves_the_gpus_visible_unless_told_and_refuses_hiding_them_all():
    """Issue 36: CUDA_VISIBLE_DEVICES=0 was forced on every run (a 2-GPU pod trained on one), and an
    empty list silently trained on the CPU."""
    import inspect

    from deployments.deploy import deploy_all, main

    assert "CUDA_VISIBLE_DEVICES" not in job_env(None, None, None, credentials_in_secrets=False)
    assert inspect.signature(deploy_all).parameters["cuda_visible_devices"].default is None
    assert job_env(None, None, "0,1", credentials_in_secrets=False)["CUDA_VISIBLE_DEVICES"] == "0,1"
    for hidden in ("", " ", "-1"):
        with pytest.raises(ValueError, match="--cuda-visible-devices .*hides every GPU"):
            job_env(None, None, hidden, credentials_in_secrets=False)
    assert main(["--cuda-visible-devices", "", "--api-url", "http://127.0.0.1:9/api"]) == 2  # before any API call
