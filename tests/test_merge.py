"""The merge publishes what was trained: merged into the dequantized 4-bit base, saved, reloaded and
compared with the trained model (the adapter on the 4-bit base). The tiny model's weights are
coarse (std 0.2), so its NF4 error is large: anything but the trained model diverges visibly."""

import json

import pytest

from slmforge import merging as G
from slmforge import modeling as M
from slmforge.records import encode_example
from slmforge.runtime import decide

CHECK = {"max_new_tokens": 12, "batch_size": 4, "max_logit_diff": 2.0, "min_agreement": 0.0}


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized")
    M.load_model(tiny_model_dir, "4bit").save_pretrained(out)
    M.load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(quantized_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    model = M.load_model(quantized_dir, "saved")
    # non-zero B so the adapter really changes the logits
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def records(tiny_model_dir):
    tok = M.load_tokenizer(tiny_model_dir)
    out = []
    for q, a in [("한국의 수도는?", "서울입니다."), ("일본의 수도는?", "도쿄입니다."), ("3 더하기 4는?", "7입니다."),
                 ("프랑스의 수도는?", "파리입니다.")]:
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        ids, labels = encode_example(tok, msgs)
        prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        out.append({"input_ids": ids, "labels": labels, "prompt_ids": list(prompt)})
    return out


def _check(quantized_dir, adapter_dir, merged_dir, records, tiny_model_dir):
    trained = G.load_trained(quantized_dir, adapter_dir, decide())
    published = M.load_model(merged_dir, "weights")
    return G.check_published(trained, published, M.load_tokenizer(tiny_model_dir), records, **CHECK)


def test_merged_into_the_dequantized_base_reproduces_the_trained_model(
        tiny_model_dir, quantized_dir, adapter_dir, records, tmp_path):
    info = G.merge(quantized_dir, tiny_model_dir, adapter_dir, tmp_path / "merged", "quantized")
    assert info == {"into": "quantized", "dtype": "bfloat16"}
    merged = M.load_model(tmp_path / "merged", "fp32")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not hasattr(merged.config, "quantization_config")
    check = _check(quantized_dir, adapter_dir, tmp_path / "merged", records, tiny_model_dir)
    assert check["within_tolerance"], json.dumps(check, ensure_ascii=False)
    assert check["compared_with"].startswith("trained")


def test_merged_into_the_original_weights_is_reported_as_diverging(
        tiny_model_dir, quantized_dir, adapter_dir, records, tmp_path):
    G.merge(quantized_dir, tiny_model_dir, adapter_dir, tmp_path / "merged", "original")
    check = _check(quantized_dir, adapter_dir, tmp_path / "merged", records, tiny_model_dir)
    assert not check["within_tolerance"], json.dumps(check, ensure_ascii=False)
    assert check["max_logit_diff"] > CHECK["max_logit_diff"]


def test_a_corrupted_merge_is_caught(tiny_model_dir, quantized_dir, adapter_dir, records, tmp_path):
    G.merge(quantized_dir, tiny_model_dir, adapter_dir, tmp_path / "merged", "quantized", corrupt=0.5)
    check = _check(quantized_dir, adapter_dir, tmp_path / "merged", records, tiny_model_dir)
    assert not check["within_tolerance"], json.dumps(check, ensure_ascii=False)
    assert "max logit diff" in G.describe_check(check)


def test_merge_into_an_unknown_base_is_refused(tiny_model_dir, quantized_dir, adapter_dir, tmp_path):
    with pytest.raises(ValueError, match="merge.into"):
        G.merge(quantized_dir, tiny_model_dir, adapter_dir, tmp_path / "merged", "somewhere")


def test_the_stage_checks_in_float32_whatever_the_runtime_computes_in(tiny_model_dir, quantized_dir, adapter_dir,
                                                                       records, tmp_path, monkeypatch):
    """A GPU runtime computes in bf16 (here: the same decision on CPU); the check's tolerances come from
    float32, so both sides of the comparison load and compute in float32."""
    import shutil
    from dataclasses import replace

    import torch

    import tasks.merge as TM
    from slmforge.config import EvalConfig, MergeConfig
    from slmforge.records import write_jsonl
    from slmforge.storage import ArtifactStore

    store = ArtifactStore(f"file://{tmp_path}/store")
    for key, src in [("q", quantized_dir), ("b", tiny_model_dir), ("a", adapter_dir)]:
        staging = store.staging_dir(key)
        shutil.copytree(src, staging, dirs_exist_ok=True)
        if key == "a":  # the train stage saves the tokenizer with the adapter
            M.load_tokenizer(tiny_model_dir).save_pretrained(staging)
        store.commit_dir(staging, key)
    staging = store.staging_dir("d")
    write_jsonl(staging / "validation.jsonl", records)
    store.commit_dir(staging, "d")
    bf16 = replace(decide(), compute_dtype="bfloat16", weights_dtype="bfloat16", mixed_precision="bf16")
    monkeypatch.setattr(TM, "for_config", lambda model_cfg: bf16)
    seen = {}
    real = G.check_published

    def spy(trained, published, *args, **kwargs):
        seen["published"] = {p.dtype for p in published.parameters()}
        seen["trained"] = {p.dtype for n, p in trained.named_parameters() if p.is_floating_point()}
        seen["compute"] = {m.compute_dtype for m in trained.modules() if hasattr(m, "compute_dtype")}
        return real(trained, published, *args, **kwargs)

    monkeypatch.setattr(G, "check_published", spy)
    out = TM.run_merge({"key": "a"}, {"quantized": {"key": "q"}, "base": {"key": "b"}}, {"key": "d"},
                       MergeConfig(check_items=4), EvalConfig(max_new_tokens=8, batch_size=4), store, log=lambda m: None)
    assert seen["published"] == {torch.float32} and seen["trained"] == {torch.float32}
    assert seen["compute"] == {torch.float32}
    assert out["merge_check"]["within_tolerance"] and out["runtime"]["compute_dtype"] == "bfloat16"
