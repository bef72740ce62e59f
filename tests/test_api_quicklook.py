"""tilefuse.quicklook_scene / quicklook_labels from a notebook: a slip is one InputError line naming the parameter."""

from __future__ import annotations

import numpy as np
import pytest

from test_sampling import labelled_scene, write
from tilefuse.errors import InputError
from tilefuse.quicklook import quicklook_labels, quicklook_scene
from tilefuse.scene import open_scene


@pytest.fixture
def scene(tmp_path):
    return open_scene(write(labelled_scene(64, 64), tmp_path / "s.zarr"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(modality="nope"), r"^modality='nope' is not a modality of the scene \(it has optical, sar\)"),
        (dict(modality="label"), r"^modality='label' is not a modality of the scene"),
        (dict(bands=["nope"]), r"^bands= names band 'nope', which optical does not have \(it has 0, 1, 2\)"),
        (dict(bands=[10]), r"^bands= names band 10, which optical does not have"),
        (dict(bands=[-4]), r"^bands= names band -4, which optical does not have"),
        (dict(bands=[True]), r"^bands= names band True, which optical does not have"),
        (dict(bands=[0, 1, 2, 0]), r"^bands= must name 1 to 3 bands of optical, got 4"),
        (dict(bands=[]), r"^bands= must name 1 to 3 bands of optical, got 0"),
        (dict(max_size=0), r"^max_size= must be a whole number of px >= 1"),
    ],
)
def test_a_scene_quicklooks_slips_are_one_line(scene, tmp_path, change, message):
    """KeyError, ValueError, IndexError and ZeroDivisionError tracebacks before; no PNG is left."""
    with pytest.raises(InputError, match=message) as error:
        quicklook_scene(scene, tmp_path / "q.png", **change)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "q.png").exists()


def test_one_band_by_name_is_that_band_not_its_letters(scene, tmp_path):
    """bands="1" was read letter by letter (a ValueError for any longer name): a string names one band, drawn grey."""
    assert quicklook_scene(scene, tmp_path / "q.png", modality="sar", bands="1").is_file()
    assert quicklook_scene(scene, tmp_path / "q.png", bands=["2", 1, -3]).is_file()


def test_a_label_quicklooks_slips_are_one_line_and_class_names_default_to_the_maps(scene, tmp_path):
    with pytest.raises(InputError, match=r"^labels= must be a \(y, x\) xarray DataArray, got ndarray") as error:
        quicklook_labels(scene["label"].values, ["a"], tmp_path / "q.png")
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match=r"^labels= must be a \(y, x\) xarray DataArray, got one of dims \('optical_band', 'y', 'x'\)"):
        quicklook_labels(scene["optical"], ["a"], tmp_path / "q.png")
    with pytest.raises(InputError, match=r"^max_size= must be a whole number of px >= 1"):
        quicklook_labels(scene["label"], ["a"], tmp_path / "q.png", max_size=-3)
    assert not (tmp_path / "q.png").exists()
    assert quicklook_labels(scene["label"], None, tmp_path / "q.png").is_file()  # the map's own class_names (TypeError before)


def test_a_quicklook_path_written_as_a_folder_is_one_line(scene, tmp_path):
    """quicklook_scene(scene, "q/") wrote a PNG file named q, as the CLI's --quicklook q/ did."""
    for path in (str(tmp_path / "q") + "/", str(tmp_path) + "/.", tmp_path / ".."):
        with pytest.raises(InputError, match="names a folder, but this output is a file"):
            quicklook_scene(scene, path)
        with pytest.raises(InputError, match="names a folder, but this output is a file"):
            quicklook_labels(scene["label"], None, path)
    assert not (tmp_path / "q").exists()


def test_a_dataset_without_modalities_is_one_line_naming_the_labels_quicklook(tmp_path):
    """A prediction (or any Dataset with no modality) given to quicklook_scene was an IndexError traceback."""
    import xarray as xr

    for ds in (xr.Dataset(), xr.Dataset({"labels": (("y", "x"), np.zeros((4, 4), np.uint8))})):
        with pytest.raises(InputError, match=r"^scene= has no modality to draw .*quicklook_labels"):
            quicklook_scene(ds, tmp_path / "q.png")
