import json
import os

import numpy as np
import pytest
import torch
import zarr
from predict_fixtures import CALLS, CLASSES, FAIL_AFTER, MODALITIES, reset_calls, save_pointwise, write_test_scene

import tilefuse
from tilefuse.checkpoint import ModelConfig, save_checkpoint
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.grid import TileGrid
from tilefuse.outputs import output_lock
from tilefuse.prediction import done_blocks, open_prediction
from tilefuse.scene import normalise, band_stats, open_scene
from tilefuse.tile_model import build_model

SETTINGS = {"tile": 32, "overlap": 8, "block_size": 64, "batch_size": 2, "progress": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    scene = write_test_scene(root / "scene.zarr", 150, 130, seed=11, nodata=(slice(0, 20), slice(0, 130)))
    checkpoint = save_pointwise(root / "pointwise")
    reference = tilefuse.predict(checkpoint, scene, root / "reference.zarr", probs=True, **SETTINGS)
    return root, scene, checkpoint, reference


def _cli(checkpoint, scene, out, *extra):
    return main(["predict", "--checkpoint", str(checkpoint), "--store", str(scene), "--out", str(out), *map(str, extra)])


def test_resume_after_an_interrupted_run_finishes_only_missing_blocks(tmp_path, setup):
    _, scene, checkpoint, reference = setup
    out = tmp_path / "pred.zarr"
    reset_calls()
    FAIL_AFTER["forward"] = 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        tilefuse.predict(checkpoint, scene, out, probs=True, **SETTINGS)
    FAIL_AFTER["forward"] = None
    done = done_blocks(out)
    assert 0 < done.sum() < done.size
    assert zarr.open_group(out).attrs["complete"] is False
    with pytest.raises(InputError, match=r"partial prediction .*finish it with `tilefuse predict ... --resume`"):
        open_prediction(out)
    with pytest.warns(UserWarning, match="partial prediction"):
        open_prediction(out, allow_partial=True)
    assert main(["export", str(out), str(tmp_path / "partial.tif")]) == 2
    with output_lock(out):  # a live run still writing it: a --resume would be refused, so the advice is to wait
        with pytest.raises(InputError, match=rf"partial prediction .*: process {os.getpid()} is writing it, wait for it to finish$"):
            open_prediction(out)

    reset_calls()
    assert _cli(checkpoint, scene, out, "--resume", "--tile", 32, "--overlap", 8, "--batch-size", 2, "--probs") == 0
    assert CALLS["tiles"] > 0
    pred = open_prediction(out)
    assert np.array_equal(pred["labels"].values, reference["labels"].values)
    assert np.array_equal(pred["probs"].values, reference["probs"].values)

    reset_calls()
    assert _cli(checkpoint, scene, out, "--resume", "--tile", 32, "--overlap", 8, "--batch-size", 2, "--probs") == 0
    assert CALLS["tiles"] == 0, "resuming a complete prediction runs nothing"


def test_resume_reruns_fewer_tiles_than_a_full_run(tmp_path, setup):
    _, scene, checkpoint, _ = setup
    out = tmp_path / "pred.zarr"
    reset_calls()
    tilefuse.predict(checkpoint, scene, out, **SETTINGS)
    full = CALLS["tiles"]
    group = zarr.open_group(out, mode="r+")
    group["block_done"][0, 0] = 0  # pretend the first block never finished
    group["labels"][0:64, 0:64] = 255
    group.attrs["complete"] = False
    reset_calls()
    tilefuse.predict(checkpoint, scene, out, resume=True, **SETTINGS)
    assert 0 < CALLS["tiles"] < full / 2
    reference = tilefuse.predict(checkpoint, scene, tmp_path / "again.zarr", **SETTINGS)
    assert np.array_equal(open_prediction(out)["labels"].values, reference["labels"].values)


def test_resume_with_other_settings_or_checkpoint_is_refused(tmp_path, setup):
    root, scene, checkpoint, _ = setup
    out = root / "reference.zarr"
    before = zarr.open_group(out).attrs.asdict()
    assert _cli(checkpoint, scene, out, "--resume", "--tile", 48, "--overlap", 8, "--probs") == 2
    other = save_pointwise(tmp_path / "other", seed=5)
    assert _cli(other, scene, out, "--resume", "--tile", 32, "--overlap", 8, "--probs") == 2
    with pytest.raises(InputError, match="checkpoint_hash"):
        tilefuse.predict(other, scene, out, resume=True, probs=True, **SETTINGS)
    assert zarr.open_group(out).attrs.asdict() == before


def test_resume_from_another_scene_on_the_same_grid_is_refused(tmp_path, setup):
    """A partial store resumed with another scene of the same size was finished from it: two scenes' labels, 'complete'."""
    _, scene, checkpoint, reference = setup
    out = tmp_path / "pred.zarr"
    reset_calls()
    FAIL_AFTER["forward"] = 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        tilefuse.predict(checkpoint, scene, out, **SETTINGS)
    reset_calls()
    other = write_test_scene(tmp_path / "other.zarr", 150, 130, seed=12, nodata=(slice(0, 20), slice(0, 130)))
    moved = tmp_path / "moved.zarr"
    import shutil

    shutil.copytree(scene, moved)
    before = zarr.open_group(out).attrs.asdict()
    with pytest.raises(InputError, match="another scene"):
        tilefuse.predict(checkpoint, other, out, resume=True, **SETTINGS)
    assert _cli(checkpoint, other, out, "--resume", "--tile", 32, "--overlap", 8, "--block-size", 64) == 2
    assert zarr.open_group(out).attrs.asdict() == before and not done_blocks(out).all()
    # the same scene moved elsewhere resumes, to the same bits
    pred = tilefuse.predict(checkpoint, moved, out, resume=True, **SETTINGS)
    assert np.array_equal(pred["labels"].values, reference["labels"].values)


@pytest.mark.parametrize("complete", [False, True])
def test_a_damaged_manifest_key_is_redone_by_the_resume_the_error_names(tmp_path, setup, capsys, complete):
    """A garbled block_done key: readers said 'recompute it with --resume', and --resume failed with that same line."""
    _, scene, checkpoint, reference = setup
    out = tmp_path / "pred.zarr"
    tilefuse.predict(checkpoint, scene, out, probs=True, **SETTINGS)
    if not complete:
        group = zarr.open_group(out, mode="r+")
        group["block_done"][2, 1] = 0
        group.attrs["complete"] = False
    (out / "block_done" / "c" / "0" / "1").write_bytes(b"garbage")
    if not complete:
        assert main(["evaluate", str(out), "--labels", str(scene)]) == 2
        assert "'block_done'" in capsys.readouterr().err
    reset_calls()
    assert _cli(checkpoint, scene, out, "--resume", "--tile", 32, "--overlap", 8, "--block-size", 64, "--batch-size", 2, "--probs") == 0
    assert CALLS["tiles"] > 0 and done_blocks(out).all()
    pred = open_prediction(out)
    assert np.array_equal(pred["labels"].values, reference["labels"].values)
    assert np.array_equal(pred["probs"].values, reference["probs"].values)


def test_existing_output_needs_overwrite_or_resume(tmp_path, setup, capsys):
    root, scene, checkpoint, reference = setup
    out = tmp_path / "pred.zarr"
    tilefuse.predict(checkpoint, scene, out, **SETTINGS)
    capsys.readouterr()
    assert _cli(checkpoint, scene, out, "--tile", 32) == 2
    assert "--resume" in capsys.readouterr().err, "an interrupted run's store is finished with --resume, not replaced"
    assert _cli(checkpoint, scene, out, "--tile", 32, "--overlap", 8, "--block-size", 64, "--overwrite") == 0
    assert np.array_equal(open_prediction(out)["labels"].values, reference["labels"].values)
    not_a_prediction = tmp_path / "keep"
    not_a_prediction.mkdir()
    (not_a_prediction / "data.txt").write_text("precious")
    assert _cli(checkpoint, scene, not_a_prediction, "--tile", 32, "--overwrite") == 2
    assert (not_a_prediction / "data.txt").read_text() == "precious"


def _bad_checkpoints(tmp_path):
    garbled = save_pointwise(tmp_path / "garbled")
    (garbled / "model.safetensors").write_bytes(b"\x00" * 64)
    lidar = save_pointwise(tmp_path / "lidar")
    model = build_model("test-pointwise", {"optical": 3, "lidar": 1}, 4)
    save_checkpoint(model, ModelConfig("test-pointwise", {"optical": 3, "lidar": 1}, 4, {}, CLASSES), lidar)
    bands = tmp_path / "bands"
    model = build_model("test-pointwise", {"optical": 4, "sar": 2}, 4)
    save_checkpoint(model, ModelConfig("test-pointwise", {"optical": 4, "sar": 2}, 4, {}, CLASSES), bands)
    return garbled, lidar, bands


def test_bad_input_exits_2_and_writes_nothing(tmp_path, setup, capsys):
    root, scene, checkpoint, _ = setup
    garbled, lidar, bands = _bad_checkpoints(tmp_path)
    margin = save_pointwise(tmp_path / "margin", margin=4, blend=False)
    out = tmp_path / "out.zarr"
    cases = [
        (tmp_path / "missing", scene, ()),
        (garbled, scene, ()),
        (lidar, scene, ()),
        (bands, scene, ()),
        (checkpoint, tmp_path / "no-scene.zarr", ()),
        (checkpoint, scene, ("--tile", 32, "--overlap", 32)),
        (margin, scene, ("--tile", 8)),
        (checkpoint, scene, ("--blend", "box")),
        (checkpoint, scene, ("--cluster", "local:zero")),
        (checkpoint, scene, ("--cluster", "cuda")),
        (checkpoint, scene, ("--cluster", "tcp://127.0.0.1:9")),
        (checkpoint, scene, ("--cluster", str(tmp_path / "gone.json"))),
        (checkpoint, scene, ("--batch-size", 0)),
        (checkpoint, scene, ("--prefetch", -1)),
        (checkpoint, scene, ("--reader-threads", 0)),
        # typos that failed deep in zarr or torch (a segfault for the threads) or read the whole scene ahead
        (checkpoint, scene, ("--block-size", 999_999_999_999)),
        (checkpoint, scene, ("--tile", 10**6, "--block-size", 10**6)),
        (checkpoint, scene, ("--torch-threads", 99_999_999)),
        (checkpoint, scene, ("--reader-threads", 99_999_999)),
        (checkpoint, scene, ("--prefetch", 10**6)),
        *([] if torch.cuda.is_available() else [(checkpoint, scene, ("--precision", "fp16")), (checkpoint, scene, ("--device", "cuda"))]),
    ]
    for args in cases:
        capsys.readouterr()
        assert _cli(args[0], args[1], out, *args[2]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("tilefuse: error:") and "\n" not in err and "Traceback" not in err, err
        assert not out.exists(), f"{args} left an output behind"
    assert _cli(checkpoint, scene, scene) == 2


@pytest.mark.parametrize("tile, overlap", [(1, None), (1, 0), (3, None), (7, 0), (16, 9), (256, 250), (64, 63)])
def test_a_tile_step_below_8_px_is_one_line_naming_the_tiles_and_writes_nothing(tmp_path, setup, capsys, tile, overlap):
    """--tile 1 ran one tile per pixel (4 million per 2,048 px block; a 512^2 px scene not done in hours where
    256 px tiles take seconds), as did an overlap of all but a pixel of the tile."""
    _, scene, checkpoint, _ = setup
    out = tmp_path / "out.zarr"
    step = tile - (tile // 4 if overlap is None else overlap)
    with pytest.raises(InputError, match=rf"^tile={tile} \(--tile\) with overlap=\d+ \(--overlap\) steps {step} px from one tile to the next: [\d,]+ tiles through the model for this 150 x 130 px scene; keep tile - overlap >= 8 px"):
        tilefuse.predict(checkpoint, scene, out, tile=tile, overlap=overlap, progress=False)
    assert _cli(checkpoint, scene, out, "--tile", tile, *(() if overlap is None else ("--overlap", overlap))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tilefuse: error: tile=") and "\n" not in err
    if (tile, overlap) == (1, 0):  # one tile per pixel
        assert f"{150 * 130:,} tiles" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cluster", ["sync", "local:1"])
def test_a_scene_store_replaced_mid_run_fails_the_run_and_is_never_mixed_into_it(tmp_path, cluster):
    """ingest/synth --overwrite of the scene while it was predicted: the blocks read after the replacement came
    from the new scene, among the old scene's blocks, and the store was marked complete (the storage layer
    catches a replacement during one read only; each block opens the store afresh)."""
    import threading

    from predict_fixtures import make_scene, wait_for_blocks
    from tilefuse.scene import write_scene

    scene = write_test_scene(tmp_path / "scene.zarr", 150, 130, seed=1)
    slow = save_pointwise(tmp_path / "slow", delay=0.3)
    out = tmp_path / "pred.zarr"
    swapped = {}

    def swap():
        if wait_for_blocks(out, 2, timeout=120) is not None:
            write_scene(make_scene(150, 130, seed=2), scene, chunk=64, shard=None, overwrite=True)
            swapped["at"] = int(done_blocks(out).sum())

    watcher = threading.Thread(target=swap)
    watcher.start()
    try:
        with pytest.raises(InputError, match=rf"{scene}.* was replaced while"):
            tilefuse.predict(slow, scene, out, tile=32, overlap=10, block_size=32, batch_size=2, torch_threads=1, cluster=cluster, progress=False)
    finally:
        watcher.join()
    assert swapped and not done_blocks(out).all()
    with pytest.raises(InputError, match="which was replaced since"):  # what was written came from the old scene
        tilefuse.predict(slow, scene, out, tile=32, overlap=10, block_size=32, batch_size=2, torch_threads=1, resume=True, progress=False)


def test_a_store_begun_with_a_smaller_tile_step_still_resumes_with_it_only(tmp_path, setup, monkeypatch):
    from tilefuse.cluster import run

    _, scene, checkpoint, _ = setup
    out, settings = tmp_path / "old.zarr", {"tile": 16, "overlap": 10, "block_size": 64, "progress": False}
    monkeypatch.setattr(run, "MIN_STRIDE", 1)  # a store made before the bound
    reference = tilefuse.predict(checkpoint, scene, tmp_path / "whole.zarr", **settings)
    reset_calls()
    FAIL_AFTER["forward"] = 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        tilefuse.predict(checkpoint, scene, out, **settings)
    reset_calls()
    monkeypatch.undo()
    with pytest.raises(InputError, match="steps 6 px"):
        tilefuse.predict(checkpoint, scene, tmp_path / "new.zarr", **settings)
    with pytest.raises(InputError, match=r"was made with overlap=10, not 9: resume with overlap=10 \(--overlap 10\)"):
        tilefuse.predict(checkpoint, scene, out, resume=True, **{**settings, "overlap": 9})
    pred = tilefuse.predict(checkpoint, scene, out, resume=True, **settings)
    assert np.array_equal(pred["labels"].values, reference["labels"].values)


def test_a_tile_step_of_8_px_runs(tmp_path, setup):
    _, scene, checkpoint, reference = setup
    pred = tilefuse.predict(checkpoint, scene, tmp_path / "pred.zarr", tile=16, overlap=8, block_size=64, batch_size=8, probs=True, progress=False)
    assert pred.attrs["complete"] and (pred["labels"].values != 255).sum() == (reference["labels"].values != 255).sum()


def test_a_batch_beyond_the_tiles_of_a_block_runs_as_that_many_with_the_same_output(tmp_path, setup, capsys):
    """batch_size= larger than a block's tiles is cut to them (the rest would only be padding: 10^8 tiles asked
    for 39 TB); the output is the same bits."""
    _, scene, checkpoint, reference = setup
    pred = tilefuse.predict(checkpoint, scene, tmp_path / "big.zarr", probs=True, **{**SETTINGS, "batch_size": 10**8, "progress": True})
    assert f"batch {TileGrid(150, 130, SETTINGS['tile'], SETTINGS['overlap'], block=SETTINGS['block_size']).tiles_per_block})" in capsys.readouterr().err
    assert np.array_equal(pred["labels"].values, reference["labels"].values)
    assert np.array_equal(pred["probs"].values, reference["probs"].values)


def test_read_ahead_settings_leave_every_bit_and_layout_settings_are_recorded(tmp_path, setup, capsys):
    _, scene, checkpoint, reference = setup
    runs = {"no read-ahead": ("--prefetch", 0), "deep": ("--prefetch", 3, "--reader-threads", 2), "one reader": ("--prefetch", 2, "--reader-threads", 1)}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.zarr"
        assert _cli(checkpoint, scene, out, "--tile", 32, "--overlap", 8, "--block-size", 64, "--batch-size", 2, "--probs", *extra) == 0, name
        pred = open_prediction(out)
        assert np.array_equal(pred["labels"].values, reference["labels"].values), name
        assert np.array_equal(pred["probs"].values, reference["probs"].values), name
    # channels_last may change the last bits: the store records it, and a resume with the other layout is refused
    out = tmp_path / "nhwc.zarr"
    nhwc = tilefuse.predict(checkpoint, scene, out, channels_last=True, probs=True, **SETTINGS)
    assert nhwc.attrs["channels_last"] is True and nhwc.attrs["compile"] is False and nhwc.attrs["precision"] == "fp32"
    valid = reference["labels"].values != 255
    assert (nhwc["labels"].values == reference["labels"].values)[valid].mean() > 0.99
    capsys.readouterr()
    assert _cli(checkpoint, scene, out, "--resume", "--tile", 32, "--overlap", 8, "--batch-size", 2, "--probs") == 2
    err = capsys.readouterr().err
    assert "channels_last=True" in err and "--channels-last" in err and "\n" not in err.strip()
    assert _cli(checkpoint, scene, out, "--resume", "--tile", 32, "--overlap", 8, "--batch-size", 2, "--probs", "--channels-last") == 0


def test_quicklook_png_of_the_prediction(tmp_path, setup):
    import matplotlib.image

    _, scene, checkpoint, _ = setup
    png = tmp_path / "look.png"
    tilefuse.predict(checkpoint, scene, tmp_path / "pred.zarr", quicklook=png, **SETTINGS)
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 50


def test_a_refused_resume_names_the_value_to_resume_with(tmp_path, setup):
    """It said 'resume with the same checkpoint and settings' without saying which value, or which flag, differs."""
    _, scene, checkpoint, _ = setup
    with_probs, without = tmp_path / "with.zarr", tmp_path / "without.zarr"
    tilefuse.predict(checkpoint, scene, with_probs, probs="float16", **SETTINGS)
    tilefuse.predict(checkpoint, scene, without, **SETTINGS)
    with pytest.raises(InputError, match=r"resume with probs='float16' \(--probs --probs-dtype float16\), or pass overwrite=True"):
        tilefuse.predict(checkpoint, scene, with_probs, resume=True, **SETTINGS)
    with pytest.raises(InputError, match=r"resume with probs=False \(no --probs\), or pass overwrite=True"):
        tilefuse.predict(checkpoint, scene, without, resume=True, probs=True, **SETTINGS)
    with pytest.raises(InputError, match=r"resume with block_size=64 \(--block-size 64\), or pass overwrite=True"):
        tilefuse.predict(checkpoint, scene, without, resume=True, **{**SETTINGS, "block_size": 128})


def test_a_quicklook_written_as_a_folder_is_one_line(tmp_path, setup, capsys):
    """`--quicklook q/` wrote a PNG file named q (the CLI's Path type dropped the slash)."""
    _, scene, checkpoint, _ = setup
    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(scene), "--out", str(tmp_path / "pred.zarr"), "--tile", "32"]
    assert main([*args, "--quicklook", str(tmp_path / "q") + "/"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names a folder" in err, err
    assert not (tmp_path / "q").exists() and not (tmp_path / "pred.zarr").exists()


@pytest.mark.slow
def test_pad_runs_blended(tmp_path, setup):
    _, scene, _, _ = setup
    torch.manual_seed(0)
    model = build_model("pad", MODALITIES, len(CLASSES), preset="atto")
    checkpoint = save_checkpoint(model, ModelConfig("pad", dict(MODALITIES), len(CLASSES), {"preset": "atto"}, CLASSES), tmp_path / "pad")
    small = write_test_scene(tmp_path / "small.zarr", 40, 50, seed=2, nodata=(slice(0, 8), slice(0, 50)))
    pred = tilefuse.predict(checkpoint, small, tmp_path / "pad.zarr", tile=32, overlap=8, block_size=32, batch_size=2, progress=False)
    valid = open_scene(small)["valid"].values
    labels = pred["labels"].values
    assert pred.attrs["blend"] == "gaussian" and np.all(labels[~valid] == 255) and np.all(labels[valid] < len(CLASSES))


def test_s2fin_dense_adapter_equals_whole_image(tmp_path):
    torch.manual_seed(0)
    hparams = {"patch_size": 5, "dim": 16}
    model = build_model("s2fin", MODALITIES, len(CLASSES), **hparams).eval()
    checkpoint = save_checkpoint(model, ModelConfig("s2fin", dict(MODALITIES), len(CLASSES), hparams, CLASSES), tmp_path / "s2fin")
    scene = write_test_scene(tmp_path / "scene.zarr", 21, 19, seed=8)
    pred = tilefuse.predict(checkpoint, scene, tmp_path / "pred.zarr", tile=8, block_size=16, batch_size=2, probs="float32", progress=False)
    assert pred.attrs["blend"] == "none" and pred.attrs["margin"] == 2
    ds = open_scene(scene)
    inputs = {
        name: torch.from_numpy(np.pad(normalise(ds[name].values, *band_stats(ds, name)), ((0, 0), (2, 2), (2, 2)), mode="reflect"))[None]
        for name in MODALITIES
    }
    with torch.inference_mode():
        whole = torch.softmax(model(inputs), 1)[0].numpy()
    np.testing.assert_allclose(pred["probs"].values, whole, atol=1e-5, rtol=0)


def test_prediction_attrs_record_provenance(setup):
    _, _, checkpoint, reference = setup
    attrs = reference.attrs
    assert attrs["model"] == "test-pointwise" and attrs["tile"] == 32 and attrs["overlap"] == 8
    assert attrs["blend"] == "gaussian" and attrs["block_size"] == 64 and attrs["probs"] == "uint8"
    assert attrs["tilefuse_version"] == tilefuse.__version__
    assert attrs["checkpoint_hash"] == tilefuse.checkpoint.checkpoint_hash(checkpoint)
    assert json.loads(json.dumps(attrs["class_names"])) == CLASSES


def test_a_checkpoint_with_band_statistics_for_some_modalities_only_is_refused(tmp_path, setup):
    _, scene, _, _ = setup
    stats = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    partial = save_pointwise(tmp_path / "partial", band_stats={"optical": stats})  # "sar" would take the store's
    with pytest.raises(InputError, match=r"band statistics for optical but not for sar: .*damaged or edited"):
        tilefuse.predict(partial, scene, tmp_path / "pred.zarr", **SETTINGS)
    assert not (tmp_path / "pred.zarr").exists()
    both = save_pointwise(tmp_path / "both", band_stats={"optical": stats, "sar": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}})
    assert tilefuse.predict(both, scene, tmp_path / "both.zarr", **SETTINGS)["labels"].shape == (150, 130)


@pytest.mark.parametrize("moment", ["before-the-model-loads", "before-the-store-exists"])
def test_a_checkpoint_rewritten_during_a_run_never_gives_a_complete_store_of_other_weights(tmp_path, setup, monkeypatch, moment):
    """A training run rewriting the checkpoint while predict runs (--checkpoint RUN during train --resume): the store
    recorded the hash read at the start and was computed with whatever the workers loaded later; now the workers load
    the recorded version or the run ends in one line, the store not complete."""
    from tilefuse.cluster.run import ClusterRun

    _, scene, _, _ = setup
    checkpoint = save_pointwise(tmp_path / "run", seed=0)
    versions = {tilefuse.checkpoint.checkpoint_hash(p): p for p in (save_pointwise(tmp_path / f"v{s}", seed=s) for s in (0, 5))}
    method = "run" if moment == "before-the-model-loads" else "prepare"
    original = getattr(ClusterRun, method)

    def rewrite_first(self, *args):
        save_pointwise(checkpoint, seed=5)  # what a training run's next save does
        return original(self, *args)

    monkeypatch.setattr(ClusterRun, method, rewrite_first)
    out = tmp_path / "pred.zarr"
    try:
        result = tilefuse.predict(checkpoint, scene, out, **SETTINGS)
    except InputError as error:
        assert "changed after this prediction started" in str(error)
        assert not os.path.exists(out) or not zarr.open_group(out).attrs["complete"]
        return
    monkeypatch.undo()  # complete: the labels of the version it records
    reference = tilefuse.predict(versions[result.attrs["checkpoint_hash"]], scene, tmp_path / "ref.zarr", **SETTINGS)
    assert np.array_equal(result["labels"].values, reference["labels"].values)


def test_resume_and_overwrite_together_are_refused_and_touch_nothing(tmp_path, setup, capsys):
    """--resume --overwrite resumed the store and ignored --overwrite (train refuses the pair): which one was meant?"""
    _, scene, checkpoint, _ = setup
    out = tmp_path / "pred.zarr"
    assert _cli(checkpoint, scene, out, "--resume", "--overwrite", "--tile", 32) == 2
    assert not out.exists()
    reset_calls()
    FAIL_AFTER["forward"] = 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        tilefuse.predict(checkpoint, scene, out, **SETTINGS)
    reset_calls()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert _cli(checkpoint, scene, out, "--resume", "--overwrite", "--tile", 32, "--overlap", 8, "--block-size", 64) == 2
    err = capsys.readouterr().err.strip()
    assert "contradict each other" in err and len(err.splitlines()) == 1, err
    with pytest.raises(InputError, match=r"resume=True \(--resume\) and overwrite=True \(--overwrite\)"):
        tilefuse.predict(checkpoint, scene, out, resume=True, overwrite=True, **SETTINGS)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_checkpoint_of_an_unfinished_training_run_is_predicted_with_a_note(tmp_path, setup, capsys):
    """A run's checkpoint at step 2 of 4 (a run still going, or stopped) predicts as asked, with one note saying so;
    a finished run's checkpoint gets none."""
    from predict_fixtures import build_pointwise

    _, scene, _, reference = setup
    model = build_pointwise(MODALITIES, len(CLASSES), seed=0)
    for step, noted in ((2, True), (4, False)):
        config = ModelConfig("test-pointwise", dict(MODALITIES), len(CLASSES), {"seed": 0}, list(CLASSES), extra={"step": step, "steps": 4})
        run = save_checkpoint(model, config, tmp_path / f"run-{step}")
        capsys.readouterr()
        assert _cli(run, scene, tmp_path / f"pred-{step}.zarr", "--tile", 32, "--overlap", 8, "--block-size", 64) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if "has not finished" in line]
        assert len(notes) == (1 if noted else 0), notes
        if noted:
            assert "step 2 of 4" in notes[0] and "--resume" in notes[0]
        assert np.array_equal(open_prediction(tmp_path / f"pred-{step}.zarr")["labels"].values, reference["labels"].values)


def test_a_resume_keeps_the_batch_size_the_store_was_computed_with(tmp_path, setup):
    """A tile's bits may follow its batch's shape (PAD micro: 9,240 of a scene's float32 probabilities differed
    between batch 2 and 3). A resume took the batch size from the free memory of the day, or from --batch-size,
    and mixed blocks computed both ways. The store records it; a resume without one takes it, another is refused."""
    _, scene, _, _ = setup
    checkpoint = save_pointwise(tmp_path / "shifted", batch_shift=0.01)
    settings = {**SETTINGS, "batch_size": 2}
    reference = tilefuse.predict(checkpoint, scene, tmp_path / "reference.zarr", probs="float32", **settings)
    other = tilefuse.predict(checkpoint, scene, tmp_path / "other.zarr", probs="float32", **{**settings, "batch_size": 3})
    assert not np.array_equal(reference["probs"].values, other["probs"].values), "the test model must follow its batch size"
    assert reference.attrs["batch_size"] == 2

    out = tmp_path / "pred.zarr"
    reset_calls()
    FAIL_AFTER["forward"] = 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        tilefuse.predict(checkpoint, scene, out, probs="float32", **settings)
    FAIL_AFTER["forward"] = None
    with pytest.raises(InputError, match=r"batch_size=2 .*resume with batch_size=2 \(--batch-size 2\)"):
        tilefuse.predict(checkpoint, scene, out, probs="float32", resume=True, **{**settings, "batch_size": 3})
    reset_calls()
    pred = tilefuse.predict(checkpoint, scene, out, probs="float32", resume=True, **{**settings, "batch_size": None})
    assert CALLS["batches"] and set(CALLS["batches"]) == {2}
    assert np.array_equal(pred["probs"].values, reference["probs"].values)

    # a batch-invariant model records none: any batch size resumes it
    invariant = save_pointwise(tmp_path / "invariant", per_tile=True, batch_invariant=True)
    FAIL_AFTER["forward"] = 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        tilefuse.predict(invariant, scene, tmp_path / "inv.zarr", **settings)
    FAIL_AFTER["forward"] = None
    assert "batch_size" not in zarr.open_group(tmp_path / "inv.zarr").attrs
    tilefuse.predict(invariant, scene, tmp_path / "inv.zarr", resume=True, **{**settings, "batch_size": 3})


def test_a_resume_from_a_scene_replaced_at_the_same_path_says_it_was_replaced(tmp_path, setup):
    """It said 'computed from another scene (PATH) than this run reads', naming the very path the user gave."""
    import shutil

    _, scene, checkpoint, _ = setup
    store, out = tmp_path / "s.zarr", tmp_path / "pred.zarr"
    shutil.copytree(scene, store)
    FAIL_AFTER["forward"] = 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        tilefuse.predict(checkpoint, store, out, **SETTINGS)
    FAIL_AFTER["forward"] = None
    shutil.rmtree(store)
    write_test_scene(store, 150, 130, seed=12, nodata=(slice(0, 20), slice(0, 130)))
    with pytest.raises(InputError, match=rf"scene store at {store.resolve()}, which was replaced since"):
        tilefuse.predict(checkpoint, store, out, resume=True, **SETTINGS)
