"""LoRA dropout that draws the padded batch's masks when trl joins a micro-batch into one row.

With `train.padding_free`, trl's collator concatenates a micro-batch's examples into one row whose
position ids restart at each example. The loss is the padded batch's, but `nn.Dropout` would draw its
masks over the joined row's shape: other random numbers at every step, so a seed would no longer
name the run it names with padded batches (measured: the default run's seed 1 taught 11 of 32
facts joined against 15 padded). Here each LoRA dropout draws its mask over the padded shape
[examples, longest, features], exactly as the padded run does (the same calls on the same random
generator, through `F.dropout`, so on GPU too), and keeps the rows' real positions: the padded run's
computation without the pad tokens' work.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class RowLayout:
    """The current micro-batch's example lengths when it is one joined row (else None); set by a
    forward pre-hook on the model from the collator's position ids."""

    def __init__(self) -> None:
        self.lengths: torch.Tensor | None = None
        self.misfit_warned = False

    def read(self, _module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is None or pos.dim() != 2 or pos.shape[0] != 1:
            self.lengths = None  # a padded batch: plain dropout
            return None
        starts = (pos[0] == 0).nonzero().flatten().cpu()
        self.lengths = torch.diff(starts, append=torch.tensor([pos.shape[1]]))
        return None


class PaddedLayoutDropout(nn.Dropout):
    """`nn.Dropout` whose mask on a joined row is the padded batch's mask at the real positions."""

    def __init__(self, p: float, layout: RowLayout):
        super().__init__(p)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = self.layout.lengths
        if not self.training or self.p == 0 or lengths is None:
            return super().forward(x)
        if x.dim() != 3 or x.shape[1] != int(lengths.sum()):
            # e.g. a module outside the token stream: still dropout, but not the padded run's masks
            if not self.layout.misfit_warned:
                self.layout.misfit_warned = True
                warnings.warn(f"a LoRA input of shape {tuple(x.shape)} does not fit the joined row of "
                              f"{int(lengths.sum())} tokens: its dropout masks are not the padded run's, so "
                              "this seed names another run than with train.padding_free=false", stacklevel=2)
            return super().forward(x)
        longest = int(lengths.max())
        # the padded run computes x * noise with noise = F.dropout(ones); 1.0 * noise is noise exactly
        noise = F.dropout(x.new_ones((len(lengths), longest, x.shape[-1])), self.p, True)
        real = torch.arange(longest) < lengths.unsqueeze(1)
        return x * noise[real.to(noise.device)].view_as(x)


def draw_padded_masks(peft_model) -> int:
    """Replace every LoRA dropout of `peft_model` with `PaddedLayoutDropout`, fed by a pre-hook on
    the model that reads each batch's position ids. Returns how many were replaced."""
    layout = RowLayout()
    replaced = 0
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, d in list(dropouts.items()):
            if type(d) is nn.Dropout:
                dropouts[name] = PaddedLayoutDropout(d.p, layout)
                replaced += 1
    if replaced:
        peft_model.get_base_model().register_forward_pre_hook(layout.read, with_kwargs=True)
    return replaced
