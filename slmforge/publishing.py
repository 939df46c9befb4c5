"""The quality gate, the model card, and the push to the Hugging Face Hub.

No Prefect: the Hub token is resolved by `tasks.secrets` and passed in, so this runs on a bare machine.
The token is passed in, never logged, and every message that leaves this module goes through
`redact_text` first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tenacity
import yaml

from slmforge.report import group_table, markdown_table

# Bundled aliases -> the Hub model their GGUF file was converted from (what `base_model` names).
BUNDLED_HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}
CARD_METRICS = ("key_accuracy", "char_f1", "chrf", "exact_match", "answer_loss", "perplexity")
TEXT_SUFFIXES = {".md", ".json", ".txt", ".jinja", ".yaml", ".yml", ".csv", ".py", ".model_card"}
SCAN_LIMIT = 64 * 1024 * 1024  # secrets are looked for in files up to this size (weights are bigger)
PUSH_ATTEMPTS = 4
PUSH_BASE_DELAY = 2.0  # seconds; doubled each attempt, plus up to this much jitter
MIN_SECRET_LEN = 6  # shorter "secrets" would mangle unrelated text


class PublishError(RuntimeError):
    """Publishing failed; the message says why and never contains the token."""


# -- the gate ---------------------------------------------------------------------------------
def gate(primary: str, candidate: float | None, base: float | None, min_improvement: float,
         last_published: float | None) -> tuple[bool, str]:
    """Publish only a clear improvement over the base that is no worse than what is already out."""
    if candidate is None or base is None:
        return False, f"not published: {primary} could not be computed on the test split"
    if candidate < base + min_improvement:
        return False, (f"not published: {primary} {candidate:.3f} does not beat the base {base:.3f} "
                       f"by the required {min_improvement:.3f}")
    if last_published is not None and candidate < last_published:
        return False, f"not published: {primary} {candidate:.3f} is below the last published {last_published:.3f}"
    return True, f"passed: {primary} {base:.3f} → {candidate:.3f}" + (
        f" (last published {last_published:.3f})" if last_published is not None else "")


# -- the model card ---------------------------------------------------------------------------
def base_model_id(source: dict, configured: str) -> str | None:
    """The Hub id the card's `base_model` names: the Hub id itself, the original of a bundled GGUF,
    or None for a local directory (a path is no Hub id)."""
    if source.get("kind") == "hub":
        return source.get("location")
    return BUNDLED_HUB_IDS.get(configured)


def dataset_name(source: str) -> str:
    """`hf:org/name` -> `org/name`; `bundled:korean-qa` -> `korean-qa`; a path or URL -> its file stem."""
    if source.startswith("hf:"):
        return source[3:]
    if source.startswith("bundled:"):
        return source.split(":", 1)[1]
    return Path(source.rstrip("/").rsplit("/", 1)[-1]).stem or source


def model_card(*, repo_id: str | None, base_model: str | None, base_label: str, licence: str | None,
               metrics_rows: list[dict], summaries: dict[str, dict], primary: str, config: dict,
               fingerprint: str, dataset: str, flow_run: dict | None = None, train: dict | None = None,
               merged: bool = False, revision: str = "main", content_hash: str | None = None,
               bundled_note: str | None = None, calibration: dict | None = None,
               data_identity: dict | None = None, model_identity: dict | None = None) -> str:
    """README.md: Hub metadata (base_model, library_name: peft, licence, datasets, model-index with
    the published model's metrics), the before/after tables, how to load it, the training config, the data
    fingerprint and the Prefect flow run it came from."""
    published = summaries["published"]["overall"]
    repo = repo_id or "<user>/<repo>"
    ds = dataset_name(dataset)
    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
    meta.update({
        "library_name": "peft",
        "license": licence or "other",
        "pipeline_tag": "text-generation",
        "tags": ["slmforge", "qlora", "lora", "peft", "korean"],
        "language": ["ko"],
        "datasets": [ds],
        "model-index": [{
            "name": repo,
            "results": [{
                "task": {"type": "text-generation", "name": "Question answering"},
                "dataset": {"name": ds, "type": ds, "split": "test"},
                "metrics": [
                    {"type": name, "name": name.replace("_", " "), "value": round(float(published[name]), 4)}
                    for name in CARD_METRICS if published.get(name) is not None
                ],
            }],
        }],
    })
    base_ref = base_model or base_label
    rev_arg = "" if revision == "main" else f', revision="{revision}"'
    run = flow_run or {}
    run_line = ""
    if run.get("name") or run.get("id"):
        run_line = f"Prefect flow run: `{run.get('name') or run.get('id')}`"
        if run.get("id") and run.get("name"):
            run_line += f" (id `{run['id']}`)"
        if run.get("url"):
            run_line += f" — <{run['url']}>"
    per_part = group_table({n: {"summary": s} for n, s in summaries.items()}, "by_part") \
        if all("by_part" in s for s in summaries.values()) else []
    t = train or {}
    train_line = ", ".join(f"{k.replace('_', ' ')} {t[k]}" for k in ("steps", "epochs", "train_loss", "runtime_s")
                           if t.get(k) is not None)
    model_cfg = config.get("model") or {}
    quant_type, double_quant = model_cfg.get("quant_type", "nf4"), bool(model_cfg.get("double_quant", True))
    merged_section = f"""
The merged model (the adapter folded into {"the original weights" if (config.get("merge") or {}).get("into") == "original"
else "the dequantized 4-bit base it was trained on"}; compared with the trained model before publishing) is in the
`merged/` folder:

```python
# adapter_kwargs: the repo root holds the adapter, which transformers would load instead
model = AutoModelForCausalLM.from_pretrained("{repo}", subfolder="merged"{rev_arg}, adapter_kwargs={{"subfolder": "merged"}},
                                             device_map="auto", dtype="auto")
```
""" if merged else ""
    calibration_note = (
        f"\nThe adapter also carries the base's final norm (`{calibration['module']}`, in `modules_to_save`) "
        + (f"scaled per dimension (a temperature of {calibration['temperature']:g}, then one scale per hidden "
           f"dimension pulled towards it), fitted on {calibration['records']} validation answers (answer loss there "
           f"{calibration['loss_at_1']:.3f} -> {calibration['loss_near_t']:.3f} -> {calibration['loss_vector']:.3f}): "
           "the probabilities are calibrated, and greedy answers can differ from the uncalibrated adapter's. "
           if calibration.get("method") == "vector" else
           f"scaled so that every logit is divided by a temperature of {calibration['temperature']:g}, fitted on "
           f"{calibration['records']} validation answers (answer loss there {calibration['loss_at_1']:.3f} -> "
           f"{calibration['loss_near_t']:.3f}): greedy answers are those of the trained adapter; the probabilities "
           "are calibrated. ")
        + "The metrics below are of this adapter, merged.\n") if calibration else ""
    body = f"""# {repo}

A LoRA adapter for `{base_ref}`, fine-tuned with QLoRA by the slmforge finetune pipeline.
{f"{chr(10)}{bundled_note}{chr(10)}" if bundled_note else ""}{calibration_note}
## Evaluation (held-out split, greedy decoding)

{markdown_table(metrics_rows)}

Primary metric: `{primary}`.
{f"{chr(10)}Key accuracy per test part:{chr(10)}{chr(10)}{markdown_table(per_part)}{chr(10)}" if per_part else ""}
See `report.md` for the per-category breakdown, the loss curve and sample answers.

## How to load

```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

# the adapter was trained on the {quant_type.upper()} 4-bit base: load the base the same way to get the evaluated model
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{quant_type}",
                                  bnb_4bit_use_double_quant={double_quant}, bnb_4bit_compute_dtype=torch.bfloat16)
# dtype: slmforge quantized a bf16 copy of the base
base = AutoModelForCausalLM.from_pretrained("{base_ref}", quantization_config=quantization, dtype=torch.bfloat16,
                                            device_map="auto")
model = PeftModel.from_pretrained(base, "{repo}"{rev_arg})
tokenizer = AutoTokenizer.from_pretrained("{repo}"{rev_arg})
```
{merged_section}
## Provenance

- Trained on {(data_identity or {}).get("label") or f"`{dataset}`"} (token fingerprint `{fingerprint}`)
{f"- Base model: {model_identity['label']}{chr(10)}" if (model_identity or {}).get("label") else ""}- {run_line or "Prefect flow run: (run outside Prefect)"}
{f"- Result hash: `{content_hash}`{chr(10)}" if content_hash else ""}{f"- Training: {train_line}{chr(10)}" if train_line else ""}
## Training configuration

```yaml
{yaml.safe_dump(config, sort_keys=False, allow_unicode=True).strip()}
```
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def front_matter(card: str) -> dict:
    """The YAML metadata block of a model card (what the Hub parses)."""
    if not card.startswith("---\n"):
        raise ValueError("model card has no YAML front matter")
    block, sep, _ = card[4:].partition("\n---\n")
    if not sep:
        raise ValueError("model card front matter is not closed by '---'")
    return yaml.safe_load(block) or {}


def commit_message(template: str | None, run: str | None, primary: str, base: float, tuned: float) -> str:
    """The configured message with {run}/{primary}/{base}/{tuned} filled in, or the default one."""
    values = {"run": run or "run", "primary": primary, "base": f"{base:.3f}", "tuned": f"{tuned:.3f}"}
    if not template:
        return f"slmforge {values['run']}: {primary} {values['base']} -> {values['tuned']}"
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError):
        return template


# -- keeping secrets out ----------------------------------------------------------------------
def _usable(secrets: list[str | None]) -> list[str]:
    return sorted({s for s in secrets if isinstance(s, str) and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)


def redact_text(text: str, secrets: list[str | None]) -> str:
    for s in _usable(secrets):
        text = text.replace(s, "***")
    return text


def redact(obj, secrets: list[str | None]):
    """Replace any secret value that slipped into a record with '***'."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    for s in _usable(secrets):
        text = text.replace(json.dumps(s, ensure_ascii=False)[1:-1], "***")
    return json.loads(text)


def scrub_folder(folder: Path, secrets: list[str | None]) -> list[str]:
    """Redact secrets from the text files about to be published (rewritten, never edited in place, so
    a hard-linked store file stays intact); refuse a binary file that holds one. Returns the files fixed."""
    wanted = [s.encode() for s in _usable(secrets)]
    fixed = []
    if not wanted:
        return fixed
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file() or p.stat().st_size > SCAN_LIMIT:
            continue
        data = p.read_bytes()
        if not any(w in data for w in wanted):
            continue
        rel = p.relative_to(folder).as_posix()
        if p.suffix.lower() not in TEXT_SUFFIXES:
            raise PublishError(f"refusing to publish {rel}: it contains the Hub token")
        for w in wanted:
            data = data.replace(w, b"***")
        tmp = p.with_name(p.name + ".redacted")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        fixed.append(rel)
    return fixed


# -- the push ---------------------------------------------------------------------------------
def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def transient(exc: BaseException) -> bool:
    """5xx, 408/429 and dropped connections are retried; 401/403/404 and other 4xx are not."""
    status = _status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    # httpx's (or its fork httpx2's, which huggingface_hub 2.4 uses) connect/read/timeout errors
    if any(k.__name__ in ("TransportError", "TimeoutException") for k in type(exc).__mro__):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    server = getattr(exc, "server_message", None)
    first = (server or str(exc) or type(exc).__name__).strip().splitlines()[0][:300]
    return f"HTTP {status}: {first}" if status is not None else f"{type(exc).__name__}: {first}"


def _fatal(exc: BaseException, step: str, repo_id: str, endpoint: str, token_source: str) -> PublishError:
    status = _status(exc)
    if status == 401:
        msg = (f"Hub rejected the token for {endpoint} (HTTP 401 while {step} {repo_id}); "
               f"check the token in {token_source}")
    elif status == 403:
        msg = (f"Hub refused {step} {repo_id} at {endpoint} (HTTP 403): the token from {token_source} "
               f"has no write access to that namespace")
    elif status == 404:
        msg = (f"Hub answered 404 while {step} {repo_id} at {endpoint}: check publish.hub_repo, "
               f"publish.revision and publish.hub_endpoint ({_describe(exc)})")
    elif status is not None:
        msg = f"Hub refused {step} {repo_id} at {endpoint} ({_describe(exc)})"
    else:
        msg = f"{step} {repo_id} at {endpoint} failed ({_describe(exc)})"
    return PublishError(msg)


def push(folder: Path, repo_id: str, token: str, endpoint: str, private: bool, revision: str,
         message: str, *, description: str | None = None, delete_patterns: list[str] | None = None,
         token_source: str = "HF_TOKEN", attempts: int | None = None, base_delay: float | None = None,
         log=print) -> dict:
    """create_repo(exist_ok) (+ the branch) + ONE upload_folder commit, retried with backoff on 5xx
    and connection errors (the client does not retry the commit POST). Returns
    {"commit", "commit_url"}; raises PublishError, without the token, when it cannot."""
    from huggingface_hub import HfApi

    attempts = attempts or PUSH_ATTEMPTS
    base_delay = PUSH_BASE_DELAY if base_delay is None else base_delay
    secrets = [token]
    api = HfApi(endpoint=endpoint, token=token, library_name="slmforge")
    step = {"now": "creating"}

    def attempt() -> dict:
        step["now"] = "creating"
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            step["now"] = "creating branch " + revision + " of"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step["now"] = "pushing to"
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=message, commit_description=description,
                                 delete_patterns=delete_patterns)
        url = getattr(info, "commit_url", None) or f"{endpoint.rstrip('/')}/{repo_id}/commit/{info.oid}"
        return {"commit": info.oid, "commit_url": url}

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception()
        log(redact_text(f"{step['now']} {repo_id} failed ({_describe(exc)}); retry {state.attempt_number}/"
                        f"{attempts - 1} in {state.next_action.sleep:.1f} s", secrets))

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient), stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=base_delay, max=60 * base_delay)
        + tenacity.wait_random(0, base_delay),
        before_sleep=before_sleep, reraise=True)
    try:
        return retrying(attempt)
    except Exception as exc:  # noqa: BLE001 - classified below; the client's exception is not chained
        if not transient(exc):
            raise PublishError(redact_text(str(_fatal(exc, step["now"], repo_id, endpoint, token_source)), secrets)) \
                from None
        raise PublishError(redact_text(
            f"{step['now']} {repo_id} at {endpoint} failed after {attempts} attempts ({_describe(exc)})",
            secrets)) from None


def base_licence(model_id: str, endpoint: str, token: str | None) -> str | None:
    """Best effort: the licence in a Hub base model's card metadata (None when it cannot be read)."""
    try:
        from huggingface_hub import HfApi

        data = HfApi(endpoint=endpoint, token=token).model_info(model_id).card_data
        value = data.get("license") if data is not None else None
        return value if isinstance(value, str) and value else None
    except Exception:  # noqa: BLE001 - a card without a licence is published as "other"
        return None
