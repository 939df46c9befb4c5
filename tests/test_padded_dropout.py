"""LoRA dropout on a joined (padding-free) row draws the padded batch's masks."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slmforge.padded_dropout import PaddedLayoutDropout, RowLayout, draw_padded_masks


def _joined(lengths, width=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(n, width, generator=g) for n in lengths]
    padded = torch.zeros(len(lengths), max(lengths), width)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return torch.cat(rows).unsqueeze(0), padded, positions


def test_a_joined_row_gets_the_padded_batchs_mask_at_its_real_positions():
    lengths = [5, 2, 7, 3]
    joined, padded, positions = _joined(lengths)
    layout = RowLayout()
    layout.read(None, (), {"position_ids": positions})
    assert layout.lengths.tolist() == lengths
    drop = PaddedLayoutDropout(0.4, layout).train()

    torch.manual_seed(11)
    want = F.dropout(padded, 0.4, True)
    after_padded = torch.rand(3)
    torch.manual_seed(11)
    got = drop(joined)
    assert torch.equal(got[0], torch.cat([want[i, :n] for i, n in enumerate(lengths)]))
    assert torch.equal(torch.rand(3), after_padded)  # the generator moved on as in the padded run
    assert (got == 0).any() and not torch.equal(got, joined)


def test_a_padded_batch_an_eval_pass_and_p_0_use_plain_dropout():
    lengths = [4, 4]
    joined, padded, positions = _joined(lengths)
    layout = RowLayout()
    drop = PaddedLayoutDropout(0.5, layout).train()
    layout.read(None, (), {"position_ids": positions.view(2, 4) * 0 + torch.arange(4)})  # [2, L]: padded
    assert layout.lengths is None
    torch.manual_seed(3)
    want = F.dropout(padded, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(drop(padded), want)
    layout.read(None, (), {"position_ids": positions})
    assert torch.equal(drop.eval()(joined), joined)
    assert torch.equal(PaddedLayoutDropout(0.0, layout).train()(joined), joined)


def test_an_input_that_does_not_fit_the_joined_row_warns_once_and_still_drops():
    _, _, positions = _joined([3, 2])
    layout = RowLayout()
    layout.read(None, (), {"position_ids": positions})
    drop = PaddedLayoutDropout(0.5, layout).train()
    other = torch.ones(1, 7, 6)  # 7 tokens, not the row's 5
    with pytest.warns(UserWarning, match="does not fit the joined row of 5 tokens"):
        out = drop(other)
    assert (out == 0).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop(other)  # once per run, not per layer and step


def test_draw_padded_masks_replaces_every_lora_dropout_and_reads_each_batch(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from slmforge import modeling as M

    model = get_peft_model(M.load_model(tiny_model_dir, "fp32"),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"))
    n = sum(1 for name, m in model.named_modules() if ".lora_dropout." in name and type(m) is nn.Dropout)
    assert n > 0 and draw_padded_masks(model) == n
    assert sum(1 for m in model.modules() if isinstance(m, PaddedLayoutDropout)) == n
    layout = next(m for m in model.modules() if isinstance(m, PaddedLayoutDropout)).layout
    model.train()
    model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    assert layout.lengths.tolist() == [3, 2]
    model(input_ids=torch.tensor([[5, 6], [7, 8]]))
    assert layout.lengths is None
