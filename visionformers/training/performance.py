"""Training speed settings, applied from outside the model: regional compilation, gradient checkpointing and the
GPU settings (TF32 matmuls, channels_last convolutions). The optimizer side (fused AdamW) is in ``optim.py``.

Regional compilation follows PyTorch's recipe ("Reducing torch.compile cold start compilation time with
regional compilation"): each repeated block is compiled in place (``nn.Module.compile``), so the blocks of
one shape share one compiled graph and the model's state dict keeps its names (no ``_orig_mod.`` prefix):
checkpoints are written from the plain module. What stays eager is the glue between the blocks.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from visionformers._validate import check_bool, fail

__all__ = ["repeated_blocks", "compile_blocks", "enable_grad_checkpointing", "use_tf32", "is_convolutional",
           "channels_last_format", "add_performance_arguments", "configure_training"]

logger = logging.getLogger(__name__)


def _block_types() -> tuple[type[nn.Module], ...]:
    from visionformers.nn.blocks import TransformerBlock
    from visionformers.vision.unet_blocks import ResBlock, SpatialAttention

    return (TransformerBlock, ResBlock, SpatialAttention)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, outermost only: transformer blocks (ViT, Swin, DiT, text models), the UNet's
    residual and attention blocks."""
    types, blocks, inside = _block_types(), [], set()
    for name, module in model.named_modules():
        if isinstance(module, types) and not any(name.startswith(p + ".") for p in inside):
            blocks.append(module)
            inside.add(name)
    return blocks


# Graphs one block may need: training and eval mode (sampling during training), each at a first input shape and
# once more where dynamo makes a dimension dynamic on meeting a second (a UNet block on two resolutions).
GRAPHS_PER_BLOCK = 4


def compile_blocks(model: nn.Module, backend: str = "inductor", **compile_kwargs) -> int:
    """Compile every repeated block in place (``block.compile(backend=...)``); returns how many. Blocks of the
    same code and shapes reuse one graph; later steps, and a resumed run's steps, reuse the same graphs.

    Dynamo keeps at most ``recompile_limit`` graphs (8) per function and runs every further variant eagerly, with
    one warning. Blocks of one class can each need their own graphs: a UNet's residual blocks differ in widths,
    Swin's blocks in shift and stochastic-depth rate. The limit is raised to :data:`GRAPHS_PER_BLOCK` per block of
    the most numerous block class (never lowered), so every block runs compiled."""
    blocks = repeated_blocks(model)
    if not blocks:
        fail("model", type(model).__name__, "a model with repeated blocks to compile (ViT, Swin, DiT, UNet, text)")
    per_class: dict[type, int] = {}
    for block in blocks:
        per_class[type(block)] = per_class.get(type(block), 0) + 1
    needed = GRAPHS_PER_BLOCK * max(per_class.values())
    config = torch._dynamo.config
    if needed > config.recompile_limit:
        logger.info("raising torch._dynamo.config.recompile_limit from %d to %d for %s's blocks",
                    config.recompile_limit, needed, type(model).__name__)
        config.recompile_limit = needed
    for block in blocks:
        block.compile(backend=backend, **compile_kwargs)
    return len(blocks)


def enable_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """``model.set_grad_checkpointing(enable)`` (timm's name), a ValueError for a model without it."""
    check_bool("enable", enable)
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        fail("model", type(model).__name__, "a model with set_grad_checkpointing (every visionformers model)")
    model.set_grad_checkpointing(enable)


def use_tf32() -> bool:
    """On CUDA, fp32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa products, fp32 accumulate);
    a no-op without CUDA. Returns whether it applied. Mixed-precision bf16 compute is unaffected."""
    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def is_convolutional(model: nn.Module) -> bool:
    """A convolutional trunk (the UNet): more than one Conv2d; a transformer's single patch embedding is not."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def channels_last_format(model: nn.Module, device: torch.device | str) -> torch.memory_format:
    """The memory format for a model's inputs on ``device``: channels_last for a convolutional model on CUDA
    (cuDNN's NHWC kernels; the weights are converted here, unless the model fixes its own weight layout: then
    the inputs follow it), else contiguous (the model is left as it is)."""
    if torch.device(device).type != "cuda" or not is_convolutional(model):
        return torch.contiguous_format
    model.to(memory_format=torch.channels_last)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    if all(w.is_contiguous(memory_format=torch.channels_last) for w in weights):
        return torch.channels_last
    return torch.contiguous_format


def add_performance_arguments(parser) -> None:
    """``--gradient_checkpointing``, ``--compile`` and ``--compile_backend`` for a training script."""
    a = parser.add_argument
    a("--gradient_checkpointing", action="store_true", help="recompute each block's activations in the backward "
      "pass: less memory for ~1/3 more compute, the same gradients")
    a("--compile", action="store_true", help="torch.compile each repeated block once (regional compilation)")
    a("--compile_backend", default="inductor", help="torch.compile backend for --compile (inductor; eager or "
      "aot_eager to check tracing without code generation)")


def configure_training(model: nn.Module, device, *, gradient_checkpointing: bool = False, compile: bool = False,
                       compile_backend: str = "inductor") -> torch.memory_format:
    """The speed settings of a training run, before ``accelerator.prepare``: TF32 and channels_last on CUDA,
    gradient checkpointing and regional compilation when asked. Returns the memory format for the inputs."""
    check_bool("gradient_checkpointing", gradient_checkpointing)
    check_bool("compile", compile)
    if compile and compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        fail("compile_backend", compile_backend, f"one of {torch._dynamo.list_backends(exclude_tags=())}")
    use_tf32()
    memory_format = channels_last_format(model, device)
    if gradient_checkpointing:
        enable_grad_checkpointing(model)
    if compile:
        n = compile_blocks(model, backend=compile_backend)
        logger.info("compiled %d blocks of %s with %s", n, type(model).__name__, compile_backend)
    return memory_format
