"""The Hub token: from a Prefect Secret block when one of that name exists, else HF_TOKEN. The
description names the source, never the value. And the store's keys for runs in containers: read
from the Secret blocks the pool names, so no job definition ever holds them."""

from __future__ import annotations

import os

from prefect.blocks.system import Secret


def hub_token_source(secret_block: str | None) -> tuple[str | None, str]:
    """(token, where it came from): a Prefect Secret block if one of that name exists, else HF_TOKEN.
    The description names the source, never the value."""
    if secret_block:
        try:
            value = Secret.load(secret_block, _sync=True).get()
            if isinstance(value, str) and value.strip():
                return value.strip(), f"Prefect Secret block {secret_block!r}"
        except Exception:  # noqa: BLE001 - no block, no API: fall back to the environment
            pass
    env = (os.environ.get("HF_TOKEN") or "").strip()
    if env:
        return env, "HF_TOKEN"
    where = f"Prefect Secret block {secret_block!r} or HF_TOKEN" if secret_block else "HF_TOKEN"
    return None, where


def hub_token(secret_block: str | None) -> str | None:
    """The Hub token: a Prefect Secret block if one of that name exists, else HF_TOKEN. Never logged."""
    return hub_token_source(secret_block)[0]


STORE_SECRETS_ENV = "SLMFORGE_STORE_SECRET_BLOCKS"  # "<access key id block>,<secret access key block>"


def load_store_credentials() -> bool:
    """Where the work pool names the Secret blocks (docker and kubernetes pools) and the environment
    has no keys yet: put the blocks' values into this process's environment for s3fs. Never logged.
    Returns whether it did."""
    names = [n.strip() for n in os.environ.get(STORE_SECRETS_ENV, "").split(",") if n.strip()]
    if len(names) != 2 or os.environ.get("AWS_ACCESS_KEY_ID"):
        return False
    key_id, key = (Secret.load(n, _sync=True).get() for n in names)
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = key_id, key
    return True
