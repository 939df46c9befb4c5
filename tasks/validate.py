"""Checks that run in seconds before any weights load: a bad setting must not cost a night."""

from __future__ import annotations

from prefect import task

from slmforge import modeling as M
from slmforge.config import ConfigError, FinetuneConfig
from slmforge.publishing import hub_token
from tasks.storage import ArtifactStore


def check_inputs(cfg: FinetuneConfig) -> dict:
    """Store writable, model source resolvable (config only), max_length within the model's
    context, Hub token present when a Hub repo is set. Raises with the field's name."""
    ArtifactStore.from_config(cfg.storage).check_writable()
    src = M.resolve_source(cfg.model.source, cfg.model.revision)
    if src.kind != "hub":
        config = M.load_config(src)
        context = getattr(config, "max_position_embeddings", None)
        if context and cfg.data.max_length > context:
            raise ConfigError(f"data.max_length: {cfg.data.max_length} exceeds the model's context of {context} tokens")
    if cfg.publish.hub_repo and not hub_token(cfg.publish.token_secret_block):
        raise ConfigError(
            f"publish.hub_repo: {cfg.publish.hub_repo} is set but no Hub token was found "
            f"(Prefect Secret block {cfg.publish.token_secret_block!r} or HF_TOKEN)")
    return src.describe()


@task(name="validate_inputs", retries=0)
def validate_inputs(cfg: FinetuneConfig) -> dict:
    return check_inputs(cfg)
