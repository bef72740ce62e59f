"""An array from the xarray ecosystem gives the scene that ingesting its raster gives: band names stay on their
bands through any selection, GDAL scale/offset give physical values on both paths, and stackstac's top-left
coordinates are read as corners."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray
import xarray as xr
from affine import Affine

from tilefuse.ecosystem import from_xarray, scene_from_xarray
from tilefuse.errors import InputError
from tilefuse.pipelines.ingest import ingest
from tilefuse.rasters import ingest_rasters
from tilefuse.scene import open_scene

UTM = "EPSG:32632"
T = Affine(10.0, 0, 300000.0, 0, -20.0, 5000000.0)
H, W = 48, 40
NAMES = ("blue", "green", "red", "nir", "swir1", "swir2")


def write_tif(path, data, *, nodata=None, scales=None, offsets=None, names=None, transform=T):
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype.name, crs=UTM, transform=transform, nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(data)
        if scales is not None:
            dst.scales = scales
        if offsets is not None:
            dst.offsets = offsets
        if names is not None:
            dst.descriptions = names
    return path


def open_tif(path, **kw) -> xr.DataArray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rioxarray's "scales differ across bands"
        return rioxarray.open_rasterio(path, chunks={"x": 16, "y": 16}, **kw)


def assert_same(ours: xr.Dataset, ingested: xr.Dataset, name: str = "optical"):
    assert ours.rio.crs == ingested.rio.crs
    assert ours.rio.transform() == ingested.rio.transform()
    dim = f"{name}_band"
    assert list(ours[dim].values) == list(ingested[dim].values)
    np.testing.assert_array_equal(ours[name].values, ingested[name].values)
    np.testing.assert_array_equal(ours["valid"].values, ingested["valid"].values)


# --- 1. band names follow the selected bands --------------------------------------------------------------------


@pytest.fixture(scope="module")
def six_bands(tmp_path_factory):
    """6 bands, each band's values in its own range (band k: 1000 k .. 1000 k + 99), named by descriptions."""
    rng = np.random.default_rng(3)
    data = (np.arange(1, 7)[:, None, None] * 1000 + rng.integers(0, 100, (6, H, W))).astype(np.uint16)
    return write_tif(tmp_path_factory.mktemp("six") / "six.tif", data, nodata=0, names=NAMES)


@pytest.mark.parametrize(
    "picked", [[5, 4, 3, 2, 1, 0], [2, 1, 0], [1, 4], [3], [0, 2, 4, 1, 3, 5], [4, 5, 0]], ids=str
)
def test_a_band_selection_keeps_each_name_on_its_band(six_bands, picked):
    """``isel(band=...)`` moves the band coordinate (the file's band numbers) but not the ``long_name`` attr (the
    file's names in file order): a reorder named swir2 'blue', a subset lost its names."""
    arr = open_tif(six_bands).isel(band=picked)
    ours = scene_from_xarray({"optical": arr})
    spec = f"{six_bands}:{','.join(str(k + 1) for k in picked)}"
    assert_same(ours, ingest_rasters({"optical": spec}))
    assert list(ours["optical_band"].values) == [NAMES[k] for k in picked]
    for k, name in zip(picked, ours["optical_band"].values):  # the values are the named band's
        values = ours["optical"].sel(optical_band=name).values
        assert ((values >= 1000 * (k + 1)) & (values < 1000 * (k + 1) + 100)).all(), name


def test_one_band_picked_by_a_scalar_index_is_that_band(six_bands):
    """``arr.isel(band=3)`` (the band dimension dropped, its number a scalar coordinate) was named 'b1'."""
    ours = scene_from_xarray({"optical": open_tif(six_bands).isel(band=3)})
    assert list(ours["optical_band"].values) == ["nir"]
    np.testing.assert_array_equal(ours["optical"].values, ingest_rasters({"optical": f"{six_bands}:4"})["optical"].values)


def test_names_of_the_band_coordinate_move_with_a_selection(six_bands):
    arr = open_tif(six_bands).assign_coords(band=[f"B{k}" for k in range(1, 7)])
    ours = scene_from_xarray({"optical": arr.isel(band=[4, 0, 2])})
    assert list(ours["optical_band"].values) == ["B5", "B1", "B3"]
    expected = ingest_rasters({"optical": f"{six_bands}:5,1,3"})["optical"].values
    np.testing.assert_array_equal(ours["optical"].values, expected)


def test_a_reordered_array_writes_the_store_ingest_writes(six_bands, tmp_path):
    ingested = ingest(tmp_path / "ingest.zarr", {"optical": f"{six_bands}:6,5,4,3,2,1"})
    ours = from_xarray(tmp_path / "xr.zarr", {"optical": open_tif(six_bands).isel(band=[5, 4, 3, 2, 1, 0])})
    a, b = open_scene(ours), open_scene(ingested)
    assert_same(a, b)
    assert a["optical"].attrs["band_mean"] == b["optical"].attrs["band_mean"]


# --- 2. GDAL scale and offset: physical values ----------------------------------------------------------------------


SCALES, OFFSETS = (2e-4, 0.5), (-0.1, 3.0)


def scaled_raster(tmp_path, dtype: str):
    """Two bands of ``dtype`` with different scales and offsets, nodata in the first row and a few pixels."""
    rng = np.random.default_rng(5)
    if np.dtype(dtype).kind == "f":
        data, nodata = rng.uniform(-50, 3000, (2, H, W)).astype(dtype), -9999.0
    else:
        info = np.iinfo(dtype)
        data, nodata = rng.integers(max(info.min, -3000) + 1, min(info.max, 40000), (2, H, W)).astype(dtype), info.min
    data[:, 0] = nodata
    data[1, 5:9, 7:12] = nodata
    path = write_tif(tmp_path / f"scaled_{dtype}.tif", data, nodata=nodata, scales=SCALES, offsets=OFFSETS, names=("red", "nir"))
    return path, data, nodata


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int32", "float32", "float64"])
def test_scale_and_offset_give_physical_values_on_every_path(tmp_path, dtype):
    """ingest stored raw DN (scale and offset ignored) where from_xarray of the file opened with
    mask_and_scale=True stored physical values; a raw array's scale_factor/add_offset attrs were ignored too."""
    path, raw, nodata = scaled_raster(tmp_path, dtype)
    ingested = ingest_rasters({"optical": str(path)})
    values = ingested["optical"].values
    expected = raw.astype(np.float64) * np.array(SCALES)[:, None, None] + np.array(OFFSETS)[:, None, None]
    holes = raw == nodata
    assert np.isnan(values[holes]).all() and np.isfinite(values[~holes]).all()  # nodata still masked, on raw values
    np.testing.assert_allclose(values[~holes], expected[~holes], rtol=2e-7, atol=1e-6)
    for kw in ({}, {"mask_and_scale": True}):  # raw DN with scale attrs, and values rioxarray scaled
        assert_same(scene_from_xarray({"optical": open_tif(path, **kw)}), ingested)
    for kw in ({}, {"mask_and_scale": True}):  # per-band scales follow a reorder
        flipped = scene_from_xarray({"optical": open_tif(path, **kw).isel(band=[1, 0])})
        assert_same(flipped, ingest_rasters({"optical": f"{path}:2,1"}))


def test_band_statistics_are_in_physical_units(tmp_path):
    path, raw, nodata = scaled_raster(tmp_path, "uint16")
    ingested = open_scene(ingest(tmp_path / "ingest.zarr", {"optical": str(path)}))
    ours = open_scene(from_xarray(tmp_path / "xr.zarr", {"optical": open_tif(path)}))
    valid = (raw != nodata).all(axis=0)  # statistics are of the valid pixels
    for k in range(2):
        band = raw[k][valid].astype(np.float64) * SCALES[k] + OFFSETS[k]
        assert ingested["optical"].attrs["band_mean"][k] == pytest.approx(band.mean(), rel=1e-5)
    assert ours["optical"].attrs["band_mean"] == ingested["optical"].attrs["band_mean"]
    np.testing.assert_array_equal(ours["optical"].values, ingested["optical"].values)


def test_a_dataset_of_one_variable_per_band_applies_each_variables_scale(tmp_path):
    path, _, _ = scaled_raster(tmp_path, "int16")
    ds = rioxarray.open_rasterio(path, chunks={"x": 16, "y": 16}, band_as_variable=True)
    ours = scene_from_xarray({"optical": ds})
    np.testing.assert_array_equal(ours["optical"].values, ingest_rasters({"optical": str(path)})["optical"].values)
    split = open_tif(path).to_dataset(dim="band")  # the scales land in the Dataset's attrs, for no variable in particular
    with pytest.raises(InputError, match="scale_factor/add_offset for no variable"):
        scene_from_xarray({"optical": split})


def test_a_label_raster_with_a_scale_is_refused(tmp_path):
    """Class ids are never scaled: a label raster with a scale or offset other than 1/0 is refused on both paths."""
    path, _, _ = scaled_raster(tmp_path, "uint16")
    labels = np.random.default_rng(2).integers(0, 4, (1, H, W)).astype(np.uint8)
    scaled = write_tif(tmp_path / "labels.tif", labels, nodata=255, scales=(0.5,), offsets=(0.0,))
    plain = write_tif(tmp_path / "plain.tif", labels, nodata=255)
    with pytest.raises(InputError, match="class ids are not scaled"):
        ingest_rasters({"optical": str(path)}, str(scaled))
    for kw in ({}, {"mask_and_scale": True}):
        with pytest.raises(InputError, match="class ids are not scaled"):
            scene_from_xarray({"optical": open_tif(path)}, open_tif(scaled, **kw).squeeze("band", drop=True))
    ours = scene_from_xarray({"optical": open_tif(path)}, open_tif(plain).squeeze("band", drop=True))
    np.testing.assert_array_equal(ours["label"].values, ingest_rasters({"optical": str(path)}, str(plain))["label"].values)


# --- 3. stackstac's top-left coordinates ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    rng = np.random.default_rng(9)
    data = rng.integers(1, 3000, (3, H, W)).astype(np.uint16)
    data[:, :3] = 0
    return write_tif(tmp_path_factory.mktemp("plain") / "plain.tif", data, nodata=0)


def stackstac_like(path, xy_coords: str, transform_attr="affine") -> xr.DataArray:
    """stackstac's layout: (time, band, y, x) float64 with NaN fill, attrs crs and transform, no spatial_ref;
    ``xy_coords`` 'topleft' (stackstac's default) or 'center'."""
    raw = open_tif(path).values
    shift = 0.0 if xy_coords == "topleft" else 0.5
    xs, ys = T.c + T.a * (np.arange(W) + shift), T.f + T.e * (np.arange(H) + shift)
    stated = {"affine": T, "six": tuple(T)[:6], "nine": list(T)}[transform_attr]
    arr = xr.DataArray(
        raw[None].astype(np.float64), dims=("time", "band", "y", "x"),
        coords={"time": pd.to_datetime(["2024-06-01"]), "band": ["B04", "B03", "B02"], "y": ys, "x": xs, "epsg": 32632},
        attrs={"crs": "epsg:32632", "transform": stated, "resolution": 10.0},
    )  # fmt: skip
    return arr.where(arr != 0).chunk({"band": 1, "y": 16, "x": 16})


@pytest.mark.parametrize("transform_attr", ["affine", "six", "nine"])
@pytest.mark.parametrize("xy_coords", ["topleft", "center"])
def test_top_left_and_centre_coordinates_give_the_store_of_the_raster(plain, xy_coords, transform_attr):
    """Top-left coordinates with attrs['transform'] were read as pixel centres: the store half a pixel off."""
    ours = scene_from_xarray({"optical": stackstac_like(plain, xy_coords, transform_attr)})
    ingested = ingest_rasters({"optical": str(plain)})
    assert ours.rio.transform() == ingested.rio.transform() == T
    np.testing.assert_array_equal(ours["optical"].values, ingested["optical"].values)
    np.testing.assert_array_equal(ours["valid"].values, ingested["valid"].values)


def test_a_slice_or_flip_of_top_left_coordinates_is_the_same_slice_of_centre_ones(plain):
    window = {"y": slice(5, 40), "x": slice(3, 30)}
    for how in (window, {"y": slice(None, None, -1)}):
        topleft = scene_from_xarray({"o": stackstac_like(plain, "topleft").isel(how)})
        centre = scene_from_xarray({"o": stackstac_like(plain, "center").isel(how)})
        np.testing.assert_allclose(topleft.rio.transform()[:6], centre.rio.transform()[:6], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(topleft["o"].values, centre["o"].values)
    sliced = scene_from_xarray({"o": stackstac_like(plain, "topleft").isel(window)})
    assert sliced.rio.transform() == T @ Affine.translation(3, 5)


def test_a_transform_attr_of_another_grid_is_not_taken(plain):
    """attrs['transform'] left from before a coarsening (another pixel size) says nothing about the coordinates."""
    arr = stackstac_like(plain, "center")
    coarse = arr.coarsen(x=2, y=2).mean()
    coarse.attrs = arr.attrs
    ours = scene_from_xarray({"o": coarse})
    assert ours.rio.transform() == T @ Affine.scale(2)


def test_corners_along_one_axis_and_centres_along_the_other_are_refused(plain):
    arr = stackstac_like(plain, "topleft")
    arr = arr.assign_coords(y=arr.y + T.e / 2)  # y centres, x corners
    with pytest.raises(InputError, match="pixel corners of attrs\\['transform'\\]"):
        scene_from_xarray({"o": arr})
