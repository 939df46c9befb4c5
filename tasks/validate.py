"""Checks that run in seconds before any weights load: a bad setting must not cost a night.

Everything here reads settings, the store (one probe object), the model's config and, on the meta
device (no memory, no weights), its module names. Each failure is one line naming the field.
"""

from __future__ import annotations

from prefect import task

from slmforge import modeling as M
from slmforge.config import ConfigError, FinetuneConfig, LoraSettings
from slmforge.publishing import hub_token
from slmforge.runtime import RuntimeSettingError, for_config
from tasks.storage import ArtifactStore

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


def module_names(config) -> tuple[list[str], list[str]]:
    """(all module names, the Linear ones) of the model the config describes, built on the meta
    device: no memory, no weights, about a second even for a 7B shape."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001
        arch = getattr(config, "model_type", "?")
        raise M.ModelSourceError(
            f"model.source: architecture {arch!r} cannot be built as a causal LM: {_first_line(e)}") from None
    names = [n for n, _ in model.named_modules() if n]
    linear = [n for n, m in model.named_modules() if n and ("Linear" in type(m).__name__)]
    return names, linear


def _matches(target: str, names: list[str]) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def check_lora_targets(lora: LoraSettings, names: list[str], linear: list[str]) -> None:
    """LoRA target modules (and modules_to_save) must name modules of this model."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear if not n.endswith("lm_head")})
    if lora.target_modules != "all-linear":
        targets = [lora.target_modules] if isinstance(lora.target_modules, str) else list(lora.target_modules)
        if not targets:
            raise ConfigError("lora.target_modules: empty; use `all-linear` or a list such as [q_proj, v_proj]")
        missing = [t for t in targets if not _matches(t, names)]
        if missing:
            raise ConfigError(f"lora.target_modules: {missing} match no module of this model "
                              f"(its linear layers: {', '.join(suffixes)}; or use all-linear)")
        not_linear = [t for t in targets if not _matches(t, linear)]
        if not_linear:
            raise ConfigError(f"lora.target_modules: {not_linear} are not linear layers "
                              f"(its linear layers: {', '.join(suffixes)})")
    missing = [t for t in lora.modules_to_save if not _matches(t, names)]
    if missing:
        raise ConfigError(f"lora.modules_to_save: {missing} match no module of this model "
                          f"(e.g. lm_head, embed_tokens)")


def check_inputs(cfg: FinetuneConfig) -> dict:
    """Store writable, model source resolvable (config only), max_length within the model's
    context, LoRA targets present in the model, Hub token present when a Hub repo is set.
    Raises ConfigError / ModelSourceError / StoreError with the field's name."""
    try:  # a dtype or attention kernel this hardware cannot run
        for_config(cfg.model, cfg.train)
    except RuntimeSettingError as e:
        raise ConfigError(str(e)) from None
    ArtifactStore.from_config(cfg.storage).check_writable()
    src = M.resolve_source(cfg.model.source, cfg.model.revision)
    config = model_config(src)
    context = context_length(config)
    if context and cfg.data.max_length > context:
        raise ConfigError(f"data.max_length: {cfg.data.max_length} exceeds the model's context of {context} tokens")
    names, linear = module_names(config)
    check_lora_targets(cfg.lora, names, linear)
    if cfg.publish.hub_repo and not hub_token(cfg.publish.token_secret_block):
        raise ConfigError(
            f"publish.hub_repo: {cfg.publish.hub_repo} is set but no Hub token was found "
            f"(Prefect Secret block {cfg.publish.token_secret_block!r} or HF_TOKEN)")
    return src.describe()


@task(name="validate_inputs", retries=0)
def validate_inputs(cfg: FinetuneConfig) -> dict:
    return check_inputs(cfg)
