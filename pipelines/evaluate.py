"""``tilefuse evaluate``: score a prediction store against a scene store's labels, block by block.

Memory stays at a few blocks whatever the scene size: predicted and true
labels are read one aligned block at a time into a streaming confusion matrix
(:class:`tilefuse.metrics.ConfusionMatrix`), then reduced to OA, mIoU,
per-class IoU and F1, and Cohen's kappa.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from tilefuse.errors import InputError, clipped, printable

if TYPE_CHECKING:
    import xarray as xr


def evaluate(
    prediction: str | Path,
    labels: str | Path,
    *,
    split: str | Path | None = None,
    subset: str | None = None,
    block: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of prediction store ``prediction`` against the ``label`` of scene store ``labels``.

    Pixels whose label is 255 or that are not ``valid`` in the scene are
    ignored; labelled pixels the prediction leaves at 255 are counted as
    ``unscored_pixels``. The grids must match, and the prediction must be
    complete. ``split`` (a training run folder or its ``split.json``) limits
    scoring to the pixels of ``subset`` whose context (the run's patch or
    neighbourhood radius) lies wholly in that subset's blocks (``test`` unless
    given; ``train``, ``val`` or ``test``; without ``split`` it is refused, not
    ignored). Returns a JSON-ready dict.

    Where ``labels`` holds the modalities the prediction was computed from and
    they are not that scene's (another acquisition on the same grid, told by
    the prediction's recorded ``scene_digest``), one note on stderr says so;
    the scores are computed all the same (the labels may be right for it).
    """
    import numpy as np
    from tqdm.auto import tqdm

    from tilefuse.classes import merge_class_names, store_class_names
    from tilefuse.cluster.run import MAX_BLOCK
    from tilefuse.metrics import ConfusionMatrix
    from tilefuse.prediction import open_prediction, store_path
    from tilefuse.sampling.split import SUBSETS
    from tilefuse.scene import IGNORE, SHARD, iter_chunk_slices, open_scene

    known = subset is None or (isinstance(subset, str) and subset in SUBSETS)
    if subset is not None and split is None:  # the whole scene would be scored as if it were that subset
        raise InputError(
            f"subset={clipped(repr(subset))} (--subset) needs split= (--split RUN): the training run whose held-out blocks "
            f"to score{'' if known else '; and subset= is one of ' + ', '.join(SUBSETS)}"
        )
    if not known:  # '' was read as test
        raise InputError(f"subset= (--subset) must be one of {', '.join(SUBSETS)}, got {clipped(repr(subset))}")
    prediction, labels = store_path(prediction, "prediction", "prediction"), store_path(labels, "labels", "scene")
    if split is not None:
        from tilefuse.outputs import local_path

        split = local_path(split, "split")  # ~ is the home folder
    subset = "test" if subset is None else subset
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= MAX_BLOCK):
        raise InputError(f"block= must be a whole number of px in 1..{MAX_BLOCK} (rows and columns read at once), got {clipped(repr(block))}")
    predicted = open_prediction(prediction)
    scene = open_scene(labels)
    if "label" not in scene:
        raise InputError(f"{labels} has no labels to evaluate against: ingest it with --labels PATH")
    if "labels" not in predicted:
        raise InputError(f"{prediction} holds no 'labels': it is not a finished prediction, rerun `tilefuse predict`")
    shape = (scene.sizes["y"], scene.sizes["x"])
    if (predicted.sizes["y"], predicted.sizes["x"]) != shape or not _same_grid(predicted, scene):
        raise InputError(
            f"{prediction} ({predicted.sizes['y']} x {predicted.sizes['x']}) is not on the grid of {labels} "
            f"({shape[0]} x {shape[1]}): evaluate a prediction of that scene"
        )
    if predicted.rio.crs != scene.rio.crs:
        raise InputError(f"{prediction} has CRS {predicted.rio.crs}, {labels} has {scene.rio.crs}: evaluate a prediction of that scene")
    note = _other_scene(predicted.attrs, prediction, labels, scene)
    if note:  # not an error: the same place's labels may come with another acquisition; never in the metrics (--json)
        print(printable(f"tilefuse: note: {note}"), file=sys.stderr)
    # the scene's ids may be a subset of the model's classes: one list covering both, real names agreeing
    class_names = merge_class_names(
        [(str(prediction), [str(n) for n in predicted["labels"].attrs.get("class_names") or []]), (str(labels), store_class_names(scene))],
        fix="evaluate against labels of the classes the model was trained on",
    )
    confusion = ConfusionMatrix(len(class_names) or IGNORE)
    in_subset = _subset_mask(split, subset, labels, shape) if split is not None else None
    step = block or SHARD
    for rows, cols in tqdm(iter_chunk_slices(shape, (step, step)), desc="evaluate", unit="block", disable=not progress):
        window = {"y": rows, "x": cols}
        target = scene["label"].isel(window).values
        valid = scene["valid"].isel(window).values
        if in_subset is not None:
            valid = valid & in_subset(rows, cols)
        confusion.update(predicted["labels"].isel(window).values, np.where(valid, target, IGNORE))
    metrics = confusion.compute(class_names)
    if in_subset is None and not metrics["pixels"] + metrics["unscored_pixels"]:  # metrics of nothing read as a score
        raise InputError(f"{labels} has no labelled pixel where it is valid: nothing to score; evaluate against a store with labels there")
    if in_subset is not None and not metrics["pixels"] + metrics["unscored_pixels"]:
        block, context = in_subset.block, in_subset.context
        raise InputError(
            f"{split}: no labelled pixel of {labels} in its {subset!r} blocks of {block} px lies {context} px or more inside them "
            f"(the context a sample needs): train with larger blocks, block= (--block) {2 * block} or more, or evaluate without split="
        )
    metrics["prediction"], metrics["labels"] = str(prediction), str(labels)
    if split is not None:
        metrics["split"], metrics["subset"] = str(split), subset
    return metrics


def _same_grid(a: "xr.Dataset", b: "xr.Dataset") -> bool:
    """Whether the pixel centres of ``a`` and ``b`` (of one shape) agree to a thousandth of ``b``'s pixel.

    A relative tolerance would not do: 1e-5 of a UTM northing (5e6 m) is 50 m, five 10 m pixels, and a
    prediction shifted by two rows against its labels was scored as if on their grid.
    """
    import numpy as np

    res_x, res_y = (abs(v) for v in b.rio.resolution())
    return all(
        np.allclose(a[axis].values, b[axis].values, rtol=0, atol=1e-3 * res)
        for axis, res in (("x", res_x), ("y", res_y))
    )


def _modalities_read(attrs: dict[str, Any]) -> list[str] | None:
    """The modalities the prediction with store attrs ``attrs`` read (what its ``scene_digest`` covers), or None.

    The store does not list them: they are the modalities of the recorded ``scene`` store whose digest is the
    recorded one (that store unchanged), else those of the recorded ``checkpoint``'s config (a checkpoint of the
    recorded model). Neither found (moved, deleted, replaced): None.
    """
    from tilefuse.prediction import SCENE_DIGEST
    from tilefuse.scene import modalities, open_scene

    recorded, source, checkpoint = attrs.get(SCENE_DIGEST), attrs.get("scene"), attrs.get("checkpoint")
    if isinstance(source, str) and Path(source).is_dir():
        try:
            original = open_scene(source)
            found = _digest_subset(original, modalities(original), recorded)
        except (InputError, OSError, ValueError, KeyError):
            found = None
        if found is not None:
            return found
    if isinstance(checkpoint, str) and Path(checkpoint).is_dir():
        try:
            from tilefuse.checkpoint import read_config

            config = read_config(checkpoint)  # config.json only, no weights
        except (InputError, OSError, ValueError):
            return None
        if attrs.get("model") in (None, config.model):
            return list(config.modalities)
    return None


def _digest_subset(scene: "xr.Dataset", names: list[str], recorded: Any) -> list[str] | None:
    """The modalities among ``names`` whose :func:`~tilefuse.scene.scene_digest` of ``scene`` is ``recorded``, or
    None. The digest does not depend on their order (its record is written with sorted keys), so each set is tried
    once; metadata only, no pixel read."""
    from tilefuse.scene import scene_digest

    if not isinstance(recorded, str) or len(names) > 8:  # 2^8 digests of attrs at most
        return None
    for count in range(1, len(names) + 1):
        for chosen in itertools.combinations(names, count):
            if scene_digest(scene, list(chosen)) == recorded:
                return list(chosen)
    return None


def _other_scene(attrs: dict[str, Any], prediction: str | Path, labels: str | Path, scene: "xr.Dataset") -> str | None:
    """A note where scene store ``labels`` (opened: ``scene``, already on the prediction's grid) holds the
    modalities the prediction read but is not the scene it was computed from (another date or seed on the same
    grid scored silently); None where it is (moved or re-ingested: the same digest), or where it cannot be told
    (a store made before digests were recorded, a labels-only store, the modalities read unknown)."""
    from tilefuse.prediction import SCENE_DIGEST
    from tilefuse.scene import modalities

    recorded = attrs.get(SCENE_DIGEST)
    have = modalities(scene)
    if not isinstance(recorded, str) or not have:
        return None
    try:
        if _digest_subset(scene, have, recorded) is not None:
            return None
        read = _modalities_read(attrs)
    except (InputError, OSError, ValueError, KeyError):  # damaged statistics: the reads below name them
        return None
    if read is None or not set(read) <= set(have):
        return None
    source = attrs.get("scene")
    source = source if isinstance(source, str) else "unknown"
    same = source != "unknown" and Path(labels).resolve() == Path(source).resolve()
    if not same and source != "unknown" and _statistics_agree(source, scene, read):
        return None  # the scene predicted, written in another chunk layout: its statistics summed in another order
    origin = "replaced at that path since" if same else source
    return (
        f"labels store {labels} is not the scene prediction {prediction} was computed from ({origin}): same grid, but its "
        f"{', '.join(read)} differ; scored against its labels all the same (right if they are labels of the scene predicted)"
    )


def _statistics_agree(source: str, scene: "xr.Dataset", names: list[str]) -> bool:
    """Whether the scene store ``source`` (the one predicted) holds modalities ``names`` as ``scene`` holds them,
    band statistics equal to float precision: the same scene written in another chunk layout sums them in another
    order, and the digest of its exact statistics differs in the last bits."""
    import numpy as np

    from tilefuse.scene import open_scene

    try:
        other = open_scene(source)
        for name in names:
            a, b = other[name], scene[name]
            if a.dtype != b.dtype or a.shape != b.shape or list(a.attrs["band_count"]) != list(b.attrs["band_count"]):
                return False
            if not all(np.allclose(a.attrs[key], b.attrs[key], rtol=1e-9, atol=0) for key in ("band_mean", "band_std")):
                return False
    except (InputError, OSError, KeyError, TypeError, ValueError):
        return False
    return True


def write_json(data: dict[str, Any], out: str | Path, *, inputs=(), overwrite: bool = True) -> Path:
    """Write ``data`` as a JSON file through the guarded writer (:func:`tilefuse.outputs.create`).

    The file carries tilefuse's marker key, so a later run may replace it
    (``overwrite``); any other file or folder at ``out`` is refused. Missing
    parent folders are created, like every output's.
    """
    from tilefuse.outputs import create, json_document

    with create(out, "json", inputs=inputs, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(json_document(data), indent=2))
    return Path(out)


def _recorded_job(path: Path) -> dict[str, Any]:
    """The job the training run holding split file ``path`` recorded (in its ``state/trainer.json``: the split
    file's ``split_sha256``, :meth:`tilefuse.training.RunDir.check_split`, and each store's ``scene_digests``),
    or {}: a split file outside a run folder. Read here without the training engine (and torch); a run saved
    before a key was recorded lacks it, and is not checked for it."""
    try:
        job = json.loads((path.parent / "state" / "trainer.json").read_text())["job"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return job if isinstance(job, dict) else {}


def _check_split_scene(
    path: Path, labels: str | Path, index: int, blocks: tuple[int, int], block: int, shape: tuple[int, int], digests: Any
) -> None:
    """Refuse a labels store that is not the scene the run split in ``path`` was trained on: one of another size
    (an IndexError traceback), or one replaced at the same path (its blocks were scored as held out, though the
    run had never seen that scene). The scene is compared by the digest the run recorded for it (``digests``, by
    store), where it did."""
    fix = "evaluate the store the run was trained on, or evaluate without split="
    if blocks != tuple(-(-n // block) for n in shape):
        raise InputError(f"{labels} is not the scene the run split in {path} was trained on (its size differs from the split's): {fix}")
    if not isinstance(digests, list) or index >= len(digests):
        return  # a split file outside a run folder, or a run saved before the digests were recorded
    recorded = digests[index]
    from tilefuse.scene import modalities, open_scene, scene_digest

    scene = open_scene(labels)
    if scene_digest(scene, modalities(scene), labels=True) != recorded:
        raise InputError(
            f"{labels} is not the scene the run split in {path} was trained on (replaced since: its grid, bands, band "
            f"statistics or labels differ): {fix}"
        )


def _subset_mask(split: str | Path, subset: str, labels: str | Path, shape: tuple[int, int]):
    """``(rows, cols) -> bool mask`` of the pixels a run's split leaves to ``subset`` in store ``labels``."""
    from tilefuse.sampling import SPLIT_FILE, SUBSETS, load_split, split_mask

    path = Path(split)
    path = path / SPLIT_FILE if path.is_dir() else path
    if subset not in SUBSETS:
        raise InputError(f"unknown subset {subset!r}: choose one of {', '.join(SUBSETS)}")
    saved = load_split(path)  # the split file's one reader
    job = _recorded_job(path)
    recorded = job.get("split_sha256")
    if isinstance(recorded, str) and hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        raise InputError(
            f"{path} is not the split its run was trained with (edited since: its SHA-256 differs from the one in the run's "
            "state/trainer.json): restore it, or delete it and resume the run (train --resume) to have it rebuilt"
        )
    layout = saved.split
    stores = [str(Path(p).resolve()) for p in saved.stores]
    if str(Path(labels).resolve()) not in stores:
        raise InputError(f"{labels} is not one of the stores split in {path}: evaluate one of {', '.join(stores)}")
    index = stores.index(str(Path(labels).resolve()))
    _check_split_scene(path, labels, index, layout.assignment[index].shape, layout.block, shape, job.get("scene_digests"))
    if not (layout.assignment[index] == SUBSETS.index(subset)).any():
        raise InputError(f"{path} gives no block of {labels} to {subset!r}: train with --{subset}-fraction > 0 or evaluate another store")
    context = saved.context

    def mask(rows, cols):
        return split_mask(layout, index, subset, rows.start, rows.stop, cols.start, cols.stop, shape, context)

    mask.block, mask.context = layout.block, context
    return mask


def evaluate_command(
    prediction: Annotated[Path, typer.Argument(help="Prediction store written by `tilefuse predict`.")],
    labels: Annotated[Path, typer.Option("--labels", help="Scene store whose `label` is the truth.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    out: Annotated[Optional[str], typer.Option("--out", help="Also write the metrics to this JSON file.", show_default=False)] = None,
    split: Annotated[Optional[Path], typer.Option("--split", help="Training run (or its split.json): score only its held-out blocks.")] = None,
    subset: Annotated[Optional[str], typer.Option("--subset", help="Which blocks of --split to score: train, val or test (default: test).")] = None,
) -> None:
    """Score a prediction against a scene's labels: OA, mIoU, per-class IoU and F1, kappa."""
    from tilefuse.metrics import format_metrics

    if out is not None:  # checked before any work
        from tilefuse.outputs import claim, local_path

        out = local_path(out, "--out", output=True, file=True)  # ~ is the home folder (`--out=~/m.json` leaves it to us)
        claim(out, "json", inputs=[prediction, labels, split], overwrite=True, what="--out")
    metrics = evaluate(prediction, labels, split=split, subset=subset, progress=not json_output)
    if out is not None:
        write_json(metrics, out, inputs=[prediction, labels, split])
    typer.echo(json.dumps(metrics, indent=2) if json_output else format_metrics(metrics))
