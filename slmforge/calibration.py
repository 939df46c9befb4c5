"""Temperature scaling: one scalar T, fitted on the validation split's answers and folded into the
adapter, so that every logit of the trained model (and of the merged model made from it) is divided by T.

Fine-tuning for facts makes a small model sure of its answers, the wrong ones it gives to questions
about facts it never saw included: the default run's answer loss on those rose while its key
accuracy on taught facts went from 0% to about half. Dividing the logits by one T fitted on held-out
answers (Guo et al., "On Calibration of Modern Neural Networks", 2017) brings the probabilities back
in line with how often the model is right. No argmax moves, so greedy answers do not change; what
changes is the likelihood of the reference answers, and what sampling at a given temperature draws.
The scale goes into the weights rather than into generation_config because the answer loss, the
gate and anyone who loads the model read the logits, not a generation setting. It goes into the
adapter (the final norm as a peft `modules_to_save` module: one vector of hidden-size floats), so
the adapter pushed to the Hub, the merged model and the evaluated model are the same function.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from slmforge.evaluation import answer_token_logits, per_record_mean

# T from 0.5 to 4 in steps of 10% (the minimum is then placed between grid points by a parabola in log T)
GRID = tuple(round(1.1 ** k, 6) for k in range(-7, 15))


class CalibrationError(RuntimeError):
    """The model's logits cannot be divided by a constant through its weights (e.g. soft-capped logits)."""


def fit_temperature(model, records: list[dict], batch_size: int, pad_id: int) -> dict:
    """The T with the lowest answer loss (mean per record, as evaluation reports it) on `records`,
    from one forward pass: the loss on `GRID`, its minimum refined by a parabola through the best
    grid point and its neighbours. Returns T, the loss at T=1 and the loss at the best grid point."""
    losses = []
    for logits, tokens, row in answer_token_logits(model, records, batch_size, pad_id):
        n = int(row.max()) + 1 if row.numel() else 0
        target = logits.gather(-1, tokens.view(-1, 1)).squeeze(-1)
        nll = torch.stack([torch.logsumexp(logits / t, -1) - target / t for t in GRID], -1)  # [tokens, len(GRID)]
        losses.append(per_record_mean(nll, row, n).cpu())
    if not losses:
        raise CalibrationError("no records to fit a temperature on")
    mean = torch.cat(losses).mean(0).tolist()
    best = min(range(len(GRID)), key=mean.__getitem__)
    temperature = GRID[best]
    if 0 < best < len(GRID) - 1:  # the loss is convex in 1/T; near its minimum a parabola in log T fits it
        f0, f1, f2 = mean[best - 1:best + 2]
        curvature = f0 - 2 * f1 + f2
        if curvature > 0:
            temperature *= 1.1 ** max(-0.5, min(0.5, (f0 - f2) / (2 * curvature)))
    return {"temperature": round(temperature, 4), "records": len(records), "loss_at_1": mean[GRID.index(1.0)],
            "loss_near_t": mean[best]}


def describe(fit: dict) -> str:
    return (f"temperature {fit['temperature']:g} fitted on {fit['records']} validation answers: answer loss there "
            f"{fit['loss_at_1']:.3f} -> {fit['loss_near_t']:.3f} (greedy answers unchanged)")


# what the decoder calls its last norm: Llama, Qwen, Mistral, Gemma, SmolLM2 / Phi / OPT, GPT-NeoX
# (Pythia) / GPT-2, Falcon
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


def final_norm(model) -> tuple[str, torch.nn.Module]:
    """The norm right before the LM head: its name inside the causal-LM model (`model.norm` for
    Llama, Qwen, Gemma, SmolLM2; `transformer.ln_f` for GPT-2) and the module. `model` may be a peft model."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = lm.get_decoder()
    norm = next((m for m in (getattr(decoder, n, None) for n in FINAL_NORM_NAMES) if m is not None), None)
    if norm is None or getattr(norm, "weight", None) is None:
        raise CalibrationError(f"{type(lm).__name__}: no final norm with a weight to fold a temperature into; "
                               "set calibrate.enabled=false")
    if hasattr(norm, "modules_to_save"):
        raise CalibrationError("the final norm is already trained (lora.modules_to_save); set calibrate.enabled=false")
    return next(name for name, m in lm.named_modules() if m is norm), norm


def unfoldable(config, model=None, modules_to_save: list[str] = ()) -> str | None:
    """Why no temperature can be folded into this model, or None. Checked in validation on the
    config and the model built on the meta device (nothing loaded), and again before folding: soft-
    capped logits and a head with a bias are not divided by T when the norm's output is; the final
    norm must exist and not be trained already (`lora.modules_to_save`)."""
    fix = "; set calibrate.enabled=false"
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        cap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
        if cap:
            return (f"calibrate.enabled: the model soft-caps its logits (final_logit_softcapping={cap}): a temperature "
                    f"cannot be folded into its weights{fix}")
    if model is None:
        return None
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return f"calibrate.enabled: the model's LM head has a bias: scaling the final norm would not divide the logits by T{fix}"
    try:
        name, _ = final_norm(model)
    except CalibrationError as e:
        return f"calibrate.enabled: {e}"
    if any(name == m or name.endswith("." + m) for m in modules_to_save):
        return f"calibrate.enabled: the final norm {name!r} is trained (lora.modules_to_save){fix}"
    return None


@torch.no_grad()
def fold_temperature(model, temperature: float, probe_ids: list[int]) -> dict:
    """Scale the final norm's output by 1/T in `model` (in place), which divides every logit by T
    when the LM head is a bias-free linear map (tied or not) without soft-capping; checked on
    `probe_ids`. The norm's weight is scaled (RMSNorm, LayerNorm), or 1 + weight for Gemma's norm,
    whose output is x * (1 + weight); a bias is scaled too. Returns the norm's name and new tensors."""
    problem = unfoldable(model.config, model)
    if problem:
        raise CalibrationError(problem)
    name, norm = final_norm(model)
    ids = torch.tensor([probe_ids], device=norm.weight.device)
    before = model(input_ids=ids).logits.float()
    weight = norm.weight.data.clone()
    bias = norm.bias.data.clone() if getattr(norm, "bias", None) is not None else None
    for form, scaled in (("weight / T", weight / temperature), ("(1 + weight) / T - 1", (1 + weight) / temperature - 1)):
        norm.weight.data = scaled.to(weight.dtype)
        if bias is not None:
            norm.bias.data = bias / temperature
        after = model(input_ids=ids).logits.float()
        if torch.allclose(after * temperature, before, rtol=1e-3, atol=1e-3 * before.abs().max().item()):
            tensors = {f"{name}.weight": norm.weight.data.clone()}
            if bias is not None:
                tensors[f"{name}.bias"] = norm.bias.data.clone()
            return {"module": name, "form": form, "tensors": tensors}
    norm.weight.data = weight
    if bias is not None:
        norm.bias.data = bias
    raise CalibrationError(f"{type(norm).__name__}: scaling the final norm does not divide the logits by a constant; "
                           "set calibrate.enabled=false")


def write_calibrated_adapter(adapter_dir: Path, out_dir: Path, folded: dict) -> None:
    """A copy of the peft adapter in `adapter_dir` whose final norm (`folded` from
    `fold_temperature`) is saved as a `modules_to_save` module: peft loads it over the base's norm,
    and `merge_and_unload` puts it into the merged model."""
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(adapter_dir).iterdir():
        if f.is_file() and f.name not in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(f, out_dir / f.name)
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    config["modules_to_save"] = [*(config.get("modules_to_save") or []), folded["module"]]
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    tensors.update({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in folded["tensors"].items()})
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
