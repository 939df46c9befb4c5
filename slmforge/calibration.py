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

The norm's weight is a vector, so a per-dimension scale `s` folds into it just as well: logits =
head(s * norm(h)). `method: vector` fits `s` on the same answers, from 1/T, with an L2 pull
towards 1/T (without it, 576 numbers fitted on 59 answers overfit). It lowered the default run's
test answer loss by another 0.03-0.04 on three seeds (`benchmarks/norm_vector_scaling.py`), but a
vector moves argmaxes, and the greedy answers it changed cost taught facts on some seeds
(`benchmarks/calibration_greedy.py`): so it is there to choose, and T is the default.
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


def _grid_nll(logits: torch.Tensor, tokens: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """Each token's negative log-likelihood at every temperature of `GRID`: [tokens, len(GRID)].

    `rows` tokens at a time, so each temperature's pass over the vocabulary stays in the CPU's cache
    (8 rows of a 49k vocabulary: 1.5 MB): 4-5x faster than the whole batch at once on CPU, and
    bit-identical, since each token's log-sum-exp is computed on its own row either way."""
    target = logits.gather(-1, tokens.view(-1, 1)).squeeze(-1)
    parts = [torch.stack([torch.logsumexp(z / t, -1) - y / t for t in GRID], -1)
             for z, y in zip(logits.split(rows), target.split(rows))]
    return torch.cat(parts) if parts else logits.new_empty((0, len(GRID)))


def fit_temperature(model, records: list[dict], batch_size: int, pad_id: int) -> dict:
    """The T with the lowest answer loss (mean per record, as evaluation reports it) on `records`,
    from one forward pass: the loss on `GRID`, its minimum refined by a parabola through the best
    grid point and its neighbours. Returns T, the loss at T=1 and the loss at the best grid point."""
    losses = []
    for logits, tokens, row in answer_token_logits(model, records, batch_size, pad_id):
        n = int(row.max()) + 1 if row.numel() else 0
        losses.append(per_record_mean(_grid_nll(logits, tokens), row, n).cpu())
    if not losses:
        raise CalibrationError("no records to fit a temperature on")
    return _best_temperature(torch.cat(losses), len(records))


def _best_temperature(per_record: torch.Tensor, records: int) -> dict:
    """T from the per-record losses on `GRID` ([records, len(GRID)])."""
    mean = per_record.mean(0).tolist()
    best = min(range(len(GRID)), key=mean.__getitem__)
    temperature = GRID[best]
    if 0 < best < len(GRID) - 1:  # the loss is convex in 1/T; near its minimum a parabola in log T fits it
        f0, f1, f2 = mean[best - 1:best + 2]
        curvature = f0 - 2 * f1 + f2
        if curvature > 0:
            temperature *= 1.1 ** max(-0.5, min(0.5, (f0 - f2) / (2 * curvature)))
    return {"temperature": round(temperature, 4), "records": records, "loss_at_1": mean[GRID.index(1.0)],
            "loss_near_t": mean[best]}


def answer_states(model, records: list[dict], batch_size: int, pad_id: int):
    """What the LM head reads (the final norm's output, float32) at every position that predicts an
    answer token [tokens, hidden], the tokens, and the record each belongs to (an index into `records`)."""
    states, tokens, owner = [], [], []
    for start, (z, y, row) in zip(range(0, len(records), batch_size),
                                  answer_token_logits(model, records, batch_size, pad_id, hidden=True)):
        states.append(z)
        tokens.append(y)
        owner.append(row + start)
    if not states:
        raise CalibrationError("no records to fit a scale on")
    return torch.cat(states), torch.cat(tokens), torch.cat(owner)


def scaled_answer_loss(states, tokens, owner, n: int, head: torch.Tensor, scale, chunk: int = 1024,
                       backward: bool = False) -> torch.Tensor:
    """Answer loss (mean per record, then over records) of logits `head @ (scale * state)`, computed
    `chunk` tokens at a time so that [tokens, vocab] is never whole (a 262k vocabulary times a few
    thousand answer tokens would be gigabytes); `backward` accumulates the gradient chunk by chunk."""
    weight = 1.0 / (n * torch.bincount(owner, minlength=n).clamp(min=1).to(states.dtype))[owner]
    total = torch.zeros((), device=states.device)
    for a in range(0, len(tokens), chunk):
        logits = (states[a:a + chunk] * scale) @ head.T
        part = (torch.nn.functional.cross_entropy(logits, tokens[a:a + chunk], reduction="none")
                * weight[a:a + chunk]).sum()
        if backward:
            part.backward()
        total += part.detach()
    return total


def fit_scale(states, tokens, owner, n: int, head: torch.Tensor, temperature: float, l2: float,
              steps: int) -> torch.Tensor:
    """The per-dimension scale `s` (logits = head @ (s * state)) with the lowest answer loss on these
    answer tokens plus `l2` * mean((s - 1/T)^2), by L-BFGS from 1/T."""
    start = torch.full((head.shape[1],), 1 / temperature, device=states.device)
    s = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([s], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        pull = l2 * ((s - start) ** 2).mean()
        pull.backward()
        return pull.detach() + scaled_answer_loss(states, tokens, owner, n, head, s, backward=True)

    opt.step(closure)
    return s.detach()


def fit_vector(model, records: list[dict], batch_size: int, pad_id: int, l2: float, steps: int) -> dict:
    """T as `fit_temperature` finds it, then `fit_scale` from 1/T on the same answers. One forward
    pass: the states are read once and the head applied to them. Returns the temperature fit plus
    `scale` (a tensor), the loss at it, and how many of the answer tokens' argmaxes it moves against
    1/T (a scalar moves none)."""
    z, y, owner = answer_states(model, records, batch_size, pad_id)
    head = model.get_output_embeddings().weight.detach().float()
    chunks = range(0, len(y), 1024)
    nll = torch.cat([_grid_nll(z[a:a + 1024] @ head.T, y[a:a + 1024]) for a in chunks])
    fit = _best_temperature(per_record_mean(nll, owner, len(records)).cpu(), len(records))
    s = fit_scale(z, y, owner, len(records), head, fit["temperature"], l2, steps)
    with torch.no_grad():
        moved = sum(int((((z[a:a + 1024] * s) @ head.T).argmax(-1) != (z[a:a + 1024] @ head.T).argmax(-1)).sum())
                    for a in chunks)
        loss = scaled_answer_loss(z, y, owner, len(records), head, s).item()
    return {**fit, "method": "vector", "l2": l2, "loss_vector": loss, "scale": s.cpu(),
            "scale_range": [round(s.min().item(), 4), round(s.max().item(), 4)], "tokens": len(y),
            "argmax_moved": moved}


def describe(fit: dict) -> str:
    if fit.get("method") == "vector":
        return (f"temperature {fit['temperature']:g}, then a per-dimension scale (l2 {fit['l2']:g}, from "
                f"{fit['scale_range'][0]:g} to {fit['scale_range'][1]:g}) fitted on {fit['records']} validation "
                f"answers: answer loss there {fit['loss_at_1']:.3f} -> {fit['loss_near_t']:.3f} (T) -> "
                f"{fit['loss_vector']:.3f} (scale); the scale moves the argmax of {fit['argmax_moved']} of their "
                f"{fit['tokens']} answer tokens")
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


def unfoldable(config, model=None, modules_to_save: list[str] = (), method: str = "temperature") -> str | None:
    """Why no temperature (or, for `method` vector, no per-dimension scale) can be folded into this
    model, or None. Checked in validation on the config and the model built on the meta device
    (nothing loaded), and again before folding: soft-capped logits and a head with a bias are not
    divided by T when the norm's output is; the final norm must exist and not be trained already
    (`lora.modules_to_save`); a vector is fitted on head @ state, which logits scaled after the head
    (Cohere's logit_scale, Granite's logits_scaling) are not."""
    fix = "; set calibrate.enabled=false"
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        cap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
        if cap:
            return (f"calibrate.enabled: the model soft-caps its logits (final_logit_softcapping={cap}): a temperature "
                    f"cannot be folded into its weights{fix}")
        for field in ("logit_scale", "logits_scaling"):
            factor = getattr(cfg, field, None) if cfg is not None else None
            if method == "vector" and isinstance(factor, (int, float)) and factor != 1:
                return (f"calibrate.method: the model scales its logits after the LM head ({field}={factor}): the "
                        "vector is fitted on the head's output; set calibrate.method=temperature")
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


def _tolerance(model) -> float:
    """Relative tolerance of the folding checks: rounding the scaled norm to a bf16 or fp16 weight
    moves a logit by about a percent; an fp32 model must match to 1e-3."""
    return max(1e-3, 4 * torch.finfo(model.get_output_embeddings().weight.dtype).eps)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


@torch.no_grad()
def _fold(model, scale, probe_ids: list[int], expected, forms: tuple[str, str], method: str) -> dict:
    """Scale the final norm's output by `scale` (a function of a float32 tensor: x / T, or x * s for
    a hidden-size vector s) in `model`, in place, trying the weight's two forms: scale(weight)
    (RMSNorm, LayerNorm, whose bias is scaled too) and scale(1 + weight) - 1 (Gemma's norm, whose
    output is x * (1 + weight)). `expected` maps the model's output and the norm's output before
    folding to the logits the fold must give on `probe_ids`; the model is restored and
    CalibrationError raised when neither form gives them."""
    problem = unfoldable(model.config, model, method=method)
    if problem:
        raise CalibrationError(problem)
    name, norm = final_norm(model)
    ids = torch.tensor([probe_ids], device=norm.weight.device)
    seen = []
    hook = norm.register_forward_hook(lambda module, args, out: seen.append(out.detach().float()))
    try:
        out = model(input_ids=ids, output_hidden_states=True)
    finally:
        hook.remove()
    tol = _tolerance(model)
    want = expected(out, seen[-1], tol)
    weight = norm.weight.data.clone()
    bias = norm.bias.data.clone() if getattr(norm, "bias", None) is not None else None
    for form, scaled in zip(forms, (scale(weight.float()), scale(1 + weight.float()) - 1)):
        norm.weight.data = scaled.to(weight.dtype)
        if bias is not None:
            norm.bias.data = scale(bias.float()).to(bias.dtype)
        if _close(model(input_ids=ids).logits.float(), want, tol):
            tensors = {f"{name}.weight": norm.weight.data.clone()}
            if bias is not None:
                tensors[f"{name}.bias"] = norm.bias.data.clone()
            return {"module": name, "form": form, "tensors": tensors}
    norm.weight.data = weight
    if bias is not None:
        norm.bias.data = bias
    raise CalibrationError(f"{type(norm).__name__}: scaling the final norm does not scale the logits as fitted; "
                           "set calibrate.enabled=false")


def fold_temperature(model, temperature: float, probe_ids: list[int]) -> dict:
    """Scale the final norm's output by 1/T in `model` (in place), which divides every logit by T
    when the LM head is a bias-free linear map (tied or not) without soft-capping; checked on
    `probe_ids`. Returns the norm's name, the weight's form and the new tensors."""
    return _fold(model, lambda x: x / temperature, probe_ids, lambda out, state, tol: out.logits.float() / temperature,
                 ("weight / T", "(1 + weight) / T - 1"), "temperature")


def fold_vector(model, scale: torch.Tensor, probe_ids: list[int]) -> dict:
    """Scale the final norm's output by the vector `scale` (from `fit_vector`) in `model`, in place.
    `fit_vector` computed the logits as head @ (scale * last hidden state); on `probe_ids` this checks
    that the model's own logits are that (the last hidden state is the norm's output and the head
    reads it directly) before and after folding."""
    head = model.get_output_embeddings().weight.float()

    def expected(out, state, tol):
        if not (_close(out.hidden_states[-1].float(), state, tol) and _close(state @ head.T, out.logits.float(), tol)):
            raise CalibrationError(f"{type(model).__name__}: its logits are not the LM head applied to the final "
                                   "norm's output; set calibrate.method=temperature")
        return (state * scale.to(state.device)) @ head.T

    return _fold(model, lambda x: x * scale.to(x.device), probe_ids, expected, ("weight * s", "(1 + weight) * s - 1"),
                 "vector")


def write_calibrated_adapter(adapter_dir: Path, out_dir: Path, folded: dict) -> None:
    """A copy of the peft adapter in `adapter_dir` whose final norm (`folded` from
    `fold_temperature` or `fold_vector`) is saved as a `modules_to_save` module: peft loads it over the base's norm,
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
