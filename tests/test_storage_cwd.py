"""An output that is the current folder, or holds it, is never moved aside or deleted under the command."""

import os

import pytest

from tilefuse import outputs
from tilefuse.cli import main
from tilefuse.errors import InputError


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)


def _one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("spelling", [".", "./", "../work", "{cwd}"])
def test_an_empty_current_folder_is_not_replaced_by_a_folder_output(spelling, overwrite, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = spelling.format(cwd=work)
    assert main(["synth", str(tmp_path / "s.zarr"), "--size", "32", "--geotiff", out, *overwrite]) == 2
    assert "current folder" in _one_line(capsys)
    assert os.getcwd() == str(work) and os.path.samefile(".", work), "the folder this command ran in was replaced"
    assert _tree(tmp_path) == ["work"]


def test_a_folder_holding_the_user_files_and_the_current_folder_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    for out in (".", str(tmp_path), "/"):
        assert main(["synth", "s.zarr", "--size", "32", "--geotiff", out, "--overwrite"]) == 2
        _one_line(capsys)
    assert _tree(tmp_path) == before and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_store_holding_the_current_folder_is_not_replaced(tmp_path, monkeypatch, capsys):
    assert main(["synth", str(tmp_path / "s.zarr"), "--size", "32"]) == 0
    inner = tmp_path / "s.zarr" / "sar"
    monkeypatch.chdir(inner)
    before = _tree(tmp_path)
    assert main(["synth", "..", "--size", "32", "--overwrite", "--seed", "1"]) == 2
    assert "current folder" in _one_line(capsys)
    assert _tree(tmp_path) == before and os.path.samefile(".", inner)
    with pytest.raises(InputError, match="current folder"):
        outputs.claim("..", "scene", overwrite=True, what="out=")


def test_the_current_folder_that_is_an_output_of_the_same_kind_is_replaced_and_followed(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tifs"
    assert main(["synth", str(tmp_path / "a.zarr"), "--size", "32", "--geotiff", str(folder)]) == 0
    monkeypatch.chdir(folder)
    # the GeoTIFF folder is written first, then the store by a path relative to the (replaced) current folder
    assert main(["synth", "../b.zarr", "--size", "32", "--geotiff", ".", "--overwrite", "--seed", "3"]) == 0, capsys.readouterr().err
    assert outputs.found_kind(tmp_path / "b.zarr") == "scene"
    assert os.path.samefile(os.getcwd(), folder) and sorted(os.listdir(".")) == sorted(os.listdir(folder))
    assert outputs.found_kind(".") == "geotiff-folder"


def test_a_current_folder_deleted_under_the_shell_is_one_line(tmp_path):
    """A shell left in a folder that was deleted (or replaced by a run): each command was a FileNotFoundError
    traceback from os.path.abspath (and `tilefuse models` an oneMKL FATAL ERROR)."""
    import subprocess
    import sys

    gone = tmp_path / "gone"
    gone.mkdir()
    code = "import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); from tilefuse.cli import main; sys.exit(main(sys.argv[2:]))"
    for args in (["info", "s.zarr"], ["synth", "s.zarr", "--size", "32"]):
        gone.mkdir(exist_ok=True)
        done = subprocess.run([sys.executable, "-c", code, str(gone), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "current folder no longer exists" in done.stderr, done.stderr
    assert os.listdir(tmp_path) == []


def test_overwrite_never_deletes_a_layer_a_user_added_to_a_scene_store(tmp_path, capsys):
    """An array added to a scene store with zarr (an NDVI layer beside the modalities) was deleted with the
    store by `synth/ingest --overwrite`, though tilefuse never wrote it."""
    from tilefuse.scene import open_scene as tilefuse_open

    import numpy as np
    import zarr

    from tilefuse import storage

    store = tmp_path / "s.zarr"
    assert main(["synth", str(store), "--size", "32"]) == 0
    group = zarr.open_group(store, mode="r+")
    # as zarr writes by default: no crc32c, fill-valued chunks not written; tilefuse promises only its own arrays
    layer = group.create_array("ndvi", shape=(32, 32), chunks=(16, 16), dtype="float32", dimension_names=("y", "x"))
    layer[:16] = np.ones((16, 32))
    storage.consolidate(store)
    assert tilefuse_open(store)["ndvi"].shape == (32, 32)  # still a scene store, the layer read with it
    before = _tree(store)
    assert main(["synth", str(store), "--size", "32", "--overwrite", "--seed", "2"]) == 2
    err = _one_line(capsys)
    assert "ndvi" in err and "did not write" in err, err
    assert _tree(store) == before
    assert main(["synth", str(tmp_path / "t.zarr"), "--size", "32"]) == 0
    assert main(["synth", str(tmp_path / "t.zarr"), "--size", "32", "--overwrite", "--seed", "2"]) == 0  # its own arrays only


def test_overwrite_never_deletes_a_label_array_a_user_added_to_an_unlabelled_store(tmp_path, capsys):
    """A `label` array added to a store ingested without labels counted as the store's own (every scene's
    `label` did), so `ingest --overwrite` deleted the user's labels without a word."""
    import numpy as np
    import zarr

    g = tmp_path / "g"
    assert main(["synth", str(tmp_path / "g.zarr"), "--size", "32", "--geotiff", str(g)]) == 0
    store = tmp_path / "s.zarr"
    ingest = ["ingest", str(store), "-m", f"optical={g}/optical.tif", "-m", f"sar={g}/sar.tif"]
    assert main(ingest) == 0
    zarr.open_group(store, mode="r+").create_array("label", shape=(32, 32), dtype="uint8")[:] = np.full((32, 32), 3, np.uint8)
    before = _tree(store)
    assert main([*ingest, "--overwrite"]) == 2
    err = _one_line(capsys)
    assert "label" in err and "did not write" in err, err
    assert _tree(store) == before
    labelled = tmp_path / "l.zarr"  # a store ingested with labels is replaced, its labels its own
    assert main([*ingest[:1], str(labelled), *ingest[2:], "--labels", f"{g}/label.tif"]) == 0
    assert main([*ingest[:1], str(labelled), *ingest[2:], "--labels", f"{g}/label.tif", "--overwrite"]) == 0


@pytest.mark.parametrize("through", ["path", "symlink"])
def test_lazy_datasets_opened_by_a_relative_path_read_the_same_store_after_a_chdir(through, tmp_path, monkeypatch):
    """A notebook opened a store by a relative path, then changed folder (os.chdir): every later read of the lazy
    Dataset (open_scene, open_prediction, tilefuse.predict's) was a false 'was replaced while it was read', the
    store's path being stat'ed (and read) again relative to the new folder. A real replacement is still refused."""
    import numpy as np
    from predict_fixtures import make_scene, save_pointwise, write_test_scene

    import tilefuse
    from tilefuse.prediction import store_path
    from tilefuse.scene import write_scene

    (tmp_path / "elsewhere").mkdir()
    write_test_scene(tmp_path / "data" / "s.zarr", 48, 40, seed=1)
    (tmp_path / "s.zarr").symlink_to(tmp_path / "data" / "s.zarr")
    checkpoint = save_pointwise(tmp_path / "pointwise")
    monkeypatch.chdir(tmp_path)
    name = "s.zarr" if through == "symlink" else "data/s.zarr"
    scene = tilefuse.open_scene(name)
    predicted = tilefuse.predict(checkpoint, name, "p.zarr", tile=32, overlap=8, progress=False)
    opened = tilefuse.open_prediction("p.zarr")
    first = scene["optical"][:, :8, :8].values, predicted["labels"].values, opened["labels"][8:, 8:].values
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert np.array_equal(scene["optical"][:, :8, :8].values, first[0])
    assert np.array_equal(predicted["labels"].values, first[1])
    assert np.array_equal(opened["labels"][8:, 8:].values, first[2])
    # passed on for their stores: they recorded the path as given, and were refused ("not a path") from here
    again = tilefuse.predict(checkpoint, scene, tmp_path / "p2.zarr", tile=32, overlap=8, progress=False)
    assert np.array_equal(again["labels"].values, first[1])
    assert store_path(opened, "prediction", "prediction") == str(tmp_path / "p.zarr")
    write_scene(make_scene(48, 40, seed=2), tmp_path / name, chunk=64, shard=None, overwrite=True)  # a real replacement
    with pytest.raises(InputError, match=rf"^{name} was replaced while it was read"):
        scene["optical"][:, 8:, 8:].values


def test_a_store_is_tokenized_by_where_it_is_and_what_it_promises(tmp_path, monkeypatch):
    """Dask names of a lazy Dataset come from its store's token: the same store by a relative or an absolute path
    gives one name (so a Dataset can be passed on after a chdir); other promises (a partial prediction opened
    before and after a resume wrote more blocks) give another, or dask would read one for both."""
    from dask.base import tokenize
    from predict_fixtures import write_test_scene

    from tilefuse.storage import verified_store

    write_test_scene(tmp_path / "s.zarr", 32, 32, seed=1)
    monkeypatch.chdir(tmp_path)
    relative, absolute = verified_store("s.zarr"), verified_store(tmp_path / "s.zarr")
    assert tokenize(relative) == tokenize(absolute)
    partial = verified_store("s.zarr", written={"optical": [(0, 0)]})
    assert tokenize(partial) != tokenize(relative)


def test_overwrite_never_deletes_an_array_a_user_added_to_a_prediction_store(tmp_path, capsys):
    """An `entropy` layer added to a prediction store with zarr made `evaluate` call the store corrupt and advise
    --overwrite, and `predict --overwrite` then deleted the layer without a word (only scene stores listed their
    own arrays). A prediction store's layers are now the user's too: read beside it, never deleted."""
    import numpy as np
    import zarr
    from predict_fixtures import save_pointwise, write_test_scene

    from tilefuse import storage
    from tilefuse.prediction import open_prediction

    scene = write_test_scene(tmp_path / "scene.zarr", 40, 40)
    checkpoint = save_pointwise(tmp_path / "ckpt")
    pred = tmp_path / "p.zarr"
    args = ["predict", "--checkpoint", str(checkpoint), "--store", str(scene), "--out", str(pred), "--tile", "32", "--probs"]
    assert main(args) == 0
    layer = zarr.open_group(pred, mode="r+").create_array("entropy", shape=(40, 40), chunks=(20, 20), dtype="float32", dimension_names=("y", "x"))
    layer[:20] = np.ones((20, 40))
    storage.consolidate(pred)
    capsys.readouterr()
    assert main(["evaluate", str(pred), "--labels", str(scene)]) in (0, 2)
    assert "corrupt" not in capsys.readouterr().err
    assert open_prediction(pred)["entropy"].shape == (40, 40)
    before = _tree(pred)
    assert main([*args, "--overwrite"]) == 2
    err = _one_line(capsys)
    assert "entropy" in err and "did not write" in err, err
    assert _tree(pred) == before
    assert main([*args[:6], str(tmp_path / "q.zarr"), *args[7:]]) == 0
    assert main([*args[:6], str(tmp_path / "q.zarr"), *args[7:], "--overwrite"]) == 0  # its own arrays only


def test_paths_the_api_returns_are_absolute_and_survive_a_chdir(tmp_path, monkeypatch):
    """synth, export (and ingest, from_xarray, train) returned the path as typed: after os.chdir into another
    project, open_scene(store) silently read that project's scene.zarr."""
    import tilefuse

    for project in ("a", "b"):
        (tmp_path / project).mkdir()
    monkeypatch.chdir(tmp_path / "b")
    tilefuse.synth("scene.zarr", 32, seed=1)
    monkeypatch.chdir(tmp_path / "a")
    store = tilefuse.synth("scene.zarr", 32, seed=2)
    assert store.is_absolute() and store == tmp_path / "a" / "scene.zarr"
    monkeypatch.chdir(tmp_path / "b")
    assert tilefuse.open_scene(store).encoding["source"] == str(tmp_path / "a" / "scene.zarr")


def test_a_store_replaced_into_the_same_inode_is_still_told_from_the_one_opened(tmp_path, monkeypatch):
    """A store replaced twice can get its first folder's freed inode back: a Dataset opened before then read the
    new store's chunks (same shapes, checksums intact) under the old one's coordinates and attrs, without a word.
    (The filesystem's inode reuse is forced here by reporting one inode for the store folder.)"""
    import os as os_module

    import numpy as np

    import tilefuse
    from tilefuse import storage

    store = tmp_path / "s.zarr"
    real_stat = os_module.stat

    def same_inode(path, *args, **kwargs):
        info = real_stat(path, *args, **kwargs)
        if os_module.path.abspath(path) == str(store):
            return os_module.stat_result((info.st_mode, 4242, 7, *tuple(info)[3:]))  # inode 4242, device 7, always
        return info

    monkeypatch.setattr(storage.os, "stat", same_inode)
    tilefuse.synth(store, 32, seed=1)
    opened = tilefuse.open_scene(store)
    first = opened["optical"][:, :8, :8].values
    tilefuse.synth(store, 32, seed=2, overwrite=True)
    with pytest.raises(InputError, match="was replaced while it was read"):
        opened["optical"][:, 8:16, 8:16].values
    assert not np.array_equal(first, tilefuse.open_scene(store)["optical"][:, :8, :8].values)


def test_a_dataset_whose_store_was_replaced_is_named_as_such(tmp_path):
    """A Dataset kept in a notebook while its store was rewritten (synth/ingest --overwrite) was refused by
    predict as 'an xarray Dataset changed since it was opened': the Dataset had not changed, its store had."""
    from predict_fixtures import make_scene, save_pointwise, write_test_scene

    import tilefuse
    from tilefuse.scene import write_scene

    store = write_test_scene(tmp_path / "s.zarr", 40, 40, seed=1)
    opened = tilefuse.open_scene(store)
    write_scene(make_scene(40, 40, seed=2), store, chunk=64, shard=None, overwrite=True)
    with pytest.raises(InputError, match=r"^store= is a Dataset opened from .*s\.zarr, which was replaced since .*open it again \(tilefuse\.open_scene\)"):
        tilefuse.predict(save_pointwise(tmp_path / "ckpt"), opened, tmp_path / "p.zarr", tile=32, progress=False)
    assert not (tmp_path / "p.zarr").exists()
