"""The merge check: a faithful merge passes, a corrupted one is caught and never saved."""

import pytest

from slmforge import modeling as M
from slmforge.data import encode_example
from slmforge.merging import MergeError, merge


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    model = M.load_model(tiny_model_dir, "fp32")
    # non-zero B so the adapter really changes the logits
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def check_records(tiny_model_dir):
    tok = M.load_tokenizer(tiny_model_dir)
    msgs = [{"role": "user", "content": "한국의 수도는?"}, {"role": "assistant", "content": "서울입니다."}]
    ids, labels = encode_example(tok, msgs)
    return [{"input_ids": ids, "labels": labels}]


def test_faithful_merge_passes(tiny_model_dir, adapter_dir, check_records, tmp_path):
    info = merge(tiny_model_dir, adapter_dir, tmp_path / "merged", check_records)
    assert info["max_logit_diff"] < info["tolerance"]
    assert (tmp_path / "merged" / "config.json").is_file()
    merged = M.load_model(tmp_path / "merged", "fp32")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_corrupted_merge_is_caught_and_not_saved(tiny_model_dir, adapter_dir, check_records, tmp_path):
    with pytest.raises(MergeError, match="differ"):
        merge(tiny_model_dir, adapter_dir, tmp_path / "merged", check_records, corrupt=0.5)
    assert not (tmp_path / "merged").exists()
