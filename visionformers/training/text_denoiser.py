"""A denoiser and its text encoder trained as one module (``train_unet.py --train_text_encoder``).

Fine-tuning the text encoder with the diffusion loss, as DreamBooth does (Ruiz et al. 2023, Sec. 4) and diffusers'
``--train_text_encoder`` scripts offer, needs the encoder's gradients everywhere the denoiser's go. Holding both in
one ``nn.Module`` gives that without a second code path:

- one DDP wrapper: the encoder's gradients are all-reduced in the same buckets as the denoiser's, and gradient
  accumulation skips both syncs together (``accelerator.accumulate(model)``);
- one optimizer whose checkpointed state is keyed by parameter name (``denoiser.*``, ``text_encoder.encoder.*``),
  one clipped gradient norm over both, one EMA over both;
- one checkpoint state dict, so a resumed run is bit-identical to an uninterrupted one.

What is exported is what a frozen-encoder run exports (:data:`exported_parts`, read by
``checkpoint.export_pretrained``): the denoiser in the model directory, the encoder in ``text_encoder/`` (both the
EMA weights when the run keeps an EMA), so ``sample_unet.py`` and ``vf.load_pipeline`` read either alike.
"""
from __future__ import annotations

import torch
from torch import nn

from visionformers._validate import fail
from visionformers.text.conditioning import TextConditioner
from visionformers.training.pipeline import TEXT_ENCODER_DIR

__all__ = ["JointTextDenoiser"]


class JointTextDenoiser(nn.Module):
    """``model(x_t, t, captions=[...])``: encode the captions with the trainable text encoder, then denoise.

    Called with ``context=`` / ``context_mask=`` instead (the sampler's classifier-free guidance batches, encoded
    once per image batch by ``text_encoder``), it is the denoiser alone.
    """

    # {sub-directory of the export: sub-module}; "" is the model directory itself
    exported_parts = {"": "denoiser", TEXT_ENCODER_DIR: "text_encoder.encoder"}

    def __init__(self, denoiser: nn.Module, text_encoder: TextConditioner):
        super().__init__()
        if not isinstance(text_encoder, TextConditioner) or text_encoder.frozen:
            fail("text_encoder", type(text_encoder).__name__ if not isinstance(text_encoder, TextConditioner)
                 else "a frozen TextConditioner", "a TextConditioner built with freeze=False (trained jointly)")
        context_dim = getattr(getattr(denoiser, "config", None), "context_dim", None)
        if context_dim != text_encoder.context_dim:
            fail("denoiser", f"{type(denoiser).__name__} with context_dim={context_dim}",
                 f"a denoiser whose context_dim is the text encoder's width, {text_encoder.context_dim}")
        self.denoiser, self.text_encoder = denoiser, text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, captions: list[str] | None = None, **cond) -> torch.Tensor:
        if captions is not None:
            if "context" in cond or "context_mask" in cond:
                fail("captions", "given with context", "captions or an encoded context, not both")
            context, mask = self.text_encoder(captions)
            cond = {**cond, "context": context, "context_mask": mask}
        return self.denoiser(x, t, **cond)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of both models' blocks in the backward pass."""
        self.denoiser.set_grad_checkpointing(enable)
        self.text_encoder.encoder.set_grad_checkpointing(enable)
