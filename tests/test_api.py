import importlib

import tilefuse

COMMAND_FUNCTIONS = ["synth", "ingest", "info", "train", "predict", "evaluate", "export"]


def test_api_mirrors_the_commands_and_stays_callable_after_engine_imports():
    # importing every engine module must not shadow an API function with a module of the same name
    for module in ["synthetic", "rasters", "quicklook", "inference", "prediction", "training", "metrics", "sampling"]:
        importlib.import_module(f"tilefuse.{module}")
    for name in COMMAND_FUNCTIONS:
        function = getattr(tilefuse, name)
        assert callable(function) and function.__module__ == f"tilefuse.pipelines.{name}", name
    assert callable(tilefuse.open_scene) and callable(tilefuse.wrap_module)


def test_datasets_tilefuse_opened_stand_for_their_stores_and_anything_else_is_one_line(tmp_path):
    """A notebook passes what tilefuse.predict / open_prediction returned on to evaluate and export, and one store
    to train as itself: these were TypeError tracebacks ('expected str, bytes or os.PathLike object, not Dataset'),
    and train('m', 'a.zarr', ...) trained on stores 'a', '.', 'z'... ('store .../a is given twice')."""
    import numpy as np
    import pytest
    import rasterio
    from predict_fixtures import save_pointwise, write_test_scene
    from test_sampling import labelled_scene, write

    import test_training  # noqa: F401  (registers test-seg)
    from tilefuse.errors import InputError

    labelled = write(labelled_scene(64, 64), tmp_path / "labelled.zarr")
    scene = write_test_scene(tmp_path / "scene.zarr", 64, 48, seed=1)
    settings = dict(tile=32, overlap=8, progress=False)
    checkpoint = save_pointwise(tmp_path / "pointwise")
    returned = tilefuse.predict(checkpoint, scene, tmp_path / "pred.zarr", **settings)
    assert tilefuse.open_prediction(returned).identical(returned)
    for prediction in (returned, tilefuse.open_prediction(tmp_path / "pred.zarr"), str(tmp_path / "pred.zarr"), tmp_path / "pred.zarr"):
        out = tilefuse.export(prediction, tmp_path / f"{len(list(tmp_path.glob('*.tif')))}.tif", progress=False)
        with rasterio.open(out) as tif:
            assert np.array_equal(tif.read(1), returned["labels"].values)

    run = tilefuse.train("test-seg", labelled, tmp_path / "run", steps=1, batch_size=2, patch_size=32, workers=0, progress=False)
    assert tilefuse.evaluate(tilefuse.predict(run, labelled, tmp_path / "p2.zarr", **settings), labelled) == tilefuse.evaluate(
        tmp_path / "p2.zarr", labelled
    )

    changed = [returned.isel(x=slice(0, 10)), returned.load(), returned + 0, returned[["labels"]], 3, None, np.zeros((4, 4))]
    for value in changed:
        for call, param in ((lambda v: tilefuse.export(v, tmp_path / "x.tif", progress=False), "prediction"),
                            (lambda v: tilefuse.evaluate(v, labelled), "prediction"),
                            (tilefuse.open_prediction, "path"),
                            (lambda v: tilefuse.evaluate(tmp_path / "p2.zarr", v), "labels"),
                            (lambda v: tilefuse.predict(checkpoint, v, tmp_path / "x.zarr", **settings), "store")):
            with pytest.raises(InputError, match=rf"^{param}= is ") as error:
                call(value)
            assert "\n" not in str(error.value)
    assert not (tmp_path / "x.tif").exists() and not (tmp_path / "x.zarr").exists()


def test_a_tilde_is_the_home_folder_for_every_path_of_the_api(tmp_path, monkeypatch):
    """ingest took '~/x' as the home folder but predict, export and train refused it ('starts with ~, which is not
    expanded here') and a checkpoint '~/run' 'did not exist': a notebook's paths (or the shell's --out=~/x, which
    bash leaves as it is) now mean the same everywhere, and no folder named ~ is made."""
    import numpy as np
    from predict_fixtures import save_pointwise, write_test_scene
    from test_sampling import labelled_scene, write

    import test_training  # noqa: F401  (registers test-seg)
    from tilefuse.cli import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    write_test_scene(home / "scene.zarr", 48, 40, seed=2)
    write(labelled_scene(64, 64), home / "labelled.zarr")
    save_pointwise(home / "pointwise")
    settings = dict(tile=32, overlap=8, progress=False)
    labels = tilefuse.predict("~/pointwise", "~/scene.zarr", "~/pred.zarr", quicklook="~/pred.png", **settings)["labels"].values
    assert np.array_equal(tilefuse.open_prediction(home / "pred.zarr")["labels"].values, labels) and (home / "pred.png").is_file()
    assert tilefuse.export("~/pred.zarr", "~/pred.tif", progress=False) == home / "pred.tif"
    tilefuse.train("test-seg", ["~/labelled.zarr"], "~/run", steps=1, batch_size=2, patch_size=32, workers=0, progress=False)
    tilefuse.predict("~/run", "~/labelled.zarr", "~/p2.zarr", **settings)
    assert tilefuse.evaluate("~/p2.zarr", "~/labelled.zarr", split="~/run", subset="val")["pixels"] > 0
    assert main(["evaluate", str(home / "p2.zarr"), "--labels", str(home / "labelled.zarr"), "--out=~/m.json"]) == 0
    assert (home / "m.json").is_file() and (home / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "~").exists()


def test_scene_datasets_open_scene_returned_stand_for_their_stores(tmp_path):
    """open_scene's Dataset is what a notebook explores and passes on: predict(store=), train(stores=) and
    evaluate(labels=) take it as its store (it was refused: open_scene recorded no source), a changed one is
    still one line, and a missing store's message names the kind of store and the command that writes it."""
    import numpy as np
    import pytest
    from predict_fixtures import save_pointwise, write_test_scene
    from test_sampling import labelled_scene, write

    import test_training  # noqa: F401  (registers test-seg)
    from tilefuse.errors import InputError

    settings = dict(tile=32, overlap=8, progress=False)
    scene = write_test_scene(tmp_path / "scene.zarr", 48, 40, seed=3)
    labelled = write(labelled_scene(64, 64), tmp_path / "labelled.zarr")
    checkpoint = save_pointwise(tmp_path / "pointwise")
    opened = tilefuse.open_scene(scene)
    by_dataset = tilefuse.predict(checkpoint, opened, tmp_path / "a.zarr", **settings)["labels"].values
    by_path = tilefuse.predict(checkpoint, scene, tmp_path / "b.zarr", **settings)["labels"].values
    assert np.array_equal(by_dataset, by_path)
    run = tilefuse.train("test-seg", tilefuse.open_scene(labelled), tmp_path / "run", steps=1, batch_size=2, patch_size=32, workers=0, progress=False)
    tilefuse.predict(run, labelled, tmp_path / "p.zarr", **settings)
    assert tilefuse.evaluate(tmp_path / "p.zarr", tilefuse.open_scene(labelled)) == tilefuse.evaluate(tmp_path / "p.zarr", labelled)
    with pytest.raises(InputError, match=r"^store= is an xarray Dataset changed"):
        tilefuse.predict(checkpoint, opened.isel(x=slice(0, 16)), tmp_path / "x.zarr", **settings)
    import xarray as xr

    plain = xr.open_zarr(scene, decode_coords="all")  # unchanged, but its reads are not verified: was "changed"
    with pytest.raises(InputError, match=r"^store= is an xarray Dataset opened from .* by plain xarray.*tilefuse\.open_scene"):
        tilefuse.predict(checkpoint, plain, tmp_path / "x.zarr", **settings)
    assert not (tmp_path / "x.zarr").exists()
    for open_, kind in ((tilefuse.open_scene, "a scene store is written by `tilefuse ingest`"), (tilefuse.open_prediction, "a prediction store is written by `tilefuse predict`")):
        with pytest.raises(InputError, match=rf"does not exist: check the path \({kind}"):
            open_(tmp_path / "missing.zarr")
