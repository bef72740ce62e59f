"""ConfusionMatrix metrics agree with torchmetrics and with hand-computed values."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCohenKappa,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

from tilefuse.errors import InputError
from tilefuse.metrics import ConfusionMatrix, format_metrics
from tilefuse.scene import IGNORE


def test_streamed_blocks_agree_with_torchmetrics():
    k = 5
    rng = np.random.default_rng(0)
    target = rng.integers(0, k - 1, size=(300, 200))  # class 4 never in the target...
    prediction = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, k - 1, size=target.shape))
    prediction[:3, :3] = 4  # ...but predicted a few times
    target[rng.random(target.shape) < 0.1] = IGNORE
    confusion = ConfusionMatrix(k)
    for rows in np.array_split(np.arange(300), 7):  # block by block
        confusion.update(prediction[rows], torch.from_numpy(target[rows]))
    metrics = confusion.compute()

    p, t = torch.from_numpy(prediction).flatten(), torch.from_numpy(target).flatten()
    kwargs = dict(num_classes=k, ignore_index=IGNORE)
    assert metrics["overall_accuracy"] == pytest.approx(MulticlassAccuracy(average="micro", **kwargs)(p, t).item(), abs=1e-6)
    assert metrics["mean_iou"] == pytest.approx(MulticlassJaccardIndex(average="macro", **kwargs)(p, t).item(), abs=1e-6)
    assert metrics["mean_f1"] == pytest.approx(MulticlassF1Score(average="macro", **kwargs)(p, t).item(), abs=1e-6)
    assert metrics["kappa"] == pytest.approx(MulticlassCohenKappa(**kwargs)(p, t).item(), abs=1e-5)
    per_class_iou = MulticlassJaccardIndex(average="none", **kwargs)(p, t)
    per_class_f1 = MulticlassF1Score(average="none", **kwargs)(p, t)
    for c in range(k):
        assert metrics["per_class"][str(c)]["iou"] == pytest.approx(per_class_iou[c].item(), abs=1e-6)
        assert metrics["per_class"][str(c)]["f1"] == pytest.approx(per_class_f1[c].item(), abs=1e-6)
    assert metrics["pixels"] == int((target != IGNORE).sum())


def test_hand_computed_two_class_example():
    # target: 0 0 0 1 1 1 1 1 ; prediction: 0 0 1 1 1 1 0 1
    confusion = ConfusionMatrix(3).update([0, 0, 1, 1, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1, 1, 1])
    m = confusion.compute(["land", "water", "cloud"])
    # TP land 2, FP land 1, FN land 1 -> IoU 2/4, F1 4/6; water TP 4, FP 1, FN 1 -> IoU 4/6, F1 8/10
    assert m["overall_accuracy"] == pytest.approx(6 / 8)
    assert m["per_class"]["land"]["iou"] == pytest.approx(0.5)
    assert m["per_class"]["water"]["iou"] == pytest.approx(4 / 6)
    assert m["mean_iou"] == pytest.approx((0.5 + 4 / 6) / 2)
    assert m["per_class"]["water"]["f1"] == pytest.approx(0.8)
    pe = (3 * 3 + 5 * 5) / 64
    assert m["kappa"] == pytest.approx((0.75 - pe) / (1 - pe))
    assert "cloud" not in m["per_class"]  # absent from target and prediction
    table = format_metrics(m)
    assert "land" in table and "water" in table and "75.00" in table


def test_unpredicted_pixels_are_reported_and_bad_classes_refused():
    confusion = ConfusionMatrix(2).update(np.array([0, IGNORE, 1, IGNORE]), np.array([0, 1, IGNORE, IGNORE]))
    m = confusion.compute()
    assert m["pixels"] == 1 and m["unscored_pixels"] == 1
    with pytest.raises(InputError, match="class id 3"):
        ConfusionMatrix(2).update(np.array([3]), np.array([0]))
    empty = ConfusionMatrix(2).compute()
    assert empty["pixels"] == 0 and empty["overall_accuracy"] is None and empty["kappa"] is None


def test_merge_equals_single_pass():
    rng = np.random.default_rng(1)
    p, t = rng.integers(0, 3, 1000), rng.integers(0, 3, 1000)
    whole = ConfusionMatrix(3).update(p, t)
    merged = ConfusionMatrix(3).update(p[:400], t[:400]).merge(ConfusionMatrix(3).update(p[400:], t[400:]))
    np.testing.assert_array_equal(whole.matrix, merged.matrix)
