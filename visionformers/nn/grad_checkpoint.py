"""Activation (gradient) checkpointing: keep a block's input, recompute its activations in the backward pass
(Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"). Gradients are the same: the recomputation
replays the forward with the RNG state it first saw (dropout draws the same masks).

Models expose timm's switch, ``model.set_grad_checkpointing(True)``. Transformer stacks set the flag of each
``TransformerBlock``; models with other repeated blocks (the UNet's residual and attention blocks) call
:func:`checkpointed` in their block loop.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from visionformers._validate import check_bool

__all__ = ["checkpointed", "set_block_checkpointing"]


def checkpointed(module: nn.Module, *args, enabled: bool, **kwargs):
    """``module(*args, **kwargs)``, checkpointed when ``enabled``, the module is training and autograd records."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)


def set_block_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Turn checkpointing of every ``TransformerBlock`` inside ``model`` on or off (its ``grad_checkpointing``)."""
    from visionformers.nn.blocks import TransformerBlock

    check_bool("enable", enable)
    for m in model.modules():
        if isinstance(m, TransformerBlock):
            m.grad_checkpointing = enable
