"""STAC Items and ItemCollections whose assets are local files -> a lazy scene Dataset.

A STAC JSON (one Item, or an ItemCollection / FeatureCollection such as a
search's result saved to disk) is read with pystac (the optional ``stac``
extra, imported only here). Each modality names the asset keys whose bands it
takes, in order (``{"optical": ["B04", "B03", "B02"], "sar": ["vv", "vh"]}``);
an asset holding several bands gives all of them. Asset hrefs are local paths
(relative ones are taken from the JSON's folder) or ``file://`` URIs: remote
assets are refused, nothing is downloaded. Every file is checked as ingest
checks rasters (:func:`tilefuse.rasters.open_source`) and opened lazily with
rioxarray; several Items become the ``time`` dimension of each asset (in time
order; an asset must lie on one grid in every Item), reduced by ``time=`` as
in :func:`tilefuse.ecosystem.scene_from_xarray`, which does the rest (one
grid, ingest's resampler, ``valid``, labels). With one Item per modality file
the store equals what ``tilefuse ingest`` writes from the same files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import unquote, urlparse

import xarray as xr

from tilefuse.errors import InputError, read_json
from tilefuse.rasters import READ_CHUNK, open_source

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_assets(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"NAME=KEY[,KEY...]"`` -> ``(NAME, (KEY, ...))``."""
    name, sep, keys = spec.partition("=")
    name = name.strip()
    parts = tuple(k.strip() for k in keys.split(","))
    if not sep or not _NAME.fullmatch(name) or not all(parts):
        raise InputError(f"bad --asset {spec!r}: write NAME=KEY[,KEY...] with the items' asset keys (e.g. optical=B04,B03,B02)")
    if name in ("valid", "label"):
        raise InputError(f"a modality cannot be called {name!r} (the store uses that name): choose another NAME")
    return name, parts


def _pystac():
    try:
        import pystac
    except ImportError:
        raise InputError("reading STAC needs pystac: pip install 'tilefuse[stac]'") from None
    return pystac


def load_items(path: str | os.PathLike) -> list:
    """The pystac Items of an Item or ItemCollection JSON file, in time order."""
    pystac = _pystac()
    path = Path(path)
    doc = read_json(path, "STAC file", "pass a STAC Item or ItemCollection", missing="check the path")
    kind = doc.get("type") if isinstance(doc, dict) else None
    try:
        if kind == "Feature":
            items = [pystac.Item.from_dict(doc)]
        elif kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(doc))
        else:
            raise InputError(
                f"{path} is a STAC {kind or 'document'} of type {kind!r}: pass an Item or ItemCollection (e.g. a search's result)"
            )
    except InputError:
        raise
    except Exception as error:  # pystac raises several types for malformed documents
        raise InputError(f"{path} is not a valid STAC Item/ItemCollection ({type(error).__name__}: {error})") from None
    if not items:
        raise InputError(f"{path} holds no STAC Item")
    return sorted(items, key=_when)


def _when(item):
    import datetime as dt

    when = item.datetime or item.common_metadata.start_datetime
    return when or dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _local_path(href: str, base: Path, what: str) -> Path:
    url = urlparse(href)
    if url.scheme == "file":
        return Path(unquote(url.path))
    if url.scheme and len(url.scheme) > 1:  # "C:" drive letters are paths, not schemes
        raise InputError(f"{what} is remote ({href}): tilefuse reads local files; download the assets first")
    path = Path(href)
    return path if path.is_absolute() else base / path


def open_asset(path: str | os.PathLike, what: str, *, name: str | None = None, crs: str | None = None, scaled: bool = True) -> xr.DataArray:
    """One local raster, checked like ingest's inputs, as a lazy ``(band, y, x)`` DataArray.

    Bands are named ``name`` (one band), else the raster's band descriptions,
    else ``<name>_<n>``. ``scaled``: the raster's scales and offsets (GDAL's, one per band) are applied here,
    nodata masked to NaN first, while the band coordinate still holds the file's band numbers that match them
    (labels: ``scaled=False``, class ids are never scaled).
    """
    import rioxarray

    source = open_source(path, what=what, assume_crs=crs)
    arr = rioxarray.open_rasterio(source.path, chunks={"band": -1, "x": READ_CHUNK, "y": READ_CHUNK})
    if arr.rio.crs is None:
        arr = arr.rio.write_crs(source.crs)
    arr.attrs.pop("long_name", None)
    if scaled:  # per-band scales match bands by the file's band numbers, which the names below replace: apply them now
        from tilefuse.ecosystem import _masked, _scaling

        scaling = _scaling(arr.attrs, arr["band"].values, arr.sizes["band"], what)
        if scaling is not None:
            arr = _masked(arr, None, scaling, "band").rio.write_nodata(float("nan"), encoded=False)
            for key in ("scale_factor", "add_offset", "scales", "offsets"):
                arr.attrs.pop(key, None)
    prefix = name or source.path.stem
    if len(source.bands) == 1 and name:
        names = [name]
    elif not all(n == f"b{b}" for n, b in zip(source.band_names, source.bands)):
        names = list(source.band_names)
    else:
        names = [f"{prefix}_{b}" for b in source.bands]
    return arr.assign_coords(band=names)


def _asset_stack(items: list, key: str, base: Path, crs: str | None) -> xr.DataArray:
    """One asset over every Item: ``(band, y, x)``, or ``(time, band, y, x)`` for several Items."""
    import pandas as pd

    arrays = []
    for item in items:
        asset = item.assets.get(key)
        if asset is None:
            have = ", ".join(sorted(item.assets)) or "none"
            raise InputError(f"STAC item {item.id!r} has no asset {key!r} (it has {have}): check --asset")
        what = f"asset {key!r} of item {item.id!r}"
        arrays.append(open_asset(_local_path(asset.href, base, what), what, name=key, crs=crs))
    if len(arrays) == 1:
        return arrays[0]
    first = arrays[0]
    for item, arr in zip(items[1:], arrays[1:]):
        if arr.shape != first.shape or arr.rio.crs != first.rio.crs or arr.rio.transform() != first.rio.transform():
            raise InputError(
                f"asset {key!r} of item {item.id!r} lies on another grid than in item {items[0].id!r}: "
                "the items must be dates of one grid (mosaic them first)"
            )
    times = pd.Index([pd.Timestamp(_when(item)).tz_localize(None) for item in items], name="time")
    return xr.concat([arr.drop_vars("spatial_ref") for arr in arrays], dim=times).assign_coords(
        spatial_ref=first.spatial_ref
    )


def scene_from_stac(
    stac: str | os.PathLike,
    assets: Mapping[str, str | Sequence[str]],
    labels: str | os.PathLike | None = None,
    *,
    label_asset: str | None = None,
    crs: str | None = None,
    **options,
) -> xr.Dataset:
    """Lazy scene Dataset of the assets of a STAC Item/ItemCollection file (see the module doc).

    ``assets`` maps modality names to asset keys (a list, or one string
    ``"B04,B03,B02"``); labels come from a raster file ``labels`` or from the
    asset ``label_asset`` (one file over all Items). ``crs`` and ``options``
    (``time``, ``reference``, ``resolution``, ``resampling``, ``label_map``,
    ``class_names``, ...) are those of :func:`tilefuse.ecosystem.scene_from_xarray`.
    """
    from tilefuse.ecosystem import scene_from_xarray

    if not isinstance(assets, Mapping):
        raise InputError(f"assets= must be a dict of modality name -> asset keys, got {type(assets).__name__}: pass e.g. {{'optical': ['B04', 'B03', 'B02']}}")
    if not assets:
        raise InputError("no modality given: pass at least one --asset NAME=KEY[,KEY...]")
    if labels is not None and label_asset is not None:
        raise InputError("labels come from a file (labels=) or an asset (label_asset=), not both: pass one")
    items = load_items(stac)
    base = Path(stac).resolve().parent
    modalities = {}
    for name, keys in assets.items():
        if not isinstance(keys, str) and not (isinstance(keys, Sequence) and all(isinstance(k, str) for k in keys)):
            raise InputError(f"modality {name!r}: asset keys must be strings (a list, or one 'B04,B03,B02'), got {keys!r:.80}")
        keys = [k.strip() for k in keys.split(",")] if isinstance(keys, str) else list(keys)
        if not keys or not all(keys):
            raise InputError(f"modality {name!r} names no asset: pass NAME=KEY[,KEY...]")
        modalities[name] = [_asset_stack(items, key, base, crs) for key in keys]
    label_array = None
    if labels is not None:
        label_array = open_asset(labels, "labels", crs=crs, scaled=False)
    elif label_asset is not None:
        holders = [item for item in items if label_asset in item.assets]
        if not holders:
            raise InputError(f"no STAC item has the label asset {label_asset!r}: check --label-asset")
        paths = {_local_path(item.assets[label_asset].href, base, f"label asset of item {item.id!r}") for item in holders}
        if len({p.resolve() for p in paths}) != 1:
            raise InputError(f"the label asset {label_asset!r} points to {len(paths)} files across items: pass one label raster with --labels")
        label_array = open_asset(paths.pop(), f"label asset {label_asset!r}", crs=crs, scaled=False)
    if label_array is not None:
        if label_array.sizes["band"] != 1:
            raise InputError(f"labels have {label_array.sizes['band']} bands: pass a one-band label raster")
        label_array = label_array.isel(band=0, drop=True)
    return scene_from_xarray(modalities, label_array, crs=crs, **options)
