"""Damaged storage is an error naming the array and the chunk, never data and never a codec crash.

Fault injection on every array kind (a modality, ``valid``, ``label``, a
prediction's ``labels`` and ``probs``), in chunked and sharded layouts: the
key file is deleted, truncated to half, or overwritten in its middle; then
every reader answers with one InputError line (exit 2 from the CLI) naming the
array and the chunk, writes nothing that looks complete, and ``predict
--resume`` repairs a damaged prediction to the exact original.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from test_sampling import CLASSES, labelled_scene
from predict_fixtures import MODALITIES, build_pointwise

from tilefuse.checkpoint import ModelConfig, save_checkpoint
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.pipelines.evaluate import evaluate
from tilefuse.prediction import done_blocks, open_prediction
from tilefuse.sampling import SceneReader
from tilefuse.scene import open_scene, write_scene
from tilefuse.storage import FORMAT, FORMAT_ATTR, chunk_key

DAMAGES = ("delete", "truncate", "overwrite")
LAYOUTS = {"chunks": None, "shards": 128}
PREDICT = ["--tile", "32", "--overlap", "8", "--block-size", "64", "--batch-size", "2", "--cluster", "sync"]


def damage(store: Path, name: str, index: tuple[int, ...], how: str) -> str:
    """Damage one key of array ``name``; returns the key."""
    key = chunk_key(name, index)
    path = store / key
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        middle = len(data) // 2
        path.write_bytes(data[: middle - 8] + bytes(16) + data[middle + 8 :])
    return key


def one_line_naming(err: str, name: str) -> None:
    """stderr holds one error line (progress bars aside) naming the array, and no traceback."""
    lines = [line for line in err.splitlines() if "|" not in line and line.strip()]  # tqdm bars have a '|'
    assert len(lines) == 1 and lines[0].startswith("tilefuse: error:"), err
    assert f"of {name!r}" in lines[0] and "corrupt" in lines[0] and "Traceback" not in err, err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    stores = {}
    for layout, shard in LAYOUTS.items():
        stores[layout] = write_scene(labelled_scene(256, 192, seed=3), root / f"{layout}.zarr", chunk=64, shard=shard)
    model = build_pointwise(MODALITIES, len(CLASSES))
    checkpoint = save_checkpoint(model, ModelConfig("test-pointwise", dict(MODALITIES), len(CLASSES), {"seed": 0}, list(CLASSES), {}), root / "ckpt")
    pred = root / "pred.zarr"
    assert main(["predict", "--checkpoint", str(checkpoint), "--store", str(stores["chunks"]), "--out", str(pred), "--probs", *PREDICT]) == 0
    return root, stores, checkpoint, pred


def _key_index(store: Path, name: str) -> tuple[int, ...]:
    """An interior key of array ``name`` (block row 1, col 1; band key 0)."""
    array = zarr.open_group(store, mode="r")[name]
    return (0,) * (array.ndim - 2) + (1, 1)


def test_new_stores_promise_every_chunk_and_checksum_it(pristine):
    _, stores, _, pred = pristine
    for store in [*stores.values(), pred]:
        group = zarr.open_group(store, mode="r")
        assert group.attrs[FORMAT_ATTR] == FORMAT
        for name, array in group.arrays():
            chain = array.metadata.codecs
            inner = chain[0].codecs if type(chain[0]).__name__ == "ShardingCodec" else chain
            assert type(inner[-1]).__name__ == "Crc32cCodec", (store, name)
    # fill-valued chunks are written too: every key of every array exists (the manifest's are optional)
    for store in [*stores.values(), pred]:
        for name, array in zarr.open_group(store, mode="r").arrays():
            if name == "block_done":
                continue
            unit = array.shards or array.chunks
            for index in np.ndindex(*(-(-n // u) for n, u in zip(array.shape, unit))):
                assert (store / chunk_key(name, index)).is_file(), (store, name, index)


def every_reader_refuses(pristine, store: Path, name: str, match: str, tmp_path: Path, capsys) -> str:
    """open_scene, SceneReader, info and predict (evaluate for labels) refuse ``store`` naming array ``name`` (and
    ``match``) in one line, and leave no complete prediction; returns info's line."""
    _, _, checkpoint, pred = pristine
    with pytest.raises(InputError, match=match):
        open_scene(store).load()
    with pytest.raises(InputError, match=match):
        SceneReader(store).read(0, 256, 0, 192, [name])
    capsys.readouterr()
    assert main(["info", str(store)]) == 2
    err = capsys.readouterr().err
    one_line_naming(err, name)
    out = tmp_path / "pred.zarr"
    if name == "label":
        assert main(["evaluate", str(pred), "--labels", str(store)]) == 2
    else:
        assert main(["predict", "--checkpoint", str(checkpoint), "--store", str(store), "--out", str(out), *PREDICT]) == 2
        assert zarr.open_group(out, mode="r").attrs["complete"] is False
    one_line_naming(capsys.readouterr().err, name)
    return err


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["optical", "valid", "label"])
def test_damaged_scene_chunk_is_an_error_for_every_reader(pristine, tmp_path, capsys, name, layout, how):
    root, stores, checkpoint, pred = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores[layout], store)
    index = _key_index(store, name)
    damage(store, name, index, how)
    unit = "shard" if layout == "shards" else "chunk"
    expected = f"{unit} {index} of {name!r}"

    every_reader_refuses(pristine, store, name, f"{unit} \\({', '.join(map(str, index))}\\) of '{name}'", tmp_path, capsys)
    capsys.readouterr()
    assert main(["info", str(store)]) == 2
    assert expected in capsys.readouterr().err
    # the untouched parts still read
    assert open_scene(store)[name][..., :64, :64].values.size


def resume_repairs(pristine, copy: Path, reference) -> None:
    """``predict --resume`` of the damaged prediction ``copy`` of the pristine scene gives ``reference`` exactly."""
    _, stores, checkpoint, _ = pristine
    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(stores["chunks"]), "--out", str(copy), "--probs"]
    assert main([*args, *PREDICT, "--resume"]) == 0
    repaired = open_prediction(copy).load()
    for var in ("labels", "probs"):
        np.testing.assert_array_equal(repaired[var].values, reference[var].values)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["labels", "probs"])
def test_damaged_prediction_is_an_error_and_resume_repairs_it(pristine, tmp_path, capsys, name, how):
    root, stores, checkpoint, pred = pristine
    reference = open_prediction(pred).load()
    copy = tmp_path / "pred.zarr"
    shutil.copytree(pred, copy)
    index = _key_index(copy, name)
    damage(copy, name, index, how)

    with pytest.raises(InputError, match=f"chunk \\({', '.join(map(str, index))}\\) of '{name}'"):
        open_prediction(copy).load()
    capsys.readouterr()
    if name == "labels":  # evaluate and export read the labels only
        assert main(["evaluate", str(copy), "--labels", str(stores["chunks"])]) == 2
        one_line_naming(capsys.readouterr().err, name)
        tif = tmp_path / "pred.tif"
        assert main(["export", str(copy), str(tif)]) == 2
        one_line_naming(capsys.readouterr().err, name)
        assert not tif.exists()

    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(stores["chunks"]), "--out", str(copy), "--probs"]
    assert main([*args, *PREDICT, "--resume"]) == 0
    repaired = open_prediction(copy).load()
    assert done_blocks(copy).all()
    for var in ("labels", "probs"):
        np.testing.assert_array_equal(repaired[var].values, reference[var].values)


def test_partial_prediction_reads_unwritten_blocks_as_nodata_but_not_damaged_ones(pristine, tmp_path):
    _, _, _, pred = pristine
    copy = tmp_path / "pred.zarr"
    shutil.copytree(pred, copy)
    group = zarr.open_group(copy, mode="r+")
    group.attrs["complete"] = False
    group["block_done"][2, 2] = 0
    (copy / chunk_key("labels", (2, 2))).unlink()  # a block not yet written: legitimately absent
    with pytest.warns(UserWarning, match="partial"):
        ds = open_prediction(copy, allow_partial=True)
    assert (ds["labels"].values[128:192, 128:192] == 255).all()
    damage(copy, "labels", (1, 1), "delete")  # a block marked done: damage
    with pytest.warns(UserWarning, match="partial"), pytest.raises(InputError, match=r"chunk \(1, 1\) of 'labels'"):
        open_prediction(copy, allow_partial=True).load()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_truncated_shard_never_crashes_predict_in_a_codec(pristine, tmp_path, layout):
    """The case that segfaulted in Blosc: checked in a subprocess, so a crash is seen as one."""
    root, stores, checkpoint, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores[layout], store)
    damage(store, "optical", (0, 0, 0), "truncate")
    out = tmp_path / "pred.zarr"
    tests = str(Path(__file__).parent)
    code = (
        "import sys; sys.path.insert(0, %r); import predict_fixtures; from tilefuse.cli import main; sys.exit(main(sys.argv[1:]))" % tests
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(store), "--out", str(out), *PREDICT]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    one_line_naming(result.stderr, "optical")
    assert zarr.open_group(out, mode="r").attrs["complete"] is False


@pytest.mark.parametrize("name", ["label", "optical"])
def test_train_on_a_damaged_store_fails_with_one_line(pristine, tmp_path, name):
    """Labels are read while planning, a modality only inside DataLoader worker processes (the default):
    either way the error is one line."""
    _, stores, _, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores["shards"], store)
    for index in np.ndindex(2, 2):  # every shard: any patch meets one
        damage(store, name, (0,) * (name == "optical") + index, "overwrite")
    tests = str(Path(__file__).parent)
    code = "import sys; sys.path.insert(0, %r); import test_training; from tilefuse.cli import main; sys.exit(main(sys.argv[1:]))" % tests
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "--model", "test-seg", "--store", str(store), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--patch-size", "32", "--quiet"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    one_line_naming(result.stderr, name)


def sharded_prediction(tmp_path: Path) -> tuple[list[str], Path]:
    """A prediction whose blocks of 1024 px are shards of 512 px chunks (the default layout, scaled down): the
    predict arguments that wrote it, and the store."""
    scene = write_scene(labelled_scene(1100, 300, seed=5), tmp_path / "scene.zarr", chunk=512, shard=1024)
    model = build_pointwise(MODALITIES, len(CLASSES))
    checkpoint = save_checkpoint(model, ModelConfig("test-pointwise", dict(MODALITIES), len(CLASSES), {"seed": 0}, list(CLASSES), {}), tmp_path / "ckpt")
    out = tmp_path / "pred.zarr"
    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(scene), "--out", str(out), "--probs"]
    args += ["--tile", "128", "--overlap", "16", "--block-size", "1024", "--batch-size", "2", "--cluster", "sync"]
    assert main(args) == 0
    return args, out


def test_sharded_prediction_blocks_are_checked_and_repaired(tmp_path):
    """Blocks of 1024 px are shards of 512 px chunks (the default layout, scaled down): one shard per block."""
    args, out = sharded_prediction(tmp_path)
    assert zarr.open_group(out, mode="r")["labels"].shards is not None
    reference = open_prediction(out).load()
    damage(out, "labels", (1, 0), "truncate")
    damage(out, "probs", (0, 0, 0), "overwrite")
    with pytest.raises(InputError, match=r"shard \((1, 0|0, 0, 0)\) of '(labels|probs)'"):
        open_prediction(out).load()
    assert main([*args, "--resume"]) == 0
    repaired = open_prediction(out).load()
    for var in ("labels", "probs"):
        np.testing.assert_array_equal(repaired[var].values, reference[var].values)


@pytest.mark.parametrize(
    "key, value",
    [("band_mean", "strings"), ("band_mean", float("nan")), ("band_mean", "short"), ("band_std", -1.0), ("band_std", None), ("band_count", -5)],
)
def test_damaged_band_statistics_are_one_line_for_info_train_and_predict(pristine, tmp_path, capsys, key, value):
    """Band statistics edited to strings, NaN, a negative std or count, or the wrong length are a damaged store:
    a NaN mean trained on all-zero inputs and wrote a NaN checkpoint, a negative std was pooled as a positive one,
    strings and a short list were tracebacks."""
    import test_training  # noqa: F401  (registers test-seg)
    from tilefuse import storage

    _, stores, checkpoint, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores["chunks"], store)
    attrs = zarr.open_group(store, mode="r+")["optical"].attrs
    bands = len(attrs["band_mean"])
    attrs[key] = {"strings": ["x"] * bands, "short": [0.1] * (bands - 1)}.get(value, [value] * bands)
    storage.consolidate(store)
    # the pristine checkpoint has no band statistics, so predict normalises with the store's
    for line in _one_line_from_info_train_and_predict(store, checkpoint, tmp_path, capsys):
        assert f"damaged band statistics ({key}" in line and "re-ingest" in line, line


def _one_line_from_info_train_and_predict(store, checkpoint, tmp_path, capsys) -> list[str]:
    """The error line each of info, train and predict ends in on ``store`` (each exit 2, one line, nothing written)."""
    run = ["train", "--model", "test-seg", "--store", str(store), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
           "--patch-size", "32", "--workers", "0", "--quiet"]
    commands = [["info", str(store)], run, ["predict", "--checkpoint", str(checkpoint), "--store", str(store), "--out", str(tmp_path / "p.zarr"), *PREDICT]]
    found = []
    for args in commands:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "|" not in line and line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        found.append(lines[0])
    assert not (tmp_path / "run").exists() and not (tmp_path / "p.zarr").exists()
    return found


@pytest.mark.parametrize("name, change", [("optical", "delete"), ("valid", "delete"), ("valid", "float32"), ("valid", "uint8"), ("label", "int16")])
def test_a_missing_array_or_one_of_another_dtype_is_one_line(pristine, tmp_path, capsys, name, change):
    """A modality the store lists but no longer holds was a KeyError traceback; a ``valid`` of another dtype a
    traceback in predict and a silently different mask in training; a label of another dtype was trained on."""
    import test_training  # noqa: F401  (registers test-seg)
    from tilefuse import storage

    _, stores, checkpoint, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores["chunks"], store)
    group = zarr.open_group(store, mode="r+")
    array = group[name]
    data, attrs, dims, chunks = array[...], dict(array.attrs), array.metadata.dimension_names, array.chunks
    del group[name]
    if change != "delete":
        retyped = group.create_array(name, shape=data.shape, dtype=change, chunks=chunks, dimension_names=dims)
        retyped[...] = data.astype(change)
        retyped.attrs.update(attrs)
    storage.consolidate(store)
    for line in _one_line_from_info_train_and_predict(store, checkpoint, tmp_path, capsys):
        assert repr(name) in line and "corrupt" in line, line


@pytest.mark.parametrize("how", ["delete", "truncate"])
@pytest.mark.parametrize("name", ["labels", "probs", "block_done"])
def test_an_array_whose_metadata_is_gone_is_one_line_and_overwrite_rewrites_it(pristine, tmp_path, capsys, name, how):
    """Reads go by the consolidated metadata, so a store whose ``NAME/zarr.json`` was deleted or damaged opened:
    evaluate scored it and ``predict --resume`` ended in a KeyError traceback while writing a block."""
    _, stores, checkpoint, pred = pristine
    reference = open_prediction(pred).load()
    copy = tmp_path / "pred.zarr"
    shutil.copytree(pred, copy)
    meta = copy / name / "zarr.json"
    meta.unlink() if how == "delete" else meta.write_bytes(meta.read_bytes()[:20])
    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(stores["chunks"]), "--out", str(copy), "--probs", *PREDICT]
    for command in (["evaluate", str(copy), "--labels", str(stores["chunks"])], [*args, "--resume"]):
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "|" not in line and line.strip()]
        assert len(lines) == 1 and f"array {name!r}" in lines[0] and "--overwrite" in lines[0] and "Traceback" not in err, err
    assert main([*args, "--overwrite"]) == 0
    for var in ("labels", "probs"):
        np.testing.assert_array_equal(open_prediction(copy)[var].values, reference[var].values)

    scene = tmp_path / "scene.zarr"
    shutil.copytree(stores["chunks"], scene)
    (scene / "optical" / "zarr.json").write_text("{")
    capsys.readouterr()
    assert main(["info", str(scene)]) == 2
    assert "array 'optical' (optical/zarr.json) is damaged" in capsys.readouterr().err


@pytest.mark.parametrize(
    "attr, value",
    [("class_names", v) for v in ("water", [1, 2, 3], ["water", "water", "crops"], ["water", "", "crops"])]
    + [("class_counts", v) for v in ("xxxxxxxxxx", [5, -1], [5, 1.5], {"0": 5}, [1] * 300)],
)
def test_label_class_metadata_edited_into_something_else_is_one_line(pristine, tmp_path, capsys, attr, value):
    """class_names: a string was read as one class per letter, numbers were trained on as names, and two ids named
    alike lost one class's scores in evaluate (its metrics are keyed by name). class_counts (ingest's pixel count
    per id) set the class count: a string of 10 letters trained a 10-class model, and -1 was a TypeError traceback."""
    import test_training  # noqa: F401  (registers test-seg)
    from tilefuse import storage

    _, stores, _, pred = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores["chunks"], store)
    zarr.open_group(store, mode="r+")["label"].attrs[attr] = value
    storage.consolidate(store)
    run = ["train", "--model", "test-seg", "--store", str(store), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
           "--patch-size", "32", "--workers", "0", "--quiet"]
    for args in (["info", str(store)], run, ["evaluate", str(pred), "--labels", str(store)]):
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "|" not in line and line.strip()]
        assert len(lines) == 1 and f"{attr} of its array 'label'" in lines[0] and "corrupt" in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("what", ["Task", "_GatheringFuture"])
def test_abandoned_sibling_reads_stay_quiet_after_the_one_line(caplog, what):
    """evaluate/predict on a store with a damaged key sometimes printed dozens of lines of
    '_GatheringFuture exception was never retrieved' tracebacks after the error line (zarr's pool shut at exit)."""
    import asyncio
    import logging

    from tilefuse.storage import _orphans_quiet

    loop = asyncio.new_event_loop()
    try:
        _orphans_quiet(loop)
        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            for error in (RuntimeError("cannot schedule new futures after shutdown"), InputError("chunk (0, 1) of 'block_done' is damaged")):
                loop.call_exception_handler({"message": f"{what} exception was never retrieved", "exception": error})
            assert not caplog.records, [r.getMessage() for r in caplog.records]
            loop.call_exception_handler({"message": f"{what} exception was never retrieved", "exception": ValueError("a bug")})
            assert len(caplog.records) == 1, "anything else is still reported"
    finally:
        loop.close()


def test_abandoned_sibling_reads_closed_with_zarr_loop_stay_quiet(monkeypatch):
    """... or 'Exception ignored in: <coroutine object concurrent_map.<locals>.run>' and a 'Event loop is closed' traceback."""
    import asyncio
    import types

    from tilefuse.storage import _orphans_quiet

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)  # what would print them

    def concurrent_map():
        async def run():
            return None

        return run()

    coroutine = concurrent_map()
    loop = asyncio.new_event_loop()
    try:
        _orphans_quiet(loop)
        errors = (RuntimeError("Event loop is closed"), RuntimeError("cannot schedule new futures after shutdown"), ValueError("a bug"))
        for error in errors:
            sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None, object=coroutine))
        assert [r.exc_value for r in reported] == [errors[-1]], "only the orphaned reads' are dropped"
    finally:
        coroutine.close()
        loop.close()


@pytest.mark.parametrize("listed", ["optical", [], ["optical"], ["sar", "sar", "optical"], [1, 2], {"optical": 1}])
def test_modalities_attr_edited_to_something_else_than_the_held_modalities_is_one_line(pristine, tmp_path, capsys, listed):
    """The store's list of modalities: a string was read one modality per letter ('o' is missing); [] or a list
    leaving one out hid a held modality from info, training and prediction without a word."""
    import test_training  # noqa: F401  (registers test-seg)
    from tilefuse import storage

    _, stores, checkpoint, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores["chunks"], store)
    zarr.open_group(store, mode="r+").attrs["modalities"] = listed
    storage.consolidate(store)
    for line in _one_line_from_info_train_and_predict(store, checkpoint, tmp_path, capsys):
        assert "modalities" in line and "corrupt" in line, line


@pytest.mark.parametrize("edit", ["transform", "no crs"])
def test_georeferencing_that_disagrees_or_is_gone_is_one_line(pristine, tmp_path, capsys, edit):
    """A spatial_ref whose GeoTransform disagrees with the x/y coordinates (rioxarray's transform took the pixel
    size from one, the origin from the other: what info showed and export would write), or which lost its CRS
    (predictions and COGs without one), was read as it was."""
    import test_training  # noqa: F401  (registers test-seg)
    from tilefuse import storage

    _, stores, checkpoint, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores["chunks"], store)
    attrs = zarr.open_group(store, mode="r+")["spatial_ref"].attrs
    kept = dict(attrs)
    if edit == "transform":
        values = list(open_scene(store).rio.transform().to_gdal())
        values[1] *= 2  # twice the pixel size: rioxarray takes the size from it, the origin from x/y
        values[5] *= 2
        kept["GeoTransform"] = " ".join(repr(v) for v in values)
    else:
        kept = {k: v for k, v in kept.items() if k == "GeoTransform"}
    for key in list(attrs):
        del attrs[key]
    attrs.update(kept)
    storage.consolidate(store)
    for line in _one_line_from_info_train_and_predict(store, checkpoint, tmp_path, capsys):
        assert "spatial_ref" in line and "corrupt" in line, line


def _edit_array_metadata(store: Path, name: str, edit) -> None:
    """Apply ``edit`` to array ``name``'s metadata, in its zarr.json and in the store's consolidated copy alike."""
    import json

    own = store / name / "zarr.json"
    meta = json.loads(own.read_text())
    edit(meta)
    own.write_text(json.dumps(meta))
    root = json.loads((store / "zarr.json").read_text())
    edit(root["consolidated_metadata"]["metadata"][name])
    (store / "zarr.json").write_text(json.dumps(root))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    "name, edit",
    [
        ("optical", "float64"),
        ("sar", "float16"),
        ("valid", "int16"),
        ("optical", "chunk_shape"),
        ("optical", "no checksum"),
    ],
)
def test_array_metadata_edited_to_another_dtype_chunk_shape_or_codecs_is_one_line(pristine, tmp_path, capsys, layout, name, edit):
    """The chunks' bytes intact but the array's metadata (in zarr.json and the consolidated copy alike) saying
    another dtype size, chunk shape or codec chain: reads ended in a ValueError traceback inside zarr's codecs
    ("cannot reshape array", "When changing to a larger dtype")."""
    import test_training  # noqa: F401  (registers test-seg)

    _, stores, checkpoint, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores[layout], store)

    def change(meta):
        if edit == "chunk_shape":
            grid = meta["chunk_grid"]["configuration"]
            target = meta["codecs"][0]["configuration"] if meta["codecs"][0]["name"] == "sharding_indexed" else None
            if target is not None:
                target["chunk_shape"] = [n // 2 if i else n for i, n in enumerate(target["chunk_shape"])]
            else:
                grid["chunk_shape"] = [n // 2 if i else n for i, n in enumerate(grid["chunk_shape"])]
        elif edit == "no checksum":
            chain = meta["codecs"][0]["configuration"]["codecs"] if meta["codecs"][0]["name"] == "sharding_indexed" else meta["codecs"]
            del chain[-1]
        else:
            meta["data_type"] = edit
            meta["fill_value"] = 0

    _edit_array_metadata(store, name, change)
    with pytest.raises(InputError, match=f"'{name}'"):
        open_scene(store).load()
    run = ["train", "--model", "test-seg", "--store", str(store), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
           "--patch-size", "32", "--workers", "0", "--quiet"]
    predict = ["predict", "--checkpoint", str(checkpoint), "--store", str(store), "--out", str(tmp_path / "p.zarr"), *PREDICT]
    for args in (["info", str(store)], run, predict):
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "|" not in line and line.strip()]
        assert len(lines) == 1 and "Traceback" not in err and repr(name) in lines[0] and "corrupt" in lines[0], err


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc to make a read fail")
@pytest.mark.parametrize("which", ["scene", "prediction"])
def test_a_key_the_filesystem_refuses_to_read_is_one_line_naming_it(pristine, tmp_path, capsys, which):
    """A chunk the filesystem would not read (chmod 000, a disk's I/O error) was 'cannot write ...: choose another
    output' from info, evaluate, export and train (the guarded writer took every EACCES for a write), or an I/O
    error's traceback. It is one line naming the array and the chunk. (A symlink to /proc/self/mem: reading it from
    its start is EIO, for root too, whom chmod 000 does not stop.)"""
    _, stores, checkpoint, pred = pristine
    source, name = (stores["chunks"], "optical") if which == "scene" else (pred, "labels")
    store = tmp_path / source.name
    shutil.copytree(source, store)
    index = _key_index(store, name)
    key = store / chunk_key(name, index)
    key.unlink()
    key.symlink_to("/proc/self/mem")
    if which == "scene":
        commands = [["info", str(store)], ["predict", "--checkpoint", str(checkpoint), "--store", str(store), "--out", str(tmp_path / "p.zarr"), *PREDICT]]
    else:
        commands = [["evaluate", str(store), "--labels", str(stores["chunks"])], ["export", str(store), str(tmp_path / "p.tif")]]
    for args in commands:
        capsys.readouterr()
        assert main(args) == 2, args
        lines = [line for line in capsys.readouterr().err.splitlines() if "|" not in line and line.strip()]
        assert len(lines) == 1 and "cannot be read" in lines[0] and f"chunk {index} of {name!r}" in lines[0], (args, lines)
        assert "cannot write" not in lines[0]
    assert not (tmp_path / "p.tif").exists()


@pytest.mark.parametrize("name", ["x", "y"])
def test_a_damaged_prediction_coordinate_advises_what_repairs_it(pristine, tmp_path, capsys, name):
    """A prediction's missing `x` chunk was 'recompute it with --resume'; the resume rewrote no block, said
    'wrote p.zarr (0 blocks)' and then the same advice. Only its blocks are recomputed by a resume: a damaged
    coordinate advises --overwrite, the resume says one line, and --overwrite repairs it."""
    _, stores, checkpoint, pred = pristine
    store = tmp_path / "pred.zarr"
    shutil.copytree(pred, store)
    (store / chunk_key(name, (0,) * zarr.open_group(store, mode="r")[name].ndim)).unlink()
    capsys.readouterr()
    assert main(["evaluate", str(store), "--labels", str(stores["chunks"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"of {name!r} is missing" in err and "--overwrite" in err and "--resume" not in err, err
    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(stores["chunks"]), "--out", str(store), "--probs", *PREDICT]
    assert main([*args, "--resume"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "|" not in line and line.strip()]
    assert len(lines) == 1 and "--overwrite" in lines[0], lines
    assert main([*args, "--overwrite"]) == 0
    assert open_prediction(store)["labels"].equals(open_prediction(pred)["labels"])


def test_a_prediction_whose_root_metadata_is_damaged_says_to_remove_it(pristine, tmp_path, capsys):
    """A truncated root zarr.json: evaluate advised --resume, and both --resume and --overwrite refused the store
    as 'a folder not written by tilefuse' (its marker is in that file): no message said what would help."""
    _, stores, checkpoint, pred = pristine
    store = tmp_path / "pred.zarr"
    shutil.copytree(pred, store)
    (store / "zarr.json").write_bytes((store / "zarr.json").read_bytes()[:100])
    capsys.readouterr()
    assert main(["evaluate", str(store), "--labels", str(stores["chunks"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zarr.json is damaged" in err and "remove it yourself" in err, err
    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(stores["chunks"]), "--out", str(store), *PREDICT]
    for option in ("--resume", "--overwrite"):
        assert main([*args, option]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "zarr.json is damaged" in err and "never replaced" in err, err
    assert (store / "labels").is_dir(), "never deleted"


@pytest.mark.parametrize("name", ["label", "optical"])  # (`valid`: the same metadata in every store of a shape, see below)
def test_an_array_folder_copied_in_from_another_store_is_one_line(pristine, tmp_path, capsys, name):
    """`rm -r s.zarr/label; cp -r other.zarr/label s.zarr/label`: every chunk intact with its checksum, so info
    printed the old class counts (from the store's record) and train trained on the other scene's labels. The
    array's own metadata disagrees with the store's record of it: one line, from every reader."""
    _, _, checkpoint, _ = pristine
    first, second = (write_scene(labelled_scene(128, 96, seed=s), tmp_path / f"{s}.zarr", chunk=64) for s in (5, 6))
    shutil.rmtree(first / name)
    shutil.copytree(second / name, first / name)
    capsys.readouterr()
    for args in (["info", str(first)], ["predict", "--checkpoint", str(checkpoint), "--store", str(first), "--out", str(tmp_path / "p.zarr"), *PREDICT]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"array {name!r} is not the one the store was written with" in err, err
    with pytest.raises(InputError, match="not the one the store was written with"):
        SceneReader(first).read(0, 64, 0, 64, [name])
    assert main(["synth", str(tmp_path / "u.zarr"), "--size", "32"]) == 0  # an untouched store opens
    assert main(["info", str(tmp_path / "u.zarr")]) == 0


def test_a_folder_in_place_of_a_prediction_chunk_is_one_line_naming_it(pristine, tmp_path, capsys):
    """A resume over a chunk replaced by a folder said 'cannot write ...: Is a directory: ... or fix its
    permissions': there was no permission to fix, and the folder (not tilefuse's) is never deleted."""
    _, stores, checkpoint, pred = pristine
    store = tmp_path / "pred.zarr"
    shutil.copytree(pred, store)
    key = store / chunk_key("labels", (1, 1))
    key.unlink()
    key.mkdir()
    (key / "notes.txt").write_text("mine")
    capsys.readouterr()
    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(stores["chunks"]), "--out", str(store), "--probs", *PREDICT]
    assert main([*args, "--resume"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "|" not in line and line.strip()]
    assert len(lines) == 1 and "a folder is in the way" in lines[0] and "permissions" not in lines[0], lines
    assert (key / "notes.txt").read_text() == "mine"


MISPLACEMENTS = ("copied over another", "swapped", "from another store")


def _keys(store: Path, name: str) -> list[tuple[int, ...]]:
    array = zarr.open_group(store, mode="r")[name]
    unit = array.shards or array.chunks
    return list(np.ndindex(*(-(-n // u) for n, u in zip(array.shape, unit))))


def misplace(store: Path, name: str, how: str, other: Path | None = None) -> None:
    """Put an intact chunk (or shard) of array ``name`` where it does not belong, each key keeping its checksum:
    ``cp c/0/0 c/1/1``, ``mv`` two keys into each other's place, or ``cp other.zarr/.../c/1/1 c/1/1``."""
    keys = _keys(store, name)
    target = _key_index(store, name) if _key_index(store, name) in keys else keys[-1]
    key = lambda root, index: root / chunk_key(name, index)  # noqa: E731
    places = lambda root: np.load(root / "chunk_digests.npz")[name]  # noqa: E731  (each chunk's crc32c, by place)
    # where the moved key's chunks differ from those they replace (a reader of the array's region reads other data)
    differs = lambda a, b: bool(((a != b) & (b != 0)).any())  # noqa: E731
    if how == "from another store":
        target = next(i for i in keys if differs(places(other)[i], places(store)[i]))
        shutil.copyfile(key(other, target), key(store, target))
        return
    source = next(i for i in keys if differs(places(store)[i], places(store)[target]))
    if how == "swapped":
        moved = key(store, target).read_bytes()
        shutil.copyfile(key(store, source), key(store, target))
        key(store, source).write_bytes(moved)
    else:
        shutil.copyfile(key(store, source), key(store, target))


@pytest.mark.parametrize("how", MISPLACEMENTS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["optical", "valid", "label"])
def test_a_chunk_in_another_place_is_an_error_for_every_reader(pristine, tmp_path, capsys, name, layout, how):
    """A chunk's crc32c proves it intact, not where it belongs: a chunk copied over another place of its array,
    two swapped, or one copied in from another store of the same shape were read, trained on and scored. The
    store's record of each chunk's place catches every one: one line naming the array, from every reader."""
    root, stores, checkpoint, pred = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores[layout], store)
    other = write_scene(labelled_scene(256, 192, seed=4, invalid_disk=False), tmp_path / "other.zarr", chunk=64, shard=LAYOUTS[layout])
    misplace(store, name, how, other)
    err = every_reader_refuses(pristine, store, name, f"of '{name}'.*is not the one the store recorded there", tmp_path, capsys)
    assert "re-ingest it" in err, err


def test_a_valid_array_copied_in_from_another_store_is_one_line(tmp_path, capsys):
    """`valid` has the same metadata in every store of a shape, so the metadata check let another scene's mask
    through (its chunks intact): the record of the chunks' places does not."""
    first = write_scene(labelled_scene(128, 96, seed=5), tmp_path / "first.zarr", chunk=64)
    second = write_scene(labelled_scene(128, 96, seed=5, invalid_disk=False), tmp_path / "second.zarr", chunk=64)
    shutil.rmtree(first / "valid")
    shutil.copytree(second / "valid", first / "valid")
    capsys.readouterr()
    assert main(["info", str(first)]) == 2
    err = capsys.readouterr().err
    one_line_naming(err, "valid")
    assert "not the one the store recorded there" in err, err


@pytest.mark.parametrize("how", MISPLACEMENTS[:2])
@pytest.mark.parametrize("name", ["labels", "probs"])
def test_a_prediction_chunk_in_another_place_is_an_error_and_resume_repairs_it(pristine, tmp_path, capsys, name, how):
    """A resume used to find every block intact (each chunk matched its checksum) and record the moved chunk as
    the store's: it now recomputes the blocks whose chunks are not those recorded, to the exact original."""
    _, stores, checkpoint, pred = pristine
    reference = open_prediction(pred).load()
    copy = tmp_path / "pred.zarr"
    shutil.copytree(pred, copy)
    misplace(copy, name, how)
    with pytest.raises(InputError, match=f"of '{name}'.*not the one the store recorded there"):
        open_prediction(copy).load()
    capsys.readouterr()
    if name == "labels":
        assert main(["evaluate", str(copy), "--labels", str(stores["chunks"])]) == 2
        one_line_naming(capsys.readouterr().err, name)
        assert main(["export", str(copy), str(tmp_path / "pred.tif")]) == 2
        one_line_naming(capsys.readouterr().err, name)
    resume_repairs(pristine, copy, reference)


def test_swapped_prediction_shards_are_caught_and_repaired(tmp_path):
    args, out = sharded_prediction(tmp_path)
    reference = open_prediction(out).load()
    misplace(out, "labels", "swapped")
    # whichever shard is read first: another's chunk in a recorded place, or (the edge shard holds fewer chunks) a
    # recorded place its index marks empty
    with pytest.raises(InputError, match=r"shard \((0, 0|1, 0)\) of 'labels'.*(not the one the store recorded there|is missing a chunk)"):
        open_prediction(out).load()
    assert main([*args, "--resume"]) == 0
    np.testing.assert_array_equal(open_prediction(out)["labels"].values, reference["labels"].values)


@pytest.mark.parametrize("how", ["delete", "truncate", "overwrite"])
def test_a_missing_or_damaged_record_of_chunk_places_is_one_line(pristine, tmp_path, capsys, how):
    _, stores, _, pred = pristine
    store, copy = tmp_path / "scene.zarr", tmp_path / "pred.zarr"
    shutil.copytree(stores["shards"], store)
    shutil.copytree(pred, copy)
    for root in (store, copy):
        record = root / "chunk_digests.npz"
        data = record.read_bytes()
        if how == "delete":
            record.unlink()
        elif how == "truncate":
            record.write_bytes(data[: len(data) // 2])
        else:
            record.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:104]) + data[104:])
    capsys.readouterr()
    assert main(["info", str(store)]) == 2
    err = capsys.readouterr().err
    state = "missing" if how == "delete" else "damaged"
    assert err.count("\n") == 1 and f"its record of where each chunk belongs (chunk_digests.npz) is {state}" in err and "re-ingest it" in err, err
    assert main(["evaluate", str(copy), "--labels", str(stores["chunks"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"chunk_digests.npz) is {state}" in err and "--overwrite" in err, err


def test_stores_without_a_record_of_chunk_places_still_open(pristine, tmp_path, capsys):
    """Stores of earlier releases have no record: their chunks are checked by their checksums alone."""
    _, stores, _, pred = pristine
    for source in (stores["chunks"], pred):
        copy = tmp_path / source.name
        shutil.copytree(source, copy)
        assert (copy / "chunk_digests.npz").is_file()
        (copy / "chunk_digests.npz").unlink()
        group = zarr.open_group(copy, mode="r+")
        del group.attrs["tilefuse_digests"]
        zarr.consolidate_metadata(copy)
    assert main(["info", str(tmp_path / stores["chunks"].name)]) == 0
    assert main(["evaluate", str(tmp_path / pred.name), "--labels", str(stores["chunks"])]) == 0


def test_a_change_made_in_place_is_refused_until_recorded(pristine, tmp_path, capsys):
    """A label chunk rewritten with zarr cannot be told from one copied in: refused, and the message names the
    call that records a change meant; after it the changed store reads, and the old chunk put back is refused."""
    _, stores, _, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores["chunks"], store)
    old = (store / chunk_key("label", (1, 1))).read_bytes()
    zarr.open_group(store, mode="r+")["label"][64:128, 64:128] = 2
    with pytest.raises(InputError, match=r"is not the one the store recorded there.*record it with tilefuse\.storage\.record_digests\("):
        open_scene(store)["label"].load()
    from tilefuse.storage import record_digests

    record_digests(store)
    assert (open_scene(store)["label"].values[64:128, 64:128] == 2).all()
    assert main(["info", str(store)]) == 0
    (store / chunk_key("label", (1, 1))).write_bytes(old)
    with pytest.raises(InputError, match="not the one the store recorded there"):
        open_scene(store)["label"].load()


def edit_shard_index(path: Path, edit) -> None:
    """Rewrite the index at the end of shard file ``path`` as ``edit`` returns it ((chunks, 2) offsets and lengths),
    with a fresh crc32c: an index intact by its checksum that zarr never wrote."""
    from tilefuse.storage import crc32c

    data = path.read_bytes()
    array = zarr.open_group(path.parents[3], mode="r")[path.parents[2].name]
    size = int(np.prod([s // c for s, c in zip(array.shards, array.chunks)])) * 16
    entries = edit(np.frombuffer(data[-size - 4 : -4], dtype="<u8").reshape(-1, 2).copy())
    index = entries.astype("<u8").tobytes()
    path.write_bytes(data[: -size - 4] + index + crc32c(np.frombuffer(index, np.uint8)).to_bytes(4, "little"))


@pytest.mark.parametrize("edit", ["two places, one chunk", "a place marked empty"])
def test_a_shard_index_edited_intact_is_refused(pristine, tmp_path, edit):
    """A shard index rewritten with its checksum (place 0 pointed at place 1's chunk, or marked empty) was read:
    place 0 gave place 1's labels, or the fill value 0, a real class, where the store wrote a chunk."""
    _, stores, _, _ = pristine
    store = tmp_path / "scene.zarr"
    shutil.copytree(stores["shards"], store)

    def change(entries):
        entries[0] = entries[1] if edit == "two places, one chunk" else 2**64 - 1
        return entries

    edit_shard_index(store / chunk_key("label", (0, 0)), change)
    match = "points two places at one chunk" if edit == "two places, one chunk" else "missing a chunk"
    with pytest.raises(InputError, match=rf"shard \(0, 0\) of 'label'.*{match}"):
        open_scene(store)["label"][:64, :64].load()
    with pytest.raises(InputError, match=r"shard \(0, 0\) of 'label'"):
        open_scene(store)["label"].load()


def test_chunks_moved_in_a_prediction_never_complete_are_recomputed_on_resume(pristine, tmp_path):
    """Two done blocks' chunks swapped in a partial prediction (never complete, so no record of the whole store):
    the resume computed only the missing blocks and recorded the swapped chunks as the store's. Each block's
    write records its own chunks, so the resume recomputes both, to the exact original."""
    _, stores, checkpoint, pred = pristine
    reference = open_prediction(pred).load()
    copy = tmp_path / "pred.zarr"
    shutil.copytree(pred, copy)
    group = zarr.open_group(copy, mode="r+")
    group.attrs["complete"] = False
    del group.attrs["tilefuse_digests"]
    group["block_done"][2, 2] = 0
    zarr.consolidate_metadata(copy)
    (copy / chunk_key("labels", (2, 2))).unlink()
    misplace(copy, "labels", "swapped")  # by the record's places, then the record goes: a store never complete
    (copy / "chunk_digests.npz").unlink()
    resume_repairs(pristine, copy, reference)


def test_a_shard_index_read_as_a_plain_range_is_told_from_its_chunks(pristine):
    """zarr reads a shard's index by suffix; read as a byte range (another zarr version), it must not be taken for
    a chunk (a false 'not the one recorded'), and no chunk may be taken for it (its place then goes unchecked)."""
    from zarr.abc.store import RangeByteRequest

    from tilefuse.storage import _index_by_range, checks_for, chunk_places

    _, stores, _, _ = pristine
    store = stores["shards"]
    check = checks_for(zarr.open_group(store, mode="r"))["label"]
    data = np.frombuffer((store / chunk_key("label", (0, 0))).read_bytes(), np.uint8)
    size = check.inner * 16 + 4
    index = data[-size:]
    assert _index_by_range(index, check, RangeByteRequest(len(data) - size, len(data)))
    for offset, place in chunk_places(index, check).items():
        length = int(np.frombuffer(index[:-4].tobytes(), "<u8").reshape(-1, 2)[place][1])
        assert not _index_by_range(data[offset : offset + length], check, RangeByteRequest(offset, offset + length))
