"""The training loop and `tilefuse train`: learning, run folder, exact resume, bad input."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from test_sampling import labelled_scene, write
from tilefuse.checkpoint import load_checkpoint, read_config
from tilefuse.cli import main
from tilefuse.pipelines.train import train
from tilefuse.tile_model import TileModel, TileModelSpec, available_models, register_model
from tilefuse.training import cosine_factor, flatten_state, unflatten_state

CRASH = {"at": None, "count": 0}
"""Make the test models raise on their N-th training forward (a simulated crash)."""


class _Tiny(TileModel):
    def __init__(self, modalities, num_classes, margin):
        super().__init__()
        self.spec = TileModelSpec(dict(modalities), num_classes, margin=margin, blend=margin == 0)
        channels = sum(modalities.values())
        self.body = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Conv2d(8, num_classes, 2 * margin + 1)

    def forward(self, inputs):
        if self.training:
            CRASH["count"] += 1
            if CRASH["at"] is not None and CRASH["count"] >= CRASH["at"]:
                raise RuntimeError("simulated crash")
        return self.head(self.body(torch.cat([inputs[n] for n in self.spec.modalities], dim=1)))


@register_model("test-seg")
def _build_seg(modalities, num_classes, **hparams):
    return _Tiny(modalities, num_classes, margin=0)


@register_model("test-pixel")
def _build_pixel(modalities, num_classes, patch_size=5):
    return _Tiny(modalities, num_classes, margin=patch_size // 2)


@pytest.fixture
def stores(tmp_path):
    a = write(labelled_scene(128, 128, seed=0), tmp_path / "a.zarr")
    b = write(labelled_scene(96, 128, seed=1, invalid_disk=False), tmp_path / "b.zarr")
    return [a, b]


FAST = dict(batch_size=4, patch_size=32, workers=0, log_every=1, progress=False)


def test_cosine_schedule():
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(100, 100) == pytest.approx(0.0)
    assert cosine_factor(0, 100, warmup=10) == pytest.approx(0.1)
    assert cosine_factor(9, 100, warmup=10) == pytest.approx(1.0)
    assert cosine_factor(100, 100, floor=0.1) == pytest.approx(0.1)


def test_state_codec_round_trips_without_pickle():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3)}}, "groups": [{"betas": (0.9, 0.999), "lr": 1e-4, "params": [0]}]}
    tensors = {}
    tree = flatten_state(state, tensors)
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert back["groups"] == state["groups"] and isinstance(back["groups"][0]["betas"], tuple)
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["m"], state["state"][0]["m"])
    with pytest.raises(TypeError):
        flatten_state({"x": object()}, {})


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r}


def test_training_learns_and_writes_a_predictable_run(stores, tmp_path):
    run = train("test-seg", stores, tmp_path / "run", steps=40, lr=1e-2, checkpoint_every=20, seed=1, **FAST)
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 41))
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(36, 41)])
    assert last < 0.7 * first, (first, last)
    for name in ("model.safetensors", "config.json", "curves.png", "metrics.json", "log.jsonl", "split.json", "state/trainer.json"):
        assert (run / name).is_file(), name
    model, config = load_checkpoint(run)
    assert config.model == "test-seg" and config.class_names == ["water", "forest", "field"]
    assert set(config.band_stats) == {"optical", "sar"} and len(config.band_stats["optical"]["mean"]) == 3
    assert config.extra["step"] == 40
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] and metrics["val"]["pixels"] > 0 and metrics["val"]["overall_accuracy"] > 0.5
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name != ".tilefuse-output"], "temporary files left behind"


def _loader_workers() -> list:
    """This process's DataLoader workers: the children of its multiprocessing forkserver."""
    import psutil

    servers = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    return [child for server in servers for child in server.children()]


def test_a_stopped_training_stops_its_loader_workers(stores, tmp_path):
    """An error or a KeyboardInterrupt in the loop: the persistent DataLoader workers (train and validation)
    stop with it. A notebook keeps the last traceback, whose frames held the loaders, and with them the
    workers, alive until the next error."""
    CRASH.update(at=3, count=0)
    try:
        with pytest.raises(RuntimeError, match="simulated crash") as stopped:  # holds the traceback, as a notebook does
            train("test-seg", stores, tmp_path / "run", steps=12, checkpoint_every=4, val_every=2, **{**FAST, "workers": 1})
    finally:
        CRASH.update(at=None, count=0)
    assert stopped.value.__traceback__ is not None
    assert _loader_workers() == []


@pytest.mark.parametrize("model", ["test-seg", "test-pixel"])
def test_resume_continues_with_the_same_losses(stores, tmp_path, model):
    options = dict(steps=12, checkpoint_every=4, lr=5e-3, seed=3, pixels_per_class=10, **FAST)
    CRASH.update(at=None, count=0)
    whole = _losses(train(model, stores, tmp_path / "whole", **options))
    CRASH.update(at=7, count=0)  # crash during step 7: the last checkpoint is step 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model, stores, tmp_path / "broken", **options)
    CRASH.update(at=None, count=0)
    assert read_config(tmp_path / "broken").extra["step"] == 4
    resumed = _losses(train(model, stores, tmp_path / "broken", resume=True, **options))
    assert sorted(resumed) == list(range(1, 13))
    assert [resumed[s] for s in range(5, 13)] == [whole[s] for s in range(5, 13)]
    a = load_checkpoint(tmp_path / "whole")[0].state_dict()
    b = load_checkpoint(tmp_path / "broken")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model", ["test-seg", "test-pixel"])
def test_modality_dropout_reaches_the_samples_resumes_exactly_and_a_resume_keeps_it(stores, tmp_path, model):
    from tilefuse.errors import InputError

    options = dict(steps=8, checkpoint_every=4, lr=5e-3, seed=3, pixels_per_class=10, modality_dropout=0.5, **FAST)
    CRASH.update(at=None, count=0)
    whole = _losses(train(model, stores, tmp_path / "whole", **options))
    plain = _losses(train(model, stores, tmp_path / "plain", **{**options, "modality_dropout": 0.0}))
    assert whole != plain, "modality_dropout did not reach the training samples"
    CRASH.update(at=6, count=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model, stores, tmp_path / "broken", **options)
    CRASH.update(at=None, count=0)
    with pytest.raises(InputError, match=r"modality_dropout= \(--modality-dropout\) 0.2 differs from the run's 0.5"):
        train(model, stores, tmp_path / "broken", resume=True, **{**options, "modality_dropout": 0.2})
    resumed = _losses(train(model, stores, tmp_path / "broken", resume=True, **options))
    assert [resumed[s] for s in range(5, 9)] == [whole[s] for s in range(5, 9)]


def test_modality_jitter_reaches_the_samples_and_a_resume_keeps_it(stores, tmp_path):
    from tilefuse.errors import InputError

    options = dict(steps=8, checkpoint_every=4, lr=5e-3, seed=3, modality_jitter={"sar": 0.5}, **FAST)
    CRASH.update(at=None, count=0)
    whole = _losses(train("test-seg", stores, tmp_path / "whole", **options))
    plain = _losses(train("test-seg", stores, tmp_path / "plain", **{**options, "modality_jitter": None}))
    assert whole != plain, "modality_jitter did not reach the training samples"
    CRASH.update(at=6, count=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train("test-seg", stores, tmp_path / "broken", **options)
    CRASH.update(at=None, count=0)
    with pytest.raises(InputError, match=r"modality_jitter= \(--modality-jitter\) \{'sar': 0.2\} differs from the run's \{'sar': 0.5\}"):
        train("test-seg", stores, tmp_path / "broken", resume=True, **{**options, "modality_jitter": {"sar": 0.2}})
    resumed = _losses(train("test-seg", stores, tmp_path / "broken", resume=True, **options))
    assert [resumed[s] for s in range(5, 9)] == [whole[s] for s in range(5, 9)]


def test_ema_checkpoint_holds_the_average_and_resumes_exactly(stores, tmp_path):
    from safetensors.torch import load_file

    from tilefuse.training import RAW

    options = dict(steps=12, checkpoint_every=4, lr=5e-3, seed=3, ema_decay=0.9, **FAST)
    CRASH.update(at=None, count=0)
    whole = train("test-seg", stores, tmp_path / "whole", **options)
    CRASH.update(at=7, count=0)  # crash during step 7: resume from step 4's average + raw weights
    with pytest.raises(RuntimeError, match="simulated crash"):
        train("test-seg", stores, tmp_path / "broken", **options)
    CRASH.update(at=None, count=0)
    resumed = train("test-seg", stores, tmp_path / "broken", resume=True, **options)
    assert [_losses(resumed)[s] for s in range(5, 13)] == [_losses(whole)[s] for s in range(5, 13)]
    a, b = (load_checkpoint(r)[0].state_dict() for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    raw = {k[len(RAW):]: v for k, v in load_file(str(whole / "state" / "trainer.safetensors")).items() if k.startswith(RAW)}
    assert set(raw) == set(a) and not torch.equal(raw["head.weight"], a["head.weight"]), "the checkpoint is not the average"
    plain = load_checkpoint(train("test-seg", stores, tmp_path / "plain", **(options | {"ema_decay": 0.0})))[0].state_dict()
    assert all(torch.equal(plain[k], raw[k]) for k in plain), "the average changed the training itself"


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_ema_decay_out_of_range_is_one_line(stores, tmp_path, value):
    from tilefuse.errors import InputError

    with pytest.raises(InputError, match=r"ema_decay= \(--ema-decay\) must be a number in \[0, 1\)"):
        train("test-seg", stores, tmp_path / "run", steps=2, ema_decay=value, **FAST)


@pytest.mark.parametrize("model", ["test-seg", "test-pixel"])
def test_a_diverged_training_is_one_line_and_never_checkpoints_nan_weights(stores, tmp_path, model):
    """A huge learning rate made the loss NaN; the run ended 'complete' with NaN weights, whose prediction looks fine."""
    from tilefuse.errors import InputError

    CRASH.update(at=None, count=0)
    run = tmp_path / "run"
    with pytest.raises(InputError, match=r"training loss became nan at step \d+ .*--lr"):
        train(model, stores, run, steps=6, checkpoint_every=1, lr=1e30, grad_clip=0.0, **FAST)
    for weights in run.rglob("*.safetensors"):  # earlier checkpoints (if any) are finite
        assert all(torch.isfinite(t).all() for t in load_file(str(weights)).values()), weights
    assert not (run / "metrics.json").exists()  # never marked complete


def _cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_inputs_exit_2_with_one_line(stores, tmp_path, capsys):
    a, b = (str(p) for p in stores)
    base = ["train", "--model", "test-seg", "--batch-size", "2", "--workers", "0", "--quiet"]  # an option given twice is refused
    two = ["--steps", "2", "--patch-size", "32"]

    three_sar = write(labelled_scene(64, 64, sar_bands=3), tmp_path / "three.zarr")
    nolabel = write(labelled_scene(64, 64).drop_vars("label"), tmp_path / "nolabel.zarr")
    empty_ds = labelled_scene(64, 64)
    empty_ds["label"].values[:] = 255
    empty = write(empty_ds, tmp_path / "empty.zarr")
    few_ds = labelled_scene(64, 64, invalid_disk=False)
    few_ds["label"].values[few_ds["label"].values == 2] = 0
    few_ds["label"].values[5:7, 5:7] = 2
    few = write(few_ds, tmp_path / "few.zarr")

    cases = [
        (base + two + ["--store", a, "--store", str(three_sar), "--out", str(tmp_path / "r1")], "has 3 bands"),
        (base + two + ["--store", a, "--modality", "lidar", "--out", str(tmp_path / "r2")], "no modality 'lidar'"),
        (base + two + ["--store", str(nolabel), "--out", str(tmp_path / "r3")], "has no labels"),
        (base + two + ["--store", str(empty), "--out", str(tmp_path / "r4")], "no valid labelled pixels"),
        (
            ["train", "--model", "test-pixel", "--store", str(few), "--pixels-per-class", "10", "--val-fraction", "0",
             "--workers", "0", "--quiet", "--out", str(tmp_path / "r5")],
            "class 'field' (2) has only 4 labelled pixels",
        ),
        (base + ["--steps", "2", "--store", a, "--patch-size", "200", "--out", str(tmp_path / "r6")], "exceeds store"),
        (base + two + ["--store", a, "--out", str(tmp_path / "r7"), "--resume"], "no training state to resume"),
        (base + two + ["--store", a, "--split", "stores", "--out", str(tmp_path / "r8")], "needs a store"),
    ]
    for args, message in cases:
        code, err = _cli(args, capsys)
        assert code == 2, (args, err)
        assert message in err and len(err.splitlines()) == 1, err
        assert not Path(args[args.index("--out") + 1]).exists() or "--resume" in args

    run = tmp_path / "run"
    assert _cli(base + two + ["--store", a, "--out", str(run)], capsys)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code, err = _cli(base + two + ["--store", a, "--out", str(run)], capsys)
    assert code == 2 and "already exists" in err
    code, err = _cli(["train", "--model", "test-pixel"] + base[3:] + two + ["--store", a, "--out", str(run), "--resume"], capsys)
    assert code == 2 and "model 'test-seg', not 'test-pixel'" in err
    code, err = _cli(base + two + ["--store", a, "--store", b, "--out", str(run), "--resume"], capsys)
    assert code == 2 and "same --store list" in err
    code, err = _cli(base + two + ["--store", a, "--out", str(run), "--resume", "--lr", "0.5"], capsys)
    assert code == 2 and "lr= (--lr) 0.5 differs" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before, "a refused command touched the run"
    assert _cli(base + ["--patch-size", "32", "--store", a, "--out", str(run), "--overwrite", "--steps", "1"], capsys)[0] == 0
    assert read_config(run).extra["step"] == 1


def test_pixel_model_trains_on_labelled_pixels_and_validates_on_pixels(stores, tmp_path):
    run = train("test-pixel", stores, tmp_path / "run", steps=6, pixels_per_class=8, checkpoint_every=6, **FAST)
    config = read_config(run)
    assert config.extra["sampler"] == "pixels"
    val = json.loads((run / "metrics.json").read_text())["val"]
    assert 0 < val["pixels"] <= 2000


@pytest.mark.slow
def test_real_models_train_a_few_steps(stores, tmp_path):
    if "pad" not in available_models() or "s2fin" not in available_models():
        pytest.skip("the 'pad' and 's2fin' models are not registered")
    run = train("pad", stores[:1], tmp_path / "pad", steps=1, batch_size=2, patch_size=32, workers=0, progress=False, val_fraction=0.0, hparams={"preset": "atto"})
    model, config = load_checkpoint(run)
    assert config.hparams == {"preset": "atto"} and config.extra["sampler"] == "patches"
    with torch.no_grad():
        logits = model({"optical": torch.zeros(1, 3, 32, 32), "sar": torch.zeros(1, 2, 32, 32)})
    assert logits.shape == (1, 3, 32, 32)
    run = train("s2fin", stores[:1], tmp_path / "s2fin", steps=1, batch_size=4, pixels_per_class=4, workers=0, progress=False, val_fraction=0.0)
    assert read_config(run).extra["sampler"] == "pixels" and read_config(run).extra["step"] == 1


@pytest.mark.gpu
def test_cuda_training_with_bf16_autocast(stores, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: bf16 autocast training runs only on a GPU")
    run = train("test-seg", stores, tmp_path / "run", steps=4, device="cuda", checkpoint_every=2, **FAST)
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(v) for v in losses.values())
    model, _ = load_checkpoint(run)  # weights saved on CPU, load anywhere
    assert next(model.parameters()).device.type == "cpu"


def test_a_run_stopped_before_its_first_checkpoint_is_restarted_as_the_message_says(stores, tmp_path, capsys):
    """A run killed before its first checkpoint leaves its folder without state: --resume said "start it without
    --resume", which said "already exists: pass --resume", a loop; both messages name --overwrite, which works."""
    from tilefuse.training import RunDir

    run = tmp_path / "run"
    RunDir(run).start(resume=False, overwrite=False)  # what a killed run leaves: the marked folder, no state
    base = ["train", "--model", "test-seg", "--store", str(stores[0]), "--out", str(run), "--steps", "1", "--batch-size", "2",
            "--patch-size", "32", "--workers", "0", "--quiet"]
    code, err = _cli(base, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "nothing to resume" in err and "--overwrite" in err, err
    code, err = _cli(base + ["--resume"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err, err
    assert _cli(base + ["--overwrite"], capsys)[0] == 0
    assert read_config(run).extra["step"] == 1


def test_resuming_a_finished_run_keeps_its_validation_metrics(stores, tmp_path, capsys):
    """A --resume of a run that had already finished ran no step, so nothing validated, and metrics.json
    was rewritten with "val": null: the run's validation scores were lost."""
    run = tmp_path / "run"
    base = ["train", "--model", "test-seg", "--store", str(stores[0]), "--out", str(run), "--steps", "2", "--batch-size", "2",
            "--patch-size", "32", "--workers", "0", "--quiet"]
    assert _cli(base, capsys)[0] == 0
    before = json.loads((run / "metrics.json").read_text())
    assert before["val"] and before["val"]["overall_accuracy"] is not None
    assert _cli(base + ["--resume"], capsys)[0] == 0
    assert json.loads((run / "metrics.json").read_text()) == before


def test_a_write_of_metrics_cut_short_leaves_the_previous_metrics(stores, tmp_path, capsys, monkeypatch):
    """metrics.json was written in place: a full disk or a kill mid-write left a truncated file beside a
    finished run. It is written under a temporary name and moved into place."""
    run = tmp_path / "run"
    base = ["train", "--model", "test-seg", "--store", str(stores[0]), "--out", str(run), "--steps", "2", "--batch-size", "2",
            "--patch-size", "32", "--workers", "0", "--quiet"]
    assert _cli(base, capsys)[0] == 0
    before = (run / "metrics.json").read_bytes()
    write_text = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if "metrics.json" in self.name:
            write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    code, err = _cli(base + ["--resume"], capsys)
    assert code == 2 and "space" in err, err
    assert (run / "metrics.json").read_bytes() == before
    assert [p.name for p in run.iterdir() if "metrics" in p.name] == ["metrics.json"]


def test_resume_refuses_training_state_whose_weights_are_damaged(stores, tmp_path, capsys):
    """The saved weights a resume continues from are checked against their recorded checksum (a flipped byte trained on)."""
    run = tmp_path / "run"
    base = ["train", "--model", "test-seg", "--store", str(stores[0]), "--out", str(run), "--batch-size", "2",
            "--patch-size", "32", "--workers", "0", "--quiet"]
    assert _cli(base + ["--steps", "1"], capsys)[0] == 0
    weights = run / "state" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    before = (run / "metrics.json").read_bytes()
    code, err = _cli(base + ["--steps", "1", "--resume"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "do not match the checksum" in err, err
    assert (run / "metrics.json").read_bytes() == before


def test_a_store_given_twice_is_refused(stores, tmp_path, capsys):
    """A --val-store that is also a --store (here through a symlink) was validated on the pixels it trained on:
    flattering scores that look like any others; a --store given twice was held out by two different splits."""
    link = tmp_path / "link.zarr"
    link.symlink_to(stores[0])
    base = ["train", "--model", "test-seg", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
            "--patch-size", "32", "--workers", "0", "--quiet"]
    for extra in (["--store", str(stores[0]), "--val-store", str(link)], ["--store", str(stores[0]), "--store", str(stores[0]) + "/"]):
        code, err = _cli(base + extra, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "is given twice" in err, err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["cut last log line", "bad log line", "trainer.json not an object", "trainer tensors truncated"])
def test_a_damaged_run_folder_resumes_or_is_one_line(stores, tmp_path, capsys, damage):
    """A kill while a log record was appended left an unterminated last line, and --resume was a JSONDecodeError
    traceback; a trainer.json that is JSON but not the saved state, or truncated trainer tensors, were tracebacks."""
    run = tmp_path / "run"
    base = ["train", "--model", "test-seg", "--store", str(stores[0]), "--out", str(run), "--steps", "2", "--batch-size", "2",
            "--patch-size", "32", "--workers", "0", "--quiet", "--log-every", "1"]
    assert _cli(base, capsys)[0] == 0
    log = run / "log.jsonl"
    if damage == "cut last log line":
        log.write_text(log.read_text() + '{"step": 3, "lo')
    elif damage == "bad log line":
        lines = log.read_text().splitlines(keepends=True)
        log.write_text("".join([lines[0], "garbage\n", *lines[1:]]))
    elif damage == "trainer.json not an object":
        (run / "state" / "trainer.json").write_text("[1]")
    else:
        tensors = run / "state" / "trainer.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:100])
    code, err = _cli(base + ["--resume"], capsys)
    if damage == "cut last log line":
        assert code == 0, err
        assert log.read_text().endswith("\n") and '"lo' not in log.read_text().splitlines()[-1]
    else:
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert ("damaged at line 2" if damage == "bad log line" else "--overwrite") in err, err


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["a bit of the optimiser state", "the step", "a band mean of the state's config"])
def test_a_resume_refuses_training_state_that_does_not_match_its_checksums(stores, tmp_path, capsys, damage):
    """Only the weights carried a checksum: a flipped bit in the optimiser moments, a step edited past the
    run's end (a run then said complete at step 25 of 20, holding the step-5 model), or a band mean changed in
    the state's config.json were trained on, or published, as data."""
    run = tmp_path / "run"
    base = ["train", "--model", "test-seg", "--store", str(stores[0]), "--out", str(run), "--steps", "2", "--batch-size", "2",
            "--patch-size", "32", "--workers", "0", "--quiet"]
    assert _cli(base, capsys)[0] == 0
    state = run / "state"
    if damage == "a bit of the optimiser state":
        _flip_last_byte(state / "trainer.safetensors")
    elif damage == "the step":
        text = (state / "trainer.json").read_text()
        assert '"step": 2,' in text
        (state / "trainer.json").write_text(text.replace('"step": 2,', '"step": 3,', 1))
    else:
        config = json.loads((state / "config.json").read_text())
        name = next(iter(config["band_stats"]))
        config["band_stats"][name]["mean"][0] += 1.0
        (state / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = _cli(base + ["--resume"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "damaged" in err and "--overwrite" in err, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_resume_refuses_another_computation_or_a_replaced_store(stores, tmp_path, capsys):
    """A resume with --amp or other --torch-threads, or on a store replaced since (another scene at the same
    path), trained on without a word: the run no longer matched an uninterrupted one."""
    run = tmp_path / "run"
    store = tmp_path / "s.zarr"
    shutil.copytree(stores[0], store)
    base = ["train", "--model", "test-seg", "--store", str(store), "--out", str(run), "--steps", "2", "--batch-size", "2",
            "--patch-size", "32", "--workers", "0", "--quiet", "--device", "cpu"]
    assert _cli(base + ["--torch-threads", "1"], capsys)[0] == 0
    for change, said in ((["--torch-threads", "2"], "torch_threads=2"), (["--torch-threads", "1", "--amp"], "amp=True")):
        code, err = _cli(base + change + ["--resume"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and said in err and "--torch-threads 1" in err, err
    assert _cli(base + ["--torch-threads", "1", "--resume"], capsys)[0] == 0
    shutil.rmtree(store)
    write(labelled_scene(128, 128, seed=5), store)  # another scene of the same size, same path
    code, err = _cli(base + ["--torch-threads", "1", "--resume"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "not the scene store the run was trained on" in err, err


def _split_edits(split: dict):
    """Every edit of a split file's content that is still a split: each block given to each other subset, the stores
    in another order, another block size, another context."""
    for store, grid in enumerate(split["assignment"]):
        for (y, x), code in np.ndenumerate(np.asarray(grid)):
            for other in {0, 1, 2} - {code}:
                edited = json.loads(json.dumps(split))
                edited["assignment"][store][y][x] = other
                yield edited
    yield {**split, "stores": split["stores"][::-1], "assignment": split["assignment"][::-1]}
    yield {**split, "block": split["block"] // 2}
    yield {**split, "context": split["context"] + 1}


def test_a_resume_refuses_an_edited_split_and_rebuilds_a_deleted_one(stores, tmp_path, monkeypatch):
    """split.json, edited between a stop and --resume (still valid JSON, other held-out blocks), was trained on
    without a word: the run trained on blocks it had held out and validated on another split (OA 0.84, not 0.48),
    and evaluate --split RUN scored it. Any edit of its content is refused now, by train --resume before anything
    is trained or written, and by evaluate; the file untouched, or deleted and rebuilt as it was, resumes. A
    rebuilt split that is not the run's is refused."""
    import tilefuse.training_data
    from test_evaluate import write_prediction
    from tilefuse.errors import InputError
    from tilefuse.pipelines.evaluate import evaluate
    from tilefuse.sampling import spatial_split
    from tilefuse.scene import open_scene

    options = dict(steps=4, checkpoint_every=1, block=64, **FAST)
    run = tmp_path / "run"
    split_file = run / "split.json"
    CRASH.update(at=3, count=0)  # state saved at step 2
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train("test-seg", stores, run, **options)
    finally:
        CRASH.update(at=None, count=0)
    original = split_file.read_bytes()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    edits = list(_split_edits(json.loads(original)))
    assert len(edits) > 10
    for edited in edits:
        split_file.write_text(json.dumps(edited))
        with pytest.raises(InputError, match=r"split\.json is not the split the run was trained with .*--overwrite\)$") as error:
            train("test-seg", stores, run, resume=True, **options)
        assert "\n" not in str(error.value)
    split_file.write_bytes(original)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing trained or written

    split_file.unlink()
    other = spatial_split([(128, 128), (96, 128)], block=64, val=0.5, seed=7)
    with monkeypatch.context() as patch:  # a rebuilt split that is not the run's (the split is seeded: made up here)
        patch.setattr(tilefuse.training_data, "_split", lambda *args, **kwargs: (other, None))
        with pytest.raises(InputError, match=r"split\.json was deleted and the split rebuilt in its place is not the one the run was trained with"):
            train("test-seg", stores, run, resume=True, **options)
    assert not split_file.exists()
    CRASH.update(at=2, count=0)  # deleted: rebuilt as it was, and resumed (state saved at step 3)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train("test-seg", stores, run, resume=True, **options)
    finally:
        CRASH.update(at=None, count=0)
    assert split_file.read_bytes() == original
    train("test-seg", stores, run, resume=True, **options)  # untouched: resumes (with the digest a resume recorded)
    assert json.loads((run / "metrics.json").read_text())["complete"] and split_file.read_bytes() == original

    scene = open_scene(stores[0])
    pred = write_prediction(scene, np.zeros((scene.sizes["y"], scene.sizes["x"]), np.uint8), tmp_path / "pred.zarr")
    assert evaluate(pred, stores[0], split=run, subset="train")["pixels"] > 0
    for edited in edits[:3] + edits[-3:]:
        split_file.write_text(json.dumps(edited))
        with pytest.raises(InputError, match=r"split\.json is not the split its run was trained with .*train --resume"):
            evaluate(pred, stores[0], split=run, subset="train")


@pytest.mark.parametrize("left", ["old config, new weights", "no checkpoint files"])
@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_a_resume_repairs_the_checkpoint_of_a_run_killed_while_copying_it(stores, tmp_path, left, finished):
    """A save writes state/, then copies its weights and config.json to the run folder one after the other: a kill in
    between left the run's checkpoint a pair that does not match (predict: 'do not match the checksum ... resume it'),
    and a resume did not repair it (a finished run's never: no step was left to save)."""
    from tilefuse.checkpoint import CONFIG, WEIGHTS

    options = dict(steps=3, checkpoint_every=1, lr=5e-3, seed=3, **FAST)
    run = tmp_path / "run"
    CRASH.update(at=2, count=0)  # crash in step 2: the checkpoint is step 1's, as the run below wrote it
    with pytest.raises(RuntimeError, match="simulated crash"):
        train("test-seg", stores, tmp_path / "early", **options)
    CRASH.update(at=None if finished else 3, count=0)
    with pytest.raises(RuntimeError, match="simulated crash") if not finished else contextlib.nullcontext():
        train("test-seg", stores, run, **options)
    CRASH.update(at=None, count=0)
    if left == "old config, new weights":
        (run / CONFIG).write_bytes((tmp_path / "early" / CONFIG).read_bytes())
    else:
        (run / CONFIG).unlink()
        (run / WEIGHTS).unlink()
    whole = train("test-seg", stores, tmp_path / "whole", **options)
    train("test-seg", stores, run, resume=True, **options)
    a, b = load_checkpoint(whole)[0].state_dict(), load_checkpoint(run)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / CONFIG).read_bytes() == (whole / CONFIG).read_bytes()


def test_api_arguments_of_the_wrong_shape_are_one_line(stores, tmp_path):
    """A notebook's slips: hparams='x' (ValueError traceback), stores=None (TypeError), modalities='optical' (read
    letter by letter: "has no modality 'o'"), a misspelt option (TypeError, no hint). Each is one InputError line naming
    the parameter; one modality as a string is that modality."""
    from tilefuse.errors import InputError

    base = dict(steps=1, **FAST)
    cases = [
        (dict(hparams="x"), r"^hparams= must be a dict"),
        (dict(hparams=[("a", 1)]), r"^hparams= must be a dict"),
        (dict(stores=None), r"no training store: pass at least one in stores= \(--store\)"),
        (dict(min_lr_=0.1), r"^unknown training option min_lr_= \(did you mean min_lr=\?\)"),
        (dict(bogus_thing=1), r"^unknown training option bogus_thing=: see help\(tilefuse\.train\)"),
        (dict(modalities="lidar"), r"has no modality 'lidar'"),
        # saved as JSON in the checkpoint: a TypeError once every step had run, and no checkpoint
        (dict(hparams={"width": np.int64(8)}), r"^hyperparameter width=8 is of type int64, which a checkpoint \(JSON\) cannot hold"),
    ]
    for change, message in cases:
        args = {"stores": stores, **base, **change}
        with pytest.raises(InputError, match=message) as error:
            train("test-seg", args.pop("stores"), tmp_path / "run", **args)
        assert "\n" not in str(error.value)
        assert not (tmp_path / "run").exists()
    run = train("test-seg", stores, tmp_path / "run", modalities="optical", **base)
    assert list(read_config(run).modalities) == ["optical"]


@pytest.mark.parametrize(
    "val",
    [
        None,
        {"overall_accuracy": None, "mean_iou": None, "kappa": None},
        {"overall_accuracy": 0.5, "mean_iou": 0.25, "kappa": None},
    ],
)
def test_training_curves_plot_without_a_warning(tmp_path, val):
    """A validation without a score (no labelled pixel in the split) left matplotlib's 'No artists with labels'
    warning on the command line of every such training; the curves are still written."""
    import warnings

    from tilefuse.training import plot_curves

    history = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in (1, 2)] + [{"step": 2, "val": val}]
    path = tmp_path / "curves.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(history, path)
    assert path.stat().st_size > 0
