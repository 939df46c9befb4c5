"""Run the real ``huggingface_hub`` client against tests/hub_server.LocalHub."""

from __future__ import annotations

import os

# huggingface_hub reads these at import time (huggingface_hub.constants); set them before
# importing it. The autouse fixture below also patches the already-read constants, in case
# another module imported huggingface_hub first.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_server import LocalHub, git_blob_id  # noqa: E402

from huggingface_hub import HfApi, hf_hub_download  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402

# The client's LFS PUT passes a file object as `data=`, which httpx deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_test_token"
REPO = "tester/slm-adapter"


@pytest.fixture(autouse=True)
def _hub_env(monkeypatch, tmp_path):
    for key, value in {
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    no_proxy = os.environ.get("NO_PROXY", "")
    monkeypatch.setenv("NO_PROXY", ",".join(filter(None, [no_proxy, "127.0.0.1", "localhost"])))


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub", token=TOKEN) as server:
        yield server
    assert not server.server_errors, server.server_errors


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "README.md").write_text(
        "---\nlicense: apache-2.0\nbase_model: tiny/base\ntags:\n- slmforge\n- lora\n---\n\n# Adapter\n\nTest card.\n",
        encoding="utf-8",
    )
    (out / "adapter_config.json").write_text(
        json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, indent=2)
    )
    (out / "adapter_model.safetensors").write_bytes(os.urandom(2 * 1024 * 1024))
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local_digests(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def _assert_files_intact(hub: LocalHub, folder: Path, repo_id: str = REPO, repo_type: str = "model") -> None:
    for name, digest in _local_digests(folder).items():
        assert _sha256(hub.file_bytes(repo_id, name, repo_type=repo_type)) == digest, name


def test_create_and_upload_folder_roundtrip(hub, folder, tmp_path):
    api = HfApi(endpoint=hub.url, token=TOKEN)

    url = api.create_repo(REPO, exist_ok=True, private=True)
    again = api.create_repo(REPO, exist_ok=True, private=True)
    assert url.repo_id == again.repo_id == REPO
    assert hub.repo_exists(REPO) and hub.is_private(REPO)
    assert [r.status for r in hub.requests("POST", "/api/repos/create")] == [200, 409]

    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Upload adapter")
    assert len(info.oid) == 40
    _assert_files_intact(hub, folder)

    commits = hub.commits(REPO)
    assert [c["summary"] for c in commits] == ["initial commit", "Upload adapter"]
    assert commits[-1]["oid"] == info.oid
    assert commits[-1]["files"]["adapter_model.safetensors"]["lfs"] is True
    assert commits[-1]["files"]["adapter_config.json"]["lfs"] is False
    assert commits[-1]["files"]["README.md"]["lfs"] is False
    # The binary went through git-LFS (batch -> PUT -> verify), the text files inline.
    assert [r.status for r in hub.requests("PUT", "/_lfs/upload/")] == [200]
    assert [r.status for r in hub.requests("POST", ".git/info/lfs/objects/verify")] == [200]
    # upload_folder validates README.md's YAML twice (folder scan, then create_commit).
    assert {r.status for r in hub.requests("POST", "/validate-yaml")} == {200}

    model = api.model_info(REPO)
    assert model.sha == info.oid
    assert model.private is True
    assert {s.rfilename for s in model.siblings} == {
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"
    }
    assert set(api.list_repo_files(REPO)) == {s.rfilename for s in model.siblings}

    # Download through the client too.
    got = hf_hub_download(
        REPO, "adapter_model.safetensors", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache"
    )
    assert _sha256(Path(got).read_bytes()) == _sha256((folder / "adapter_model.safetensors").read_bytes())

    # Same content again: the client may skip the commit; it must succeed and keep files intact.
    info2 = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Upload adapter again")
    assert api.model_info(REPO).sha == info2.oid == hub.head(REPO)
    _assert_files_intact(hub, folder)

    # Changed content makes a new commit; unchanged files keep their bytes.
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16}))
    info3 = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Bump r")
    assert info3.oid != info.oid
    assert api.model_info(REPO).sha == info3.oid
    assert hub.commits(REPO)[-1]["added"] == ["adapter_config.json"]
    _assert_files_intact(hub, folder)


def test_preupload_reports_remote_oids(hub):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"hello\n", path_in_repo="notes.txt", repo_id=REPO)
    tree = {f.path: f for f in api.list_repo_tree(REPO, recursive=True)}
    assert tree["notes.txt"].blob_id == git_blob_id(b"hello\n")
    assert hub.file_bytes(REPO, "notes.txt") == b"hello\n"


def test_wrong_or_missing_token_is_401(hub, folder):
    bad = HfApi(endpoint=hub.url, token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as excinfo:
        bad.create_repo(REPO, exist_ok=True, private=True)
    assert excinfo.value.response.status_code == 401
    assert "Invalid credentials in Authorization header" in str(excinfo.value)
    assert not hub.repo_exists(REPO)

    HfApi(endpoint=hub.url, token=TOKEN).create_repo(REPO, exist_ok=True, private=True)
    with pytest.raises(HfHubHTTPError) as excinfo:
        bad.upload_folder(repo_id=REPO, folder_path=folder)
    assert excinfo.value.response.status_code == 401
    assert [c["summary"] for c in hub.commits(REPO)] == ["initial commit"]

    # Private repo read with no token at all.
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    assert excinfo.value.response.status_code == 401


def test_failed_commit_then_retry(tmp_path, folder):
    with LocalHub(tmp_path / "hub", token=TOKEN, fail_commits=1) as hub:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo(REPO, exist_ok=True, private=True)

        with pytest.raises(HfHubHTTPError) as excinfo:
            api.upload_folder(repo_id=REPO, folder_path=folder)
        assert excinfo.value.response.status_code == 500
        assert [c["summary"] for c in hub.commits(REPO)] == ["initial commit"]

        info = api.upload_folder(repo_id=REPO, folder_path=folder)
        assert api.model_info(REPO).sha == info.oid
        _assert_files_intact(hub, folder)
        assert [r.status for r in hub.requests("POST", "/commit/")] == [500, 200]
        assert not hub.server_errors


def test_dataset_repo_and_persistence(tmp_path):
    root = tmp_path / "hub"
    with LocalHub(root, token=TOKEN) as hub:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        url = api.create_repo("tester/data", repo_type="dataset", exist_ok=True)
        assert url.repo_type == "dataset"
        info = api.upload_file(
            path_or_fileobj=b'{"text": "hi"}\n', path_in_repo="train.jsonl", repo_id="tester/data",
            repo_type="dataset",
        )
        assert api.dataset_info("tester/data").sha == info.oid
        assert not hub.repo_exists("tester/data")  # model namespace is separate
    # A fresh server on the same root sees the stored repo.
    reopened = LocalHub(root, token=TOKEN)
    assert reopened.repo_exists("tester/data", repo_type="dataset")
    assert reopened.file_bytes("tester/data", "train.jsonl", repo_type="dataset") == b'{"text": "hi"}\n'
