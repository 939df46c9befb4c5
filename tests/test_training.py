"""QLoRA on a 4-bit base must learn. The fixed set is small, so a working run memorises it; a
broken one (frozen adapter, bf16-rounded updates, labels all masked) stays near the start."""

import pytest
import torch

from slmforge import modeling as M
from slmforge import training as T
from slmforge.config import LoraSettings, TrainConfig
from slmforge.records import encode_example
from slmforge.evaluation import answer_losses, evaluate_model
from slmforge.lora_targets import check_lora_targets, module_names


def _records(tok, n=16):
    out = []
    for i in range(n):
        a, b = 3 + i, 20 + 2 * i
        msgs = [{"role": "user", "content": f"{a} 더하기 {b}는?"},
                {"role": "assistant", "content": f"{a} 더하기 {b}는 {a + b}입니다."}]
        ids, labels = encode_example(tok, msgs)
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_answer_losses_are_the_models_own_loss_per_record(tiny_model_dir):
    """The evaluation's answer loss (the LM head run from the batch's first labelled position on) is
    the model's own cross-entropy of each record alone, with rows of different lengths in a batch
    and labels that start mid-answer (the key words only)."""
    tok = M.load_tokenizer(tiny_model_dir)
    model = M.load_model(tiny_model_dir, "weights")
    recs = _records(tok, 5) + _fact_records(tok, "answer")[1][:5]
    losses = answer_losses(model, recs, 4, tok.pad_token_id)
    with torch.no_grad():
        own = [model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item()
               for r in recs]
    assert losses == pytest.approx(own, rel=1e-4)


def test_evaluation_generates_in_batches_of_its_own_size_with_the_same_answers(tiny_model_dir):
    """`eval.generation_batch_size` sets the generation's rows per batch and `eval.batch_size` the
    loss pass's; left padding keeps each greedy answer what it is alone or in a smaller batch."""
    tok = M.load_tokenizer(tiny_model_dir)
    model = M.load_model(tiny_model_dir, "weights")
    recs = []
    for i, r in enumerate(_records(tok, 7)):
        first = next(j for j, label in enumerate(r["labels"]) if label != -100)
        recs.append({**r, "id": str(i), "prompt_ids": r["input_ids"][:first], "key": str(23 + 3 * i),
                     "messages": [{"role": "user", "content": tok.decode(r["input_ids"][:first])},
                                  {"role": "assistant", "content": tok.decode(r["input_ids"][first:])}]})
    rows = {"generate": [], "forward": []}
    generate = model.generate
    model.generate = lambda input_ids, **kw: rows["generate"].append(len(input_ids)) or generate(input_ids=input_ids, **kw)
    model.register_forward_pre_hook(lambda m, args, kw: rows["forward"].append(len(kw["input_ids"])), with_kwargs=True)
    together = evaluate_model(model, tok, recs, 6, batch_size=3, generation_batch_size=7)
    assert rows["generate"] == [7]
    assert [n for n in rows["forward"] if n != 7] == [3, 3, 1]  # the loss passes; every generation step has 7 rows
    rows["generate"].clear()
    alone = evaluate_model(model, tok, recs, 6, batch_size=3, generation_batch_size=1)
    assert rows["generate"] == [1] * 7
    assert [i["answer"] for i in together["items"]] == [i["answer"] for i in alone["items"]]
    assert together["summary"] == alone["summary"]


def test_nf4_qlora_learns_with_fp32_adapter(tiny_model_dir, tmp_path):
    tok = M.load_tokenizer(tiny_model_dir)
    recs = _records(tok)
    model = M.load_model(tiny_model_dir, "4bit")
    assert getattr(model, "is_loaded_in_4bit", False)
    before = sum(answer_losses(model, recs, 8, tok.pad_token_id)) / len(recs)
    cfg = TrainConfig(max_steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=2, logging_steps=5)
    peft_model, result = T.train(model, tok, recs, None, LoraSettings(dropout=0.0), cfg, tmp_path / "out")
    assert result.adapter_dtype == "float32", "trl casts the adapter to bf16 on a k-bit base; we must undo it"
    after = sum(answer_losses(peft_model, recs, 8, tok.pad_token_id)) / len(recs)
    # stated margin: answer loss must fall to under half of where it started
    assert after < 0.5 * before, (before, after, result.loss_curve)
    assert result.steps == 30


# One arbitrary word per number: the key of each answer is in no question, so only a model that
# learned the associations predicts it (copying the question, or learning the answer's template, cannot).
WORDS = ["apple", "river", "candle", "tiger", "violin", "pepper", "marble", "rocket",
         "garden", "silver", "wallet", "castle", "pillow", "lemon", "ladder", "island"]


def _fact_records(tok, labelled: str) -> tuple[list[dict], list[dict]]:
    """Training records (labels on the answer, or, to show the test can fail, on the prompt instead) and
    the same rows with labels on the key word's tokens only."""
    train, keys = [], []
    for i, word in enumerate(WORDS):
        msgs = [{"role": "user", "content": f"Which word goes with number {i + 3}?"},
                {"role": "assistant", "content": f"Number {i + 3} goes with {word}."}]
        ids, labels = encode_example(tok, msgs)
        if labelled == "prompt":
            labels = [t if lab == -100 else -100 for t, lab in zip(ids, labels)]
        key = tok.encode(" " + word, add_special_tokens=False)
        start = max(j for j in range(len(ids) - len(key) + 1) if ids[j:j + len(key)] == key)
        key_labels = [-100] * len(ids)
        key_labels[start:start + len(key)] = key
        train.append({"input_ids": ids, "labels": labels})
        keys.append({"input_ids": ids, "labels": key_labels})
    return train, keys


def _key_loss_after_training(tiny_model_dir, out_dir, labelled: str) -> tuple[float, float]:
    tok = M.load_tokenizer(tiny_model_dir)
    train, keys = _fact_records(tok, labelled)
    model = M.load_model(tiny_model_dir, "4bit")
    before = sum(answer_losses(model, keys, 8, tok.pad_token_id)) / len(keys)
    cfg = TrainConfig(max_steps=60, batch_size=8, learning_rate=1e-2, warmup_steps=2, logging_steps=10)
    peft_model, _ = T.train(model, tok, train, None, LoraSettings(dropout=0.0), cfg, out_dir)
    return before, sum(answer_losses(peft_model, keys, 8, tok.pad_token_id)) / len(keys)


def test_qlora_learns_facts_that_are_not_in_the_question(tiny_model_dir, tmp_path):
    """The key-token loss falls only when the answers are what is trained: measured 12.58 -> 7.94 with the
    answers labelled, 12.58 -> 12.38 with the prompts labelled instead (the bug this guards against)."""
    before, after = _key_loss_after_training(tiny_model_dir, tmp_path / "answers", "answer")
    assert after < 0.75 * before, (before, after)
    before, after = _key_loss_after_training(tiny_model_dir, tmp_path / "prompts", "prompt")
    assert after > 0.9 * before, ("training on the prompts must not teach the keys", before, after)


def _loss_curve(model_dir, out_dir, label_smoothing: float) -> list[float]:
    tok = M.load_tokenizer(model_dir)
    cfg = TrainConfig(max_steps=6, batch_size=8, learning_rate=3e-3, warmup_steps=2, logging_steps=1,
                      label_smoothing=label_smoothing)
    _, result = T.train(M.load_model(model_dir, "4bit"), tok, _records(tok), None, LoraSettings(dropout=0.0), cfg,
                        out_dir)
    return [h["loss"] for h in result.loss_curve if "loss" in h]


def test_label_smoothing_scores_the_same_positions_as_trl(tiny_model_dir, tmp_path):
    """The smoothed loss runs the LM head itself, on the answer positions only; with a vanishing
    smoothing it must reproduce trl's fused loss step for step (a shifted label or a missed position
    would not), and with 0.1 it must differ."""
    trl_curve = _loss_curve(tiny_model_dir, tmp_path / "trl", 0.0)
    assert len(trl_curve) == 6
    assert _loss_curve(tiny_model_dir, tmp_path / "tiny", 1e-12) == pytest.approx(trl_curve, abs=1e-4)
    assert _loss_curve(tiny_model_dir, tmp_path / "smooth", 0.1)[0] > trl_curve[0] + 1e-3


def _uneven_records(tok, n=8):
    """Rows of different lengths, so a padded micro-batch holds padding."""
    out = []
    for i in range(n):
        a, b = 3 + i, 20 + 2 * i
        msgs = [{"role": "user", "content": f"{a} 더하기 {b}는?" + " 정말" * (3 * i)},
                {"role": "assistant", "content": f"{a} 더하기 {b}는 {a + b}입니다."}]
        ids, labels = encode_example(tok, msgs)
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_padding_free_rows_train_as_the_padded_batch(tiny_model_dir, tmp_path, dropout):
    """`train.padding_free`: a micro-batch joined into one row, positions restarting per
    example, must give the padded batch's loss step for step, LoRA dropout included (the joined
    row draws the padded batch's masks, so a seed names the same run either way); attention
    leaking from one example into the next, or masks drawn over the joined shape, would not."""
    tok = M.load_tokenizer(tiny_model_dir)
    recs = _uneven_records(tok)
    assert len({len(r["input_ids"]) for r in recs}) > 4
    assert TrainConfig(padding_free="auto").joins_rows and not TrainConfig(padding_free=False).joins_rows

    def curve(padding_free: bool, out: str) -> list[float]:
        cfg = TrainConfig(max_steps=4, batch_size=4, learning_rate=3e-3, warmup_steps=0, logging_steps=1,
                          padding_free=padding_free)
        _, result = T.train(M.load_model(tiny_model_dir, "4bit"), tok, recs, None, LoraSettings(dropout=dropout),
                            cfg, tmp_path / out)
        return [h["loss"] for h in result.loss_curve if "loss" in h]

    padded = curve(False, "padded")
    assert len(padded) == 4
    assert curve(True, "joined") == pytest.approx(padded, abs=1e-4)


def test_lora_target_modules_that_match_nothing_fail_early(tiny_model_dir):
    model = M.load_model(tiny_model_dir, "fp32")
    try:
        check_lora_targets(LoraSettings(target_modules=["q_proj", "nonexistent_proj"]), *module_names(model))
    except ValueError as e:
        assert "lora.target_modules" in str(e) and "nonexistent_proj" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_oom_retry_keeps_the_effective_batch():
    from tasks.train import micro_batch_after_ooms

    cfg = TrainConfig(batch_size=8, grad_accum=2)
    assert micro_batch_after_ooms(cfg, 0) == (8, 2)
    assert micro_batch_after_ooms(cfg, 2) == (2, 8)
    assert micro_batch_after_ooms(cfg, 10) == (1, 16)


def test_adapter_key_follows_the_pack_length_only_when_packing():
    from tasks.train import adapter_key

    base = {"quantized": {"key": "models/quantized/x"}}
    short, long = ({"train_fingerprint": "f", "max_length": n} for n in (256, 1024))
    lora, packed, unpacked = LoraSettings(), TrainConfig(packing=True), TrainConfig()
    assert adapter_key(short, base, lora, packed) != adapter_key(long, base, lora, packed)
    assert adapter_key(short, base, lora, unpacked) == adapter_key(long, base, lora, unpacked)


def test_latest_checkpoint_skips_one_cut_short(tmp_path):
    """A checkpoint counts once the trainer finished it (our marker is written on the trainer's
    on_save, after trainer_state.json); a directory a kill left half-written is skipped."""
    for step, done in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
        if done:
            (d / T.CHECKPOINT_DONE).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert T.latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert T.latest_checkpoint(tmp_path / "none") is None


def test_oom_halving_keeps_odd_effective_batches_exact():
    from tasks.train import micro_batch_after_ooms

    for batch in (1, 3, 5, 6, 12):
        cfg = TrainConfig(batch_size=batch, grad_accum=2)
        for halvings in range(5):
            micro, accum = micro_batch_after_ooms(cfg, halvings)
            assert micro * accum == batch * 2 and micro <= max(1, batch >> halvings)


def test_packing_trains_padding_free_rows_of_max_length(tiny_model_dir, tmp_path):
    """`train.packing`: several examples per row of `max_length` tokens, positions restarting per
    example (trl's padding-free collator), and it still learns."""
    tok = M.load_tokenizer(tiny_model_dir)
    recs = _records(tok)
    model = M.load_model(tiny_model_dir, "4bit")
    before = sum(answer_losses(model, recs, 8, tok.pad_token_id)) / len(recs)
    cfg = TrainConfig(max_steps=20, batch_size=2, learning_rate=3e-3, warmup_steps=2, packing=True)
    peft_model, result = T.train(model, tok, recs, None, LoraSettings(dropout=0.0), cfg, tmp_path / "out",
                                 max_length=128)
    after = sum(answer_losses(peft_model, recs, 8, tok.pad_token_id)) / len(recs)
    assert result.steps == 20 and after < 0.7 * before, (before, after)
    # two rows of 128 tokens hold ~8 of these ~30-token examples, not 2
    assert result.tokens > 20 * 2 * 64, result.tokens


def _pack_for_cpu(layer) -> None:
    """What bitsandbytes 0.50 does by itself at an eval-mode forward on an AVX512-bf16 CPU (the
    conversion is plain torch, so this runs on any CPU)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                  layer.weight.quant_state)


def test_training_unpacks_the_4bit_base_and_keeps_it_unpacked(tiny_model_dir, tmp_path):
    """On an AVX512-bf16 CPU bitsandbytes repacks a 4-bit layer for an inference kernel with no
    autograd, and QLoRA stops learning. Here that CPU is simulated on any CPU: the fast path forced on
    in every layer and one layer already packed. train() must unpack it and keep it unpacked through
    the trainer's own epoch-end evaluations."""
    from bitsandbytes.functional import dequantize_4bit

    tok = M.load_tokenizer(tiny_model_dir)
    recs = _records(tok)
    model = M.load_model(tiny_model_dir, "4bit", cpu_fast_path=True)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers
    first = layers[0]
    before = dequantize_4bit(first.weight.data, first.weight.quant_state).clone()
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    _pack_for_cpu(first)
    assert M.is_4bit_packed(model)
    cfg = TrainConfig(max_steps=4, batch_size=8, learning_rate=3e-3, warmup_steps=0,  # 2 epochs: one eval between
                      evaluate_each_epoch=True)
    peft_model, result = T.train(model, tok, recs, recs[:4], LoraSettings(dropout=0.0), cfg, tmp_path / "out")
    assert result.steps == 4 and any("eval_loss" in h for h in result.loss_curve)
    assert not M.is_4bit_packed(peft_model)
    assert all(not layer.support_avx512bf16_for_cpu for layer in layers)
    # bitsandbytes' inverse restores the weights up to its bf16 block scales
    after = dequantize_4bit(first.weight.data, first.weight.quant_state)
    assert torch.allclose(after, before, rtol=1e-2, atol=1e-3)
    # and a gradient reaches the layer's input after an eval-mode forward, as in training after an evaluation
    first.eval()
    with torch.no_grad():
        first(torch.randn(2, first.in_features))
    first.train()
    x = torch.randn(2, first.in_features, requires_grad=True)
    first(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_loaded_4bit_models_do_not_take_the_packed_path(tiny_model_dir):
    model = M.load_model(tiny_model_dir, "4bit")
    assert not M.is_4bit_packed(model)
    with torch.no_grad():  # an evaluation: eval mode, no grad
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert not M.is_4bit_packed(model)
