"""Band names: a checkpoint records each modality's band names; training and prediction refuse bands in another order.

A store with the same bands in another order (correctly named) was predicted without a word (the labels agreed
with the right order's on 30% of pixels), and two such stores were trained on together, mixed.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from predict_fixtures import CLASSES, MODALITIES, build_pointwise, make_scene, save_pointwise

import tilefuse
from tilefuse.checkpoint import CONFIG, ModelConfig, read_config, save_checkpoint
from tilefuse.errors import InputError
from tilefuse.scene import open_scene, write_scene
from tilefuse.synthetic import synth_scene
from tilefuse.training_data import DataOptions, assemble

OPTICAL = ["blue", "green", "red"]
SAR = ["VV", "VH"]
SETTINGS = dict(tile=32, overlap=8, block_size=64, batch_size=2, cluster="sync", torch_threads=1, progress=False)


def _reordered(ds, modality: str, order, names=None):
    """``ds`` with ``modality``'s bands (data and names together) in ``order``; ``names``: other names instead."""
    dim = f"{modality}_band"
    var = ds[modality].isel({dim: list(order)})
    if names is not None:
        var = var.assign_coords({dim: np.array(names, dtype=object)})
    return ds.drop_vars(dim).assign({modality: var})  # without the old coordinate, which assign would align to


def _named_scene(optical=OPTICAL, sar=SAR):
    ds = make_scene(64, 64, seed=3)
    return ds.assign_coords(optical_band=np.array(optical, dtype=object), sar_band=np.array(sar, dtype=object))


def _write(ds, path: Path) -> Path:
    return write_scene(ds, path, chunk=64, shard=None)


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """A checkpoint of test-pointwise that records the band names (as training writes them), and a store in that order."""
    root = tmp_path_factory.mktemp("band-names")
    model = build_pointwise(MODALITIES, len(CLASSES), seed=0)
    config = ModelConfig("test-pointwise", dict(MODALITIES), len(CLASSES), {"seed": 0}, list(CLASSES))
    checkpoint = save_checkpoint(model, config, root / "named")
    data = json.loads((checkpoint / CONFIG).read_text())
    data.pop("config_sha256", None)  # edited below by hand: as a config saved before its checksum was recorded
    data["band_names"] = {"sar": SAR, "optical": OPTICAL}  # any key order
    (checkpoint / CONFIG).write_text(json.dumps(data))  # the weights' checksum covers the weights alone
    store = _write(_named_scene(), root / "scene.zarr")
    return root, checkpoint, store


# --- the rule --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["blue", "green", "red", "nir", "swir1", "swir2"], ["VV", "VH"]])
def test_every_permutation_of_named_bands_conflicts_and_the_same_order_does_not(names):
    from tilefuse.checkpoint import band_names_conflict

    for order in itertools.permutations(range(len(names))):
        problem = band_names_conflict([names[i] for i in order], names)
        assert (problem is None) == (list(order) == sorted(order)), order


def test_made_up_names_and_other_naming_schemes_are_not_compared():
    from tilefuse.checkpoint import band_names_conflict

    assert band_names_conflict(["b3", "b1", "b2"], ["b1", "b2", "b3"]) is None  # ingest's names for bands without a description
    assert band_names_conflict(["3", "1", "2"], ["blue", "green", "red"]) is None
    assert band_names_conflict(["B04", "B03", "B02"], ["blue", "green", "red"]) is None  # no name in common: not comparable
    assert band_names_conflict(["vv", " vh"], ["VV", "VH"]) is None  # case and spaces aside
    assert band_names_conflict(["blue", "green", "b3"], ["b1", "green", "blue"]) == "'blue' is band 1 here, band 3 there"
    assert band_names_conflict(["blue", "coastal"], ["blue", "red"]) == "band 2 is 'coastal' here, 'red' there"


# --- the checkpoint --------------------------------------------------------------------------------------------


def test_the_config_round_trips_band_names_whatever_the_key_order_and_old_configs_have_none():
    config = ModelConfig("m", {"optical": 3, "sar": 2}, 4, band_names={"optical": OPTICAL, "sar": SAR})
    data = json.loads(config.to_json())
    assert data["band_names"] == {"optical": OPTICAL, "sar": SAR}
    data["band_names"] = dict(reversed(list(data["band_names"].items())))  # a JSON writer's key order
    back = ModelConfig.from_dict(data)
    assert back.band_names == {"optical": OPTICAL, "sar": SAR} and list(back.band_names) == ["optical", "sar"]
    del data["band_names"]  # written before band names were recorded
    assert ModelConfig.from_dict(data).band_names == {}
    for bad in ({"optical": ["blue", "green"]}, {"hsi": ["a"]}, ["blue"], {"sar": ["VV", 2]}):
        with pytest.raises(InputError, match="'band_names' must be"):
            ModelConfig.from_dict({**data, "band_names": bad})


# --- prediction ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "modality, order", [("optical", (1, 0, 2)), ("optical", (2, 1, 0)), ("optical", (1, 2, 0)), ("optical", (0, 2, 1)), ("sar", (1, 0))]
)
def test_predict_refuses_a_store_with_its_bands_in_another_order(named, tmp_path, modality, order):
    _, checkpoint, _ = named
    store = _write(_reordered(_named_scene(), modality, order), tmp_path / "reordered.zarr")
    names = {"optical": OPTICAL, "sar": SAR}[modality]
    assert list(open_scene(store)[f"{modality}_band"].values) == [names[i] for i in order]
    with pytest.raises(InputError) as caught:
        tilefuse.predict(checkpoint, store, tmp_path / "pred.zarr", **SETTINGS)
    message = str(caught.value)
    assert "\n" not in message
    assert f"modality {modality!r}" in message and str(store) in message and str(checkpoint) in message
    assert str([names[i] for i in order]) in message and str(names) in message
    assert "re-ingest the store with its bands in the checkpoint's order" in message
    assert not (tmp_path / "pred.zarr").exists()


def test_predict_accepts_the_same_order_and_made_up_names(named, tmp_path):
    root, checkpoint, store = named
    reference = tilefuse.predict(checkpoint, store, tmp_path / "same.zarr", **SETTINGS)
    # bands ingested without descriptions (b1, b2, ...): nothing to compare, predicted as before
    unnamed = _write(_named_scene(["b1", "b2", "b3"], ["b1", "b2"]), tmp_path / "unnamed.zarr")
    pred = tilefuse.predict(checkpoint, unnamed, tmp_path / "unnamed-pred.zarr", **SETTINGS)
    assert np.array_equal(pred["labels"].values, reference["labels"].values)


def test_an_old_checkpoint_without_band_names_still_predicts(named, tmp_path):
    _, _, store = named
    old = save_pointwise(tmp_path / "old")
    config = json.loads((old / CONFIG).read_text())
    config.pop("config_sha256", None)  # edited below by hand: as a config saved before its checksum was recorded
    config.pop("band_names", None)  # as written before band names were recorded (the weights' checksum stays valid)
    (old / CONFIG).write_text(json.dumps(config))
    assert read_config(old).band_names == {}
    reordered = _write(_reordered(_named_scene(), "optical", (2, 1, 0)), tmp_path / "reordered.zarr")
    for scene, out in ((store, "pred.zarr"), (reordered, "reordered-pred.zarr")):
        assert tilefuse.predict(old, scene, tmp_path / out, **SETTINGS)["labels"].shape == (64, 64)


# --- training --------------------------------------------------------------------------------------------------

SYNTH_OPTICAL = ["blue", "green", "red", "nir", "swir1", "swir2"]
TRAIN = dict(steps=1, batch_size=2, patch_size=32, hparams={"preset": "micro"}, workers=0, val_fraction=0.0, progress=False)


@pytest.fixture(scope="module")
def synth_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("band-names-train")
    first = write_scene(synth_scene(64, seed=1, chunk=64), root / "first.zarr", chunk=64, shard=None)
    return root, first


@pytest.mark.parametrize(
    "modality, order", [("optical", (1, 0, 2, 3, 4, 5)), ("optical", (5, 4, 3, 2, 1, 0)), ("optical", (1, 2, 3, 4, 5, 0)), ("sar", (1, 0))]
)
def test_training_refuses_two_stores_with_a_modality_in_different_orders(synth_stores, tmp_path, modality, order):
    _, first = synth_stores
    second = write_scene(
        _reordered(synth_scene(64, seed=2, chunk=64), modality, order), tmp_path / "second.zarr", chunk=64, shard=None
    )
    names = {"optical": SYNTH_OPTICAL, "sar": SAR}[modality]
    with pytest.raises(InputError) as caught:
        tilefuse.train("pad", [first, second], tmp_path / "run", **TRAIN)
    message = str(caught.value)
    assert "\n" not in message
    assert str(first) in message and str(second) in message and f"modality {modality!r}" in message
    assert str([names[i] for i in order]) in message and str(names) in message
    assert "re-ingest one of them with its bands in the other's order" in message
    assert not (tmp_path / "run").exists()


def test_training_records_the_band_names_and_a_resume_refuses_stores_that_disagree(synth_stores, tmp_path):
    _, first = synth_stores
    second = write_scene(synth_scene(64, seed=2, chunk=64), tmp_path / "second.zarr", chunk=64, shard=None)
    run = tilefuse.train("pad", [first, second], tmp_path / "run", **TRAIN)  # the same order: accepted
    recorded = read_config(run).band_names
    assert recorded == {"optical": SYNTH_OPTICAL, "sar": SAR}

    data = DataOptions(patch_size=32, val_fraction=0.0)
    resumed = ModelConfig.from_dict(json.loads((Path(run) / CONFIG).read_text()))
    kept = assemble("pad", [first], data=data, hparams={"preset": "micro"}, resumed=resumed)
    assert kept.config.band_names == recorded
    shuffled = write_scene(
        _reordered(synth_scene(64, seed=1, chunk=64), "optical", (0, 1, 3, 2, 4, 5)), tmp_path / "shuffled.zarr", chunk=64, shard=None
    )
    with pytest.raises(InputError, match=r"shuffled\.zarr gives modality 'optical' the bands .* but the run being resumed was trained on"):
        assemble("pad", [shuffled], data=data, hparams={"preset": "micro"}, resumed=resumed)


def test_training_accepts_made_up_names_in_any_order(synth_stores, tmp_path):
    root, first = synth_stores
    made_up = [f"b{i}" for i in range(1, 7)]
    a = write_scene(_reordered(synth_scene(64, seed=1, chunk=64), "optical", range(6), made_up), tmp_path / "a.zarr", chunk=64, shard=None)
    b = write_scene(
        _reordered(synth_scene(64, seed=2, chunk=64), "optical", (5, 4, 3, 2, 1, 0), made_up[::-1]), tmp_path / "b.zarr", chunk=64, shard=None
    )
    data = DataOptions(patch_size=32, val_fraction=0.0)
    # unknown names are compared with nothing; the named store that follows is recorded
    assert assemble("pad", [a, b, first], data=data, hparams={"preset": "micro"}).config.band_names["optical"] == SYNTH_OPTICAL
