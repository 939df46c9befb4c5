"""The code and library fingerprint in the stages' store keys and cache key: an edited core function
or an upgraded library must not be served the artifacts the old code wrote."""

import shutil

import pytest

from slmforge import fingerprint as F


@pytest.fixture
def tree(tmp_path):
    """A copy of the packages the stages run, to edit without touching the real tree."""
    roots = []
    for root in F.SOURCES:
        shutil.copytree(root, tmp_path / root.name, ignore=shutil.ignore_patterns("__pycache__"))
        roots.append(tmp_path / root.name)
    return tuple(roots)


def test_stable_across_calls_and_changes_when_a_core_function_body_is_edited(tree):
    assert F.fingerprint() == F.fingerprint()
    before = F.code_fingerprint.__wrapped__(tree)
    assert F.code_fingerprint.__wrapped__(tree) == before
    training = tree[0] / "training.py"
    source = training.read_text()
    assert "\ndef " in source
    # one more statement at the top of the first function's body; nothing else in the tree changes
    head, sep, rest = source.partition("\ndef ")
    signature_end = rest.index(":\n") + 2
    training.write_text(head + sep + rest[:signature_end] + "    pass\n" + rest[signature_end:])
    after = F.code_fingerprint.__wrapped__(tree)
    assert after != before
    assert F.fingerprint(code=after) != F.fingerprint(code=before)


def test_a_new_file_in_a_package_changes_it_too(tree):
    before = F.code_fingerprint.__wrapped__(tree)
    (tree[1] / "extra.py").write_text("X = 1\n")
    assert F.code_fingerprint.__wrapped__(tree) != before


def test_changes_when_a_library_version_differs():
    installed = F.library_versions()
    assert set(installed) == set(F.LIBRARIES)
    assert installed["torch"]  # read from metadata, torch itself need not be imported
    upgraded = {**installed, "trl": "99.0.0"}
    assert F.fingerprint(versions=upgraded) != F.fingerprint(versions=installed) == F.fingerprint()
    assert F.library_versions(("surely-not-installed-pkg",)) == {"surely-not-installed-pkg": None}


def test_the_cache_policy_and_the_store_keys_follow_it(monkeypatch):
    from prefect.cache_policies import INPUTS, TASK_SOURCE

    from slmforge.config import LoraSettings, ModelConfig, TrainConfig
    from tasks.caching import STAGE_CACHE, CodeVersion
    from tasks.model import base_key
    from tasks.train import adapter_key

    for policy in (STAGE_CACHE,):
        kinds = [type(p) for p in policy.policies]
        assert CodeVersion in kinds and type(TASK_SOURCE) in kinds and type(INPUTS) in kinds, kinds

    dataset, base = {"train_fingerprint": "f", "max_length": 256}, {"quantized": {"key": "models/quantized/x"}}
    lora, train, model = LoraSettings(), TrainConfig(), ModelConfig()

    def keys():
        return CodeVersion().compute_key(None, {}, {}), base_key(model), adapter_key(dataset, base, lora, train)

    before = keys()
    assert before == keys()
    monkeypatch.setattr(F, "code_fingerprint", lambda roots=F.SOURCES: "an edited core function")
    after = keys()
    assert all(a != b for a, b in zip(after, before)), (before, after)
