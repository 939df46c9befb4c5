"""Which modules a LoRA adapter attaches to. Checked twice with the same rule: on the model built from
its config on the meta device (validation, before any weights load) and on the loaded model (training)."""

from __future__ import annotations

import torch

from slmforge.config import ConfigError, LoraSettings


def module_names(model) -> tuple[list[str], list[str]]:
    """(all module names, the linear ones) of a model, built or loaded."""
    names = [n for n, _ in model.named_modules() if n]
    linear = [n for n, m in model.named_modules()
              if n and (isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__)]
    return names, linear


def meta_model(config):
    """The model a config describes, built on the meta device: no memory, no weights, about a second
    even for a 7B shape. What validation checks the settings against before anything loads."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from slmforge.modeling import ModelSourceError

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001
        arch = getattr(config, "model_type", "?")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelSourceError(f"model.source: architecture {arch!r} cannot be built as a causal LM: {first}") from None
    return model


def meta_module_names(config) -> tuple[list[str], list[str]]:
    """`module_names` of the model a config describes (`meta_model`)."""
    return module_names(meta_model(config))


def _matches(target: str, names: list[str]) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def check_lora_targets(lora: LoraSettings, names: list[str], linear: list[str]) -> None:
    """LoRA target modules (and modules_to_save) must name modules of this model; targets must be
    linear layers. Raises ConfigError naming the field and the model's linear layers."""
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
