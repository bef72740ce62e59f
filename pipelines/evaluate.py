"""``tilefuse evaluate``: score a prediction store against a scene store's labels, block by block.

Memory stays at a few blocks whatever the scene size: predicted and true
labels are read one aligned block at a time into a streaming confusion matrix
(:class:`tilefuse.metrics.ConfusionMatrix`), then reduced to OA, mIoU,
per-class IoU and F1, and Cohen's kappa.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from tilefuse.errors import InputError


def evaluate(
    prediction: str | Path,
    labels: str | Path,
    *,
    block: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of prediction store ``prediction`` against the ``label`` of scene store ``labels``.

    Pixels whose label is 255 or that are not ``valid`` in the scene are
    ignored; labelled pixels the prediction leaves at 255 are counted as
    ``unscored_pixels``. The grids must match, and the prediction must be
    complete. Returns a JSON-ready dict.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from tilefuse.metrics import ConfusionMatrix
    from tilefuse.prediction import open_prediction
    from tilefuse.scene import IGNORE, SHARD, iter_chunk_slices, open_scene

    predicted = open_prediction(prediction)
    scene = open_scene(labels)
    if "label" not in scene:
        raise InputError(f"{labels} has no labels to evaluate against: ingest it with --labels PATH")
    if "labels" not in predicted:
        raise InputError(f"{prediction} holds no 'labels': it is not a finished prediction, rerun `tilefuse predict`")
    shape = (scene.sizes["y"], scene.sizes["x"])
    if (predicted.sizes["y"], predicted.sizes["x"]) != shape or not (
        np.allclose(predicted["x"].values, scene["x"].values) and np.allclose(predicted["y"].values, scene["y"].values)
    ):
        raise InputError(
            f"{prediction} ({predicted.sizes['y']} x {predicted.sizes['x']}) is not on the grid of {labels} "
            f"({shape[0]} x {shape[1]}): evaluate a prediction of that scene"
        )
    if predicted.rio.crs != scene.rio.crs:
        raise InputError(f"{prediction} has CRS {predicted.rio.crs}, {labels} has {scene.rio.crs}: evaluate a prediction of that scene")
    class_names = list(scene["label"].attrs.get("class_names") or predicted["labels"].attrs.get("class_names") or [])
    confusion = ConfusionMatrix(len(class_names) or IGNORE)
    step = block or SHARD
    for rows, cols in tqdm(iter_chunk_slices(shape, (step, step)), desc="evaluate", unit="block", disable=not progress):
        window = {"y": rows, "x": cols}
        target = scene["label"].isel(window).values
        valid = scene["valid"].isel(window).values
        confusion.update(predicted["labels"].isel(window).values, np.where(valid, target, IGNORE))
    metrics = confusion.compute(class_names)
    metrics["prediction"], metrics["labels"] = str(prediction), str(labels)
    return metrics


def evaluate_command(
    prediction: Annotated[Path, typer.Argument(help="Prediction store written by `tilefuse predict`.")],
    labels: Annotated[Path, typer.Option("--labels", help="Scene store whose `label` is the truth.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the metrics to this JSON file.")] = None,
) -> None:
    """Score a prediction against a scene's labels: OA, mIoU, per-class IoU and F1, kappa."""
    from tilefuse.metrics import format_metrics

    metrics = evaluate(prediction, labels, progress=not json_output)
    if out is not None:
        tmp = out.parent / f".{out.name}.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(out)
    typer.echo(json.dumps(metrics, indent=2) if json_output else format_metrics(metrics))
