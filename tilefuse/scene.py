"""Scene stores: the zarr v3 layout every part of tilefuse reads and writes.

A scene store is a zarr group that ``xarray.open_zarr(path, decode_coords="all")``
opens as a Dataset with CRS (via rioxarray):

- one variable per modality, dims ``(<name>_band, y, x)`` (e.g. ``sar_band``:
  xarray needs one size per dimension name, and modalities differ in band
  count), band names as that coordinate where known, band statistics in attrs
  (``band_mean``, ``band_std``, ``band_count``: lists, one value per band,
  computed over ``valid`` pixels);
- ``valid (y, x) bool``: where every required modality has data;
- optional ``label (y, x) uint8``: 255 = ignore, ``class_names`` in its attrs;
- a ``spatial_ref`` coordinate carrying CRS and transform.

Stores are written under a temporary name and renamed when complete, so no
reader sees a half-written store.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import dask
import dask.array as da
import dask.threaded
import numpy as np
import xarray as xr
import zarr

from tilefuse.classes import IGNORE, class_names_problem
from tilefuse.errors import InputError, clipped, symlink_loop
from tilefuse.storage import DIGESTS_ATTR, FORMAT, FORMAT_ATTR, WRITE_EMPTY_CHUNKS, compressors, consolidate, record_digests, with_checksums

STORE_KIND = "tilefuse_store"
CHUNK = 512
"""Spatial chunk edge of every array; a power of two, so chunks nest inside prediction blocks."""
SHARD = 2048
"""Spatial shard edge where shards are used (also the default prediction block)."""
TARGET_CHUNK_BYTES = 16 << 20
MAX_SHARD_BYTES = 256 << 20


def band_dim(modality: str) -> str:
    """The band dimension of a modality variable: ``"sar"`` -> ``"sar_band"``."""
    return f"{modality}_band"


def store_band_names(ds: xr.Dataset, modality: str) -> list[str] | None:
    """The band names a scene records for ``modality`` (its band coordinate), or None where it records none
    (a checkpoint records them: :func:`tilefuse.checkpoint.band_names_conflict`)."""
    dim = band_dim(modality)
    if dim not in ds.coords:
        return None
    return [str(v) for v in ds[dim].values]


def modalities(ds: xr.Dataset) -> list[str]:
    """Names of the modality variables of a scene, in store order."""
    names = ds.attrs.get("modalities")
    if names is None:
        names = [n for n, v in ds.data_vars.items() if v.dims == (band_dim(str(n)), "y", "x")]
    return list(names)


def stored_band_stats(ds: xr.Dataset, modality: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The stored per-band (mean, std, count) of a modality as float64 arrays, or None where it has none.

    Statistics that are not one finite number per band (std and count >= 0)
    are a damaged store: an InputError (a NaN mean normalised every input to 0,
    a negative std was pooled as a positive one, a string was a traceback).
    """
    attrs = ds[modality].attrs
    if "band_mean" not in attrs or "band_std" not in attrs:
        return None
    bands = int(ds[modality].sizes[band_dim(modality)])
    out = []
    for key, least in (("band_mean", -np.inf), ("band_std", 0.0), ("band_count", 0.0)):
        value = attrs.get(key, [1] * bands)
        if not (
            isinstance(value, (list, tuple))
            and len(value) == bands
            and all(isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_)) and np.isfinite(v) and v >= least for v in value)
        ):
            raise InputError(
                f"modality {modality!r} has damaged band statistics ({key} must be {bands} finite numbers"
                f"{' >= 0' if least == 0 else ''}, got {clipped(repr(value))}): the store is corrupt, re-ingest it with `tilefuse ingest`"
            )
        out.append(np.asarray(value, dtype=np.float64))
    return out[0], out[1], out[2]


def band_stats(ds: xr.Dataset, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (mean, std) of a modality, as float32 arrays; std is never 0."""
    stats = stored_band_stats(ds, modality)
    if stats is None:
        raise InputError(f"modality {modality!r} has no band statistics: re-ingest the store with `tilefuse ingest`")
    mean, std, _ = stats
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def normalise(data: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Standardise ``(C, ...)`` band data to float32; NaN and inf become 0 (the band mean)."""
    shape = (-1,) + (1,) * (data.ndim - 1)
    out = np.empty(data.shape, np.float32)  # C-contiguous whatever the view (a rotated patch): the one copy
    np.subtract(data, np.asarray(mean, np.float32).reshape(shape), out=out, dtype=np.float32, casting="unsafe")
    out /= np.asarray(std, np.float32).reshape(shape)
    if not np.isfinite(out).all():  # one pass where all is finite (the usual case), not three
        out[~np.isfinite(out)] = 0.0
    return out


def encoding_for(var: xr.DataArray, chunk: int = CHUNK, shard: int | None = SHARD) -> dict:
    """Zarr encoding (chunks, optional shards, Blosc + crc32c codecs) for one variable.

    Spatial chunks are ``chunk`` px; band-heavy variables (hyperspectral) are
    also chunked along ``band`` to keep chunks near 16 MB. Shards of ``shard``
    px are used only where one shard stays under 256 MB, since a shard is
    written by one task.
    """
    itemsize = var.dtype.itemsize
    spatial = tuple(min(chunk, n) for n in var.shape[-2:])
    if var.ndim == 3:
        per_band = spatial[0] * spatial[1] * itemsize
        chunks = (max(1, min(var.shape[0], TARGET_CHUNK_BYTES // per_band)), *spatial)
    else:
        chunks = spatial
    enc: dict = {"chunks": chunks, "compressors": compressors()}
    if shard is not None and any(n > chunk for n in var.shape[-2:]):
        bands = var.shape[0] if var.ndim == 3 else 1
        if bands * shard * shard * itemsize <= MAX_SHARD_BYTES:
            # a shard must hold whole chunks; it may run past the array's edge
            edges = [min(shard, -(-n // chunk) * chunk) for n in var.shape[-2:]]
            if any(edge % chunk for edge in edges):
                raise InputError(f"shard= must be None or a whole number of px, a multiple of chunk= ({chunk}), got {shard!r}")
            enc["shards"] = (*((var.shape[0],) if var.ndim == 3 else ()), *edges)
            # whole chunk edges inside a shard (a side shorter than ``chunk`` would not divide the shard)
            enc["chunks"] = (*((var.shape[0],) if var.ndim == 3 else ()), chunk, chunk)
    if np.issubdtype(var.dtype, np.floating):
        enc["fill_value"] = np.nan
    return enc


def write_chunks(enc: dict) -> tuple[int, ...]:
    """The dask chunk shape that writes whole shards (or chunks) and never splits one."""
    return tuple(enc.get("shards", enc["chunks"]))


def _block_sums(block: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(bands, 1, 1, 3): count, sum and sum of squares of each band over valid, finite pixels."""
    out = np.zeros((block.shape[0], 1, 1, 3), np.float64)
    for i, band in enumerate(block):  # one band at a time keeps the float64 copy small
        ok = valid[0] & np.isfinite(band)
        x = band[ok].astype(np.float64)
        out[i, 0, 0] = ok.sum(), x.sum(), np.dot(x, x)
    return out


def _band_sums(data: da.Array, valid: da.Array) -> tuple[da.Array, da.Array, da.Array]:
    """Per-band count, sum and sum of squares over valid, finite pixels (float64)."""
    valid = valid[None].rechunk(((1,), *data.chunks[1:]))
    chunks = (data.chunks[0], (1,) * data.numblocks[1], (1,) * data.numblocks[2], (3,))
    per_block = da.map_blocks(_block_sums, data, valid, new_axis=3, chunks=chunks, dtype=np.float64)
    sums = per_block.sum(axis=(1, 2))
    return sums[:, 0], sums[:, 1], sums[:, 2]


def count_labels(label: da.Array) -> da.Array:
    """Pixels per label value 0..255 of a lazy (y, x) label array: a lazy int64 array of length 256."""

    def count(block: np.ndarray) -> np.ndarray:
        return np.bincount(block.ravel(), minlength=256)[None, None, :]

    blocks = label.astype(np.uint8).map_blocks(
        count, new_axis=2, chunks=((1,) * label.numblocks[0], (1,) * label.numblocks[1], (256,)), dtype=np.int64
    )
    return blocks.sum(axis=(0, 1))


def compute_then_raise(*collections):
    """``dask.compute``, where a failed task's error is raised only once no other task still runs.

    On dask's threaded scheduler the first error is raised at once while the
    other threads finish their chunk writes; those landed after the caller had
    removed the temporary store, and recreated it (a full disk left a
    half-written hidden store behind). Here the threads run in a pool of this
    call's own, shut down (waiting) before anything is raised. Other schedulers
    (a distributed client, ``scheduler="sync"``) run as configured.
    """
    from dask.base import get_scheduler

    if get_scheduler(collections=[c for c in collections if dask.is_dask_collection(c)]) is not dask.threaded.get:
        return dask.compute(*collections)
    pool = ThreadPoolExecutor(dask.config.get("num_workers", None) or os.cpu_count())
    try:
        return dask.compute(*collections, pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_scene(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    chunk: int = CHUNK,
    shard: int | None = SHARD,
    progress: bool = False,
    inputs=(),
    require_labelled: bool = False,
) -> Path:
    """Write a scene Dataset (lazy or in memory) to a zarr v3 store, atomically.

    Band statistics of every modality are computed in the same streaming pass
    as the write and stored in the modality's attrs; so are the pixel counts
    per label value (``label`` attrs ``class_counts`` for ids 0..254, and
    ``ignore_count``; ``class_names`` default to ``class_<id>``). ``ds`` must hold the
    modality variables ``(band, y, x)``, ``valid (y, x)`` and optionally
    ``label (y, x)``, with a CRS set through rioxarray. The store is created
    through the guarded writer (:func:`tilefuse.outputs.create`, locked while
    written): ``overwrite`` replaces only a scene store, and ``inputs`` (the
    paths ``ds`` is read from) are never at, inside or around ``path``. With ``require_labelled`` (ingest,
    from_xarray), a ``label`` without a single labelled pixel is an InputError and no store.
    """
    from tilefuse.outputs import claim, create, local_path

    path = local_path(path, "output", output=True)  # a URL is refused, ~ is the home folder
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise InputError(f"chunk= must be a whole number of px >= 1, got {chunk!r}")
    if shard is not None and (isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or shard < 1):
        raise InputError(f"shard= must be None or a whole number of px, a multiple of chunk= ({chunk}), got {shard!r}")
    claim(path, "scene", inputs=inputs, overwrite=overwrite)
    if "valid" not in ds:
        raise InputError("the scene Dataset has no 'valid' (y, x) mask: add one (True where every modality has data)")
    if "label" in ds and "class_names" in ds["label"].attrs:
        problem = class_names_problem(ds["label"].attrs["class_names"])
        if problem:
            raise InputError(f"the class names {problem}: give each class id its own non-empty name (--class-names)")
    if ds.rio.crs is None:
        raise InputError("the scene has no CRS: pass --crs (e.g. EPSG:32632)")
    names = [str(n) for n in ds.data_vars if ds[n].dims == (band_dim(str(n)), "y", "x")]
    if not names:
        raise InputError("the scene Dataset has no modality: each is a (<name>_band, y, x) variable, e.g. optical (optical_band, y, x)")

    ds = _transform_of_coordinates(ds.copy())
    ds.attrs[STORE_KIND] = "scene"
    ds.attrs[FORMAT_ATTR] = FORMAT  # every chunk written and checksummed (tilefuse.storage)
    ds.attrs.pop(DIGESTS_ATTR, None)  # a store's record is its own: written last (a Dataset read from a store has one)
    ds.attrs["modalities"] = names
    ds.attrs["labelled"] = "label" in ds  # a label array added later is the user's (tilefuse.storage.own_arrays)
    from tilefuse import __version__

    ds.attrs["tilefuse_version"] = __version__
    encoding = {}
    for name in [*names, "valid", *(["label"] if "label" in ds else [])]:
        enc = encoding_for(ds[name], chunk, shard)
        encoding[name] = enc
        ds[name] = ds[name].chunk(dict(zip(ds[name].dims, write_chunks(enc))))
        ds[name].encoding = {}
    if "label" in ds:
        ds["label"].attrs["nodata"] = IGNORE  # label.rio.nodata, and rio.to_raster marks it
    valid = ds["valid"].data
    sums = {name: _band_sums(ds[name].data, valid) for name in names}
    counts = count_labels(ds["label"].data) if "label" in ds else None

    size = sum(ds[name].nbytes for name in encoding) // 8  # a lower bound: zstd rarely beats 8x on imagery
    with create(path, "scene", inputs=inputs, overwrite=overwrite, size=size, lock=True) as tmp:
        writer = ds.to_zarr(
            tmp, mode="w-", zarr_format=3, encoding=with_checksums(ds, encoding), compute=False, consolidated=False,
            write_empty_chunks=WRITE_EMPTY_CHUNKS,
        )
        with contextlib.ExitStack() as stack:
            if progress:
                from dask.diagnostics import ProgressBar

                stack.enter_context(ProgressBar())
            _, computed, counts = compute_then_raise(writer, sums, counts)
        if computed and not any(np.asarray(count).any() for count, _, _ in computed.values()):
            # a modality that is nodata everywhere (a wrong band or nodata value) left a store of nothing
            raise InputError(
                f"{path}: the scene has no valid pixel (nowhere does every modality have data): check each "
                "modality's nodata value and bands (NaN or nodata everywhere?)"
            )
        group = zarr.open_group(tmp, mode="r+")
        for name, (count, total, total_sq) in computed.items():
            count = np.asarray(count, dtype=np.float64)
            mean = np.divide(total, count, out=np.zeros_like(count), where=count > 0)
            var = np.divide(total_sq, count, out=np.zeros_like(count), where=count > 0) - mean**2
            group[name].attrs.update(
                band_mean=mean.tolist(),
                band_std=np.sqrt(np.maximum(var, 0.0)).tolist(),
                band_count=count.astype(np.int64).tolist(),
            )
        if counts is not None and require_labelled and not np.asarray(counts)[:IGNORE].any():
            # every label pixel ignore (nodata, negative, or mapped to 255): a store that looks complete, '0 classes'
            source = ds["label"].attrs.get("source", "the labels")
            check = (
                "check labels=, its nodata and label_map=, or pass no labels" if source == "xarray"
                else "check the labels raster, its band (PATH:N) and --label-map, or ingest without --labels"
            )
            raise InputError(
                f"labels: {Path(str(source)).name if source != 'xarray' else 'the labels array'} has no labelled pixel on "
                f"the scene's grid (every one is nodata, negative or 255): {check}"
            )
        if counts is not None:
            _check_named(path, ds["label"].attrs.get("class_names"), np.asarray(counts))
            _record_label_counts(group["label"].attrs, np.asarray(counts))
        record_digests(tmp)  # where each chunk belongs
        consolidate(tmp)  # last, once every attr is final
    return Path(os.path.abspath(path))  # a notebook keeps it across os.chdir


def _transform_of_coordinates(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with the GeoTransform its x/y coordinates give where the one it records disagrees: xarray keeps
    coordinates right through ``sortby``, ``coarsen`` or ``isel``, not rioxarray's recorded transform, and a store
    written with the stale one was refused as corrupt when opened. Coordinates of no regular grid are refused."""
    for dim in ("x", "y"):
        values = np.asarray(ds[dim].values) if dim in ds.coords else np.zeros(0)
        steps = np.diff(values.astype(np.float64))
        # coordinates stored in float32 (some NetCDFs) hold a UTM northing to half a metre: that much is no gap
        precision = 8 * np.finfo(values.dtype).eps * np.abs(values).max() if values.size and values.dtype.kind == "f" else 0.0
        if steps.size and (not np.all(np.isfinite(steps)) or steps[0] == 0 or np.abs(steps - steps[0]).max() > max(1e-3 * abs(steps[0]), precision)):
            raise InputError(
                f"the scene's {dim} coordinates are not evenly spaced: a scene store is a regular grid; resample the "
                "Dataset onto one first (e.g. ds.rio.reproject)"
            )
    if _georeference_problem(ds) is None or ds.sizes.get("x", 0) < 2 or ds.sizes.get("y", 0) < 2:
        return ds
    return ds.rio.write_transform(ds.rio.transform(recalc=True))


def _check_named(path, names, counts: np.ndarray) -> None:
    """Refuse class names given for fewer ids than the labels hold: the others were named class_<id> without a
    word, typically names meant for ids 1..K given to ids 0..K-1 (--class-names names ids from 0)."""
    present = np.flatnonzero(counts[:IGNORE])
    if names and present.size and present[-1] >= len(names):
        unnamed = [int(i) for i in present if i >= len(names)]
        raise InputError(
            f"{path}: the labels hold class id {unnamed[0]}{' and more' if len(unnamed) > 1 else ''} but the "
            f"{len(names)} class names name ids 0..{len(names) - 1} only: give one name per id from 0 to {int(present[-1])} "
            "(--class-names; ids count from 0, a name for an absent id is fine), or remap the ids with --label-map"
        )


def _record_label_counts(attrs, counts: np.ndarray) -> None:
    from tilefuse.classes import default_class_name

    names = list(attrs.get("class_names") or [])
    present = np.flatnonzero(counts[:IGNORE])
    n = max(len(names), int(present[-1]) + 1 if present.size else 0)
    attrs.update(
        class_counts=counts[:n].astype(np.int64).tolist(),
        ignore_count=int(counts[IGNORE]),
        class_names=names + [default_class_name(i) for i in range(len(names), n)],
    )


REPAIR = {"scene": "re-ingest it", "prediction": "recompute it with `tilefuse predict ... --resume`"}
"""What to do about a damaged store of each kind (the end of the error message)."""


def repair(kind: str, array: str | None = None) -> str:
    """What to do about a damaged store of ``kind``, or about its array ``array``: a resume recomputes a
    prediction's blocks (its outputs and their manifest), not its coordinates (it advised ``--resume``, which
    wrote nothing and advised it again)."""
    if kind == "prediction" and array is not None:
        from tilefuse.prediction import MANIFEST, OUTPUTS

        if array not in (*OUTPUTS, MANIFEST):
            return "recompute it with `tilefuse predict ... --overwrite`"
    return REPAIR.get(kind, "re-create it")


MADE_BY = {"scene": "(written by `tilefuse ingest` or `tilefuse synth`)", "prediction": "(written by `tilefuse predict`)"}
"""Where a store of each kind comes from (the fix of a message about the wrong path)."""


def open_store(path: str | os.PathLike, kind: str, *, written=None) -> xr.Dataset:
    """Open a tilefuse store of ``kind`` ("scene" or "prediction") lazily, with CRS decoded.

    Every read is verified (:func:`tilefuse.storage.open_dataset`): a missing or
    damaged chunk raises InputError naming it; ``written`` lists, per array, the
    keys a partial store has written (the others read as fill values).
    """
    from tilefuse import storage
    from tilefuse.outputs import found_kind, is_temporary, live_writer, local_path

    path = local_path(path, "store")  # a URL is refused, ~ is the home folder
    if is_temporary(path):
        raise InputError(f"{path} is an unfinished temporary of a tilefuse run, not a store: open the finished store")
    if not path.exists() and os.path.islink(path):  # a loop, or a link to nothing: both 'did not exist'
        if symlink_loop(path):
            raise InputError(f"{path} is a symlink loop (its links lead back to themselves): point the link at the {kind} store, or pass the store's own path")
        raise InputError(f"{path} is a symlink to {os.readlink(path)}, which does not exist (a disk not mounted?): point the link at the {kind} store")
    if not path.exists():
        writer = live_writer(path)  # a store is renamed into place once whole: it is being written
        if writer:
            raise InputError(f"{path} is being written by {writer}: it appears once complete; wait for it to finish")
        raise InputError(f"{path} does not exist: check the path (a {kind} store is {MADE_BY.get(kind, 'written by tilefuse')[1:-1]})")
    made_by = MADE_BY.get(kind, "")
    if path.is_file():
        raster = f"; a raster is made a scene store with `tilefuse ingest OUT --modality NAME={path}`" if kind == "scene" else ""
        raise InputError(f"{path} is a file, not a {kind} store (a zarr folder): pass a {kind} store {made_by}{raster}")
    outer = next((p for p in path.parents if found_kind(p) in ("scene", "prediction")), None)
    if outer is not None:  # an array of a store, or a folder of one
        raise InputError(f"{path} lies inside the tilefuse {found_kind(outer)} store {outer}, it is no store itself: pass {outer}")
    try:
        if not (path / "zarr.json").is_file():
            raise InputError(f"{path} is not a readable zarr store (a folder without zarr.json): pass a {kind} store {made_by}")
        json.loads((path / "zarr.json").read_bytes())
    except OSError as error:  # refused (permissions, a folder that cannot be searched) or EIO: not damage
        raise storage.cannot_read(str(path), "its metadata file zarr.json", path, "zarr.json", error) from None
    except ValueError as error:  # its kind is unknown: --overwrite refuses it and --resume cannot read it
        raise InputError(
            f"{path}: its metadata file zarr.json is damaged ({clipped(str(error), 60)}): tilefuse can no longer tell the "
            f"store is its own, so it never replaces it, even with --overwrite: remove it yourself, then "
            f"{'ingest it again' if kind == 'scene' else 'predict it again'}"
        ) from None
    try:
        ds = storage.open_dataset(path, written=written, fix=functools.partial(repair, kind))
    except InputError:
        raise
    except Exception as error:  # zarr/xarray raise many types for a broken store
        raise InputError(f"{path} is not a readable zarr store ({type(error).__name__}: {error}): pass a {kind} store {MADE_BY.get(kind, '')} or {repair(kind)}") from None
    found = ds.attrs.get(STORE_KIND)
    if found is None and {"valid", "labels", "block_done"} & set(ds.variables) and not ds.attrs:
        raise InputError(
            f"{path} holds a tilefuse store's arrays but its root attributes are gone (xarray's to_zarr(mode=\"a\") "
            "replaces them with the appended Dataset's): tilefuse can no longer tell what it is, so it never replaces "
            f"it; remove it, {'ingest it again' if kind == 'scene' else 'predict it again'}, and append a layer with the "
            "store's attrs kept (ds.attrs = tilefuse.open_scene(store).attrs before to_zarr)"
        )
    if found != kind:
        what = f"a {found} store" if found else "not a tilefuse store"
        raise InputError(f"{path} is {what}, expected a {kind} store: pass a {kind} store {MADE_BY.get(kind, '')}".rstrip())
    import rioxarray  # noqa: F401  (registers the .rio accessor)

    problem = _georeference_problem(ds) or (_layout_problem(ds) if kind == "scene" else None)
    if problem:
        raise InputError(f"{path}: {problem}: the store is corrupt, {repair(kind)}")
    ds.encoding["source"] = os.path.abspath(path)  # a notebook may pass the Dataset on (prediction.store_path), also after a chdir
    ds.encoding["opened_by"] = "tilefuse"  # not plain xarray.open_zarr, whose reads are not verified
    ds.encoding["identity"] = storage.store_identity(path)  # which store it was: one replaced since is named so
    return ds


def _georeference_problem(ds: xr.Dataset) -> str | None:
    """What is wrong with the georeferencing of a store (its ``spatial_ref``), or None: no CRS (predictions and
    COGs without one), or a GeoTransform that disagrees with the x/y coordinates (export writes by the former)."""
    if "spatial_ref" not in ds.coords:
        return "its spatial_ref (CRS and transform) is missing"
    if ds.rio.crs is None:
        return "its spatial_ref holds no CRS"
    if ds.sizes.get("x", 0) < 2 or ds.sizes.get("y", 0) < 2 or "GeoTransform" not in ds["spatial_ref"].attrs:
        return None
    try:
        stored, found = ds.rio.transform(), ds.rio.transform(recalc=True)
    except Exception as error:  # rioxarray raises several types for coordinates it cannot read
        return f"its x/y coordinates give no transform ({type(error).__name__})"
    pixel = max(abs(found.a), abs(found.e))
    scale_off = max(abs(p - q) for p, q in zip((stored.a, stored.b, stored.d, stored.e), (found.a, found.b, found.d, found.e)))
    origin_off = max(abs(stored.c - found.c), abs(stored.f - found.f))
    if scale_off > 1e-6 * pixel or origin_off > 1e-3 * pixel:
        return (
            f"its spatial_ref GeoTransform ({clipped(' '.join(f'{v:g}' for v in stored.to_gdal()))}) disagrees with its "
            f"x/y coordinates ({clipped(' '.join(f'{v:g}' for v in found.to_gdal()))})"
        )
    return None


def _layout_problem(ds: xr.Dataset) -> str | None:
    """What breaks the scene store layout (module docstring) in ``ds``'s metadata, or None.

    A modality it lists but does not hold was a KeyError traceback; a ``valid``
    of another dtype a traceback in predict and a silent mask in training.
    """
    listed = ds.attrs.get("modalities")
    held = [str(n) for n, v in ds.data_vars.items() if v.dims == (band_dim(str(n)), "y", "x")]
    if listed is not None:  # stores list their modalities (older ones may not: then the held ones count)
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed) or len(set(listed)) != len(listed):
            return f"its attrs' modalities ({clipped(repr(listed))}) is not a list of distinct names"
        unlisted = [n for n in held if n not in listed]
        if unlisted:  # hidden from every reader
            return f"its array {unlisted[0]!r} is a modality its attrs' modalities {clipped(repr(listed))} leave out"
    if not modalities(ds):
        return "it holds no modality"
    for name in modalities(ds):
        if name not in ds.data_vars:
            return f"modality {name!r} is listed in its attrs but its array is missing"
        if ds[name].dims != (band_dim(name), "y", "x"):
            return f"modality {name!r} has dims {ds[name].dims}, not {(band_dim(name), 'y', 'x')}"
    wanted = {"valid": np.dtype(bool), "label": np.dtype(np.uint8)}
    for name, dtype in wanted.items():
        if name not in ds.data_vars:
            if name == "valid":
                return "its array 'valid' is missing"
            continue
        if ds[name].dims != ("y", "x") or ds[name].dtype != dtype:
            return f"its array {name!r} is {ds[name].dtype} {ds[name].dims}, a scene store's is {dtype} ('y', 'x')"
    if "label" in ds.data_vars and "class_names" in ds["label"].attrs:
        problem = class_names_problem(ds["label"].attrs["class_names"])
        if problem:
            return f"the class_names of its array 'label' {problem}"
    counts = ds["label"].attrs.get("class_counts") if "label" in ds.data_vars else None
    whole = lambda c: isinstance(c, int) and not isinstance(c, bool) and c >= 0  # noqa: E731
    if counts is not None and not (isinstance(counts, list) and len(counts) <= IGNORE and all(whole(c) for c in counts)):
        # the highest id labelled sets the class count: a string of 10 letters trained a 10-class model
        return f"the class_counts of its array 'label' are not {IGNORE} or fewer pixel counts, got {clipped(repr(counts))}"
    return None


def scene_digest(scene: xr.Dataset, names, *, labels: bool = False) -> str:
    """A fingerprint of what a prediction (or training) reads of a scene store, from its metadata alone (no pixel is read).

    The grid (size, first and last coordinates, CRS) and, per modality in ``names`` (those the model reads), its
    dtype, band count and the band statistics computed over every valid pixel
    at ingest: the same for the same scene wherever it is moved or re-ingested
    to, different for another scene on the same grid (another date, another seed).
    ``labels``: also the label's class names and counts (what training reads; a prediction's digest leaves them
    out, so stores ingested with and without labels give one).
    """
    import hashlib
    import json

    def ends(name: str) -> list[float]:
        values = scene[name].values
        return [float(values[0]), float(values[-1])] if values.size else []

    record: dict[str, Any] = {
        "size": [int(scene.sizes["y"]), int(scene.sizes["x"])],
        "y": ends("y"),
        "x": ends("x"),
        "crs": str(scene["spatial_ref"].attrs.get("crs_wkt", "")) if "spatial_ref" in scene.coords else "",
    }
    for name in names:
        stats = stored_band_stats(scene, name)
        record[name] = [str(scene[name].dtype), int(scene[name].shape[0]), [v.tolist() for v in stats] if stats else None]
    if labels and "label" in scene:
        record["label"] = {key: scene["label"].attrs.get(key) for key in ("class_names", "class_counts", "ignore_count")}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def open_scene(path: str | os.PathLike) -> xr.Dataset:
    """Open a scene store lazily as an xarray Dataset with CRS (``ds.rio.crs``)."""
    return open_store(path, "scene")


def require_modalities(ds: xr.Dataset, wanted: dict[str, int], where: str = "the store") -> None:
    """Check that ``ds`` has every wanted modality with the wanted band count."""
    have = modalities(ds)
    for name, bands in wanted.items():
        if name not in have:
            raise InputError(
                f"{where} has no modality {name!r} (it has {', '.join(have) or 'none'}): "
                "ingest it with --modality NAME=PATH or use a model for these modalities"
            )
        n = int(ds[name].sizes[band_dim(name)])
        if n != bands:
            raise InputError(
                f"modality {name!r} has {n} bands in {where} but the model expects {bands}: use a store whose {name!r} "
                f"has the model's {bands} bands (ingest those), or a model trained on stores of {n} bands"
            )


def iter_chunk_slices(shape: Iterable[int], chunk: Iterable[int]) -> list[tuple[slice, ...]]:
    """All chunk-aligned regions of an array of ``shape``, in C order."""
    ranges = [range(0, n, c) for n, c in zip(shape, chunk)]
    out: list[tuple[slice, ...]] = []
    for starts in np.ndindex(*[len(r) for r in ranges]):
        out.append(tuple(slice(r[i], min(r[i] + c, n)) for r, i, c, n in zip(ranges, starts, chunk, shape)))
    return out
