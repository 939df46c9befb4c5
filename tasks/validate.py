"""Checks that run in seconds before any weights load: a bad setting must not cost a night.

Everything here reads settings, the store (one probe object), the model's config and, on the meta
device (no memory, no weights), its module names. Each failure is one line naming the field.
"""

from __future__ import annotations

from prefect import task

from slmforge import modeling as M
from slmforge.calibration import unfoldable
from slmforge.config import ConfigError, FinetuneConfig
from slmforge.lora_targets import check_lora_targets, meta_model, module_names
from slmforge.runtime import RuntimeSettingError, for_config, plan_processes
from slmforge.storage import ArtifactStore
from tasks.secrets import hub_token

CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def model_config(src: M.ModelSource):
    """The model's config (no weights). A Hub id that cannot be found (offline, not cached, no such
    repo, no access) fails with one line naming model.source."""
    try:
        return M.load_config(src)
    except M.ModelSourceError as e:
        if src.kind != "hub":
            raise M.ModelSourceError(_first_line(e)) from None
        detail = _first_line(e).split(f"{src.location}: ", 1)[-1]
        at = f" at revision {src.revision!r}" if src.revision else ""
        raise M.ModelSourceError(
            f"model.source: {src.location!r} is not a local path or bundled alias, and no Hub model of that id "
            f"could be read{at} (offline and not cached, misspelt, or gated?): {detail}") from None


def context_length(config) -> int | None:
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        for attr in CONTEXT_ATTRS:
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_inputs(cfg: FinetuneConfig, store_checked: bool = False) -> dict:
    """Store writable (unless the caller `store_checked` it), model source resolvable (config only),
    max_length within the model's context, LoRA targets present in the model, a temperature foldable
    into it (when calibrating), Hub token present when a Hub repo is set. Raises ConfigError /
    ModelSourceError / StoreError with the field's name."""
    try:  # a dtype, attention kernel or process count this hardware (or the batch) cannot run
        for_config(cfg.model, cfg.train)
        plan_processes(cfg.train)
    except RuntimeSettingError as e:
        raise ConfigError(str(e)) from None
    if not store_checked:
        ArtifactStore.from_config(cfg.storage).check_writable()
    src = M.resolve_source(cfg.model.source, cfg.model.revision)
    config = model_config(src)
    context = context_length(config)
    if context and cfg.data.max_length > context:
        raise ConfigError(f"data.max_length: {cfg.data.max_length} exceeds the model's context of {context} tokens")
    meta = meta_model(config)
    check_lora_targets(cfg.lora, *module_names(meta))
    if cfg.calibrate.enabled and (problem := unfoldable(config, meta, cfg.lora.modules_to_save, cfg.calibrate.method)):
        raise ConfigError(problem)
    if cfg.publish.hub_repo and not hub_token(cfg.publish.token_secret_block):
        raise ConfigError(
            f"publish.hub_repo: {cfg.publish.hub_repo} is set but no Hub token was found "
            f"(Prefect Secret block {cfg.publish.token_secret_block!r} or HF_TOKEN)")
    return src.describe()


@task(name="validate_inputs", retries=0)
def validate_inputs(cfg: FinetuneConfig) -> dict:
    return check_inputs(cfg)
