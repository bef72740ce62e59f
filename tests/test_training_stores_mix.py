"""Training on a mix of stores: what one store gives must not leak into, or be lost in, the others.

Statistics of held-out stores normalised the training inputs; two stores naming one class by two ids trained it as
two classes (and made predictions that predict itself then called corrupt); a class no training store holds was
trained without a word; and a store of other bands was refused as if its bands were merely reordered.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from predict_fixtures import MODALITIES, save_pointwise
from test_roles_classes import _write_store
from test_sampling import labelled_scene, write

import tilefuse
from tilefuse.checkpoint import CONFIG
from tilefuse.dataset import pooled_band_stats
from tilefuse.errors import InputError
from tilefuse.scene import open_scene
from tilefuse.training_data import DataOptions, assemble


# --- 1. band statistics come from the training stores alone ---------------------------------------------------


@pytest.fixture(scope="module")
def scaled_stores(tmp_path_factory):
    """Three stores whose optical bands differ by orders of magnitude (x1, x10, x100): pooling any held-out one shows."""
    root = tmp_path_factory.mktemp("scaled")
    stores = []
    for k, scale in enumerate((1.0, 10.0, 100.0)):
        ds = labelled_scene(64, 64, seed=k, invalid_disk=False)
        stores.append(write(ds.assign(optical=ds["optical"] * scale + scale), root / f"s{int(scale)}.zarr"))
    return stores


def test_a_split_by_stores_pools_the_statistics_of_its_training_stores_alone(scaled_stores):
    data = DataOptions(patch_size=32, split="stores", val_fraction=0.3, test_fraction=0.3)
    held_out = 0
    for seed in range(6):
        prepared = assemble("test-pointwise", scaled_stores, data=data, seed=seed)
        trained = [i for i, a in enumerate(prepared.split.assignment) if (a == 0).all()]
        assert trained and all(((a == 0).all() or (a != 0).all()) for a in prepared.split.assignment)
        held_out += len(trained) < len(scaled_stores)
        expected = pooled_band_stats([open_scene(scaled_stores[i]) for i in trained], list(MODALITIES))
        for name in MODALITIES:
            for key in ("mean", "std"):
                assert np.allclose(prepared.config.band_stats[name][key], expected[name][key], rtol=1e-6), (seed, name, key)
    assert held_out  # the seeds drew splits that hold stores out (else the test proves nothing)


def test_validation_stores_and_a_split_by_blocks_keep_the_training_stores_statistics(scaled_stores):
    a, s10, s100 = scaled_stores
    with_val = assemble("test-pointwise", [a], val_stores=[s100], data=DataOptions(patch_size=32, val_fraction=0.0))
    alone = pooled_band_stats([open_scene(a)], list(MODALITIES))
    assert with_val.config.band_stats == alone
    # blocks of every store may be held out: the statistics are the stores' own (computed at ingest), pooled
    blocks = assemble("test-pointwise", [a, s10], data=DataOptions(patch_size=32, val_fraction=0.3, block=32))
    assert blocks.config.band_stats == pooled_band_stats([open_scene(a), open_scene(s10)], list(MODALITIES))


# --- 2. one name for two ids -------------------------------------------------------------------------------------

PREDICT = dict(tile=32, overlap=8, block_size=64, batch_size=2, cluster="sync", torch_threads=1, progress=False)


def test_stores_naming_one_class_by_two_ids_are_refused_naming_both(tmp_path):
    a2 = _write_store(tmp_path / "A2.zarr", [0, 1], names=["water", "trees"])
    h = _write_store(tmp_path / "H.zarr", [0, 1, 2], names=["class_0", "class_1", "trees"], seed=1)
    with pytest.raises(InputError) as caught:
        tilefuse.train("test-pointwise", [a2, h], tmp_path / "run", steps=1, batch_size=2, patch_size=32, workers=0, val_fraction=0.0, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "'trees'" in message and "class 1 in " + str(a2) in message and "class 2 in " + str(h) in message
    assert "--label-map" in message and "label_map=" in message
    assert not (tmp_path / "run").exists()
    # as validation store too (the model's list covers it), and in either order
    with pytest.raises(InputError, match=r"'trees' to two ids, class 1 in .*A2\.zarr and class 2 in .*H\.zarr"):
        assemble("test-pointwise", [h], val_stores=[a2], data=DataOptions(patch_size=32, val_fraction=0.0))


def _checkpoint_naming_one_class_twice(path):
    checkpoint = save_pointwise(path)
    config = json.loads((checkpoint / CONFIG).read_text())
    config["class_names"] = ["water", "trees", "trees", "built"]  # as a run on such stores recorded them
    config.pop("config_sha256", None)  # an edit made on purpose (a config's own checksum, where it records one)
    (checkpoint / CONFIG).write_text(json.dumps(config))
    return checkpoint


def test_predict_refuses_a_checkpoint_naming_one_class_twice_before_any_output(tmp_path, capsys):
    from predict_fixtures import write_test_scene

    from tilefuse.cli import main

    checkpoint = _checkpoint_naming_one_class_twice(tmp_path / "run")
    store = write_test_scene(tmp_path / "scene.zarr", 64, 64)
    with pytest.raises(InputError) as caught:
        tilefuse.predict(checkpoint, store, tmp_path / "pred.zarr", **PREDICT)
    message = str(caught.value)
    assert "\n" not in message and str(checkpoint) in message and "the same name 'trees'" in message and "retrain" in message
    assert not (tmp_path / "pred.zarr").exists()
    status = main(["predict", "--checkpoint", str(checkpoint), "--store", str(store), "--out", str(tmp_path / "cli.zarr"),
                   "--tile", "32", "--cluster", "sync", "--torch-threads", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "retrain" in err, err
    assert not (tmp_path / "cli.zarr").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "scene.zarr"]  # no output, lock or temporary left


def test_a_prediction_of_such_a_checkpoint_is_not_resumed(tmp_path):
    """A store an earlier release wrote from such a checkpoint: a resume computed its blocks, then called it corrupt."""
    import zarr

    from predict_fixtures import write_test_scene

    from tilefuse import storage

    checkpoint = save_pointwise(tmp_path / "run")
    store = write_test_scene(tmp_path / "scene.zarr", 64, 64)
    tilefuse.predict(checkpoint, store, tmp_path / "pred.zarr", **PREDICT)
    group = zarr.open_group(tmp_path / "pred.zarr", mode="r+")
    for attrs in (group.attrs, group["labels"].attrs):
        attrs["class_names"] = ["water", "trees", "trees", "built"]
    group.attrs["complete"] = False
    storage.consolidate(tmp_path / "pred.zarr")
    with pytest.raises(InputError, match=r"pred\.zarr cannot be resumed: checkpoint .*run cannot predict: its class names give classes 1 and 2 the same name 'trees'"):
        tilefuse.predict(checkpoint, store, tmp_path / "pred.zarr", resume=True, **PREDICT)


# --- 3. a class no training pixel shows is named ----------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["patches", "pixels"])
def test_a_class_only_the_validation_stores_hold_is_named_in_one_note(tmp_path, capsys, sampler):
    a2 = _write_store(tmp_path / "A2.zarr", [0, 1], names=["water", "trees"])
    e = _write_store(tmp_path / "E.zarr", [0, 1, 3], names=["water", "trees", "crops", "built"], seed=1)
    data = DataOptions(patch_size=32, val_fraction=0.0, sampler=sampler, pixels_per_class=5, val_pixels=20)
    prepared = assemble("test-pointwise", [a2], val_stores=[e], data=data)
    assert prepared.config.class_names == ["water", "trees", "crops", "built"]
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("tilefuse: note: held-out pixels hold class 'built' (id 3) but no training pixel does"), err
    assert "'crops'" not in err, "a class labelled nowhere (named only) is no news"
    assert "'water'" not in err and "'trees'" not in err and "cannot learn it; train on stores that hold it, unless it is" in err
    assert prepared.notes == [err.strip().removeprefix("tilefuse: note: ")]
    # every class trained on: not a word
    both = _write_store(tmp_path / "B.zarr", [0, 1], names=["water", "trees"], seed=2)
    assert assemble("test-pointwise", [a2], val_stores=[both], data=data).notes == []
    assert capsys.readouterr().err == ""


def test_a_pixel_sampler_names_the_classes_the_split_leaves_out_of_training(tmp_path, capsys):
    """With a split by blocks the labelled-pixel sampler knows which classes its training blocks hold: a class in held-out
    blocks only is named (stripes of ids 0..3, 16 rows each: blocks of 32 px hold two classes each)."""
    store = _write_store(tmp_path / "S.zarr", [0, 1, 2, 3], names=["water", "trees", "crops", "built"])
    label = open_scene(store)["label"].values
    data = DataOptions(sampler="pixels", split="blocks", block=32, val_fraction=0.5, pixels_per_class=5, allow_fewer=True, val_pixels=20)
    named_any = False
    for seed in range(8):
        prepared = assemble("test-pointwise", [store], data=data, seed=seed)
        trained = set(np.unique(label[prepared.split.region(0, "train", 0, 64, 0, 64)]).tolist())
        note = " ".join(prepared.notes)
        for k, name in enumerate(["water", "trees", "crops", "built"]):
            assert (f"{name!r} (id {k})" in note) == (k not in trained), (seed, note)
        named_any |= bool(prepared.notes)
    assert named_any
    capsys.readouterr()


# --- 4. other band counts and other bands: the messages say what to do ---------------------------------------------


def test_a_store_of_another_band_count_is_refused_with_the_fix(tmp_path):
    checkpoint = save_pointwise(tmp_path / "run")  # sar: 2 bands
    store = write(labelled_scene(64, 64, sar_bands=3), tmp_path / "S3.zarr")
    for call in (
        lambda: tilefuse.predict(checkpoint, store, tmp_path / "pred.zarr", **PREDICT),
        lambda: assemble("test-pointwise", [write(labelled_scene(64, 64), tmp_path / "S2.zarr")], val_stores=[store], data=DataOptions(patch_size=32, val_fraction=0.0)),
    ):
        with pytest.raises(InputError) as caught:
            call()
        message = str(caught.value)
        assert f"modality 'sar' has 3 bands in {store} but the model expects 2: use a store whose 'sar' has the model's 2 bands" in message
        assert "or a model trained on stores of 3 bands" in message and "\n" not in message
    assert not (tmp_path / "pred.zarr").exists()


def _banded(path, optical, seed=0):
    ds = labelled_scene(64, 64, seed=seed)
    return write(ds.assign_coords(optical_band=np.array(optical, dtype=object)), path)


def test_a_store_of_other_bands_is_named_as_such_not_as_another_order(tmp_path):
    from predict_fixtures import CLASSES, build_pointwise

    from tilefuse.checkpoint import ModelConfig, save_checkpoint

    model = build_pointwise(MODALITIES, len(CLASSES), seed=0)
    config = ModelConfig("test-pointwise", dict(MODALITIES), len(CLASSES), {"seed": 0}, list(CLASSES), band_names={"optical": ["blue", "green", "red"]})
    checkpoint = save_checkpoint(model, config, tmp_path / "run")
    other = _banded(tmp_path / "other.zarr", ["blue", "green", "nir"])
    with pytest.raises(InputError) as caught:
        tilefuse.predict(checkpoint, other, tmp_path / "pred.zarr", **PREDICT)
    message = str(caught.value)
    assert "wrong order" not in message and "\n" not in message and str(checkpoint) in message
    assert "other bands ('red' in the checkpoint but not in the store; 'nir' in the store but not in the checkpoint)" in message
    assert "use a store with the checkpoint's bands" in message and "or a checkpoint trained on these bands" in message
    assert not (tmp_path / "pred.zarr").exists()
    # a real reorder keeps the order wording
    reordered = _banded(tmp_path / "reordered.zarr", ["green", "blue", "red"])
    with pytest.raises(InputError, match=r"in the wrong order; re-ingest the store with its bands in the checkpoint's order"):
        tilefuse.predict(checkpoint, reordered, tmp_path / "pred.zarr", **PREDICT)

    # training on (or validating with) stores of other bands
    first = _banded(tmp_path / "first.zarr", ["blue", "green", "red"], seed=1)
    data = DataOptions(patch_size=32, val_fraction=0.0)
    for stores, val_stores in (([first, other], []), ([first], [other])):
        with pytest.raises(InputError) as caught:
            assemble("test-pointwise", stores, val_stores=val_stores, data=data)
        message = str(caught.value)
        assert f"{other} and {first} give modality 'optical' other bands" in message and "another order" not in message
        assert "('red' in the second but not in the first; 'nir' in the first but not in the second)" in message
    with pytest.raises(InputError, match=r"give modality 'optical' its bands in another order: .*re-ingest one of them with its bands in the other's order"):
        assemble("test-pointwise", [first, reordered], data=data)
