"""tilefuse.write_scene of Datasets a notebook makes with plain xarray operations."""

from __future__ import annotations

import numpy as np
import pytest

from test_sampling import labelled_scene
from tilefuse.errors import InputError
from tilefuse.scene import IGNORE, open_scene, write_scene


@pytest.fixture
def store(tmp_path):
    ds = labelled_scene(96, 64, seed=1)
    ds = ds.rio.write_transform(ds.rio.transform(recalc=True))  # recorded, as ingest and synth record it
    return write_scene(ds, tmp_path / "s.zarr", chunk=32, shard=None)


@pytest.mark.parametrize("operation", ["sortby-y", "coarsen", "isel-reversed-x"])
def test_a_dataset_whose_recorded_transform_is_stale_is_written_by_its_coordinates(store, tmp_path, operation):
    """sortby and coarsen keep the x/y coordinates right but leave rioxarray's recorded GeoTransform behind:
    write_scene wrote it as it was, and open_scene refused the store it had just written as corrupt."""
    ds = open_scene(store).load()
    if operation == "sortby-y":
        changed = ds.sortby("y")
    elif operation == "coarsen":
        changed = ds[["optical", "sar"]].coarsen(x=2, y=2).mean()
        changed["valid"] = ds["valid"].coarsen(x=2, y=2).all()
        changed["label"] = ds["label"].coarsen(x=2, y=2).max()
        changed["label"].attrs = ds["label"].attrs
    else:
        changed = ds.isel(x=slice(None, None, -1))
    out = write_scene(changed, tmp_path / "out.zarr", chunk=32, shard=None)
    reopened = open_scene(out)
    transform = reopened.rio.transform()
    x, y = reopened.x.values, reopened.y.values
    np.testing.assert_allclose([transform.c + transform.a / 2, transform.f + transform.e / 2], [x[0], y[0]])
    np.testing.assert_allclose([transform.a, transform.e], [x[1] - x[0], y[1] - y[0]])
    np.testing.assert_array_equal(reopened["optical"].values, changed["optical"].values)


def test_coordinates_of_no_regular_grid_are_refused(store, tmp_path):
    ds = open_scene(store).load()
    x = ds.x.values.copy()
    x[10:] += 3.0  # a gap: the store's one transform could not place these columns
    with pytest.raises(InputError, match=r"^the scene's x coordinates are not evenly spaced"):
        write_scene(ds.assign_coords(x=x), tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_scene_labels_carry_their_nodata(store):
    """label.rio.nodata was None (255 means ignore), so label.rio.to_raster wrote a raster without nodata."""
    assert open_scene(store)["label"].rio.nodata == IGNORE


def test_a_store_whose_root_attrs_xarray_replaced_says_so(store, tmp_path):
    """xr.Dataset({"ndvi": ...}).to_zarr(store, mode="a") replaces the root attrs with {}: every command said
    'not a tilefuse store', and synth/from_xarray that it is never replaced, with no word of what happened."""
    import xarray as xr

    layer = xr.Dataset({"ndvi": (("y", "x"), np.zeros((96, 64), np.float32))})
    layer.to_zarr(store, mode="a", consolidated=True)
    with pytest.raises(InputError, match=r"holds a tilefuse store's arrays but its root attributes are gone \(xarray's to_zarr\(mode=\"a\"\)"):
        open_scene(store)


def test_float32_coordinates_of_a_regular_grid_are_not_called_uneven(store, tmp_path):
    """Coordinates stored in float32 (some NetCDFs) hold a latitude of 45 degrees to about 4e-6, so the steps of a
    regular grid of 9e-5 degree pixels differ by some per cent: not a gap."""
    ds = open_scene(store).load()
    step = 9e-5
    x = (10.00004 + step * np.arange(ds.sizes["x"])).astype(np.float32)
    y = (45.00004 - step * np.arange(ds.sizes["y"])).astype(np.float32)
    single = ds.assign_coords(x=x, y=y)
    assert np.ptp(np.diff(y.astype(np.float64))) > 1e-3 * step  # as uneven as float32 makes them
    out = write_scene(single, tmp_path / "out.zarr", chunk=32, shard=None)
    assert open_scene(out).sizes == ds.sizes
