"""``tilefuse demo``: the whole job on built-in synthetic scenes, end to end.

synth (GeoTIFFs) -> ingest -> info + quicklook -> train a small PAD -> predict
on a second, unseen scene -> evaluate -> export a COG + quicklook. Sized to
finish in a few minutes on a 2-core laptop; every step is the same public
function a user calls (``tilefuse.ingest``, ``tilefuse.train``, ...).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from tilefuse.errors import InputError

PATCH = 128
"""Edge in px of the patches the demo's small PAD trains on."""
MIN_SIZE = 2 * PATCH
"""Smallest scene edge the demo runs on. The training split holds out blocks one patch wide for validation
(:func:`tilefuse.training_data.default_block`) and draws only from blocks a whole patch fits: a scene needs two
such blocks across, or the one it holds out is all there is to train on ("the split leaves nothing to train on",
after the scenes were already written)."""

OUTPUTS = (
    ("train-synth.zarr", "scene", ("train-tif",)),
    ("train-tif", "geotiff-folder", ()),
    ("test-synth.zarr", "scene", ("test-tif",)),
    ("test-tif", "geotiff-folder", ()),
    ("train.zarr", "scene", ("train-tif/optical.tif", "train-tif/sar.tif", "train-tif/label.tif")),
    ("test.zarr", "scene", ("test-tif/optical.tif", "test-tif/sar.tif", "test-tif/label.tif")),
    ("train-scene.png", "png", ("train.zarr",)),
    ("run", "run", ("train.zarr",)),
    ("prediction.zarr", "prediction", ("test.zarr", "run")),
    ("prediction.png", "png", ("test.zarr", "run", "prediction.zarr")),
    ("metrics.json", "json", ("prediction.zarr", "test.zarr")),
    ("prediction.tif", "geotiff", ("prediction.zarr",)),
)
"""Every output the demo writes in its folder: (name, kind of :mod:`tilefuse.outputs`, the names it is made from)."""


def check_demo(out: Path, *, size: int, steps: int, cluster: object, overwrite: bool) -> None:
    """Refuse, in one line and before anything is written, what would stop the demo part way: the folder ``out``
    in the way, a ``size`` too small to train on (or too large), ``steps`` that are no count, a ``cluster``
    predict refuses by its form, and any file or folder in ``out`` where the demo writes one (:data:`OUTPUTS`;
    a user's ``metrics.json`` was found only at the end, after the stores, run and prediction were replaced)."""
    from tilefuse.outputs import claim
    from tilefuse.rasters import check_grid_size

    claim(out, "demo", overwrite=overwrite)  # reuses only a demo folder tilefuse made
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise InputError(
            f"size= (--size) must be a whole number of px >= {MIN_SIZE}, got {size!r}: the demo trains on {PATCH} px "
            f"patches and holds out blocks of them to validate; pass --size {MIN_SIZE} or more"
        )
    check_grid_size(size, size, what="each synthetic scene", fix="choose a smaller size= (--size)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps= (--steps) must be a whole number >= 1, got {steps!r}")
    _check_cluster(cluster)
    for name, kind, sources in OUTPUTS:
        try:
            claim(out / name, kind, inputs=[out / source for source in sources], overwrite=True, what="demo output")
        except InputError as error:
            text, tail = str(error), "choose another output path"
            if text.endswith(tail):  # the demo names the paths in out: the user chooses only out
                fix = "choose another demo folder" if text.endswith(f"or {tail}") else f"move it out of {out}, or choose another demo folder"
                text = text[: -len(tail)] + fix
            raise InputError(text) from None


def _check_cluster(cluster: object) -> None:
    """Refuse a ``cluster`` spec that predict refuses by its form alone (:func:`tilefuse.cluster.client.make_client`),
    or a scheduler file it cannot read, before the demo writes scenes and trains for minutes."""
    if not isinstance(cluster, str):
        return  # a Client or cluster object (Python): predict checks it
    from tilefuse.cluster.client import SPECS, _local_workers, read_scheduler_file
    from tilefuse.outputs import local_path

    spec = cluster.strip()
    if spec in ("sync", "cuda"):
        return
    if spec == "local" or spec.startswith("local:"):
        _local_workers(spec)
        return
    scheme, sep, _ = spec.partition("://")
    if sep and scheme.lower() in ("tcp", "tls", "ucx", "inproc"):
        return
    if not sep and spec:
        path = local_path(spec, "scheduler file")
        if path.suffix == ".json" or path.is_file():
            read_scheduler_file(path)
            return
    raise InputError(f"unknown cluster spec {spec!r} (cluster=, --cluster): use {SPECS}")


def demo(
    out: str | Path,
    *,
    size: int = 1024,
    steps: int = 300,
    cluster: str = "local:2",
    overwrite: bool = False,
    echo=print,
) -> dict:
    """Run the demo into folder ``out``; returns the held-out scene's metrics.

    ``out`` is a guarded output of kind ``demo`` (:mod:`tilefuse.outputs`):
    with ``overwrite`` a demo folder tilefuse made is reused, its outputs
    replaced one by one; any other non-empty folder is refused. ``size`` is at
    least :data:`MIN_SIZE` px. All of it, and every output in ``out``
    (:data:`OUTPUTS`), is checked before anything is written (:func:`check_demo`).
    """
    from tilefuse.pipelines.evaluate import evaluate, write_json
    from tilefuse.pipelines.export import export
    from tilefuse.pipelines.info import info
    from tilefuse.pipelines.ingest import ingest
    from tilefuse.pipelines.predict import predict
    from tilefuse.pipelines.synth import synth
    from tilefuse.pipelines.train import train

    from tilefuse.outputs import create, found_kind, local_path

    out = local_path(out, "out", output=True)  # a URL is refused, ~ is the home folder
    check_demo(out, size=size, steps=steps, cluster=cluster, overwrite=overwrite)  # before anything is written
    if found_kind(out) != "demo":
        with create(out, "demo"):
            pass  # an empty, marked demo folder
    started = time.perf_counter()

    def step(message: str) -> None:
        echo(f"[{time.perf_counter() - started:6.1f} s] {message}")

    step(f"synth: two {size}x{size} SAR + optical scenes (train: seed 0, held-out test: seed 1), as GeoTIFFs")
    for name, seed in (("train", 0), ("test", 1)):
        synth(out / f"{name}-synth.zarr", size, "sar-optical", seed, geotiff=out / f"{name}-tif", overwrite=True)

    stores = {}
    for name in ("train", "test"):
        step(f"ingest: {name}-tif/*.tif -> {name}.zarr")
        tifs = out / f"{name}-tif"
        stores[name] = ingest(
            out / f"{name}.zarr",
            {"optical": tifs / "optical.tif", "sar": tifs / "sar.tif"},
            labels=tifs / "label.tif",
            overwrite=True,
        )
    echo(info(stores["train"], quicklook=out / "train-scene.png"))
    step(f"quicklook: {out / 'train-scene.png'}")

    step(f"train: PAD (small CPU preset), {steps} steps on train.zarr")
    # small patches, batch and a higher learning rate: a few minutes on 2 CPU cores
    run = train(
        "pad", [stores["train"]], out / "run",
        steps=steps, batch_size=4, patch_size=PATCH, lr=1e-3, workers=0, overwrite=True, progress=True,
    )

    step(f"predict: test.zarr with {run} on cluster {cluster}")
    predict(
        run, stores["test"], out / "prediction.zarr",
        cluster=cluster, overwrite=True, quicklook=out / "prediction.png",
    )
    step("evaluate: prediction.zarr against test.zarr labels (a scene the model never saw)")
    metrics = evaluate(out / "prediction.zarr", stores["test"])
    write_json(metrics, out / "metrics.json")
    step("export: prediction.tif (Cloud Optimized GeoTIFF)")
    export(out / "prediction.zarr", out / "prediction.tif", overwrite=True)
    step(
        f"done: held-out OA {metrics['overall_accuracy']:.3f}, mIoU {metrics['mean_iou']:.3f}, "
        f"kappa {metrics['kappa']:.3f}; outputs in {out}"
    )
    return metrics


def demo_command(
    out: Annotated[Path, typer.Argument(help="Folder for every output of the demo.")] = Path("demo-output"),
    size: Annotated[int, typer.Option(help=f"Edge of each synthetic scene in px (at least {MIN_SIZE}).")] = 1024,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
    cluster: Annotated[str, typer.Option(help="Cluster for prediction: sync, local:N, cuda, tcp://...")] = "local:2",
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Reuse a non-empty output folder.")] = True,
) -> None:
    """Run the whole pipeline on built-in synthetic scenes (a few minutes on a laptop)."""
    demo(out, size=size, steps=steps, cluster=cluster, overwrite=overwrite, echo=typer.echo)
