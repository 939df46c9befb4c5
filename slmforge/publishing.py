"""The quality gate, the model card, and the push to the Hugging Face Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from slmforge.report import markdown_table


def gate(primary: str, tuned: float | None, base: float | None, min_improvement: float,
         last_published: float | None) -> tuple[bool, str]:
    """Publish only a clear improvement over the base that is no worse than what is already out."""
    if tuned is None or base is None:
        return False, f"not published: {primary} could not be computed (no key facts in the test split?)"
    if tuned < base + min_improvement:
        return False, (f"not published: {primary} {tuned:.3f} does not beat the base {base:.3f} "
                       f"by the required {min_improvement:.3f}")
    if last_published is not None and tuned < last_published:
        return False, f"not published: {primary} {tuned:.3f} is below the last published {last_published:.3f}"
    return True, f"passed: {primary} {base:.3f} → {tuned:.3f}" + (
        f" (last published {last_published:.3f})" if last_published is not None else "")


def model_card(*, repo_id: str | None, base_model: str, licence: str | None, metrics_rows: list[dict],
               summary_tuned: dict, primary: str, config: dict, fingerprint: str, flow_run: str | None,
               dataset: str) -> str:
    """README.md with Hub metadata (base_model, library_name: peft, model-index) and a how-to-load."""
    overall = summary_tuned["overall"]
    meta = {
        "base_model": base_model,
        "library_name": "peft",
        "license": licence or "other",
        "tags": ["slmforge", "qlora", "lora", "korean"],
        "language": ["ko"],
        "datasets": [dataset],
        "model-index": [{
            "name": repo_id or "slmforge-adapter",
            "results": [{
                "task": {"type": "text-generation", "name": "Question answering"},
                "dataset": {"name": dataset, "type": dataset, "split": "test"},
                "metrics": [
                    {"type": name, "name": name.replace("_", " "), "value": round(float(overall[name]), 4)}
                    for name in ("key_accuracy", "char_f1", "chrf", "exact_match", "answer_loss")
                    if overall.get(name) is not None
                ],
            }],
        }],
    }
    repo = repo_id or "<user>/<repo>"
    body = f"""# {repo}

A LoRA adapter for `{base_model}`, fine-tuned with QLoRA by the slmforge finetune pipeline.

## Evaluation (held-out split, greedy decoding)

{markdown_table(metrics_rows)}

Primary metric: `{primary}`. Data fingerprint: `{fingerprint}`.{f" Prefect flow run: `{flow_run}`." if flow_run else ""}

## How to load

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_model}", device_map="auto", dtype="auto")
model = PeftModel.from_pretrained(base, "{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

## Training configuration

```yaml
{yaml.safe_dump(config, sort_keys=False, allow_unicode=True).strip()}
```
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def hub_token(secret_block: str | None) -> str | None:
    """The Hub token: a Prefect Secret block if one of that name exists, else HF_TOKEN. Never logged."""
    if secret_block:
        try:
            from prefect.blocks.system import Secret

            return Secret.load(secret_block, _sync=True).get()
        except Exception:  # noqa: BLE001 - no block, no API: fall back to the environment
            pass
    return os.environ.get("HF_TOKEN") or None


def push(folder: Path, repo_id: str, token: str, endpoint: str, private: bool, revision: str,
         message: str) -> str:
    """create_repo(exist_ok) + one upload_folder commit. Returns the commit id."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message=message)
    return info.oid


def redact(obj, secrets: list[str]):
    """Replace any secret value that slipped into a record with '***'."""
    text = json.dumps(obj, ensure_ascii=False, default=str)
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return json.loads(text)
