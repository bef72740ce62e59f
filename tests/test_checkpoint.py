"""Checkpoints of the registered models: safetensors + JSON round trip, and clear errors for bad ones."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tilefuse.checkpoint import CONFIG, WEIGHTS, ModelConfig, checkpoint_hash, load_checkpoint, save_checkpoint
from tilefuse.errors import InputError
from tilefuse.tile_model import build_model

CASES = {
    "pad": ({"optical": 3, "sar": 2}, {"preset": "atto", "faithful_shift": False, "decoder_channels": 32}, (32, 40)),
    "s2fin": ({"hsi": 9, "lidar": 1}, {"patch_size": 7, "dim": 32}, (12, 10)),
}


def _config(name: str) -> ModelConfig:
    modalities, hparams, _ = CASES[name]
    return ModelConfig(
        model=name,
        modalities=modalities,
        num_classes=4,
        hparams=hparams,
        class_names=["water", "forest", "urban", "crop"],
        band_stats={m: {"mean": [0.5] * b, "std": [2.0] * b} for m, b in modalities.items()},
        extra={"steps": 3},
    )


def _inputs(name: str, batch: int = 2) -> dict[str, torch.Tensor]:
    modalities, _, size = CASES[name]
    g = torch.Generator().manual_seed(3)
    return {m: torch.randn(batch, b, *size, generator=g) for m, b in modalities.items()}


def _trained_model(name: str):
    """A model whose BatchNorm statistics moved away from their defaults (so buffers must round-trip too)."""
    torch.manual_seed(0)
    config = _config(name)
    model = config.build().train()
    with torch.no_grad():
        model(_inputs(name, batch=3))
    return model.eval(), config


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model, config = _trained_model(name)
    path = save_checkpoint(model, config, tmp_path / "run" / "ckpt")
    assert {CONFIG, WEIGHTS} <= {p.name for p in path.iterdir()}  # (plus the guarded writer's marker)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    loaded, loaded_config = load_checkpoint(path)
    assert loaded_config == dataclasses.replace(config, roles=model.spec.roles) and loaded_config.roles == {"optical": next(iter(config.modalities)), "active": list(config.modalities)[1]}
    assert not loaded.training and loaded.spec == model.spec
    x = _inputs(name)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_hash_follows_the_weights(tmp_path):
    model, config = _trained_model("s2fin")
    first = checkpoint_hash(save_checkpoint(model, config, tmp_path / "a"))
    assert checkpoint_hash(save_checkpoint(model, config, tmp_path / "b")) == first
    with torch.no_grad():
        model.classifier.head.bias.add_(1.0)
    assert checkpoint_hash(save_checkpoint(model, config, tmp_path / "c")) != first


def test_corrupt_weights_give_input_error(tmp_path):
    model, config = _trained_model("pad")
    path = save_checkpoint(model, config, tmp_path / "ckpt")
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="unreadable"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "change",
    [{"hparams": {"preset": "femto"}}, {"modalities": {"optical": 4, "sar": 2}}, {"num_classes": 6}],
    ids=["preset", "bands", "classes"],
)
def test_weights_that_do_not_fit_the_config_give_input_error(tmp_path, change):
    model, config = _trained_model("pad")
    path = save_checkpoint(model, config, tmp_path / "ckpt")
    stored = json.loads((path / CONFIG).read_text())
    stored.pop("config_sha256", None)  # edited below by hand: as a config saved before its checksum was recorded
    for key, value in change.items():
        stored[key] = {**stored["hparams"], **value} if key == "hparams" else value
    stored.update(band_stats={}, class_names=[])  # consistent with the changed keys: only the weights do not fit
    (path / CONFIG).write_text(json.dumps(stored))
    with pytest.raises(InputError, match="do not fit"):
        load_checkpoint(path)


def test_bad_configs_give_input_error(tmp_path):
    model, config = _trained_model("s2fin")
    path = save_checkpoint(model, config, tmp_path / "ckpt")
    (path / CONFIG).write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        load_checkpoint(path)
    (path / CONFIG).write_text(json.dumps({**json.loads(config.to_json()), "model": "unet9000"}))
    with pytest.raises(InputError, match="unknown model"):
        load_checkpoint(path)
    (path / CONFIG).write_text(json.dumps({**json.loads(config.to_json()), "hparams": {"patch_size": 8}}))
    with pytest.raises(InputError, match="odd"):
        load_checkpoint(path)
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("key", ["mean", "std"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "1.0", None, True])
def test_band_statistics_that_are_no_finite_numbers_give_input_error(tmp_path, key, value):
    """A NaN or infinite statistic normalised every input to 0 (or inf): a prediction of one class that looks fine."""
    model, config = _trained_model("s2fin")
    path = save_checkpoint(model, config, tmp_path / "ckpt")
    stored = json.loads((path / CONFIG).read_text())
    stored.pop("config_sha256", None)  # edited below by hand: as a config saved before its checksum was recorded
    for name in stored["band_stats"]:
        stored["band_stats"][name][key][-1] = value
        text = json.dumps(stored)  # NaN and Infinity as Python's json writes (and reads) them
        (path / CONFIG).write_text(text)
        with pytest.raises(InputError, match="band_stats.*finite"):
            load_checkpoint(path)
        stored = json.loads(config.to_json())
    stored["band_stats"][name]["std"][0] = -1.0
    (path / CONFIG).write_text(json.dumps(stored))
    with pytest.raises(InputError, match="std >= 0"):
        load_checkpoint(path)
    stored["band_stats"][name]["std"][0] = 0.0  # a constant band: allowed (normalised by 1)
    (path / CONFIG).write_text(json.dumps(stored))
    load_checkpoint(path)


def test_registered_models_build_from_their_config():
    for name in CASES:
        config = _config(name)
        model = build_model(name, config.modalities, config.num_classes, **config.hparams)
        assert model.spec.modalities == config.modalities and model.spec.num_classes == 4


def test_a_flipped_byte_in_the_weights_is_refused_and_older_checkpoints_still_load(tmp_path):
    """safetensors keeps no checksum: a byte flipped inside a tensor loaded silently (a prediction that looks fine).
    The config records the weights' SHA-256; a checkpoint without it (older) loads as before."""
    from tilefuse.checkpoint import DIGEST

    model, config = _trained_model("pad")
    path = save_checkpoint(model, config, tmp_path / "ckpt")
    load_checkpoint(path)
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-1000] ^= 0x01
    (path / WEIGHTS).write_bytes(bytes(data))
    for reader in (load_checkpoint, checkpoint_hash):
        with pytest.raises(InputError, match="do not match the checksum"):
            reader(path)
    stored = json.loads((path / CONFIG).read_text())
    stored.pop("config_sha256", None)  # edited below by hand: as a config saved before its checksum was recorded
    del stored[DIGEST]
    (path / CONFIG).write_text(json.dumps(stored))
    load_checkpoint(path)  # no recorded checksum: loads, as before


@pytest.mark.parametrize("swap", ["weights-then-config", "state-moved-aside"])
def test_a_checkpoint_replaced_while_it_is_read_is_read_whole(tmp_path, swap):
    """A training run replaces its run folder's weights, then its config.json, and its state/ folder by moving the old
    one aside: a reader in between saw new weights with the old config and called them damaged, or found no checkpoint.
    While a live process writes the run, the reader waits for one whole version; nobody writing, the mismatch is damage."""
    import os
    import shutil
    import threading
    import time

    from tilefuse.outputs import output_lock

    model, config = _trained_model("pad")
    old = save_checkpoint(model, config, tmp_path / "old")
    torch.manual_seed(1)
    new = save_checkpoint(config.build(), config, tmp_path / "new")
    run = tmp_path / "run"
    checkpoint = run if swap == "weights-then-config" else run / "state"
    wanted = checkpoint_hash(new)
    weights = load_checkpoint(new)[0].state_dict()

    def replace(name):
        shutil.copyfile(new / name, tmp_path / "part")
        os.replace(tmp_path / "part", checkpoint / name)

    def finish():
        time.sleep(0.4)
        if swap == "weights-then-config":
            replace(CONFIG)
        else:
            shutil.copytree(new, checkpoint)

    for reader in (checkpoint_hash, load_checkpoint):
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(tmp_path / "aside", ignore_errors=True)
        shutil.copytree(old, checkpoint)
        with output_lock(run):  # a live writer (this process) holds the run
            if swap == "weights-then-config":
                replace(WEIGHTS)
            else:
                os.replace(checkpoint, tmp_path / "aside")
            thread = threading.Thread(target=finish)
            thread.start()
            try:
                got = reader(checkpoint)
            finally:
                thread.join()
        if reader is checkpoint_hash:
            assert got == wanted
        else:
            assert all(torch.equal(got[0].state_dict()[k], v) for k, v in weights.items())
    # nobody writing it: new weights with the old config are damage, at once
    shutil.copyfile(new / WEIGHTS, checkpoint / WEIGHTS)
    shutil.copyfile(old / CONFIG, checkpoint / CONFIG)
    for reader in (load_checkpoint, checkpoint_hash):
        started = time.perf_counter()
        with pytest.raises(InputError, match="do not match the checksum"):
            reader(checkpoint)
        assert time.perf_counter() - started < 5


def test_a_checkpoint_that_is_not_the_expected_one_is_refused(tmp_path):
    model, config = _trained_model("s2fin")
    path = save_checkpoint(model, config, tmp_path / "ckpt")
    digest = checkpoint_hash(path)
    load_checkpoint(path, expect_hash=digest)
    torch.manual_seed(1)
    save_checkpoint(config.build(), config, path)  # rewritten, e.g. by a training run
    with pytest.raises(InputError, match="changed after this prediction started"):
        load_checkpoint(path, expect_hash=digest)


def test_a_file_of_a_checkpoint_given_for_it_names_its_folder(tmp_path, capsys):
    """--checkpoint run/model.safetensors (or its config.json, or state/'s) said only that it is not a checkpoint."""
    from tilefuse.cli import main

    model, config = _trained_model("s2fin")
    run = save_checkpoint(model, config, tmp_path / "run")
    save_checkpoint(model, config, run / "state")
    for path in (run / WEIGHTS, run / CONFIG, run / "state" / WEIGHTS):
        with pytest.raises(InputError, match=rf"is not a checkpoint: .*pass the folder holding them, {path.parent}\)$"):
            load_checkpoint(path)
        args = ["predict", "--checkpoint", str(path), "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "p.zarr")]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert f"pass the folder holding them, {path.parent}" in err and len(err.splitlines()) == 1, err
    with pytest.raises(InputError, match=r"written by `tilefuse train`"):
        load_checkpoint(tmp_path)  # a folder without them


def test_a_run_being_trained_before_its_first_checkpoint_is_named_at_once(tmp_path):
    """predict --checkpoint RUN of a live training that has saved nothing yet waited half a minute, then said the
    checkpoint 'kept changing'; it is not a checkpoint yet, and says so within a few seconds."""
    import time

    from tilefuse.outputs import output_lock

    run = tmp_path / "run"
    run.mkdir()
    for checkpoint in (run, run / "state"):
        with output_lock(run):
            started = time.perf_counter()
            for reader in (checkpoint_hash, load_checkpoint):
                with pytest.raises(InputError, match="does not exist|is not a checkpoint"):
                    reader(checkpoint)
            assert time.perf_counter() - started < 6


def test_a_checkpoint_path_with_tilde_is_saved_in_the_home_folder_and_loads(tmp_path, monkeypatch):
    """save_checkpoint("~/ckpt") was refused ('starts with ~, which is not expanded here') where every other
    path of the API (stores, runs, predictions) expands ~ to the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    model, config = _trained_model("pad")
    path = save_checkpoint(model, config, "~/runs/ckpt")
    assert path == tmp_path / "runs" / "ckpt" and (path / WEIGHTS).is_file()
    assert load_checkpoint("~/runs/ckpt")[1].model == config.model


class _Tied(torch.nn.Module):
    """One 3x3 conv applied twice (tied weights), as users' networks share layers."""

    def __init__(self, modalities, num_classes):
        super().__init__()
        self.names = list(modalities)
        self.stem = torch.nn.Conv2d(sum(modalities.values()), num_classes, 1)
        self.block = torch.nn.Conv2d(num_classes, num_classes, 3, padding=1)
        self.blocks = torch.nn.Sequential(self.block, torch.nn.ReLU(), self.block)

    def forward(self, inputs):
        return self.blocks(self.stem(torch.cat([inputs[n] for n in self.names], 1)))


def _build_tied(modalities, num_classes):
    from tilefuse.tile_model import wrap_module

    return wrap_module(_Tied(dict(modalities), num_classes), modalities, num_classes)


def test_a_model_with_tied_weights_checkpoints_and_reloads_tied(tmp_path):
    """safetensors refuses shared memory: a user's model that used one layer twice trained to its end, then
    failed at its first checkpoint ('Some tensors share memory')."""
    from tilefuse.tile_model import _REGISTRY, register_model

    register_model("test-tied")(_build_tied)
    try:
        torch.manual_seed(0)
        model = _build_tied({"optical": 3}, 4)
        config = ModelConfig("test-tied", {"optical": 3}, 4, {}, ["a", "b", "c", "d"])
        save_checkpoint(model, config, tmp_path / "ck")
        loaded, _ = load_checkpoint(tmp_path / "ck")
        inputs = {"optical": torch.randn(1, 3, 8, 8)}
        assert torch.equal(loaded(inputs), model(inputs))
        assert loaded.module.blocks[0].weight is loaded.module.blocks[2].weight  # still one layer
    finally:
        _REGISTRY.pop("test-tied", None)
