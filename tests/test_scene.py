import errno
import time

import dask
import dask.array as da
import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr

from tilefuse.errors import InputError
from tilefuse.scene import band_stats, compute_then_raise, modalities, open_scene, require_modalities, write_scene


def make_scene(h=700, w=600, seed=0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    optical = (rng.normal(size=(3, h, w)) * 2 + 5).astype("float32")
    optical[:, :10, :] = np.nan
    sar = rng.normal(size=(2, h, w)).astype("float32")
    valid = np.isfinite(optical).all(axis=0)
    ds = xr.Dataset(
        {
            "optical": (("optical_band", "y", "x"), da.from_array(optical, chunks=(3, 256, 256))),
            "sar": (("sar_band", "y", "x"), sar),
            "valid": (("y", "x"), valid),
        },
        coords={"x": 500_000 + 10.0 * np.arange(w) + 5, "y": 4_000_000 - 10.0 * np.arange(h) - 5},
    )
    return ds.rio.write_crs("EPSG:32632")


def test_round_trip_keeps_values_crs_transform_and_stats(tmp_path):
    ds = make_scene()
    path = write_scene(ds, tmp_path / "scene.zarr")
    out = open_scene(path)
    assert modalities(out) == ["optical", "sar"]
    assert out.rio.crs.to_epsg() == 32632
    assert out.rio.transform() == ds.rio.transform()
    np.testing.assert_array_equal(out["optical"].values, ds["optical"].values)
    mean, std = band_stats(out, "optical")
    expected = ds["optical"].values[:, ds["valid"].values]
    np.testing.assert_allclose(mean, expected.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(std, expected.std(axis=1), rtol=1e-4)
    assert out["optical"].attrs["band_count"] == [int(ds["valid"].sum())] * 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary store left behind"


def test_existing_output_refused_without_overwrite(tmp_path):
    path = write_scene(make_scene(50, 40), tmp_path / "s.zarr")
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(InputError, match="already exists"):
        write_scene(make_scene(50, 40, seed=1), path)
    assert sorted(p.name for p in path.rglob("*")) == before
    write_scene(make_scene(50, 40, seed=1), path, overwrite=True)
    assert open_scene(path)["sar"].values[0, 0, 0] == make_scene(50, 40, seed=1)["sar"].values[0, 0, 0]


def test_open_scene_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_scene(tmp_path / "nope.zarr")
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(InputError, match="not a readable zarr store.*: pass a scene store .*tilefuse ingest"):
        open_scene(tmp_path / "junk.zarr")
    # every refusal of a path also names the fix: where a store of the expected kind comes from
    from tilefuse.scene import open_store

    scene = write_scene(make_scene(40, 40), tmp_path / "s.zarr")
    (tmp_path / "file.tif").write_bytes(b"II*\0")
    for path, kind in ((scene, "prediction"), (tmp_path / "file.tif", "scene"), (tmp_path / "junk.zarr", "prediction")):
        with pytest.raises(InputError, match=f"pass a {kind} store \\(written by `tilefuse"):
            open_store(path, kind)


def test_require_modalities_names_the_problem(tmp_path):
    ds = open_scene(write_scene(make_scene(40, 40), tmp_path / "s.zarr"))
    require_modalities(ds, {"optical": 3, "sar": 2})
    with pytest.raises(InputError, match="no modality 'hsi'"):
        require_modalities(ds, {"hsi": 10})
    with pytest.raises(InputError, match="has 2 bands .* expects 4"):
        require_modalities(ds, {"sar": 4})


def test_a_file_a_bare_folder_or_a_part_of_a_store_is_named_as_such(tmp_path):
    """Each was 'not a readable zarr store (GroupNotFoundError: No group found in store LocalStore(...))', or for an
    array of a store 'ContainsArrayError: An array already exists ...': zarr's words, not what the path is."""
    scene = write_scene(make_scene(40, 40), tmp_path / "s.zarr")
    (tmp_path / "in.tif").write_bytes(b"II*\0")
    (tmp_path / "folder").mkdir()
    cases = {
        tmp_path / "in.tif": "is a file, not a scene store .*tilefuse ingest OUT --modality NAME=",
        tmp_path / "folder": "not a readable zarr store \\(a folder without zarr.json\\): pass a scene store",
        scene / "optical": f"lies inside the tilefuse scene store {scene}, it is no store itself: pass {scene}",
        scene / "optical" / "c": f"lies inside the tilefuse scene store {scene}",
    }
    for path, message in cases.items():
        with pytest.raises(InputError, match=message) as raised:
            open_scene(path)
        assert "Error:" not in str(raised.value), raised.value


@pytest.mark.parametrize(
    "settings",
    [{"chunk": 0}, {"chunk": -1}, {"chunk": 1.5}, {"chunk": True}, {"chunk": "64"}, {"chunk": 48, "shard": 64}, {"shard": 0},
     {"chunk": 64, "shard": True}],
)
def test_a_chunk_or_shard_a_store_cannot_have_is_one_input_error(tmp_path, settings):
    """Each was a ZeroDivisionError, a ValueError or TypeError from zarr or dask, or (True) taken for 1 px."""
    with pytest.raises(InputError, match="chunk=|shard="):
        write_scene(make_scene(40, 70), tmp_path / "s.zarr", **settings)
    assert not (tmp_path / "s.zarr").exists()


def test_a_dataset_without_valid_or_modality_is_an_input_error(tmp_path):
    scene = make_scene(40, 40)
    with pytest.raises(InputError, match="no 'valid'"):
        write_scene(scene.drop_vars("valid"), tmp_path / "a.zarr")
    with pytest.raises(InputError, match="no modality"):
        write_scene(scene[["valid"]], tmp_path / "b.zarr")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_store_write_raises_only_once_no_chunk_is_still_being_written(tmp_path):
    """On dask's threaded scheduler the first failing chunk write (a full disk) was raised while other threads
    still wrote theirs: those landed after the temporary store had been removed and recreated it (a hidden,
    half-written store left behind, 2 of 120 tries on a full tmpfs)."""
    late = tmp_path / "late-chunk"

    def slow_write():
        time.sleep(0.5)
        late.write_text("chunk")

    def full_disk():
        time.sleep(0.05)
        raise OSError(errno.ENOSPC, "No space left on device")

    with dask.config.set(num_workers=2), pytest.raises(OSError, match="No space"):
        compute_then_raise(dask.delayed(slow_write)(), dask.delayed(full_disk)())
    assert late.exists(), "the error was raised while a chunk was still being written"
    with dask.config.set(scheduler="sync"):  # other schedulers run as configured
        assert compute_then_raise(dask.delayed(lambda: 3)()) == (3,)
