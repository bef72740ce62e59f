"""rioxarray's per-band attrs (``long_name``, ``scales``, ``offsets``) are in FILE order and do not follow a
selection; only the band coordinate does. Whatever bands are picked, in whatever order, and whatever became of the
coordinate (kept, replaced by wavelengths or names, dropped), each band of the scene is named for what it holds
and scaled by its own factor, or the call is refused in one line. A coordinate replaced or dropped after a reorder
named nir 'blue' and scaled it by blue's factor, without a word."""

from __future__ import annotations

import numpy as np
import pytest
from test_ecosystem_fidelity import H, W, open_tif, write_tif

from tilefuse.ecosystem import from_xarray, scene_from_xarray
from tilefuse.errors import InputError
from tilefuse.rasters import ingest_rasters
from tilefuse.scene import open_scene

NAMES = ("blue", "green", "red", "nir")
WAVELENGTHS = (490.0, 560.0, 665.0, 842.0)
SCALES, OFFSETS = (1e-4, 2e-4, 3e-4, 4e-4), (0.0, -0.1, 0.2, 0.5)
SELECTIONS = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3], [3, 0, 2], [2], [1, 0, 3, 2]]
COORDS = ("numbers", "wavelengths", "names", "dropped")


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    """The same 4-band uint16 data (band k: 1000 (k + 1) .. + 99, nodata 0 in the top rows), described blue, green,
    red, nir, with per-band scales/offsets that differ ('raw') and that are all equal ('uniform'); for each, the
    physical values of each file band alone, as ingest of ``PATH:k`` stores them."""
    root = tmp_path_factory.mktemp("four")
    rng = np.random.default_rng(11)
    data = (np.arange(1, 5)[:, None, None] * 1000 + rng.integers(0, 100, (4, H, W))).astype(np.uint16)
    data[:, :2] = 0
    found = {}
    for kind, scales, offsets in (("raw", SCALES, OFFSETS), ("uniform", (2e-4,) * 4, (0.5,) * 4)):
        path = write_tif(root / f"{kind}.tif", data, nodata=0, scales=scales, offsets=offsets, names=NAMES)
        found[kind] = path, [ingest_rasters({"optical": f"{path}:{k + 1}"})["optical"].values[0] for k in range(4)]
    return found


def the_array(rasters, scaling: str):
    """The 4-band array: 'raw' (unequal per-band scales/offsets in attrs), 'decoded' (the same file opened with
    mask_and_scale=True: values scaled, only long_name left in attrs), 'uniform' (per-band attrs, all equal)."""
    path, expected = rasters["uniform" if scaling == "uniform" else "raw"]
    arr = open_tif(path, mask_and_scale=scaling == "decoded")
    if scaling == "uniform":  # rioxarray writes equal ones as scale_factor/add_offset: make them per band
        arr.attrs["scales"], arr.attrs["offsets"] = (arr.attrs.pop("scale_factor"),) * 4, (arr.attrs.pop("add_offset"),) * 4
    return arr, expected


def selected(arr, picked, coord: str):
    """``arr``'s bands ``picked`` (0-based, in that order), its band coordinate then kept (rioxarray's band numbers),
    replaced by wavelengths or by names, or dropped; also the name each band should get."""
    out = arr.isel(band=picked)
    if coord == "numbers":
        return out, [NAMES[k] for k in picked]
    if coord == "wavelengths":
        return out.assign_coords(band=[WAVELENGTHS[k] for k in picked]), [str(WAVELENGTHS[k]) for k in picked]
    if coord == "names":
        return out.assign_coords(band=[f"S{k + 1}" for k in picked]), [f"S{k + 1}" for k in picked]
    return out.drop_vars("band"), [f"b{i}" for i in range(1, len(picked) + 1)]


def assert_refused_as_unmatched(error, key: str = "scales"):
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("modality 'optical': its attrs ") and f"{key}=" in message
    assert "band coordinate" in message and "cannot be matched" in message
    assert "keep rioxarray's band coordinate" in message and f"drop the {key!r} attr" in message


@pytest.mark.parametrize("scaling", ["raw", "decoded", "uniform"])
@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("picked", SELECTIONS, ids=str)
def test_each_band_is_named_and_scaled_for_what_it_holds_or_refused(rasters, picked, coord, scaling):
    arr, expected = the_array(rasters, scaling)
    arr, names = selected(arr, picked, coord)
    if scaling == "raw" and coord != "numbers":  # unequal factors and nothing that says which band is which
        with pytest.raises(InputError) as error:
            scene_from_xarray({"optical": arr})
        assert_refused_as_unmatched(error)
        return
    ds = scene_from_xarray({"optical": arr})
    got = [str(n) for n in ds["optical_band"].values]
    assert got == names
    for i, k in enumerate(picked):
        assert not {got[i]} & (set(NAMES) - {NAMES[k]}), f"band {i + 1} holds {NAMES[k]} but is named {got[i]!r}"
        np.testing.assert_array_equal(ds["optical"].values[i], expected[k], err_msg=f"band {i + 1} holds {NAMES[k]}")


def test_the_reported_stores_are_refused_or_named_by_their_wavelengths(rasters, tmp_path):
    """The report: nir, red, green, blue with the coordinate replaced by wavelengths or dropped made a store whose
    bands were named blue, green, red, nir, each scaled by the factor of the band the name was."""
    path, expected = rasters["raw"]
    for raw in (open_tif(path), open_tif(path, mask_and_scale=True)):
        sel = raw.isel(band=[3, 2, 1, 0])
        for arr in (sel.assign_coords(band=[842.0, 665.0, 560.0, 490.0]), sel.drop_vars("band")):
            out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.zarr"
            if "scales" in raw.attrs:
                with pytest.raises(InputError) as error:
                    from_xarray(out, {"optical": arr})
                assert_refused_as_unmatched(error)
                assert not out.exists()
                continue
            store = open_scene(from_xarray(out, {"optical": arr}))
            names = [str(n) for n in store["optical_band"].values]
            assert names == (["842.0", "665.0", "560.0", "490.0"] if "band" in arr.coords else ["b1", "b2", "b3", "b4"])
            np.testing.assert_array_equal(store["optical"].values[0], expected[3])  # nir, not blue


def test_unequal_offsets_alone_are_refused_and_equal_ones_taken(rasters, tmp_path):
    path, _ = rasters["raw"]
    arr = open_tif(path).isel(band=[2, 0]).assign_coords(band=[665.0, 490.0])
    arr.attrs["scales"] = (1.0,) * 4
    with pytest.raises(InputError) as error:
        scene_from_xarray({"optical": arr})
    assert_refused_as_unmatched(error, "offsets")
    arr.attrs["offsets"] = (0.25,) * 4
    ds = scene_from_xarray({"optical": arr})
    raw = open_tif(path).isel(band=[2, 0]).values.astype(np.float32)
    valid = raw[0] != 0
    np.testing.assert_array_equal(ds["optical"].values[:, valid], raw[:, valid] + np.float32(0.25))


@pytest.mark.parametrize("scaling", ["raw", "decoded"])
def test_one_band_keeps_its_name_and_scale_while_its_number_is_known(rasters, scaling):
    """``isel(band=3)`` keeps the band's number (a scalar coordinate); ``isel(band=3, drop=True)`` and a Dataset of
    such bands do not: unequal per-band scales are refused, the name is made up."""
    arr, expected = the_array(rasters, scaling)
    ds = scene_from_xarray({"optical": arr.isel(band=3)})
    assert list(ds["optical_band"].values) == ["nir"]
    np.testing.assert_array_equal(ds["optical"].values[0], expected[3])
    for lost in (arr.isel(band=3, drop=True), arr.isel(band=3, drop=True).to_dataset(name="B08")):
        if scaling == "raw":
            with pytest.raises(InputError, match=r"band coordinate was dropped: .*'scales'"):
                scene_from_xarray({"optical": lost}, nodata=0)
            continue
        ds = scene_from_xarray({"optical": lost}, nodata=0)
        assert list(ds["optical_band"].values) == (["B08"] if "B08" in getattr(lost, "data_vars", {}) else ["b1"])
        np.testing.assert_array_equal(ds["optical"].values[0], expected[3])


def test_class_names_as_a_dict_of_ids_name_those_ids(rasters, tmp_path):
    """``class_names={0: 'water', 1: 'trees', 2: 'crops'}`` said 'must be a list of strings, got [0, 1, 2]': its
    keys, not what was passed. A dict of whole-number ids is the list it means (ids left out: class_<id>)."""
    path, _ = rasters["uniform"]
    optical = {"optical": open_tif(path)}
    labels = open_tif(path).isel(band=0, drop=True).copy(data=np.tile(np.arange(4, dtype=np.uint8), (H, W // 4)))
    labels.attrs, labels.encoding = {}, {}
    store = open_scene(from_xarray(tmp_path / "d.zarr", optical, labels, class_names={0: "water", 1: "trees", 2: "crops", 3: "urban"}))
    assert store["label"].attrs["class_names"] == ["water", "trees", "crops", "urban"]
    ds = scene_from_xarray(optical, labels, class_names={3: "urban", 0: "water"})
    assert ds["label"].attrs["class_names"] == ["water", "class_1", "class_2", "urban"]
    for bad in ({"0": "water"}, {0: 1}, {-1: "nodata"}, {255: "ignore"}):
        with pytest.raises(InputError) as error:
            scene_from_xarray(optical, labels, class_names=bad)
        assert str(error.value).startswith("class_names= as a dict must map whole-number class ids 0..254 to names, got ")
        assert repr(bad) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputError, match=r"^class_names= must be a list of names, one per class id from 0 .*got set"):
        scene_from_xarray(optical, labels, class_names={"water", "trees"})  # no order: ids given at random


def test_ingest_takes_class_names_as_a_dict_too(tmp_path):
    """``tilefuse.ingest(..., class_names={0: 'water', 1: 'forest'})`` took the dict's keys as the names and said
    'must be a list of strings, got [0, 1]'; from_xarray and ingest share one reading of class_names= now."""
    import tilefuse

    g = tmp_path / "g"
    tilefuse.synth(tmp_path / "s.zarr", 32, geotiff=g)
    rasters = {"optical": g / "optical.tif", "sar": g / "sar.tif"}
    highest = int(open_scene(tmp_path / "s.zarr")["label"].max())
    names = {0: "water", 2: "crops", max(highest, 3): "top"}  # up to the highest id, as a list must
    store = tilefuse.ingest(tmp_path / "i.zarr", rasters, labels=g / "label.tif", class_names=names)
    got = open_scene(store)["label"].attrs["class_names"]
    assert got[:3] == ["water", "class_1", "crops"] and got[-1] == "top" and len(got) == max(highest, 3) + 1, got
    with pytest.raises(InputError, match=r"^class_names= as a dict must map whole-number class ids"):
        tilefuse.ingest(tmp_path / "j.zarr", rasters, labels=g / "label.tif", class_names={"0": "water"})
    assert not (tmp_path / "j.zarr").exists()
