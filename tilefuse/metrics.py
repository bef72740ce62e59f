"""Segmentation metrics from a streaming confusion matrix.

:class:`ConfusionMatrix` accumulates integer counts block by block (a huge
prediction store) or batch by batch (validation), so memory never depends on
the scene; :meth:`ConfusionMatrix.compute` turns them into overall accuracy,
per-class and mean IoU and F1, and Cohen's kappa, as a plain dict. Conventions
follow torchmetrics (``ignore_index=255``; classes absent from both target and
prediction do not enter the means), which the tests check.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from tilefuse.errors import InputError
from tilefuse.scene import IGNORE


class ConfusionMatrix:
    """Counts of (target class, predicted class) pairs; pixels whose target is ``ignore_index`` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.unscored = 0
        """Labelled pixels with no prediction (``ignore_index`` in the prediction)."""

    def update(self, prediction: Any, target: Any) -> "ConfusionMatrix":
        """Add a block or batch: integer arrays (numpy or torch) of the same shape."""
        prediction, target = _numpy(prediction).ravel(), _numpy(target).ravel()
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
        scored = target != self.ignore_index
        predicted = prediction != self.ignore_index
        self.unscored += int(np.count_nonzero(scored & ~predicted))
        keep = scored & predicted
        t, p = target[keep].astype(np.int64), prediction[keep].astype(np.int64)
        if t.size:
            high = max(int(t.max()), int(p.max()))
            if high >= self.num_classes or min(int(t.min()), int(p.min())) < 0:
                raise InputError(f"class id {high} is outside the {self.num_classes} classes: labels and prediction do not match")
            self.matrix += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
                self.num_classes, self.num_classes
            )
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self.matrix += other.matrix
        self.unscored += other.unscored
        return self

    def compute(self, class_names: Sequence[str] = ()) -> dict[str, Any]:
        """OA, mIoU, mean F1, kappa and per-class IoU / F1 / support as a JSON-ready dict."""
        m = self.matrix.astype(np.float64)
        total = m.sum()
        tp = np.diag(m)
        support, predicted = m.sum(axis=1), m.sum(axis=0)
        union = support + predicted - tp
        present = union > 0
        iou = np.divide(tp, union, out=np.full_like(tp, np.nan), where=present)
        f1 = np.divide(2 * tp, support + predicted, out=np.full_like(tp, np.nan), where=present)
        oa = tp.sum() / total if total else math.nan
        expected = (support * predicted).sum() / total**2 if total else math.nan
        kappa = (oa - expected) / (1 - expected) if total and expected < 1 else math.nan  # undefined for one class
        names = [class_names[k] if k < len(class_names) else str(k) for k in range(self.num_classes)]
        return {
            "pixels": int(total),
            "unscored_pixels": int(self.unscored),
            "overall_accuracy": _float(oa),
            "mean_iou": _float(iou[present].mean()) if present.any() else None,
            "mean_f1": _float(f1[present].mean()) if present.any() else None,
            "kappa": _float(kappa),
            "per_class": {
                names[k]: {"iou": _float(iou[k]), "f1": _float(f1[k]), "support": int(support[k])}
                for k in range(self.num_classes)
                if present[k]
            },
        }


def _numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A table for humans: the summary line, then IoU / F1 / support per class."""

    def pct(value: float | None) -> str:
        return "   -  " if value is None else f"{100 * value:6.2f}"

    lines = [
        f"pixels {metrics['pixels']:,}   OA {pct(metrics['overall_accuracy']).strip()}%   "
        f"mIoU {pct(metrics['mean_iou']).strip()}%   mF1 {pct(metrics['mean_f1']).strip()}%   "
        f"kappa {metrics['kappa'] if metrics['kappa'] is None else round(metrics['kappa'], 4)}",
    ]
    if metrics.get("unscored_pixels"):
        lines.append(f"labelled pixels without a prediction (not scored): {metrics['unscored_pixels']:,}")
    width = max([5, *(len(n) for n in metrics["per_class"])])
    lines.append(f"{'class':<{width}}  IoU %   F1 %   support")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<{width}} {pct(row['iou'])} {pct(row['f1'])}  {row['support']:>8,}")
    return "\n".join(lines)
