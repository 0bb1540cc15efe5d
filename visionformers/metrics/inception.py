"""Inception-v3 (Szegedy et al. 2016) in plain PyTorch, in the two weight layouts that FIDs are computed with.

- ``"pytorch_fid"``: the TF graph of 2015-12-05 that FID (Heusel et al. 2017), IS (Salimans et al. 2016) and the
  ADM suite (Dhariwal & Nichol 2021) use, as ported by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``):
  1008 classes, and three differences from torchvision's network, which pytorch-fid patches into its
  ``FIDInceptionA/C/E_1/E_2`` blocks: the 3x3 average pools of the A, C and E blocks leave the zero padding out of
  the mean (TF's ``avg_pool``), and the last E block (``Mixed_7c``) max-pools instead.
- ``"torchvision"``: torchvision's ImageNet Inception-v3 (1000 classes, padding counted in the mean). Its
  features are NOT those of published FIDs; results computed with it are labelled ``inception-torchvision``.

Both layouts use torchvision's parameter names (``Mixed_5b.branch1x1.conv.weight``, ...), so either file loads
into :class:`InceptionV3` with ``load_state_dict``; torchvision's auxiliary classifier (``AuxLogits.*``) is not
needed for features and is dropped.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = {"pytorch_fid": 1008, "torchvision": 1000}  # variant -> classes of its fc layer
SPATIAL_CHANNELS = 7  # sFID: ADM keeps the first 7 channels of mixed_6/conv (7 x 17 x 17 = 2023 features)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as TF) -> ReLU."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chans, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool3x3(x: torch.Tensor, pool: str) -> torch.Tensor:
    """The stride-1 3x3 pool in front of ``branch_pool``: "avg" (torchvision: zeros of the padding counted),
    "avg_tf" (TF: the padding left out of the mean) or "max" (the 2015 graph's last block)."""
    if pool == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=pool == "avg")


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_chans: int, pool_features: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_chans, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_chans, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_chans, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_chans, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool3x3(x, self.pool)),
        ], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, in_chans: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_chans, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_chans, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, in_chans: int, channels_7x7: int, pool: str):
        super().__init__()
        c7 = channels_7x7
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_chans, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_chans, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_chans, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_chans, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_pool3x3(x, self.pool))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, in_chans: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_chans, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_chans, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs."""

    def __init__(self, in_chans: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_chans, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_chans, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_chans, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_chans, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(_pool3x3(x, self.pool)),
        ], 1)


class InceptionV3(nn.Module):
    """Inception-v3 returning pool3 features, classifier logits and ADM's spatial features.

    Input: (B, 3, 299, 299) in [-1, 1] (the range both weight sets were trained with); resizing and the
    [0, 1] -> [-1, 1] map are the caller's (:class:`~visionformers.metrics.features.InceptionFeatures`).
    """

    def __init__(self, variant: str = "pytorch_fid"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not accepted; expected one of {list(VARIANTS)}")
        self.variant = variant
        avg = "avg_tf" if variant == "pytorch_fid" else "avg"
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, avg)
        self.Mixed_5c = InceptionA(256, 64, avg)
        self.Mixed_5d = InceptionA(288, 64, avg)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, avg)
        self.Mixed_6c = InceptionC(768, 160, avg)
        self.Mixed_6d = InceptionC(768, 160, avg)
        self.Mixed_6e = InceptionC(768, 192, avg)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg)
        self.Mixed_7c = InceptionE(2048, "max" if variant == "pytorch_fid" else avg)
        self.fc = nn.Linear(2048, VARIANTS[variant])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, 299, 299) in [-1, 1] -> {"pool": (B, 2048), "logits": (B, classes), "spatial": (B, 2023)}.

        ``logits`` = pool3 @ fc.weight^T WITHOUT the bias, as the reference Inception Score code
        (openai/improved-gan, and ADM's evaluator after it) takes ``softmax/logits/MatMul``'s weight only.
        ``spatial``: ADM's sFID features, the graph's ``mixed_6/conv`` (TF's 7th mixed block = ``Mixed_6d``; its
        1x1 branch after BN + ReLU, (B, 192, 17, 17)), first 7 channels, flattened as (C, H, W).
        """
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        # the 1x1 branch again on its own (a cheap 1x1 conv), so the block itself stays as in the paper
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].flatten(1)  # (B, 7 * 17 * 17)
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048): "pool3"
        return {"pool": pool, "logits": pool @ self.fc.weight.T, "spatial": spatial}


def expected_keys() -> str:
    """The keys that name a weight file of either layout, for error messages."""
    return ("an Inception-v3 state dict with torchvision's names ('Conv2d_1a_3x3.conv.weight', "
            "'Mixed_5b.branch_pool.conv.weight', ..., 'Mixed_7c.branch_pool.conv.weight') and 'fc.weight' of shape "
            "(1008, 2048) (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) or (1000, 2048) (torchvision)")


def inception_from_state_dict(state: dict[str, torch.Tensor], source: str = "state_dict") -> InceptionV3:
    """Build the layout the weights are in (read from ``fc.weight``'s class count) and load them strictly."""
    fc = state.get("fc.weight")
    variant = next((v for v, n in VARIANTS.items() if fc is not None and tuple(fc.shape) == (n, 2048)), None)
    if variant is None:
        found = sorted(state)[:4]
        raise ValueError(f"{source} is not accepted; expected {expected_keys()}; found keys {found}"
                         + (f" and fc.weight of shape {tuple(fc.shape)}" if fc is not None else ""))
    net = InceptionV3(variant)
    own = net.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}  # torchvision's training head
    # BatchNorm's step counters: absent from files saved by older PyTorch, and unused in eval mode
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} is not accepted; expected {expected_keys()}; missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    net.load_state_dict(state)
    return net.eval()
