"""The Python API answers arguments of the wrong type with one InputError naming the parameter."""

import pytest

import tilefuse
from tilefuse.errors import InputError
from tilefuse.synthetic import synth_scene


@pytest.fixture(scope="module")
def tifs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tilefuse.synth(root / "s.zarr", 48, geotiff=root / "g")
    return root


def test_arguments_of_the_wrong_type_are_one_input_error_naming_the_parameter(tifs, tmp_path):
    """Each was a TypeError/AttributeError/ValueError traceback (os.fspath of None, list.values(), int('x'),
    unpacking a 1-tuple, math.isfinite('x')), or (class_names='a,b') the string read one name per character."""
    g = tifs / "g"
    sar, labels = {"sar": str(g / "sar.tif")}, str(g / "label.tif")
    out = tmp_path / "i.zarr"
    calls = {
        "store": lambda: tilefuse.info(None),
        "quicklook": lambda: tilefuse.info(tifs / "s.zarr", quicklook=5),
        "output": lambda: tilefuse.synth(None, 32),
        "size=": lambda: tilefuse.synth(out, (32,)),
        "GeoTIFF folder": lambda: tilefuse.write_geotiffs(synth_scene(32), None),
        "modalities=": lambda: tilefuse.ingest(out, [f"sar={g / 'sar.tif'}"]),
        "modality 'sar'": lambda: tilefuse.ingest(out, {"sar": None}),
        "labels=": lambda: tilefuse.ingest(out, sar, labels=5),
        "resolution=": lambda: tilefuse.ingest(out, sar, resolution="x"),
        "class_names=": lambda: tilefuse.ingest(out, sar, labels=labels, class_names="a,b"),
        "label_map=": lambda: tilefuse.ingest(out, sar, labels=labels, label_map={1: "x"}),
    }
    for name, call in calls.items():
        with pytest.raises(InputError, match=name):
            call()
    with pytest.raises(InputError, match="modalities="):
        tilefuse.ingest_rasters(["x"])
    with pytest.raises(InputError, match="resolution="):
        tilefuse.ingest(out, sar, resolution=(10, 10, 10))
    for flag in (True, (True, 10)):  # True was read as 1.0: a 10 m scene written at 1 m, 100 times the pixels
        with pytest.raises(InputError, match="resolution="):
            tilefuse.ingest(out, sar, resolution=flag)
    assert list(tmp_path.iterdir()) == []
    # the right types still work: a label_map mapping, a resolution pair
    tilefuse.ingest(out, sar, labels=labels, label_map={0: 255}, resolution=(20, 20))
    assert tilefuse.open_scene(out).sizes["x"] == 24


class _PathLike:
    def __init__(self, value):
        self.value = value

    def __fspath__(self):
        return self.value


@pytest.mark.parametrize("value", [b"s.zarr", None, 5])
def test_a_path_like_that_gives_no_text_is_one_input_error(tifs, tmp_path, value):
    """An os.PathLike whose __fspath__ gives bytes was a TypeError traceback ('cannot use a string pattern on a
    bytes-like object') in every command; one giving None a TypeError from os.fspath."""
    odd = _PathLike(value)
    for what, call in {
        "store": lambda: tilefuse.open_scene(odd),
        "output": lambda: tilefuse.synth(odd, 32),
    }.items():
        with pytest.raises(InputError, match=f"^{what} must be a path given as text, got _PathLike"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_the_root_folder_as_an_output_is_one_line(tmp_path, monkeypatch):
    """'/' has no parent folder: the output-name check raised StopIteration (a traceback, exit 1) in synth,
    ingest, train, predict and demo."""
    monkeypatch.chdir(tmp_path)
    for call in (lambda: tilefuse.synth("/", 32), lambda: tilefuse.synth(tmp_path / "s.zarr", 32, geotiff="/")):
        with pytest.raises(InputError, match=r"output / |input /:"):
            call()
