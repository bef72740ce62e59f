"""`tilefuse info` summaries and quicklook pictures."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from matplotlib.image import imread

from tilefuse import storage
from tilefuse.pipelines.info import describe, info, label_counts
from tilefuse.quicklook import class_colors, decimate, quicklook_labels, quicklook_scene
from tilefuse.scene import open_scene, write_scene
from tilefuse.synthetic import CLASS_NAMES, synth_scene


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_scene(synth_scene((300, 260), seed=4, chunk=128), tmp_path_factory.mktemp("info") / "s.zarr")


def test_describe_names_grid_modalities_and_classes(store):
    ds = open_scene(store)
    text = describe(ds)
    assert "300 x 260 px" in text and "EPSG:32632" in text and "resolution 10 x 10" in text
    assert "optical: 6 bands, float32 [blue, green, red, nir, swir1, swir2]" in text
    assert "sar: 2 bands, float32 [VV, VH]" in text and "BloscCodec" in text
    expected = np.bincount(ds["label"].values.ravel(), minlength=len(CLASS_NAMES))
    for i, name in enumerate(CLASS_NAMES):
        assert f"{i:3d} {name:<16} {expected[i]:>12d} px" in text
    assert f"valid      {ds['valid'].values.mean():.2%}" in text


def test_label_counts_without_stored_counts(store, tmp_path):
    ds = open_scene(store)
    expected = np.bincount(ds["label"].values.ravel(), minlength=len(CLASS_NAMES)).tolist()
    assert label_counts(ds) == expected
    copy = write_scene(ds, tmp_path / "old.zarr")
    attrs = zarr.open_group(copy, mode="r+")["label"].attrs
    del attrs["class_counts"]  # as in a store written before counts were recorded
    storage.consolidate(copy)  # (and recorded in the store's consolidated metadata, as such a store was written)
    assert label_counts(open_scene(copy)) == expected


def test_info_writes_a_quicklook(store, tmp_path):
    text = info(store, tmp_path / "q.png")
    assert text.startswith("size")
    picture = imread(tmp_path / "q.png")
    height, width = picture.shape[:2]
    assert width > 1.5 * height  # composite and label map side by side
    assert picture[..., :3].std() > 0.05


def test_decimate_bounds_the_picture():
    data = xr.DataArray(np.arange(3000 * 1000).reshape(3000, 1000), dims=("y", "x"))
    small = decimate(data, max_size=700)
    assert max(small.shape) <= 700
    np.testing.assert_array_equal(small.values, data.values[::5, ::5])
    assert decimate(data, max_size=5000).shape == data.shape


def test_decimate_draws_north_up_and_west_left():
    """A y-ascending array (sortby("y"), a bottom-up raster) was drawn upside down: its first row is the south."""
    north_up = xr.DataArray(np.arange(12).reshape(3, 4), dims=("y", "x"), coords={"y": [30.0, 20.0, 10.0], "x": [1.0, 2.0, 3.0, 4.0]})
    for flipped in (north_up.sortby("y"), north_up.sortby("x", ascending=False), north_up.sortby("y").sortby("x", ascending=False)):
        np.testing.assert_array_equal(decimate(flipped).values, north_up.values)
        np.testing.assert_array_equal(decimate(flipped, max_size=2).values, decimate(north_up, max_size=2).values)


def test_class_colors_fixed_and_distinct():
    colors = class_colors(40)
    assert len(colors) == 40 and len(set(colors)) == 40
    assert class_colors(6) == colors[:6]
    assert all(0 <= c <= 255 and isinstance(c, int) for rgb in colors for c in rgb)


def test_quicklook_labels_paints_each_class_in_its_colour(tmp_path):
    labels = np.zeros((120, 200), np.uint8)
    labels[:, 100:] = 2
    labels[:10] = 255
    path = quicklook_labels(xr.DataArray(labels, dims=("y", "x")), ["water", "forest", "urban"], tmp_path / "l.png")
    rgb = np.round(imread(path)[..., :3] * 255).astype(int)
    colours = class_colors(3)

    def pixels(colour):
        return int((rgb == np.array(colour)).all(-1).sum())

    assert pixels(colours[0]) > 1000 and pixels(colours[2]) > 1000
    assert pixels(colours[1]) == 0  # absent class: not drawn, not in the legend


def test_quicklook_scene_of_a_sar_only_scene(tmp_path):
    ds = synth_scene(200, seed=1)[["sar", "valid"]]
    path = quicklook_scene(ds, tmp_path / "sar.png", max_size=100)
    picture = imread(path)
    assert picture.shape[1] < 1.5 * picture.shape[0]  # one panel: no labels
    assert picture[..., :3].std() > 0.05


def test_a_quicklook_written_as_a_folder_is_one_line(store, tmp_path, capsys):
    """`--quicklook q/` wrote a PNG file named q."""
    from tilefuse.cli import main

    assert main(["info", str(store), "--quicklook", str(tmp_path / "q") + "/"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names a folder" in err, err
    assert not (tmp_path / "q").exists()


def test_a_quicklook_named_for_another_format_is_one_line(store, tmp_path, capsys):
    """`--quicklook q.jpg` wrote PNG bytes under a .jpg name."""
    from tilefuse.cli import main

    assert main(["info", str(store), "--quicklook", str(tmp_path / "q.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "name it q.png" in err, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".q", "q"))], "nothing written"
    assert main(["info", str(store), "--quicklook", str(tmp_path / "Q.PNG")]) == 0


def test_info_says_when_a_store_carries_no_checksums(store, tmp_path):
    """A store of an earlier release (no checksums, nothing promised): a removed chunk read as fill values, and
    info still said 'N chunks verified'."""
    from tilefuse.storage import FORMAT_ATTR

    assert "chunks verified" in info(store)
    copy = write_scene(open_scene(store), tmp_path / "old.zarr")
    del zarr.open_group(copy, mode="r+").attrs[FORMAT_ATTR]
    text = info(copy)
    assert "chunks verified" not in text and "not verifiable" in text, text


def test_a_quicklook_or_metrics_file_never_replaces_what_a_run_folder_holds(store, tmp_path, capsys):
    """`info --quicklook RUN/curves.png` (or predict's) replaced a run's training curves: they carried the
    quicklook's marker, so they counted as the quicklook's own earlier file. A run's files are the run's: a
    quicklook or an `evaluate --out` there is refused, and a resumed run still rewrites its curves."""
    import hashlib

    import tilefuse
    from tilefuse.cli import main

    run = tilefuse.train("pad", store, tmp_path / "run", steps=2, batch_size=2, patch_size=32, hparams={"preset": "micro"},
                         workers=0, val_fraction=0.0, progress=False)  # fmt: skip

    def files():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}

    before = files()
    for args in (["info", str(store), "--quicklook", str(run / "curves.png")],
                 ["info", str(store), "--quicklook", str(run / "metrics.json")]):  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"part of the tilefuse run folder {run}" in err, err
    assert files() == before
    (run / "curves.png").unlink()  # a resume of the finished run writes its curves again, over its own file too
    for _ in range(2):
        tilefuse.train("pad", store, run, steps=2, batch_size=2, patch_size=32, hparams={"preset": "micro"},
                       workers=0, val_fraction=0.0, progress=False, resume=True)  # fmt: skip
        assert imread(run / "curves.png").ndim == 3
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]
