"""Prediction stores from Python: refusals name the parameter a notebook passes, with the flag."""

from __future__ import annotations

import numpy as np
import rioxarray  # noqa: F401
import pytest
import xarray as xr

from tilefuse.errors import InputError
from tilefuse.grid import TileGrid
from tilefuse.prediction import SCENE_DIGEST, check_resumable, create_prediction, open_prediction


@pytest.fixture
def store(tmp_path):
    scene = xr.Dataset(coords={"y": 4e6 - 10.0 * np.arange(64), "x": 5e5 + 10.0 * np.arange(64)}).rio.write_crs("EPSG:32632")
    grid = TileGrid(64, 64, tile=32, overlap=8, block=64)
    attrs = {"model": "m", "checkpoint_hash": "h", "blend": "gaussian", "torch_threads": 1, SCENE_DIGEST: "d"}
    return create_prediction(tmp_path / "p.zarr", scene, grid, class_names=["a", "b"], attrs=attrs)


def test_resume_refusals_and_a_partial_store_name_resume_and_overwrite_as_parameters(store):
    with pytest.raises(InputError, match=r"was made with tile=32, not 16: resume with tile=32 \(--tile 32\), or pass overwrite=True \(--overwrite\)$"):
        check_resumable(store, {"tile": 16})
    with pytest.raises(InputError, match=r"from another scene .*: resume it with that scene store \(store=, --store\), or pass overwrite=True \(--overwrite\)$"):
        check_resumable(store, {SCENE_DIGEST: "other"})
    with pytest.raises(InputError, match=r"resume with torch_threads=1 \(--torch-threads 1\), or pass overwrite=True \(--overwrite\)$"):
        check_resumable(store, {"torch_threads": 2})
    with pytest.raises(InputError, match=r"finish it with `tilefuse predict \.\.\. --resume` \(Python: tilefuse\.predict\(\.\.\., resume=True\)\)$"):
        open_prediction(store)


def test_a_dataset_of_the_other_kind_of_store_is_named_as_such(store, tmp_path):
    """A scene Dataset passed where a prediction is expected (and the reverse) was 'an xarray Dataset changed since it
    was opened from ...: pass that store's path', and that path was then refused as the wrong kind: a loop."""
    import tilefuse
    from test_sampling import labelled_scene, write

    scene = tilefuse.open_scene(write(labelled_scene(64, 64), tmp_path / "s.zarr"))
    with pytest.raises(InputError, match=r"^prediction= is the scene store .*s\.zarr \(opened with open_scene\), not a prediction store"):
        tilefuse.evaluate(scene, scene)
    with pytest.raises(InputError, match=r"^path= is the scene store .*s\.zarr \(opened with open_scene\), not a prediction store"):
        open_prediction(scene)
    partial = open_prediction(store, allow_partial=True)
    with pytest.raises(InputError, match=r"^labels= is the prediction store .*p\.zarr \(opened with open_prediction\), not a scene store"):
        tilefuse.evaluate(store, partial)


@pytest.mark.parametrize("bad", ["water", [1, 2], ["a", "a"], ["a", ""], None])
def test_damaged_class_names_of_a_prediction_are_named_not_used(store, bad):
    """A prediction's class list edited or damaged ('water', numbers, one name twice) was used as data: evaluate
    blamed the labels ("class lists conflict: class 0 is 'w' in pred.zarr but 'water' in scene.zarr: evaluate
    against labels of the classes the model was trained on") and export wrote a legend of 5 classes named w, a, t, e, r."""
    import zarr

    from tilefuse import storage
    from tilefuse.grid import Block
    from tilefuse.prediction import mark_complete, write_block

    write_block(store, (slice(0, 64), slice(0, 64)), Block(0, 0), np.zeros((64, 64), np.uint8))
    mark_complete(store)
    assert list(open_prediction(store)["labels"].attrs["class_names"]) == ["a", "b"]
    zarr.open_group(store, mode="r+")["labels"].attrs["class_names"] = bad
    storage.consolidate(store)
    with pytest.raises(InputError, match=r"p\.zarr: the class_names of its array 'labels' .*: the store is corrupt, recompute it with `tilefuse predict \.\.\. --overwrite`"):
        open_prediction(store)


@pytest.mark.parametrize(
    "change",
    [
        lambda ds: ds.assign_coords(x=ds.x + 5000),
        lambda ds: ds.rio.write_crs("EPSG:32633"),
        lambda ds: ds.assign_coords(optical_band=[f"band {k}" for k in range(ds.sizes["optical_band"])]),
        lambda ds: ds.assign(label=ds["label"].assign_attrs(class_names=[f"c{k}" for k in range(len(ds["label"].attrs["class_names"]))])),
        lambda ds: ds.assign_attrs(note="mine"),
    ],
    ids=["x shifted", "crs", "band names", "class names", "attrs"],
)
def test_a_dataset_whose_coordinates_or_attrs_changed_in_memory_is_not_taken_for_its_store(tmp_path, change):
    """A scene Dataset with its x shifted by 5 km or another CRS written over it was predicted as its store, and
    the prediction had the store's grid: the Dataset passed was not what was computed. It is one InputError; the
    unchanged Dataset still stands for its store."""
    import tilefuse
    from test_sampling import labelled_scene, write

    from tilefuse.prediction import store_path

    path = write(labelled_scene(64, 64), tmp_path / "s.zarr")
    scene = tilefuse.open_scene(path)
    assert store_path(scene, "store", "scene") == str(path)
    with pytest.raises(InputError, match=r"^store= is an xarray Dataset changed since it was opened from"):
        store_path(change(scene), "store", "scene")


def test_probabilities_are_labelled_by_class_name(tmp_path):
    """probs had no `class` coordinate: probs.sel({"class": "water"}) was a KeyError in a notebook."""
    from predict_fixtures import CLASSES, save_pointwise, write_test_scene

    import tilefuse

    scene = write_test_scene(tmp_path / "s.zarr", 40, 40)
    pred = tilefuse.predict(save_pointwise(tmp_path / "ckpt"), scene, tmp_path / "p.zarr", tile=32, probs="float32", progress=False)
    assert list(pred["probs"]["class"].values) == list(CLASSES)
    water = pred["probs"].sel({"class": CLASSES[0]})
    np.testing.assert_array_equal(water.values, pred["probs"].values[0])
    from tilefuse.prediction import store_path

    assert store_path(pred, "prediction", "prediction") == str(tmp_path / "p.zarr")  # still stands for its store
