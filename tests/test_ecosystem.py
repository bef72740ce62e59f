"""Scenes from xarray inputs equal ``ingest`` of the same rasters (values, valid, labels, stats, grid)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray
import xarray as xr
from affine import Affine
from rasterio.warp import transform_bounds

from tilefuse.ecosystem import from_xarray, scene_from_xarray
from tilefuse.errors import InputError
from tilefuse.pipelines.ingest import ingest
from tilefuse.scene import open_scene

UTM = "EPSG:32632"
OPTICAL_T = Affine(10.0, 0, 500000.0, 0, -10.0, 5000000.0)
SIZE = 160
DATES = pd.to_datetime(["2024-06-01", "2024-06-11", "2024-06-21"])


def write_tif(path, data, crs, transform, nodata):
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=64, blockysize=64,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


def sar_grid():
    """A lat/lon grid over the optical footprint, coarser (about 25 m) and slightly offset."""
    left, bottom, right, top = transform_bounds(UTM, "EPSG:4326", 500000, 5000000 - 10 * SIZE, 500000 + 10 * SIZE, 5000000)
    res = 0.00025
    width, height = int((right - left) / res) + 2, int((top - bottom) / res) + 2
    return Affine(res, 0, left - res / 3, 0, -res, top + res / 3), width, height


def optical(rng, step: int):
    data = rng.integers(100, 4000, (3, SIZE, SIZE)).astype(np.uint16)
    data[:, 10 + 30 * step : 40 + 30 * step, 20:70] = 0  # clouds move: nodata (all bands)
    return data


def sar(rng, step: int, width: int, height: int):
    data = rng.normal(-12, 3, (2, height, width)).astype(np.float32)
    data[:, : 5 + 4 * step, :] = np.nan  # swath edge
    return data


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    """Three dates of optical (UTM 10 m, uint16, nodata 0) and SAR (lat/lon, float32, NaN), labels (20 m)."""
    root = tmp_path_factory.mktemp("rasters")
    rng = np.random.default_rng(7)
    t, w, h = sar_grid()
    files = {"optical": [], "sar": []}
    for step in range(len(DATES)):
        files["optical"].append(write_tif(root / f"optical_{step}.tif", optical(rng, step), UTM, OPTICAL_T, 0))
        files["sar"].append(write_tif(root / f"sar_{step}.tif", sar(rng, step, w, h), "EPSG:4326", t, None))
    labels = rng.integers(0, 5, (1, SIZE // 2, SIZE // 2)).astype(np.uint8)
    labels[:, :8] = 255
    files["label"] = write_tif(root / "label.tif", labels, UTM, Affine(20.0, 0, 500000.0, 0, -20.0, 5000000.0), 255)
    return files


def lazy(path) -> xr.DataArray:
    return rioxarray.open_rasterio(path, chunks={"x": 64, "y": 64})


def per_band(arr: xr.DataArray, names) -> xr.Dataset:
    """odc-stac's layout: one variable per band, nodata in attrs."""
    nodata = arr.rio.nodata
    out = {}
    for i, name in enumerate(names):
        var = arr.isel(band=i, drop=True)
        var.attrs = {"nodata": nodata} if nodata is not None else {}
        var.encoding = {}
        out[name] = var
    return xr.Dataset(out)


def stacked(paths) -> xr.DataArray:
    """stackstac's layout: (time, band, y, x)."""
    return xr.concat([lazy(p) for p in paths], dim=pd.Index(DATES[: len(paths)], name="time"))


def assert_same_scene(a_path, b_path):
    a, b = open_scene(a_path), open_scene(b_path)
    assert a.rio.crs == b.rio.crs
    assert a.rio.transform() == b.rio.transform()
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
        for key in ("band_mean", "band_std", "band_count", "class_counts", "ignore_count"):
            assert a[name].attrs.get(key) == b[name].attrs.get(key), (name, key)
    assert a["valid"].values.any() and not a["valid"].values.all()


@pytest.mark.parametrize("reference", ["optical", "sar"])
def test_band_array_inputs_equal_ingest(rasters, tmp_path, reference):
    files = {"optical": rasters["optical"][0], "sar": rasters["sar"][0]}
    ingested = ingest(tmp_path / "ingest.zarr", files, rasters["label"], reference=reference)
    ours = from_xarray(
        tmp_path / "xr.zarr", {k: lazy(p) for k, p in files.items()}, lazy(rasters["label"]), reference=reference
    )
    assert_same_scene(ingested, ours)


def test_band_per_variable_inputs_equal_ingest(rasters, tmp_path):
    files = {"optical": rasters["optical"][1], "sar": rasters["sar"][1]}
    ingested = ingest(tmp_path / "ingest.zarr", files, resolution=15.0)
    inputs = {"optical": per_band(lazy(files["optical"]), ["B04", "B03", "B02"]), "sar": per_band(lazy(files["sar"]), ["vv", "vh"])}
    ours = from_xarray(tmp_path / "xr.zarr", inputs, resolution=15.0)
    assert_same_scene(ingested, ours)
    assert list(open_scene(ours)["optical"].optical_band.values) == ["B04", "B03", "B02"]


def composite(paths, how: str) -> np.ndarray:
    """The expected per-pixel composite of rasters, in numpy (NaN = no data)."""
    steps = []
    for p in paths:
        with rasterio.open(p) as src:
            raw = src.read()
            data = raw.astype(np.float32)
            if src.nodata is not None:
                data[raw == src.nodata] = np.nan
        steps.append(data)
    stack = np.stack(steps)
    if how == "median":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(stack, axis=0).astype(np.float32)
    ok = np.isfinite(stack).all(axis=1)
    out = np.full(stack.shape[1:], np.nan, np.float32)
    order = range(len(paths)) if how == "first" else reversed(range(len(paths)))
    for t in order:
        take = ok[t] & ~np.isfinite(out).all(axis=0)
        out[:, take] = stack[t][:, take]
    return out


@pytest.mark.parametrize("how", ["median", "first", "last"])
def test_time_reductions_equal_ingest_of_the_composite(rasters, tmp_path, how):
    expected = {}
    for name in ("optical", "sar"):
        with rasterio.open(rasters[name][0]) as src:
            crs, transform = src.crs, src.transform
        data = composite(rasters[name], how)
        expected[name] = write_tif(tmp_path / f"{name}_{how}.tif", data, crs, transform, np.nan)
    ingested = ingest(tmp_path / "ingest.zarr", expected)
    inputs = {"optical": stacked(rasters["optical"]), "sar": stacked(rasters["sar"])}
    ours = from_xarray(tmp_path / "xr.zarr", inputs, time=how)
    assert_same_scene(ingested, ours)
    assert open_scene(ours)["optical"].attrs["time"] == how


def test_time_mean_close_to_nanmean(rasters, tmp_path):
    ds = scene_from_xarray({"optical": stacked(rasters["optical"])}, time="mean")
    steps = [lazy(p).values.astype(np.float32) for p in rasters["optical"]]
    stack = np.where(np.stack(steps) == 0, np.nan, np.stack(steps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmean(stack, axis=0)
    np.testing.assert_allclose(ds["optical"].values, expected, rtol=1e-6)


@pytest.mark.parametrize("choice", [1, "2024-06-11", np.datetime64("2024-06-11")])
def test_one_date_equals_ingest_of_that_date(rasters, tmp_path, choice):
    files = {"optical": rasters["optical"][1], "sar": rasters["sar"][1]}
    ingested = ingest(tmp_path / "ingest.zarr", files)
    # band-per-variable with a time dimension (odc-stac) for optical, (time, band, y, x) for SAR
    optical_ds = xr.concat(
        [per_band(lazy(p), ["r", "g", "b"]) for p in rasters["optical"]], dim=pd.Index(DATES, name="time")
    )
    ours = from_xarray(tmp_path / "xr.zarr", {"optical": optical_ds, "sar": stacked(rasters["sar"])}, time=choice)
    assert_same_scene(ingested, ours)


def test_in_memory_arrays_and_nodata_override(rasters):
    lazy_ds = scene_from_xarray({"o": lazy(rasters["optical"][0]), "s": lazy(rasters["sar"][0])})
    loaded = scene_from_xarray({"o": lazy(rasters["optical"][0]).load(), "s": lazy(rasters["sar"][0]).load()})
    for name in ("o", "s", "valid"):
        np.testing.assert_array_equal(loaded[name].values, lazy_ds[name].values)
    raw = lazy(rasters["optical"][0]).values
    value = int(raw[0, 100, 100])  # a real reflectance declared nodata for optical only
    ds = scene_from_xarray({"o": lazy(rasters["optical"][0]), "s": lazy(rasters["sar"][0])}, nodata={"o": value})
    assert not ds["valid"].values[(raw == value).any(axis=0)].any()
    assert np.isin(0.0, ds["o"].values)  # 0 (the file's nodata) is data now
    with pytest.raises(InputError, match="not a modality"):
        scene_from_xarray({"o": lazy(rasters["optical"][0])}, nodata={"x": 0})


@pytest.mark.parametrize("cast", ["int16", "uint8", "bool"])
def test_an_array_cast_from_float_with_nan_nodata_is_taken(rasters, cast):
    """``(arr * 100).astype('int16')`` or a threshold of an array whose nodata is NaN keeps that nodata in its
    attrs, which rioxarray cannot express in the new dtype: a ValueError or OverflowError traceback."""
    arr = lazy(rasters["sar"][0]).rio.write_nodata(np.nan)
    cast_arr = (arr > -12) if cast == "bool" else (arr.fillna(0) * 10).astype(cast)
    ds = scene_from_xarray({"sar": cast_arr})
    expected = scene_from_xarray({"sar": cast_arr.astype("float32").rio.write_nodata(None)})
    np.testing.assert_array_equal(ds["sar"].values, expected["sar"].values)
    assert ds["valid"].values.all()


def test_bands_on_different_grids_are_concatenated(rasters, tmp_path):
    ds = scene_from_xarray({"mix": [lazy(rasters["optical"][0]), lazy(rasters["sar"][0])]})
    optical = scene_from_xarray({"o": lazy(rasters["optical"][0])})["o"].values
    sar = scene_from_xarray({"o": lazy(rasters["optical"][0]), "s": lazy(rasters["sar"][0])})["s"].values
    np.testing.assert_array_equal(ds["mix"].values, np.concatenate([optical, sar]))
    assert ds.sizes["mix_band"] == 5


@pytest.mark.parametrize("name", ["optical", "sar"])
def test_ascending_y_gives_the_scene_of_the_north_up_array(rasters, name):
    """y ascending (an array flipped, or built south-up): the same pixels on the same grid. The grid was
    worked out by a reprojection from resolutions the coordinates give (inexact in degrees): 1 px too many,
    a NaN row, the data half a pixel off."""
    arr = lazy(rasters[name][0])
    expected = scene_from_xarray({name: arr})
    flipped = scene_from_xarray({name: arr.isel(y=slice(None, None, -1))})
    assert flipped.sizes == expected.sizes
    np.testing.assert_allclose(flipped.rio.transform()[:6], expected.rio.transform()[:6], rtol=1e-12)
    for var in (name, "valid"):
        np.testing.assert_array_equal(flipped[var].values, expected[var].values, err_msg=var)


def test_bad_inputs(rasters, tmp_path):
    stack = stacked(rasters["optical"])
    with pytest.raises(InputError, match="3 time steps: pass time="):
        scene_from_xarray({"optical": stack})
    with pytest.raises(InputError, match="matches no step"):
        scene_from_xarray({"optical": stack}, time="2023-01-01")
    with pytest.raises(InputError, match="out of range"):
        scene_from_xarray({"optical": stack}, time=5)
    with pytest.raises(InputError, match="no CRS"):
        scene_from_xarray({"optical": xr.DataArray(np.zeros((1, 8, 8)), dims=("band", "y", "x"), coords={"y": np.arange(8.0), "x": np.arange(8.0)})})
    with pytest.raises(InputError, match="reference='hsi'"):
        scene_from_xarray({"optical": lazy(rasters["optical"][0])}, reference="hsi")
    with pytest.raises(InputError, match="cannot be called 'valid'"):
        scene_from_xarray({"valid": lazy(rasters["optical"][0])})
    with pytest.raises(InputError, match="pass an xarray"):
        scene_from_xarray({"optical": rasters["optical"][0]})
    slc = lazy(rasters["sar"][0]).astype(np.complex64)  # its float32 was its real part, without a word
    with pytest.raises(InputError, match=r"modality 'sar' holds complex data \(complex64\): pass its amplitude"):
        scene_from_xarray({"sar": slc})
    with pytest.raises(InputError, match="holds complex data"):
        scene_from_xarray({"sar": [lazy(rasters["optical"][0]), per_band(slc, ["vv", "vh"])]})
    assert np.array_equal(
        scene_from_xarray({"sar": abs(slc)})["sar"].values, scene_from_xarray({"sar": abs(lazy(rasters["sar"][0]))})["sar"].values, equal_nan=True
    )
    elsewhere = lazy(rasters["optical"][0]).rio.write_transform(OPTICAL_T * Affine.translation(1e6, 0))
    elsewhere = elsewhere.assign_coords(x=elsewhere.x + 1e7)
    with pytest.raises(InputError, match="does not overlap"):
        scene_from_xarray({"optical": lazy(rasters["optical"][0]), "sar": elsewhere})
    (tmp_path / "foreign.zarr").mkdir()
    with pytest.raises(InputError, match="never replaced, even with overwrite"):
        from_xarray(tmp_path / "foreign.zarr", {"optical": lazy(rasters["optical"][0])}, overwrite=True)
    from_xarray(tmp_path / "ours.zarr", {"optical": lazy(rasters["optical"][0])})
    with pytest.raises(InputError, match="overwrite=True"):
        from_xarray(tmp_path / "ours.zarr", {"optical": lazy(rasters["optical"][0])})


@pytest.mark.parametrize(
    "names", [["x"], ["spatial_ref"], ["band"], ["optical", "optical_band"], ["optical", "Optical"], ["Label"], ["2nd"], ["a-b"]]
)
def test_modality_names_ingest_refuses_are_refused(rasters, tmp_path, names):
    """The names ingest refuses: 'x' and 'spatial_ref' were ValueError tracebacks, a modality 'optical_band' beside
    'optical' was dropped from the store without a word (its name is optical's band dimension)."""
    arrays = {name: lazy(rasters["optical"][0]) for name in names}
    with pytest.raises(InputError, match="modality"):
        from_xarray(tmp_path / "s.zarr", arrays)
    assert list(tmp_path.iterdir()) == []


def test_label_options_without_labels_are_refused(rasters, tmp_path):
    optical = {"optical": lazy(rasters["optical"][0])}
    with pytest.raises(InputError, match="class_names=.*no labels"):
        from_xarray(tmp_path / "s.zarr", optical, class_names=["water", "forest"])
    with pytest.raises(InputError, match="label_map=.*no labels"):
        from_xarray(tmp_path / "s.zarr", optical, label_map={-1: 255})
    ignore = lazy(rasters["label"]).copy(data=np.full((1, SIZE // 2, SIZE // 2), 255, np.uint8))
    with pytest.raises(InputError, match="has no labelled pixel") as refused:  # was a store of '0 classes'
        from_xarray(tmp_path / "s.zarr", optical, ignore)
    assert "labels=" in str(refused.value) and "--" not in str(refused.value), "the Python API names its parameters"
    assert list(tmp_path.iterdir()) == []


def test_output_onto_a_source_raster_is_refused(rasters):
    """The files the arrays were opened from are inputs: the output may not be, hold or lie inside them."""
    source = Path(rasters["optical"][0])
    before = source.read_bytes()
    for out in (source, source.parent, source.parent.parent):
        with pytest.raises(InputError, match="input"):
            from_xarray(out, {"optical": lazy(source)}, overwrite=True)
    assert source.read_bytes() == before


def test_a_notebooks_slips_are_one_line_naming_the_parameter(rasters, tmp_path):
    """What a notebook naturally passes by mistake: the array itself or a list instead of {name: array} (a ValueError
    traceback; a list gave a 'modality name <xarray.DataArray ...>' message of many lines), class_names as one string
    (its letters became the class names), a label_map entry that is not whole numbers (a float target was truncated,
    a string key mapped nothing, both without a word), chunk=0 (ZeroDivisionError)."""
    arr = lazy(rasters["optical"][0])
    labels = lazy(rasters["label"])
    cases = [
        (dict(modalities=arr), r"^modalities= must be a dict of modality name -> DataArray/Dataset, got DataArray"),
        (dict(modalities=[arr]), r"^modalities= must be a dict of modality name -> DataArray/Dataset, got list"),
        (dict(labels=labels, class_names="water"), r"^class_names= must be a list of names"),
        (dict(labels=labels, class_names="water,forest"), r"^class_names= must be a list of names"),
        (dict(labels=labels, label_map={0: 1.5}), r"^label_map= must map whole-number label values to ids 0\.\.255"),
        (dict(labels=labels, label_map={"0": 1}), r"^label_map= must map whole-number label values to ids 0\.\.255"),
        (dict(labels=labels, label_map={0: 256}), r"^label_map= must map whole-number label values to ids 0\.\.255"),
        (dict(labels=labels, label_map={True: 1}), r"^label_map= must map whole-number label values to ids 0\.\.255"),
        (dict(labels=labels, label_map=[(0, 1)]), r"^label_map= must be a dict"),
        (dict(chunk=0), r"^chunk= must be a whole number of px >= 1"),
        (dict(labels=labels.to_dataset(name="lc")), r"^labels is a Dataset: pass a \(y, x\) xarray DataArray, e\.g\. labels\['lc'\]$"),
        (dict(chunk="512"), r"^chunk= must be a whole number of px >= 1"),
    ]
    for change, message in cases:
        args = {"modalities": {"optical": arr}, **change}
        with pytest.raises(InputError, match=message) as error:
            from_xarray(tmp_path / "s.zarr", args.pop("modalities"), **args)
        assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []
    # what the same intent looks like when right
    ds = scene_from_xarray({"optical": arr}, labels, label_map={np.int64(0): np.uint8(255), 1: 0}, class_names=("a", "b"))
    counts = np.bincount(ds["label"].values.ravel(), minlength=256)
    assert counts[1] == 0 and counts[0] > 0  # 1 became 0 and 0 became ignored


def test_a_dataset_of_one_variable_per_numbered_band_is_the_dataarray_it_came_from(rasters):
    """``arr.to_dataset(dim="band")`` (a rioxarray array split per band) names its variables 1, 2, 3 (integers): a
    KeyError traceback ("No variable named '1'"). It is the scene of the DataArray itself, band names included."""
    arr = lazy(rasters["optical"][0])
    whole = scene_from_xarray({"optical": arr})
    split = scene_from_xarray({"optical": arr.to_dataset(dim="band")}, nodata=0)  # to_dataset drops the nodata attrs
    assert list(split["optical_band"].values) == list(whole["optical_band"].values) == ["b1", "b2", "b3"]
    np.testing.assert_array_equal(split["optical"].values, whole["optical"].values)
    np.testing.assert_array_equal(split["valid"].values, whole["valid"].values)


def test_unnamed_pieces_of_a_modality_get_one_name_per_band_and_shared_names_are_refused(rasters):
    """Two unnamed 2-D pieces (``arr.isel(band=0, drop=True)``) were both named 'b1', so ``.sel(sar_band="b1")``
    took both bands; pieces that share a band name are refused (a checkpoint tells bands apart by name)."""
    sar = lazy(rasters["sar"][0])
    pieces = [sar.isel(band=0, drop=True), sar.isel(band=1, drop=True)]
    ds = scene_from_xarray({"sar": pieces})
    assert list(ds["sar_band"].values) == ["b1", "b2"]
    np.testing.assert_array_equal(ds["sar"].sel(sar_band="b2").values, scene_from_xarray({"sar": pieces[1]})["sar"][0].values)
    named = lazy(rasters["sar"][0]).assign_coords(band=["VV", "VH"])
    with pytest.raises(InputError, match=r"^modality 'sar': band name 'VV' is given to 2 of its bands: name each band its own"):
        scene_from_xarray({"sar": [named, named]})
