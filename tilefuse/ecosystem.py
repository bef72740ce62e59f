"""Scenes from the xarray ecosystem: lazy DataArrays with a CRS -> a scene Dataset on one grid.

What people hold after a STAC search or opening COGs, per modality:

- a ``Dataset`` with one variable per band (``(y, x)`` or ``(time, y, x)``),
  as odc-stac's ``load`` returns;
- a ``DataArray`` ``(band, y, x)`` or ``(time, band, y, x)``, as rioxarray's
  ``open_rasterio`` and stackstac's ``stack`` return (or ``(y, x)``: one band);
- a list of those, whose bands are concatenated (bands on different grids,
  e.g. Sentinel-2's 10 m and 20 m bands).

Each input's ``nodata`` (rioxarray's ``rio.nodata``, or ``nodata=``) and NaN
become "no data". Values are stored in physical units, as ingest stores a
raster with a GDAL scale/offset: an array whose attrs hold ``scale_factor`` /
``add_offset`` (or rioxarray's per-band ``scales`` / ``offsets``) holds raw
values, as CF has it (a decoded array keeps them in ``encoding``, e.g.
rioxarray's ``mask_and_scale=True``), and becomes ``value * scale + offset``
after nodata is masked on the raw values; attrs that cannot be matched to the
bands, or a Dataset's own attrs holding them for no variable in particular,
are refused. Labels are class ids, never scaled: labels whose attrs or
encoding state a scale or offset other than 1/0 are refused.

Band names: a Dataset's are its variable names; a DataArray's are its band
coordinate where that holds strings (they move with any selection), else the
``long_name`` attr read as rioxarray writes it, one name per band of the file
in file order, taken through the band coordinate's 1-based band numbers
(``arr.isel(band=[5, 4, 3])`` keeps each name on its band, as ingest of
``PATH:6,5,4`` does). Such an attr does not follow a selection, so where the
coordinate no longer holds the file's band numbers (replaced by wavelengths,
or dropped) it says nothing about which band is which and is not read: the
names are then the coordinate's values (``842.0``), or ``b1``, ``b2``, ...
without a coordinate. Per-band ``scales``/``offsets`` follow the same rule;
where they cannot be matched, unequal ones are refused (equal ones need no
matching). A name never lands on another band.

Coordinates are pixel centres (rioxarray, odc-stac, stackstac's
``xy_coords="center"``), except where ``attrs["transform"]`` (an Affine, or 6
or 9 numbers, as stackstac writes it) has the array's pixel size and the
coordinates sit on its pixel corners (stackstac's default
``xy_coords="topleft"``): they are read as top-left corners, so both give the
store of the raster; corners along one axis and centres along the other are
refused. A stated transform of another pixel size (an array coarsened since)
is ignored.

A ``time`` dimension is reduced by the user's choice before
anything is resampled: one step (an index, or a date), or per pixel the
``"median"`` / ``"mean"`` of the valid steps, or the ``"first"`` / ``"last"``
step in time order where every band is valid. Everything is then put on the
reference modality's grid (or that grid's extent in ``crs`` / at
``resolution``) by the resampler of raster ingest
(:func:`tilefuse.rasters.array_onto_grid`), so an array comes out equal to
``tilefuse ingest`` of the raster it was read from. ``valid``, labels
(nearest, remapped) and band statistics follow ingest's rules exactly.

:func:`scene_from_xarray` returns the lazy Dataset; :func:`from_xarray` writes
it as a scene store with :func:`tilefuse.scene.write_scene`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence, Union

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine

from tilefuse.classes import IGNORE, class_name_list
from tilefuse.errors import InputError, clipped
from tilefuse.rasters import (
    EXACT_IDS,
    LABEL_DTYPE,
    READ_CHUNK,
    RESAMPLING,
    RasterSource,
    _check_overlap,
    apply_scale,
    check_label_options,
    check_modality_names,
    array_onto_grid,
    exact_label_values,
    parse_crs,
    parse_label_map,
    reference_grid,
    scale_dtype,
    scene_dataset,
)

REDUCTIONS = ("median", "mean", "first", "last")
"""Per-pixel reductions of a time dimension (a date or an index picks one step instead)."""
TIME_DIM = "time"

Input = Union[xr.DataArray, xr.Dataset]


def parse_time(text: str | None) -> int | str | None:
    """A ``--time`` value: an integer is an index, anything else a date or a reduction name."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        raise InputError(f"--time is empty: pass a date (2024-06-01), an index, or one of {', '.join(REDUCTIONS)}")
    return int(text) if text.lstrip("-").isdigit() else text


def _spatial_dims(obj: Input, what: str) -> tuple[str, str]:
    try:
        return obj.rio.y_dim, obj.rio.x_dim
    except Exception:  # rioxarray raises MissingSpatialDimensionError
        raise InputError(f"{what} has no spatial dimensions (x/y or longitude/latitude): dims are {tuple(obj.dims)}") from None


def _crs(obj: Input, what: str, assume_crs):
    crs = obj.rio.crs
    if crs is None:
        if assume_crs is None:
            raise InputError(f"{what} has no CRS: set it with .rio.write_crs('EPSG:...') or pass crs=")
        crs = parse_crs(assume_crs, "crs=")
    return crs


def _transform(obj: Input, what: str, ydim: str, xdim: str):
    """The grid's affine transform: the recorded one (exact, as the raster had it) unless the
    coordinates no longer match it (a sliced array), then the one the coordinates give, reading
    them as pixel centres; but coordinates on the pixel corners of ``attrs["transform"]``
    (stackstac's default ``xy_coords="topleft"``) are read as top-left corners."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recorded, computed = obj.rio.transform(), obj.rio.transform(recalc=True)
    except Exception as error:  # rioxarray raises several types for irregular coordinates
        raise InputError(f"{what} has no regular grid ({error}): resample it onto a regular grid first") from None
    tol = 1e-6 * max(abs(computed.a), abs(computed.e))
    found = recorded if all(abs(a - b) <= tol for a, b in zip(recorded, computed)) else computed
    stated = _stated_transform(obj.attrs.get("transform"))
    if stated is None or stated.b or stated.d or computed.b or computed.d or not stated.a or not stated.e:
        return found
    if not all(math.isclose(abs(s), abs(c), rel_tol=1e-6) for s, c in ((stated.a, computed.a), (stated.e, computed.e))):
        return found  # another grid's transform (the array was coarsened or reprojected since): not about these coordinates
    # The first coordinate, in pixels of the stated grid from its origin: whole for top-left corners, whole + 1/2 for centres.
    steps = ((float(obj[xdim].values[0]) - stated.c) / stated.a, (float(obj[ydim].values[0]) - stated.f) / stated.e)
    corner = [abs(k - round(k)) <= 1e-3 for k in steps]
    if not any(corner):
        return found  # centres (as read), or a transform the coordinates are not on
    if not all(corner):
        axis = "x" if corner[0] else "y"
        raise InputError(
            f"{what}: its {axis} coordinates sit on the pixel corners of attrs['transform'] and the other's on pixel centres: "
            "give both as centres (stackstac: xy_coords='center') or both as top-left corners"
        )
    # Top-left corners: the same pixels as the stated grid's (sliced, or flipped, as the coordinates say).
    a = stated.a if computed.a * stated.a > 0 else -stated.a
    e = stated.e if computed.e * stated.e > 0 else -stated.e
    c = stated.c + stated.a * round(steps[0]) + (0.0 if a == stated.a else stated.a)
    f = stated.f + stated.e * round(steps[1]) + (0.0 if e == stated.e else stated.e)
    return Affine(a, 0.0, c, 0.0, e, f)


def _stated_transform(value) -> Affine | None:
    """``attrs["transform"]`` as an Affine (an Affine, or 6 or 9 numbers in affine order); None if it is none of those."""
    if isinstance(value, Affine):
        return value
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        numbers = [float(v) for v in np.asarray(value, dtype=np.float64).ravel()]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in numbers):
        return None
    if len(numbers) == 9 and numbers[6:] == [0.0, 0.0, 1.0] or len(numbers) == 6:
        return Affine(*numbers[:6])
    return None


def _exact_ids(block: np.ndarray, nodata) -> np.ndarray:
    """Label values ``block`` as float64 (every integer id exactly), NaN where they equal ``nodata``."""
    holes = block == nodata if nodata is not None and not np.isnan(nodata) else np.zeros(block.shape, bool)
    fix = "recode its classes to smaller ids (e.g. 0..254) and pass that as labels="
    return exact_label_values(block, holes, "the DataArray", fix)


def _masked(var: xr.DataArray, nodata: float | None, scaling=None, band_dim: str | None = None, ids: bool = False) -> xr.DataArray:
    """float32 with NaN where ``var`` equals its nodata value (``nodata``, else ``var.rio.nodata``), compared with
    the raw values; ``scaling`` (per-band scales and offsets along ``band_dim``, see :func:`_scaling`) is applied
    as ingest applies a raster's (:func:`tilefuse.rasters.apply_scale`). With ``ids`` (labels: class ids, never
    scaled) float64 instead, which holds every id exactly (float32 merged ids above 2^24)."""
    try:
        value = var.rio.nodata if nodata is None else nodata
    except (ValueError, OverflowError):  # rioxarray's: a NaN nodata kept from a float array cast to ints or bools
        value = None  # a value the dtype cannot hold marks no pixel
    if ids:
        data = var.data
        if isinstance(data, da.Array):
            data = da.map_blocks(_exact_ids, data, nodata=value, dtype=LABEL_DTYPE, meta=np.array((), LABEL_DTYPE))
        else:
            data = _exact_ids(np.asarray(data), value)
        return var.copy(data=data)
    if scaling is None:
        out = var.astype(np.float32)
    else:
        scales, offsets = scaling
        work = scale_dtype(var.dtype)
        if band_dim is None:
            out = apply_scale(var, scales[0], offsets[0])
        else:
            out = var.astype(work) * xr.DataArray(np.array(scales, work), dims=band_dim) + xr.DataArray(
                np.array(offsets, work), dims=band_dim
            )
        out = out.transpose(*var.dims).astype(np.float32)
    if value is not None and not np.isnan(value):
        out = out.where(var != value)
    return out


def _file_bands(bands) -> bool:
    """Whether a band coordinate's values ``bands`` can be the 1-based numbers of a file's bands, as rioxarray's are
    (whole numbers, not bools; floats such as wavelengths are not)."""
    return bands is not None and all(
        isinstance(b, (int, np.integer)) and not isinstance(b, (bool, np.bool_)) and b >= 1 for b in bands
    )


def _per_band(value, bands, count: int) -> list | None:
    """A per-band attribute (``long_name``, ``scales``, ``offsets``: one entry per band) for the ``count`` bands of
    an array whose band coordinate holds ``bands`` (None: it has none), or None where it cannot be matched.

    rioxarray keeps such attributes as the file has them, one entry per band of the file in file order, and
    they do not follow a selection (``isel(band=[2, 1, 0])``); only its band coordinate does: it holds the
    1-based numbers of the file's bands the array still has. So where every band is a whole number within the
    list, band ``n`` takes entry ``n - 1``. Where the coordinate holds anything else (names, wavelengths) or
    is gone, nothing says which file band each band of the array is (a reordered subset looks like the whole
    file), so the attribute is matched only where that cannot matter: all its entries equal (one band's file
    has one entry). A coordinate of band numbers overwritten after a reorder
    (``isel(band=[1, 0]).assign_coords(band=[1, 2])``) cannot be told from the file's own and is taken as it
    says."""
    if value is None or isinstance(value, (str, bytes)) or np.ndim(value) != 1:
        return None
    entries = list(np.asarray(value, dtype=object))
    if not entries:
        return None
    if _file_bands(bands) and all(int(b) <= len(entries) for b in bands):
        return [entries[int(b) - 1] for b in bands]
    return [entries[0]] * count if all(_same(e, entries[0]) for e in entries) else None


def _same(a, b) -> bool:
    """Whether two entries of a per-band attribute are equal (NaN equals NaN: it is refused later, once)."""
    try:
        return bool(a == b) or (a != a and b != b)
    except (TypeError, ValueError):
        return False


_SCALE_KEYS = (("scale_factor", "scales", 1.0), ("add_offset", "offsets", 0.0))


def _scaling(attrs: Mapping, bands, count: int, what: str) -> tuple[list[float], list[float]] | None:
    """The scales and offsets that ``attrs`` state for the ``count`` bands (CF's ``scale_factor``/``add_offset``,
    or rioxarray's per-band ``scales``/``offsets``, mapped by :func:`_per_band`); None where all are 1 and 0.
    Unequal per-band ones that cannot be matched, as the band coordinate no longer holds the file's band
    numbers, are refused: another band's factor was applied to each band without a word."""
    found = []
    for one, many, default in _SCALE_KEYS:
        key = one if one in attrs else many if many in attrs else None
        value = attrs.get(key, default)
        per_band = [value] * count if key is None or np.ndim(value) == 0 else _per_band(value, bands, count)
        try:
            numbers = None if per_band is None else [float(v) for v in per_band]
        except (TypeError, ValueError):
            numbers = None
        if per_band is None and np.ndim(value) == 1 and np.size(value) > 1 and not _file_bands(bands):
            coord = "was dropped" if bands is None else "holds no file band numbers"
            raise InputError(
                f"{what}: its attrs {key}={clipped(repr(value))} differ per band, but its band coordinate {coord}: "
                f"it no longer says which file band each band is, so the per-band {key} cannot be matched: keep "
                f"rioxarray's band coordinate (the file's band numbers) when selecting, or apply the {key} yourself "
                f"(e.g. open it with mask_and_scale=True) and drop the {key!r} attr"
            )
        if numbers is None or not all(math.isfinite(v) for v in numbers):
            raise InputError(
                f"{what}: its attrs {key}={clipped(repr(value))} cannot be matched to its {count} band(s): "
                f"apply it yourself (or open it with mask_and_scale=True) and drop the {key!r} attr"
            )
        found.append(numbers)
    scales, offsets = found
    return None if all(v == 1.0 for v in scales) and all(v == 0.0 for v in offsets) else (scales, offsets)


def _states_scaling(attrs: Mapping) -> bool:
    """Whether ``attrs`` (or an encoding) hold a scale other than 1 or an offset other than 0, in any of
    the forms :func:`_scaling` reads."""
    for one, many, default in _SCALE_KEYS:
        for key in (one, many):
            try:
                values = np.asarray(attrs.get(key, default), dtype=np.float64).ravel()
            except (TypeError, ValueError):
                return True  # not numbers: not a 1 or a 0 either
            if (values != default).any():
                return True
    return False


def _band_array(obj: Input, what: str, nodata: float | None, ids: bool = False) -> xr.DataArray:
    """``obj`` as float32 ``([time,] band, y, x)`` with NaN = no data, physical values (scale and offset applied)
    and string band names; with ``ids`` (labels), float64 class ids (:func:`_masked`)."""
    ydim, xdim = _spatial_dims(obj, what)
    if isinstance(obj, xr.Dataset):
        keys = [n for n, v in obj.data_vars.items() if ydim in v.dims and xdim in v.dims]
        if not keys:
            raise InputError(f"{what}: the Dataset has no variable with dims ({ydim}, {xdim})")
        names = [_band_name(n) for n in keys]
        bands = []
        for key, name in zip(keys, names):
            var = obj[key]
            own = any(k in var.attrs for pair in _SCALE_KEYS for k in pair[:2])
            if not own and _states_scaling(obj.attrs):  # arr.to_dataset(dim="band") puts them there
                raise InputError(
                    f"{what}: the Dataset's attrs hold a scale_factor/add_offset for no variable in particular: "
                    "set them on each variable's attrs (or apply them, e.g. open with mask_and_scale=True)"
                )
            bands.append(_masked(var, nodata, _scaling(var.attrs, None, 1, f"{what} variable {name!r}")))
        for name, band in zip(names, bands):
            extra = set(band.dims) - {TIME_DIM, ydim, xdim}
            if extra:
                raise InputError(f"{what}: variable {name!r} has dims {band.dims}: one variable per band takes ({TIME_DIM},) {ydim}, {xdim}")
        arr = xr.concat(bands, dim="band", coords="minimal", compat="override", join="exact")
        arr = arr.assign_coords(band=np.array(names, dtype=object))
    else:
        source = obj
        others = [d for d in source.dims if d not in (TIME_DIM, ydim, xdim)]
        if len(others) > 1:
            raise InputError(f"{what} has dims {source.dims}: expected ([time,] band, y, x) with one band dimension")
        if not others and obj.name is None and "band" in source.coords and source["band"].ndim == 0:
            source, others = source.expand_dims("band", axis=-3), ["band"]  # arr.isel(band=3): that band, not 'b1'
        if others:
            dim = others[0]
            count = source.sizes[dim]
            coord = source[dim].values if dim in source.coords else None
            values = coord if coord is not None else np.arange(1, count + 1)
            if coord is not None and all(isinstance(v, str) for v in coord):
                names = [str(v) for v in coord]  # names that moved with any selection
            else:
                long_names = obj.attrs.get("long_name")
                listed = [long_names] if isinstance(long_names, str) and count == 1 else _per_band(long_names, coord, count)
                ok = listed is not None and all(isinstance(n, str) and n for n in listed) and len(set(listed)) == count
                names = [str(n) for n in listed] if ok else [_band_name(v) for v in values]
            arr = _masked(source, nodata, _scaling(obj.attrs, coord, count, what), dim, ids=ids)
            arr = arr.rename({dim: "band"}) if dim != "band" else arr
        else:
            arr = _masked(source, nodata, _scaling(obj.attrs, None, 1, what), ids=ids).expand_dims(band=[0])
            names = [str(obj.name or "b1")]
        arr = arr.assign_coords(band=np.array(names, dtype=object))
    order = ([TIME_DIM] if TIME_DIM in arr.dims else []) + ["band", ydim, xdim]
    return arr.transpose(*order)


def _first_valid(block: np.ndarray, last: bool = False) -> np.ndarray:
    """(time, band, y, x) -> (band, y, x): per pixel the first (last) step where every band is finite."""
    ok = np.isfinite(block).all(axis=1)  # (time, y, x)
    steps = ok[::-1] if last else ok
    index = np.argmax(steps, axis=0)
    index = block.shape[0] - 1 - index if last else index
    out = np.take_along_axis(block, index[None, None], axis=0)[0]
    out[:, ~ok.any(axis=0)] = np.nan
    return out


def _reduce_block(block: np.ndarray, how: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
        if how == "median":
            return np.nanmedian(block, axis=0).astype(np.float32)
        if how == "mean":
            return np.nanmean(block, axis=0, dtype=np.float64).astype(np.float32)
    return _first_valid(block, last=how == "last")


def _reduce_time(arr: xr.DataArray, time, what: str) -> tuple[xr.DataArray, str | None]:
    """Drop ``arr``'s time dimension as ``time`` says; also returns what was done (for attrs)."""
    if TIME_DIM not in arr.dims:
        return arr, None
    steps = arr.sizes[TIME_DIM]
    if time is None:
        if steps == 1:
            return arr.isel({TIME_DIM: 0}, drop=True), None
        raise InputError(
            f"{what} has {steps} time steps: pass time= an index, a date, or one of {', '.join(REDUCTIONS)}"
        )
    if isinstance(time, str) and time in REDUCTIONS:
        if TIME_DIM in arr.coords:
            arr = arr.sortby(TIME_DIM)
        data = arr.data.rechunk({0: -1})
        reduced = da.map_blocks(_reduce_block, data, how=time, drop_axis=0, dtype=np.float32)
        coords = {k: v for k, v in arr.coords.items() if TIME_DIM not in v.dims}
        return xr.DataArray(reduced, dims=arr.dims[1:], coords=coords, attrs=arr.attrs), time
    if isinstance(time, (int, np.integer)) and not isinstance(time, bool):
        if not -steps <= time < steps:
            raise InputError(f"time={time} is out of range: {what} has {steps} time steps")
        picked = arr.isel({TIME_DIM: int(time)})
    else:
        try:
            picked = arr.sel({TIME_DIM: time})
        except (KeyError, TypeError, ValueError):
            times = arr[TIME_DIM].values if TIME_DIM in arr.coords else []
            span = f"{times.min()} .. {times.max()}" if len(times) else "no time coordinate"
            raise InputError(
                f"time={time!r} matches no step of {what} ({span}): pass a date it has, an index, or one of {', '.join(REDUCTIONS)}"
            ) from None
        if TIME_DIM in picked.dims:
            if picked.sizes[TIME_DIM] != 1:
                raise InputError(f"time={time!r} matches {picked.sizes[TIME_DIM]} steps of {what}: pass one date or a reduction")
            picked = picked.isel({TIME_DIM: 0})
    label = str(picked[TIME_DIM].values) if TIME_DIM in picked.coords else str(time)
    return picked.drop_vars(TIME_DIM, errors="ignore"), label


def _prepare(
    obj: Input, what: str, *, time, nodata, assume_crs, chunk: int, ids: bool = False
) -> tuple[da.Array, RasterSource, str | None]:
    """One input -> (lazy (band, y, x) float32 data, its georeferencing as a RasterSource, time label); with
    ``ids`` (labels), float64 data that holds every class id exactly."""
    if not isinstance(obj, (xr.DataArray, xr.Dataset)):
        raise InputError(f"{what} is a {type(obj).__name__}: pass an xarray DataArray or Dataset (or a list of them)")
    crs = _crs(obj, what, assume_crs)
    ydim, xdim = _spatial_dims(obj, what)
    complex_vars = [v for v in (obj.data_vars.values() if isinstance(obj, xr.Dataset) else [obj]) if np.iscomplexobj(v)]
    if complex_vars:  # float32 of it was its real part, kept without a word
        raise InputError(
            f"{what} holds complex data ({complex_vars[0].dtype}): pass its amplitude, e.g. abs(arr) (xarray's abs keeps its CRS)"
        )
    if obj.sizes[ydim] < 2 or obj.sizes[xdim] < 2:
        raise InputError(f"{what} is {obj.sizes[ydim]} x {obj.sizes[xdim]} px: a scene needs at least 2 x 2")
    transform = _transform(obj, what, ydim, xdim)
    arr = _band_array(obj, what, nodata, ids=ids)
    if not isinstance(arr.data, da.Array):
        arr = arr.chunk({ydim: chunk, xdim: chunk})
    arr, picked = _reduce_time(arr, time, what)
    names = tuple(str(n) for n in arr["band"].values)
    source = RasterSource(
        path=Path(f"<{what}>"),
        bands=tuple(range(1, len(names) + 1)),
        crs=crs,
        transform=transform,
        width=int(obj.sizes[xdim]),
        height=int(obj.sizes[ydim]),
        band_names=names,
    )
    return arr.data.astype(LABEL_DTYPE if ids else np.float32), source, picked


def _class_names(value) -> list[str] | None:
    """Class names from a label array's attrs: a list, or the JSON list GeoTIFF tags hold."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return [str(v) for v in value] if isinstance(value, (list, tuple)) and value else None


def _label_map(value) -> dict[int, int]:
    """A ``label_map=`` dict, checked as ``--label-map`` is: whole-number keys, targets 0..255 (a float target was
    truncated and a string key mapped nothing, without a word)."""
    if not isinstance(value, Mapping):
        raise InputError(f"label_map= must be a dict of label value -> id (or a string like '-1:255'), got {type(value).__name__}")

    def whole(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    for key, target in value.items():
        if not (whole(key) and whole(target) and 0 <= target <= 255):
            raise InputError(f"label_map= must map whole-number label values to ids 0..255 (255 = ignore), got {key!r}: {target!r}")
        if abs(int(key)) > EXACT_IDS:  # no label value can equal it (those are refused): it mapped nothing
            raise InputError(
                f"label_map= key {int(key)} is beyond 2^53, the largest class id tilefuse tells apart exactly: recode the labels to smaller ids"
            )
    return {int(k): int(v) for k, v in value.items()}


def _band_name(value) -> str:
    """A band's name from its coordinate or variable name: a string as it is, a whole number ``b<n>`` (rioxarray's
    band numbers 1, 2, ...), any other number as it reads (a wavelength 842.0 is ``842.0``, not ``b842.0``; its
    ``.0`` stays, so it is a name a checkpoint compares, never a made-up band number)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return f"b{int(value)}"
    return str(value)


def _pieces(value, name: str) -> list:
    if isinstance(value, (xr.DataArray, xr.Dataset)):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        return list(value)
    raise InputError(f"modality {name!r}: pass an xarray DataArray or Dataset (or a non-empty list of them)")


def scene_from_xarray(
    modalities: Mapping[str, Input | Sequence[Input]],
    labels: xr.DataArray | None = None,
    *,
    reference: str | None = None,
    time: int | str | object | None = None,
    crs: str | None = None,
    resolution: float | tuple[float, float] | None = None,
    resampling: str = "bilinear",
    nodata: float | Mapping[str, float] | None = None,
    label_map: Mapping[int, int] | str | None = None,
    class_names: list[str] | None = None,
    chunk: int = READ_CHUNK,
) -> xr.Dataset:
    """Lazy scene Dataset of xarray inputs on one grid, ready for :func:`tilefuse.scene.write_scene`.

    ``modalities`` maps names to a DataArray ``([time,] band, y, x)``, a
    Dataset with one variable per band, or a list of those (bands
    concatenated). ``time`` reduces a time dimension: an index, a date
    (``"2024-06-01"``, a ``datetime``), or one of :data:`REDUCTIONS`; an input
    with several steps needs it. The grid is the ``reference`` modality's
    (default the first; its first piece), moved to ``crs`` and/or
    ``resolution`` if given (``crs`` is also assumed for inputs without one).
    Modalities are resampled with ``resampling``; ``labels`` (``(y, x)``, no
    time) with nearest, remapped by ``label_map`` (negative values
    become 255 = ignore, values above 255 are an error). ``nodata`` (one value, or one per modality name)
    overrides the modalities' own nodata values; labels keep theirs. ``class_names`` names the label ids from 0:
    a list, or a dict ``{id: name}`` (ids it leaves out are ``class_<id>``).
    """
    if not isinstance(modalities, Mapping):  # the array itself, or a list of arrays
        raise InputError(
            f"modalities= must be a dict of modality name -> DataArray/Dataset, got {type(modalities).__name__}: "
            "pass e.g. {'optical': arr}"
        )
    if not modalities:
        raise InputError("no modality given: pass at least one name -> DataArray/Dataset")
    if resampling not in RESAMPLING:
        raise InputError(f"unknown resampling={resampling!r}: choose one of {', '.join(RESAMPLING)}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"chunk= must be a whole number of px >= 1, got {chunk!r}")
    if isinstance(class_names, str):  # its letters became the class names
        raise InputError(f"class_names= must be a list of names, one per class id, got the string {class_names!r}: pass e.g. ['water', 'forest']")
    class_names = class_name_list(class_names)
    mapping = parse_label_map(label_map) if isinstance(label_map, str) or label_map is None else _label_map(label_map)
    reference = reference or next(iter(modalities))
    if reference not in modalities:
        raise InputError(f"reference={reference!r} is not a modality (have {', '.join(modalities)})")
    check_modality_names(list(modalities))  # those ingest refuses: reserved ('x', 'spatial_ref'), '*_band', twice
    check_label_options(labels, class_names, label_map)
    if isinstance(nodata, Mapping):
        unknown = set(nodata) - set(modalities)
        if unknown:
            raise InputError(f"nodata= names {sorted(unknown)[0]!r}, which is not a modality (have {', '.join(modalities)})")
    options = {"time": time, "assume_crs": crs, "chunk": chunk}
    prepared = {
        name: [
            _prepare(
                piece,
                f"modality {name!r}" + (f" piece {i}" if len(pieces) > 1 else ""),
                nodata=nodata.get(name) if isinstance(nodata, Mapping) else nodata,
                **options,
            )
            for i, piece in enumerate(pieces)
        ]
        for name, pieces in ((name, _pieces(value, name)) for name, value in modalities.items())
    }
    grid = reference_grid(prepared[reference][0][1], crs, resolution)
    arrays = {}
    for name, pieces in prepared.items():
        on_grid, band_names, steps = [], [], []
        for data, source, picked in pieces:
            _check_overlap(source, grid, f"modality {name!r}")
            on_grid.append(array_onto_grid(data, source, grid, resampling, chunk))
            band_names.extend(source.band_names)
            steps.append(picked)
        attrs = {"source": "xarray"}
        if any(steps):
            attrs["time"] = steps[0] if len(set(steps)) == 1 else [str(s) for s in steps]
        data = on_grid[0] if len(on_grid) == 1 else da.concatenate(on_grid, axis=0)
        arrays[name] = (data, _distinct_band_names(band_names, f"modality {name!r}"), attrs)
    label = None
    if labels is not None:
        if not isinstance(labels, xr.DataArray):
            hint = f", e.g. labels[{next(iter(labels.data_vars))!r}]" if isinstance(labels, xr.Dataset) and labels.data_vars else ""
            raise InputError(f"labels is a {type(labels).__name__}: pass a (y, x) xarray DataArray{hint}")
        if TIME_DIM in labels.dims:
            raise InputError("labels have a time dimension: pass one (y, x) label map (e.g. labels.isel(time=0))")
        scaled = next((held for held in (labels.attrs, labels.encoding) if _states_scaling(held)), None)
        if scaled is not None:  # class ids are never scaled (ingest refuses such a label raster too)
            how = "its attrs state" if scaled is labels.attrs else "it was opened with mask_and_scale, which applied"
            raise InputError(
                f"labels: {how} a scale/offset other than 1/0 (scale_factor/add_offset), but class ids are not scaled: "
                "pass the class ids as stored (mask_and_scale=False, and drop those attrs), or unset them in the raster "
                "(gdal_edit.py -scale 1 -offset 0 FILE)"
            )
        values, source, _ = _prepare(labels, "labels", time=None, nodata=None, assume_crs=crs, chunk=chunk, ids=True)
        if values.shape[0] != 1:
            raise InputError(f"labels have {values.shape[0]} bands: pass one (y, x) label map")
        _check_overlap(source, grid, "labels")
        names = class_names or _class_names(labels.attrs.get("class_names"))
        attrs = {"source": "xarray", **({"class_names": list(names)} if names else {})}
        label = (array_onto_grid(values, source, grid, "nearest", chunk, labels=True)[0], attrs)
    return scene_dataset(grid, arrays, label, mapping, reference)


def _distinct_band_names(names: list[str], what: str) -> tuple[str, ...]:
    """One name per band of a modality built from pieces: names made up for unnamed bands (``b1``, ``b2``...)
    count the modality's bands (two unnamed pieces were both 'b1', and ``.sel(band="b1")`` took both); a name
    two pieces share is refused (a checkpoint tells bands apart by name)."""
    made_up = re.compile(r"b[0-9]+")
    if len(set(names)) == len(names):
        return tuple(names)
    names = [f"b{i}" if made_up.fullmatch(n) else n for i, n in enumerate(names, 1)]
    shared = next((n for n in names if names.count(n) > 1), None)
    if shared is not None:
        raise InputError(
            f"{what}: band name {shared!r} is given to {names.count(shared)} of its bands: name each band its own "
            "(e.g. piece.assign_coords(band=[...])), or pass the pieces as modalities of their own"
        )
    return tuple(names)


def from_xarray(
    out: str | os.PathLike,
    modalities: Mapping[str, Input | Sequence[Input]],
    labels: xr.DataArray | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    **options,
) -> Path:
    """Write the scene of :func:`scene_from_xarray` (same ``options``) as the store ``out``; returns its path."""
    import rasterio

    from tilefuse.rasters import GDAL_CACHE_BYTES
    from tilefuse.scene import write_scene

    ds = scene_from_xarray(modalities, labels, **options)
    inputs = _sources([*modalities.values(), labels])
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        return write_scene(ds, Path(out), overwrite=overwrite, progress=progress, inputs=inputs, require_labelled=True)


def _sources(items) -> list[str]:
    """Files the inputs were opened from (xarray and rioxarray keep them in ``encoding["source"]``)."""
    found: list[str] = []
    for item in items:
        if isinstance(item, xr.Dataset):
            found += _sources(item.data_vars.values())
        elif isinstance(item, xr.DataArray):
            source = item.encoding.get("source")
            found += [source] if isinstance(source, (str, os.PathLike)) else []
        elif isinstance(item, (list, tuple)):
            found += _sources(item)
    return found
