"""Where each model a comparison names comes from: bundled aliases, local directories, `.gguf`
files and Hub ids made loadable (materialised once into the store), `finetune:latest` and
`store:<key>` read from the store, and, for a merged fine-tuned model, the adapter and 4-bit base
it was merged from (its "4bit + adapter" row)."""

from __future__ import annotations

from pathlib import Path

from slmforge import modeling as M
from slmforge import publish_record
from slmforge.compare_config import FINETUNE_LATEST
from slmforge.config import ModelConfig
from slmforge.storage import MANIFEST, ArtifactStore
from slmforge.identity import model_identity
from tasks.model import materialise_base

STORE_PREFIX = "store:"


def latest_finetuned(store: ArtifactStore) -> tuple[str, str] | None:
    """(store key, how it was found) of the newest fine-tuned merged model, or None.

    A merged model recorded by the publish stage (when it pushed one) wins; otherwise the newest
    `merged/*` output by its manifest's creation time.
    """
    latest = [e for e in publish_record.record(store)["latest"].values() if e.get("merged")]
    for entry in sorted(latest, key=lambda e: e.get("published_at") or 0, reverse=True):
        if store.exists(entry["merged"]):
            return entry["merged"], f"published ({entry.get('location') or publish_record.INDEX})"
    try:
        manifests = store.fs.glob(store.path(f"merged/*/{MANIFEST}"))
    except FileNotFoundError:
        manifests = []
    best: tuple[float, str] | None = None
    for m in manifests:
        key = "merged/" + m.rstrip("/").split("/")[-2]
        created = (store.read_json(f"{key}/{MANIFEST}") or {}).get("created", 0)
        if best is None or created > best[0]:
            best = (created, key)
    return (best[1], "newest merged model in the store") if best else None


def display_name(spec: str) -> str:
    if spec.startswith(("/", ".", "~")) or Path(spec).exists():
        return Path(spec).name or spec
    return spec


def resolve_entry(spec: str, store: ArtifactStore, log=print, materialise: bool = True) -> dict:
    """A model source -> where its loadable checkpoint is: {name, spec, kind, key|path, source_label}.

    GGUF files (bundled aliases, `.gguf` paths) and Hub ids are materialised once into the store as
    safetensors; local checkpoint directories are used in place; `finetune:latest` and
    `store:<key>` point at store outputs. A `finetune:latest` with nothing to find is `skipped`.
    Raises ModelSourceError (the row's error) when the source cannot be used.
    """
    entry = {"name": display_name(spec), "spec": spec}
    if spec == FINETUNE_LATEST:
        found = latest_finetuned(store)
        if found is None:
            return {**entry, "kind": "skipped", "skipped": "no fine-tuned (merged) model in the store yet"}
        key, how = found
        return with_trained_form({**entry, "kind": "store", "key": key, "source_label": f"{key} ({how})"}, store, log)
    if spec.startswith(STORE_PREFIX):
        key = spec[len(STORE_PREFIX):].strip("/")
        if not store.exists(key):
            raise M.ModelSourceError(f"{store.uri(key)} is not a complete output in the store (no {MANIFEST})")
        return with_trained_form({**entry, "kind": "store", "key": key, "source_label": key}, store, log)
    src = M.resolve_source(spec)
    if src.kind == "dir":
        M.load_tokenizer(Path(src.location))  # fails now, with the reason, if it has no usable chat template
        return {**entry, "kind": "path", "path": src.location, "source_label": src.location}
    label = f"{src.kind}: {src.location}" + (f"/{src.gguf_file}" if src.gguf_file else "")
    if not materialise:
        return {**entry, "kind": "store", "key": None, "source_label": label}
    model = ModelConfig(source=spec)
    base = materialise_base(model, store, log, model_identity(model))  # the finetune flow's key for the same model
    return {**entry, "kind": "store", "key": base["key"], "source_label": label, "n_params": base.get("n_params")}


def model_dir(entry: dict, store: ArtifactStore) -> Path:
    return Path(entry["path"]) if entry["kind"] == "path" else store.get_dir(entry["key"])


def trained_from(key: str, store: ArtifactStore, log=print) -> dict | None:
    """The adapter and 4-bit base a merged model was made from, when the store still has both
    (None for other outputs, and for merged models of versions that did not record them)."""
    found = ((store.manifest(key) or {}).get("meta") or {}).get("trained_from") or {}
    if not (found.get("adapter") and found.get("quantized_base")):
        return None
    missing = [k for k in (found["adapter"], found["quantized_base"]) if not store.exists(k)]
    if missing:
        log(f"{key}: its {', '.join(missing)} is no longer in the store, so its 4-bit row is the merged "
            "model quantized again, which loses most of what the adapter taught")
        return None
    return found


def with_trained_form(entry: dict, store: ArtifactStore, log=print) -> dict:
    """A merged model's entry, told where its adapter and 4-bit base are."""
    found = trained_from(entry["key"], store, log) if entry.get("key") else None
    return {**entry, "trained_from": found} if found else entry
