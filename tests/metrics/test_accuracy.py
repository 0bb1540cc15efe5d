import pytest
import torch

from visionformers.data import DigitsDataset
from visionformers.metrics import classifier_accuracy, conditional_sample_accuracy, topk_correct


class _NearestValue(torch.nn.Module):
    """Toy classifier: image of constant value v -> logits ranking classes by |c - v - 0.1| (no ties)."""

    def __init__(self, num_classes):
        super().__init__()
        self.register_buffer("classes", torch.arange(num_classes, dtype=torch.float32))

    def forward(self, x):
        v = x.mean(dim=(1, 2, 3))  # (B,)
        return -(self.classes[None] - v[:, None] - 0.1).abs()  # (B, K)


def _expected(values, labels, k, num_classes):
    """Oracle by plain Python sorting."""
    hits = 0
    for v, y in zip(values.tolist(), labels.tolist()):
        order = sorted(range(num_classes), key=lambda c: abs(c - v - 0.1))
        hits += y in order[:k]
    return hits / len(values)


def test_topk_correct_counts_against_a_sorting_oracle():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 10, (50,), generator=g).float()
    labels = torch.randint(0, 10, (50,), generator=g)
    logits = _NearestValue(10)(values.view(-1, 1, 1, 1))
    counts = topk_correct(logits, labels, (1, 3, 5))
    for k in (1, 3, 5):
        assert counts[k] / 50 == pytest.approx(_expected(values, labels, k, 10))
    assert topk_correct(logits[:, :4], labels.clamp(max=3), (1, 5)).keys() == {1}  # k > classes is left out


def test_classifier_accuracy_on_tensors_with_known_corruption():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (200,), generator=g)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    wrong = labels.clone()
    wrong[:50] = (wrong[:50] + 5) % 10  # 50 of 200 labels are far from their image
    result = classifier_accuracy(_NearestValue(10), (images, wrong), batch_size=64)
    assert result.num_samples == 200
    assert result.top1 == pytest.approx(150 / 200)
    assert result.top5 == pytest.approx(_expected(labels.float(), wrong, 5, 10))
    assert "n=200" in str(result) and "top-1 75.00%" in str(result)


def test_accuracy_on_a_dict_dataset_and_a_loader():
    ds = DigitsDataset("test", image_size=8)
    # a "classifier" that reads the label from a lookup of the exact image: 100% by construction
    table = {tuple(x.flatten().tolist()): y for x, y in zip(ds.images, ds.labels.tolist())}
    oracle = lambda x: torch.nn.functional.one_hot(  # noqa: E731
        torch.tensor([table[tuple(im.flatten().tolist())] for im in x]), 10).float()
    assert classifier_accuracy(oracle, ds).top1 == 1.0
    loader = torch.utils.data.DataLoader(ds, batch_size=100)
    assert classifier_accuracy(oracle, loader, topk=(1,)).accuracies == {1: 1.0}


def test_conditional_sample_accuracy():
    intended = torch.arange(10).repeat(3)  # (30,)
    drawn = intended.clone()
    drawn[::3] = (drawn[::3] + 5) % 10  # every third sample came out as another class
    samples = drawn.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    result = conditional_sample_accuracy(_NearestValue(10), samples, intended)
    assert result.top1 == pytest.approx(20 / 30) and result.num_samples == 30


def test_accuracy_argument_errors():
    with pytest.raises(ValueError, match="labelled"):
        classifier_accuracy(_NearestValue(3), torch.zeros(4, 1, 2, 2))
    with pytest.raises(ValueError, match="topk"):
        classifier_accuracy(_NearestValue(3), (torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long)), topk=(0,))
    with pytest.raises(ValueError, match="intended_labels"):
        conditional_sample_accuracy(_NearestValue(3), torch.zeros(4, 1, 2, 2), torch.zeros(4))
