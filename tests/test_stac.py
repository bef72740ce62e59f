"""`ingest --stac`: STAC Items/ItemCollections over local GeoTIFFs equal ``ingest`` of the same rasters."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import rasterio
from affine import Affine

pystac = pytest.importorskip("pystac")

from test_ecosystem import DATES, OPTICAL_T, SIZE, UTM, assert_same_scene, composite, optical, sar, sar_grid, write_tif  # noqa: E402

from tilefuse.cli import main  # noqa: E402
from tilefuse.ecosystem import from_xarray as tilefuse_from_xarray  # noqa: E402
from tilefuse.errors import InputError  # noqa: E402
from tilefuse.pipelines.ingest import ingest  # noqa: E402
from tilefuse.scene import open_scene  # noqa: E402

BBOX = [9.0, 45.0, 9.1, 45.1]


def item(item_id: str, when, assets: dict) -> "pystac.Item":
    out = pystac.Item(
        id=item_id,
        geometry={"type": "Polygon", "coordinates": [[[9.0, 45.0], [9.1, 45.0], [9.1, 45.1], [9.0, 45.1], [9.0, 45.0]]]},
        bbox=BBOX,
        datetime=when.to_pydatetime(),
        properties={},
    )
    for key, href in assets.items():
        out.add_asset(key, pystac.Asset(href=str(href), media_type=pystac.MediaType.COG))
    return out


def save(path, items) -> str:
    doc = items[0].to_dict() if len(items) == 1 else pystac.ItemCollection(items).to_dict()
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Three dates of optical (one 3-band file and one file per band) and SAR, labels; hrefs relative."""
    root = tmp_path_factory.mktemp("stac")
    rng = np.random.default_rng(11)
    t, w, h = sar_grid()
    files = {"optical": [], "sar": [], "bands": []}
    for step in range(len(DATES)):
        data = optical(rng, step)
        files["optical"].append(write_tif(root / f"optical_{step}.tif", data, UTM, OPTICAL_T, 0))
        files["bands"].append(
            {key: write_tif(root / f"{key}_{step}.tif", data[i : i + 1], UTM, OPTICAL_T, 0) for i, key in enumerate(["B04", "B03", "B02"])}
        )
        files["sar"].append(write_tif(root / f"sar_{step}.tif", sar(rng, step, w, h), "EPSG:4326", t, None))
    labels = rng.integers(0, 4, (1, SIZE // 2, SIZE // 2)).astype(np.uint8)
    files["label"] = write_tif(root / "label.tif", labels, UTM, Affine(20.0, 0, 500000.0, 0, -20.0, 5000000.0), 255)
    items = []
    for step, when in enumerate(DATES):
        assets = {"visual": files["optical"][step].name, "sar": f"file://{files['sar'][step]}", "label": "label.tif"}
        assets.update({key: path.name for key, path in files["bands"][step].items()})
        items.append(item(f"scene-{step}", when, assets))
    files["items"] = items
    files["one"] = save(root / "item.json", items[1:2])
    files["all"] = save(root / "items.json", items[::-1])  # out of time order on purpose
    return files


def test_cli_item_equals_ingest(scenes, tmp_path, capsys):
    expected = ingest(tmp_path / "ingest.zarr", {"optical": scenes["optical"][1], "sar": scenes["sar"][1]}, scenes["label"])
    out = tmp_path / "stac.zarr"
    args = ["ingest", str(out), "--stac", scenes["one"], "--asset", "optical=visual", "--asset", "sar=sar", "--label-asset", "label"]
    assert main(args) == 0, capsys.readouterr().err
    assert_same_scene(expected, out)
    assert open_scene(out)["label"].attrs["class_counts"]


def test_assets_per_band_equal_ingest_of_the_stacked_file(scenes, tmp_path):
    expected = ingest(tmp_path / "ingest.zarr", {"optical": scenes["optical"][1], "sar": scenes["sar"][1]}, reference="sar")
    ours = ingest(tmp_path / "stac.zarr", {"optical": "B04,B03,B02", "sar": ["sar"]}, stac=scenes["one"], reference="sar")
    assert_same_scene(expected, ours)
    assert list(open_scene(ours)["optical"].optical_band.values) == ["B04", "B03", "B02"]


@pytest.mark.parametrize("time", ["median", "2024-06-21", 0])
def test_item_collection_over_time(scenes, tmp_path, time):
    if time == "median":
        files = {}
        for name in ("optical", "sar"):
            with rasterio.open(scenes[name][0]) as src:
                crs, transform = src.crs, src.transform
            files[name] = write_tif(tmp_path / f"{name}.tif", composite(scenes[name], "median"), crs, transform, np.nan)
    else:
        step = 2 if time == "2024-06-21" else 0  # index 0 is the earliest item, whatever the file's order
        files = {name: scenes[name][step] for name in ("optical", "sar")}
    expected = ingest(tmp_path / "ingest.zarr", files, scenes["label"])
    ours = ingest(tmp_path / "stac.zarr", {"optical": "visual", "sar": "sar"}, stac=scenes["all"], label_asset="label", time=time)
    assert_same_scene(expected, ours)


def run(args, capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_bad_input(scenes, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "bad.zarr")
    cases = [
        (["--stac", scenes["one"], "--asset", "optical=nir"], "has no asset 'nir'"),
        (["--stac", scenes["one"], "--asset", "optical"], "bad --asset"),
        (["--stac", scenes["one"]], "needs at least one --asset"),
        (["--stac", scenes["one"], "--modality", f"optical={scenes['optical'][0]}"], "use --asset"),
        (["--modality", f"optical={scenes['optical'][0]}", "--asset", "optical=visual"], "pass --stac"),
        (["--stac", scenes["all"], "--asset", "optical=visual"], "3 time steps: pass time="),
        (["--stac", scenes["all"], "--asset", "optical=visual", "--time", "1999-01-01"], "matches no step"),
        (["--stac", scenes["one"], "--asset", "optical=visual", "--asset", "optical=sar"], "given twice: give each --asset"),
        (["--stac", str(tmp_path / "missing.json"), "--asset", "optical=visual"], "does not exist"),
    ]
    for extra, message in cases:
        code, err = run(["ingest", out, *extra], capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (extra, err)
    remote = save(tmp_path / "remote.json", [item("r", DATES[0], {"visual": "https://example.com/a.tif"})])
    code, err = run(["ingest", out, "--stac", remote, "--asset", "optical=visual"], capsys)
    assert code == 2 and "is remote" in err
    collection = tmp_path / "collection.json"
    collection.write_text(json.dumps({"type": "Collection", "id": "c"}))
    code, err = run(["ingest", out, "--stac", str(collection), "--asset", "optical=visual"], capsys)
    assert code == 2 and "pass an Item or ItemCollection" in err
    assert not (tmp_path / "bad.zarr").exists()

    monkeypatch.setitem(sys.modules, "pystac", None)  # as if the stac extra were not installed
    with pytest.raises(InputError, match=r"pip install 'tilefuse\[stac\]'"):
        ingest(out, {"optical": "visual"}, stac=scenes["one"])


def test_odc_stac_load_equals_ingest(scenes, tmp_path):
    """What odc-stac loads from the same Items (one variable per band, (time, y, x)) gives the ingested store."""
    odc_stac = pytest.importorskip("odc.stac")
    from pystac.extensions.projection import ProjectionExtension

    items = []
    for original in scenes["items"]:
        copy = original.clone()
        root = scenes["bands"][0]["B04"].parent
        for key in ("B04", "B03", "B02"):
            copy.assets[key].href = str(root / copy.assets[key].href)
            proj = ProjectionExtension.ext(copy.assets[key], add_if_missing=True)
            proj.code, proj.shape, proj.transform = UTM, [SIZE, SIZE], list(OPTICAL_T)[:6]
        items.append(copy)
    loaded = odc_stac.load(items, bands=["B04", "B03", "B02"], chunks={"x": 64, "y": 64}, groupby="id")
    assert set(loaded.data_vars) == {"B04", "B03", "B02"} and loaded.sizes["time"] == 3
    expected = ingest(tmp_path / "ingest.zarr", {"optical": scenes["optical"][1]})
    ours = tilefuse_from_xarray(tmp_path / "odc.zarr", {"optical": loaded}, time=1)
    assert_same_scene(expected, ours)


def test_asset_keys_of_the_wrong_shape_are_one_line(scenes, tmp_path):
    """From Python: a list instead of {name: keys} was an AttributeError traceback, a key that is not a string
    ('optical': ['B04', 3]) an AttributeError in .strip, and a dict of keys was taken by its own keys."""
    from tilefuse.stac import scene_from_stac

    for assets, message in (
        (["visual"], r"^assets= must be a dict of modality name -> asset keys"),
        ({"optical": ["B04", 3]}, r"^modality 'optical': asset keys must be strings"),
        ({"optical": {"B04": 1}}, r"^modality 'optical': asset keys must be strings"),
        ({"optical": None}, r"^modality 'optical': asset keys must be strings"),
    ):
        with pytest.raises(InputError, match=message) as error:
            scene_from_stac(scenes["one"], assets)
        assert "\n" not in str(error.value)


def test_an_asset_with_a_scale_per_band_equals_ingest_of_the_file(scenes, tmp_path):
    """rioxarray keeps a file's per-band scales in file order; the asset's bands were renamed before they were
    applied, so they could no longer be matched to bands (and a multi-band asset with different scales per band was
    refused). They are applied while the band coordinate still holds the file's band numbers."""
    data = optical(np.random.default_rng(5), 0)
    path = write_tif(tmp_path / "scaled.tif", data, UTM, OPTICAL_T, 0)
    with rasterio.open(path, "r+") as dst:
        dst.scales, dst.offsets = (1e-4, 1e-3, 2e-4), (0.0, -0.1, 0.05)
        dst.descriptions = ("red", "green", "blue")
    doc = save(tmp_path / "item.json", [item("scaled", DATES[0], {"visual": path.name, "sar": f"file://{scenes['sar'][0]}"})])
    expected = ingest(tmp_path / "ingest.zarr", {"optical": path, "sar": scenes["sar"][0]})
    got = ingest(tmp_path / "stac.zarr", {"optical": "visual", "sar": "sar"}, stac=doc)
    assert_same_scene(expected, got)
    scene = open_scene(got)
    assert list(scene["optical"]["optical_band"].values) == ["red", "green", "blue"]
    valid = data[1] > 0
    np.testing.assert_allclose(scene["optical"].values[1][valid], data[1][valid] * 1e-3 - 0.1, rtol=1e-6, atol=1e-6)
