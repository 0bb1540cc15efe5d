"""Image-classifier training: build or load a model, AdamW parameter groups with layer-wise lr decay, one epoch
of training under Accelerate, top-k evaluation gathered over processes, and the best checkpoint kept.

``train_scripts/train_classifier.py`` is a thin caller of these functions.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visionformers._validate import check_choice, fail
from visionformers.data.transforms import mixup_cutmix
from visionformers.hub import load_into, load_state_dict, load_weights_file, read_config
from visionformers.metrics.accuracy import AccuracyResult, topk_correct
from visionformers.nn.blocks import TransformerBlock
from visionformers.nn.norm import RMSNorm
from visionformers.nn.positional import LearnedPositionEmbedding, LearnedPositionEmbedding2D
from visionformers.nn.relative import T5RelativeBias, WindowRelativeBias
from visionformers.registry import get_preset, model_classes, replace_config
from visionformers.training.callbacks import Callback
from visionformers.training.optim import adamw

logger = logging.getLogger(__name__)

INIT_FORMATS = ("timm", "torchvision")
# Parameters that are embeddings or additive tables rather than linear maps: decaying them pulls positions /
# special tokens toward zero instead of regularising a weight matrix (timm's ``no_weight_decay()`` lists).
NO_DECAY_NAMES = ("*pos_embed*", "*cls_token*", "*reg_token*", "*register_tokens*", "*dist_token*", "*mask_token*",
                  "*relative_position_bias_table*")
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, RMSNorm, nn.Embedding,
                    LearnedPositionEmbedding, LearnedPositionEmbedding2D, WindowRelativeBias, T5RelativeBias)
# Parameters that belong to the input stem (layer 0 of layer-wise decay) even when registered after the blocks.
STEM_NAMES = ("*patch_embed*", "*pos_embed*", "*cls_token*", "*reg_token*", "*register_tokens*", "*dist_token*",
              "*mask_token*")


# ---- parameter groups ---------------------------------------------------------------------------------


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of trainable parameters that get no weight decay: biases and every 1-D tensor (norm gains, LayerScale),
    parameters of norm / embedding / relative-bias modules, position embeddings, class and register tokens, and
    whatever the model lists in an optional timm-style ``no_weight_decay()``."""
    extra = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    names = set()
    for mod_name, module in model.named_modules():
        table = isinstance(module, NO_DECAY_MODULES)
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if not p.requires_grad:
                continue
            if (table or p.ndim <= 1 or p_name == "bias" or name in extra
                    or any(fnmatch.fnmatchcase(name, pat) for pat in NO_DECAY_NAMES)):
                names.add(name)
    return names


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """(parameter name -> layer id, number of layers L) for layer-wise lr decay, as in BEiT (Bao et al. 2022).

    Transformer blocks are numbered 1..D in module order (Swin's stages in sequence). The stem (patch embedding,
    position table, class / register tokens, anything before the first block) is layer 0; parameters between two
    blocks (Swin's patch merging) join the next block, as timm groups them; the final norm and the head come
    after the last block and are layer L = D + 1, the only one trained at the full learning rate.
    """
    blocks = [name for name, m in model.named_modules() if isinstance(m, TransformerBlock)]
    # a TransformerBlock inside another one (never today) would count once, under its outer block
    blocks = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks if o != b)]
    index = {b: i for i, b in enumerate(blocks)}
    top = len(blocks) + 1

    def owner_of(name: str) -> int | None:
        parts = name.split(".")
        for n in range(len(parts) - 1, 0, -1):  # longest block path that prefixes the name
            if ".".join(parts[:n]) in index:
                return index[".".join(parts[:n])]
        # a per-block table kept beside the blocks (Swin: stage.rel_bias.<j> for stage.blocks.<j>) joins block j
        for n in range(len(parts) - 2, 0, -1):
            if parts[n].isdigit():
                for sibling in (b for b in index if b.rsplit(".", 2)[0] == ".".join(parts[:n - 1])):
                    if sibling.rsplit(".", 1)[1] == parts[n]:
                        return index[sibling]
        return None

    ids, pending, after_block = {}, [], False  # pending: seen since the last block; they join the next one
    for name, _ in model.named_parameters():
        owner = owner_of(name)
        if owner is not None:
            ids.update((p, owner + 1) for p in pending)
            pending, after_block = [], True
            ids[name] = owner + 1
        elif not after_block or any(fnmatch.fnmatchcase(name, pat) for pat in STEM_NAMES):
            ids[name] = 0
        else:
            pending.append(name)
    ids.update((p, top) for p in pending)
    return ids, top


def param_groups_layer_decay(
    model: nn.Module, learning_rate: float, weight_decay: float = 0.05, layer_decay: float = 1.0,
) -> list[dict]:
    """AdamW groups: per layer id and decay / no-decay, with ``lr = learning_rate * layer_decay ** (L - layer_id)``.

    Layer-wise lr decay (BEiT, Bao et al. 2022, Sec. 2.4 / its ``optim_factory.py``; also timm's
    ``param_groups_layer_decay``): layers near the input move least when fine-tuning. ``layer_decay=1`` gives
    every parameter ``learning_rate``. Each group records ``lr_scale`` and ``layer_id``; ``torch.optim`` keeps them
    and an lr scheduler built afterwards scales each group's own ``lr``. Frozen parameters are left out.
    """
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        fail("learning_rate", learning_rate, "a number > 0")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        fail("weight_decay", weight_decay, "a number >= 0")
    if not (isinstance(layer_decay, (int, float)) and 0 < layer_decay <= 1):
        fail("layer_decay", layer_decay, "a number in (0, 1] (1 disables layer-wise decay)")
    no_decay = no_weight_decay_names(model)
    ids, top = layer_ids(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decayed = ids[name], name not in no_decay
        if (layer, decayed) not in groups:
            scale = float(layer_decay) ** (top - layer)
            groups[(layer, decayed)] = {"params": [], "lr": learning_rate * scale, "lr_scale": scale,
                                        "weight_decay": weight_decay if decayed else 0.0, "layer_id": layer}
        groups[(layer, decayed)]["params"].append(p)
    if not groups:
        fail("model", type(model).__name__, "a model with at least one trainable parameter")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float = 0.05, layer_decay: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over :func:`param_groups_layer_decay`, fused on CUDA (``optim.adamw``)."""
    return adamw(param_groups_layer_decay(model, learning_rate, weight_decay, layer_decay), learning_rate, betas, eps)


# ---- building and loading the model -------------------------------------------------------------------


def convert_state_dict(state: dict[str, torch.Tensor], init_format: str, config=None, img_size=None):
    """(config read from the weights, state dict in visionformers names) for a timm or torchvision state dict,
    through ``visionformers.convert``. ``config`` fills what the weights cannot tell (ViT head count, pooling);
    the position table is resampled to ``img_size`` (or ``config.img_size``)."""
    check_choice("init_format", init_format, INIT_FORMATS)
    from visionformers import convert

    convert_fn = convert.from_timm if init_format == "timm" else convert.from_torchvision
    return convert_fn(state, config, img_size=img_size, return_config=True)


def load_compatible(model: nn.Module, state: dict[str, torch.Tensor], source: str, source_config=None) -> list[str]:
    """Load ``state`` into ``model`` strictly, except that a classifier head whose class count differs keeps
    its fresh initialisation (fine-tuning on a new label set). Returns the names kept from the model.

    ``source_config``: the config the weights were trained with; models with ``adapt_state_dict`` use it to
    adapt tables to changed fields (e.g. ViT resamples its position table for another ``img_size``).
    """
    if source_config is not None and hasattr(model, "adapt_state_dict"):
        state = model.adapt_state_dict(dict(state), source_config)
    own = model.state_dict()
    num_classes = getattr(model.config, "num_classes", None)
    reinit = [k for k, v in state.items() if k in own and v.shape != own[k].shape and num_classes
              and own[k].ndim >= 1 and own[k].shape[0] == num_classes]
    state = {**state, **{k: own[k] for k in reinit}}
    load_into(model, state, source=source)
    if reinit:
        logger.info("%s: re-initialised %s (%d classes now)", source, reinit, num_classes)
    return reinit


def build_classifier(
    model_name: str | None = None,
    *,
    pretrained: str | os.PathLike | None = None,
    init_checkpoint: str | os.PathLike | None = None,
    init_format: str | None = None,
    **overrides,
) -> nn.Module:
    """A classifier from scratch (``model_name``), from a visionformers directory (``pretrained``), or from a
    timm / torchvision checkpoint file (``init_checkpoint`` + ``init_format``: the architecture is read from the
    weights; ``model_name``, optional, fills what they cannot tell, such as a ViT's head count). ``overrides``
    change config fields (``num_classes``, ``img_size``, ...); position tables are resampled to a new
    ``img_size`` and a head of another class count is re-initialised.
    """
    from visionformers.vision.swin import SwinConfig
    from visionformers.vision.vit import ViTConfig

    classifiers = (ViTConfig, SwinConfig)
    if pretrained is not None and init_checkpoint is not None:
        fail("init_checkpoint", str(init_checkpoint), "not both --pretrained and --init_checkpoint")
    if model_name is not None and not isinstance(get_preset(model_name)[1], classifiers):
        fail("model", model_name, "a ViT or Swin classifier preset (vf.list_models('vit*'), vf.list_models('swin*'))")
    if pretrained is not None:
        cls, source_config = read_config(pretrained)
        if not isinstance(source_config, classifiers):
            fail("pretrained", str(pretrained), f"a ViT or Swin model directory (it holds a {cls.__name__})")
        weights = Path(pretrained) / "model.safetensors"
        model = cls(replace_config(source_config, overrides))
        load_compatible(model, load_state_dict(weights), str(weights), source_config)
        return model
    if model_name is None and init_checkpoint is None:
        fail("model", None, "a registered model name (vf.list_models())")
    if init_checkpoint is None:
        cls, preset = get_preset(model_name)
        return cls(replace_config(preset, overrides))
    check_choice("init_format", init_format, INIT_FORMATS)
    hint = replace_config(get_preset(model_name)[1], overrides) if model_name is not None else None
    source_config, state = convert_state_dict(load_weights_file(init_checkpoint, "init_checkpoint"), init_format, hint,
                                              overrides.get("img_size"))
    saved_chans, chans = getattr(source_config, "in_chans", None), overrides.get("in_chans")
    if chans is not None and saved_chans is not None and chans != saved_chans:
        raise ValueError(f"init_checkpoint={str(init_checkpoint)!r} ({init_format}) takes {saved_chans}-channel images, "
                         f"the data gives {chans}: pass --channels {saved_chans} (gray images are repeated)")
    classes = {cfg_cls: cls for cls, cfg_cls in model_classes().values()}
    model = classes[type(source_config)](replace_config(source_config, overrides))
    load_compatible(model, state, str(init_checkpoint))  # the converter already resampled position tables
    return model


# ---- one epoch, evaluation, best checkpoint ----------------------------------------------------------------


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft targets (B, K) from :func:`~visionformers.data.mixup_cutmix`; fp32 for stability."""
    return F.cross_entropy(logits.float(), targets)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    accelerator,
    *,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.1,
    max_grad_norm: float | None = 1.0,
    generator: torch.Generator | None = None,
    max_steps: int | None = None,
    callbacks: Callback | None = None,
    state=None,
) -> dict:
    """Train over ``batches`` of {"pixel_values", "label"}; the scheduler steps once per optimizer update.

    With ``callbacks`` (a ``training.callbacks.Callback``, e.g. a ``CallbackList``) and its ``LoopState``,
    ``state.step`` counts the updates and ``on_step_end`` runs after each, with {"loss", "lr"}.

    Gradient accumulation follows ``accelerator.gradient_accumulation_steps`` (``accelerator.accumulate``).
    Returns {"loss": mean over processes and batches, "steps": optimizer updates, "samples": global count}.
    """
    model.train()
    device = accelerator.device
    loss_sum, batches_seen, steps, samples = torch.zeros((), device=device), 0, 0, 0
    for batch in batches:
        images, labels = batch["pixel_values"].to(device, non_blocking=True), batch["label"].to(device)
        # mixing happens on the CPU generator's draws only: the same lam and box on every device type
        images, targets = mixup_cutmix(images, labels, num_classes, mixup_alpha, cutmix_alpha, label_smoothing,
                                       generator=generator)
        with accelerator.accumulate(model):
            loss = classification_loss(model(images), targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients and max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        batches_seen += 1
        samples += images.shape[0] * accelerator.num_processes
        if accelerator.sync_gradients:
            lr_scheduler.step()
            steps += 1
            if callbacks is not None:
                state.step += 1
                callbacks.on_step_end(state, {"loss": loss.detach(), "lr": lr_scheduler.get_last_lr()[-1]})
            if max_steps is not None and steps >= max_steps:
                break
    mean = accelerator.reduce(loss_sum, "mean") / max(1, batches_seen) if batches_seen else loss_sum
    return {"loss": float(mean), "steps": steps, "samples": samples}


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, topk: Sequence[int] = (1, 5)) -> AccuracyResult:
    """Top-k accuracy over a loader prepared by ``accelerator`` (each process a shard): logits and labels are
    gathered with ``gather_for_metrics``, which drops the samples repeated to even out the last batch, so every
    image counts exactly once whatever the number of processes. Every process gets the same result."""
    model.eval()
    totals, n = {}, 0
    for batch in loader:
        logits = model(batch["pixel_values"].to(accelerator.device))
        logits, labels = accelerator.gather_for_metrics((logits.float(), batch["label"].to(accelerator.device)))
        for k, c in topk_correct(logits, labels.long(), topk).items():
            totals[k] = totals.get(k, 0) + c
        n += labels.shape[0]
    model.train()
    if n == 0:
        fail("loader", type(loader).__name__, "at least one labelled evaluation image")
    return AccuracyResult(n, {k: c / n for k, c in sorted(totals.items())})


class BestCheckpoint(Callback):
    """Keeps ``<output_dir>/best``: a ``from_pretrained`` directory of the weights with the highest top-1 so far,
    replaced atomically (written under a temporary name, then renamed). Every process calls :meth:`update`, or,
    as a callback, gets ``on_evaluate`` with metrics holding ``top1`` (and ``top5``, ``num_samples``)."""

    METRICS_FILE = "metrics.json"

    def __init__(self, directory: str | os.PathLike, extra_files: dict | None = None):
        self.directory, self.extra_files = Path(directory), dict(extra_files or {})
        self.best: float = -math.inf
        self.last_saved = False  # whether the latest evaluation was saved

    def update(self, model: nn.Module, accelerator, result: AccuracyResult, epoch: int) -> bool:
        """Save when ``result.top1`` beats the best so far (ties keep the earlier); True when saved."""
        metrics = {"num_samples": result.num_samples, **{f"top{k}": v for k, v in result.accuracies.items()}}
        return self._consider(model, accelerator, metrics, epoch)

    def on_evaluate(self, state, metrics: dict) -> None:
        self._consider(state.model, state.accelerator, metrics, state.epoch)

    def _consider(self, model: nn.Module, accelerator, metrics: dict, epoch: int) -> bool:
        top1 = metrics.get("top1")
        self.last_saved = top1 is not None and top1 > self.best
        if not self.last_saved:
            return False
        from visionformers.training.checkpoint import export_pretrained

        self.best = top1
        export_pretrained(model, self.directory, accelerator=accelerator,
                          extra_files={**self.extra_files, self.METRICS_FILE: {"epoch": epoch, **metrics}})
        return True

    def state_dict(self) -> dict:
        return {"best": None if self.best == -math.inf else self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = -math.inf if state["best"] is None else float(state["best"])


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per layer: its lr scale and parameter counts with and without weight decay (for the log)."""
    rows = {}
    for g in optimizer.param_groups:
        row = rows.setdefault(g.get("layer_id", 0), [g.get("lr_scale", 1.0), 0, 0])
        row[1 if g["weight_decay"] > 0 else 2] += sum(p.numel() for p in g["params"])
    return "\n".join(f"layer {i:>2}: lr x {s:.4f}, {d:,} decayed + {nd:,} undecayed params"
                     for i, (s, d, nd) in sorted(rows.items()))
