"""Inception Score (Salimans et al. 2016, Sec. 4): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

As the reference code (openai/improved-gan ``inception_score/model.py``, reused by ADM's evaluator): softmax of the
2015 Inception graph's 1008 logits (pool3 @ W, without the bias), the samples cut into ``splits`` consecutive
parts (10 for the standard 50,000 images), the score computed in each part, mean and std over parts reported.
"""
from __future__ import annotations

import numpy as np
import torch

from visionformers._validate import check_int, fail


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` parts of (N, classes) logits, N >= splits."""
    check_int("splits", splits)
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim != 2 or z.shape[0] < splits:
        fail("logits", f"array of shape {tuple(z.shape)}", f"an (N, classes) array with N >= splits={splits}")
    log_p = torch.log_softmax(z, dim=1)  # log p(y|x), (N, classes)
    n, scores = z.shape[0], []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log p(y), the marginal over the part
        kl = (part.exp() * (part - log_py)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
