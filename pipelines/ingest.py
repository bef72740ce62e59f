"""``tilefuse ingest``: rasters per modality (+ labels) -> one scene store on a reference grid.

Python API: :func:`ingest` writes the store and returns its path; the lazy
Dataset it writes is :func:`tilefuse.rasters.ingest_rasters` (for notebooks:
``write_scene(ingest_rasters(...), path)``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Mapping, Optional

import typer

from tilefuse.errors import InputError


def ingest(
    out: str | Path,
    modalities: Mapping[str, str | os.PathLike],
    labels: str | os.PathLike | None = None,
    *,
    reference: str | None = None,
    crs: str | None = None,
    resolution: float | None = None,
    resampling: str = "bilinear",
    label_map: Mapping[int, int] | str | None = None,
    class_names: list[str] | None = None,
    complex_mode: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Ingest ``modalities`` (name -> ``PATH[:BANDS]``) and optional ``labels`` into the store ``out``.

    Every input is checked before anything is written; see
    :func:`tilefuse.rasters.ingest_rasters` for the options. Returns the store path.
    """
    import rasterio

    from tilefuse.rasters import GDAL_CACHE_BYTES, ingest_rasters
    from tilefuse.scene import write_scene

    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists: choose another output or pass --overwrite")
    ds = ingest_rasters(
        modalities,
        labels,
        reference=reference,
        crs=crs,
        resolution=resolution,
        resampling=resampling,
        label_map=label_map,
        class_names=class_names,
        complex_mode=complex_mode,
    )
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        return write_scene(ds, out, overwrite=overwrite, progress=progress)


def ingest_command(
    out: Annotated[Path, typer.Argument(help="Scene store to write (zarr).")],
    modality: Annotated[
        list[str],
        typer.Option(
            "--modality",
            "-m",
            help="NAME=PATH[:BANDS], once per modality, e.g. sar=s1.tif or optical=s2.tif:2,3,4,8 (bands 1-based; ranges like 1-4).",
        ),
    ],
    labels: Annotated[Optional[str], typer.Option(help="Label raster PATH[:BAND], resampled with nearest.")] = None,
    label_map: Annotated[
        Optional[str],
        typer.Option(help="Remap label values FROM:TO,... e.g. -1:255 (255 = ignore). Values outside 0..255 become 255."),
    ] = None,
    class_names: Annotated[Optional[str], typer.Option(help="Class names by id, comma-separated (default: from the label raster's tags, else class_<id>).")] = None,
    reference: Annotated[Optional[str], typer.Option(help="Modality whose grid the scene takes [default: the first].")] = None,
    crs: Annotated[Optional[str], typer.Option(help="CRS of the output grid (e.g. EPSG:32632); also assumed for rasters that have none.")] = None,
    resolution: Annotated[Optional[float], typer.Option(help="Pixel size of the output grid, in units of its CRS.")] = None,
    resampling: Annotated[str, typer.Option(help="Resampling of modalities: nearest, bilinear, cubic, cubic_spline, lanczos, average or mode.")] = "bilinear",
    complex_mode: Annotated[Optional[str], typer.Option("--complex", help="How to read complex SAR: 'magnitude' (otherwise it is refused).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store.")] = False,
) -> None:
    """Resample rasters (one per modality) and labels onto one grid and write a scene store."""
    from tilefuse.rasters import parse_modality

    pairs = [parse_modality(spec) for spec in modality]
    names = [name for name, _ in pairs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise InputError(f"modality {duplicate!r} is given twice: give each --modality a distinct NAME")
    path = ingest(
        out,
        dict(pairs),
        labels,
        reference=reference,
        crs=crs,
        resolution=resolution,
        resampling=resampling,
        label_map=label_map,
        class_names=[n.strip() for n in class_names.split(",")] if class_names else None,
        complex_mode=complex_mode,
        overwrite=overwrite,
        progress=True,
    )
    typer.echo(f"wrote {path}")
