"""Paths a careless user types for `tilefuse synth | ingest | info`: each is taken as meant, or is one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tilefuse.cli import main
from tilefuse.scene import open_scene
from tilefuse.synthetic import synth_scene, write_geotiffs


@pytest.fixture(scope="module")
def tifs(tmp_path_factory) -> dict[str, Path]:
    return write_geotiffs(synth_scene((96, 80), seed=4, chunk=64), tmp_path_factory.mktemp("tifs"))


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def one_line(code: int, err: str, pattern: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tilefuse: error: "), (code, err)
    assert pattern in lines[0], lines[0]
    return lines[0]


URLS = ["s3://bucket/scene.zarr", "gs://bucket/scene.zarr", "file:///tmp/scene.zarr", "https://example.com/scene.zarr", "az://c/s.zarr"]


@pytest.mark.parametrize("url", URLS)
def test_a_url_is_one_line_and_nothing_is_written_locally(url, tifs, tmp_path, monkeypatch, capsys):
    """`tilefuse ingest s3://bucket/scene.zarr` wrote a local folder s3:/bucket/scene.zarr and said 'wrote' (the
    user believed it was in the bucket); `tilefuse info s3://...` read that local folder."""
    monkeypatch.chdir(tmp_path)
    before = tree(tifs["sar"].parent)
    commands = [
        ["ingest", url, "-m", f"sar={tifs['sar']}"],
        ["synth", url, "--size", 32],
        ["synth", tmp_path / "s.zarr", "--size", 32, "--geotiff", url],
        ["info", url],
        ["ingest", tmp_path / "s.zarr", "-m", f"sar={url.replace('.zarr', '.tif')}"],
        ["ingest", tmp_path / "s.zarr", "-m", f"sar={tifs['sar']}", "--labels", url.replace(".zarr", ".tif")],
    ]
    for args in commands:
        code, _, err = run_cli(args, capsys)
        one_line(code, err, "is a URL")
        assert list(tmp_path.iterdir()) == [], args
    assert tree(tifs["sar"].parent) == before


def test_tilde_is_the_home_folder_for_inputs_and_outputs(tifs, tmp_path, monkeypatch, capsys):
    """A quoted '~/scene.zarr' (or one given to the Python API) made a folder named '~' in the working folder."""
    import tilefuse

    home, work = tmp_path / "home", tmp_path / "work"
    (home / "in").mkdir(parents=True)
    work.mkdir()
    for name in ("sar", "optical", "label"):
        (home / "in" / f"{name}.tif").write_bytes(tifs[name].read_bytes())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    args = ["-m", "sar=~/in/sar.tif", "-m", "optical=~/in/optical.tif:1,2,3", "--labels", "~/in/label.tif"]
    code, out, err = run_cli(["ingest", "~/s.zarr", *args], capsys)
    assert code == 0, err
    assert run_cli(["synth", "~/t.zarr", "--size", 40, "--geotiff", "~/g"], capsys)[0] == 0
    tilefuse.ingest("~/api.zarr", {"sar": "~/in/sar.tif"}, "~/in/label.tif")
    assert list(work.iterdir()) == []  # no folder '~'
    assert sorted(p.name for p in home.iterdir()) == ["api.zarr", "g", "in", "s.zarr", "t.zarr"]
    expected = open_scene(home / "s.zarr")
    assert open_scene("~/s.zarr")["label"].equals(expected["label"])
    np.testing.assert_array_equal(open_scene(home / "api.zarr")["sar"].values, expected["sar"].values)
    code, out, err = run_cli(["info", "~/s.zarr", "--quicklook", "~/q.png"], capsys)
    assert code == 0 and "optical: 3 bands" in out and (home / "q.png").is_file(), err
    # an output spelled with ~ is still never an input spelled otherwise
    for spelling in (f"sar={home}/in/sar.tif", "sar=~/in/../in/sar.tif"):
        code, _, err = run_cli(["ingest", "~/in/sar.tif", "-m", spelling], capsys)
        one_line(code, err, "is the input")
    assert list(work.iterdir()) == []
    for args in (["ingest", "~nosuchuser1/s.zarr", "-m", "sar=~/in/sar.tif"], ["ingest", "x.zarr", "-m", "sar=~nosuchuser1/sar.tif"]):
        code, _, err = run_cli(args, capsys)
        one_line(code, err, "there is no user 'nosuchuser1' here to expand ~ to")
    assert list(work.iterdir()) == []


def test_info_on_a_store_being_written_says_so(tifs, tmp_path, capsys):
    """Until it is complete a store exists only as a hidden temporary: info said 'does not exist: check the path'."""
    from tilefuse.outputs import output_lock

    out = tmp_path / "s.zarr"
    with output_lock(out):  # what ingest holds while it writes
        code, _, err = run_cli(["info", out], capsys)
        one_line(code, err, "s.zarr is being written by process")
        with pytest.raises(Exception, match="being written"):
            open_scene(out)
    code, _, err = run_cli(["info", out], capsys)
    one_line(code, err, "does not exist")


def test_labels_holding_a_subset_of_the_named_classes_keep_every_name(tmp_path, capsys):
    """A chip holding classes 1 and 3 of five named ones: every name kept, absent ids counted 0; names for
    fewer ids than the labels hold are refused (the rest were named class_<id>)."""
    import rasterio

    profile = dict(driver="GTiff", width=32, height=24, count=1, dtype="uint8", crs="EPSG:32632",
                   transform=rasterio.Affine(10, 0, 500000, 0, -10, 5000000))  # fmt: skip
    labels = np.where(np.arange(32)[None, :] < 10, 1, 3).repeat(24, axis=0).astype(np.uint8)
    with rasterio.open(tmp_path / "l.tif", "w", **profile) as dst:
        dst.write(labels[None])
    with rasterio.open(tmp_path / "x.tif", "w", **dict(profile, dtype="float32")) as dst:
        dst.write(np.ones((1, 24, 32), np.float32))
    names = "water,trees,grass,crops,built"
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"opt={tmp_path}/x.tif", "--labels", tmp_path / "l.tif", "--class-names", names], capsys)
    assert code == 0, err
    attrs = open_scene(tmp_path / "s.zarr")["label"].attrs
    assert attrs["class_names"] == names.split(",") and attrs["class_counts"] == [0, 240, 0, 528, 0]
    for short in ("water,trees", "water,trees,grass"):
        code, _, err = run_cli(["ingest", tmp_path / "t.zarr", "-m", f"opt={tmp_path}/x.tif", "--labels", tmp_path / "l.tif", "--class-names", short], capsys)
        one_line(code, err, "the labels hold class id")
        assert not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize("role", ["modality", "labels"])
def test_a_truncated_input_raster_is_one_line_and_leaves_nothing(role, tifs, tmp_path, capsys):
    """A GeoTIFF cut short (an interrupted download or copy) opens, then its missing strips failed the read:
    a RasterioIOError traceback of 40 lines, exit status 1."""
    import rasterio

    cut = tmp_path / "in" / "cut.tif"
    cut.parent.mkdir()
    source = tifs["optical"] if role == "modality" else tifs["label"]
    with rasterio.open(source) as src:  # uncompressed strips, so the cut leaves a header that opens
        profile = dict(src.profile, tiled=False, compress=None, blockysize=1)
        profile.pop("blockxsize", None)
        with rasterio.open(cut, "w", **profile) as dst:
            dst.write(src.read())
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with rasterio.open(cut) as src:
        assert src.count >= 1  # the header is whole
    before = tree(cut.parent)
    args = ["-m", f"opt={cut}"] if role == "modality" else ["-m", f"sar={tifs['sar']}", "--labels", cut]
    code, _, err = run_cli(["ingest", tmp_path / "out" / "s.zarr", *args], capsys)
    one_line(code, err, "cut.tif cannot be read")
    assert "damaged or truncated" in err
    assert tree(cut.parent) == before
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_store_replaced_while_it_is_read_is_an_error_never_a_mix_of_two_scenes(tmp_path):
    """ingest/synth --overwrite renames a new store into place while a reader (info, training, predict, a
    notebook) has the old one open: the reader's later chunks came from the new scene, checksums intact, and
    two scenes' pixels were read as one without a word."""
    from tilefuse.errors import InputError
    from tilefuse.sampling import SceneReader
    from tilefuse.scene import write_scene
    from tilefuse import storage

    out = tmp_path / "s.zarr"
    write_scene(synth_scene(128, seed=1), out, chunk=64, shard=None)
    old = open_scene(out)
    group = storage.open_group(out)
    first = old["optical"][:, :64, :64].values  # read before the replacement: the old scene's
    write_scene(synth_scene(128, seed=2), out, chunk=64, shard=None, overwrite=True)
    for read in (lambda: old["optical"].values, lambda: group["optical"][:, 64:, 64:], lambda: old["label"][64:, :].values):
        with pytest.raises(InputError, match="s.zarr was replaced while it was read"):
            read()
    assert np.array_equal(open_scene(out)["optical"].values, synth_scene(128, seed=2)["optical"].values)
    assert first.shape == (6, 64, 64)


def test_synth_into_a_store_being_written_writes_no_geotiffs(tmp_path, capsys, monkeypatch):
    """Two `synth OUT --geotiff DIR` at once: the one that lost the race for OUT had written its GeoTIFFs (another
    seed's scene) before meeting OUT's lock; a failed store write left them too."""
    import threading

    from tilefuse.outputs import output_lock

    out = tmp_path / "s.zarr"
    held, release = threading.Event(), threading.Event()

    def other_writer():
        with output_lock(out):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=other_writer)
    thread.start()
    try:
        held.wait(30)
        code, _, err = run_cli(["synth", out, "--size", 48, "--geotiff", tmp_path / "g"], capsys)
        one_line(code, err, "is being written by process")
    finally:
        release.set()
        thread.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    import tilefuse.scene

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tilefuse.scene, "write_scene", fail)
    assert run_cli(["synth", out, "--size", 48, "--geotiff", tmp_path / "g"], capsys)[0] == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _netcdf(path: Path, source: Path, variables: list[str]) -> None:
    """A NetCDF of ``source``'s first bands, one variable each (as xarray writes a Dataset)."""
    import rioxarray
    import xarray as xr

    arr = rioxarray.open_rasterio(source)
    arr.attrs = {}  # band descriptions: tuples of strings netCDF3 cannot hold
    ds = xr.Dataset({v: arr.isel(band=k, drop=True).astype("float32") for k, v in enumerate(variables)})
    ds.rio.write_crs(arr.rio.crs).to_netcdf(path, engine="scipy")


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_netcdf_of_several_variables_ingests_one_variable_by_name(tifs, tmp_path, capsys):
    """DESIGN names NetCDF inputs, but one holding several variables (the usual kind) was refused as 'no raster
    bands: pass a raster file', and GDAL's name of one variable, NETCDF:file.nc:vv, as 'does not exist'."""
    nc = tmp_path / "in put" / "s1.nc"
    nc.parent.mkdir()
    _netcdf(nc, tifs["sar"], ["vv", "vh"])
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"sar={nc}"], capsys)
    line = one_line(code, err, "holds 2 variables (vv, vh)")
    assert f"NETCDF:{nc}:vv" in line
    assert not (tmp_path / "s.zarr").exists()
    reference = np.asarray(__import__("rasterio").open(tifs["sar"]).read(), np.float32)
    for spec in (f"NETCDF:{nc}:vh", f'NETCDF:"{nc}":vh', f"netcdf:{nc}:vh:1"):
        out = tmp_path / "s.zarr"
        code, _, err = run_cli(["ingest", out, "-m", f"sar={spec}", "--overwrite"], capsys)
        assert code == 0, (spec, err)
        np.testing.assert_array_equal(open_scene(out)["sar"].values[0], reference[1])
    code, _, err = run_cli(["ingest", tmp_path / "t.zarr", "-m", f"sar=NETCDF:{nc}:hh"], capsys)
    one_line(code, err, "has no variable 'hh' (it has vv, vh)")
    code, _, err = run_cli(["ingest", nc.parent / "x.zarr", "-m", f"sar=NETCDF:{nc}:vv"], capsys)  # beside it: fine
    assert code == 0, err
    code, _, err = run_cli(["ingest", nc, "-m", f"sar=NETCDF:{nc}:vv", "--overwrite"], capsys)  # onto it: never
    one_line(code, err, "is the input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in put", "s.zarr"]


@pytest.mark.parametrize("crs, resolution", [(None, "10"), ("EPSG:4326", "10"), ("EPSG:4326", "30")])
def test_a_resolution_in_the_wrong_units_is_named(tifs, tmp_path, capsys, crs, resolution):
    """Metres given for a grid in degrees (10 degrees for a chip of a few km): a grid of 1 x 1 px, refused as 'no
    valid pixel: check each modality's nodata value and bands', which names the wrong problem and fix."""
    import rasterio

    source = tifs["sar"]
    if crs is None:  # a lat/lon raster as the reference
        source = tmp_path / "in" / "ll.tif"
        source.parent.mkdir()
        with rasterio.open(tifs["sar"]) as src:
            profile = dict(src.profile, crs="EPSG:4326", transform=rasterio.Affine(9e-5, 0, 10.0, 0, -9e-5, 45.0))
            with rasterio.open(source, "w", **profile) as dst:
                dst.write(src.read())
    args = ["-m", f"sar={source}", "--resolution", resolution, *(["--crs", crs] if crs else [])]
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", *args], capsys)
    one_line(code, err, f"--resolution {resolution} is larger than the reference's whole extent")
    assert "degree" in err
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("tag", ["water,forest,crops", '"water"', '{"0": "water"}', "[0, 1]"])
def test_a_class_names_tag_that_is_no_list_of_names_is_one_line(tag, tifs, tmp_path, capsys):
    """A labels raster's class_names tag written by another tool: 'water,forest,crops' was a JSONDecodeError
    traceback, '"water"' five classes named by its letters, a dict its keys."""
    import rasterio

    labels = tmp_path / "in" / "labels.tif"
    labels.parent.mkdir()
    labels.write_bytes(tifs["label"].read_bytes())
    with rasterio.open(labels, "r+") as dst:
        dst.update_tags(class_names=tag)
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"sar={tifs['sar']}", "--labels", labels], capsys)
    one_line(code, err, "class_names tag of labels.tif is not a JSON list of names")
    assert not (tmp_path / "s.zarr").exists()
    with rasterio.open(labels) as src:
        count = int(src.read(1)[src.read(1) != 255].max()) + 1
    names = ",".join(f"c{k}" for k in range(count))
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"sar={tifs['sar']}", "--labels", labels, "--class-names", names], capsys)
    assert code == 0, err
    assert open_scene(tmp_path / "s.zarr")["label"].attrs["class_names"] == names.split(",")


@pytest.mark.parametrize("appears", ["folder", "file", "store"])
def test_something_put_at_the_output_while_it_is_written_is_never_deleted(appears, tmp_path, monkeypatch):
    """The output is checked before the write, then renamed into place at the end: a folder or file put there
    meanwhile (another tool writing to the same path, a user's copy) was moved aside and deleted."""
    import tilefuse.scene
    from tilefuse.errors import InputError
    from tilefuse.scene import write_scene

    out = tmp_path / "s.zarr"
    real, done = tilefuse.scene.consolidate, []

    def put_something_there(path):  # the last step before the rename
        if done:  # once, for the first writer only
            return real(path)
        done.append(path)
        if appears == "folder":
            out.mkdir()
            (out / "notes.txt").write_text("mine\n")
        elif appears == "file":
            out.write_text("mine\n")
        else:
            write_scene(synth_scene(32, seed=9), out)
        real(path)

    monkeypatch.setattr(tilefuse.scene, "consolidate", put_something_there)
    with pytest.raises(InputError, match="s.zarr"):
        write_scene(synth_scene(48, seed=1), out)
    if appears == "folder":
        assert (out / "notes.txt").read_text() == "mine\n"
    elif appears == "file":
        assert out.read_text() == "mine\n"
    else:
        monkeypatch.setattr(tilefuse.scene, "consolidate", real)
        assert open_scene(out).sizes["x"] == 32  # the other writer's store, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no temporary, no lock


def test_an_output_inside_a_tilefuse_store_is_refused(tifs, tmp_path, capsys):
    """`ingest scene.zarr/new.zarr` (or a quicklook, or GeoTIFFs) was written inside the store: a foreign entry
    from then on, so --overwrite of the store was refused for ever (and inside an array folder, among its chunks)."""
    scene = tmp_path / "scene.zarr"
    assert run_cli(["synth", scene, "--size", 40], capsys)[0] == 0
    before = tree(scene)
    for inner in (scene / "new.zarr", scene / "sar" / "new.zarr", scene / "sar" / "c" / "deep" / "new.zarr"):
        for argv in (
            ["ingest", inner, "-m", f"sar={tifs['sar']}"],
            ["synth", inner, "--size", 32],
            ["synth", tmp_path / "other.zarr", "--size", 32, "--geotiff", inner.with_suffix("")],
            ["info", scene, "--quicklook", inner.with_suffix(".png")],
        ):
            code, _, err = run_cli(argv, capsys)
            assert str(scene) in one_line(code, err, "lies inside the ")
    assert tree(scene) == before and sorted(p.name for p in tmp_path.iterdir()) == ["scene.zarr"]
    assert run_cli(["synth", scene, "--size", 40, "--overwrite", "--seed", 3], capsys)[0] == 0


def test_a_pipe_given_as_a_raster_is_one_line_not_a_hang(tifs, tmp_path, capsys):
    """A named pipe (or a shell's <(...) process substitution) as --modality or --labels: GDAL's open waited
    for a writer for ever; GDAL needs a file it can seek in."""
    import os

    fifo = tmp_path / "in" / "s1.tif"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    for args in (["-m", f"sar={fifo}"], ["-m", f"sar={tifs['sar']}", "--labels", fifo]):
        code, _, err = run_cli(["ingest", tmp_path / "s.zarr", *args], capsys)
        one_line(code, err, "is not a regular file")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_netcdf_whose_coordinates_lack_cf_attributes_names_the_fix(tifs, tmp_path, capsys):
    """xarray's to_netcdf writes x/y without the CF attributes GDAL reads a grid from: the file (CRS and all) was
    called 'not georeferenced: georeference it first, e.g. with gdalwarp'; the line now names the missing
    attributes and both fixes, and each fix ingests the same pixels."""
    import rioxarray
    import xarray as xr

    arr = rioxarray.open_rasterio(tifs["sar"]).astype("float32")
    arr.attrs = {}
    # as a computation leaves it: plain x/y coordinates, a CRS, no GeoTransform
    bare = xr.DataArray(arr.values, dims=arr.dims, coords={"y": arr.y.values, "x": arr.x.values}).rio.write_crs(arr.rio.crs)
    nc = tmp_path / "bare.nc"
    bare.rename("sar").to_netcdf(nc, engine="scipy")
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"sar={nc}"], capsys)
    one_line(code, err, "lack the CF attributes")
    assert "write_coordinate_system" in err and "from_xarray" in err and not (tmp_path / "s.zarr").exists()

    fixed = tmp_path / "fixed.nc"
    bare.rio.write_coordinate_system().rename("sar").to_netcdf(fixed, engine="scipy")
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"sar={fixed}"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(open_scene(tmp_path / "s.zarr")["sar"].values, arr.values)
    import tilefuse

    tilefuse.from_xarray(tmp_path / "x.zarr", {"sar": xr.open_dataset(nc, decode_coords="all")["sar"]})
    np.testing.assert_array_equal(open_scene(tmp_path / "x.zarr")["sar"].values, arr.values)


@pytest.mark.parametrize("bands", ["", ":2", ":2,1"])
def test_each_band_of_a_stack_keeps_its_own_nodata(tmp_path, capsys, bands):
    """A VRT stacking rasters of different nodata (gdalbuildvrt -separate) has one nodata value per band: only
    band 1's was applied, so band 2's -9999 was ingested as data in valid pixels (its band_mean -2494.5)."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    size, transform = 32, from_origin(500_000, 4_000_000, 10, 10)
    first = np.full((size, size), 5.0, np.float32)
    first[:, :8] = 0  # nodata 0: the left strip
    second = np.full((size, size), 7.0, np.float32)
    second[:8] = -9999  # nodata -9999: the top strip
    sources = ""
    for k, (name, data, nodata) in enumerate((("a.tif", first, 0), ("b.tif", second, -9999)), 1):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", height=size, width=size, count=1, dtype="float32",
                           crs="EPSG:32632", transform=transform, nodata=nodata) as dst:  # fmt: skip
            dst.write(data, 1)
        sources += (f'<VRTRasterBand dataType="Float32" band="{k}"><NoDataValue>{nodata}</NoDataValue><SimpleSource>'
                    f'<SourceFilename relativeToVRT="1">{name}</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>')  # fmt: skip
    (tmp_path / "stack.vrt").write_text(
        f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{CRS.from_epsg(32632).to_wkt()}</SRS>'
        f"<GeoTransform>{', '.join(map(str, transform.to_gdal()))}</GeoTransform>{sources}</VRTDataset>"
    )
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"m={tmp_path / 'stack.vrt'}{bands}"], capsys)
    assert code == 0, err
    scene = open_scene(tmp_path / "s.zarr")
    expected = {"": [5.0, 7.0], ":2": [7.0], ":2,1": [7.0, 5.0]}[bands]
    valid = np.ones((size, size), bool)
    if 5.0 in expected:
        valid[:, :8] = False
    if 7.0 in expected:
        valid[:8] = False
    np.testing.assert_array_equal(scene["valid"].values, valid)
    values = scene["m"].values
    for k, value in enumerate(expected):
        assert (values[k][valid] == value).all()
    np.testing.assert_allclose(scene["m"].attrs["band_mean"], expected)


@pytest.mark.parametrize("resampling", ["bilinear", "average", "cubic"])
def test_a_band_without_data_in_a_few_pixels_keeps_the_others_resampled_as_their_own(tmp_path, capsys, resampling):
    """GDAL masks a source pixel only where every band of a warp has no data: a NaN in one band of an RGB (its
    nodata 255 in 108 of 160,000 pixels) was taken as a value and spread over every output pixel it touched
    (11 % of the scene invalid at 10x coarser, bilinear). A stack resampled onto a coarser grid now gives what
    its bands give one by one, whatever holes the other bands have."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(3)
    fine, coarse = 120, 12
    bands = rng.integers(10, 200, (3, fine, fine)).astype(np.uint8)
    for k in range(3):  # a few nodata pixels, in other places in each band
        bands[k, rng.integers(0, fine, 40), rng.integers(0, fine, 40)] = 255
    profile = dict(driver="GTiff", height=fine, width=fine, dtype="uint8", crs="EPSG:32611", nodata=255,
                   transform=from_origin(500_000, 4_000_000, 1, 1))  # fmt: skip
    with rasterio.open(tmp_path / "rgb.tif", "w", count=3, **profile) as dst:
        dst.write(bands)
    for k in range(3):
        with rasterio.open(tmp_path / f"band{k}.tif", "w", count=1, **profile) as dst:
            dst.write(bands[k], 1)
    with rasterio.open(tmp_path / "ref.tif", "w", **dict(profile, height=coarse, width=coarse, count=1, dtype="float32", nodata=None,
                                                        transform=from_origin(500_000, 4_000_000, 10, 10))) as dst:  # fmt: skip
        dst.write(np.ones((1, coarse, coarse), np.float32))
    stack = ["-m", "ref=" + str(tmp_path / "ref.tif"), "-m", "rgb=" + str(tmp_path / "rgb.tif")]
    assert run_cli(["ingest", tmp_path / "stack.zarr", *stack, "--resampling", resampling], capsys)[0] == 0
    single = [arg for k in range(3) for arg in ("-m", f"b{k}={tmp_path / f'band{k}.tif'}")]
    assert run_cli(["ingest", tmp_path / "single.zarr", "-m", "ref=" + str(tmp_path / "ref.tif"), *single, "--resampling", resampling], capsys)[0] == 0
    together, alone = open_scene(tmp_path / "stack.zarr"), open_scene(tmp_path / "single.zarr")
    expected = np.stack([alone[f"b{k}"].values[0] for k in range(3)])
    np.testing.assert_array_equal(together["rgb"].values, expected)
    np.testing.assert_array_equal(together["valid"].values, alone["valid"].values)
    assert together["valid"].values.mean() > 0.95  # 120 holes among 14,400 px, none alone filling an output pixel
