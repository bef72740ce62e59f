"""A checkpoint's config.json is checked like its weights; a resumed training logs what an uninterrupted one logs;
a full disk names the work a prediction or a training keeps and how to finish it."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import threading
import time

import numpy as np
import pytest
from predict_fixtures import CLASSES, MODALITIES, build_pointwise, save_pointwise, write_test_scene
from test_training import CRASH, FAST, stores  # noqa: F401  (stores: the two small labelled stores, a fixture)

import tilefuse
from tilefuse.checkpoint import CONFIG, CONFIG_DIGEST, WEIGHTS, ModelConfig, checkpoint_hash, load_checkpoint, read_checkpoint, read_config
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.outputs import output_lock

STATS = {
    "optical": {"mean": [10.25, 9.875, 0.1 + 0.2], "std": [3.0, 2.5, 1e-05]},
    "sar": {"mean": [-0.0625, 1e-310], "std": [1.125, 0.75]},
}
SETTINGS = {"tile": 32, "overlap": 8, "block_size": 64, "batch_size": 2, "progress": False}


def _one_line(error: InputError) -> str:
    text = str(error)
    assert text and "\n" not in text, text
    return text


# ------------------------------------------------------------------ 1. config.json checked against its own checksum


def test_every_flipped_bit_of_a_config_is_refused_in_one_line_or_changes_nothing(tmp_path):
    """One flipped bit in a band mean's digit (valid JSON still) predicted 16,509 of 262,144 labels otherwise, exit 0;
    one in a class name ("fmrest") went into every output. Every bit of every byte of a saved config.json is flipped in
    turn: the reader refuses it in one line, or reads the very config saved (a flip that changes no value: a number's
    ``e`` as ``E``, a ``\\u`` escape's hex digit in the other case, a letter of the checksum key's own name)."""
    path = save_pointwise(tmp_path / "ckpt", band_stats=STATS, margin=0)
    good = (path / CONFIG).read_bytes()
    original = read_checkpoint(path)[0]
    text = good.decode()
    classes = {
        "band_stats digit": text.index("10.25") + 1,
        "class_names letter": text.index('"trees"') + 2,
        "hparams number": text.index('"seed": 0') + len('"seed": '),
        "whitespace": text.index("\n  ") + 1,
        "key letter": text.index('"num_classes"') + 2,
    }
    if CONFIG_DIGEST in text:
        classes["checksum digit"] = text.index(f'"{CONFIG_DIGEST}": "') + len(f'"{CONFIG_DIGEST}": "') + 3
    refused, same = {}, {}
    for position in range(len(good)):
        for bit in range(8):
            data = bytearray(good)
            data[position] ^= 1 << bit
            (path / CONFIG).write_bytes(bytes(data))
            try:
                got = read_checkpoint(path)[0]
            except InputError as error:
                _one_line(error)
                refused[position, bit] = str(error)
                continue
            assert got == original, (position, bit, bytes(data[max(0, position - 20) : position + 20]))
            same[position, bit] = True
    for name, position in classes.items():  # each kind of place: refused on every bit
        assert all((position, bit) in refused for bit in range(8)), (name, [b for b in range(8) if (position, b) in same])
    assert len(same) < len(good) // 4, "most flips change a value and are refused"
    # the digit of a band mean, the letter of a class name: the checksum's line, from every reader
    for needle, new in ((b"10.25", b"10.35"), (b'"trees"', b'"tsees"')):
        (path / CONFIG).write_bytes(good.replace(needle, new, 1))
        for reader in (read_checkpoint, load_checkpoint, checkpoint_hash, read_config):
            with pytest.raises(InputError) as caught:
                reader(path)
            assert _one_line(caught.value) == (
                f"checkpoint config {path / CONFIG} does not match the checksum it records (damaged or edited): retrain or "
                f"restore it (to keep an edit made on purpose, delete its '{CONFIG_DIGEST}' key)"
            )
    (path / CONFIG).write_bytes(good)
    assert read_checkpoint(path)[0] == original


def test_a_damaged_config_is_refused_by_predict_before_any_output(tmp_path, capsys):
    scene = write_test_scene(tmp_path / "scene.zarr", 64, 64, seed=3)
    path = save_pointwise(tmp_path / "ckpt", band_stats=STATS)
    (path / CONFIG).write_bytes((path / CONFIG).read_bytes().replace(b"9.875", b"9.975", 1))  # '8' -> '9': one bit
    capsys.readouterr()
    args = ["predict", "--checkpoint", str(path), "--store", str(scene), "--out", str(tmp_path / "p.zarr"), "--tile", "32", "--overlap", "8"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match the checksum it records" in err, err
    assert not (tmp_path / "p.zarr").exists()
    with pytest.raises(InputError, match="does not match the checksum it records"):
        tilefuse.predict(path, scene, tmp_path / "p.zarr", **SETTINGS)


def test_formatting_that_keeps_every_value_verifies_and_an_edit_is_kept_by_deleting_the_key(tmp_path):
    """The checksum is of the content: the same values with other spacing or key order verify. An edit made on
    purpose is refused until its key is deleted; then the config reads as one saved before checksums were recorded,
    which loads (unchecked) as it did."""
    path = save_pointwise(tmp_path / "ckpt", band_stats=STATS)
    stored = json.loads((path / CONFIG).read_text())
    original = read_checkpoint(path)[0]
    for text in (json.dumps(stored), json.dumps(dict(reversed(stored.items())), indent=4), json.dumps(stored, separators=(",", ":"))):
        (path / CONFIG).write_text(text)
        assert read_checkpoint(path)[0] == original and load_checkpoint(path)[1] == original
    stored["class_names"][1] = "forest"
    (path / CONFIG).write_text(json.dumps(stored))
    for reader in (load_checkpoint, read_config):
        with pytest.raises(InputError, match="does not match the checksum"):
            reader(path)
    del stored[CONFIG_DIGEST]  # as a config saved before checksums were recorded (the weights' checksum is older and stays)
    (path / CONFIG).write_text(json.dumps(stored, indent=2, sort_keys=True))
    assert load_checkpoint(path)[1].class_names == read_config(path).class_names == ["water", "forest", "crops", "built"]
    assert read_config(path).band_stats == STATS and load_checkpoint(path)[1].band_stats == STATS


AWKWARD = [1e-310, 5e-324, 0.1 + 0.2, -0.0, 0.0, 1 / 3, 2.0**-1022, 1.7976931348623157e308, -1e300, 123456789.123456789, 1e16 + 1, 7]


def _awkward(rng: random.Random, nonnegative: bool = False) -> float:
    """A number JSON writers get wrong: a subnormal, 0.1 + 0.2, negative zero (kept, also as a std: -0.0 >= 0)..."""
    value = rng.choice(AWKWARD) if rng.random() < 0.7 else rng.uniform(-1e6, 1e6) * 10.0 ** rng.randint(-30, 30)
    return abs(value) if nonnegative and value != 0 else value


def _text(rng: random.Random) -> str:
    return "".join(rng.choice('aZ é"\\/\u2028\U0001f332\t\x00ü中') for _ in range(rng.randint(0, 8)))


def test_a_checkpoint_just_saved_always_verifies(tmp_path):
    """Random configs with awkward floats (subnormals, 0.1 + 0.2, negative zero, the largest double), unicode class
    names, int keys and tuples in free-form values: each saved checkpoint verifies and reads back its values exactly."""
    rng = random.Random(20261208)
    for case in range(40):
        stats = {
            name: {"mean": [_awkward(rng) for _ in range(bands)], "std": [_awkward(rng, nonnegative=True) for _ in range(bands)]}
            for name, bands in MODALITIES.items()
        }
        extra = {"step": rng.randint(0, 9), "floats": [_awkward(rng) for _ in range(5)], "ints": {10: "ten", 9: (1, 2.5)}, _text(rng): _text(rng)}
        config = ModelConfig(
            "test-pointwise", dict(MODALITIES), len(CLASSES), {"seed": case, "scale": _awkward(rng)}, [_text(rng) for _ in CLASSES], stats, extra
        )
        path = tilefuse.save_checkpoint(build_pointwise(MODALITIES, len(CLASSES), seed=case), config, tmp_path / f"c{case}")
        got, _ = read_checkpoint(path)
        assert read_config(path) == got
        for name in MODALITIES:
            for key in ("mean", "std"):
                assert [repr(v) for v in got.band_stats[name][key]] == [repr(float(v)) if isinstance(v, float) else repr(v) for v in stats[name][key]]
        assert got.class_names == config.class_names and got.hparams == config.hparams
        assert got.extra["ints"] == {"10": "ten", "9": [1, 2.5]}
        # and it is checked: the nearest other double in one band mean is refused
        stored = json.loads((path / CONFIG).read_text())
        mean = stored["band_stats"]["sar"]["mean"]
        mean[1] = math.nextafter(mean[1], math.inf)
        (path / CONFIG).write_text(json.dumps(stored))
        with pytest.raises(InputError, match="does not match the checksum it records"):
            read_checkpoint(path)


def test_a_config_replaced_while_a_live_run_writes_it_is_read_again(tmp_path):
    """A training run replaces config.json under a reader: a config that does not match its checksum while a live
    process writes the run is read again (as for the weights), and refused at once when nobody writes it."""
    path = save_pointwise(tmp_path / "run", band_stats=STATS)
    good = (path / CONFIG).read_bytes()
    damaged = good.replace(b"10.25", b"10.75", 1)
    wanted = checkpoint_hash(path)

    def restore():
        time.sleep(0.4)
        (tmp_path / "part").write_bytes(good)
        os.replace(tmp_path / "part", path / CONFIG)

    for reader in (checkpoint_hash, load_checkpoint):
        (path / CONFIG).write_bytes(damaged)
        with output_lock(path):  # a live writer (this process) holds the run
            thread = threading.Thread(target=restore)
            thread.start()
            try:
                got = reader(path)
            finally:
                thread.join()
        assert got == wanted if reader is checkpoint_hash else got[1].band_stats == STATS
    (path / CONFIG).write_bytes(damaged)
    started = time.perf_counter()
    with pytest.raises(InputError, match="does not match the checksum it records"):
        load_checkpoint(path)
    assert time.perf_counter() - started < 5


# ------------------------------------------------------------------ 2. a resumed training logs what an uninterrupted one logs


def _log(run) -> list[dict]:
    """log.jsonl's records without their speed (wall-clock time, the one thing a resume may change)."""
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_resume_logs_the_losses_an_uninterrupted_run_logs(stores, tmp_path):
    """log.jsonl's loss averages the steps since the previous record; a resume restarted that average at its
    checkpoint (2.5432926416397095 instead of 2.545172611872355 at step 6), though the weights were bitwise the same.
    The state keeps the steps of the window already run. A state saved before that resumes as it did."""
    from tilefuse.training import LOG_WINDOW, STATE_DIGEST, _json_digest

    options = dict(steps=12, checkpoint_every=4, lr=5e-3, seed=3, **{**FAST, "log_every": 3})
    CRASH.update(at=None, count=0)
    whole = _log(tilefuse.train("test-seg", stores, tmp_path / "whole", **options))
    assert [r["step"] for r in whole if "loss" in r] == [3, 6, 9, 12]
    CRASH.update(at=7, count=0)  # crash during step 7: the last checkpoint is step 4, one step into the window of step 6
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            tilefuse.train("test-seg", stores, tmp_path / "broken", **options)
    finally:
        CRASH.update(at=None, count=0)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "broken", old)
    assert read_config(tmp_path / "broken").extra["step"] == 4
    assert _log(tilefuse.train("test-seg", stores, tmp_path / "broken", resume=True, **options)) == whole
    # a state saved before the window was recorded: resumes, its first record averages the steps since the resume
    trainer_file = old / "state" / "trainer.json"
    trainer = json.loads(trainer_file.read_text())
    del trainer[LOG_WINDOW]
    trainer[STATE_DIGEST] = _json_digest(trainer)
    trainer_file.write_text(json.dumps(trainer, indent=1))
    resumed = _log(tilefuse.train("test-seg", stores, old, resume=True, **options))
    assert [r["step"] for r in resumed if "loss" in r] == [3, 6, 9, 12] and resumed[0] == whole[0] and resumed[-1] == whole[-1]
    assert [r["loss"] for r in resumed if r["step"] == 6] != [r["loss"] for r in whole if r["step"] == 6]


# ------------------------------------------------------------------ 3. a full disk: what is kept, and how to finish


def test_a_full_disk_or_quota_is_named_as_such_and_permissions_keep_their_advice():
    from tilefuse.outputs import write_error

    for code, what in ((errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "the disk quota is full")):
        line = write_error("out.zarr", os.strerror(code))
        assert line == f"cannot write out.zarr: {os.strerror(code)}: choose another output or free some space ({what})"
        line = write_error("out.zarr", os.strerror(code), kept="out.zarr keeps the blocks written so far")
        assert line == (
            f"cannot write out.zarr: {os.strerror(code)} ({what}): out.zarr keeps the blocks written so far; free some space, "
            "then finish it with --resume (Python: resume=True), or choose another output"
        )
    for code in (errno.EACCES, errno.EROFS):
        for kept in (None, "out.zarr keeps the blocks written so far"):
            assert write_error("out.zarr", os.strerror(code), kept=kept) == (
                f"cannot write out.zarr: {os.strerror(code)}: choose another output (a writable folder with enough free space) or fix its permissions"
            )


def test_a_full_disk_mid_prediction_says_the_store_keeps_its_blocks_and_resume_finishes_it(tmp_path, monkeypatch, capsys):
    """It said 'choose another output ... or fix its permissions', nothing of the finished blocks a --resume keeps."""
    from tilefuse import inference
    from tilefuse.prediction import done_blocks

    scene = write_test_scene(tmp_path / "scene.zarr", 170, 150, seed=11)
    checkpoint = save_pointwise(tmp_path / "ckpt", seed=2)
    settings = {"tile": 32, "overlap": 10, "block_size": 64, "batch_size": 3, "torch_threads": 1, "probs": "float32"}
    save, calls = inference.Strip.save, {"n": 0}

    def full_after_two(strip, path):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save(strip, path)

    out = tmp_path / "p.zarr"
    monkeypatch.setattr(inference.Strip, "save", full_after_two)
    args = ["predict", "--checkpoint", checkpoint, "--store", scene, "--out", out, "--tile", 32, "--overlap", 10, "--block-size", 64,
            "--batch-size", 3, "--torch-threads", 1, "--probs", "--probs-dtype", "float32"]
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in line]
    assert err == [
        f"tilefuse: error: cannot write {out}: No space left on device (the disk is full): {out} keeps the blocks written so far; "
        "free some space, then finish it with --resume (Python: resume=True), or choose another output"
    ], err
    assert 0 < done_blocks(out).sum() < done_blocks(out).size
    calls["n"] = 0
    with pytest.raises(InputError, match=r"keeps the blocks written so far; free some space, then finish it with --resume"):
        tilefuse.predict(checkpoint, scene, out, resume=True, progress=False, **settings)
    monkeypatch.setattr(inference.Strip, "save", save)
    resumed = tilefuse.predict(checkpoint, scene, out, resume=True, progress=False, **settings)
    whole = tilefuse.predict(checkpoint, scene, tmp_path / "q.zarr", progress=False, **settings)
    assert np.array_equal(resumed["probs"].values, whole["probs"].values)


def test_a_full_disk_mid_training_says_the_run_keeps_its_last_checkpoint_and_resume_finishes_it(stores, tmp_path, monkeypatch):
    import tilefuse.training as training

    options = dict(steps=12, checkpoint_every=4, lr=5e-3, seed=3, **{**FAST, "log_every": 3})
    whole = tilefuse.train("test-seg", stores, tmp_path / "whole", **options)
    save, calls = training.save_file, {"n": 0}

    def full_at_the_second_checkpoint(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(training, "save_file", full_at_the_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(InputError) as caught:
        tilefuse.train("test-seg", stores, run, **options)
    assert _one_line(caught.value) == (
        f"cannot write {run}: No space left on device (the disk is full): {run} keeps its last checkpoint (step 4 of 12); "
        "free some space, then finish it with --resume (Python: resume=True), or choose another output"
    )
    monkeypatch.setattr(training, "save_file", save)
    tilefuse.train("test-seg", stores, run, resume=True, **options)
    assert _log(run) == _log(whole)
    assert (run / WEIGHTS).read_bytes() == (whole / WEIGHTS).read_bytes()
