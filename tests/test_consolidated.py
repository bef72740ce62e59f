"""Plain ``xarray.open_zarr(path, decode_coords="all")`` opens every tilefuse store quietly and up to date.

Stores carry zarr v3 consolidated metadata, rewritten whenever their metadata
changes (a prediction marked complete, resumed or repaired), so the README's
way of opening a store emits no warning and shows the current attrs.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr

import tilefuse
from predict_fixtures import FAIL_AFTER, reset_calls, save_pointwise, write_test_scene
from tilefuse.prediction import open_prediction
from tilefuse.scene import open_scene
from tilefuse.storage import chunk_key

SETTINGS = {"tile": 32, "overlap": 8, "block_size": 64, "batch_size": 2, "progress": False}


def quiet_open(path) -> xr.Dataset:
    """The README's call, with every warning an error; loads everything so reads are checked too."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path, decode_coords="all")
        ds.load()
    return ds


def consolidated_attrs(path) -> dict:
    """The root attrs and the consolidated copy of every array's metadata, as stored."""
    root = json.loads((path / "zarr.json").read_text())
    assert root.get("consolidated_metadata"), f"{path} has no consolidated metadata"
    return root


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("consolidated")
    scene = write_test_scene(root / "scene.zarr", 150, 130, seed=2, nodata=(slice(0, 10), slice(0, 130)))
    checkpoint = save_pointwise(root / "pointwise")
    return root, scene, checkpoint


def test_scene_store_opens_quietly_with_its_crs(stores):
    _, scene, _ = stores
    consolidated_attrs(scene)
    ds = quiet_open(scene)
    assert ds.rio.crs is not None and ds.attrs["tilefuse_store"] == "scene"
    xr.testing.assert_identical(ds, open_scene(scene).load())


def test_prediction_partial_complete_resumed_and_repaired_open_quietly(stores, tmp_path):
    _, scene, checkpoint = stores
    out = tmp_path / "pred.zarr"
    reset_calls()
    FAIL_AFTER["forward"] = 5
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            tilefuse.predict(checkpoint, scene, out, probs=True, cluster="sync", **SETTINGS)
    finally:
        reset_calls()
    partial = quiet_open(out)
    assert partial.attrs["complete"] is False
    assert consolidated_attrs(out)["attributes"]["complete"] is False

    tilefuse.predict(checkpoint, scene, out, probs=True, cluster="sync", resume=True, **SETTINGS)
    resumed = quiet_open(out)
    assert resumed.attrs["complete"] is True and resumed.rio.crs == partial.rio.crs
    reference = open_prediction(out).load()

    # a complete store whose block was lost: resume repairs it, and the metadata follows
    (out / chunk_key("labels", (1, 1))).unlink()
    tilefuse.predict(checkpoint, scene, out, probs=True, cluster="sync", resume=True, **SETTINGS)
    repaired = quiet_open(out)
    assert repaired.attrs["complete"] is True
    np.testing.assert_array_equal(repaired["labels"].values, reference["labels"].values)
    np.testing.assert_array_equal(repaired["probs"].values, reference["probs"].values)


def test_consolidated_metadata_matches_each_array(stores, tmp_path):
    """The consolidated copy holds every array's own zarr.json (nothing stale)."""
    _, scene, _ = stores
    root = consolidated_attrs(scene)
    members = root["consolidated_metadata"]["metadata"]
    for name, meta in members.items():
        own = json.loads((scene / name / "zarr.json").read_text())
        assert meta["attributes"] == own["attributes"], name
    # a store written before consolidation still opens through tilefuse (older stores keep working)
    old = tmp_path / "old.zarr"
    shutil.copytree(scene, old)
    meta = json.loads((old / "zarr.json").read_text())
    meta.pop("consolidated_metadata")
    (old / "zarr.json").write_text(json.dumps(meta))
    xr.testing.assert_identical(open_scene(old).load(), open_scene(scene).load())
    with pytest.raises(Warning, match="consolidated"):  # what plain xarray says without it (the check can fail)
        quiet_open(old)
