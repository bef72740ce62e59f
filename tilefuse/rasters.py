"""Rasters (GeoTIFF/COG, anything GDAL reads) -> a lazy scene Dataset on one reference grid.

Each modality is one raster (optionally a subset of its bands). The reference
grid is a chosen modality's grid, or that modality's extent in another CRS
and/or resolution. Every output chunk is read by one dask task that opens the
raster itself and reads just the window it needs: as is where the raster is
on the grid already (same CRS, pixel size and an integer pixel offset), else
warped onto the block by GDAL (``rasterio.warp.reproject``) with a resampling
scale fixed for the whole raster, so values match a whole-raster warp (up to
GDAL's transform approximation, at most 1/8 px) whatever the chunking, and
memory stays bounded by a few blocks. Modalities come out as float32 with NaN
where they have no data (nodata value, NaN, mask, or outside the footprint);
labels as uint8 with 255 (ignore) there. Labels are read, placed and remapped
in float64 (:data:`LABEL_DTYPE`), which holds every integer class id up to 2^53
exactly (float32 rounded ids above 2^24, so 8-10 digit crop codes merged); an id
beyond that is refused (:func:`exact_label_values`). A band with a GDAL scale or offset
(``src.scales``/``src.offsets``, e.g. reflectance stored as uint16 DN with
scale 1e-4) is stored in physical units: ``value * scale + offset``, per band,
after nodata is masked on the raw values (worked out as rioxarray's
``mask_and_scale=True`` does, :func:`scale_dtype`), so statistics and models
see the same units whatever a provider's processing baseline stores. Label
rasters hold class ids, which are never scaled: one with a scale or offset
other than 1/0 is refused. In-memory or lazy arrays with a CRS
(:func:`array_onto_grid`, used by :mod:`tilefuse.ecosystem`) go through the same
per-block placement, so they come out equal to the rasters they hold.

Nothing here writes: pass the result to :func:`tilefuse.scene.write_scene`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine

from tilefuse.errors import InputError, clipped, symlink_loop
from tilefuse.scene import IGNORE, band_dim

RESAMPLING = ("nearest", "bilinear", "cubic", "cubic_spline", "lanczos", "average", "mode")
"""Resampling methods for modalities (labels always use nearest)."""
COMPLEX_MODES = ("magnitude",)
READ_CHUNK = 1024
"""Spatial edge of the blocks read per task (hyperspectral rasters use smaller ones)."""
READ_BLOCK_BYTES = 64 << 20
GDAL_CACHE_BYTES = 256 << 20
"""GDAL block cache while ingesting; GDAL's default (5% of RAM) would dominate memory on big machines."""

MAX_PIXELS = 10**10
"""Largest output grid ingested without ``allow_large``: a 10^5 x 10^5 px scene. A typo in a
resolution (0.001 for 10) asks for 10^13 px and more; refusing before any work keeps it a message."""
MAX_BLOCKS = 10**6
"""Most read blocks (one dask task each) one ingest plans, whatever ``max_pixels`` or ``allow_large``: a grid of
10^12 px at the 1024 px blocks of :data:`READ_CHUNK` (4 TB per float32 band). Planning costs about 4 KB and 0.1 ms
per block before anything is read (10^6 blocks: ~4 GB, a minute or two); ``--resolution 1e-8`` for a scene in
degrees asked for 2*10^7 blocks, and memory grew without a word until the machine ran out."""
LABEL_DTYPE = np.dtype(np.float64)
"""What label values are read, resampled (nearest) and remapped in, NaN = none: float64 holds every integer
id of magnitude up to :data:`EXACT_IDS` exactly (float32 only up to 2^24: 33010101 became 33010100)."""
EXACT_IDS = 2**53
"""The largest magnitude of a class id that :data:`LABEL_DTYPE` holds exactly (with every id below it)."""
RESERVED_NAMES = ("x", "y", "valid", "label", "labels", "spatial_ref", "band", "class")
"""Names a store uses itself, so no modality may take them (nor end in ``_band``: band dimensions)."""
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
MAX_NAME = 100
"""Longest modality name: a store folder (and ``NAME_band``) per modality; 260 characters were 'File name too long'."""

_BANDS_SUFFIX = re.compile(r"^(?P<path>.+):(?P<bands>\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: CRS, affine transform of the upper-left corner, size."""

    crs: object  # rasterio.crs.CRS
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        t = self.transform
        xs = (t.c, t.c + t.a * self.width)
        ys = (t.f, t.f + t.e * self.height)
        return min(xs), min(ys), max(xs), max(ys)

    def coords(self) -> dict[str, np.ndarray]:
        """Pixel-centre ``x`` and ``y`` coordinates."""
        t = self.transform
        return {"x": t.c + t.a * (np.arange(self.width) + 0.5), "y": t.f + t.e * (np.arange(self.height) + 0.5)}


@dataclass(frozen=True)
class RasterSource:
    """One input raster, checked: which bands to read and how it is georeferenced."""

    path: Path
    bands: tuple[int, ...]
    """1-based band indexes to read."""
    crs: object
    transform: Affine
    width: int
    height: int
    band_names: tuple[str, ...]
    magnitude: bool = False
    """Complex raster read as its magnitude."""
    nodata: tuple[float | None, ...] | None = None
    """The nodata value of each band read, in ``bands`` order (None: none, or NaN, which needs no masking: NaN is
    what we store); bands may differ (a VRT stacking rasters, ``gdalbuildvrt -separate``). None: no band has one."""
    mask_band: bool = False
    """Validity comes from a GDAL mask or alpha band rather than a nodata value."""
    class_names_tag: str | None = None
    """The raster's ``class_names`` tag, as written by :func:`tilefuse.synthetic.write_geotiffs` (a JSON list of
    names); read by :meth:`class_names` only where no names are given."""
    variable: str | None = None
    """GDAL's name of one variable of a file of several (NetCDF, HDF5: ``NETCDF:"path":vv``); None: the file."""
    scales: tuple[float, ...] | None = None
    """GDAL's scale of each band read, in ``bands`` order; None where every band has scale 1 and offset 0."""
    offsets: tuple[float, ...] | None = None
    """GDAL's offset of each band read, in ``bands`` order (None with ``scales``): stored is value * scale + offset."""

    def class_names(self) -> tuple[str, ...] | None:
        """The class names of the ``class_names`` tag, None without one; a tag that is not a JSON list of
        strings is an InputError (a string was taken one name per letter, a non-JSON tag was a traceback)."""
        if not self.class_names_tag:
            return None
        try:
            names = json.loads(self.class_names_tag)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(
                f"labels: the class_names tag of {self.path.name} is not a JSON list of names "
                f"({clipped(self.class_names_tag)}): name the classes with --class-names (ids count from 0)"
            )
        return tuple(names)

    def raster_name(self) -> str:
        """The raster as GDAL names it: the file, or one variable of it."""
        return self.variable or str(self.path)

    def dataset_name(self) -> str:
        """What to pass to ``rasterio.open``: the raster, or a VRT taking the magnitude of its bands."""
        return _magnitude_vrt(self) if self.magnitude else self.raster_name()


def band_ranges(spec: str) -> tuple[str, tuple[tuple[int, int], ...] | None]:
    """``"PATH:1,3-5"`` -> ``("PATH", ((1, 1), (3, 5)))`` as written (a range may be reversed); ``"PATH"`` ->
    ``("PATH", None)``. A band 0 is refused here: bands count from 1, so no fix can name it."""
    match = _BANDS_SUFFIX.match(spec)
    if match is None or Path(spec).exists():
        return spec, None
    parts = []
    for part in match["bands"].split(","):
        first, _, last = part.partition("-")
        parts.append((int(first), int(last or first)))
        if min(parts[-1]) == 0:
            raise InputError(f"band 0 in {spec}: bands count from 1 (the first band is 1, as GDAL numbers them): number them from 1")
    return match["path"], tuple(parts)


def split_bands(spec: str, count: int | None = None) -> tuple[str, tuple[int, ...] | None]:
    """``"PATH:1,3-5"`` -> ``("PATH", (1, 3, 4, 5))``; ``"PATH"`` -> ``("PATH", None)``.

    Refused, each with a fix that is itself valid: a band 0 (:func:`band_ranges`), with ``count`` (the raster's
    bands) a band beyond it, a band given twice (ranges read low-high), then a reversed range (``5-3``: write 3-5).
    A range is not expanded before these checks, so ``1-10000000000`` is refused at once.
    """
    path, parts = band_ranges(spec)
    if parts is None:
        return path, None
    if count is not None:
        for first, last in parts:
            if max(first, last) > count:
                raise InputError(f"band {max(min(first, last), count + 1)} is out of range, {path} has bands 1..{count}")
    low_high = sorted((min(a, b), max(a, b)) for a, b in parts)
    for (_, end), (start, _) in zip(low_high, low_high[1:]):
        if start <= end:
            raise InputError(f"band {start} is given twice in {spec}: list each band once")
    for first, last in parts:
        if last < first:  # an empty range: no band, which meant every band
            raise InputError(f"band range {first}-{last} in {spec} is reversed: write {last}-{first} (ranges go low-high)")
    return path, tuple(band for first, last in parts for band in range(first, last + 1))


SUBDATASET_DRIVERS = ("NETCDF", "HDF5")
"""GDAL drivers whose files hold several variables, one named as ``DRIVER:PATH:VARIABLE`` (PATH may be quoted)."""
_SUBDATASET = re.compile(r'^(?P<driver>[A-Za-z0-9_]+):(?:"(?P<quoted>[^"]+)"|(?P<plain>.+)):(?P<variable>[^:/"]+)$')


def split_variable(path: str) -> tuple[str, str | None, str | None]:
    """``'NETCDF:"f.nc":vv'`` or ``"NETCDF:f.nc:vv"`` -> ``("f.nc", "NETCDF", "vv")``; a plain path -> ``(path, None, None)``."""
    match = _SUBDATASET.match(path)
    if match is None or match["driver"].upper() not in SUBDATASET_DRIVERS:
        return path, None, None
    return match["quoted"] or match["plain"], match["driver"].upper(), match["variable"]


def spec_file(spec: str | os.PathLike) -> Path:
    """The file on disk that the raster spec ``PATH[:BANDS]`` (or ``DRIVER:PATH:VARIABLE[:BANDS]``) reads."""
    from tilefuse.outputs import local_path

    return local_path(split_variable(band_ranges(os.fspath(spec))[0])[0])


def parse_modality(spec: str) -> tuple[str, str]:
    """``"NAME=PATH[:BANDS]"`` -> ``(NAME, "PATH[:BANDS]")``."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not path or not name:
        raise InputError(f"bad --modality {spec!r}: write NAME=PATH (e.g. sar=s1.tif, or sar=s1.tif:1,2 for bands)")
    check_modality_names([name])
    return name, path


def check_modality_names(names) -> None:
    """Refuse modality names a store cannot hold: reserved, not an identifier, or given twice (any case)."""
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InputError(
                f"modality name {name!r} is not a plain name: use letters, digits and _ starting with a letter (e.g. sar, optical)"
            )
        if len(name) > MAX_NAME:  # its array folder and band dimension are named after it
            raise InputError(f"modality name {clipped(name, 20)!r} is {len(name)} characters long: use a short NAME (at most {MAX_NAME})")
        if name.lower() in RESERVED_NAMES or name.lower().endswith("_band"):
            raise InputError(f"a modality cannot be called {name!r} (the store uses that name): choose another NAME")
        if name.lower() in seen:
            raise InputError(f"modality {name!r} is given twice (as {seen[name.lower()]!r} too): give each modality a distinct NAME")
        seen[name.lower()] = name


def check_grid_size(
    width: int,
    height: int,
    max_pixels: int | None = MAX_PIXELS,
    what: str = "the output grid",
    fix: str = "check --resolution/--crs, or pass --max-pixels N / --allow-large to insist",
) -> None:
    """Refuse a grid of more than ``max_pixels`` pixels (None: no limit) before any work is planned."""
    pixels = int(width) * int(height)
    if max_pixels is not None and pixels > max_pixels:
        raise InputError(
            f"{what} would be {_side(width)} x {_side(height)} px ({_count(pixels)} px, more than the limit of "
            f"{_count(max_pixels)}): {fix}"
        )


def _count(n: int) -> str:
    """A count of any size (pixels, blocks) for a message, to 3 significant digits: ``2.12e+13``. A float took
    only counts below ~1.8e308 (a grid of 10^598 px was an OverflowError) and printed its 300 digits in full."""
    from decimal import Decimal

    n = int(n)
    if abs(n) < 10**300:
        return f"{n:.3g}"
    mantissa, _, exponent = format(Decimal(n), ".2e").partition("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def _side(n: int) -> str:
    """A grid's width or height for a message: exact up to 12 digits, else as :func:`_count`."""
    return str(int(n)) if abs(int(n)) < 10**12 else _count(n)


def read_blocks(source: RasterSource, grid: Grid, chunk: int = READ_CHUNK) -> int:
    """How many blocks (dask tasks) :func:`read_onto_grid` plans for ``source`` on ``grid``; works it out from
    the sizes alone, so a grid too large to plan costs nothing."""
    least = _least_blocks(grid, chunk)
    if least > MAX_BLOCKS:  # refused anyway; a read plan of such a grid can overflow (10^300 px across)
        return least
    bands = len(source.bands)
    per_block, spatial, _ = _block_shape(read_plan(source, grid), bands, chunk)
    return -(-bands // per_block) * -(-int(grid.height) // spatial) * -(-int(grid.width) // spatial)


def _least_blocks(grid: Grid, chunk: int = READ_CHUNK) -> int:
    """The fewest blocks any raster or array is read onto ``grid`` in (blocks are at most ``chunk`` px, or 64)."""
    spatial = max(64, int(chunk))
    return -(-int(grid.height) // spatial) * -(-int(grid.width) // spatial)


def check_blocks(grid: Grid, blocks: int, what: str = "the output grid") -> None:
    """Refuse to plan more than :data:`MAX_BLOCKS` read blocks for ``grid`` (its tasks alone would take GBs of
    memory before anything is read), whatever the pixel limit: one line instead of memory growing until the
    machine runs out."""
    if blocks > MAX_BLOCKS:
        raise InputError(
            f"{what} would be {_side(grid.width)} x {_side(grid.height)} px ({_count(grid.width * grid.height)} px, "
            f"{_count(blocks)} read blocks), more than the {_count(MAX_BLOCKS)} blocks tilefuse plans for one scene, "
            "a bound --allow-large (allow_large=) does not lift: check --resolution/--crs (resolution=/crs=), or "
            "ingest the area in parts"
        )


def scene_bytes(grid: Grid, bands: int, labelled: bool) -> int:
    """The free space a scene store of ``bands`` modality bands (float32), ``valid`` and (``labelled``) ``label``
    on ``grid`` needs: :func:`tilefuse.scene.write_scene`'s estimate (raw bytes / 8, zstd rarely beats 8x on
    imagery), worked out from the sizes alone so that it can be checked before any reading is planned."""
    return int(grid.width) * int(grid.height) * (4 * bands + 1 + int(labelled)) // 8


_SPACE_CHECKED = 1 << 63
"""Scene sizes (bytes) the free-space check is asked about; no filesystem reports more free, and a grid that
large is far beyond :data:`MAX_BLOCKS`, which refuses it."""


def check_modalities_given(modalities, labels=None, *, paths: bool = True) -> None:
    """Refuse ``modalities`` that is not a non-empty mapping of plain names to raster specs (paths, where ``paths``;
    STAC asset keys otherwise), and ``labels`` that is neither None nor a path (with ``paths``)."""
    if not isinstance(modalities, Mapping):
        raise InputError(f"modalities= must map names to raster paths, e.g. {{'sar': 's1.tif'}}, got {type(modalities).__name__}")
    if not modalities:
        raise InputError("no modality given: pass at least one --modality NAME=PATH")
    check_modality_names(list(modalities))
    if isinstance(labels, str) and not labels:  # it was read as "path is empty", naming no parameter
        raise InputError("labels= (--labels) is empty: give the label raster's path (PATH[:BAND]), or leave labels out")
    if not paths:
        return
    for name, spec in modalities.items():
        if not isinstance(spec, (str, os.PathLike)):
            raise InputError(f"modality {name!r} must be a raster path (PATH[:BANDS]), got {clipped(repr(spec))}")
        if isinstance(spec, str) and not spec:
            raise InputError(f"modality {name!r} (modalities=, --modality {name}=PATH) is an empty path: give its raster's path (PATH[:BANDS])")
    if labels is not None and not isinstance(labels, (str, os.PathLike)):
        raise InputError(f"labels= must be a raster path (PATH[:BAND]), got {clipped(repr(labels))}")


def check_label_options(labels, class_names, label_map) -> None:
    """Refuse ``class_names`` or ``label_map`` given without ``labels`` (they were dropped without a word), and
    values of the wrong type: class_names a string (read one name per letter), label_map
    neither ``"FROM:TO,..."`` nor a mapping."""
    if isinstance(class_names, str):
        raise InputError(f"class_names= must be a list of names, e.g. ['water', 'trees'], got the string {clipped(repr(class_names))}")
    if label_map is not None and not isinstance(label_map, (str, Mapping)):
        raise InputError(f"label_map= must be a mapping {{FROM: TO}} or 'FROM:TO,...', got {clipped(repr(label_map))}")
    if labels is not None:
        return
    for value, flag in ((class_names, "--class-names (class_names=)"), (label_map, "--label-map (label_map=)")):
        if value:
            raise InputError(f"{flag} applies to the labels, but no labels are given: pass --labels PATH too, or drop it")


def parse_label_map(text: str | None) -> dict[int, int]:
    """``"-1:255,3:1"`` -> ``{-1: 255, 3: 1}``; targets must be 0..255 (255 = ignore)."""
    mapping: dict[int, int] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        source, sep, target = item.partition(":")
        try:
            key, value = int(source), int(target)
        except ValueError:
            key = value = None
        if not sep or key is None or not 0 <= value <= IGNORE:
            raise InputError(f"bad --label-map (label_map=) entry {item!r}: write FROM:TO with integers, TO in 0..255 (e.g. -1:255)")
        if abs(key) > EXACT_IDS:  # no label value can equal it (those are refused): it mapped nothing
            raise InputError(
                f"bad --label-map (label_map=) entry {item!r}: label {key} is beyond 2^53, the largest class id "
                "tilefuse tells apart exactly: recode the labels to smaller ids"
            )
        if key in mapping:  # the last target won without a word
            raise InputError(f"bad --label-map: label {key} is mapped twice ({key}:{mapping[key]} and {key}:{value}): give each FROM once")
        mapping[key] = value
    return mapping


def open_source(
    spec: str | os.PathLike, *, what: str, assume_crs: str | None = None, complex_mode: str | None = None
) -> RasterSource:
    """Check one raster (``PATH[:BANDS]``) and describe it; every problem is an :class:`InputError`.

    ``what`` names the raster in messages (e.g. ``"modality 'sar'"``);
    ``assume_crs`` is taken for a raster without a CRS.
    """
    import rasterio
    from rasterio.enums import MaskFlags
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    from tilefuse.outputs import local_path

    try:
        path_text, _ = band_ranges(os.fspath(spec))  # each band is checked once the raster's count is known
    except InputError as error:
        raise InputError(f"{what}: {error}") from None
    file_text, driver, variable = split_variable(path_text)
    path = local_path(file_text, what)  # a URL is refused, ~ is the home folder
    if not path.exists():
        if symlink_loop(path):  # Path.exists() is False for it too
            raise InputError(
                f"{what}: {path} is a symlink loop (its links lead back to themselves, never to a file): "
                "point the link at the raster, or pass the raster's own path"
            )
        raise InputError(f"{what}: {path} does not exist: check the path")
    if path.is_dir():
        raise InputError(f"{what}: {path} is a folder, not a raster file")
    if not path.is_file():  # a named pipe or <(...): GDAL's open waits for a writer, and needs to seek anyway
        raise InputError(f"{what}: {path} is not a regular file (a pipe or a device): save the raster to a file and pass that")
    name = f'{driver}:"{path.resolve()}":{variable}' if variable else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(name or path)
    except (RasterioIOError, OSError) as error:
        if variable is not None:
            found = _variables(path)
            if found and variable not in found:
                raise InputError(f"{what}: {path} has no variable {variable!r} (it has {', '.join(found)}): check its name") from None
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{what}: {path} is not a raster GDAL can read ({first}): pass a GeoTIFF/COG") from None
    with src:
        count = src.count
        if count == 0:
            found = _variables(path)
            if found:  # a NetCDF/HDF5 of several variables: GDAL reads one at a time
                raise InputError(
                    f"{what}: {path} holds {len(found)} variables ({clipped(', '.join(found))}): name one as "
                    f"{src.driver.upper()}:{path}:{found[0]} (PATH:N then picks bands of it)"
                )
            raise InputError(f"{what}: {path} has no raster bands: pass a raster file")
        try:
            bands = split_bands(os.fspath(spec), count)[1] or tuple(range(1, count + 1))
        except InputError as error:
            raise InputError(f"{what}: {error}") from None
        crs = src.crs
        if crs is None:
            if assume_crs is None:
                raise InputError(f"{what}: {path} has no CRS: pass --crs (e.g. --crs EPSG:32611) to say which it is in")
            crs = parse_crs(assume_crs)
        if src.transform.is_identity:
            if src.driver in ("netCDF", "HDF5"):  # xarray writes x/y coordinates without the CF attributes GDAL needs
                raise InputError(
                    f"{what}: {path} has no grid GDAL can read: its x/y coordinates lack the CF attributes "
                    "(standard_name, units) that make them the grid; add them (rioxarray: .rio.write_crs(...)"
                    ".rio.write_coordinate_system() before to_netcdf) or pass the array to tilefuse.from_xarray"
                )
            raise InputError(f"{what}: {path} has no geotransform (not georeferenced): georeference it first, e.g. with gdalwarp")
        dtypes = {src.dtypes[b - 1] for b in bands}
        is_complex = any(t.startswith("complex") for t in dtypes)
        if is_complex and complex_mode != "magnitude":
            raise InputError(
                f"{what}: {path} holds complex SAR data ({', '.join(sorted(dtypes))}): "
                "pass --complex magnitude to ingest its amplitude"
            )
        scales, offsets = _band_scales(src, bands)
        if is_complex and scales is not None:  # |z * scale + offset| is no scaled magnitude
            raise InputError(
                f"{what}: {path} holds complex data with a scale/offset (GDAL band metadata): take the magnitude "
                "and apply the scale/offset yourself, then pass that raster"
            )
        descriptions = [src.descriptions[b - 1] for b in bands]
        names = tuple(descriptions) if all(descriptions) and len(set(descriptions)) == len(bands) else None
        tag = src.tags().get("class_names")
        flags = {flag for b in bands for flag in src.mask_flag_enums[b - 1]}
        return RasterSource(
            path=path.resolve(),
            bands=bands,
            crs=crs,
            transform=src.transform,
            width=src.width,
            height=src.height,
            band_names=names or tuple(f"b{b}" for b in bands),
            magnitude=is_complex,
            nodata=_band_nodata(src, bands),
            mask_band=bool(flags & {MaskFlags.per_dataset, MaskFlags.alpha}),
            class_names_tag=tag or None,
            variable=name,
            scales=scales,
            offsets=offsets,
        )


def _band_scales(src, bands: tuple[int, ...]) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """GDAL's scale and offset of each of ``bands`` of the open raster ``src`` (:attr:`RasterSource.scales`)."""
    scales = tuple(1.0 if v is None else float(v) for v in (src.scales or (1.0,) * src.count))
    offsets = tuple(0.0 if v is None else float(v) for v in (src.offsets or (0.0,) * src.count))
    picked = tuple(scales[b - 1] for b in bands), tuple(offsets[b - 1] for b in bands)
    if all(s == 1.0 for s in picked[0]) and all(o == 0.0 for o in picked[1]):
        return None, None
    return picked


def scale_dtype(dtype) -> np.dtype:
    """The float type ``value * scale + offset`` is worked out in for raw values of ``dtype``: float32 for
    integers of up to 16 bits and float32 (float16), float64 otherwise. It is xarray's promotion, which
    rioxarray's ``mask_and_scale=True`` uses, so ingest, from_xarray of a raw array and from_xarray of an
    array opened with ``mask_and_scale=True`` give the same float32 values, to the bit."""
    dtype = np.dtype(dtype)
    small = (dtype.kind in "iub" and dtype.itemsize <= 2) or (dtype.kind == "f" and dtype.itemsize <= 4)
    return np.dtype(np.float32 if small else np.float64)


def apply_scale(raw, scale: float, offset: float):
    """``raw * scale + offset`` (a numpy, dask or xarray array of one band's raw values) in
    :func:`scale_dtype` of its dtype; the caller masks nodata (compared with the raw values)."""
    work = scale_dtype(raw.dtype)
    return raw.astype(work) * work.type(scale) + work.type(offset)


def exact_label_values(raw: np.ndarray, holes: np.ndarray, source: str, fix: str) -> np.ndarray:
    """Label values ``raw`` (any dtype) as :data:`LABEL_DTYPE`, NaN where ``holes``: every integer id exactly.

    An integer id beyond :data:`EXACT_IDS` (int64/uint64 only) would be rounded into a neighbour: InputError
    naming it, ``source`` (the labels) and ``fix`` (what to do, worded for the caller's interface)."""
    if raw.dtype.kind in "iu" and raw.dtype.itemsize == 8:
        big = (raw > EXACT_IDS) if raw.dtype.kind == "u" else (raw > EXACT_IDS) | (raw < -EXACT_IDS)
        big &= ~holes
        if big.any():
            value = int(raw[big][0])
            raise InputError(f"labels: {source} holds class id {value}, beyond 2^53, the largest id tilefuse tells apart exactly: {fix}")
    data = raw.astype(LABEL_DTYPE)
    data[holes] = np.nan
    return data


def _band_nodata(src, bands: tuple[int, ...]) -> tuple[float | None, ...] | None:
    """The nodata value of each of ``bands`` of the open raster ``src`` (:attr:`RasterSource.nodata`)."""
    values = tuple(None if v is None or np.isnan(v) else float(v) for v in (src.nodatavals[b - 1] for b in bands))
    return values if any(v is not None for v in values) else None


def _variables(path: Path) -> list[str]:
    """Names of the variables (GDAL subdatasets) of a NetCDF/HDF5 file ``path``; [] for other files."""
    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(path) as src:
                return [sub.rsplit(":", 1)[-1] for sub in src.subdatasets]
    except Exception:  # unreadable: the caller's message stands
        return []


def _magnitude_vrt(source: RasterSource) -> str:
    """VRT XML (opened by GDAL as a dataset) whose bands are the moduli of the complex source bands."""
    from xml.sax.saxutils import escape

    srs = f"<SRS>{escape(source.crs.to_wkt())}</SRS>" if source.crs else ""
    bands = "".join(
        f'<VRTRasterBand dataType="Float32" band="{i}" subClass="VRTDerivedRasterBand">'
        "<PixelFunctionType>mod</PixelFunctionType><SourceTransferType>CFloat64</SourceTransferType>"
        f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(source.raster_name())}</SourceFilename>'
        f"<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
        for i, b in enumerate(source.bands, start=1)
    )
    transform = ", ".join(repr(v) for v in source.transform.to_gdal())
    return (
        f'<VRTDataset rasterXSize="{source.width}" rasterYSize="{source.height}">{srs}'
        f"<GeoTransform>{transform}</GeoTransform>{bands}</VRTDataset>"
    )


def _footprint(source: RasterSource) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a raster in its own CRS, also for rotated transforms."""
    t = source.transform
    corners = [t @ (c, r) for c in (0, source.width) for r in (0, source.height)]
    xs, ys = zip(*corners)
    return min(xs), min(ys), max(xs), max(ys)


def parse_crs(value, flag: str = "--crs"):
    """``value`` (EPSG code, WKT, PROJ string, CRS object) as a rasterio CRS, or one line naming ``flag``."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        with rasterio.Env(CPL_LOG="/dev/null"):  # PROJ's own "crs not found" line on stderr, before ours
            return CRS.from_user_input(value)
    except CRSError:
        raise InputError(f"{flag} {value!r} is not a CRS rasterio understands: use e.g. EPSG:32632") from None


def reference_grid(source: RasterSource, crs: str | None = None, resolution: float | tuple[float, float] | None = None) -> Grid:
    """The grid of ``source``, or its extent in ``crs`` and/or at ``resolution`` (north-up)."""
    from rasterio.warp import calculate_default_transform

    t = source.transform
    target = source.crs
    if crs is not None:
        target = parse_crs(crs)
    north_up = t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0
    if target == source.crs and resolution is None and north_up:
        return Grid(source.crs, t, source.width, source.height)
    if target == source.crs and resolution is None and t.b == 0 and t.d == 0:
        # flipped (y ascending, say): the same pixels in north-up order; a reprojection from the
        # resolution (inexact in degrees) made the grid a pixel larger and moved the data
        left, top = min(t.c, t.c + t.a * source.width), max(t.f, t.f + t.e * source.height)
        return Grid(source.crs, Affine(abs(t.a), 0.0, left, 0.0, -abs(t.e), top), source.width, source.height)
    explicit = resolution if resolution is not None and np.isscalar(resolution) else None
    given = resolution
    if resolution is None and target == source.crs:
        resolution = (math.hypot(t.a, t.d), math.hypot(t.b, t.e))
    if resolution is not None:
        try:
            pair = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
            resolution = None if any(isinstance(r, (bool, np.bool_)) for r in pair) else tuple(float(r) for r in pair)
        except (TypeError, ValueError):
            resolution = None
        if resolution is None or len(resolution) != 2 or not all(math.isfinite(r) and r > 0 for r in resolution):
            raise InputError(f"--resolution must be a positive number (resolution=: a number or an (x, y) pair), got {given!r}")
    try:
        transform, width, height = calculate_default_transform(
            source.crs, target, source.width, source.height, *_footprint(source), resolution=resolution
        )
    except OverflowError:  # a pixel size so small that the grid's width is beyond a float (about 10^308 px)
        if resolution is None:
            raise InputError(f"cannot express {source.path.name} in {target}: the grid would be too large") from None
        units = "degrees" if target.is_geographic else (target.linear_units or "units of the CRS")
        raise InputError(
            f"--resolution (resolution=) {given!r} is too small: the output grid would be more than 10^308 px across; "
            f"give the pixel size in {units} ({target.to_string()})"
        ) from None
    except Exception as error:  # pyproj/GDAL raise several types for impossible transforms
        raise InputError(f"cannot express {source.path.name} in {target}: {error}") from None
    if explicit is not None and (width < 2 or height < 2) and source.width > 1 and source.height > 1:
        # typically metres for a grid in degrees: a grid of 1 px, later refused as a scene without valid pixels
        from rasterio.warp import transform_bounds

        left, bottom, right, top = transform_bounds(source.crs, target, *_footprint(source))
        extent_x, extent_y = right - left, top - bottom
        units = "degrees" if target.is_geographic else (target.linear_units or "units of the CRS")
        raise InputError(
            f"--resolution {explicit:g} is larger than the reference's whole extent ({extent_x:.3g} x {extent_y:.3g} {units} "
            f"in {target.to_string()}): give the pixel size in {units}"
        )
    return Grid(target, transform, int(width), int(height))


@dataclass(frozen=True)
class ReadPlan:
    """How the blocks of one raster are read onto a grid (worked out once, used by every task)."""

    offset: tuple[int, int] | None
    """(row, col) of the raster's first pixel on the grid when it sits on the grid already; else None."""
    scale: tuple[float, float]
    """Grid pixels per raster pixel along x and y (GDAL's XSCALE/YSCALE), the same for every block."""
    pad: int
    """Raster pixels read beyond each block's footprint, for the resampling kernel."""


def _aligned_offset(source: RasterSource, grid: Grid) -> tuple[int, int] | None:
    s, g = source.transform, grid.transform
    if source.crs != grid.crs or s.b != 0 or s.d != 0:
        return None
    if not (math.isclose(s.a, g.a, rel_tol=1e-9) and math.isclose(s.e, g.e, rel_tol=1e-9)):
        return None
    col, row = (s.c - g.c) / g.a, (s.f - g.f) / g.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(row), round(col)


def read_plan(source: RasterSource, grid: Grid) -> ReadPlan:
    """The :class:`ReadPlan` of ``source`` on ``grid``.

    GDAL works out the resampling kernel's scale per warped chunk from the
    chunk's shape, so the same pixel would come out differently from
    differently shaped blocks; fixing the scale from the whole raster keeps
    each block equal to the whole-raster warp.
    """
    from rasterio.warp import calculate_default_transform

    offset = _aligned_offset(source, grid)
    if offset is not None:
        return ReadPlan(offset, (1.0, 1.0), 0)
    native, _, _ = calculate_default_transform(source.crs, grid.crs, source.width, source.height, *_footprint(source))
    scale = (abs(native.a / grid.transform.a), abs(native.e / grid.transform.e))
    return ReadPlan(None, scale, 3 + math.ceil(4 / min(1.0, *scale)))


def _check_overlap(source: RasterSource, grid: Grid, what: str) -> None:
    from rasterio.warp import transform_bounds

    try:
        left, bottom, right, top = transform_bounds(source.crs, grid.crs, *_footprint(source), densify_pts=21)
    except Exception as error:  # pyproj/GDAL raise several types for impossible transforms
        raise InputError(f"{what}: cannot transform {source.path.name} into the reference CRS ({error})") from None
    g_left, g_bottom, g_right, g_top = grid.bounds
    overlaps = left < g_right and right > g_left and bottom < g_top and top > g_bottom
    if not (np.isfinite([left, bottom, right, top]).all() and overlaps):
        raise InputError(
            f"{what}: {source.path.name} does not overlap the reference grid: "
            "check that the rasters cover the same place (or choose another --reference)"
        )


def _source_window(source: RasterSource, grid: Grid, rows: tuple[int, int], cols: tuple[int, int], pad: int):
    """(row0, row1, col0, col1) of the raster pixels a grid block needs, or None if it needs none."""
    from rasterio.warp import transform

    (r0, r1), (c0, c1) = rows, cols
    edge = np.linspace(0.0, 1.0, 21)
    ys = np.concatenate([r0 + (r1 - r0) * edge, np.full(21, r1), r0 + (r1 - r0) * edge, np.full(21, r0)])
    xs = np.concatenate([np.full(21, c0), c0 + (c1 - c0) * edge, np.full(21, c1), c0 + (c1 - c0) * edge])
    t = grid.transform
    xs, ys = t.c + t.a * xs + t.b * ys, t.f + t.d * xs + t.e * ys
    try:
        xs, ys = transform(grid.crs, source.crs, xs, ys)
    except Exception:  # pyproj/GDAL raise several types for a block outside the projection's domain
        return None
    inverse = ~source.transform
    points = np.array([inverse @ (x, y) for x, y in zip(xs, ys) if np.isfinite(x) and np.isfinite(y)])
    if points.size == 0:
        return None
    col0, row0 = np.floor(points.min(axis=0)).astype(int) - pad
    col1, row1 = np.ceil(points.max(axis=0)).astype(int) + pad
    row0, col0 = max(row0, 0), max(col0, 0)
    row1, col1 = min(row1, source.height), min(col1, source.width)
    if row1 <= row0 or col1 <= col0:
        return None
    return row0, row1, col0, col1


def _read_block(
    block: np.ndarray, source: RasterSource, grid: Grid, resampling: str, plan: ReadPlan, labels: bool = False, block_info=None
) -> np.ndarray:
    """One (bands, rows, cols) block of ``source`` on ``grid``: float32, NaN where there is no data; with
    ``labels``, :data:`LABEL_DTYPE` of the raw values (:func:`exact_label_values`)."""
    import rasterio
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    (b0, b1), (r0, r1), (c0, c1) = block_info[None]["array-location"]
    indexes = list(range(1, len(source.bands) + 1) if source.magnitude else source.bands)[b0:b1]
    out = np.full((b1 - b0, r1 - r0, c1 - c0), np.nan, LABEL_DTYPE if labels else np.float32)
    if plan.offset is not None:  # already on the grid: read the overlapping window as is
        row, col = plan.offset
        window = max(r0 - row, 0), min(r1 - row, source.height), max(c0 - col, 0), min(c1 - col, source.width)
    else:
        window = _source_window(source, grid, (r0, r1), (c0, c1), plan.pad)
    if window is None or window[1] <= window[0] or window[3] <= window[2]:
        return out
    top, bottom, left, right = window
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning for rasters whose CRS we assume
            with rasterio.open(source.dataset_name()) as src:
                window = Window(left, top, right - left, bottom - top)
                if source.mask_band:
                    masked = src.read(indexes, window=window, masked=True)
                    raw, holes = masked.data, np.ma.getmaskarray(masked)
                else:
                    raw = src.read(indexes, window=window)
                    holes = np.zeros(raw.shape, bool)
                    for k, value in enumerate((source.nodata or ())[b0:b1]):
                        if value is not None:
                            holes[k] = raw[k] == value
                if labels:  # class ids, every one exactly (a label raster with a scale is refused at open)
                    fix = "recode its classes to smaller ids (e.g. 0..254) and pass that raster as --labels"
                    data = exact_label_values(raw, holes, source.raster_name(), fix)
                else:
                    data = raw.astype(np.float32)
                if source.scales is not None:  # physical values: raw * scale + offset, per band
                    for k, (scale, offset) in enumerate(zip(source.scales[b0:b1], source.offsets[b0:b1])):
                        data[k] = apply_scale(raw[k], scale, offset)
                data[holes] = np.nan
    except RasterioError as error:  # a file cut short or damaged since it was opened: its strips or tiles fail
        raise InputError(
            f"{source.path} cannot be read (rows {top}..{bottom - 1}: {clipped(_root_message(error), 100)}): "
            "the file is damaged or truncated; copy or download it again"
        ) from None
    return _place(data, (top, left), out, (r0, c0), source, grid, resampling, plan)


def _root_message(error: BaseException) -> str:
    """The first line of the innermost cause of ``error`` (GDAL's own words, under rasterio's 'Read failed')."""
    while error.__cause__ is not None:
        error = error.__cause__
    return (str(error).splitlines() or [type(error).__name__])[0]


def _place(
    data: np.ndarray,
    at: tuple[int, int],
    out: np.ndarray,
    origin: tuple[int, int],
    source: RasterSource,
    grid: Grid,
    resampling: str,
    plan: ReadPlan,
) -> np.ndarray:
    """Put raster pixels ``data`` (float32, or float64 for labels; NaN = none; its first pixel at raster (row, col) ``at``)
    into the grid block ``out`` whose first pixel is grid (row, col) ``origin``: copied where the
    raster sits on the grid, else warped with the plan's fixed scale. The one resampler of ingest,
    for raster files and in-memory or lazy arrays alike."""
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    (top, left), (r0, c0) = at, origin
    if plan.offset is not None:
        row, col = plan.offset
        out[:, top + row - r0 : top + row - r0 + data.shape[1], left + col - c0 : left + col - c0 + data.shape[2]] = data
        return out
    for bands in _same_holes(data):
        # GDAL's warper masks a source pixel only where every band of the call has no data; a NaN in some bands
        # of it was taken as a value, and bilinear or average spread it over each output pixel it touched (an RGB
        # with 0.07 % nodata lost 11 % of its pixels at 10x coarser). Bands with the same holes warp together.
        part = out if len(bands) == len(out) else np.ascontiguousarray(out[bands])
        reproject(
            data if part is out else data[bands],
            part,
            src_transform=source.transform @ Affine.translation(left, top),
            src_crs=source.crs,
            src_nodata=np.nan,
            dst_transform=grid.transform @ Affine.translation(c0, r0),
            dst_crs=grid.crs,
            dst_nodata=np.nan,
            resampling=Resampling[resampling],
            XSCALE=plan.scale[0],
            YSCALE=plan.scale[1],
        )
        if part is not out:
            out[bands] = part
    return out


def _same_holes(data: np.ndarray) -> list[list[int]]:
    """The bands of ``data`` (bands, rows, cols) grouped by where they are NaN, in band order."""
    holes = np.isnan(data)
    if not holes.any() or (holes == holes[:1]).all():
        return [list(range(len(data)))]
    groups: dict[bytes, list[int]] = {}
    for k, band in enumerate(holes):
        groups.setdefault(np.packbits(band).tobytes(), []).append(k)
    return list(groups.values())


def read_onto_grid(
    source: RasterSource, grid: Grid, resampling: str = "bilinear", chunk: int = READ_CHUNK, labels: bool = False
) -> da.Array:
    """Lazy (bands, y, x) float32 array of ``source`` on ``grid``, NaN where it has no data; with ``labels``,
    :data:`LABEL_DTYPE` (class ids exactly; pass ``"nearest"``).

    Blocks are sized so that neither the block nor the raster window it reads
    exceeds about ``READ_BLOCK_BYTES``.
    """
    if resampling not in RESAMPLING:
        raise InputError(f"unknown resampling {resampling!r}: choose one of {', '.join(RESAMPLING)}")
    # da.empty of millions of chunks grew memory for minutes before the graph existed: refused from the sizes
    check_blocks(grid, read_blocks(source, grid, chunk))
    plan = read_plan(source, grid)
    bands = len(source.bands)
    dtype = LABEL_DTYPE if labels else np.dtype(np.float32)
    template = da.empty((bands, grid.height, grid.width), dtype=dtype, chunks=_block_shape(plan, bands, chunk))
    return da.map_blocks(
        _read_block,
        template,
        source=source,
        grid=grid,
        resampling=resampling,
        plan=plan,
        labels=labels,
        dtype=dtype,
        meta=np.array((), dtype),
    )


def _block_shape(plan: ReadPlan, bands: int, chunk: int) -> tuple[int, int, int]:
    """(bands, rows, cols) of the grid blocks read per task: neither a block nor the raster
    window it reads exceeds about ``READ_BLOCK_BYTES``."""
    shrink = min(1.0, *plan.scale)  # downsampling reads a raster window 1/shrink times the block
    spatial = max(64, int(chunk * shrink))
    return max(1, min(bands, READ_BLOCK_BYTES // (4 * int(spatial / shrink) ** 2))), spatial, spatial


def _place_chunks(
    pieces: list,
    first: tuple[int, int],
    window: tuple[int, int, int, int],
    shape: tuple[int, int, int],
    origin: tuple[int, int],
    dtype=np.float32,
    **kw,
) -> np.ndarray:
    """The grid block ``shape`` (of ``dtype``) at ``origin`` from the source chunks ``pieces`` (rows of (bands, h, w)
    arrays whose first pixel is source (row, col) ``first``), cut to ``window`` and placed."""
    top, bottom, left, right = window
    whole = np.concatenate([np.concatenate(row, axis=2) for row in pieces], axis=1)
    data = np.asarray(whole[:, top - first[0] : bottom - first[0], left - first[1] : right - first[1]], dtype)
    return _place(data, (top, left), np.full(shape, np.nan, dtype), origin, **kw)


def _fill_nan(shape: tuple[int, int, int], dtype=np.float32) -> np.ndarray:
    return np.full(shape, np.nan, dtype)


def array_onto_grid(
    data: da.Array, source: RasterSource, grid: Grid, resampling: str = "bilinear", chunk: int = READ_CHUNK, labels: bool = False
) -> da.Array:
    """Lazy (bands, y, x) float32 array of ``data`` on ``grid``: :func:`read_onto_grid` for an array.

    ``data`` is a (bands, rows, cols) float32 dask array (NaN = no data); with ``labels``, a
    :data:`LABEL_DTYPE` one (:func:`exact_label_values`) and so is the result
    georeferenced by ``source`` (its ``crs``, ``transform``, ``width``,
    ``height``). Each grid block is one task that takes the chunks of ``data``
    its footprint needs and puts them on the grid with the same resampler
    (and fixed scale) as raster files, so an array and the raster it was read
    from come out equal. The graph is built directly (one task per block), so
    it stays cheap for country-scale grids.
    """
    import functools
    from itertools import accumulate

    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    if resampling not in RESAMPLING:
        raise InputError(f"unknown resampling {resampling!r}: choose one of {', '.join(RESAMPLING)}")
    check_blocks(grid, _least_blocks(grid, chunk))  # before a read plan (which can overflow) or one task is made
    plan = read_plan(source, grid)
    data = data.rechunk({0: -1})
    bands = data.shape[0]
    _, spatial, _ = _block_shape(plan, bands, chunk)
    check_blocks(grid, -(-grid.height // spatial) * -(-grid.width // spatial))
    dtype = LABEL_DTYPE if labels else np.dtype(np.float32)
    place = functools.partial(_place_chunks, dtype=dtype, source=source, grid=grid, resampling=resampling, plan=plan)
    row_starts, col_starts = ([0, *accumulate(c)] for c in data.chunks[1:])
    name = "array-onto-grid-" + tokenize(data.name, source, grid, resampling, plan, spatial, dtype)
    layer = {}
    row_edges = list(range(0, grid.height, spatial))
    col_edges = list(range(0, grid.width, spatial))
    for i, r0 in enumerate(row_edges):
        r1 = min(r0 + spatial, grid.height)
        for j, c0 in enumerate(col_edges):
            c1 = min(c0 + spatial, grid.width)
            shape = (bands, r1 - r0, c1 - c0)
            if plan.offset is not None:
                off_r, off_c = plan.offset
                window = max(r0 - off_r, 0), min(r1 - off_r, source.height), max(c0 - off_c, 0), min(c1 - off_c, source.width)
            else:
                window = _source_window(source, grid, (r0, r1), (c0, c1), plan.pad)
            if window is None or window[1] <= window[0] or window[3] <= window[2]:
                layer[(name, 0, i, j)] = (_fill_nan, shape, dtype)
                continue
            top, bottom, left, right = window
            rows = [k for k in range(len(row_starts) - 1) if row_starts[k] < bottom and row_starts[k + 1] > top]
            cols = [k for k in range(len(col_starts) - 1) if col_starts[k] < right and col_starts[k + 1] > left]
            pieces = [[(data.name, 0, k, m) for m in cols] for k in rows]
            first = (row_starts[rows[0]], col_starts[cols[0]])
            layer[(name, 0, i, j)] = (place, pieces, first, window, shape, (r0, c0))
    chunks = (
        (bands,),
        tuple(min(spatial, grid.height - r) for r in row_edges),
        tuple(min(spatial, grid.width - c) for c in col_edges),
    )
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[data])
    return da.Array(graph, name, chunks, dtype=dtype, meta=np.array((), dtype))


def _to_labels(block: np.ndarray, mapping: tuple[tuple[int, int], ...], source: str = "the labels") -> np.ndarray:
    """Label values (:data:`LABEL_DTYPE`, NaN = none) -> uint8 ids: remapped, 255 where none or negative.

    A value that is not a whole number means ``source`` is no class map (a reflectance or dB band given as
    --labels was rounded to a few plausible class ids): InputError; so is an id above 255 that
    ``mapping`` leaves there.
    """
    finite = np.isfinite(block)
    if np.isposinf(block).any():  # above every id, like 300 (and -inf is negative: none, like -1)
        raise InputError(
            f"labels: {source} holds +inf, not a class id: give those pixels the raster's nodata value, or a class id 0..254"
        )
    rounded = np.rint(block)
    fractional = finite & (np.abs(np.subtract(block, rounded, out=np.zeros_like(block), where=finite)) > 1e-3)
    if fractional.any():
        raise InputError(
            f"labels: {source} holds values that are not class ids (e.g. {float(block[fractional][0]):g}): "
            "pass a raster of whole-number class ids as --labels (PATH:N picks its band)"
        )
    values = np.where(finite, rounded, -1).astype(np.int64)
    mapped = values.copy()
    for key, value in mapping:
        mapped[values == key] = value
    above = finite & (mapped > IGNORE)
    if above.any():  # was made 255 (ignore) like nodata: a whole class dropped without a word
        value = int(values[above][0])
        raise InputError(
            f"labels: {source} holds class id {value}, above 254 (a scene's ids are 0..254, 255 = ignore): "
            f"remap it with --label-map {value}:ID (label_map={{{value}: ID}}), or {value}:255 to ignore it"
        )
    labels = np.full(block.shape, IGNORE, np.uint8)
    keep = finite & (mapped >= 0) & (mapped <= IGNORE)
    labels[keep] = mapped[keep]
    return labels


def ingest_rasters(
    modalities: Mapping[str, str | os.PathLike],
    labels: str | os.PathLike | None = None,
    *,
    reference: str | None = None,
    crs: str | None = None,
    resolution: float | tuple[float, float] | None = None,
    resampling: str = "bilinear",
    label_map: Mapping[int, int] | str | None = None,
    class_names: list[str] | None = None,
    complex_mode: str | None = None,
    chunk: int = READ_CHUNK,
    max_pixels: int | None = MAX_PIXELS,
    output: str | os.PathLike | None = None,
) -> xr.Dataset:
    """Lazy scene Dataset of rasters on one grid, ready for :func:`tilefuse.scene.write_scene`.

    ``modalities`` maps names to ``PATH[:BANDS]`` (bands 1-based, e.g.
    ``"s2.tif:2,3,4"``). The grid is the ``reference`` modality's (default the
    first), moved to ``crs`` and/or ``resolution`` if given; ``crs`` is also
    assumed for rasters that have none. Modalities are resampled with
    ``resampling``, labels with nearest, then remapped by ``label_map``
    (``{-1: 255}`` or ``"-1:255"``); negative label values become 255, values above 255 are an error.
    ``complex_mode="magnitude"`` reads complex rasters as their magnitude.
    A grid of more than ``max_pixels`` pixels (None: no limit) is refused
    before any reading is planned (:func:`check_grid_size`); so, from the
    grid's dimensions and the bands, is one whose store would not fit the free
    space of ``output``'s filesystem (the store the Dataset is for, where
    given; :func:`scene_bytes`, :func:`tilefuse.outputs.check_space`), and,
    whatever the limit, one of more than :data:`MAX_BLOCKS` read blocks.
    """
    check_modalities_given(modalities, labels)
    check_label_options(labels, class_names, label_map)
    if complex_mode is not None and complex_mode not in COMPLEX_MODES:
        raise InputError(f"unknown --complex {complex_mode!r}: the only choice is 'magnitude'")
    if resampling not in RESAMPLING:
        raise InputError(f"unknown --resampling {resampling!r}: choose one of {', '.join(RESAMPLING)}")
    mapping = parse_label_map(label_map if isinstance(label_map, str) or label_map is None else ",".join(f"{k}:{v}" for k, v in label_map.items()))
    sources = {
        name: open_source(spec, what=f"modality {name!r}", assume_crs=crs, complex_mode=complex_mode)
        for name, spec in modalities.items()
    }
    reference = reference or next(iter(sources))
    if reference not in sources:
        raise InputError(f"--reference {reference!r} is not a modality (have {', '.join(sources)})")
    grid = reference_grid(sources[reference], crs, resolution)
    check_grid_size(grid.width, grid.height, max_pixels)
    label_source = None
    if labels is not None:
        label_source = open_source(labels, what="labels", assume_crs=crs)
        if len(label_source.bands) != 1:
            raise InputError(
                f"labels: {label_source.path.name} has {len(label_source.bands)} bands: choose one with PATH:N"
            )
        if label_source.scales is not None:
            raise InputError(
                f"labels: {label_source.path.name} has scale {label_source.scales[0]:g} and offset {label_source.offsets[0]:g} "
                "(GDAL band metadata), but class ids are not scaled: unset them (gdal_edit.py -scale 1 -offset 0 FILE) "
                "or pass a raster of class ids"
            )
    for name, source in sources.items():
        _check_overlap(source, grid, f"modality {name!r}")
    if label_source is not None:
        _check_overlap(label_source, grid, "labels")
    # Sizes are checked from the grid before any graph is built: the free-space check of write_scene came only
    # after a graph of millions of tasks had grown memory until the machine ran out.
    if output is not None:
        from tilefuse.outputs import check_space

        size = scene_bytes(grid, sum(len(s.bands) for s in sources.values()), label_source is not None)
        if size < _SPACE_CHECKED:  # beyond, check_blocks refuses it
            check_space(output, size)
    readers = [*sources.values(), *([label_source] if label_source is not None else [])]
    check_blocks(grid, sum(read_blocks(source, grid, chunk) for source in readers))

    arrays = {
        name: (
            read_onto_grid(source, grid, resampling, chunk),
            source.band_names,
            {"source": source.raster_name(), "source_bands": list(source.bands)},
        )
        for name, source in sources.items()
    }
    label = None
    if label_source is not None:
        names = class_names or label_source.class_names()
        attrs = {"source": label_source.raster_name(), **({"class_names": list(names)} if names else {})}
        label = (read_onto_grid(label_source, grid, "nearest", chunk, labels=True)[0], attrs)
    return scene_dataset(grid, arrays, label, mapping, reference)


def scene_dataset(
    grid: Grid,
    arrays: Mapping[str, tuple[da.Array, tuple[str, ...], dict]],
    label: tuple[da.Array, dict] | None,
    label_map: Mapping[int, int],
    reference: str,
) -> xr.Dataset:
    """The lazy scene Dataset of modalities already on ``grid``.

    ``arrays`` maps names to ``(data (bands, y, x) float32 with NaN = no data,
    band names, attrs)``; ``valid`` is where every band of every modality is
    finite. ``label`` is ``(values (y, x) float64 (:data:`LABEL_DTYPE`), NaN = none; attrs)``, turned
    into uint8 ids remapped by ``label_map`` (255 where none or negative; above 255: InputError).
    """
    data_vars: dict[str, xr.DataArray] = {}
    valid = None
    for name, (data, band_names, attrs) in arrays.items():
        present = da.isfinite(data).all(axis=0)
        valid = present if valid is None else valid & present
        data_vars[name] = xr.DataArray(
            data,
            dims=(band_dim(name), "y", "x"),
            coords={band_dim(name): np.array(band_names, dtype=object)},
            attrs=attrs,
        )
    data_vars["valid"] = xr.DataArray(valid, dims=("y", "x"))
    if label is not None:
        values, attrs = label
        ids = values.map_blocks(_to_labels, mapping=tuple(sorted(label_map.items())), source=str(attrs.get("source", "the labels")), dtype=np.uint8)
        data_vars["label"] = xr.DataArray(ids, dims=("y", "x"), attrs=attrs)
    ds = xr.Dataset(data_vars, coords=grid.coords(), attrs={"reference": reference})
    return ds.rio.write_crs(grid.crs).rio.write_transform(grid.transform)
