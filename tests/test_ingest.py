"""Ingest on the real rasters in ../shared/data: values, grids, valid masks, labels, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.warp import Resampling, reproject

from tilefuse.errors import InputError
from tilefuse.rasters import ingest_rasters, parse_label_map, split_bands
from tilefuse.scene import open_scene, write_scene

pytestmark = pytest.mark.shared_data


def read(path, bands=None) -> tuple[np.ndarray, rasterio.DatasetReader]:
    with rasterio.open(path) as src:
        return src.read(bands), src


def copy_with(path, out, edit) -> str:
    """A copy of a raster with ``edit(data)`` applied (the original stays untouched)."""
    with rasterio.open(path) as src:
        profile, data, descriptions = src.profile, src.read(), src.descriptions
    edit(data)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = descriptions
    return str(out)


def reprojected(path, ds, resampling, bands=None, transform_data=None) -> np.ndarray:
    """The whole raster reprojected onto ``ds``'s grid in one rasterio call (the reference result)."""
    with rasterio.open(path) as src:
        data = src.read(bands).astype(np.float32) if transform_data is None else transform_data(src.read(bands))
        out = np.full((data.shape[0], ds.sizes["y"], ds.sizes["x"]), np.nan, np.float32)
        reproject(
            data,
            out,
            src_transform=src.transform,
            src_crs=src.crs,
            src_nodata=src.nodata if src.nodata is not None else np.nan,
            dst_transform=ds.rio.transform(),
            dst_crs=ds.rio.crs,
            dst_nodata=np.nan,
            resampling=resampling,
        )
    return out


def test_sen1floods11_valid_and_labels(shared_data, tmp_path):
    chip = shared_data / "sen1floods11"
    s1 = chip / "S1/Spain_7370579_S1Hand.tif"
    # the S2 chip has no 0 (nodata) pixels: add a block of them to a copy
    s2 = copy_with(chip / "S2/Spain_7370579_S2Hand.tif", tmp_path / "s2.tif", lambda d: d[:, 100:150, 200:260].fill(0))
    labels = chip / "Labels/Spain_7370579_LabelHand.tif"
    ds = ingest_rasters({"s1": s1, "s2": s2}, labels, label_map="-1:255")
    raw_labels, _ = read(labels, 1)
    raw_s1, _ = read(s1)
    expected_valid = np.isfinite(raw_s1).all(0) & (read(s2)[0] != 0).all(0)
    assert (raw_labels == -1).any() and not expected_valid[100:150, 200:260].any()
    np.testing.assert_array_equal(ds["valid"].values, expected_valid)
    np.testing.assert_array_equal(ds["label"].values, np.where(raw_labels == -1, 255, raw_labels))
    assert list(ds["s1"].s1_band.values) == ["VV", "VH"]
    assert list(ds["s2"].s2_band.values[:3]) == ["B1", "B2", "B3"]

    path = write_scene(ds, tmp_path / "flood.zarr")
    stored = xr.open_zarr(path, decode_coords="all", consolidated=False)
    with rasterio.open(s1) as src:
        assert stored.rio.crs == src.crs
        assert stored.rio.transform().almost_equals(src.transform, precision=1e-12)
    np.testing.assert_array_equal(stored["s1"].values, raw_s1)  # same grid: values as read
    np.testing.assert_array_equal(stored["label"].values, ds["label"].values)


def test_sen1floods11_nan_nodata(shared_data):
    s1 = shared_data / "sen1floods11-s1/S1/Nigeria_812045_S1Hand.tif"
    labels = shared_data / "sen1floods11-s1/Labels/Nigeria_812045_LabelHand.tif"
    raw, _ = read(s1)
    assert np.isnan(raw).any()
    ds = ingest_rasters({"s1": s1}, labels)  # no map: -1 is outside 0..255 and becomes ignore anyway
    np.testing.assert_array_equal(ds["valid"].values, np.isfinite(raw).all(0))
    raw_labels, _ = read(labels, 1)
    np.testing.assert_array_equal(ds["label"].values, np.where(raw_labels < 0, 255, raw_labels))


@pytest.mark.parametrize("resampling", ["bilinear", "cubic"])
def test_values_match_rasterio_reproject_across_utm_zones(shared_data, resampling):
    s1 = shared_data / "terramind/S1RTC/637U_59R_1_3.tif"  # EPSG:32632, values in dB
    ds = ingest_rasters({"s1": s1}, crs="EPSG:32633", resampling=resampling, chunk=64)
    assert ds.rio.crs.to_epsg() == 32633 and ds["s1"].data.numblocks[1] > 1
    expected = reprojected(s1, ds, Resampling[resampling])
    np.testing.assert_array_equal(np.isnan(ds["s1"].values), np.isnan(expected))
    # GDAL approximates the UTM-to-UTM transform to 1/8 px per warped chunk; blocks differ only by that
    np.testing.assert_allclose(ds["s1"].values, expected, atol=0.02, equal_nan=True)
    assert 0.7 < ds["valid"].values.mean() < 1.0  # the rotated footprint leaves corners empty


def test_nearest_across_utm_zones_picks_the_exact_source_pixel(shared_data):
    s1 = shared_data / "terramind/S1RTC/637U_59R_1_3.tif"
    ds = ingest_rasters({"s1": s1}, crs="EPSG:32633", resampling="nearest", chunk=64)
    t = ds.rio.transform()
    cols, rows = np.meshgrid(np.arange(ds.sizes["x"]) + 0.5, np.arange(ds.sizes["y"]) + 0.5)
    xs, ys = rasterio.warp.transform(ds.rio.crs, "EPSG:32632", (t.c + t.a * cols).ravel(), (t.f + t.e * rows).ravel())
    data, src = read(s1, 1)
    col = np.floor((np.array(xs) - src.transform.c) / src.transform.a).astype(int)
    row = np.floor((np.array(ys) - src.transform.f) / src.transform.e).astype(int)
    inside = (col >= 0) & (col < src.width) & (row >= 0) & (row < src.height)
    exact = np.full(inside.shape, np.nan, np.float32)
    exact[inside] = data[row[inside], col[inside]]
    got = ds["s1"].values[0].ravel()
    both = np.isfinite(exact) & np.isfinite(got)
    assert both.sum() > 0.95 * inside.sum()
    assert (got[both] != exact[both]).mean() < 2e-4  # only pixels within GDAL's 1/8 px approximation of an edge


def test_values_equal_rasterio_reproject_half_resolution(shared_data):
    pan, ms = shared_data / "spacenet-solaris/pan1.tif", shared_data / "spacenet-solaris/ms1.tif"
    ds = ingest_rasters({"pan": pan, "ms": ms}, chunk=256)  # ms (1 m) onto pan's 0.5 m grid
    assert ds.sizes == {"pan_band": 1, "ms_band": 4, "y": 600, "x": 600}
    np.testing.assert_array_equal(ds["pan"].values, read(pan)[0].astype(np.float32))
    np.testing.assert_allclose(ds["ms"].values, reprojected(ms, ds, Resampling.bilinear), rtol=1e-6)
    coarse = ingest_rasters({"ms": ms, "pan": pan}, resampling="average")  # and pan onto ms's grid
    assert coarse.sizes["y"] == 300
    np.testing.assert_allclose(coarse["pan"].values, reprojected(pan, coarse, Resampling.average), rtol=1e-6)


def test_other_utm_zone_aligns_onto_reference(shared_data, tmp_path):
    """A raster warped into a neighbouring UTM zone lands back on the original pixels."""
    dem = shared_data / "terramind/DEM/637U_59R_1_3.tif"
    s1 = shared_data / "terramind/S1RTC/637U_59R_1_3.tif"
    lulc = shared_data / "terramind/LULC/637U_59R_1_3.tif"
    with rasterio.open(dem) as src:
        moved = ingest_rasters({"dem": dem}, crs="EPSG:32633", resampling="nearest")
        profile = dict(driver="GTiff", width=moved.sizes["x"], height=moved.sizes["y"], count=1, dtype="float32",
                       crs="EPSG:32633", transform=moved.rio.transform(), nodata=np.nan)  # fmt: skip
        original = src.read(1)
    with rasterio.open(tmp_path / "dem33.tif", "w", **profile) as dst:
        dst.write(moved["dem"].values)
    ds = ingest_rasters({"s1": s1, "dem": tmp_path / "dem33.tif"}, lulc, resampling="nearest")
    assert ds.rio.crs.to_epsg() == 32632
    back = ds["dem"].values[0]
    inner = (slice(5, -5), slice(5, -5))
    assert (back[inner] == original[inner]).mean() > 0.97
    np.testing.assert_array_equal(ds["label"].values, read(lulc, 1)[0])


def test_no_crs_needs_crs_option(shared_data):
    hsi = shared_data / "neon-sjer052/SJER_052_hyperspectral.tif"
    chm = shared_data / "neon-sjer052/SJER_052_CHM.tif"
    with pytest.raises(InputError, match="no CRS.*--crs"):
        ingest_rasters({"hsi": hsi, "lidar": chm})
    ds = ingest_rasters({"hsi": f"{hsi}:1-10", "lidar": chm}, crs="EPSG:32611")
    assert ds.rio.crs.to_epsg() == 32611 and ds.sizes["hsi_band"] == 10
    np.testing.assert_array_equal(ds["hsi"].values, read(hsi, list(range(1, 11)))[0].astype(np.float32))
    # the CHM grid is shifted by 0.4 px: resampled, not copied
    np.testing.assert_allclose(ds["lidar"].values, reprojected(chm, ds, Resampling.bilinear), rtol=1e-6)


def test_complex_sar_refused_unless_magnitude(shared_data):
    sar = shared_data / "spacenet-solaris/sar_vv.tif"
    with pytest.raises(InputError, match="complex.*--complex magnitude"):
        ingest_rasters({"sar": sar})
    ds = ingest_rasters({"sar": sar}, complex_mode="magnitude", resampling="nearest")
    assert ds["sar"].dtype == np.float32
    expected = reprojected(sar, ds, Resampling.nearest, transform_data=lambda d: np.abs(d).astype(np.float32))
    np.testing.assert_allclose(ds["sar"].values, expected, rtol=1e-6)
    assert np.isfinite(ds["sar"].values).mean() > 0.9  # rotated source on a north-up grid


def test_custom_wkt_projection_and_nodata(shared_data, tmp_path):
    source = shared_data / "spacenet-solaris/sample_geotiff_custom_proj.tif"
    copy = copy_with(source, tmp_path / "landsat.tif", lambda d: d[:, :20, :30].fill(-9999))
    ds = ingest_rasters({"landsat": copy})
    assert not ds["valid"].values[:20, :30].any() and ds["valid"].values[20:, 30:].all()
    stored = open_scene(write_scene(ds, tmp_path / "l.zarr"))
    with rasterio.open(source) as src:
        assert src.crs.to_epsg() is None and stored.rio.crs == src.crs


def test_band_selection_and_resolution(shared_data):
    s2 = shared_data / "sen1floods11/S2/Spain_7370579_S2Hand.tif"
    ds = ingest_rasters({"rgb": f"{s2}:4,3,2"}, resolution=2 * 8.983152841195215e-05, resampling="average")
    assert list(ds["rgb"].rgb_band.values) == ["B4", "B3", "B2"] and ds.sizes["y"] == 256
    np.testing.assert_allclose(ds["rgb"].values, reprojected(s2, ds, Resampling.average, bands=[4, 3, 2]), rtol=1e-6)
    with pytest.raises(InputError, match="band 14 is out of range.*1..13"):
        ingest_rasters({"s2": f"{s2}:2,14"})


def test_multiband_labels_need_a_band(shared_data):
    s1 = shared_data / "sen12ms/ROIs1158_spring_s1_1_p30.tif"
    lc = shared_data / "sen12ms/ROIs1158_spring_lc_1_p30.tif"
    with pytest.raises(InputError, match="4 bands: choose one with PATH:N"):
        ingest_rasters({"s1": s1}, lc)
    ds = ingest_rasters({"s1": s1}, f"{lc}:1", class_names=[f"igbp{i}" for i in range(18)])
    np.testing.assert_array_equal(ds["label"].values, read(lc, 1)[0])
    assert ds["label"].attrs["class_names"][17] == "igbp17"


def test_non_overlapping_and_unaligned_inputs_refused(shared_data):
    here = shared_data / "terramind/S1RTC/637U_59R_1_3.tif"
    elsewhere = shared_data / "terramind/S2L2A/282D_485L_3_3.tif"
    with pytest.raises(InputError, match="modality 'b'.*does not overlap"):
        ingest_rasters({"a": here, "b": elsewhere})
    with pytest.raises(InputError, match="labels.*does not overlap"):
        ingest_rasters({"a": here}, shared_data / "terramind/LULC/282D_485L_3_3.tif")
    with pytest.raises(InputError, match="--reference 'c' is not a modality"):
        ingest_rasters({"a": here}, reference="c")


def test_spec_parsing():
    assert split_bands("/data/x.tif:1,3-5") == ("/data/x.tif", (1, 3, 4, 5))
    assert split_bands("/data/x.tif") == ("/data/x.tif", None)
    assert parse_label_map("-1:255, 3:1") == {-1: 255, 3: 1}
    for bad in ("-1", "a:1", "1:256"):
        with pytest.raises(InputError, match="--label-map"):
            parse_label_map(bad)
