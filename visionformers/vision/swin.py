"""Swin Transformer (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows").

Stages of pre-norm blocks that attend inside non-overlapping windows; every second block shifts the
windows by half a window (a cyclic roll, sec. 3.2) with a mask so that tokens only attend tokens of
their own region of the rolled map; a learned relative position bias is added per head (eq. 4); patch
merging halves the resolution between stages. Attention is the shared ``nn.Attention`` of ``TransformerBlock``,
over windows (``forward_windows``; the ``partition`` hook for padded layouts), with ``bias`` = relative bias + shift
mask.

Speed: the token stream is kept in *window order* (the tokens of each window contiguous), so a window
partition is a free view and the roll, partition and reverse of the reference implementations become
one row gather per block, precomputed per resolution (``SwinPlan``). Patch merging gathers straight into
the next stage's window order (in CPU inference with its norm and reduction, in one native call). Masks, index
tables and (in inference) the bias + mask sums are built once. In CPU inference a block is one native call, the
gather included, group of windows by group of windows with every activation in cache.
Inputs that are not a multiple of the window are padded timm-style (roll, then zero-pad bottom/right).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from visionformers._validate import (
    check_bool,
    check_dtype,
    check_image,
    check_int,
    check_number,
    check_probability,
    check_tensor,
    fail,
    is_int,
)
from visionformers.nn import PatchEmbed, TransformerBlock, WindowRelativeBias
from visionformers.nn.blocks import take_tokens
from visionformers.nn.fused import gather_norm_linear
from visionformers.nn.linear import Linear

__all__ = ["SwinConfig", "SwinTransformer", "PatchMerging", "window_layout", "SwinPlan"]


def _pair(x) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


@dataclass(frozen=True)
class SwinConfig:
    img_size: int | tuple[int, int] = 224  # build resolution: fixes each stage's window (clipped to the stage grid)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head; forward returns pooled features
    embed_dim: int = 96  # width of stage 1; doubles at every patch merging
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # head_dim 32 at every stage
    window_size: int = 7  # 7 for 224 inputs: 56, 28, 14, 7 are all multiples, no padding
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_norm: bool = True  # LayerNorm after the patch embedding (official Swin, timm, torchvision)
    norm_eps: float = 1e-5  # Swin keeps PyTorch's LayerNorm default (unlike ViT's 1e-6)
    drop_rate: float = 0.0  # dropout before the classifier
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.2  # stochastic depth, linear over all blocks (paper: 0.2 / 0.3 / 0.5 for T / S / B)

    def __post_init__(self):
        size = _pair(self.img_size) if isinstance(self.img_size, (int, tuple, list)) else None
        if size is None or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            fail("img_size", self.img_size, "a positive int or an (H, W) tuple of positive ints")
        for name in ("patch_size", "in_chans", "embed_dim", "window_size"):
            check_int(name, getattr(self, name))
        check_int("num_classes", self.num_classes, minimum=0)
        if not isinstance(self.depths, tuple) or not self.depths or not all(is_int(d) and d > 0 for d in self.depths):
            fail("depths", self.depths, "a non-empty tuple of positive ints (blocks per stage)")
        if not isinstance(self.num_heads, tuple) or len(self.num_heads) != len(self.depths):
            fail("num_heads", self.num_heads, f"a tuple of {len(self.depths)} ints, one per stage")
        for i, heads in enumerate(self.num_heads):
            if not is_int(heads) or heads <= 0 or (self.embed_dim * 2**i) % heads:
                fail("num_heads", self.num_heads, f"positive divisors of each stage width {[self.embed_dim * 2**j for j in range(len(self.depths))]}")
        check_number("mlp_ratio", self.mlp_ratio, above=0)
        check_number("norm_eps", self.norm_eps, above=0)
        for name in ("qkv_bias", "patch_norm"):
            check_bool(name, getattr(self, name))
        for name in ("drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate"):
            check_probability(name, getattr(self, name))

    def stage_resolutions(self, grid: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Token grid of every stage for a patch grid (default: the build size); odd sizes round up."""
        h, w = grid or tuple(-(-s // self.patch_size) for s in _pair(self.img_size))
        out = []
        for _ in self.depths:
            out.append((h, w))
            h, w = -(-h // 2), -(-w // 2)
        return out


# ---- window layouts: where every token of a (shifted, padded) window partition comes from -------------


def window_layout(resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]):
    """Window partition of an (H, W) token grid, cyclically shifted by ``shift`` and zero-padded timm-style.

    Returns ``slots`` (nW * N,) with the raster index of the token in each window slot (H*W for a pad
    slot), ``regions`` (nW, N) region label of each slot in the rolled map, or None without a shift,
    and the number of windows nW. The rolled map is x_r[i, j] = x[(i + s_h) % H, (j + s_w) % W]
    (``torch.roll`` by -shift), padded to a multiple of the window *after* the roll, as timm does.
    """
    (h, w), (wh, ww), (sh, sw) = resolution, window, shift
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    r = torch.arange(hp)[:, None]
    c = torch.arange(wp)[None, :]
    source = ((r + sh) % h) * w + (c + sw) % w  # (Hp, Wp) raster index before the roll
    source = source.masked_fill((r >= h) | (c >= w), h * w)
    slots = rearrange(source, "(nh wh) (nw ww) -> (nh nw wh ww)", wh=wh, ww=ww)
    num_windows = (hp // wh) * (wp // ww)
    if sh == 0 and sw == 0:
        return slots, None, num_windows

    # Regions of the rolled, padded map (Liu et al. 2021, fig. 4): the last window row/column holds
    # tokens that wrapped around; they are split at `shift` from the end, exactly as timm slices them.
    def bands(n, win, s):
        idx = torch.arange(n)
        return (idx >= n - win).long() + (idx >= n - s).long() if s else torch.zeros(n, dtype=torch.long)

    labels = bands(hp, wh, sh)[:, None] * 3 + bands(wp, ww, sw)[None, :]  # (Hp, Wp)
    regions = rearrange(labels, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=wh, ww=ww)
    return slots, regions, num_windows


def _inverse(order: torch.Tensor, n: int) -> torch.Tensor:
    """Position of every raster index in a stream ``order`` (a permutation of range(n))."""
    inv = torch.empty(n, dtype=torch.long)
    inv[order] = torch.arange(n)
    return inv


def _gather_or_none(index: torch.Tensor) -> torch.Tensor | None:
    """None for the identity permutation, so the forward skips the copy."""
    return None if torch.equal(index, torch.arange(index.numel())) else index


@dataclass
class BlockPlan:
    """What one block needs at one resolution; every tensor here is input-independent."""

    window: tuple[int, int]  # effective window (clipped to the stage grid)
    num_windows: int
    gather: torch.Tensor | None  # reorders the stream (positions in the previous order) before the block
    split: torch.Tensor | None  # padded layouts only: slot -> raster position (H*W = a zero token)
    merge: torch.Tensor | None  # padded layouts only: raster token -> its slot
    mask: torch.Tensor | None  # (nW, 1, N, N) bool, True = same region of the rolled map
    bias_index: torch.Tensor | None  # (N*N,) table rows when the window is smaller than the table's


@dataclass
class StagePlan:
    resolution: tuple[int, int]
    merge_gather: torch.Tensor | None  # patch merging: (H*W * 4,) positions in the previous stream (+ pad)
    merge_pad: bool  # an odd previous resolution: gather index L points at an appended zero token
    blocks: list[BlockPlan]
    order: torch.Tensor  # (H*W,) raster index of every stream position after the stage
    to_raster: torch.Tensor | None  # gather back to raster order (None when already raster)


@dataclass
class SwinPlan:
    """Every index table and mask of one input resolution, built once and cached by the model."""

    stages: list[StagePlan]


def _sub_window_index(window: tuple[int, int], table_window: tuple[int, int]) -> torch.Tensor:
    """Rows of a (2Wh-1)(2Ww-1) relative-bias table for a smaller window's (N*N,) offset pairs."""
    (eh, ew), (th, tw) = window, table_window
    coords = torch.stack(torch.meshgrid(torch.arange(eh), torch.arange(ew), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return ((rel[0] + th - 1) * (2 * tw - 1) + (rel[1] + tw - 1)).flatten()


@torch.compiler.disable  # plain Python over index tables, run once per resolution: never traced
def build_plan(config: SwinConfig, grid: tuple[int, int], table_windows: list[tuple[int, int]], device) -> SwinPlan:
    """Plan for a patch grid: per-block layouts, stream reorders, patch-merging gathers and shift masks.

    The effective window of a stage is min(table window, stage grid) per axis and a shifted block
    shifts by half of it only where the grid exceeds the window (Liu et al.; timm's ``_calc_window_shift``).
    """
    stages = []
    order = torch.arange(grid[0] * grid[1])  # the patch embedding arrives in raster order
    prev_res = None
    for si, res in enumerate(config.stage_resolutions(grid)):
        n_tok = res[0] * res[1]
        tw = table_windows[si]
        window = (min(tw[0], res[0]), min(tw[1], res[1]))
        layouts = []
        for bi in range(config.depths[si]):
            shifted = bi % 2 == 1
            shift = tuple(win // 2 if shifted and r > win else 0 for r, win in zip(res, window))
            layouts.append(window_layout(res, window, shift))
        # stream order each block wants: its slots if unpadded (partition = view), else raster
        targets = [slots if not (slots == n_tok).any() else torch.arange(n_tok) for slots, _, _ in layouts]

        merge_gather, merge_pad = None, False
        if si > 0:  # patch merging gathers 2x2 neighbours of the previous stream straight into targets[0]
            ph, pw = prev_res
            inv_prev = _inverse(order, ph * pw)
            i2, j2 = targets[0] // res[1], targets[0] % res[1]
            parts = []
            for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1)):  # channel order x0, x1, x2, x3 of timm / torchvision
                y, x = 2 * i2 + dy, 2 * j2 + dx
                inside = (y < ph) & (x < pw)
                raster = torch.where(inside, y * pw + x, 0)
                parts.append(torch.where(inside, inv_prev[raster], ph * pw))
            merge_gather = torch.stack(parts, dim=1).flatten()  # (H*W * 4,): 4 sources per new token
            merge_pad = bool((merge_gather == ph * pw).any())
            order = targets[0]

        blocks = []
        for (slots, regions, nw), target in zip(layouts, targets):
            inv = _inverse(order, n_tok)
            gather = _gather_or_none(inv[target])
            order = target
            padded = bool((slots == n_tok).any())
            split = merge = None
            if padded:  # the stream stays raster; split gathers windows (pad slots -> zero token)
                split = slots
                merge = _slot_of(slots, n_tok)
            mask = None
            if regions is not None:
                mask = (regions[:, :, None] == regions[:, None, :])[:, None]  # (nW, 1, N, N)
            bias_index = None if window == tw else _sub_window_index(window, tw)
            blocks.append(BlockPlan(window, nw, gather, split, merge, mask, bias_index))
        to_raster = _gather_or_none(_inverse(order, n_tok))
        stages.append(StagePlan(res, merge_gather, merge_pad, blocks, order.clone(), to_raster))
        prev_res = res
    return _plan_to(SwinPlan(stages), device)  # (the first block's gather reorders the embedding's raster tokens)


def _slot_of(slots: torch.Tensor, n_tok: int) -> torch.Tensor:
    """(H*W,) slot index of every real token of a padded layout."""
    slot_of = torch.empty(n_tok, dtype=torch.long)
    real = slots < n_tok
    slot_of[slots[real]] = torch.arange(slots.numel())[real]
    return slot_of


def _plan_to(plan: SwinPlan, device) -> SwinPlan:
    for stage in plan.stages:
        for name in ("merge_gather", "order", "to_raster"):
            t = getattr(stage, name)
            if t is not None:
                setattr(stage, name, t.to(device))
        for block in stage.blocks:
            for name in ("gather", "split", "merge", "mask", "bias_index"):
                t = getattr(block, name)
                if t is not None:
                    setattr(block, name, t.to(device))
    return plan


def _with_zero_token(x: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L + 1, C): index L reads a zero token (padding)."""
    return torch.cat((x, x.new_zeros(x.shape[0], 1, x.shape[2])), dim=1)


# ---- modules ----------------------------------------------------------------------------------------


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (x0, x1, x2, x3 order), LayerNorm, linear 4C -> 2C (Liu et al. sec. 3.1)."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L', 4C) neighbours already gathered -> (B, L', out_dim)."""
        return self.reduction(self.norm(x))

    def merge(self, x: torch.Tensor, index: torch.Tensor, pad: bool) -> torch.Tensor:
        """x: (B, L, C) token stream -> (B, L', out_dim), the 4 neighbours of new token o being x[:, index[4o:4o+4]]
        (index L: a zero token, with ``pad``). CPU inference: gather, norm and reduction in one native call."""
        dim = self.norm.normalized_shape[0] // 4
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != dim:
            fail("x", x, f"a (B, L, {dim}) token stream")
        top = x.shape[1] if pad else x.shape[1] - 1
        if (not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.ndim != 1 or index.numel() % 4
                or (index.numel() and not torch.compiler.is_compiling()  # (a data-dependent check)
                    and not 0 <= int(index.min()) <= int(index.max()) <= top)):
            fail("index", index, f"a 1-D int64 tensor of 4 positions per new token, each in [0, {top}]")
        out = gather_norm_linear(x, index, 4, self.norm, self.reduction)
        if out is not None:
            return out
        src = _with_zero_token(x) if pad else x
        return self(take_tokens(src, index).view(x.shape[0], index.numel() // 4, 4 * x.shape[-1]))  # (B, L', 4C)


class SwinStage(nn.Module):
    """Optional patch merging, then ``depth`` blocks alternating regular and shifted windows."""

    def __init__(self, dim, out_dim, depth, num_heads, table_window, config: SwinConfig, drop_path, downsample):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, config.norm_eps) if downsample else None
        self.blocks = nn.ModuleList(
            TransformerBlock(
                out_dim, num_heads, config.mlp_ratio, qkv_bias=config.qkv_bias, norm_eps=config.norm_eps,
                attn_drop=config.attn_drop_rate, proj_drop=config.proj_drop_rate, drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.rel_bias = nn.ModuleList(WindowRelativeBias(table_window, num_heads) for _ in range(depth))
        self.table_window = table_window
        self._bias_cache: dict = {}

    def block_bias(self, j: int, plan: BlockPlan) -> torch.Tensor:
        """Relative bias + shift mask of block j: (1, H, N, N), or (nW, H, N, N) when shifted (-inf across regions;
        one per window of an image, the same for every image).

        Input-independent: in inference (no grad) it is cached until the table changes.
        """
        rb = self.rel_bias[j]
        # under torch.compile the bias is part of the graph (no Python-side cache to guard on)
        cacheable = not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cacheable:
            key = (id(plan), rb.table.data_ptr(), rb.table._version, rb.table.dtype)
            hit = self._bias_cache.get(j)
            if hit is not None and hit[0] == key:
                return hit[1]
        if plan.bias_index is None:
            bias = rb()  # (H, N, N)
        else:
            n = plan.window[0] * plan.window[1]
            bias = rb.table[plan.bias_index].view(n, n, -1).permute(2, 0, 1)  # (H, N, N)
        bias = bias.unsqueeze(0)  # (1, H, N, N)
        if plan.mask is not None:
            bias = bias.masked_fill(~plan.mask, float("-inf"))  # (nW, H, N, N)
        if cacheable:
            self._bias_cache[j] = (key, bias)
        return bias

    def forward(self, x: torch.Tensor, plan: StagePlan) -> torch.Tensor:
        """x: (B, L, C) stream in the order the plan says -> (B, L', out_dim) in ``plan.order``."""
        if self.downsample is not None:
            x = self.downsample.merge(x, plan.merge_gather, plan.merge_pad)
        for j, (block, bp) in enumerate(zip(self.blocks, plan.blocks)):
            b = x.shape[0]
            bias = self.block_bias(j, bp)
            n = bp.window[0] * bp.window[1]
            if bp.split is None:  # the stream in this block's window order after the gather: windows are views
                x = block.forward_windows(x, n, bias=bias, gather=bp.gather)
                continue
            if bp.gather is not None:
                x = take_tokens(x, bp.gather)
            if bias.shape[0] > 1 and b > 1:  # SDPA broadcasts a mask over the batch only as a whole: tiled
                bias = bias.repeat(b, 1, 1, 1)  # (B*nW, H, N, N)
            slots = bp.num_windows * n  # window slots per image (sizes spelled out: -1 is ambiguous for B = 0)
            split = lambda h, bp=bp, n=n: take_tokens(_with_zero_token(h), bp.split).view(-1, n, h.shape[-1])  # noqa: E731
            merge = lambda o, bp=bp, b=b, slots=slots: take_tokens(o.view(b, slots, o.shape[-1]), bp.merge)  # noqa: E731
            x = block(x, bias=bias, partition=(split, merge))
        return x


class SwinTransformer(nn.Module):
    """Swin classifier: patch embedding, windowed stages with patch merging, mean-pooled linear head."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = c = config
        num_stages = len(c.depths)
        self.dims = [c.embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.dims[-1]
        # normed raster tokens, which the plan gathers into the first block's window order (padding to the patch is
        # done here, only when needed: PatchEmbed's pad copies even when it adds nothing)
        self.patch_embed = PatchEmbed(
            c.img_size, c.patch_size, c.in_chans, c.embed_dim, strict_img_size=False, pad=False,
            norm=nn.LayerNorm(c.embed_dim, eps=c.norm_eps) if c.patch_norm else None,
        )
        # a stage's window (and so its bias table) is clipped to its grid at the build size, as in timm
        self.table_windows = [
            (min(c.window_size, r[0]), min(c.window_size, r[1])) for r in c.stage_resolutions()
        ]
        total = sum(c.depths)
        rates = [c.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear over all blocks
        self.layers = nn.ModuleList()
        start = 0
        for i in range(num_stages):
            self.layers.append(
                SwinStage(
                    self.dims[max(i - 1, 0)], self.dims[i], c.depths[i], c.num_heads[i], self.table_windows[i], c,
                    rates[start : start + c.depths[i]], downsample=i > 0,
                )
            )
            start += c.depths[i]
        self.norm = nn.LayerNorm(self.num_features, eps=c.norm_eps)
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(self.num_features, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self._plans: dict = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's Swin init: trunc-normal(0.02) linears, zero biases, unit norms; zero head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowRelativeBias):
                nn.init.trunc_normal_(m.table, std=0.02)
        self.patch_embed.proj.reset_parameters()  # PyTorch's conv default, as timm and torchvision keep it
        if isinstance(self.head, nn.Linear):  # zero head: every class starts equally likely
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward instead of storing them."""
        for stage in self.layers:
            for block in stage.blocks:
                block.grad_checkpointing = enable

    def plan(self, grid: tuple[int, int], device) -> SwinPlan:
        """The cached :class:`SwinPlan` of a patch grid on a device (built on first use)."""
        key = (tuple(grid), str(device))
        plan = self._plans.get(key)
        if plan is None:
            # Plain tensors even when first built under inference_mode: the plan is reused in training too.
            with torch.inference_mode(False):
                plan = self._plans[key] = build_plan(self.config, tuple(grid), self.table_windows, device)
        return plan

    def _stream(self, images: torch.Tensor):
        """Patch embedding -> (B, L, C) stream in raster order (the first block gathers its windows), and the plan."""
        check_image("images", images, channels=self.config.in_chans, dtype=self.patch_embed.proj.weight.dtype)
        p = self.config.patch_size
        pad_h, pad_w = -images.shape[-2] % p, -images.shape[-1] % p
        if pad_h or pad_w:  # zero-pad bottom/right to a whole patch, as timm's dynamic padding
            images = F.pad(images, (0, pad_w, 0, pad_h))
        x = self.patch_embed(images)  # (B, L, C) normed, raster order
        plan = self.plan((images.shape[-2] // p, images.shape[-1] // p), x.device)
        return x, plan

    def _run(self, images: torch.Tensor, keep: bool):
        x, plan = self._stream(images)
        feats = []
        for stage, sp in zip(self.layers, plan.stages):
            x = stage(x, sp)
            if keep:
                feats.append((x, sp))
        return x, plan, feats

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> normed last-stage features (B, h, w, C) (channels last, as timm)."""
        x, plan, _ = self._run(images, keep=False)
        last = plan.stages[-1]
        x = self.norm(x if last.to_raster is None else take_tokens(x, last.to_raster))
        return x.view(x.shape[0], *last.resolution, x.shape[-1])

    def forward_intermediates(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, C, H, W) -> the output of every stage, [(B, C_i, h_i, w_i)] (before the final norm)."""
        _, _, feats = self._run(images, keep=True)
        out = []
        for x, sp in feats:
            x = x if sp.to_raster is None else take_tokens(x, sp.to_raster)
            out.append(rearrange(x, "b (h w) c -> b c h w", h=sp.resolution[0]))
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features (B, h, w, C) or (B, L, C) -> logits (B, num_classes), or pooled (B, C) with ``pre_logits``."""
        check_tensor("x", x, ndim=(3, 4), floating=True)
        c = self.num_features
        if x.shape[-1] != c or any(n == 0 for n in x.shape[1:-1]):
            fail("x", x, f"features (B, h, w, {c}) or (B, L, {c}) with at least one token, as forward_features returns")
        if isinstance(self.head, nn.Linear):
            check_dtype("x", x, self.head.weight.dtype)
        x = x.flatten(1, -2).mean(dim=1)  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, num_classes) (pooled features (B, C) when num_classes=0)."""
        x, _, _ = self._run(images, keep=False)
        return self.forward_head(self.norm(x))  # mean pooling does not care about the stream order

