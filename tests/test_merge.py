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
