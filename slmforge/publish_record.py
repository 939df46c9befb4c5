"""What was published, and where: derived from the store, never read-modify-written.

Each publish commits its own output `published/<content hash>/` whose manifest carries the entry
(where it went, the gate's figures, the flow run). Those manifests are the record, so two runs that
publish at once cannot lose each other's entry. `published/record.json` is an index for people and
scripts, rewritten from them after every publish until it matches what the store holds.
"""

from __future__ import annotations

from slmforge.storage import ArtifactStore

PREFIX = "published"
INDEX = f"{PREFIX}/record.json"


def entries(store: ArtifactStore) -> dict[str, dict]:
    """Content hash -> entry of every committed publish (a half-written one has no manifest)."""
    out = {}
    for name in store.children(PREFIX):
        manifest = store.manifest(f"{PREFIX}/{name}") if name != INDEX.rsplit("/", 1)[1] else None
        if manifest is not None:
            out[name] = {k: v for k, v in manifest["meta"].items() if k != "content_hash"}
    return out


def target_of(entry: dict) -> str:
    return entry.get("target") or entry.get("repo_id") or "dry-run"


def record(store: ArtifactStore) -> dict:
    """`published`: every entry by content hash; `latest`: the newest entry per target (Hub repo or dry-run)."""
    published = entries(store)
    latest: dict[str, dict] = {}
    for h, e in sorted(published.items(), key=lambda kv: kv[1].get("published_at") or 0):
        latest[target_of(e)] = {**e, "content_hash": h}
    return {"published": published, "latest": latest}


def write_index(store: ArtifactStore, attempts: int = 5) -> dict:
    """Rewrite `published/record.json` from the entries, again while another publisher's entry
    appeared between reading and writing: whoever writes last has read every committed entry."""
    current = record(store)
    for _ in range(attempts):
        store.write_json(INDEX, current)
        again = record(store)
        if again == current:
            break
        current = again
    return current
