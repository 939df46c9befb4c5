"""Temperature scaling: the fitted T minimises the validation answers' loss, folding it into the
weights divides every logit by T (greedy answers unchanged), and the calibrated adapter computes
the same function reloaded by peft and merged."""

import pytest
import torch

from slmforge import calibration as C
from slmforge import modeling as M
from slmforge.evaluation import answer_losses, generate_answers, per_record_mean
from slmforge.records import encode_example, generation_prompt_ids

QA = [("한국의 수도는?", "서울입니다."), ("일본의 수도는?", "도쿄입니다."), ("3 더하기 4는?", "7입니다."),
      ("프랑스의 수도는?", "파리입니다."), ("물의 끓는점은?", "섭씨 100도입니다."), ("태양계에서 가장 큰 행성은?", "목성입니다.")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return M.load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def records(tokenizer):
    out = []
    for q, a in QA:
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        ids, labels = encode_example(tokenizer, msgs)
        out.append({"input_ids": ids, "labels": labels, "prompt_ids": generation_prompt_ids(tokenizer, msgs[:1])})
    return out


def _loss(model, records, tokenizer) -> float:
    losses = answer_losses(model, records, 4, tokenizer.pad_token_id)
    return sum(losses) / len(losses)


def _model(tiny_model_dir, logit_scale: float):
    """The tiny model with its logits multiplied by `logit_scale` (its final norm scaled)."""
    model = M.load_model(tiny_model_dir, "fp32").eval()
    model.model.norm.weight.data *= logit_scale
    return model


@pytest.fixture(scope="module")
def drawn_at_2(tiny_model_dir, records, tokenizer):
    """Answers sampled from the (4x sharpened) tiny model at temperature 2: the T that fits them best is 2."""
    model = _model(tiny_model_dir, 4.0)
    torch.manual_seed(0)
    out = []
    for rec in records * 8:
        prompt = torch.tensor([rec["prompt_ids"]])
        ids = model.generate(prompt, do_sample=True, temperature=2.0, top_k=0, top_p=1.0, max_new_tokens=16,
                             min_new_tokens=16, pad_token_id=tokenizer.pad_token_id)[0].tolist()
        n = len(rec["prompt_ids"])
        out.append({"input_ids": ids, "labels": [-100] * n + ids[n:], "prompt_ids": rec["prompt_ids"]})
    return out


def test_the_fitted_temperature_is_the_one_the_answers_were_drawn_at(tiny_model_dir, drawn_at_2, tokenizer):
    pad = tokenizer.pad_token_id
    fit = C.fit_temperature(_model(tiny_model_dir, 4.0), drawn_at_2, 4, pad)
    assert fit["temperature"] == pytest.approx(2.0, rel=0.1), fit
    # a model 1.5 times as sure of the same predictions needs 1.5 times the temperature
    sharper = C.fit_temperature(_model(tiny_model_dir, 6.0), drawn_at_2, 4, pad)
    assert sharper["temperature"] == pytest.approx(1.5 * fit["temperature"], rel=0.02), (fit, sharper)

    model = _model(tiny_model_dir, 4.0)
    before_answers = generate_answers(model, tokenizer, drawn_at_2[:6], 8, 4)
    C.fold_temperature(model, fit["temperature"], drawn_at_2[0]["input_ids"])
    at_t = _loss(model, drawn_at_2, tokenizer)
    assert at_t < fit["loss_at_1"] - 0.1
    assert at_t == pytest.approx(fit["loss_near_t"], abs=0.02)
    for factor in (1.15, 1 / 1.15):  # either side of the fitted T the loss is higher
        other = _model(tiny_model_dir, 4.0)
        C.fold_temperature(other, fit["temperature"] * factor, drawn_at_2[0]["input_ids"])
        assert _loss(other, drawn_at_2, tokenizer) > at_t
    assert generate_answers(model, tokenizer, drawn_at_2[:6], 8, 4) == before_answers


def _tiny_gemma(tokenizer_dir):
    """A tiny random Gemma 3 whose final norm (x * (1 + weight)) is not zero, which would hide that form."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           initializer_range=0.2)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    model.model.norm.weight.data.normal_(0, 0.3)
    return model


def test_folding_divides_every_logit_by_t(tiny_model_dir, records):
    model = _model(tiny_model_dir, 1.0)
    ids = torch.tensor([records[1]["input_ids"]])
    before = model(input_ids=ids).logits
    folded = C.fold_temperature(model, 1.7, records[0]["input_ids"])
    assert folded["module"] == "model.norm" and folded["form"] == "weight / T"
    torch.testing.assert_close(model(input_ids=ids).logits * 1.7, before, rtol=1e-4, atol=1e-4)


def test_gemma_norm_is_scaled_through_one_plus_its_weight(smollm_tokenizer_dir, records):
    model = _tiny_gemma(smollm_tokenizer_dir)
    ids = torch.tensor([records[1]["input_ids"]])
    before = model(input_ids=ids).logits
    folded = C.fold_temperature(model, 2.0, records[0]["input_ids"])
    assert folded["form"] == "(1 + weight) / T - 1"
    torch.testing.assert_close(model(input_ids=ids).logits * 2.0, before, rtol=1e-4, atol=1e-4)


def test_soft_capped_logits_are_refused_and_the_model_left_as_it_was(tiny_model_dir, records):
    model = _model(tiny_model_dir, 1.0)
    model.config.final_logit_softcapping = 30.0
    weight = model.model.norm.weight.detach().clone()
    with pytest.raises(C.CalibrationError, match="soft-caps"):
        C.fold_temperature(model, 1.5, records[0]["input_ids"])
    assert torch.equal(model.model.norm.weight, weight)


def _random_adapter(tiny_model_dir, out_dir):
    """The tiny model with a random (non-zero) LoRA, saved to `out_dir`, in eval mode."""
    from peft import LoraConfig, get_peft_model

    trained = get_peft_model(M.load_model(tiny_model_dir, "fp32"),
                             LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    trained.save_pretrained(out_dir)
    return trained.eval()


def test_the_calibrated_adapter_reloads_and_merges_to_the_same_function(tiny_model_dir, records, tmp_path):
    from peft import PeftModel

    trained = _random_adapter(tiny_model_dir, tmp_path / "adapter")
    ids = torch.tensor([records[2]["input_ids"]])
    reference = trained(input_ids=ids).logits
    folded = C.fold_temperature(trained, 1.3, records[0]["input_ids"])
    C.write_calibrated_adapter(tmp_path / "adapter", tmp_path / "calibrated", folded)

    reloaded = PeftModel.from_pretrained(M.load_model(tiny_model_dir, "fp32"), str(tmp_path / "calibrated")).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits * 1.3, reference, rtol=1e-4, atol=1e-4)
    # the scaled norm is the adapter's (peft's modules_to_save), not written over the base's own norm
    base_logits = M.load_model(tiny_model_dir, "fp32")(input_ids=ids).logits
    with reloaded.disable_adapter():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, base_logits, rtol=1e-4, atol=1e-4)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits * 1.3, reference, rtol=1e-4, atol=1e-4)
    # the base itself is untouched: the scaled norm lives in the adapter
    plain = PeftModel.from_pretrained(M.load_model(tiny_model_dir, "fp32"), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-4)


def _tiny(arch: str, **extra):
    """A random 2-layer model of another architecture (vocabulary of 1000; ids below it)."""
    import transformers as T

    ids = {"bos_token_id": 0, "eos_token_id": 0}
    configs = {
        "gpt2": lambda: T.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, **ids),
        "opt": lambda: T.OPTConfig(**{"vocab_size": 1000, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "word_embed_proj_dim": 64, "pad_token_id": 0,
                                      **ids, **extra}),
        "falcon": lambda: T.FalconConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **ids),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, **ids),
    }
    torch.manual_seed(0)
    config = configs[arch]()
    return config, T.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch,norm", [("gpt2", "transformer.ln_f"), ("opt", "model.decoder.final_layer_norm"),
                                       ("falcon", "transformer.ln_f"), ("gpt_neox", "gpt_neox.final_layer_norm")])
def test_other_architectures_final_layernorm_and_its_bias_are_scaled(arch, norm):
    from slmforge.lora_targets import meta_model

    config, model = _tiny(arch)
    assert C.unfoldable(config, meta_model(config)) is None  # validation lets it through
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    folded = C.fold_temperature(model, 1.7, [1, 2, 3, 4])
    assert folded["module"] == norm and set(folded["tensors"]) == {f"{norm}.weight", f"{norm}.bias"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits * 1.7, before, rtol=1e-4, atol=1e-4)


def test_a_model_without_a_final_norm_is_refused_in_validation():
    from slmforge.lora_targets import meta_model

    config, _ = _tiny("opt", do_layer_norm_before=False, word_embed_proj_dim=32)  # OPT-350m's shape: no final norm
    assert "no final norm" in C.unfoldable(config, meta_model(config))


def test_a_calibrated_gpt2_adapter_reloads_and_merges_with_the_norms_bias(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    def base():
        return _tiny("gpt2")[1]

    trained = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                init_lora_weights=False))
    trained.save_pretrained(tmp_path / "adapter")
    trained.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        reference = trained(input_ids=ids).logits
    folded = C.fold_temperature(trained, 1.3, [1, 2, 3, 4])
    C.write_calibrated_adapter(tmp_path / "adapter", tmp_path / "calibrated", folded)
    reloaded = PeftModel.from_pretrained(base(), str(tmp_path / "calibrated")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits * 1.3, reference, rtol=1e-4, atol=1e-4)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits * 1.3, reference, rtol=1e-4, atol=1e-4)


# --- method: vector (a scale per hidden dimension) ---

def _miscalibrated(tiny_model_dir):
    """The 4x sharpened tiny model with half of its final norm's dimensions 3x sharper still: a
    temperature cannot undo a per-dimension error, a vector can."""
    model = _model(tiny_model_dir, 4.0)
    model.model.norm.weight.data[::2] *= 3.0
    return model


def test_the_vector_fits_what_one_temperature_cannot_and_folds_to_the_loss_it_reports(tiny_model_dir, drawn_at_2,
                                                                                       tokenizer):
    pad = tokenizer.pad_token_id
    fit = C.fit_vector(_miscalibrated(tiny_model_dir), drawn_at_2, 4, pad, l2=0.0, steps=30)
    assert fit["method"] == "vector" and fit["tokens"] == sum(len(r["input_ids"]) - len(r["prompt_ids"]) for r in drawn_at_2)
    # the answers were drawn from the 4x model at T=2, i.e. from norm * 2: odd dimensions need 1/2, even 1/6
    s = fit["scale"]
    assert s[1::2].mean() == pytest.approx(0.5, rel=0.25) and s[::2].mean() == pytest.approx(1 / 6, rel=0.25), s
    assert fit["loss_vector"] < fit["loss_near_t"] - 0.05, fit
    # the temperature part is the scalar fit on the same answers
    assert fit["temperature"] == pytest.approx(C.fit_temperature(_miscalibrated(tiny_model_dir), drawn_at_2, 4,
                                                                 pad)["temperature"], rel=1e-3)
    model = _miscalibrated(tiny_model_dir)
    folded = C.fold_vector(model, s, drawn_at_2[0]["input_ids"])
    assert folded["form"] == "weight * s"
    assert _loss(model, drawn_at_2, tokenizer) == pytest.approx(fit["loss_vector"], abs=1e-3)


def test_the_pull_keeps_the_vector_near_one_over_t(tiny_model_dir, drawn_at_2, tokenizer):
    pad = tokenizer.pad_token_id
    free = C.fit_vector(_miscalibrated(tiny_model_dir), drawn_at_2, 4, pad, l2=0.0, steps=30)
    pulled = C.fit_vector(_miscalibrated(tiny_model_dir), drawn_at_2, 4, pad, l2=100.0, steps=30)
    start = 1 / pulled["temperature"]
    assert (pulled["scale"] - start).abs().mean() < 0.5 * (free["scale"] - start).abs().mean()
    assert free["loss_vector"] <= pulled["loss_vector"] <= pulled["loss_near_t"] + 1e-4


def test_the_chunked_loss_is_the_per_record_mean_and_its_gradient(tiny_model_dir, records, tokenizer):
    model = _model(tiny_model_dir, 1.0)
    z, y, owner = C.answer_states(model, records, 4, tokenizer.pad_token_id)
    head = model.get_output_embeddings().weight.detach().float()
    s = torch.rand(head.shape[1]) + 0.5
    whole = (s.clone().requires_grad_(True))
    want = per_record_mean(torch.nn.functional.cross_entropy((z * whole) @ head.T, y, reduction="none"), owner,
                           len(records)).mean()
    want.backward()
    chunked = s.clone().requires_grad_(True)
    got = C.scaled_answer_loss(z, y, owner, len(records), head, chunked, chunk=5, backward=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(chunked.grad, whole.grad, rtol=1e-4, atol=1e-6)
    # and at s = 1 it is the answer loss evaluation reports
    assert C.scaled_answer_loss(z, y, owner, len(records), head, torch.ones(head.shape[1])).item() == pytest.approx(
        _loss(model, records, tokenizer), rel=1e-4)


def test_a_vector_folds_into_gemma_and_layernorm_with_a_bias(smollm_tokenizer_dir, records):
    gemma = _tiny_gemma(smollm_tokenizer_dir)
    _, gpt2 = _tiny("gpt2")
    for model, ids, form in ((gemma, records[1]["input_ids"], "(1 + weight) * s - 1"),
                             (gpt2, [5, 6, 7, 8, 9, 10, 11], "weight * s")):
        name, norm = C.final_norm(model)
        seen = []
        hook = norm.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        hook.remove()
        s = torch.rand(norm.weight.shape[0]) + 0.3
        want = (seen[-1] * s) @ model.get_output_embeddings().weight.T
        assert C.fold_vector(model, s, ids[:4])["form"] == form
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=torch.tensor([ids])).logits, want, rtol=1e-4, atol=1e-4)


def test_a_vector_is_refused_when_the_logits_are_not_the_head_of_the_norm(tiny_model_dir, records):
    from slmforge.lora_targets import meta_model
    from transformers import GraniteConfig

    model = _model(tiny_model_dir, 1.0)
    model.lm_head.register_forward_hook(lambda m, a, out: out / 8.0)  # what Granite's logits_scaling does
    weight = model.model.norm.weight.detach().clone()
    with pytest.raises(C.CalibrationError, match="calibrate.method=temperature"):
        C.fold_vector(model, torch.full_like(weight, 0.7), records[0]["input_ids"])
    assert torch.equal(model.model.norm.weight, weight)
    C.fold_temperature(model, 1.5, records[0]["input_ids"])  # a constant after the head still folds
    # and validation says so before anything loads
    granite = GraniteConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, logits_scaling=8.0)
    assert "logits_scaling=8.0" in C.unfoldable(granite, meta_model(granite), method="vector")
    assert C.unfoldable(granite, meta_model(granite), method="temperature") is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folding_checks_a_half_precision_model_to_its_rounding(tiny_model_dir, records, dtype):
    """On a GPU the trained model's norm and head are bf16: the check must allow bf16 rounding (it
    refused every bf16 model when it asked for 1e-3), and still catch a wrong fold."""
    for fold, scale in ((C.fold_temperature, 1.65), (C.fold_vector, torch.rand(64) + 0.3)):
        model = _model(tiny_model_dir, 1.0).to(dtype)
        fold(model, scale, records[0]["input_ids"])
    model = _model(tiny_model_dir, 1.0).to(dtype)
    model.lm_head.register_forward_hook(lambda m, a, out: out * 1.1)  # logits 10% off the head's output
    with pytest.raises(C.CalibrationError, match="not the LM head applied"):
        C.fold_vector(model, torch.rand(64) + 0.3, records[0]["input_ids"])


def test_a_vector_calibrated_adapter_reloads_and_merges_to_the_folded_function(tiny_model_dir, records, tmp_path):
    from peft import PeftModel

    trained = _random_adapter(tiny_model_dir, tmp_path / "adapter")
    ids = torch.tensor([records[2]["input_ids"]])
    torch.manual_seed(1)
    C.write_calibrated_adapter(tmp_path / "adapter", tmp_path / "calibrated",
                               C.fold_vector(trained, torch.rand(64) + 0.3, records[0]["input_ids"]))
    with torch.no_grad():
        reference = trained(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(M.load_model(tiny_model_dir, "fp32"), str(tmp_path / "calibrated")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reloaded.merge_and_unload()(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_the_calibrated_key_holds_the_vectors_settings_only_for_the_vector():
    """A temperature run that changes `calibrate.l2` or `steps` (which only the vector reads) reuses
    its calibrated adapter; a vector run, or another method, does not."""
    from slmforge.config import CalibrateConfig, EvalConfig, ModelConfig
    from tasks.calibrate import calibrated_key

    inputs = ({"key": "adapters/a"}, {"quantized": {"key": "models/quantized/q"}}, {"key": "datasets/d"})

    def key(**settings):
        return calibrated_key(*inputs, CalibrateConfig(**settings), EvalConfig(), ModelConfig())

    assert key() == key(l2=10.0, steps=5)
    assert key(method="vector") != key(method="vector", l2=10.0) != key(method="vector", l2=10.0, steps=5)
    assert key() != key(method="vector") and key() != key(items=8)
    assert calibrated_key(*inputs, CalibrateConfig(), EvalConfig(batch_size=4), ModelConfig()) != key()


def test_grid_nll_in_row_chunks_is_the_whole_batch_bit_for_bit():
    """The grid NLL runs a few rows at a time for the CPU's cache; every token's figures must be the
    ones the whole batch at once gives, in order (a chunk paired with another chunk's targets would not)."""
    from slmforge.calibration import GRID, _grid_nll

    torch.manual_seed(0)
    logits, tokens = torch.randn(37, 500) * 4, torch.randint(0, 500, (37,))
    target = logits.gather(-1, tokens.view(-1, 1)).squeeze(-1)
    whole = torch.stack([torch.logsumexp(logits / t, -1) - target / t for t in GRID], -1)
    assert torch.equal(_grid_nll(logits, tokens), whole)
    assert torch.equal(_grid_nll(logits, tokens, rows=5), whole)
    assert _grid_nll(logits[:0], tokens[:0]).shape == (0, len(GRID))
