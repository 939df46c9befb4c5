"""Shared fixtures: a tiny random Llama (real architecture, random weights) with the bundled
SmolLM2 tokenizer and chat template, and a Prefect test API for flow tests."""

from __future__ import annotations

import json
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# the SeaweedFS fixtures (`weed_server`, `weed`) for any test module that needs a real S3 server
pytest_plugins = ("weed",)

# `make test` sets this: on a machine set up by `make` nothing may skip, so a missing package or
# browser fails the run instead of leaving it green with less tested.
NO_SKIPS = os.environ.get("SLMFORGE_NO_SKIPS") == "1"
_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if NO_SKIPS and _SKIPPED and exitstatus == 0:
        print(f"\nSLMFORGE_NO_SKIPS: {len(_SKIPPED)} test(s) skipped: {', '.join(_SKIPPED[:10])}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    from slmforge.modeling import load_tokenizer, resolve_source

    out = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(resolve_source("smollm2-135m-instruct")).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """A 2-layer Llama with the SmolLM2 vocabulary, saved as a normal checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id,
                      # std 0.02 embeddings cap a 64-wide model's logits near ±1: it could not fit
                      # anything, and a learning test on it could not tell learning from not
                      initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def sums_file(tmp_path_factory) -> Path:
    """Short English Q&A (under 64 tokens templated), 20 train and 5 test rows, no validation split."""
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}.", "key": str(a + b),
             "split": "test" if i % 5 == 4 else "train"}
            for i, (a, b) in enumerate((a, b) for a in range(2, 7) for b in range(3, 8))]
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
