"""The runtime decision on every kind of hardware, without that hardware: the probe is injected."""

import pytest
import torch

from slmforge.config import load_config
from slmforge.runtime import Hardware, RuntimeSettingError, decide, for_config

CPU = Hardware(gpus=0, cpu_threads=2)
H200 = Hardware(gpus=1, gpu_name="NVIDIA H200", gpu_bf16=True)
H200_FLASH = Hardware(gpus=1, gpu_name="NVIDIA H200", gpu_bf16=True, flash_attn=True)
T4 = Hardware(gpus=1, gpu_name="Tesla T4", gpu_bf16=False, flash_attn=True)
NODE = Hardware(gpus=8, gpu_name="NVIDIA A100-SXM4-80GB", gpu_bf16=True, flash_attn=True)


def test_cpu_computes_in_float32_without_autocast_or_checkpointing():
    rt = decide(hw=CPU)
    assert (rt.device, rt.device_map, rt.compute_dtype, rt.weights_dtype) == ("cpu", "cpu", "float32", "float32")
    assert (rt.mixed_precision, rt.attn, rt.gradient_checkpointing, rt.optim) == ("no", "sdpa", False, "adamw_torch")
    assert rt.weights_mode == "fp32" and rt.compute_torch_dtype is torch.float32


def test_bf16_gpu_uses_bf16_autocast_one_replica_and_checkpointing():
    rt = decide(hw=H200)
    assert (rt.device, rt.device_map, rt.compute_dtype, rt.weights_dtype) == ("cuda", {"": 0}, "bfloat16", "bfloat16")
    assert (rt.mixed_precision, rt.attn, rt.gradient_checkpointing, rt.optim) == ("bf16", "sdpa", True,
                                                                                  "adamw_torch_fused")
    assert "flash_attn not installed" in rt.reasons["attn"]
    assert decide(hw=H200_FLASH).attn == "flash_attention_2"


def test_gpu_without_bf16_uses_float16_with_loss_scaling_and_no_flash_attention():
    rt = decide(hw=T4)
    assert (rt.compute_dtype, rt.weights_dtype, rt.mixed_precision) == ("float16", "float16", "fp16")
    assert rt.attn == "sdpa" and "Ampere" in rt.reasons["attn"]
    with pytest.raises(RuntimeSettingError, match="model.compute_dtype: bfloat16 is not supported by Tesla T4"):
        decide("bfloat16", hw=T4)


def test_several_gpus_get_one_whole_replica_per_process_never_auto():
    for rank in range(3):
        rt = decide(hw=NODE, local_rank=rank)
        assert rt.device_map == {"": rank}
    assert "one whole replica" in decide(hw=NODE).reasons["device_map"]


def test_settings_the_hardware_cannot_run_are_refused_naming_the_field():
    with pytest.raises(RuntimeSettingError, match="model.compute_dtype: float16 needs a GPU"):
        decide("float16", hw=CPU)
    with pytest.raises(RuntimeSettingError, match="model.attn_implementation: flash_attention_2 needs"):
        decide(attn="flash_attention_2", hw=CPU)
    with pytest.raises(RuntimeSettingError, match="model.attn_implementation"):
        decide(attn="flash_attention_2", hw=H200)  # flash_attn not installed


def test_explicit_settings_win_and_say_so():
    rt = decide("bfloat16", "eager", True, hw=CPU)
    assert (rt.compute_dtype, rt.attn, rt.gradient_checkpointing) == ("bfloat16", "eager", True)
    assert "set by" in rt.reasons["compute_dtype"] and "set by" in rt.reasons["gradient_checkpointing"]
    assert decide(gradient_checkpointing=False, hw=H200).gradient_checkpointing is False


def test_the_readmes_gpu_recipe_resolves_to_bf16_one_replica_and_flash_attention():
    """README, Settings: the tutorial's §5.3 recipe (Qwen2.5-3B-Instruct) as a config."""
    cfg = load_config(overrides=["model.source=Qwen/Qwen2.5-3B-Instruct", "data.max_length=512", "train.epochs=3",
                                 "train.batch_size=4", "train.grad_accum=4", "train.learning_rate=2.0e-4",
                                 "train.lr_scheduler=cosine", "train.gradient_checkpointing=true",
                                 "train.packing=true"])
    rt = for_config(cfg.model, cfg.train, hw=H200_FLASH)
    assert (rt.compute_dtype, rt.mixed_precision, rt.device_map) == ("bfloat16", "bf16", {"": 0})
    assert rt.attn == "flash_attention_2" and rt.gradient_checkpointing
    assert for_config(cfg.model, cfg.train, hw=H200).attn == "sdpa"  # flash-attn not installed


def test_the_decision_reaches_the_trainer(tiny_model_dir, tmp_path, monkeypatch):
    """train() takes device, precision, optimizer and checkpointing from the decision, and switches
    gradient checkpointing on once (peft's prepare), not again in the trainer."""
    from dataclasses import replace

    import trl

    from slmforge import modeling as M
    from slmforge import training as T
    from slmforge.config import LoraSettings, TrainConfig
    from slmforge.records import encode_example

    seen = {}
    real = trl.SFTTrainer.__init__

    def spy(self, *args, **kwargs):
        seen["args"] = kwargs["args"]
        real(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "__init__", spy)
    calls = []
    real_enable = type(M.load_model(tiny_model_dir, "fp32")).gradient_checkpointing_enable

    def count(self, *args, **kwargs):
        calls.append(1)
        return real_enable(self, *args, **kwargs)

    model = M.load_model(tiny_model_dir, "4bit")
    monkeypatch.setattr(type(model), "gradient_checkpointing_enable", count)
    tok = M.load_tokenizer(tiny_model_dir)
    msgs = [{"role": "user", "content": "1 더하기 2는?"}, {"role": "assistant", "content": "3입니다."}]
    ids, labels = encode_example(tok, msgs)
    rt = replace(decide(hw=CPU), gradient_checkpointing=True)
    _, result = T.train(model, tok, [{"input_ids": ids, "labels": labels}] * 4, None, LoraSettings(),
                        TrainConfig(max_steps=1, batch_size=2), tmp_path / "out", rt=rt)
    args = seen["args"]
    assert (args.optim.value if hasattr(args.optim, "value") else args.optim) == "adamw_torch"
    assert not args.bf16 and not args.fp16 and args.use_cpu
    assert args.gradient_checkpointing is False and len(calls) == 1
    assert result.runtime["gradient_checkpointing"] is True


class _ModelOnAnotherDevice(torch.nn.Module):
    """Stands for a model on a GPU: its weights are on the meta device, and it checks that every
    input reaches it there (it answers with CPU tensors so the caller can go on)."""

    def __init__(self, vocab: int = 8):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(vocab, device="meta"))
        self.vocab = vocab
        self.seen: list[str] = []

    @property
    def device(self):
        return self.weight.device

    def forward(self, input_ids, attention_mask=None):
        self.seen.append(input_ids.device.type)
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.seen += [input_ids.device.type, attention_mask.device.type]
        new = torch.full((input_ids.shape[0], max_new_tokens), kwargs["eos_token_id"])
        return torch.cat([torch.zeros(input_ids.shape, dtype=torch.long), new], dim=1)


def test_merge_check_and_evaluation_move_inputs_to_the_models_device():
    from types import SimpleNamespace

    from slmforge.evaluation import generate_answers
    from slmforge.merging import logit_diffs

    a, b = _ModelOnAnotherDevice(), _ModelOnAnotherDevice()
    records = [{"input_ids": [1, 2, 3], "prompt_ids": [1, 2]}, {"input_ids": [4, 5], "prompt_ids": [4]}]
    assert logit_diffs(a, b, records) == (0.0, 0.0)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2, decode=lambda ids, **k: "")
    generate_answers(a, tokenizer, records, max_new_tokens=2, batch_size=2)
    assert a.seen and set(a.seen) == {"meta"} and set(b.seen) == {"meta"}


# -- GPU memory plan: micro-batch and checkpointing from the free memory (issue 21) ---------------

def _shape(model_id: str):
    from slmforge.catalog import catalog_entry
    from slmforge.model_shape import ModelShape

    return ModelShape.from_catalog(catalog_entry(model_id))


QWEN_3B, QWEN_7B = "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-7B-Instruct"
H200_FREE = Hardware(gpus=1, gpu_name="NVIDIA H200", gpu_bf16=True, gpu_free_gb=139.0)
T4_FREE = Hardware(gpus=1, gpu_name="Tesla T4", gpu_bf16=False, gpu_free_gb=15.0)


def _plan(model_id, hw, micro=4, accum=4, cap=None, checkpointing="auto", label_smoothing=0.0, seq_len=512):
    from slmforge.runtime import plan_memory

    return plan_memory(_shape(model_id), hw, micro_batch=micro, grad_accum=accum, cap=cap or micro * accum,
                       seq_len=seq_len, lora_r=16, checkpointing=checkpointing, label_smoothing=label_smoothing)


def test_a_big_gpu_takes_the_whole_batch_in_one_micro_batch_without_checkpointing():
    p = _plan(QWEN_3B, H200_FREE)  # the recipe's 4 x 4 on an H200: one micro-batch of 16 fits
    assert (p.micro_batch, p.grad_accum, p.gradient_checkpointing) == (16, 1, False), p.reason
    assert p.estimate_gb <= p.budget_gb and "fits without recomputing" in p.reason
    p7 = _plan(QWEN_7B, H200_FREE)  # the 7B shape does not fit 16 at once: 8 x 2, still no recomputing
    assert (p7.micro_batch, p7.grad_accum, p7.gradient_checkpointing) == (8, 2, False), p7.reason


def test_a_small_gpu_checkpoints_rather_than_shrink_below_the_configured_micro_batch():
    p = _plan(QWEN_3B, T4_FREE)  # micro-batch 1 would fit without checkpointing; 4 needs it
    assert p.gradient_checkpointing and p.micro_batch >= 4 and p.micro_batch * p.grad_accum == 16, p.reason
    assert "needed to fit" in p.reason


def test_the_setting_keeps_checkpointing_and_only_the_micro_batch_moves():
    on = _plan(QWEN_3B, H200_FREE, checkpointing=True)
    assert on.gradient_checkpointing and on.micro_batch == 16 and "set by train" in on.reason
    off = _plan(QWEN_7B, T4_FREE, checkpointing=False)  # 7B without recomputing on 15 GB: nothing fits
    assert not off.gradient_checkpointing and off.micro_batch == 1 and "nothing fits" in off.reason


def test_an_out_of_memory_retry_caps_the_micro_batch():
    p = _plan(QWEN_3B, H200_FREE, cap=8)  # the plan said 16, that OOMed: half of it at most
    assert (p.micro_batch, p.grad_accum) == (8, 2) and not p.gradient_checkpointing


def test_the_plan_counts_full_logits_only_where_the_loss_builds_them():
    """trl 1.16 scores through its chunked LM head (never the batch x length x vocabulary logits),
    Liger or not; only slmforge's label-smoothed loss builds them (training.trainer_class)."""
    from slmforge.memory import lora_training_bytes

    tight = Hardware(gpus=1, gpu_name="NVIDIA L4", gpu_bf16=True, gpu_free_gb=24.0)
    plain, smoothed = _plan(QWEN_3B, tight), _plan(QWEN_3B, tight, label_smoothing=0.1)
    shape = _shape(QWEN_3B)
    fused = lora_training_bytes(shape, r=16, seq_len=512, batch_size=plain.micro_batch,
                                gradient_checkpointing=plain.gradient_checkpointing, full_logits=False)["total"] / 1e9
    assert plain.estimate_gb == round(fused, 2) and "chunked LM head" in plain.reason
    logits = lora_training_bytes(shape, seq_len=512, batch_size=smoothed.micro_batch)["logits"] / 1e9
    assert logits > 2 and "train.label_smoothing" in smoothed.reason  # Qwen2.5's 152k vocabulary: GBs per batch
    assert smoothed.estimate_gb >= plain.estimate_gb


def test_the_liger_reason_does_not_claim_a_fused_loss():
    reason = decide(hw=Hardware(gpus=1, gpu_name="NVIDIA H200", gpu_bf16=True, liger=True)).reasons["liger"]
    assert "layer kernels" in reason and "cross-entropy" not in reason


def test_without_free_memory_or_a_gpu_the_configured_split_stays():
    unknown = _plan(QWEN_3B, H200)  # H200 above has no free-memory reading
    assert (unknown.micro_batch, unknown.grad_accum, unknown.gradient_checkpointing) == (4, 4, True)
    assert "unknown" in unknown.reason
    cpu = _plan(QWEN_3B, CPU)
    assert (cpu.micro_batch, cpu.grad_accum, cpu.gradient_checkpointing) == (4, 4, False)


def test_liger_is_used_on_a_gpu_where_it_is_installed_and_reaches_the_trainer(tmp_path):
    from slmforge.config import TrainConfig
    from slmforge.training import sft_config

    assert decide(hw=Hardware(gpus=1, gpu_name="NVIDIA H200", gpu_bf16=True, liger=True)).liger
    assert not decide(hw=H200).liger and "not installed" in decide(hw=H200).reasons["liger"]
    assert not decide(hw=Hardware(gpus=0, liger=True)).liger  # Triton kernels: GPU only
    assert sft_config(TrainConfig(), decide(hw=CPU), tmp_path, 4, 1, None, False, 10).use_liger_kernel is False


def test_cpu_features_name_the_bf16_and_avx512_flags():
    from slmforge.runtime import cpu_features

    info = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    assert cpu_features(info) == {"cpu_model": "AMD EPYC 9B14", "avx2": True, "avx512f": True,
                                  "avx512_bf16": True, "amx_bf16": False, "amx_tile": False}
    assert cpu_features("model name : old\nflags : sse4_2 avx2\n")["avx512_bf16"] is False


def test_the_train_stage_runs_the_memory_plan_for_its_model(tmp_path, tiny_model_dir):
    """What `run_training` does on a GPU, with the probe injected: the model's config from the store,
    the plan's split and checkpointing into the runtime, and an OOM retry halving the cap."""
    import shutil

    from slmforge.config import LoraSettings, TrainConfig
    from slmforge.storage import ArtifactStore
    from tasks.train import fit_to_gpu_memory

    store = ArtifactStore(f"file://{tmp_path}/store")
    staging = store.staging_dir("models/quantized/tiny")
    shutil.copy(tiny_model_dir / "config.json", staging / "config.json")
    store.commit_dir(staging, "models/quantized/tiny")
    base, dataset = {"quantized": {"key": "models/quantized/tiny"}}, {"max_length": 128}
    rt = decide(hw=H200_FREE)
    assert rt.gradient_checkpointing  # before the plan: on, as for any GPU
    micro, accum, planned = fit_to_gpu_memory(store, base, dataset, LoraSettings(), TrainConfig(), rt, 4, 4, 0,
                                              log=lambda m: None, hw=H200_FREE)
    assert (micro, accum, planned.gradient_checkpointing) == (16, 1, False)
    assert "fits without recomputing" in planned.reasons["gradient_checkpointing"]
    assert "chunked LM head" in planned.reasons["gradient_checkpointing"]
    smoothed = fit_to_gpu_memory(store, base, dataset, LoraSettings(), TrainConfig(label_smoothing=0.1), rt, 4, 4, 0,
                                 log=lambda m: None, hw=H200_FREE)[2]
    assert "train.label_smoothing" in smoothed.reasons["gradient_checkpointing"]
    assert fit_to_gpu_memory(store, base, dataset, LoraSettings(), TrainConfig(), rt, 4, 4, 2,
                             log=lambda m: None, hw=H200_FREE)[:2] == (4, 4)  # two OOM halvings: at most 16 >> 2


# -- the probe itself, with torch.cuda faked (issue 36) --------------------------------------------

def _fake_cuda(monkeypatch, capability, name, gpus=1, flash=False):
    """torch.cuda as a machine with `gpus` cards of `capability` would answer. `is_bf16_supported`
    answers True as torch's default (`including_emulation=True`) does on a T4 or V100."""
    import transformers.utils

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (15 * 10**9, 16 * 10**9))
    monkeypatch.setattr(cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda *a, **k: flash)


@pytest.mark.parametrize("capability,name,bf16", [((7, 5), "Tesla T4", False), ((7, 0), "Tesla V100", False),
                                                  ((8, 0), "NVIDIA A100", True), ((9, 0), "NVIDIA H100", True)])
def test_the_probe_decides_bf16_by_compute_capability_not_emulation(monkeypatch, capability, name, bf16):
    _fake_cuda(monkeypatch, capability, name)
    hw = Hardware.probe()
    assert (hw.gpus, hw.gpu_name, hw.gpu_bf16, hw.gpu_free_gb) == (1, name, bf16, 15.0)
    rt = decide(hw=hw)
    assert (rt.compute_dtype, rt.mixed_precision) == (("bfloat16", "bf16") if bf16 else ("float16", "fp16"))


def test_the_probe_finds_flash_attention_only_where_it_imports(monkeypatch):
    """`find_spec` says a flash_attn is there; the probe believes transformers' test and the import."""
    import importlib
    import importlib.util

    _fake_cuda(monkeypatch, (9, 0), "NVIDIA H100", flash=False)
    real_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "flash_attn" else real_spec(n, *a))
    assert Hardware.probe().flash_attn is False
    _fake_cuda(monkeypatch, (9, 0), "NVIDIA H100", flash=True)  # installed, but built for another torch
    real_import = importlib.import_module

    def broken(n, *a):
        if n == "flash_attn":
            raise ImportError("flash_attn_2_cuda: undefined symbol")
        return real_import(n, *a)

    monkeypatch.setattr(importlib, "import_module", broken)
    assert Hardware.probe().flash_attn is False
    monkeypatch.setattr(importlib, "import_module", lambda n, *a: object() if n == "flash_attn" else real_import(n, *a))
    assert Hardware.probe().flash_attn is True


def test_flash_attention_2_set_on_a_gpu_without_bf16_is_refused_naming_the_field():
    with pytest.raises(RuntimeSettingError, match="model.attn_implementation: flash_attention_2 needs an Ampere.*T4"):
        decide(attn="flash_attention_2", hw=T4)  # flash_attn installed, but a T4
    assert decide(attn="flash_attention_2", hw=H200_FLASH).attn == "flash_attention_2"


def test_a_float32_load_falls_back_from_flash_attention_to_sdpa_and_says_why(tiny_model_dir):
    """compare's fp32 rows ask the same runtime as its bf16 rows; FlashAttention 2 refuses float32."""
    from dataclasses import replace

    from slmforge import modeling as M

    rt = decide(hw=H200_FLASH)
    assert rt.for_load(torch.bfloat16) is rt
    fp32 = rt.for_load(torch.float32)
    assert fp32.attn == "sdpa" and "float32" in fp32.reasons["attn"] and rt.attn == "flash_attention_2"
    # on this CPU a FlashAttention 2 load fails (no flash_attn): the fp32 load must not ask for it
    cpu_fa2 = replace(decide(hw=CPU), attn="flash_attention_2")
    model = M.load_model(tiny_model_dir, "fp32", cpu_fa2)
    assert model.config._attn_implementation == "sdpa"
