"""``tilefuse synth``: write a synthetic multimodal scene store (and optionally GeoTIFFs).

Python API: :func:`synth` writes the store and returns its path; the lazy
scene itself is :func:`tilefuse.synthetic.synth_scene`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from tilefuse.errors import printable


def synth(
    out: str | Path,
    size: int | tuple[int, int] = 1024,
    kind: str = "sar-optical",
    seed: int = 0,
    *,
    geotiff: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic scene of ``size`` px (``kind`` sar-optical or hsi-lidar) to the store ``out``.

    With ``geotiff``, also write one GeoTIFF per modality plus ``label.tif``
    into that folder (to exercise ``tilefuse ingest``). Returns the store path.
    Both are guarded outputs (:mod:`tilefuse.outputs`): ``overwrite`` replaces
    only a scene store / GeoTIFF folder written by tilefuse, and neither may be
    at, inside or around the other.
    """
    from tilefuse.outputs import claim, local_path, output_lock
    from tilefuse.errors import InputError
    from tilefuse.rasters import check_grid_size
    from tilefuse.scene import write_scene
    from tilefuse.synthetic import synth_scene, write_geotiffs

    out = local_path(out, "output", output=True)  # a URL is refused, ~ is the home folder
    geotiff = None if geotiff is None else local_path(geotiff, "GeoTIFF folder", output=True)
    claim(out, "scene", overwrite=overwrite, inputs=[geotiff])
    if geotiff is not None:
        claim(geotiff, "geotiff-folder", overwrite=overwrite, what="GeoTIFF folder")
    height, width = (size, size) if isinstance(size, int) else (tuple(size) if isinstance(size, (tuple, list)) and len(size) == 2 else (size, size))
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in (height, width)):
        raise InputError(f"size= (--size) must be a whole number of px >= 1, got {size!r}")
    check_grid_size(width, height, what="the synthetic scene", fix="choose a smaller --size")
    ds = synth_scene(size, kind, seed)
    if geotiff is None:
        return write_scene(ds, out, overwrite=overwrite, progress=progress)
    # both outputs locked for the whole run: a second synth into either is refused before it writes anything
    # (it wrote its GeoTIFFs, then met the store's lock: a folder of another seed's scene beside the store)
    with output_lock(out, inputs=[geotiff]), output_lock(geotiff, inputs=[out]):
        existed = os.path.lexists(geotiff)
        write_geotiffs(ds, geotiff, overwrite=overwrite, progress=progress, inputs=[out])
        try:
            return write_scene(ds, out, overwrite=overwrite, progress=progress)
        except BaseException:
            if not existed:  # ours, made by this run: no GeoTIFFs of a scene that was not written
                shutil.rmtree(geotiff, ignore_errors=True)
            raise


def synth_command(
    out: Annotated[Path, typer.Argument(help="Scene store to write (zarr).")],
    size: Annotated[int, typer.Option(help="Scene edge in pixels (the scene is SIZE x SIZE).")] = 1024,
    kind: Annotated[str, typer.Option(help="sar-optical (optical 6 bands + SAR VV/VH) or hsi-lidar (48 bands + height).")] = "sar-optical",
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same scene.")] = 0,
    geotiff: Annotated[Optional[Path], typer.Option(help="Also write one GeoTIFF per modality (+ label.tif) into this folder.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store (and GeoTIFFs).")] = False,
) -> None:
    """Generate a synthetic multimodal scene with land-cover labels, lazily chunk by chunk."""
    synth(out, size, kind, seed, geotiff=geotiff, overwrite=overwrite, progress=True)
    typer.echo(printable(f"wrote {out}" + (f" and GeoTIFFs in {geotiff}" if geotiff else "")))
