"""``tilefuse export``: a prediction store's labels as a Cloud Optimized GeoTIFF.

The labels are streamed band of chunks by band of chunks into a tiled GeoTIFF
beside the output, which GDAL's COG driver then lays out with nearest-neighbour
overviews; the result is renamed into place, so no reader sees a half-written
file. The GeoTIFF is a guarded output (:mod:`tilefuse.outputs`): locked while
written, tagged ``TILEFUSE=geotiff``, and ``overwrite`` replaces only such a
file, never the prediction it reads or anything else. Pixel values are class ids, 255 is nodata, and the file carries a colour
table (the quicklook colours, :func:`tilefuse.quicklook.class_colors`) and the
class names.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from tilefuse.classes import IGNORE
from tilefuse.errors import InputError, printable


MAX_BLOCKSIZE = 4096
"""Largest internal tile edge of the GeoTIFF: GDAL holds a tile in memory to write it (4,096^2 px: 16 MB), and
larger values failed in GDAL ('Write failed', a RasterioIOError traceback) or asked for gigabytes per tile."""


def _overview_count(height: int, width: int, smallest: int = 128) -> int:
    """Halvings until the image fits in ``smallest`` px (at least one level, so small files have overviews too).

    A 1 x 1 px image has none: it cannot be halved (GDAL's COG driver fails with "Unknown GDAL Error").
    """
    if max(height, width) < 2:
        return 0
    return max(1, math.ceil(math.log2(max(height, width) / smallest)))


@contextlib.contextmanager
def _while_rewritten(prediction: Path):
    """Name the live writer of ``prediction`` instead of a read error it causes.

    ``tilefuse predict --out P --overwrite`` (or ``--resume``) holds P's lock while it replaces or rewrites P: an
    export reading P meanwhile met a chunk missing from the new store, or P replaced under it, and called the
    store damaged ('is missing: the store is corrupt'), the wrong problem and fix. Damage nobody is writing
    stays an error naming the chunk.
    """
    from tilefuse.outputs import live_writer

    try:
        yield
    except InputError as error:
        writer = live_writer(prediction)
        if writer is None or writer in str(error):  # damage, or a message that names the writer already
            raise
        raise InputError(
            f"{prediction} is being rewritten by {writer} (tilefuse predict --overwrite or --resume): "
            "wait for it to finish, then export again"
        ) from None


def export(
    prediction: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    blocksize: int = 512,
    progress: bool = True,
) -> Path:
    """Write the ``labels`` of a prediction store to ``out`` as a Cloud Optimized GeoTIFF; returns ``out``."""
    import numpy as np
    import rasterio
    import rasterio.shutil
    from rasterio.windows import Window
    from tqdm.auto import tqdm

    from tilefuse.prediction import open_prediction, store_path
    from tilefuse.quicklook import class_colors

    from tilefuse.outputs import claim, create, local_path, output_lock, temporary_sibling, tiff_tags

    prediction = store_path(prediction, "prediction", "prediction")
    out = local_path(out, "out", output=True, file=True)  # ~ is the home folder
    if out.suffix and out.suffix.lower() not in (".tif", ".tiff"):  # a GeoTIFF named x.png: viewers refuse or misread it
        raise InputError(f"out {out} would be a GeoTIFF named {out.suffix}: name it {out.with_suffix('.tif').name}")
    claim(out, "geotiff", inputs=[prediction], overwrite=overwrite)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 16 <= blocksize <= MAX_BLOCKSIZE or blocksize % 16:
        raise InputError(f"blocksize= (--blocksize) must be a multiple of 16 in 16..{MAX_BLOCKSIZE} px, got {blocksize!r}")
    with _while_rewritten(prediction):
        ds = open_prediction(prediction)
    labels = ds["labels"]
    height, width = labels.shape
    class_names = list(labels.attrs.get("class_names") or ds.attrs.get("class_names", []))
    colormap = {k: (*rgb, 255) for k, rgb in enumerate(class_colors(max(1, len(class_names))))}
    colormap[IGNORE] = (0, 0, 0, 0)

    size = height * width // 64  # labels compress well; a lower bound
    with output_lock(out, inputs=[prediction]), create(out, "geotiff", inputs=[prediction], overwrite=overwrite, size=size) as tmp:
        work = temporary_sibling(out)  # GDAL's staging file, beside the output
        work.mkdir()
        try:
            staging = work / "labels.tif"
            profile = {
                "driver": "GTiff",
                "height": height,
                "width": width,
                "count": 1,
                "dtype": "uint8",
                "crs": ds.rio.crs,
                "transform": ds.rio.transform(),
                "nodata": IGNORE,
                "tiled": True,
                "blockxsize": blocksize,
                "blockysize": blocksize,
                "compress": "deflate",
                "BIGTIFF": "IF_SAFER",
            }
            rows = labels.encoding.get("preferred_chunks", {}).get("y") or labels.data.chunksize[0]
            with rasterio.open(staging, "w", **profile) as dst:
                dst.write_colormap(1, colormap)
                dst.update_tags(**tiff_tags())
                dst.update_tags(class_names=json.dumps(class_names), **{f"class_{k}": n for k, n in enumerate(class_names)})
                dst.set_band_description(1, "class id (255 = nodata)")
                for start in tqdm(range(0, height, rows), unit="band", desc="export", disable=not progress):
                    stop = min(start + rows, height)
                    with _while_rewritten(prediction):
                        data = np.asarray(labels[start:stop].values, dtype=np.uint8)
                    dst.write(data, 1, window=Window(0, start, width, stop - start))
            rasterio.shutil.copy(
                staging,
                tmp,
                driver="COG",
                COMPRESS="DEFLATE",
                BLOCKSIZE=blocksize,
                RESAMPLING="NEAREST",
                OVERVIEW_COUNT=_overview_count(height, width),
                BIGTIFF="IF_SAFER",
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(printable(f"tilefuse: wrote {out} ({height} x {width} px, {len(class_names)} classes)"), file=sys.stderr)
    return Path(os.path.abspath(out))  # a notebook keeps it across os.chdir


def export_command(
    prediction: Annotated[Path, typer.Argument(help="Prediction store (from `tilefuse predict`).")],
    out: Annotated[str, typer.Argument(help="Cloud Optimized GeoTIFF to write.", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
    blocksize: Annotated[int, typer.Option(help="Internal tile edge of the GeoTIFF in px.")] = 512,
) -> None:
    """Export predicted labels as a Cloud Optimized GeoTIFF: colour table, class names, nodata 255, overviews."""
    export(prediction, out, overwrite=overwrite, blocksize=blocksize)
