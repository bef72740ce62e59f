"""`tilefuse synth | ingest | info` through the CLI: the happy path and every bad input of the issue."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from tilefuse.cli import main
from tilefuse.scene import open_scene
from tilefuse.synthetic import synth_scene, write_geotiffs


@pytest.fixture(scope="module")
def tifs(tmp_path_factory) -> dict[str, Path]:
    """Small synthetic GeoTIFFs plus a few broken or misplaced rasters made from them."""
    folder = tmp_path_factory.mktemp("tifs")
    paths = write_geotiffs(synth_scene((256, 240), seed=2, chunk=128), folder)
    with rasterio.open(paths["sar"]) as src:
        profile, data = src.profile, src.read()
    far = dict(profile, transform=Affine(10, 0, 900_000, 0, -10, 1_000_000))  # 600 km east
    with rasterio.open(folder / "far.tif", "w", **far) as dst:
        dst.write(data)
    no_crs = {k: v for k, v in profile.items() if k != "crs"}
    with rasterio.open(folder / "nocrs.tif", "w", **no_crs) as dst:
        dst.write(data)
    complex_profile = dict(profile, dtype="complex64", count=1, nodata=None)
    with rasterio.open(folder / "slc.tif", "w", **complex_profile) as dst:
        dst.write((data[0] + 1j * data[1]).astype(np.complex64)[None])
    with rasterio.open(paths["label"]) as src:
        label_profile, label = src.profile, src.read(1)
    with rasterio.open(folder / "bigids.tif", "w", **dict(label_profile, dtype="int16", nodata=None)) as dst:
        dst.write(np.where(label == 1, 300, label.astype(np.int16))[None])  # class 1 numbered 300
    with rasterio.open(folder / "infids.tif", "w", **dict(label_profile, dtype="float32", nodata=None)) as dst:
        dst.write(np.where(label == 1, np.inf, label.astype(np.float32))[None])  # class 1 made +inf
    with rasterio.open(folder / "unlabelled.tif", "w", **dict(label_profile, dtype="int16", nodata=None)) as dst:
        dst.write(np.full_like(label, -1, dtype=np.int16)[None])  # every pixel -1: ignore
    with rasterio.open(folder / "allnan.tif", "w", **dict(profile, nodata=None)) as dst:
        dst.write(np.full_like(data, np.nan))
    (folder / "notes.tif").write_text("not a raster\n")
    return {**paths, **{p.stem: p for p in folder.glob("*.tif")}}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_synth_ingest_info_round_trip(tmp_path, capsys):
    code, out, err = run_cli(["synth", tmp_path / "s.zarr", "--size", 200, "--seed", 3, "--geotiff", tmp_path / "g"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [".tilefuse-output", "label.tif", "optical.tif", "sar.tif"]
    g = tmp_path / "g"
    code, out, err = run_cli(
        ["ingest", tmp_path / "i.zarr", "-m", f"optical={g}/optical.tif", "-m", f"sar={g}/sar.tif", "--labels", f"{g}/label.tif"],
        capsys,
    )
    assert code == 0, err
    synthetic, ingested = open_scene(tmp_path / "s.zarr"), open_scene(tmp_path / "i.zarr")
    for name in ("optical", "sar", "valid", "label"):
        np.testing.assert_array_equal(ingested[name].values, synthetic[name].values)
    assert ingested["label"].attrs["class_names"] == synthetic["label"].attrs["class_names"]
    assert ingested["optical"].attrs["band_mean"] == pytest.approx(synthetic["optical"].attrs["band_mean"], rel=1e-6)
    code, out, err = run_cli(["info", tmp_path / "i.zarr", "--quicklook", tmp_path / "q.png"], capsys)
    assert code == 0 and "optical: 6 bands" in out and "grassland" in out and (tmp_path / "q.png").stat().st_size > 0


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("synth", "ingest", "info"))
    assert main(["ingest", "--help"]) == 0 and "--label-map" in capsys.readouterr().out


BAD_INPUTS = {
    "missing file": (["-m", "sar=/nonexistent/s1.tif"], "does not exist"),
    "not a raster": (["-m", "sar={notes}"], "not a raster GDAL can read"),
    "no crs": (["-m", "sar={nocrs}"], "has no CRS: pass --crs"),
    "no overlap": (["-m", "sar={sar}", "-m", "optical={far}"], "does not overlap"),
    "labels elsewhere": (["-m", "sar={sar}", "--labels", "{far}:1"], "labels: far.tif does not overlap"),
    "labels with bands": (["-m", "sar={sar}", "--labels", "{optical}"], "has 6 bands: choose one with PATH:N"),
    "band out of range": (["-m", "optical={optical}:1,7"], "band 7 is out of range"),
    "complex sar": (["-m", "sar={slc}"], "complex SAR .* --complex magnitude"),
    "bad modality": (["-m", "{sar}"], "bad --modality"),
    "twice the same name": (["-m", "sar={sar}", "-m", "sar={optical}"], "given twice"),
    "bad label map": (["-m", "sar={sar}", "--labels", "{label}", "--label-map", "-1=255"], "bad --label-map"),
    "bad resampling": (["-m", "sar={sar}", "--resampling", "sideways"], "unknown --resampling"),
    "bad reference": (["-m", "sar={sar}", "--reference", "optical"], "--reference 'optical' is not a modality"),
    "bad crs": (["-m", "sar={sar}", "--crs", "EPSG:999999"], "--crs 'EPSG:999999' is not a CRS"),
    # evaluate keys its metrics by class name: two ids named alike lost one class's scores
    "a class name twice": (["-m", "sar={sar}", "--labels", "{label}", "--class-names", "water,forest,water"], "classes 0 and 2 the same name 'water'"),
    # a reflectance band given as labels was rounded to a few plausible class ids
    "labels that are no class ids": (["-m", "sar={sar}", "--labels", "{optical}:1"], "optical.tif holds values that are not class ids"),
    # a class id above 255 became 255 (ignore), like nodata: the whole class was dropped without a word
    "a label id above 255": (["-m", "sar={sar}", "--labels", "{bigids}"], r"bigids.tif holds class id 300, above 254 .* --label-map 300:ID"),
    # +inf became 255 (ignore) without a word, with numpy's 'invalid value' warnings on stderr
    "a label of +inf": (["-m", "sar={sar}", "--labels", "{infids}"], r"infids.tif holds \+inf, not a class id"),
    # the store was written, valid False everywhere, band statistics of nothing
    "a modality without data": (["-m", "sar={sar}", "-m", "optical={allnan}"], "out.zarr: the scene has no valid pixel"),
    "an empty class name": (["-m", "sar={sar}", "--labels", "{label}", "--class-names", "water,,crops"], "leave class 1 without a name"),
    # PATH:2-1 is an empty range, and no band meant every band: the whole raster was ingested without a word
    "a reversed band range": (["-m", "optical={optical}:3-1"], r"band range 3-1 .* write 1-3"),
    "a range past the bands": (["-m", "optical={optical}:5-9"], "band 7 is out of range"),
    # two bands named alike in one modality: a band coordinate with a duplicate, the same data twice
    "a band twice": (["-m", "optical={optical}:1,2,1"], "band 1 is given twice"),
    "a band twice in a range": (["-m", "optical={optical}:1-3,2"], "band 2 is given twice"),
    "labels band twice": (["-m", "sar={sar}", "--labels", "{label}:1,1"], "band 1 is given twice"),
    # label options without labels were dropped without a word
    "class names without labels": (["-m", "sar={sar}", "--class-names", "water,forest"], "--class-names .* --labels"),
    "label map without labels": (["-m", "sar={sar}", "--label-map", "-1:255"], "--label-map .* --labels"),
    # names for fewer ids than the labels hold: the others were named class_<id> without a word (names meant for
    # ids 1..K went to ids 0..K-1)
    # id 255 means ignore: a 256th name made the ignored pixels a class (class_counts[255], the ignore count)
    "256 class names": (["-m", "sar={sar}", "--labels", "{label}", "--class-names", ",".join(f"c{k}" for k in range(256))], r"name 256 classes, more than 255 \(ids 0\.\.254"),
    # the last of two targets won without a word
    "a label mapped twice": (["-m", "sar={sar}", "--labels", "{label}", "--label-map", "1:2,3:4,1:5"], "label 1 is mapped twice .1:2 and 1:5."),
    # the array folder is named after it: 'cannot write out.zarr: File name too long: choose another output'
    "a modality name of 260 characters": (["-m", "s" * 260 + "={sar}"], "is 260 characters long: use a short NAME"),
    # the store looked complete, its labels all ignore: '0 classes', and training found nothing to learn from
    "labels without a labelled pixel": (["-m", "sar={sar}", "--labels", "{unlabelled}"], r"unlabelled.tif has no labelled pixel"),
    "labels all remapped to ignore": (["-m", "sar={sar}", "--labels", "{label}", "--label-map", ",".join(f"{k}:255" for k in range(8))], "has no labelled pixel"),
    "class names for fewer ids": (["-m", "sar={sar}", "--labels", "{label}", "--class-names", "water,forest"], r"class id 2 and more but the 2 class names name ids 0..1 only"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tifs, tmp_path, capfd):
    """(capfd: what GDAL or PROJ print themselves counts too; --crs EPSG:999999 printed PROJ's 'crs not found' first.)"""
    args, message = BAD_INPUTS[case]
    folder = tifs["sar"].parent
    before = digest(folder)
    code, out, err = run_cli(["ingest", tmp_path / "out.zarr", *[a.format(**tifs) for a in args]], capfd)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tilefuse: error: "), err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []  # no store, no temporary
    assert digest(folder) == before


def test_label_ids_above_255_ingest_once_remapped(tifs, tmp_path, capsys):
    code, _, err = run_cli(["ingest", tmp_path / "l.zarr", "-m", f"sar={tifs['sar']}", "--labels", tifs["bigids"], "--label-map", "300:1"], capsys)
    assert code == 0, err
    with rasterio.open(tifs["label"]) as src:
        np.testing.assert_array_equal(open_scene(tmp_path / "l.zarr")["label"].values, src.read(1))


def test_existing_output_refused_then_replaced_with_overwrite(tifs, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert run_cli(["ingest", out, "-m", f"sar={tifs['sar']}"], capsys)[0] == 0
    before = digest(out / "sar" / "c") if (out / "sar" / "c").exists() else None
    code, _, err = run_cli(["ingest", out, "-m", f"sar={tifs['optical']}:1,2"], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert list(open_scene(out)["sar"].sar_band.values) == ["VV", "VH"]
    assert (digest(out / "sar" / "c") if before is not None else None) == before
    assert run_cli(["ingest", out, "-m", f"sar={tifs['optical']}:1,2", "--overwrite"], capsys)[0] == 0
    assert list(open_scene(out)["sar"].sar_band.values) == ["blue", "green"]


def test_complex_sar_taken_as_magnitude_when_asked(tifs, tmp_path, capsys):
    code, _, err = run_cli(["ingest", tmp_path / "c.zarr", "-m", f"sar={tifs['slc']}", "--complex", "magnitude"], capsys)
    assert code == 0, err
    with rasterio.open(tifs["slc"]) as src:
        expected = np.abs(src.read(1)).astype(np.float32)
    np.testing.assert_allclose(open_scene(tmp_path / "c.zarr")["sar"].values[0], expected, rtol=1e-6)


def test_no_crs_fixed_by_crs_option(tifs, tmp_path, capsys):
    code, _, err = run_cli(["ingest", tmp_path / "n.zarr", "-m", f"sar={tifs['nocrs']}", "--crs", "EPSG:32632"], capsys)
    assert code == 0, err
    assert open_scene(tmp_path / "n.zarr").rio.crs.to_epsg() == 32632


def test_interrupted_ingest_leaves_no_store(tifs, tmp_path, capsys, monkeypatch):
    import tilefuse.rasters

    real_read = tilefuse.rasters._read_block
    calls = []

    def read_then_interrupt(*args, block_info=None, **kwargs):  # dask passes block_info by name
        calls.append(1)
        if len(calls) == 2:  # the first block of the second modality
            raise KeyboardInterrupt
        return real_read(*args, block_info=block_info, **kwargs)

    out = tmp_path / "s.zarr"
    assert run_cli(["ingest", out, "-m", f"sar={tifs['sar']}"], capsys)[0] == 0
    monkeypatch.setattr(tilefuse.rasters, "_read_block", read_then_interrupt)
    args = ["-m", f"sar={tifs['optical']}:1,2", "-m", f"optical={tifs['optical']}", "--overwrite"]
    code, _, err = run_cli(["ingest", out, *args], capsys)
    assert code == 130 and len(calls) >= 2, (code, len(calls), err)
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temporary left
    assert list(open_scene(out)["sar"].sar_band.values) == ["VV", "VH"]  # the old store, whole
    calls.clear()
    code, _, err = run_cli(["ingest", tmp_path / "new.zarr", *args[:-1]], capsys)
    assert code == 130 and not (tmp_path / "new.zarr").exists()


def test_an_interrupted_command_says_one_line_and_nothing_more(tmp_path):
    """The console script after Ctrl-C: libraries cut mid-task printed more after "interrupted" (a half-made
    asyncio loop's __del__ traceback, "coroutine ... was never awaited", zarr's exit handler failing to join a
    thread the interrupt kept from starting), about one early Ctrl-C in ten. Stood in for here by an object
    whose __del__ fails as the interrupt unwinds, an unawaited coroutine and an exit handler that prints."""
    code = """
import atexit, os, signal, sys
import tilefuse.cli as cli

class HalfMade:
    def __del__(self):
        raise AttributeError("half-made event loop")

async def pending():
    pass

def app(args, standalone_mode):
    atexit.register(lambda: print("exit handler ran", file=sys.stderr))
    held, coroutine = HalfMade(), pending()
    os.kill(os.getpid(), signal.SIGINT)
    signal.pause()

cli.app = app
cli.entry()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr == "tilefuse: interrupted\n", (done.returncode, done.stderr)


def test_a_write_still_in_flight_when_interrupted_leaves_no_temporary(tmp_path):
    """Ctrl-C stops the main thread, not a write in flight (zarr's IO thread finishing a metadata write): it
    recreated the temporary store after it was removed (a hidden half-written store after about one early
    Ctrl-C of ingest in four)."""
    import threading

    from tilefuse.outputs import create

    def late_write(tmp):
        time.sleep(0.1)
        (tmp / "optical" / "c").mkdir(parents=True)

    with pytest.raises(KeyboardInterrupt):
        with create(tmp_path / "s.zarr", "scene") as tmp:
            tmp.mkdir()
            threading.Thread(target=late_write, args=(tmp,)).start()
            raise KeyboardInterrupt
    time.sleep(0.3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_killed_ingest_leaves_nothing_that_opens(tmp_path):
    """A hard kill mid-write leaves only a hidden temporary; the output path does not exist."""
    write_geotiffs(synth_scene(1536, seed=1), tmp_path / "g")
    out = tmp_path / "big.zarr"
    command = [sys.executable, "-m", "tilefuse.cli", "ingest", str(out), "-m", f"optical={tmp_path}/g/optical.tif",
               "-m", f"sar={tmp_path}/g/sar.tif"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not any(p.name.startswith(".big.zarr.tmp") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    with pytest.raises(Exception, match="does not exist"):
        open_scene(out)
    assert subprocess.run(command, capture_output=True).returncode == 0  # a rerun completes
    assert open_scene(out)["optical"].shape == (6, 1536, 1536)
