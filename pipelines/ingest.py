"""``tilefuse ingest``: rasters per modality (+ labels) -> one scene store on a reference grid.

Python API: :func:`ingest` writes the store and returns its path; the lazy
Dataset it writes is :func:`tilefuse.rasters.ingest_rasters` (for notebooks:
``write_scene(ingest_rasters(...), path)``). ``--stac ITEMS.json --asset
NAME=KEY[,KEY...]`` reads a STAC Item/ItemCollection over local files instead
(:mod:`tilefuse.stac`, through :mod:`tilefuse.ecosystem`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Mapping, Optional

import typer

from tilefuse.errors import InputError, printable


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
    max_pixels: int | None = None,
    allow_large: bool = False,
    progress: bool = False,
    stac: str | os.PathLike | None = None,
    label_asset: str | None = None,
    time: int | str | None = None,
) -> Path:
    """Ingest ``modalities`` (name -> ``PATH[:BANDS]``) and optional ``labels`` into the store ``out``.

    Every input is checked before anything is written; see
    :func:`tilefuse.rasters.ingest_rasters` for the options. Returns the store path.
    Before any work, an output grid of more than ``max_pixels`` pixels
    (default :data:`tilefuse.rasters.MAX_PIXELS`, 10^10) is refused unless
    ``allow_large``; so is one whose store needs more than the free space of
    ``out``'s filesystem (worked out from the grid before any reading is
    planned), and, even with ``allow_large``, one of more than
    :data:`tilefuse.rasters.MAX_BLOCKS` read blocks (10^12 px).

    With ``stac`` (a STAC Item or ItemCollection JSON whose assets are local
    files; needs the ``stac`` extra), ``modalities`` maps names to asset keys
    (``{"optical": "B04,B03,B02"}``), labels come from ``labels`` (a file) or
    ``label_asset``, and several Items are reduced along time by ``time``
    (an index, a date, "median", "mean", "first" or "last"); see
    :func:`tilefuse.stac.scene_from_stac`.
    """
    import rasterio

    from tilefuse.rasters import GDAL_CACHE_BYTES, MAX_PIXELS, check_grid_size, check_label_options, check_modalities_given, check_modality_names, ingest_rasters
    from tilefuse.classes import class_name_list
    from tilefuse.scene import write_scene

    from tilefuse.outputs import claim, local_path
    from tilefuse.rasters import spec_file

    out = local_path(out, "output", output=True)  # a URL is refused, ~ is the home folder
    check_modalities_given(modalities, labels, paths=stac is None)
    check_label_options(labels if stac is None else labels or label_asset, class_names, label_map)
    class_names = class_name_list(class_names)  # a dict {id: name} as the list it means
    stac = None if stac is None else local_path(stac, "--stac")
    specs = [stac, labels] if stac is not None else [*modalities.values(), labels]
    inputs = [spec_file(spec) if spec is not stac else spec for spec in specs if spec is not None]
    target = claim(out, "scene", inputs=inputs, overwrite=overwrite)
    limit = None if allow_large else (MAX_PIXELS if max_pixels is None else _positive(max_pixels, "max_pixels"))
    if stac is not None:  # STAC input: assets of Items, through tilefuse.ecosystem
        from tilefuse.stac import scene_from_stac

        if complex_mode is not None:
            raise InputError("complex_mode= is for raster files: STAC assets are read as they are")
        ds = scene_from_stac(
            stac, modalities, labels, label_asset=label_asset, time=time, reference=reference, crs=crs,
            resolution=resolution, resampling=resampling, label_map=label_map, class_names=class_names,
        )  # fmt: skip
        check_grid_size(ds.sizes["x"], ds.sizes["y"], limit)
    else:
        if label_asset is not None or time is not None:
            raise InputError("label_asset= and time= apply to STAC input: pass stac= (a STAC Item/ItemCollection JSON)")
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
            max_pixels=limit,
            output=target,  # its free space is checked from the grid, before any reading is planned
        )
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        return write_scene(ds, out, overwrite=overwrite, progress=progress, inputs=inputs, require_labelled=True)


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}= must be a whole number >= 1, got {value!r}")
    return value


def ingest_command(
    out: Annotated[Path, typer.Argument(help="Scene store to write (zarr).")],
    modality: Annotated[
        Optional[list[str]],
        typer.Option(
            "--modality",
            "-m",
            help="NAME=PATH[:BANDS], once per modality, e.g. sar=s1.tif or optical=s2.tif:2,3,4,8 (bands 1-based; ranges like 1-4); one variable of a NetCDF/HDF5: sar=NETCDF:s1.nc:vv.",
        ),
    ] = None,
    labels: Annotated[Optional[str], typer.Option(help="Label raster PATH[:BAND], resampled with nearest.")] = None,
    label_map: Annotated[
        Optional[str],
        typer.Option(help="Remap label values FROM:TO,... e.g. -1:255 (255 = ignore). Negative values become 255; values above 255 must be remapped."),
    ] = None,
    class_names: Annotated[Optional[str], typer.Option(help="Class names by id, comma-separated (default: from the label raster's tags, else class_<id>).")] = None,
    reference: Annotated[Optional[str], typer.Option(help="Modality whose grid the scene takes [default: the first].")] = None,
    crs: Annotated[Optional[str], typer.Option(help="CRS of the output grid (e.g. EPSG:32632); also assumed for rasters that have none.")] = None,
    resolution: Annotated[Optional[float], typer.Option(help="Pixel size of the output grid, in units of its CRS.")] = None,
    resampling: Annotated[str, typer.Option(help="Resampling of modalities: nearest, bilinear, cubic, cubic_spline, lanczos, average or mode.")] = "bilinear",
    complex_mode: Annotated[Optional[str], typer.Option("--complex", help="How to read complex SAR: 'magnitude' (otherwise it is refused).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store.")] = False,
    stac: Annotated[Optional[Path], typer.Option(help="STAC Item or ItemCollection JSON whose assets are local files (needs the stac extra: pip install tilefuse\\[stac]); modalities then come from --asset.")] = None,
    asset: Annotated[
        Optional[list[str]],
        typer.Option("--asset", "-a", help="With --stac: NAME=KEY[,KEY...], the asset keys whose bands make a modality, e.g. optical=B04,B03,B02."),
    ] = None,
    label_asset: Annotated[Optional[str], typer.Option(help="With --stac: the asset key of the label raster.")] = None,
    time: Annotated[Optional[str], typer.Option(help="With --stac and several items: one date (2024-06-01), an index, or per pixel median, mean, first or last (valid step).")] = None,
    max_pixels: Annotated[Optional[int], typer.Option(help="Refuse an output grid of more pixels than this [1e10].")] = None,
    allow_large: Annotated[bool, typer.Option("--allow-large", help="Insist on a large output grid: no pixel limit.")] = False,
) -> None:
    """Resample rasters (one per modality) and labels onto one grid and write a scene store."""
    from tilefuse.rasters import parse_modality

    if stac is not None:  # STAC input: modalities name asset keys
        from tilefuse.ecosystem import parse_time
        from tilefuse.stac import parse_assets

        if modality:
            raise InputError("with --stac, modalities come from the items' assets: use --asset NAME=KEY[,KEY...], not --modality")
        pairs, flag = [parse_assets(spec) for spec in asset or []], "--asset"
        if not pairs:
            raise InputError("--stac needs at least one --asset NAME=KEY[,KEY...] (e.g. optical=B04,B03,B02)")
        stac_options = {"stac": stac, "label_asset": label_asset, "time": parse_time(time)}
    else:
        if asset or label_asset is not None or time is not None:
            raise InputError("--asset, --label-asset and --time read a STAC file: pass --stac ITEMS.json too")
        if not modality:
            raise InputError("no modality given: pass at least one --modality NAME=PATH (or --stac ITEMS.json --asset NAME=KEY)")
        pairs, flag, stac_options = [parse_modality(spec) for spec in modality], "--modality", {}
    names = [name for name, _ in pairs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise InputError(f"modality {duplicate!r} is given twice: give each {flag} a distinct NAME")
    ingest(
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
        max_pixels=max_pixels,
        allow_large=allow_large,
        progress=True,
        **stac_options,
    )
    typer.echo(printable(f"wrote {out}"))
