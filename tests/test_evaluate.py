"""`tilefuse evaluate`: block-by-block metrics of a prediction store against a scene's labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from test_sampling import CLASSES, labelled_scene, write
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.pipelines.evaluate import evaluate
from tilefuse.scene import IGNORE, STORE_KIND, open_scene


def write_prediction(scene: xr.Dataset, labels: np.ndarray, path: Path, complete: bool = True) -> Path:
    """A minimal prediction store (the contract: labels, manifest, attrs) on ``scene``'s grid."""
    ds = xr.Dataset(
        {"labels": (("y", "x"), labels.astype(np.uint8)), "block_done": (("block_y", "block_x"), np.ones((1, 1), np.uint8))},
        coords={"x": scene["x"].values, "y": scene["y"].values},
    ).rio.write_crs(scene.rio.crs)
    ds.attrs.update({STORE_KIND: "prediction", "complete": complete})
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    return path


@pytest.fixture
def scene_and_prediction(tmp_path):
    ds = labelled_scene(150, 130)
    store = write(ds, tmp_path / "scene.zarr")
    scene = open_scene(store)
    rng = np.random.default_rng(0)
    truth = ds["label"].values
    predicted = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 3, truth.shape)).astype(np.uint8)
    predicted[truth == IGNORE] = 0
    predicted[~ds["valid"].values] = IGNORE
    predicted[:5, :5] = IGNORE  # labelled but unpredicted
    return store, write_prediction(scene, predicted, tmp_path / "pred.zarr"), ds, predicted


def test_blocks_add_up_to_the_whole_scene(scene_and_prediction):
    store, pred, ds, predicted = scene_and_prediction
    truth = np.where(ds["valid"].values, ds["label"].values, IGNORE)
    scored = (truth != IGNORE) & (predicted != IGNORE)
    for block in (32, 64, 4096):
        metrics = evaluate(pred, store, block=block)
        assert metrics["pixels"] == int(scored.sum())
        assert metrics["overall_accuracy"] == pytest.approx(np.mean(predicted[scored] == truth[scored]))
        assert metrics["unscored_pixels"] == int(((truth != IGNORE) & (predicted == IGNORE)).sum())
        assert list(metrics["per_class"]) == CLASSES
        for k, name in enumerate(CLASSES):
            inter = np.sum(scored & (truth == k) & (predicted == k))
            union = np.sum(scored & ((truth == k) | (predicted == k)))
            assert metrics["per_class"][name]["iou"] == pytest.approx(inter / union)


def test_cli_prints_a_table_or_json(scene_and_prediction, capsys, tmp_path):
    store, pred, _, _ = scene_and_prediction
    assert main(["evaluate", str(pred), "--labels", str(store), "--json", "--out", str(tmp_path / "m.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kappa"] == json.loads((tmp_path / "m.json").read_text())["kappa"]
    assert main(["evaluate", str(pred), "--labels", str(store)]) == 0
    table = capsys.readouterr().out
    assert "mIoU" in table and "forest" in table and "kappa" in table


def test_metrics_written_as_a_folder_is_one_line(scene_and_prediction, capsys, tmp_path):
    """`--out m/` wrote a JSON file named m (the CLI's Path type dropped the slash)."""
    store, pred, _, _ = scene_and_prediction
    assert main(["evaluate", str(pred), "--labels", str(store), "--out", str(tmp_path / "m") + "/"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names a folder" in err, err
    assert not (tmp_path / "m").exists()


def test_bad_inputs(scene_and_prediction, tmp_path, capsys):
    store, pred, ds, predicted = scene_and_prediction
    other = write(labelled_scene(150, 131), tmp_path / "other.zarr")
    nolabel = write(labelled_scene(150, 130).drop_vars("label"), tmp_path / "nolabel.zarr")
    partial = write_prediction(open_scene(store), predicted, tmp_path / "partial.zarr", complete=False)
    cases = [
        ([str(partial), "--labels", str(store)], "partial prediction"),
        ([str(pred), "--labels", str(other)], "not on the grid"),
        ([str(pred), "--labels", str(nolabel)], "no labels"),
        ([str(store), "--labels", str(store)], "expected a prediction store"),
        ([str(tmp_path / "missing.zarr"), "--labels", str(store)], "does not exist"),
    ]
    for args, message in cases:
        assert main(["evaluate", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(InputError, match="is not a prediction store|expected a prediction store"):
        evaluate(store, store)


@pytest.mark.parametrize("dy, dx", [(1, 0), (2, 0), (-4, 0), (0.5, 0), (0, 1), (0, -2), (1, 1)])
def test_labels_on_a_grid_shifted_by_any_pixels_are_refused(scene_and_prediction, tmp_path, capsys, dy, dx):
    """Coordinates were compared with a relative tolerance (1e-5): 50 m of a UTM northing, so labels two 10 m rows
    off the prediction's grid were scored as if on it. Any shift of a pixel or part of one is another grid."""
    store, pred, ds, _ = scene_and_prediction
    shifted = ds.assign_coords(y=ds["y"].values + 10.0 * dy, x=ds["x"].values + 10.0 * dx)
    other = write(shifted, tmp_path / "shifted.zarr")
    assert main(["evaluate", str(pred), "--labels", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not on the grid" in err and len(err.splitlines()) == 1, err
    same = write(ds.assign_coords(y=ds["y"].values + 1e-6, x=ds["x"].values - 1e-6), tmp_path / "same.zarr")  # rounding only
    assert evaluate(pred, same)["pixels"] == evaluate(pred, store)["pixels"]


@pytest.mark.slow
def test_train_predict_evaluate_end_to_end(tmp_path):
    """A trained checkpoint goes straight into `tilefuse predict`, and evaluate scores its output."""
    import test_training  # noqa: F401  (registers the test models)
    from tilefuse.pipelines.predict import predict
    from tilefuse.pipelines.train import train

    store = write(labelled_scene(128, 128), tmp_path / "scene.zarr")
    run = train("test-seg", [store], tmp_path / "run", steps=30, batch_size=4, patch_size=32, lr=1e-2, workers=0, progress=False)
    predict(run, store, tmp_path / "pred.zarr", tile=64, cluster="sync", progress=False)
    metrics = evaluate(tmp_path / "pred.zarr", store)
    assert metrics["overall_accuracy"] > 0.6 and metrics["unscored_pixels"] == 0


def test_split_limits_scoring_to_held_out_blocks_less_their_context(scene_and_prediction, tmp_path, capsys):
    from tilefuse.sampling import spatial_split

    store, pred, ds, predicted = scene_and_prediction
    split = spatial_split([(150, 130)], block=40, val=0.2, test=0.3, seed=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"stores": [str(store)], "context": 3, **split.to_dict()}))
    test_blocks = split.region(0, "test", 0, 150, 0, 130)
    padded = np.pad(test_blocks, 3, constant_values=True)  # outside the scene does not disqualify
    inside = np.array([[padded[y : y + 7, x : x + 7].all() for x in range(130)] for y in range(150)])
    truth = np.where(ds["valid"].values & inside, ds["label"].values, IGNORE)
    scored = (truth != IGNORE) & (predicted != IGNORE)
    for block in (32, 4096):
        metrics = evaluate(pred, store, split=run, block=block)
        assert metrics["pixels"] == int(scored.sum()) > 0
        assert metrics["overall_accuracy"] == pytest.approx(np.mean(predicted[scored] == truth[scored]))
    assert main(["evaluate", str(pred), "--labels", str(tmp_path / "pred.zarr"), "--split", str(run)]) == 2
    other = write(labelled_scene(150, 130, seed=5), tmp_path / "other-scene.zarr")
    assert main(["evaluate", str(pred), "--labels", str(other), "--split", str(run)]) == 2
    assert "not one of the stores split" in capsys.readouterr().err


@pytest.mark.parametrize("block", [-5, -1, True, 1.5, "64", 10**6])
def test_a_block_that_is_not_a_size_is_one_line(scene_and_prediction, block):
    """block=-5 scored no pixel and returned metrics that looked like any others (pixels 0); 1.5 or '64' were
    TypeError tracebacks, True read the scene one pixel at a time."""
    store, pred, _, _ = scene_and_prediction
    with pytest.raises(InputError, match=r"^block= must be a whole number of px in 1\.\.32768"):
        evaluate(pred, store, block=block)
    assert evaluate(pred, store, block=1024) == evaluate(pred, store)


def test_a_subset_without_a_split_is_refused_not_ignored(scene_and_prediction, capsys):
    """--subset val without --split scored the whole scene as if it were the validation blocks."""
    store, pred, _, _ = scene_and_prediction
    for subset in ("val", "test", "bogus"):
        assert main(["evaluate", str(pred), "--labels", str(store), "--subset", subset]) == 2
        err = capsys.readouterr().err.strip()
        assert "needs split= (--split RUN)" in err and len(err.splitlines()) == 1, err
        with pytest.raises(InputError, match=r"needs split="):
            evaluate(pred, store, subset=subset)
    assert main(["evaluate", str(pred), "--labels", str(store)]) == 0


def test_a_split_whose_held_out_blocks_leave_no_pixel_to_score_is_one_line(scene_and_prediction, tmp_path, capsys):
    """Blocks as large as the patch (the default block for stores under 8 patches across) hold no pixel whose
    context (half the patch) lies wholly in them: evaluate --split returned metrics of 0 pixels (OA null), which
    read like a score. It names the blocks, the context and the fix."""
    from tilefuse.sampling import spatial_split

    store, pred, _, _ = scene_and_prediction
    blocks = np.zeros((5, 5), int)
    blocks[2, 2] = blocks[1, 3] = 2  # test blocks away from the scene's edges, apart: none holds a 33 px neighbourhood
    blocks[3, 1] = 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"stores": [str(store)], "context": 16, "block": 32, "assignment": [blocks.tolist()]}))
    with pytest.raises(InputError, match=r"no labelled pixel of .*scene\.zarr in its 'test' blocks of 32 px lies 16 px or more inside them .*block= \(--block\)"):
        evaluate(pred, store, split=run)
    assert main(["evaluate", str(pred), "--labels", str(store), "--split", str(run), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--block" in err, err


@pytest.mark.parametrize(
    "damage",
    [{"block": 0}, {"block": -32}, {"block": 1.5}, {"assignment": [[[0, 7], [1, 2]]]}, {"assignment": [[[0, 300], [1, 2]]]}, {"assignment": [[0, 1]]},
     {"assignment": [[[0, 1], [2]]]}, {"context": -1}, {"stores": "scene.zarr"}],
)
def test_a_damaged_split_file_is_one_line_naming_it(scene_and_prediction, tmp_path, damage):
    """A split file edited or damaged into a block of 0 px (ZeroDivisionError traceback), codes that are no subset
    (used as data: 7 counted as no subset at all), a ragged or 1-D assignment, a negative context."""
    store, pred, _, _ = scene_and_prediction
    run = tmp_path / "run"
    run.mkdir()
    good = {"stores": [str(store)], "context": 3, "block": 64, "assignment": [[[0, 2, 1], [2, 0, 0], [0, 1, 2]]]}
    (run / "split.json").write_text(json.dumps({**good, **damage}))
    with pytest.raises(InputError, match=r"split\.json is not a training split \(.*\): pass a run folder trained with a split") as error:
        evaluate(pred, store, split=run)
    assert "\n" not in str(error.value)


def test_labels_without_a_labelled_valid_pixel_are_one_line_not_metrics_of_nothing(scene_and_prediction, tmp_path):
    """A labels store whose labels are all 255 where the scene is valid (write_scene writes one) gave metrics of 0
    pixels (OA null), which read like a score."""
    store, pred, ds, _ = scene_and_prediction
    empty = ds.copy()
    empty["label"] = empty["label"].where(~empty["valid"], IGNORE).astype(np.uint8)
    empty["label"].attrs["class_names"] = ds["label"].attrs["class_names"]
    other = write(empty, tmp_path / "unlabelled.zarr")
    with pytest.raises(InputError, match=r"unlabelled\.zarr has no labelled pixel where it is valid: nothing to score"):
        evaluate(pred, other)


@pytest.mark.parametrize("size", [64, 96])
def test_split_scoring_refuses_a_labels_store_replaced_since_training(tmp_path, capsys, size):
    """`evaluate --split RUN` of a store replaced since the run was trained: another size was an IndexError
    traceback; the same size scored the new scene's 'held-out' blocks, which the run had never split."""
    from tilefuse.cli import main

    store = tmp_path / "s.zarr"
    assert main(["synth", str(store), "--size", "64", "--seed", "1"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--model", "pad", "--hparam", "preset=micro", "--store", str(store), "--out", str(run), "--steps", "1",
                 "--batch-size", "2", "--patch-size", "32", "--workers", "0", "--test-fraction", "0.3", "--block", "32", "--quiet"]) == 0  # fmt: skip
    assert main(["predict", "--checkpoint", str(run), "--store", str(store), "--out", str(tmp_path / "p.zarr"), "--tile", "32"]) == 0
    assert main(["evaluate", str(tmp_path / "p.zarr"), "--labels", str(store), "--split", str(run)]) == 0
    assert main(["synth", str(store), "--size", str(size), "--seed", "2", "--overwrite"]) == 0
    assert main(["predict", "--checkpoint", str(run), "--store", str(store), "--out", str(tmp_path / "q.zarr"), "--tile", "32"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "q.zarr"), "--labels", str(store), "--split", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the scene the run split in" in err, err
