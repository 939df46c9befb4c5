"""The `gpu` work pool's job template for each pool type teams run: `process` (a worker on the GPU
machine), `docker` (prefect-docker: a container per flow run, given the GPUs through docker's
device requests) and `kubernetes` (prefect-kubernetes: a Job per flow run whose container
requests `nvidia.com/gpu`; node selector and tolerations as pool variables).

Each starts from the worker package's own default template, so every setting the package offers
stays available in the UI. No secret value is ever part of a template: the store's keys reach a
run through Prefect Secret blocks that the flow reads when it starts (their names are in the env,
`SLMFORGE_STORE_SECRET_BLOCKS`), or, on Kubernetes, through the cluster's own Secret
(`credentials_secret`: the container's `envFrom`).
"""

from __future__ import annotations

import copy
from typing import Any

POOL_TYPES = ("process", "docker", "kubernetes")
IMAGE = "slmforge:latest"  # built from deployments/Dockerfile (README: Docker)
GPU_REQUEST = {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}  # docker run --gpus all
# Shared memory for NCCL (multi-GPU training) and data loader workers: docker gives a container 64 MB
# of /dev/shm and a Kubernetes pod the node's default, too little for NCCL's buffers between GPUs.
SHM_GIB = 16


def default_template(pool_type: str) -> dict[str, Any]:
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    try:
        if pool_type == "docker":
            from prefect_docker.worker import DockerWorker

            return DockerWorker.get_default_base_job_template()
        if pool_type == "kubernetes":
            from prefect_kubernetes.worker import KubernetesWorker

            return KubernetesWorker.get_default_base_job_template()
    except ImportError:
        raise ValueError(f"--pool-type {pool_type}: its worker package is not installed: "
                         f"pip install 'slmforge[{pool_type}]'") from None
    raise ValueError(f"pool type {pool_type!r}: one of {', '.join(POOL_TYPES)}")


def _variable(template: dict, name: str, default: Any, kind: str, title: str, description: str) -> None:
    template["variables"]["properties"][name] = {"title": title, "description": description, "type": kind,
                                                 "default": default}


def base_job_template(pool_type: str, env: dict[str, str], image: str = IMAGE, gpus: int = 1,
                      node_selector: dict[str, str] | None = None, tolerations: list[dict] | None = None,
                      credentials_secret: str | None = None, shm_gib: int = SHM_GIB) -> dict[str, Any]:
    """The pool's base job template: the package default plus the GPU request, shared memory for
    NCCL, the image and the env every flow run starts with."""
    template = copy.deepcopy(default_template(pool_type))
    props = template["variables"]["properties"]
    props["env"]["default"] = env
    if pool_type == "process":
        return template
    props["image"]["default"] = image
    if pool_type == "docker":
        # docker's device requests (`--gpus` is no container setting) and `--shm-size`; per deployment,
        # a job variable
        props["container_create_kwargs"]["default"] = {"device_requests": [GPU_REQUEST], "shm_size": f"{shm_gib}g"}
        return template
    # kubernetes: GPUs, where the job may run, and the cluster's Secret with the store's keys
    _variable(template, "gpu_count", gpus, "integer", "GPUs", "nvidia.com/gpu requested by the flow run's container")
    _variable(template, "node_selector", node_selector or {}, "object", "Node selector",
              "Labels of the nodes the job may run on, e.g. {\"nvidia.com/gpu.product\": \"NVIDIA-H100-80GB-HBM3\"}")
    _variable(template, "tolerations", tolerations or [], "array", "Tolerations",
              "Tolerations of the GPU nodes' taints, e.g. [{\"key\": \"nvidia.com/gpu\", \"operator\": \"Exists\", "
              "\"effect\": \"NoSchedule\"}]")
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    # /dev/shm for NCCL: a memory-backed emptyDir (counts against the container's memory limit)
    _variable(template, "shm_size", f"{shm_gib}Gi", "string", "Shared memory",
              "Size of the memory-backed /dev/shm (NCCL between GPUs), a Kubernetes quantity, e.g. 16Gi")
    pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}}]
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": credentials_secret}}]
    return template
