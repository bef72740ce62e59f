"""Synthetic multimodal scenes with real structure, generated lazily chunk by chunk.

Every pixel is a pure function of ``(seed, global row, global column)`` (plus
the scene size for the swath edge): noise fields come from hashed lattices,
not from a random generator's state, so a chunk's values do not depend on the
chunking and a 100,000 x 100,000 px scene is written without being held in
memory.

A scene has a land-cover map of six classes (smooth regions from thresholded
multi-octave value noise, rectangular crop parcels, meandering rivers, a
road grid), class-specific texture, and per kind:

- ``sar-optical``: ``optical`` (6 bands, reflectance from class spectra x
  illumination x texture + noise; NaN under clouds) and ``sar`` (VV, VH in dB,
  class backscatter with 4-look gamma speckle; NaN beyond a swath edge);
- ``hsi-lidar``: ``hsi`` (48 narrow bands from smooth class spectra; NaN under
  clouds) and ``lidar`` (height above ground in m; NaN beyond a strip edge).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine

from tilefuse.errors import InputError
from tilefuse.scene import IGNORE, band_dim, compute_then_raise, modalities

CLASS_NAMES = ("water", "forest", "cropland", "urban", "bare", "grassland")
WATER, FOREST, CROPLAND, URBAN, BARE, GRASSLAND = range(len(CLASS_NAMES))
KINDS = ("sar-optical", "hsi-lidar")

OPTICAL_BANDS = ("blue", "green", "red", "nir", "swir1", "swir2")
OPTICAL_WAVELENGTHS = np.array([490.0, 560.0, 665.0, 842.0, 1610.0, 2190.0])
# surface reflectance per class (rows, CLASS_NAMES order) and optical band (columns)
REFLECTANCE = np.array(
    [
        [0.060, 0.050, 0.030, 0.020, 0.010, 0.005],  # water
        [0.030, 0.060, 0.040, 0.330, 0.170, 0.080],  # forest
        [0.050, 0.090, 0.070, 0.400, 0.240, 0.120],  # cropland
        [0.120, 0.130, 0.140, 0.200, 0.240, 0.220],  # urban
        [0.150, 0.190, 0.240, 0.300, 0.380, 0.320],  # bare
        [0.050, 0.080, 0.080, 0.280, 0.280, 0.170],  # grassland
    ]
)
SAR_BANDS = ("VV", "VH")
BACKSCATTER_DB = np.array([[-20.0, -27.0], [-8.0, -14.0], [-10.0, -17.0], [-3.0, -10.0], [-13.0, -21.0], [-11.0, -18.0]])
SAR_LOOKS = 4  # one 64-bit hash gives the four looks' uniforms
HSI_WAVELENGTHS = np.linspace(400.0, 2400.0, 48)
MEAN_HEIGHT = np.array([0.0, 14.0, 0.6, 9.0, 0.0, 0.2])  # metres above ground per class

_PIXEL_SIZE = {"sar-optical": 10.0, "hsi-lidar": 1.0}
_ORIGIN = (300_000.0, 5_000_000.0)  # upper-left corner, metres in the UTM zone
_CHUNK = {"sar-optical": 1024, "hsi-lidar": 512}
_PARCEL_PX = 48  # crop parcel edge
_ROAD_PX = 512  # road spacing
# independent noise streams
_TERRAIN, _MOISTURE, _SETTLEMENT, _RIVER, _PARCEL, _ROAD, _CLOUD, _ILLUMINATION = range(8)
_TEXTURE, _NOISE, _SPECKLE, _HEIGHT = 16, 32, 64, 128

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h):
    """SplitMix64 finaliser on uint64 scalars or arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * _M1
        h = h ^ (h >> np.uint64(27))
        h = h * _M2
        return h ^ (h >> np.uint64(31))


def _stream(seed: int, stream: int) -> np.uint64:
    """The hash key of one independent noise stream."""
    return _mix(np.uint64((seed * 0x9E3779B97F4A7C15 + stream + 1) & 0xFFFFFFFFFFFFFFFF))


def _derive(key: np.uint64, index: int) -> np.uint64:
    return _mix(key ^ np.uint64(index + 1))


def _hash(key: np.uint64, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """64 random bits per integer lattice point; ``rows`` (h, 1) and ``cols`` (1, w)."""
    with np.errstate(over="ignore"):
        row_key = _mix(key ^ (rows.astype(np.int64).astype(np.uint64) * _GOLDEN))
        return _mix(row_key + cols.astype(np.int64).astype(np.uint64) * _M1)


def _uniform(key: np.uint64, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Uniform (0, 1) float64 per lattice point."""
    return ((_hash(key, rows, cols) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _uniform4(key: np.uint64, rows: np.ndarray, cols: np.ndarray) -> list[np.ndarray]:
    """Four independent uniform (0, 1) float32 per pixel, 16 bits each, from one hash."""
    h = _hash(key, rows, cols)
    mask = np.uint64(0xFFFF)
    return [(((h >> np.uint64(16 * i)) & mask).astype(np.float32) + 0.5) / 65536 for i in range(4)]


def _normal(key: np.uint64, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Approximately standard normal float32 per pixel (centred sum of four uniforms)."""
    return (sum(_uniform4(key, rows, cols)) - 2) * np.float32(3**0.5)


def _value_noise(key: np.uint64, rows: np.ndarray, cols: np.ndarray, cell: float) -> np.ndarray:
    """Smooth value noise in [0, 1] with features of ``cell`` px, float32 (h, w).

    Bilinear (smoothstep-weighted) interpolation of a hashed lattice, done
    separably: along x for the few lattice rows involved, then along y.
    """
    gy = (rows[:, 0] + 0.5) / cell
    gx = (cols[0] + 0.5) / cell
    iy, ix = np.floor(gy), np.floor(gx)
    ty, tx = (gy - iy).astype(np.float32), (gx - ix).astype(np.float32)
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    y0, x0 = int(iy[0]), int(ix[0])
    lattice = _uniform(key, np.arange(y0, int(iy[-1]) + 2)[:, None], np.arange(x0, int(ix[-1]) + 2)[None, :])
    lattice = lattice.astype(np.float32)
    b = (ix - x0).astype(np.intp)
    along_x = lattice[:, b] + (lattice[:, b + 1] - lattice[:, b]) * tx
    a = (iy - y0).astype(np.intp)
    top = along_x[a]
    return top + (along_x[a + 1] - top) * ty[:, None]


def _fbm(key: np.uint64, rows: np.ndarray, cols: np.ndarray, cell: float, octaves: int) -> np.ndarray:
    """Multi-octave value noise, normalised to [0, 1]."""
    total = np.zeros((rows.shape[0], cols.shape[1]), np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        total += amplitude * _value_noise(_derive(key, octave), rows, cols, cell / 2**octave)
        norm += amplitude
        amplitude *= 0.5
    return total / norm


def _near_line(offset: np.ndarray, period: int, half_width: float) -> np.ndarray:
    return np.abs(offset - period / 2) < half_width


def land_cover(seed: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class map (uint8, ``CLASS_NAMES`` ids) and terrain field of a window of global pixels.

    ``rows`` (h, 1) and ``cols`` (1, w) hold global pixel indices.
    """
    terrain = _fbm(_stream(seed, _TERRAIN), rows, cols, 256, 5)
    moisture = _fbm(_stream(seed, _MOISTURE), rows, cols, 128, 4)
    settlement = _fbm(_stream(seed, _SETTLEMENT), rows, cols, 192, 4)
    classes = np.full(terrain.shape, GRASSLAND, np.uint8)
    # rectangular crop parcels on moderately moist land
    parcel = _uniform(_stream(seed, _PARCEL), rows // _PARCEL_PX, cols // _PARCEL_PX)
    classes[(moisture > 0.42) & (moisture < 0.56) & (parcel < 0.75)] = CROPLAND
    classes[moisture >= 0.56] = FOREST
    classes[settlement > 0.64] = URBAN
    classes[terrain > 0.68] = BARE
    classes[terrain < 0.33] = WATER
    # a road grid: one straight 3 px road per _ROAD_PX band in each direction, at a hashed offset
    road_key, band = _stream(seed, _ROAD), _ROAD_PX
    col_offset = (_uniform(road_key, np.zeros_like(rows[:1]), cols // band) * band / 2).astype(np.int64) + band // 4
    row_offset = (_uniform(road_key ^ _M1, rows // band, np.zeros_like(cols[:, :1])) * band / 2).astype(np.int64) + band // 4
    road = (np.abs(cols % band - col_offset) <= 1) | (np.abs(rows % band - row_offset) <= 1)
    classes[road & (terrain >= 0.33)] = URBAN
    # meandering rivers along an isoline of a large-scale noise field
    river = _fbm(_stream(seed, _RIVER), rows, cols, 512, 3)
    classes[np.abs(river - 0.5) < 0.006] = WATER
    return classes, terrain


def _texture(seed: int, classes: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Class-specific relative brightness texture, float32 around 0."""
    key = _stream(seed, _TEXTURE)
    tex = np.zeros(classes.shape, np.float32)
    fine = _value_noise(key, rows, cols, 3.0) - 0.5
    smooth = _value_noise(_derive(key, 1), rows, cols, 24.0) - 0.5
    tex = np.where(classes == WATER, 0.1 * smooth, tex)
    tex = np.where(classes == FOREST, 0.5 * fine + 0.2 * smooth, tex)
    tex = np.where(classes == GRASSLAND, 0.15 * fine + 0.2 * smooth, tex)
    tex = np.where(classes == BARE, 0.3 * smooth + 0.1 * fine, tex)
    # crop rows: stripes with a per-parcel orientation and period
    parcel_rows, parcel_cols = rows // _PARCEL_PX, cols // _PARCEL_PX
    angle = np.pi * _uniform(_derive(key, 2), parcel_rows, parcel_cols)
    period = 6.0 + 10.0 * _uniform(_derive(key, 3), parcel_rows, parcel_cols)
    stripes = np.sin(2 * np.pi * (cols * np.cos(angle) + rows * np.sin(angle)) / period).astype(np.float32)
    tex = np.where(classes == CROPLAND, 0.2 * stripes, tex)
    # buildings: 6 px blocks of random brightness
    blocks = _uniform(_derive(key, 4), rows // 6, cols // 6).astype(np.float32) - 0.5
    return np.where(classes == URBAN, 0.8 * blocks, tex)


def _clouds(seed: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return _fbm(_stream(seed, _CLOUD), rows, cols, 256, 4) > 0.72


def _swath_gap(rows: np.ndarray, cols: np.ndarray, height: int, width: int) -> np.ndarray:
    """The strip beyond a slanted swath edge near the right side of the scene."""
    return cols > width * (0.93 + 0.05 * rows / max(height - 1, 1))


def _illumination(seed: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return 0.85 + 0.3 * _fbm(_stream(seed, _ILLUMINATION), rows, cols, 256, 3)


def _render_sar_optical(seed: int, classes, rows, cols, height: int, width: int) -> list[np.ndarray]:
    brightness = _illumination(seed, rows, cols) * (1 + _texture(seed, classes, rows, cols))
    cloud = _clouds(seed, rows, cols)
    optical = []
    for band in range(len(OPTICAL_BANDS)):
        noise = _normal(_stream(seed, _NOISE + band), rows, cols)
        value = REFLECTANCE[classes, band].astype(np.float32) * brightness + 0.008 * noise
        optical.append(np.where(cloud, np.float32(np.nan), value))
    gap = _swath_gap(rows, cols, height, width)
    structure = 1 + 0.8 * _texture(seed ^ 0x5A5A, classes, rows, cols)
    sar = []
    for band in range(len(SAR_BANDS)):
        key = _stream(seed, _SPECKLE + band)
        # gamma(L, 1/L) intensity speckle: the mean of L exponential looks
        speckle = -sum(np.log(u) for u in _uniform4(key, rows, cols)) / SAR_LOOKS
        sigma0 = (10 ** (BACKSCATTER_DB[classes, band] / 10)).astype(np.float32) * np.maximum(structure, 0.05)
        sar.append(np.where(gap, np.float32(np.nan), 10 * np.log10(sigma0 * speckle)))
    return optical + sar


def hsi_spectra() -> np.ndarray:
    """Reflectance of each class at ``HSI_WAVELENGTHS``: (class, band) float64."""
    spectra = np.stack([np.interp(HSI_WAVELENGTHS, OPTICAL_WAVELENGTHS, r) for r in REFLECTANCE])
    # leaf water absorption around 1450 and 1940 nm, deeper for denser vegetation
    dips = np.exp(-(((HSI_WAVELENGTHS - 1450) / 60) ** 2)) + np.exp(-(((HSI_WAVELENGTHS - 1940) / 80) ** 2))
    depth = np.array([0.9, 0.6, 0.45, 0.05, 0.02, 0.3])
    return spectra * (1 - depth[:, None] * dips[None, :])


def _render_hsi_lidar(seed: int, classes, rows, cols, height: int, width: int) -> list[np.ndarray]:
    brightness = _illumination(seed, rows, cols) * (1 + 0.6 * _texture(seed, classes, rows, cols))
    cloud = _clouds(seed, rows, cols)
    spectra = hsi_spectra().astype(np.float32)
    hsi = []
    for band in range(len(HSI_WAVELENGTHS)):
        noise = _normal(_stream(seed, _NOISE + band), rows, cols)
        hsi.append(np.where(cloud, np.float32(np.nan), spectra[classes, band] * brightness + 0.006 * noise))
    key = _stream(seed, _HEIGHT)
    crowns = _value_noise(key, rows, cols, 4.0)
    buildings = 3.0 + 22.0 * _uniform(_derive(key, 1), rows // 12, cols // 12).astype(np.float32)
    height_m = MEAN_HEIGHT[classes].astype(np.float32)
    height_m = np.where(classes == FOREST, height_m * (0.5 + crowns), height_m)
    height_m = np.where(classes == URBAN, buildings, height_m)
    height_m = np.maximum(height_m + 0.15 * _normal(_derive(key, 2), rows, cols), 0)
    gap = _swath_gap(rows, cols, height, width)
    return hsi + [np.where(gap, np.float32(np.nan), height_m)]


_LAYOUT = {
    # kind -> ((modality, band names), ...) in render order
    "sar-optical": (("optical", OPTICAL_BANDS), ("sar", SAR_BANDS)),
    "hsi-lidar": (("hsi", tuple(f"{w:.0f}nm" for w in HSI_WAVELENGTHS)), ("lidar", ("height",))),
}
_RENDER = {"sar-optical": _render_sar_optical, "hsi-lidar": _render_hsi_lidar}


def _render_block(block: np.ndarray, kind: str, seed: int, height: int, width: int, block_info=None) -> np.ndarray:
    """All layers (modality bands..., label) of one chunk, stacked as float32."""
    (_, _), (r0, r1), (c0, c1) = block_info[None]["array-location"]
    rows = np.arange(r0, r1, dtype=np.int64)[:, None]
    cols = np.arange(c0, c1, dtype=np.int64)[None, :]
    classes, _ = land_cover(seed, rows, cols)
    layers = _RENDER[kind](seed, classes, rows, cols, height, width)
    return np.stack([*layers, classes.astype(np.float32)])


MAX_SEED = 2**63 - 1
"""Largest seed (as training's): the pixels hash it modulo 2^64, so larger ones would repeat smaller ones' scenes."""


def synth_scene(
    size: int | tuple[int, int],
    kind: str = "sar-optical",
    seed: int = 0,
    *,
    chunk: int | None = None,
    crs: str = "EPSG:32632",
    pixel_size: float | None = None,
) -> xr.Dataset:
    """A lazy synthetic scene in the scene-store layout (``write_scene`` writes it as is).

    ``size`` is the edge (or ``(height, width)``) in pixels; ``kind`` is one of
    ``KINDS``. Pixel size defaults to 10 m (sar-optical) or 1 m (hsi-lidar).
    """
    if kind not in KINDS:
        raise InputError(f"unknown scene kind {kind!r}: choose one of {', '.join(KINDS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        # pixels hash the seed modulo 2^64: seeds 2^64 apart were the same scene (a held-out scene equal to the training one)
        raise InputError(f"seed= (--seed) must be a whole number in 0..{MAX_SEED}, got {seed!r}")
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise InputError(f"scene size must be positive, got {height} x {width}")
    chunk = chunk or _CHUNK[kind]
    pixel = pixel_size or _PIXEL_SIZE[kind]
    layout = _LAYOUT[kind]
    layers = sum(len(bands) for _, bands in layout) + 1
    template = da.empty((layers, height, width), dtype=np.float32, chunks=(layers, chunk, chunk))
    stack = da.map_blocks(
        _render_block, template, kind=kind, seed=seed, height=height, width=width, dtype=np.float32, meta=np.array((), np.float32)
    )
    data_vars, valid, start = {}, None, 0
    for name, bands in layout:
        data = stack[start : start + len(bands)]
        start += len(bands)
        data_vars[name] = xr.DataArray(
            data, dims=(band_dim(name), "y", "x"), coords={band_dim(name): np.array(bands, dtype=object)}
        )
        present = da.isfinite(data).all(axis=0)
        valid = present if valid is None else valid & present
    data_vars["valid"] = xr.DataArray(valid, dims=("y", "x"))
    data_vars["label"] = xr.DataArray(
        stack[start].astype(np.uint8), dims=("y", "x"), attrs={"class_names": list(CLASS_NAMES)}
    )
    x0, y0 = _ORIGIN
    ds = xr.Dataset(
        data_vars,
        coords={"x": x0 + pixel * (np.arange(width) + 0.5), "y": y0 - pixel * (np.arange(height) + 0.5)},
        attrs={"synthetic_kind": kind, "synthetic_seed": seed},
    )
    return ds.rio.write_crs(crs).rio.write_transform(Affine(pixel, 0.0, x0, 0.0, -pixel, y0))


class _WindowWriter:
    """``da.store`` target writing array regions as windows of an open rasterio dataset."""

    def __init__(self, dataset, bands: int | None):
        self.dataset, self.bands = dataset, bands

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        from rasterio.windows import Window

        if self.dataset.closed:  # the store failed elsewhere and the files were closed: nothing to write into
            raise RuntimeError(f"{self.dataset.name} is closed")
        rows, cols = key[-2:]
        window = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        self.dataset.write(value if self.bands else value[None], window=window)


def write_geotiffs(
    ds: xr.Dataset,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    compress: str = "zstd",
    progress: bool = False,
    inputs=(),
) -> dict[str, Path]:
    """Write each modality (and ``label``) of a scene as a tiled GeoTIFF in folder ``directory``.

    Chunks are computed in parallel (once for all files) and written as
    windows, one at a time, so the scene is never held in memory. Float
    modalities get nodata NaN, labels nodata 255 and their class names in the
    ``class_names`` tag. The folder is a guarded output of kind
    ``geotiff-folder`` (:func:`tilefuse.outputs.create`): written under a
    temporary name and renamed when complete; ``overwrite`` replaces only such
    a folder written by tilefuse (an existing empty folder is used as is), and
    ``inputs`` are never at, inside or around it. Returns ``{name: path}``.
    """
    import rasterio

    from tilefuse.outputs import create, local_path, tiff_tags

    directory = local_path(directory, "GeoTIFF folder", output=True)  # a URL is refused, ~ is the home folder
    names = [*modalities(ds), *(["label"] if "label" in ds else [])]
    paths = {name: directory / f"{name}.tif" for name in names}
    transform, crs = ds.rio.transform(), ds.rio.crs
    size = sum(ds[name].nbytes for name in names) // 8
    with create(directory, "geotiff-folder", inputs=inputs, overwrite=overwrite, size=size, what="GeoTIFF folder") as tmp:
        with rasterio.Env(GDAL_CACHEMAX=128 << 20), contextlib.ExitStack() as files:
            sources, targets = [], []
            for name in names:
                var = ds[name]
                is_label = name == "label"
                bands = None if is_label else var.shape[0]
                profile = dict(
                    driver="GTiff", width=var.sizes["x"], height=var.sizes["y"], count=bands or 1,
                    dtype=var.dtype.name, crs=crs, transform=transform, nodata=IGNORE if is_label else np.nan,
                    tiled=True, blockxsize=512, blockysize=512, compress=compress, BIGTIFF="IF_SAFER",
                )  # fmt: skip
                if compress.lower() in ("zstd", "deflate", "lzw"):
                    profile["predictor"] = 1 if is_label else 3
                dst = files.enter_context(rasterio.open(tmp / f"{name}.tif", "w", **profile))
                dst.update_tags(**tiff_tags("raster"))
                if is_label:
                    dst.update_tags(class_names=json.dumps(list(var.attrs.get("class_names", []))))
                else:
                    for i, band in enumerate(var[band_dim(name)].values, start=1):
                        dst.set_band_description(i, str(band))
                sources.append(var.data if isinstance(var.data, da.Array) else da.from_array(var.data, chunks=512))
                targets.append(_WindowWriter(dst, bands))
            # one store call: chunks shared by several files (a synthetic scene's layers) are computed once
            from dask.diagnostics import ProgressBar

            # one write at a time (a GDAL dataset is not thread-safe); an error is raised once no write still
            # runs, so the files close, and the folder goes, after the last one
            with ProgressBar() if progress else contextlib.nullcontext():
                compute_then_raise(da.store(sources, targets, lock=threading.Lock(), compute=False))
    return paths
