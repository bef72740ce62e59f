import json
import os

import numpy as np
import pytest
import rasterio
from predict_fixtures import CLASSES, save_pointwise, write_test_scene

import tilefuse
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.pipelines.export import export
from tilefuse.quicklook import class_colors
from tilefuse.scene import open_scene


@pytest.fixture(scope="module")
def prediction(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    scene = write_test_scene(root / "scene.zarr", 300, 260, seed=9, nodata=(slice(0, 40), slice(0, 260)))
    checkpoint = save_pointwise(root / "pointwise")
    pred = tilefuse.predict(checkpoint, scene, root / "pred.zarr", tile=64, overlap=16, block_size=128, progress=False)
    return root, scene, pred


def test_cog_opens_with_overviews_colours_nodata_and_the_scene_grid(tmp_path, prediction):
    root, scene, pred = prediction
    out = tmp_path / "labels.tif"
    assert main(["export", str(root / "pred.zarr"), str(out), "--blocksize", "128"]) == 0
    with rasterio.open(out) as cog:
        assert cog.driver == "GTiff" and cog.count == 1 and cog.dtypes[0] == "uint8"
        assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert cog.overviews(1), "a COG carries overviews"
        assert cog.nodata == 255
        assert cog.crs == open_scene(scene).rio.crs
        assert cog.transform == open_scene(scene).rio.transform()
        assert cog.block_shapes[0] == (128, 128)
        assert np.array_equal(cog.read(1), pred["labels"].values)
        colormap = cog.colormap(1)
        for k, rgb in enumerate(class_colors(len(CLASSES))):
            assert colormap[k][:3] == tuple(rgb)
        assert json.loads(cog.tags()["class_names"]) == CLASSES
        overview = cog.read(1, out_shape=(1, cog.height // 2, cog.width // 2))
        assert set(np.unique(overview)) <= set(range(len(CLASSES))) | {255}, "overviews keep class ids (nearest)"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_export_refuses_to_overwrite_and_bad_inputs(tmp_path, prediction):
    root, scene, _ = prediction
    out = tmp_path / "labels.tif"
    out.write_bytes(b"keep me")
    assert main(["export", str(root / "pred.zarr"), str(out)]) == 2
    assert main(["export", str(root / "pred.zarr"), str(out), "--overwrite"]) == 2, "a file tilefuse did not write stays"
    assert out.read_bytes() == b"keep me"
    out.unlink()
    assert main(["export", str(root / "pred.zarr"), str(out)]) == 0
    assert main(["export", str(root / "pred.zarr"), str(out)]) == 2, "an existing export needs --overwrite"
    assert main(["export", str(root / "pred.zarr"), str(out), "--overwrite"]) == 0
    assert main(["export", str(scene), str(tmp_path / "scene.tif")]) == 2, "a scene store is not a prediction"
    assert main(["export", str(tmp_path / "missing.zarr"), str(tmp_path / "x.tif")]) == 2
    assert not (tmp_path / "scene.tif").exists() and not (tmp_path / "x.tif").exists()


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1)])
def test_one_pixel_and_one_line_scenes_export(tmp_path, shape):
    """A 1 x 1 px prediction was an "Unknown GDAL Error" traceback: it has no overview to make."""
    scene = write_test_scene(tmp_path / "scene.zarr", *shape, seed=2)
    pred = tilefuse.predict(save_pointwise(tmp_path / "pointwise"), scene, tmp_path / "pred.zarr", tile=16, progress=False)
    out = tmp_path / "labels.tif"
    assert main(["export", str(tmp_path / "pred.zarr"), str(out)]) == 0
    with rasterio.open(out) as cog:
        assert (cog.height, cog.width) == shape
        assert np.array_equal(cog.read(1), pred["labels"].values)


@pytest.mark.parametrize("blocksize", ["100000000", "8192", "0", "-16", "24"])
def test_a_blocksize_gdal_cannot_write_is_one_line(tmp_path, prediction, capsys, blocksize):
    """--blocksize 100000000 passed the multiple-of-16 check and ended in GDAL's 'Write failed' traceback, nothing written."""
    root, _, _ = prediction
    out = tmp_path / "labels.tif"
    assert main(["export", str(root / "pred.zarr"), str(out), f"--blocksize={blocksize}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "blocksize" in err and "16..4096" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(InputError, match=r"^blocksize= \(--blocksize\)"):
        export(root / "pred.zarr", out, blocksize=int(blocksize), progress=False)
    for good in (16, 4096):
        assert export(root / "pred.zarr", tmp_path / f"{good}.tif", blocksize=good, progress=False).is_file()


@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_export_while_predict_rewrites_the_store_names_the_writer_not_damage(tmp_path, prediction, damage):
    """tilefuse export P during tilefuse predict --out P --overwrite met chunks missing from the store being
    rewritten and said 'is missing: the store is corrupt' (the wrong problem and fix); with the store's lock
    held by a live writer it says who rewrites it. The same damage with no writer stays damage."""
    import shutil
    import threading

    from tilefuse.outputs import output_lock
    from tilefuse.storage import chunk_key

    root, _, _ = prediction
    store = tmp_path / "pred.zarr"
    shutil.copytree(root / "pred.zarr", store)
    key = store / chunk_key("labels", (1, 1))
    if damage == "missing":
        key.unlink()
    elif damage == "garbled":
        key.write_bytes(key.read_bytes()[:-4] + b"junk")
    held, release = threading.Event(), threading.Event()

    def writer():  # tilefuse predict --overwrite holds the lock while it replaces the store
        with output_lock(store):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=writer)
    thread.start()
    held.wait(10)
    try:
        with pytest.raises(InputError, match=rf"^{store} is being rewritten by process {os.getpid()} \(tilefuse predict --overwrite or --resume\): wait for it to finish"):
            export(store, tmp_path / "out.tif", progress=False)
    finally:
        release.set()
        thread.join()
    assert not (tmp_path / "out.tif").exists()
    with pytest.raises(InputError, match="the store is corrupt"):  # nobody writes it: damage is damage
        export(store, tmp_path / "out.tif", progress=False)


def test_a_store_completed_while_it_was_opened_is_read_not_called_partial(tmp_path, prediction, monkeypatch):
    """open_prediction read complete=False, then its writer marked the store complete and let go of its lock before
    the lock was looked at: 'partial prediction ... finish it with tilefuse predict ... --resume' for a complete
    store (an export racing the end of a predict)."""
    import shutil

    import zarr

    from tilefuse import outputs, storage
    from tilefuse.prediction import open_prediction

    root, _, _ = prediction
    store = tmp_path / "pred.zarr"
    shutil.copytree(root / "pred.zarr", store)
    zarr.open_group(store, mode="r+").attrs["complete"] = False
    storage.consolidate(store)

    def writer_finishes_now(path):  # the last instant of a predict: complete, then the lock released
        zarr.open_group(store, mode="r+").attrs["complete"] = True
        storage.consolidate(store)
        return None

    monkeypatch.setattr(outputs, "live_writer", writer_finishes_now)
    ds = open_prediction(store)
    assert ds.attrs["complete"] and np.array_equal(ds["labels"].values, open_prediction(root / "pred.zarr")["labels"].values)
    export(store, tmp_path / "out.tif", progress=False)
    assert (tmp_path / "out.tif").is_file()
    monkeypatch.setattr(outputs, "live_writer", lambda path: None)  # nobody finishes it: partial, resume named
    zarr.open_group(store, mode="r+").attrs["complete"] = False
    storage.consolidate(store)
    with pytest.raises(InputError, match=r"is a partial prediction .* finish it with `tilefuse predict \.\.\. --resume`"):
        open_prediction(store)


@pytest.mark.parametrize("length", [230, 255])
def test_a_cog_named_as_long_as_the_filesystem_allows_is_exported_and_replaced(tmp_path, prediction, length):
    root, _, pred = prediction
    name = "l" * (length - 4) + ".tif"
    for overwrite in (False, True):
        assert export(root / "pred.zarr", tmp_path / name, overwrite=overwrite, progress=False) == tmp_path / name
    with rasterio.open(tmp_path / name) as cog:
        assert np.array_equal(cog.read(1), pred["labels"].values)
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("out", ["newdir/", ".", "..", "sub/.."])
def test_an_output_written_as_a_folder_is_one_line_not_a_file_named_so(tmp_path, prediction, out, monkeypatch, capsys):
    """`tilefuse export pred.zarr newdir/` wrote a file named newdir (the slash was dropped)."""
    root, _, _ = prediction
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(root / "pred.zarr"), out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names a folder" in err, err
    assert sorted(os.listdir(tmp_path)) == ["sub"]
    with pytest.raises(InputError, match="names a folder"):
        export(root / "pred.zarr", out)


def test_export_overwrite_never_replaces_a_geotiff_of_a_synth_geotiff_folder(tmp_path, prediction, capsys):
    """synth's GeoTIFFs carry the same marker as export's COGs: `export --overwrite TIFS/optical.tif` replaced the
    6-band input raster with a 1-band prediction, and the folder's marker still listed it. A GeoTIFF a folder lists
    is the folder's; a COG exported into the folder beside them stays export's to replace."""
    import hashlib

    root, _, _ = prediction
    tifs = tmp_path / "tifs"
    assert main(["synth", str(tmp_path / "s.zarr"), "--size", "32", "--geotiff", str(tifs)]) == 0
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tifs.iterdir()}
    capsys.readouterr()
    for name in ("optical.tif", "label.tif"):
        assert main(["export", str(root / "pred.zarr"), str(tifs / name), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"part of the tilefuse GeoTIFF folder {tifs}" in err, err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tifs.iterdir()} == digest
    assert main(["export", str(root / "pred.zarr"), str(tifs / "pred.tif")]) == 0
    assert main(["export", str(root / "pred.zarr"), str(tifs / "pred.tif"), "--overwrite"]) == 0


@pytest.mark.parametrize("name", ["x.png", "x.jpg", "x.zarr", ""])
def test_an_output_named_for_another_format_or_empty_is_one_line(tmp_path, prediction, capsys, name):
    """`export PRED x.png` wrote a GeoTIFF named x.png (quicklooks refuse a suffix not theirs); an empty name
    said 'out  names a folder'."""
    root, _, _ = prediction
    out = str(tmp_path / name) if name else ""
    assert main(["export", str(root / "pred.zarr"), out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("name it x.tif" in err if name else "OUT is empty" in err), err
    assert list(tmp_path.iterdir()) == []
    assert main(["export", str(root / "pred.zarr"), str(tmp_path / "X.TIF")]) == 0


@pytest.mark.parametrize("flip", ["y", "x", "both"])
def test_a_prediction_of_a_flipped_scene_exports_north_up_with_each_pixel_in_its_place(tmp_path, prediction, flip):
    """A y-ascending scene (sortby("y"), a bottom-up raster) was exported bottom-up (a positive y pixel size),
    which many viewers and COG readers mishandle. The COG is north up and west left; every pixel keeps its place."""
    from tilefuse.scene import write_scene

    root, scene, _ = prediction
    ds = open_scene(scene).load()
    flipped = ds.sortby("y") if flip == "y" else ds.sortby("x", ascending=False) if flip == "x" else ds.sortby("y").sortby("x", ascending=False)
    store = write_scene(flipped, tmp_path / "flipped.zarr", chunk=64, shard=None)
    pred = tilefuse.predict(root / "pointwise", store, tmp_path / "pred.zarr", tile=64, overlap=16, block_size=128, progress=False)
    out = export(pred, tmp_path / "labels.tif")
    with rasterio.open(out) as cog, rasterio.open(export(root / "pred.zarr", tmp_path / "reference.tif")) as reference:
        assert cog.transform.e < 0 < cog.transform.a and cog.transform == reference.transform
        stored = pred["labels"]
        rows, cols = np.arange(cog.height), np.arange(cog.width)
        xs, _ = rasterio.transform.xy(cog.transform, np.zeros_like(cols), cols)
        _, ys = rasterio.transform.xy(cog.transform, rows, np.zeros_like(rows))
        expected = stored.sel(y=np.asarray(ys), x=np.asarray(xs), method="nearest").values
        np.testing.assert_array_equal(cog.read(1), expected)
