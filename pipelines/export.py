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
import errno
import json
import math
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from tilefuse.classes import IGNORE
from tilefuse.errors import InputError, clipped, printable


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


_LIBTIFF: dict = {"lock": threading.Lock(), "depth": 0, "saved": [], "handler": None, "failed": []}
"""State of :func:`_quiet_gdal`: nested and concurrent exports replace libtiff's error handlers once and restore
them once; ``failed`` holds ``(thread id, errno)`` of the libtiff errors met meanwhile."""

_STORAGE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS") if hasattr(errno, n))
"""A libtiff error met with one of these in errno is the filesystem refusing the write (the message is only its
strerror: ``_tiffWriteProc: No space left on device.``)."""


def _libtiff_handler():
    """libtiff's error handler ``(module, fmt, va_list)`` in place of the one that prints: records the errno the
    failed call left (ctypes hands it over with ``use_errno``), never formats or prints the message."""
    import ctypes

    if _LIBTIFF["handler"] is None:

        @ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, use_errno=True)
        def handler(module, fmt, args):
            code = ctypes.get_errno()
            if code in _STORAGE_ERRNOS:
                _LIBTIFF["failed"].append((threading.get_ident(), code))

        _LIBTIFF["handler"] = handler  # kept alive: libtiff holds its address
    return _LIBTIFF["handler"]


def _loaded_libtiffs() -> list:
    """Each libtiff this process has loaded (GDAL's, and others such as Pillow's own copy), as ctypes libraries.

    Opened with ``RTLD_NOLOAD``, so none is loaded for the purpose: the paths this process maps (Linux), and the
    copy bundled beside rasterio (its wheels elsewhere). Nothing found (Windows, another layout): [].
    """
    import ctypes
    import glob

    import rasterio

    if not hasattr(os, "RTLD_NOLOAD"):  # Windows: no way to ask for a loaded library only
        return []
    candidates: list[str] = []
    with contextlib.suppress(OSError):
        with open("/proc/self/maps") as maps:  # Linux: the libraries mapped into this process
            candidates += sorted({line.split()[-1] for line in maps if "/libtiff" in line})
    root = os.path.dirname(rasterio.__file__)
    candidates += sorted(glob.glob(os.path.join(root + ".libs", "libtiff*")) + glob.glob(os.path.join(root, ".dylibs", "libtiff*")))
    libraries, handles = [], set()
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            lib.TIFFSetErrorHandler.restype = ctypes.c_void_p
            lib.TIFFSetErrorHandler.argtypes = [ctypes.c_void_p]
        except (OSError, AttributeError):  # not loaded, or not a libtiff
            continue
        if lib._handle not in handles:  # one library reached by two paths (a symlink) is quieted once
            handles.add(lib._handle)
            libraries.append(lib)
    return libraries


@contextlib.contextmanager
def _quiet_gdal():
    """GDAL's and libtiff's own lines on stderr silenced while the GeoTIFF is written: an error becomes tilefuse's
    one line (:func:`tilefuse.outputs.os_errors_as_input`), not that line after libtiff's.

    ``CPL_LOG=/dev/null`` (as :func:`tilefuse.rasters.parse_crs` quiets PROJ) covers what GDAL prints. libtiff's
    write and seek failures (``_tiffWriteProc: No space left on device.``) do not pass through GDAL: libtiff's
    global error handler printed them, so a recording one replaces it meanwhile (:func:`_libtiff_handler`; the
    handler is process-wide: another thread's libtiff errors meanwhile go unprinted too). A write libtiff refused
    for want of space, quota or size is raised as that ``OSError``: GDAL did not always report it (a write past a
    file size limit left a truncated file, and the COG step a traceback about that file).
    """
    import rasterio

    state, me = _LIBTIFF, threading.get_ident()
    with state["lock"]:
        if state["depth"] == 0:
            with contextlib.suppress(Exception):  # a build whose libtiff cannot be found prints as before
                handler = _address(_libtiff_handler())
                for lib in _loaded_libtiffs():
                    state["saved"].append((lib, lib.TIFFSetErrorHandler(handler)))
        state["depth"] += 1
    try:
        with rasterio.Env(CPL_LOG="/dev/null"):
            yield
    except Exception as error:
        code = _refused(me)
        if code is None or isinstance(error, InputError):  # an InputError: a read's, already one line
            raise
        raise OSError(code, os.strerror(code)) from error
    else:
        code = _refused(me)
        if code is not None:
            raise OSError(code, os.strerror(code))
    finally:
        with state["lock"]:
            state["depth"] -= 1
            if state["depth"] == 0:
                saved, state["saved"] = state["saved"], []
                for lib, previous in saved:
                    lib.TIFFSetErrorHandler(previous)
                state["failed"].clear()  # another thread's, met meanwhile: not this export's to raise


def _address(function) -> int:
    """The C address of a ctypes callback (what ``TIFFSetErrorHandler`` takes as its ``c_void_p``)."""
    import ctypes

    return ctypes.cast(function, ctypes.c_void_p).value


def _refused(thread: int) -> int | None:
    """The errno of the first write libtiff refused in ``thread`` since its last call (those records dropped)."""
    with _LIBTIFF["lock"]:
        mine = [code for ident, code in _LIBTIFF["failed"] if ident == thread]
        _LIBTIFF["failed"][:] = [entry for entry in _LIBTIFF["failed"] if entry[0] != thread]
    return mine[0] if mine else None


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


def north_up(transform, height: int, width: int):
    """``(transform, flip_y, flip_x)``: the GeoTIFF's transform with rows from north to south and columns from
    west to east, and whether the store's rows (columns) are reversed for it. A prediction of a y-ascending scene
    (``sortby("y")``, a bottom-up raster) was exported bottom-up, which many viewers and COG readers mishandle."""
    from affine import Affine

    flip_y, flip_x = transform.e > 0, transform.a < 0
    if flip_y:
        transform = transform * Affine.translation(0, height) * Affine.scale(1, -1)
    if flip_x:
        transform = transform * Affine.translation(width, 0) * Affine.scale(-1, 1)
    return transform, bool(flip_y), bool(flip_x)


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
        raise InputError(f"blocksize= (--blocksize) must be a multiple of 16 in 16..{MAX_BLOCKSIZE} px, got {clipped(repr(blocksize))}")
    with _while_rewritten(prediction):
        ds = open_prediction(prediction)
    labels = ds["labels"]
    height, width = labels.shape
    class_names = list(labels.attrs.get("class_names") or ds.attrs.get("class_names", []))
    colormap = {k: (*rgb, 255) for k, rgb in enumerate(class_colors(max(1, len(class_names))))}
    colormap[IGNORE] = (0, 0, 0, 0)

    transform, flip_y, flip_x = north_up(ds.rio.transform(), height, width)
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
                "transform": transform,
                "nodata": IGNORE,
                "tiled": True,
                "blockxsize": blocksize,
                "blockysize": blocksize,
                "compress": "deflate",
                "BIGTIFF": "IF_SAFER",
            }
            rows = labels.encoding.get("preferred_chunks", {}).get("y") or labels.data.chunksize[0]
            with _quiet_gdal(), rasterio.open(staging, "w", **profile) as dst:
                dst.write_colormap(1, colormap)
                dst.update_tags(**tiff_tags())
                dst.update_tags(class_names=json.dumps(class_names), **{f"class_{k}": n for k, n in enumerate(class_names)})
                dst.set_band_description(1, "class id (255 = nodata)")
                for start in tqdm(range(0, height, rows), unit="band", desc="export", disable=not progress):
                    stop = min(start + rows, height)
                    with _while_rewritten(prediction):
                        data = np.asarray(labels[start:stop].values, dtype=np.uint8)
                    data = data[::-1 if flip_y else 1, ::-1 if flip_x else 1]
                    top = height - stop if flip_y else start
                    dst.write(data, 1, window=Window(0, top, width, stop - start))
            with _quiet_gdal():
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
