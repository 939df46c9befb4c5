import pytest

from slmforge.storage import ArtifactStore, StoreError, content_hash


def test_content_hash_follows_inputs_not_key_order():
    assert content_hash({"x": 1, "y": [1, 2]}) == content_hash({"y": [1, 2], "x": 1})
    assert content_hash({"x": 1}) != content_hash({"x": 2})


def test_commit_makes_output_visible_with_manifest(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/store")
    key = "stage/abc"
    staging = store.staging_dir(key)
    (staging / "w.bin").write_bytes(b"x" * 1000)
    (staging / "sub").mkdir()
    (staging / "sub" / "c.json").write_text("{}")
    assert not store.exists(key)
    manifest = store.commit_dir(staging, key, meta={"m": 1})
    assert store.exists(key)
    assert {f["path"] for f in manifest["files"]} == {"w.bin", "sub/c.json"}
    local = store.get_dir(key)
    assert (local / "w.bin").read_bytes() == b"x" * 1000
    assert not staging.exists()


def test_partial_output_is_ignored_and_cleaned(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/store")
    partial = tmp_path / "store" / "stage" / "half"
    partial.mkdir(parents=True)
    (partial / "w.bin").write_bytes(b"half")
    assert not store.exists("stage/half")
    with pytest.raises(StoreError, match="missing or incomplete"):
        store.get_dir("stage/half")
    assert store.discard_partial("stage/half")
    assert not partial.exists()


def test_size_mismatch_is_caught(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/store")
    staging = store.staging_dir("s/k")
    (staging / "f").write_text("hello")
    store.commit_dir(staging, "s/k")
    (tmp_path / "store" / "s" / "k" / "f").write_text("hello, tampered")
    with pytest.raises(StoreError, match="size differs"):
        store.get_dir("s/k")


def test_json_records_and_unwritable_store(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/store")
    store.write_json("published/record.json", {"a": "한국어"})
    assert store.read_json("published/record.json") == {"a": "한국어"}
    assert store.read_json("nope.json", default=5) == 5
    ro = tmp_path / "ro"
    ro.write_text("a file, not a directory")
    with pytest.raises(StoreError, match="storage.url"):
        ArtifactStore(f"file://{ro}/store").check_writable()
