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
    replaced one by one; any other non-empty folder is refused.
    """
    from tilefuse.pipelines.evaluate import evaluate, write_json
    from tilefuse.pipelines.export import export
    from tilefuse.pipelines.info import info
    from tilefuse.pipelines.ingest import ingest
    from tilefuse.pipelines.predict import predict
    from tilefuse.pipelines.synth import synth
    from tilefuse.pipelines.train import train

    from tilefuse.outputs import claim, create, found_kind

    out = Path(out)
    claim(out, "demo", overwrite=overwrite)  # reuses only a demo folder tilefuse made; each output inside is guarded
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
        steps=steps, batch_size=4, patch_size=128, lr=1e-3, workers=0, overwrite=True, progress=True,
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
    size: Annotated[int, typer.Option(help="Edge of each synthetic scene in px.")] = 1024,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
    cluster: Annotated[str, typer.Option(help="Cluster for prediction: sync, local:N, cuda, tcp://...")] = "local:2",
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Reuse a non-empty output folder.")] = True,
) -> None:
    """Run the whole pipeline on built-in synthetic scenes (a few minutes on a laptop)."""
    demo(out, size=size, steps=steps, cluster=cluster, overwrite=overwrite, echo=typer.echo)
