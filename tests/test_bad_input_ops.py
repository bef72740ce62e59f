"""Ordinary mistakes end in one line, exit 2, nothing written (issue 8, items 5 and 7), and the
determinism record of prediction stores (what bitwise output depends on, refused when a resume mixes it)."""

from __future__ import annotations

import hashlib
import json
from collections import namedtuple
from pathlib import Path

import pytest
from predict_fixtures import save_pointwise, write_test_scene

import tilefuse
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.prediction import prediction_attrs


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    from tilefuse.synthetic import synth_scene, write_geotiffs

    scene = synth_scene(96, seed=1, chunk=64)
    tifs = write_geotiffs(scene, root / "tifs")
    from tilefuse.scene import write_scene

    labelled = write_scene(scene, root / "labelled.zarr", chunk=64, shard=None)
    store = write_test_scene(root / "scene.zarr", 70, 60, seed=2)
    checkpoint = save_pointwise(root / "ckpt")
    (root / "scheduler-notjson.json").write_text("{oops")
    (root / "scheduler-noaddress.json").write_text(json.dumps({"type": "Scheduler"}))
    Inputs = namedtuple("Inputs", "root tifs labelled store checkpoint")
    return Inputs(root, tifs, labelled, store, checkpoint)


def _refused(args, inputs, tmp_path, capsys, match):
    before = _digest(inputs.root)
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tilefuse: error: ") and "Traceback" not in err, err
    assert match.lower() in lines[0].lower(), lines[0]
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # nothing written, no temporary
    assert _digest(inputs.root) == before  # inputs untouched
    return lines[0]


# ingest ----------------------------------------------------------------------------------------------

MODALITY_NAMES = ["x", "y", "valid", "label", "labels", "spatial_ref", "sar_band", "a/b", "9a", "with space", "X"]


@pytest.mark.parametrize("name", MODALITY_NAMES)
def test_ingest_refuses_modality_names_a_store_cannot_hold(name, inputs, tmp_path, capsys):
    message = _refused(["ingest", tmp_path / "o.zarr", "-m", f"{name}={inputs.tifs['sar']}"], inputs, tmp_path, capsys, "modality")
    assert repr(name) in message


@pytest.mark.parametrize("names", [("sar", "sar"), ("sar", "SAR"), ("", "sar")])
def test_ingest_refuses_empty_and_duplicate_names(names, inputs, tmp_path, capsys):
    args = ["ingest", tmp_path / "o.zarr"]
    for name in names:
        args += ["-m", f"{name}={inputs.tifs['sar']}"]
    _refused(args, inputs, tmp_path, capsys, "modality")


def test_ingest_api_checks_names_too(inputs, tmp_path):
    for names in ({"x": inputs.tifs["sar"]}, {"sar": inputs.tifs["sar"], "Sar": inputs.tifs["optical"]}):
        with pytest.raises(InputError, match="modality"):
            tilefuse.ingest(tmp_path / "o.zarr", names)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--resolution", "0.001"], "more than the limit of 1e+10"),
        (["--resolution", "1", "--max-pixels", "100000"], "more than the limit of 1e+05"),  # 960 x 960 px
        (["--resolution", "nan"], "--resolution must be a positive number"),
        (["--resolution", "0"], "--resolution must be a positive number"),
        (["--max-pixels", "0"], "max_pixels"),
    ],
)
def test_ingest_refuses_unbounded_grids_before_any_work(extra, match, inputs, tmp_path, capsys):
    _refused(["ingest", tmp_path / "o.zarr", "-m", f"sar={inputs.tifs['sar']}", *extra], inputs, tmp_path, capsys, match)


def test_ingest_limit_is_a_property_of_the_grid_size(inputs, tmp_path, capsys):
    """The grid at 5 m is 192 x 192 px = 36864: a limit just below refuses, one at it passes."""
    base = ["ingest", tmp_path / "o.zarr", "-m", f"sar={inputs.tifs['sar']}", "--resolution", "5"]
    _refused([*base, "--max-pixels", str(192 * 192 - 1)], inputs, tmp_path, capsys, "192 x 192 px")
    assert main([str(a) for a in [*base, "--max-pixels", str(192 * 192)]]) == 0
    assert tilefuse.open_scene(tmp_path / "o.zarr").sizes["x"] == 192


def test_ingest_refuses_a_store_larger_than_the_free_disk(inputs, tmp_path, capsys, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    _refused(["ingest", tmp_path / "o.zarr", "-m", f"sar={inputs.tifs['sar']}"], inputs, tmp_path, capsys, "free space")


# synth -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, match", [("0", "size"), ("-5", "size"), ("200000", "choose a smaller --size")])
def test_synth_refuses_bad_sizes(size, match, inputs, tmp_path, capsys):
    _refused(["synth", tmp_path / "s.zarr", "--size", size], inputs, tmp_path, capsys, match)


# train -----------------------------------------------------------------------------------------------

TRAIN_CASES = {
    "patch 0": (["--patch-size", "0"], "patch_size"),
    "patch negative": (["--patch-size", "-8"], "patch_size"),
    "patch beyond the store": (["--patch-size", "4096"], "exceeds store"),
    "device tpu": (["--device", "tpu"], "unknown device 'tpu'"),
    "steps 0": (["--steps", "0"], "steps"),
    "batch 0": (["--batch-size", "0"], "batch_size"),
    "threads 0": (["--torch-threads", "0"], "torch_threads"),
    "workers negative": (["--workers", "-1"], "workers"),
    "lr 0": (["--lr", "0"], "lr"),
    "weight decay negative": (["--weight-decay", "-1"], "weight_decay"),
    "val fraction 1": (["--val-fraction", "1"], "val_fraction"),
    "fractions sum 1": (["--val-fraction", "0.5", "--test-fraction", "0.5"], "nothing to train on"),
    "block negative": (["--block", "-1"], "block"),
    "pixels per class 0": (["--pixels-per-class", "0"], "pixels_per_class"),
    "log every 0": (["--log-every", "0"], "log_every"),
    "nproc 0": (["--nproc", "0"], "nproc"),
    # beyond what torch and the machine take: a segfault, an OverflowError traceback, processes until it gave up
    "threads huge": (["--torch-threads", "99999999"], "torch_threads"),
    "seed beyond 64 bits": (["--seed", str(2**64)], "seed"),
    "workers huge": (["--workers", "99999"], "workers"),
    # DataLoader workers assembled a batch of 10^8 samples for ever; inf shifted every band to inf
    "batch beyond memory": (["--patch-size", "32", "--batch-size", "99999999"], "quarter of the free memory"),
    "jitter inf": (["--jitter", "inf"], "jitter"),
    "modality jitter without a sigma": (["--modality-jitter", "sar"], "is not NAME=SIGMA"),
    "modality jitter not a number": (["--modality-jitter", "sar=high"], "is not NAME=SIGMA"),
    "modality jitter twice": (["--modality-jitter", "sar=0.5", "--modality-jitter", "sar=0.3"], "names 'sar' twice"),
    # a later --hparam of the same name won without a word
    "hparam twice": (["--hparam", "width=4", "--hparam", "width=8"], "--hparam names 'width' twice"),
    "hparam without a value": (["--hparam", "width"], "--hparam 'width' is not KEY=VALUE"),
    "modality jitter negative": (["--modality-jitter", "sar=-1"], "modality_jitter= (--modality-jitter) must be"),
    "modality jitter of a modality the model does not read": (["--modality-jitter", "lidar=0.5"], "names 'lidar', which the model does not read"),
    # the cosine "decayed" upwards from lr to min_lr
    "min lr above lr": (["--lr", "1e-4", "--min-lr", "1e-3"], "is above lr= (--lr)"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses_bad_numbers_and_devices(case, inputs, tmp_path, capsys):
    extra, match = TRAIN_CASES[case]
    args = ["train", "--model", "test-pointwise", "--store", inputs.labelled, "--out", tmp_path / "run", "--steps", "2", *extra]
    _refused(args, inputs, tmp_path, capsys, match)


# predict ---------------------------------------------------------------------------------------------

PREDICT_CASES = {
    "device tpu": (["--device", "tpu"], "unknown device 'tpu'"),
    "tile 0": (["--tile", "0"], "tile"),
    "tile negative": (["--tile", "-32"], "tile"),
    "overlap negative": (["--overlap", "-1"], "overlap"),
    "overlap as large as the tile": (["--tile", "32", "--overlap", "32"], "overlap"),
    "batch 0": (["--batch-size", "0"], "batch_size"),
    "block 0": (["--block-size", "0"], "block_size"),
    "threads 0": (["--torch-threads", "0"], "torch_threads"),
    "tcp without port": (["--cluster", "tcp://127.0.0.1"], "HOST:PORT"),
    "tcp without anything": (["--cluster", "tcp://"], "HOST:PORT"),
    "scheduler file missing": (["--cluster", "{root}/nope.json"], "does not exist"),
    "scheduler file not json": (["--cluster", "{root}/scheduler-notjson.json"], "is not JSON"),
    "scheduler file without address": (["--cluster", "{root}/scheduler-noaddress.json"], "has no \"address\""),
    "connect timeout 0": (["--cluster", "tcp://127.0.0.1:8786", "--connect-timeout", "0"], "timeout"),
    "listen on a url": (["--cluster", "local:1", "--listen", "tcp://0.0.0.0"], "listen"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_refuses_bad_numbers_devices_and_clusters(case, inputs, tmp_path, capsys):
    extra, match = PREDICT_CASES[case]
    extra = [a.format(root=inputs.root) for a in extra]
    args = ["predict", "--checkpoint", inputs.checkpoint, "--store", inputs.store, "--out", tmp_path / "p.zarr", *extra]
    _refused(args, inputs, tmp_path, capsys, match)


def test_a_scheduler_file_that_is_a_folder_says_so(inputs, tmp_path, capsys):
    """It said the folder "does not exist"."""
    folder = tmp_path / "sched" / "scheduler.json"
    folder.mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    args = ["predict", "--checkpoint", inputs.checkpoint, "--store", inputs.store, "--out", out / "p.zarr", "--cluster", folder]
    _refused(args, inputs, out, capsys, "scheduler.json is a folder, not a file")


# determinism record ----------------------------------------------------------------------------------

SMALL = {"tile": 32, "overlap": 8, "block_size": 64, "batch_size": 2, "progress": False}


def test_prediction_records_device_kind_and_threads_and_refuses_a_mixing_resume(inputs, tmp_path):
    out = tmp_path / "p.zarr"
    tilefuse.predict(inputs.checkpoint, inputs.store, out, torch_threads=1, **SMALL)
    attrs = prediction_attrs(out)
    assert attrs["device_kind"] == "cpu" and attrs["torch_threads"] == 1 and attrs["torch_version"]
    with pytest.raises(InputError, match=r"torch_threads=1 and this run would use 2.*--torch-threads 1"):
        tilefuse.predict(inputs.checkpoint, inputs.store, out, torch_threads=2, resume=True, **SMALL)
    # the same threads resume (nothing left to do here), and the default threads are recorded as numbers
    tilefuse.predict(inputs.checkpoint, inputs.store, out, torch_threads=1, resume=True, **SMALL)
    other = tmp_path / "q.zarr"
    tilefuse.predict(inputs.checkpoint, inputs.store, other, **SMALL)
    import torch

    assert prediction_attrs(other)["torch_threads"] == torch.get_num_threads()
