"""Classifier accuracy: top-k on a dataset, and how often a classifier agrees with the labels samples were
generated for (a quick check of class-conditional generation)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from visionformers._validate import check_device, check_tensor, fail
from visionformers.metrics.features import iter_image_batches, model_device


@dataclass(frozen=True)
class AccuracyResult:
    """Top-k accuracies (fractions in [0, 1]) with the number of samples they were measured on."""

    num_samples: int
    accuracies: dict[int, float] = field(default_factory=dict)  # k -> fraction; k > num_classes left out

    @property
    def top1(self) -> float | None:
        return self.accuracies.get(1)

    @property
    def top5(self) -> float | None:
        return self.accuracies.get(5)

    def __str__(self) -> str:
        parts = ", ".join(f"top-{k} {100 * v:.2f}%" for k, v in sorted(self.accuracies.items()))
        return f"{parts} (n={self.num_samples})"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the k largest logits, for each k <= num_classes."""
    check_tensor("logits", logits, ndim=2)
    check_tensor("labels", labels, ndim=1, integer=True)
    if labels.shape[0] != logits.shape[0]:
        fail("labels", labels, f"one label per row of logits ({logits.shape[0]})")
    ks = [k for k in topk if k <= logits.shape[1]]
    if not ks:
        return {}
    pred = logits.topk(max(ks), dim=1).indices  # (B, kmax), best first
    hit = pred == labels.to(pred.device).unsqueeze(1)  # (B, kmax)
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in ks}


def classifier_accuracy(
    model: Callable[[torch.Tensor], torch.Tensor],
    data,
    topk: Sequence[int] = (1, 5),
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> AccuracyResult:
    """Top-k accuracy of ``model`` (images -> logits) over labelled ``data``.

    ``data``: an ``(images, labels)`` tuple of tensors, a Dataset of {"pixel_values", "label"} dicts or
    (image, label) tuples, or a DataLoader over them. The model is put in eval mode (and left there).
    """
    if isinstance(topk, int) or not topk or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in topk):
        fail("topk", topk, "a non-empty sequence of positive ints, e.g. (1, 5)")
    if isinstance(model, torch.nn.Module):
        model.eval()
    device = check_device("device", device) if device is not None else model_device(model)
    totals: dict[int, int] = {}
    n = 0
    with torch.no_grad():
        for images, labels in iter_image_batches(data, batch_size):
            if labels is None:
                fail("data", type(data).__name__, "labelled data: (images, labels) or items with a 'label'")
            logits = model(images.to(device))
            for k, c in topk_correct(logits, labels.long(), topk).items():
                totals[k] = totals.get(k, 0) + c
            n += labels.shape[0]
    if n == 0:
        fail("data", type(data).__name__, "at least one labelled image")
    return AccuracyResult(n, {k: c / n for k, c in sorted(totals.items())})


def conditional_sample_accuracy(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    samples: torch.Tensor,
    intended_labels: torch.Tensor,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> AccuracyResult:
    """Fraction of class-conditional ``samples`` (N, C, H, W) that ``classifier`` assigns to the class they
    were generated for (top-1, and top-5 when there are >= 5 classes)."""
    check_tensor("samples", samples, ndim=4, floating=True)
    check_tensor("intended_labels", intended_labels, ndim=1, integer=True)
    return classifier_accuracy(classifier, (samples, intended_labels), (1, 5), batch_size, device)
